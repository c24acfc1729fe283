"""Generate toy-world images with a model folder and score them: prompt adherence, the concept's base rate.

    python -m tiengine.toyworld.evaluation [--model DIR] [--per-prompt 5] [--steps 20] [--cfg 5] [--grid out.png]

The generation loop uses the engine's stages directly: prompt text -> tiengine.text.conditioning.encode_texts
(A1111 chunking and emphasis) -> tiengine.diffusion.schedules.eps_denoiser over the UNet ->
tiengine.diffusion.samplers.guided_denoiser (classifier-free guidance against the negative prompt) -> a sampler
from tiengine.diffusion.samplers.SAMPLERS over tiengine.diffusion.schedules.get_sigmas -> VAE decode. Image i of a call
starts from the noise of seed + i (A1111's batch seeds).

Held-out evaluation: one canonical caption (tiengine.toyworld.world.canonical_caption) per combination in
toyworld.held_out_combinations() (never drawn in training), `per_prompt` seeds each, scored with
tiengine.toyworld.detector.adherence_report. The same run reports the unnamed concept's base rate: the
share of images generated from the held-out prompts with their colour word left out whose objects are
all of the concept's hue (toyworld.CONCEPT_HUE, no embedding involved), and the detector's accuracy on
the VAE's reconstructions of rendered held-out scenes (what the autoencoder alone preserves).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tiengine.weights_conv.convert import load_models

from tiengine.default_model import DEFAULT_MODEL_CFG_SCALE, default_model_path
from tiengine.diffusion.samplers import get_sampler, guided_denoiser
from tiengine.diffusion.schedules import NoiseSchedule, batch_generators, eps_denoiser, get_sigmas, initial_noise
from tiengine.io.atomic import atomic_write_bytes, make_readable
from tiengine.models.config import ModelConfig
from tiengine.text.conditioning import TextEncoderSlot, encode_texts
from tiengine.text.tokenizer import ClipTokenizer
from tiengine.toyworld.detector import AdherenceReport, adherence_report, concept_rate, detect, matches_scene
from tiengine.toyworld.model_card import model_card_text
from tiengine.toyworld.world import canonical_caption, held_out_combinations, render, sample_scenes

if TYPE_CHECKING:
    from tiengine.toyworld.train_base import TrainLog, TrainSettings

# the default model's sampling settings with default_model.DEFAULT_MODEL_CFG_SCALE (its card's scores
# use them; the demo generates with them)
DEFAULT_STEPS = 20
DEFAULT_SAMPLER = "DPM++ 2M"
GUIDANCE_SWEEP = (2.0, 3.0, 5.0, 7.0)  # CFG scales whose held-out adherence the card also reports


@dataclass
class ToyModel:
    """A loaded model folder with what generation needs."""

    config: ModelConfig
    tokenizer: ClipTokenizer
    slot: TextEncoderSlot
    unet: torch.nn.Module
    vae: torch.nn.Module
    schedule: NoiseSchedule


def load_toy_model(path: str | os.PathLike[str] | None = None, *, dtype: torch.dtype = torch.float32) -> ToyModel:
    """Load a converted model folder (default: the packaged default model) on the CPU in `dtype`."""
    if path is None:
        path = default_model_path()
    config, modules = load_models(path, device="cpu", dtype=dtype)
    for module in modules.values():
        module.eval().requires_grad_(False)
    schedule = NoiseSchedule.from_betas(
        config.schedule.num_train_timesteps, config.schedule.beta_start, config.schedule.beta_end,
        config.schedule.beta_schedule,
    )
    slot = TextEncoderSlot("text_encoder", "clip_l", modules["text_encoder"])
    return ToyModel(config, ClipTokenizer.default(), slot, modules["unet"], modules["vae"], schedule)


@torch.no_grad()
def generate(
    model: ToyModel,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    cfg_scale: float = DEFAULT_MODEL_CFG_SCALE,
    sampler: str = DEFAULT_SAMPLER,
    negative_prompt: str = "",
    batch_size: int = 32,
    tokenizer: ClipTokenizer | None = None,
    extra_rows: Mapping[str, torch.Tensor] | None = None,
) -> np.ndarray:
    """(N, H, W, 3) uint8 images for `prompts`; image i from seed + i.

    tokenizer / extra_rows: a tokenizer with added embeddings and their rows per embedding key
    (textual inversion), as tiengine.text.conditioning.encode_texts takes them.
    """
    info = get_sampler(sampler)
    tokenizer = model.tokenizer if tokenizer is None else tokenizer
    dtype = next(model.unet.parameters()).dtype
    side = model.config.unet.sample_size
    sigmas = get_sigmas(model.schedule, steps, info.default_scheduler, discard_penultimate=info.discard_penultimate_sigma)
    denoiser = eps_denoiser(model.unet, model.schedule)
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        cond = encode_texts(batch, tokenizer, [model.slot], extra_rows).context.to(dtype)  # (B, 77k, C)
        uncond = encode_texts([negative_prompt] * len(batch), tokenizer, [model.slot], extra_rows).context.to(dtype)
        generators = batch_generators(seed + start, len(batch))
        x = initial_noise(generators, (len(batch), model.config.unet.in_channels, side, side), dtype=dtype)
        x = x * sigmas[0].to(dtype)
        guided = guided_denoiser(denoiser, uncond, [(cond, 1.0)], cfg_scale)
        latents = info.sample(guided, x, sigmas, generator=generators if info.stochastic else None)
        decoded = model.vae.images_from_latents(latents)  # (B, 3, H, W) in [-1, 1]
        pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        images.append(pixels.permute(0, 2, 3, 1).numpy())  # (B, H, W, 3)
    return np.concatenate(images)


def held_out_prompts(per_prompt: int, *, colour_word: str | None = None) -> list[str]:
    """Each held-out combination's canonical caption, `per_prompt` times (sorted, so the list is fixed).

    colour_word replaces the combination's colour where a colour word stands: "" leaves it out ("two
    large circles on the left"), a word or embedding name takes its place ("two large purple circles ...").
    """
    captions = [
        canonical_caption({"shape": s, "colour": c if colour_word is None else colour_word, "size": z,
                           "position": p, "count": n})
        for s, c, z, p, n in sorted(held_out_combinations())
    ]
    return [text for text in captions for _ in range(per_prompt)]


@torch.no_grad()
def reconstruction_accuracy(model: ToyModel, n: int = 100, seed: int = 0) -> float:
    """Fraction of rendered held-out scenes whose VAE round trip keeps every named attribute detectable
    (an unnamed colour is not checked)."""
    scenes = sample_scenes(seed, n, split="held_out")
    images = torch.from_numpy(np.stack([render(scene) for scene in scenes])).permute(0, 3, 1, 2)  # (n, 3, 64, 64)
    dtype = next(model.vae.parameters()).dtype
    x = (images.float() / 127.5 - 1.0).to(dtype)
    decoded = model.vae.decode(model.vae.encode(x).mean)  # (n, 3, 64, 64)
    pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    hits = [matches_scene(detect(image), scene) for image, scene in zip(pixels, scenes)]
    return sum(hits) / n


@dataclass
class EvaluationResult:
    prompts: list[str]
    images: np.ndarray
    report: AdherenceReport
    concept_rate_without_colour: float  # concept share of images from the prompts without their colour word
    reconstruction_accuracy: float
    steps: int
    cfg_scale: float
    sampler: str
    seed: int
    adherence_by_cfg: dict[float, float]  # held-out adherence at each CFG scale of the sweep (same prompts, seeds)

    def summary(self) -> str:
        attributes = ", ".join(f"{name} {value:.1%}" for name, value in self.report.per_attribute.items())
        sweep = ", ".join(f"CFG {scale:g} {score:.1%}" for scale, score in self.adherence_by_cfg.items())
        return (
            f"held-out prompt adherence {self.report.score:.1%} over {len(self.prompts)} images "
            f"({len(set(self.prompts))} prompts; {self.sampler}, {self.steps} steps, CFG {self.cfg_scale}, "
            f"seed {self.seed}); per attribute: {attributes}; by guidance scale: {sweep}; the unnamed concept's "
            f"colour from the prompts without their colour word {self.concept_rate_without_colour:.1%}; detector "
            f"on VAE reconstructions {self.reconstruction_accuracy:.1%}"
        )


def evaluate_model(
    path: str | os.PathLike[str] | None = None, *, seed: int = 0, per_prompt: int = 5, steps: int = DEFAULT_STEPS,
    cfg_scale: float = DEFAULT_MODEL_CFG_SCALE, sampler: str = DEFAULT_SAMPLER,
    guidance_sweep: Sequence[float] = GUIDANCE_SWEEP,
) -> EvaluationResult:
    """Generate every held-out prompt `per_prompt` times and score the images (at `cfg_scale`, and the
    adherence alone at each scale of `guidance_sweep`)."""
    model = load_toy_model(path)
    prompts = held_out_prompts(per_prompt)
    images = generate(model, prompts, seed=seed, steps=steps, cfg_scale=cfg_scale, sampler=sampler)
    report = adherence_report(list(images), prompts)
    adherence_by_cfg = {}
    for scale in sorted({*guidance_sweep, cfg_scale}):
        swept = images if scale == cfg_scale else generate(model, prompts, seed=seed, steps=steps, cfg_scale=scale,
                                                           sampler=sampler)
        adherence_by_cfg[scale] = adherence_report(list(swept), prompts).score
    colourless = generate(model, held_out_prompts(per_prompt, colour_word=""), seed=seed, steps=steps,
                          cfg_scale=cfg_scale, sampler=sampler)
    return EvaluationResult(
        prompts=prompts,
        images=images,
        report=report,
        concept_rate_without_colour=concept_rate(list(colourless)),
        reconstruction_accuracy=reconstruction_accuracy(model, seed=seed),
        steps=steps,
        cfg_scale=cfg_scale,
        sampler=sampler,
        seed=seed,
        adherence_by_cfg=adherence_by_cfg,
    )


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """(N, H, W, 3) -> one (rows*H, columns*W, 3) image, missing cells white."""
    n, height, width, _ = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * height, columns * width, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    return grid


def write_model_card(
    folder: Path, *, settings: TrainSettings, seed: int, preset: str, log: TrainLog, train_seconds: float,
    machine: str, result: EvaluationResult,
) -> None:
    """MODEL_CARD.md for a model written by tiengine.toyworld.train_base: recipe, rebuild command, scores, timing."""
    text = model_card_text(
        folder=folder, settings=settings, seed=seed, preset=preset, log=log, train_seconds=train_seconds,
        machine=machine, result=result,
    )
    make_readable(atomic_write_bytes(folder / "MODEL_CARD.md", text.encode("utf-8"), overwrite=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiengine.toyworld.evaluation", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the packaged model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-prompt", type=int, default=5, help="images per held-out prompt")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--cfg", type=float, default=DEFAULT_MODEL_CFG_SCALE)
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", type=Path, default=None, help="write the generated images as one PNG grid")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = evaluate_model(
        args.model, seed=args.seed, per_prompt=args.per_prompt, steps=args.steps, cfg_scale=args.cfg,
        sampler=args.sampler,
    )
    print(result.summary())
    if args.grid is not None:
        from PIL import Image

        Image.fromarray(image_grid(result.images, columns=max(args.per_prompt, 1) * 2)).save(args.grid)
        print(f"wrote {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
