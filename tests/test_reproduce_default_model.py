"""Same settings, same image, on the built-in model: a picture made with A1111-style settings comes back
byte for byte from its PNG through `tiengine generate --from-infotext`."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tiengine.cli import main
from tiengine.engine import Engine
from tiengine.io.metadata import parse_parameters, read_image_parameters


@pytest.mark.parametrize(("settings", "expected_fields"), [
    (dict(sampler="DPM++ 2M Karras", rng="nv", subseed=77, subseed_strength=0.3, clip_skip=1),
     {"Sampler": "DPM++ 2M", "Schedule type": "Karras", "RNG": "NV", "Variation seed": "77"}),
    (dict(sampler="k_euler_a", eta_noise_seed_delta=31337, emphasis="no_norm"),
     {"Sampler": "Euler a", "ENSD": "31337", "RNG": "CPU", "Emphasis": "No norm"}),
    (dict(sampler="DPM++ 2M SDE", scheduler="Exponential", hires_scale=1.5, hires_steps=4, strength=0.5),
     {"Sampler": "DPM++ 2M SDE", "Schedule type": "Exponential", "Hires upscale": "1.5", "Hires steps": "4"}),
    (dict(sampler="Euler a", eta=0.5), {"Sampler": "Euler a", "Eta": "0.5"}),
    (dict(sampler="DDIM", eta=0.3), {"Sampler": "DDIM", "Schedule type": "Automatic", "Eta DDIM": "0.3"}),
])
def test_a_picture_comes_back_from_its_infotext(tmp_path, capsys, settings, expected_fields):
    engine = Engine.load(embeddings=False)
    first = engine.generate("two small blue squares on the left <lora:striped:0.8>", "blurry", steps=12, seed=5,
                            **settings)
    path = first.save(tmp_path / "first.png")[0]
    fields = parse_parameters(read_image_parameters(path))
    assert {key: fields.get(key) for key in expected_fields} == expected_fields
    assert fields["Lora hashes"].startswith("striped: ")
    again = tmp_path / "again.png"
    assert main(["generate", "--from-infotext", str(path), "--out", str(again), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"][0]["path"] == str(again)
    with Image.open(path) as made, Image.open(again) as remade:
        assert made.tobytes() == remade.tobytes()


def test_eta_is_the_samplers_noise_amount_and_its_default_is_a1111s():
    engine = Engine.load(embeddings=False)

    def pixels(**settings):
        return engine.generate("a red circle", steps=8, seed=2, **settings).images[0].tobytes()

    assert pixels(sampler="Euler a", eta=1.0) == pixels(sampler="Euler a")  # k-diffusion's eta_ancestral
    assert pixels(sampler="Euler a", eta=0.5) != pixels(sampler="Euler a")
    assert pixels(sampler="DDIM", eta=0.0) == pixels(sampler="DDIM")  # A1111's eta_ddim
    assert pixels(sampler="Euler", eta=0.5) == pixels(sampler="Euler")  # no eta: ignored, as in A1111
