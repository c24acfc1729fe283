"""The packaged default model: folder, card, loading through load_models, and following a prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiengine.weights_conv.convert import load_models

from tiengine import default_model
from tiengine.cli import main
from tiengine.engine import Engine
from tiengine.diffusion.samplers import get_sampler, guided_denoiser
from tiengine.diffusion.schedules import NoiseSchedule, batch_generators, eps_denoiser, get_sigmas, initial_noise
from tiengine.errors import CheckpointError
from tiengine.text.conditioning import encode_texts
from tiengine.toyworld.detector import adherence_report
from tiengine.toyworld.evaluation import generate, held_out_prompts, load_engine
from tiengine.toyworld.train_base import toyworld_model_config


def test_folder_files_and_card():
    path = default_model.default_model_path()
    assert default_model.default_model_card_path() == path / "MODEL_CARD.md"
    card = (path / "MODEL_CARD.md").read_text(encoding="utf-8")
    for needed in ("python -m tiengine.toyworld.train_base", "Prompt adherence on held-out prompts", "fp16", "purple"):
        assert needed in card
    total = sum((path / f"{name}.safetensors").stat().st_size for name in ("unet", "vae", "text_encoder"))
    assert total < 15_000_000
    assert json.loads((path / "config.json").read_text())["family"] == "sd1"


def test_incomplete_folder_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_FOLDER", ("data", "no_such_model"))
    with pytest.raises(CheckpointError, match="missing config.json"):
        default_model.default_model_path()


def test_loads_as_the_training_architecture():
    config, modules = load_models(default_model.default_model_path(), dtype=torch.float32)
    assert config == toyworld_model_config(config.vae.scaling_factor)
    assert (config.family, config.prediction) == ("sd1", "epsilon")
    encoder = modules["text_encoder"]
    assert encoder.text_model.embeddings.token_embedding.weight.shape[0] == 49408
    assert all(p.dtype == torch.float32 for module in modules.values() for p in module.parameters())


def test_follows_held_out_prompts():
    """A third of the held-out prompts at the card's evaluation settings. The card measured 80%+ over all
    of them; 12 images of a model at 0.8 give 60% or less with probability under 2%, and an untrained
    model scores 0."""
    torch.set_num_threads(1)
    engine = load_engine()
    prompts = held_out_prompts(1)[::3]
    images = generate(engine, prompts, seed=0)
    assert images.shape == (12, 64, 64, 3)
    report = adherence_report(list(images), prompts)
    assert report.score > 0.6, report
    assert report.per_attribute["colour"] >= 0.9 and report.per_attribute["count"] >= 0.9, report


def test_generate_runs_the_built_in_model_at_its_guidance_scale(capsys, tmp_path):
    out = tmp_path / "circles.png"
    assert main(["generate", "two large red circles on the left", "--seed", "1", "--steps", "4", "--out", str(out)]) == 0
    assert main(["info", str(out), "--json"]) == 0
    fields = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert fields["CFG scale"] == f"{default_model.DEFAULT_MODEL_CFG_SCALE:g}" and fields["Size"] == "64x64"
    assert main(["generate", "two large red circles on the left", "--seed", "1", "--steps", "4", "--cfg", "7.5",
                 "--out", str(tmp_path / "strong.png")]) == 0
    assert main(["info", str(tmp_path / "strong.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["CFG scale"] == "7.5"


def test_engine_runs_the_built_in_model_at_its_guidance_scale():
    engine = Engine.load()
    assert engine.default_cfg_scale == default_model.DEFAULT_MODEL_CFG_SCALE
    result = engine.generate("two large red circles on the left", steps=2, seed=1)
    assert f"CFG scale: {default_model.DEFAULT_MODEL_CFG_SCALE:g}," in result.parameters[0]
    assert "CFG scale: 7.5," in engine.generate("a red circle", steps=2, seed=1, cfg_scale=7.5).parameters[0]
    # any other model: A1111's default
    assert Engine.load(default_model.default_model_path()).default_cfg_scale == default_model.A1111_CFG_SCALE


@torch.no_grad()
def hand_assembled_images(engine: Engine, prompts: list[str], *, seed: int, steps: int, cfg_scale: float,
                          sampler: str, batch_size: int) -> np.ndarray:
    """The evaluator's former pipeline, from the tested stages: one encode_texts call per batch of prompts,
    eps denoiser, guided_denoiser, a sampler, VAE decode; image i from seed + i."""
    info = get_sampler(sampler)
    unet, vae = engine.modules["unet"], engine.modules["vae"]
    schedule = NoiseSchedule.from_betas(**engine.config.schedule.__dict__)
    sigmas = get_sigmas(schedule, steps, info.default_scheduler, discard_penultimate=info.discard_penultimate_sigma)
    side = engine.config.unet.sample_size
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        cond = encode_texts(batch, engine.tokenizer, engine.slots).context  # (B, 77, C)
        uncond = encode_texts([""] * len(batch), engine.tokenizer, engine.slots).context
        generators = batch_generators(seed + start, len(batch))
        x = initial_noise(generators, (len(batch), unet.config.in_channels, side, side)) * sigmas[0]
        guided = guided_denoiser(eps_denoiser(unet, schedule), uncond, [(cond, 1.0)], cfg_scale)
        latents = info.sample(guided, x, sigmas, generator=generators if info.stochastic else None)
        decoded = vae.images_from_latents(latents)  # (B, 3, H, W) in [-1, 1]
        pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        images.append(pixels.permute(0, 2, 3, 1).numpy())  # (B, H, W, 3)
    return np.concatenate(images)


@pytest.mark.parametrize(("sampler", "steps", "batch_size"), [("DPM++ 2M", 6, 4), ("Euler a", 4, 2)])
def test_evaluator_generates_through_the_engine_like_the_stages_by_hand(sampler, steps, batch_size):
    torch.set_num_threads(1)
    engine = load_engine()
    prompts = held_out_prompts(1)[:5]
    ours = generate(engine, prompts, seed=3, steps=steps, cfg_scale=3.0, sampler=sampler, batch_size=batch_size)
    reference = hand_assembled_images(engine, prompts, seed=3, steps=steps, cfg_scale=3.0, sampler=sampler,
                                      batch_size=batch_size)
    assert np.array_equal(ours, reference)
