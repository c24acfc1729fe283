"""Engine: loading, encode (schedules, AND, embeddings report, cache), generate/img2img, PNG metadata.

Generation is checked against a pipeline assembled by hand from the tested stages (conditioning, eps
denoiser, guidance, sampler, VAE) and against diffusers' StableDiffusionPipeline on the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_builders import tiny_model_folder
from PIL import Image

from tiengine.embeddings.embedding import Embedding, save_embedding
from tiengine.engine import Engine, EngineError
from tiengine.io.metadata import parse_parameters, parse_ti_hashes, read_image_parameters, save_png


@pytest.fixture(scope="module")
def embeddings_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    generator = torch.Generator().manual_seed(5)
    save_embedding(Embedding("rick", {"clip_l": torch.randn(3, 48, generator=generator)}), folder / "rick.safetensors")
    (folder / "negatives").mkdir()
    save_embedding(Embedding("EasyNegative", {"clip_l": torch.randn(2, 48, generator=generator)}),
                   folder / "negatives" / "EasyNegative.safetensors")
    save_embedding(Embedding("sd15style", {"clip_l": torch.randn(2, 768, generator=generator)}),
                   folder / "sd15style.safetensors")
    return folder


@pytest.fixture(scope="module")
def engine(sd1_folder, embeddings_folder):
    return Engine.load(sd1_folder, embeddings=embeddings_folder)


def test_encode_reports_applied_and_skipped_embeddings(engine):
    result = engine.encode("a photo of (rick:1.2), sd15style", "EasyNegative, blurry", steps=10)
    applied = [(a.name, a.prompt, a.chunk, a.slot, a.n_vectors, round(a.weight, 6)) for a in result.applied]
    assert applied == [("rick", "positive", 0, 4, 3, 1.2), ("EasyNegative", "negative", 0, 1, 2, 1.0)]
    assert all(a.short_hash and len(a.short_hash) == 12 for a in result.applied)
    assert [(m.name, m.reason) for m in result.skipped] == [
        ("sd15style", "made for SD1 (clip_l 768), this model is SD1 (clip_l 48)")
    ]


def test_encode_schedules_and_and_parts(engine):
    result = engine.encode("a [cat:dog:0.5] AND a castle:0.7", "", steps=10)
    (first, w1), (second, w2) = result.positive
    assert (w1, w2) == (1.0, 0.7)
    assert [last for last, _, _ in first.entries] == [5, 10]
    assert first.texts == ["a cat", "a dog"]
    assert [last for last, _, _ in second.entries] == [10]
    doubled = engine.encode("a [cat:dog:0.5]", "", steps=10, second_order=True)
    assert [last for last, _, _ in doubled.positive[0][0].entries] == [10, 20]


def test_encode_is_cached_and_scheduled_variants_share_a_batch(engine):
    first = engine.encode("(a cat:1.3) [in a garden:on a roof:3]", "", steps=6)
    assert engine.encode("(a cat:1.3) [in a garden:on a roof:3]", "", steps=6) is first
    from tiengine.text.conditioning import encode_texts

    schedule = first.positive[0][0]
    batch = encode_texts(schedule.texts, engine.tokenizer, engine.slots, engine._rows)
    for index, (_, context, _) in enumerate(schedule.entries):
        torch.testing.assert_close(context, batch.context[index : index + 1], rtol=0, atol=0)


def test_explicit_embedding_syntax_by_subfolder(engine):
    result = engine.encode("embedding:negatives/EasyNegative art", "", steps=4, bare_names=False)
    assert [(a.name, a.slot) for a in result.applied] == [("EasyNegative", 1)]


def test_generate_is_deterministic_and_matches_a_hand_built_pipeline(engine):
    from tiengine.diffusion.samplers import get_sampler, guided_denoiser
    from tiengine.diffusion.schedules import NoiseSchedule, eps_denoiser, get_sigmas, initial_noise
    from tiengine.io.images import tensor_to_pil

    result = engine.generate("a (cat:1.2)", "blurry", steps=5, sampler="Euler", seed=11, width=32, height=32)
    again = engine.generate("a (cat:1.2)", "blurry", steps=5, sampler="Euler", seed=11, width=32, height=32)
    assert result.images[0].tobytes() == again.images[0].tobytes()
    other = engine.generate("a (cat:1.2)", "blurry", steps=5, sampler="Euler", seed=12, width=32, height=32)
    assert result.images[0].tobytes() != other.images[0].tobytes()

    cond = engine.encode("a (cat:1.2)", "blurry", steps=5)
    schedule = NoiseSchedule.from_betas()
    sigmas = get_sigmas(schedule, 5, "normal")
    denoiser = guided_denoiser(eps_denoiser(engine.modules["unet"], schedule),
                               {"context": cond.negative.entries[0][1]},
                               [({"context": cond.positive[0][0].entries[0][1]}, 1.0)], 7.0)
    with torch.no_grad():
        x = initial_noise(11, (1, 4, 8, 8)) * sigmas[0]
        latents = get_sampler("Euler").sample(denoiser, x, sigmas)
        expected = tensor_to_pil(engine.modules["vae"].images_from_latents(latents))[0]
    assert result.images[0].tobytes() == expected.tobytes()


def test_batch_image_equals_its_single_seed_run(engine):
    batch = engine.generate("a cat", steps=3, sampler="Euler a", seed=20, width=32, height=32, batch_size=2)
    single = engine.generate("a cat", steps=3, sampler="Euler a", seed=21, width=32, height=32)
    assert batch.seeds == [20, 21]
    difference = np.asarray(batch.images[1], dtype=int) - np.asarray(single.images[0], dtype=int)
    assert np.abs(difference).max() <= 1  # batched convolutions may round differently by one level


def test_parameters_text_round_trips_through_png(engine, tmp_path):
    result = engine.generate("a (rick:1.1), castle", "EasyNegative", steps=3, sampler="DPM++ 2M", seed=7,
                             width=32, height=32, clip_skip=2)
    path = save_png(result.images[0], tmp_path / "out.png", result.parameters[0])
    fields = parse_parameters(read_image_parameters(path))
    assert fields["Prompt"] == "a (rick:1.1), castle"
    assert fields["Negative prompt"] == "EasyNegative"
    assert fields["Steps"] == "3" and fields["Sampler"] == "DPM++ 2M" and fields["Seed"] == "7"
    assert fields["Schedule type"] == "Karras" and fields["Size"] == "32x32" and fields["Clip skip"] == "2"
    hashes = parse_ti_hashes(fields["TI hashes"])
    assert set(hashes) == {"rick", "EasyNegative"}
    assert hashes["rick"] == engine.vocabulary.embeddings["rick"].short_hash
    with pytest.raises(Exception, match="already exists"):
        save_png(result.images[0], path, result.parameters[0])


def test_img2img_keeps_size_and_strength_zero_returns_the_input_encoding(engine):
    init = Image.new("RGB", (40, 36), (200, 30, 30))
    result = engine.img2img(init, "a cat", strength=0.5, steps=4, sampler="Euler", seed=1)
    assert result.images[0].size == (40, 36)
    assert "Denoising strength: 0.5" in result.parameters[0]


def test_bad_settings_are_refused(engine):
    with pytest.raises(EngineError, match="multiples of 4"):
        engine.generate("a", steps=2, width=30, height=32)
    with pytest.raises(Exception, match="sampler"):
        engine.generate("a", steps=2, sampler="Euler b", width=32, height=32)
    with pytest.raises(EngineError, match="steps must be >= 1"):
        engine.encode("a", steps=0)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_families_generate(tmp_path, family):
    engine = Engine.load(tiny_model_folder(tmp_path / family, family, prediction="v" if family == "sd2" else "epsilon"))
    result = engine.generate("a cat", "", steps=3, sampler="Heun", seed=1, width=32, height=32)
    assert result.images[0].size == (32, 32)
    if family == "sdxl":  # an empty negative prompt is all zeros for SDXL (context and pooled)
        negative = result.conditioning.negative.entries[0]
        assert torch.count_nonzero(negative[1]) == 0 and torch.count_nonzero(negative[2]) == 0
