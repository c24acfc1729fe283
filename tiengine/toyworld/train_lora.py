"""The default model's "striped" LoRA: striped backgrounds whatever the prompt says, trained and measured on a CPU.

    python -m tiengine.toyworld.train_lora --out FILE [--seed 1] [--threads 1] [--overwrite] [--card MODEL_CARD.md]

The packaged file is `tiengine/data/default_model/loras/striped.safetensors` (`STRIPED_LORA`), so a prompt's
`<lora:striped:1>` finds it beside the default model.

Recipe (`StripedRecipe`, all randomness from the seed):
1. Render `images` training-split scenes with a forced striped background (tiengine.toyworld.world:
   `sample_scenes(..., background="stripes")`: the world's periods and contrasts), all with diagonal
   stripes, and encode them once with the default model's VAE (`train_base.encode_latents`: latent
   means times the scaling factor, as the base model was trained). One orientation, because the base
   model left to choose one superposes them into a grid: prompted ", striped background" it draws
   stripes in 36% of the held-out prompts' images and a grid the detector calls dots in 28%.
2. Caption each scene as train_base does (`world.caption`: three phrasings, size / position left out with
   probability 0.1) but never with a background phrase: the LoRA learns stripes as the default, not as a
   word.
3. Train a kohya-style LoRA on the UNet (tiengine.training.lora: rank 4, alpha 4, the transformer blocks'
   attention and projections), epsilon loss under the model's schedule at timesteps below 700 (kohya's
   --max_timestep; the steps go to the noise levels where the background's texture forms), AdamW at a
   constant 3e-3, 250 steps of 16.
4. Save it with kohya's `ss_*` metadata; `ss_training_comment` holds the command, seed, threads, the
   training time and the machine.

Measurement (`measure_lora`): the held-out prompts of tiengine.toyworld.evaluation (canonical captions,
no background word), `per_prompt` seeds each, the default model's sampler, steps and CFG, generated with
the LoRA merged into a copy of the UNet weights (`merged_unet_weights`, W + m * alpha / rank * up @ down)
at each multiplier and once with the untouched model; tiengine.toyworld.detector classifies every
background (plain / stripes / dots / checker) and checks the prompt's named attributes. `--card` replaces
or appends the "LoRA: striped" section of the model card with the numbers.

`merged_unet_weights` stands in for the engine's own `<lora:...>` support (tiengine.networks); it reads
only UNet modules of plain LoRA files.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tiengine.default_model import DEFAULT_MODEL_CFG_SCALE, DEFAULT_MODEL_SEED, default_model_path
from tiengine.engine import Engine
from tiengine.errors import NetworkError
from tiengine.io.atomic import atomic_write_bytes, make_readable
from tiengine.toyworld.detector import adherence_report
from tiengine.toyworld.evaluation import DEFAULT_SAMPLER, DEFAULT_STEPS, generate, held_out_prompts, load_engine
from tiengine.toyworld.train_base import encode_latents, machine_description
from tiengine.toyworld.world import BACKGROUNDS, REFERENCE_SIZE, caption, render_batch, sample_scenes
from tiengine.training.lora import (
    UNET_PREFIX,
    LoraFile,
    LoraProgress,
    LoraSettings,
    kohya_metadata,
    kohya_name,
    read_kohya_lora,
    train_lora,
)

STRIPED_LORA = ("loras", "striped.safetensors")  # inside the default model folder
CARD_HEADING = "## LoRA: striped"
LOG_EVERY = 50  # steps between progress lines
CARD_WIDTH = 110  # characters per line of the card's prose
# The packaged file's LoRA settings (module docstring, step 3); the seed comes from --seed.
STRIPED_SETTINGS = LoraSettings(rank=4, alpha=4.0, steps=250, batch_size=16, learning_rate=3e-3, max_timestep=700)


@dataclass(frozen=True)
class StripedRecipe:
    """The training data and LoRA settings of the packaged file (module docstring); the seed is set per run."""

    images: int = 256
    orientation: str | None = "diagonal"  # every scene's stripes run this way (None: as the world draws them)
    omit_probability: float = 0.1  # size / position left out of a caption, as train_base
    lora: LoraSettings = STRIPED_SETTINGS


def striped_lora_path() -> Path:
    """Path of the packaged striped LoRA (it may not exist yet: this module writes it)."""
    return default_model_path().joinpath(*STRIPED_LORA)


def training_data(engine: Engine, seed: int, recipe: StripedRecipe) -> tuple[torch.Tensor, list[str]]:
    """Scaled latents (N, 4, 16, 16) of `recipe.images` striped scenes and their background-free captions."""
    scenes = sample_scenes(seed, recipe.images, split="train", background="stripes")
    if recipe.orientation is not None:
        scenes = [dataclasses.replace(scene, stripe_orientation=recipe.orientation) for scene in scenes]
    pixels = torch.from_numpy(render_batch(scenes)).permute(0, 3, 1, 2)  # (N, 3, 64, 64) uint8
    latents = encode_latents(engine.modules["vae"], pixels.contiguous()) * engine.config.vae.scaling_factor
    rng = np.random.default_rng([seed, 2])
    captions = [caption(scene, rng, omit_probability=recipe.omit_probability) for scene in scenes]
    return latents, captions


def merged_unet_weights(base: Mapping[str, torch.Tensor], lora: LoraFile, multiplier: float) -> dict[str, torch.Tensor]:
    """A copy of the UNet state dict `base` with every module of `lora` merged: W + multiplier * alpha / rank *
    up @ down, computed in float32 and stored in W's dtype. A NetworkError names the file and key of a module
    that is not the UNet's or whose update does not fit its weight."""
    by_name = {kohya_name(UNET_PREFIX, key.removesuffix(".weight")): key for key in base if key.endswith(".weight")}
    merged = dict(base)
    for module, weights in lora.modules.items():
        key = by_name.get(module)
        if key is None:
            raise NetworkError(f"{lora.path}: module {module!r} is no layer of this UNet (expected a "
                               f"{UNET_PREFIX}_ name of one of its weights)")
        weight = base[key]
        delta = weights.delta()
        if delta.shape != weight.shape:
            raise NetworkError(f"{lora.path}: module {module!r} updates {key} {list(weight.shape)} with "
                               f"up @ down {list(delta.shape)}")
        merged[key] = (weight.float() + multiplier * delta).to(weight.dtype)
    return merged


@dataclass
class LoraMeasurement:
    """Background shares and prompt adherence per multiplier, from the same prompts and seeds."""

    prompts: list[str]
    seed: int
    backgrounds: dict[float, dict[str, float]]  # multiplier -> texture -> share of the images
    adherence: dict[float, float]  # multiplier -> share matching every attribute the prompt names
    zero_is_base: bool  # multiplier 0 gave the untouched model's images bit for bit
    changed_at: dict[float, int]  # multiplier -> images that differ from the untouched model's
    seconds: float

    def summary(self) -> str:
        rows = []
        for multiplier, shares in self.backgrounds.items():
            textures = ", ".join(f"{name} {share:.1%}" for name, share in shares.items())
            rows.append(f"multiplier {multiplier:g}: {textures}; adherence {self.adherence[multiplier]:.1%}; "
                        f"{self.changed_at[multiplier]} of {len(self.prompts)} images differ from the base model")
        identical = "yes" if self.zero_is_base else "NO"
        rows.append(f"multiplier 0 equals the base model bit for bit: {identical}; measured in {self.seconds:.0f} s")
        return "\n".join(rows)


@torch.no_grad()
def measure_lora(
    engine: Engine, lora: LoraFile, *, per_prompt: int = 2, seed: int = 0, multipliers: Sequence[float] = (0.0, 1.0),
) -> LoraMeasurement:
    """Generate the held-out prompts with the LoRA merged at each multiplier and classify the backgrounds."""
    started = time.perf_counter()
    prompts = held_out_prompts(per_prompt)
    unet = engine.modules["unet"]
    base = {key: value.clone() for key, value in unet.state_dict().items()}
    reference = generate(engine, prompts, seed=seed)  # (N, 64, 64, 3) uint8
    backgrounds, adherence, changed = {}, {}, {}
    zero_is_base = False
    try:
        for multiplier in multipliers:
            unet.load_state_dict(merged_unet_weights(base, lora, multiplier))
            images = generate(engine, prompts, seed=seed)
            report = adherence_report(list(images), prompts)
            counts = Counter(detection.background for detection in report.detections)
            backgrounds[multiplier] = {name: counts[name] / len(prompts) for name in BACKGROUNDS}
            adherence[multiplier] = report.score
            changed[multiplier] = int(sum(not np.array_equal(a, b) for a, b in zip(images, reference)))
            if multiplier == 0.0:
                zero_is_base = bool(np.array_equal(images, reference))
    finally:
        unet.load_state_dict(base)
    return LoraMeasurement(prompts, seed, backgrounds, adherence, zero_is_base, changed,
                           time.perf_counter() - started)


def card_section(*, lora_file: str, command: str, recipe: StripedRecipe, seed: int, train_seconds: float,
                 machine: str, measurement: LoraMeasurement, size_bytes: int, layers: int) -> str:
    """The model card's "LoRA: striped" section (Markdown, ending in a newline)."""
    settings = recipe.lora
    images = len(measurement.prompts)
    prompts = len(set(measurement.prompts))
    lines = [
        CARD_HEADING,
        (f"`{lora_file}` ({size_bytes / 1000:.0f} kB, kohya-ss LoRA format, fp32) makes backgrounds striped when "
         "the prompt names none; at multiplier 0 every image is the base model's, bit for bit."),
        (f"Rank {settings.rank}, alpha {settings.alpha:g} on {layers} UNet layers (the transformer blocks' "
         "attn1/attn2 to_q, to_k, to_v, to_out.0 and proj_in / proj_out; text encoder untouched), trained by "
         f"`tiengine/toyworld/train_lora.py` on {recipe.images} renders of training-split scenes with "
         f"{recipe.orientation or 'any'} stripes, captioned without any background word: {settings.steps} steps of "
         f"{settings.batch_size} at timesteps below {settings.max_timestep}, AdamW at {settings.learning_rate:g} "
         f"(constant), seed {seed}. One orientation, because the base model, left to choose one, often "
         "superposes them into a grid (the detector's \"dots\"), even when asked for a striped background. "
         "Command:"),
        "",
        f"    {command}",
        "",
        f"Training (data included) took {train_seconds:.0f} s of wall time on {machine}.",
        "",
        (f"Measured by the same command on {images} images: the {prompts} held-out prompts (no background word), "
         f"{images // prompts} seeds each from seed {measurement.seed}, {DEFAULT_SAMPLER}, {DEFAULT_STEPS} steps, "
         f"CFG {DEFAULT_MODEL_CFG_SCALE:g}, the LoRA merged into the UNet weights; backgrounds classified by "
         "`tiengine.toyworld.detector`, prompt adherence as in \"Scores\" above."),
        "",
        "| multiplier | stripes | plain | dots | checker | prompt adherence |",
        "|---|---|---|---|---|---|",
    ]
    for multiplier, shares in measurement.backgrounds.items():
        lines.append(f"| {multiplier:g} | **{shares['stripes']:.1%}** | {shares['plain']:.1%} | {shares['dots']:.1%} | "
                     f"{shares['checker']:.1%} | {measurement.adherence[multiplier]:.1%} |")
    identical = "the same images as the base model, bit for bit" if measurement.zero_is_base else "DIFFERENT images"
    lines += ["", f"Multiplier 0 gives {identical}."]
    # prose wrapped as the rest of the card; the indented command and the table stay whole lines
    wrapped = [line if line.startswith(("    ", "|")) else textwrap.fill(line, CARD_WIDTH, break_on_hyphens=False)
               for line in lines]
    return "\n".join(wrapped) + "\n"


def write_card_section(card: Path, section: str) -> None:
    """Replace the card's "LoRA: striped" section (up to the next "## " heading), or append it."""
    text = card.read_text(encoding="utf-8")
    body = section.rstrip("\n") + "\n"
    pattern = re.compile(rf"^{re.escape(CARD_HEADING)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: body + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + body
    make_readable(atomic_write_bytes(card, text.encode("utf-8"), overwrite=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiengine.toyworld.train_lora", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="LoRA file to write (.safetensors)")
    parser.add_argument("--seed", type=int, default=DEFAULT_MODEL_SEED, help="seed of the scenes, captions and "
                        f"training (default {DEFAULT_MODEL_SEED}: the packaged file)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--steps", type=int, default=StripedRecipe().lora.steps, help="training steps")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--per-prompt", type=int, default=2, help="measurement images per held-out prompt (0: "
                        "no measurement)")
    parser.add_argument("--card", type=Path, default=None, help="model card whose 'LoRA: striped' section to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = dataclasses.replace(StripedRecipe(), lora=dataclasses.replace(StripedRecipe().lora, seed=args.seed,
                                                                            steps=args.steps))
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists; pass --overwrite to replace it")
    command = "python -m tiengine.toyworld.train_lora " + " ".join(sys.argv[1:] if argv is None else argv)
    engine = load_engine()
    started = time.perf_counter()
    latents, captions = training_data(engine, args.seed, recipe)

    def report(progress: LoraProgress) -> None:
        if progress.step % LOG_EVERY == 0 or progress.step == progress.steps:
            print(f"step {progress.step}/{progress.steps} loss {progress.loss:.4f} ({progress.elapsed_s:.0f} s)",
                  flush=True)

    result = train_lora(engine, latents, captions, recipe.lora, callback=report)
    train_seconds = time.perf_counter() - started
    machine = machine_description(args.threads)
    comment = (f"{command} ; seed {args.seed}, {args.threads} thread(s); data and training took {train_seconds:.0f} s "
               f"wall on {machine}; {recipe.images} scenes with {recipe.orientation or 'any'} stripes captioned "
               f"without background words, timesteps below {recipe.lora.max_timestep}")
    metadata = kohya_metadata(recipe.lora, engine.config, output_name=args.out.stem, comment=comment,
                              images=recipe.images, resolution=REFERENCE_SIZE)
    make_readable(result.network.save(args.out, metadata, overwrite=args.overwrite))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) after {train_seconds:.0f} s")
    if args.per_prompt <= 0:
        return 0
    measurement = measure_lora(engine, read_kohya_lora(args.out), per_prompt=args.per_prompt)
    print(measurement.summary())
    if args.card is not None:
        section = card_section(
            lora_file=Path(os.path.relpath(args.out, args.card.parent)).as_posix(), command=command, recipe=recipe,
            seed=args.seed, train_seconds=train_seconds, machine=machine, measurement=measurement,
            size_bytes=args.out.stat().st_size, layers=len(result.network.layers),
        )
        write_card_section(args.card, section)
        print(f"wrote the '{CARD_HEADING[3:]}' section of {args.card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
