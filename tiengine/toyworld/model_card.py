"""MODEL_CARD.md text for a toy-world model written by tiengine.toyworld.train_base and scored by
tiengine.toyworld.evaluation: what it is, the data, the recipe, the rebuild command, sizes, scores, timing."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

from tiengine.models.config import read_model_config
from tiengine.toyworld.world import (
    BACKGROUND_WEIGHTS,
    COLOURS,
    CONCEPT_HUE,
    CONCEPT_HUE_TOLERANCE,
    HUE_JITTER,
    POSITION_PHRASES,
    SHAPES,
    SIZES,
    UNNAMED_COLOUR_PROBABILITY,
    held_out_combinations,
)

if TYPE_CHECKING:
    from tiengine.toyworld.evaluation import EvaluationResult
    from tiengine.toyworld.train_base import TrainLog, TrainSettings

COMPONENTS = ("text_encoder", "unet", "vae")


def _parameter_count(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as file:
        for key in file.keys():
            total += math.prod(file.get_slice(key).get_shape())
    return total


def _attention_sides(config) -> str:
    """"16, 8": the latent sides of the down blocks that have cross-attention."""
    side = config.unet.sample_size
    sides = []
    for block in config.unet.down_block_types:
        if block.startswith("CrossAttn"):
            sides.append(str(side))
        side //= 2
    return ", ".join(sides)


def model_card_text(
    *, folder: Path, settings: TrainSettings, seed: int, preset: str, log: TrainLog, train_seconds: float,
    machine: str, result: EvaluationResult,
) -> str:
    """The card as Markdown."""
    config = read_model_config(folder)
    text_config = config.text_encoders["text_encoder"]
    rows = []
    total_bytes = 0
    for name in COMPONENTS:
        path = folder / f"{name}.safetensors"
        size = path.stat().st_size
        total_bytes += size
        rows.append(f"| {name} | {_parameter_count(path):,} | {size / 1e6:.2f} MB |")
    attributes = ", ".join(f"{name} {value:.1%}" for name, value in result.report.per_attribute.items())
    sweep = ", ".join(f"CFG {scale:g} {score:.1%}" for scale, score in result.adherence_by_cfg.items())
    phases = ", ".join(
        f"{name} {seconds / 60:.1f} min ({log.phase_cpu_seconds[name] / 60:.1f} CPU-min)"
        for name, seconds in log.phase_seconds.items()
    )
    cpu_minutes = sum(log.phase_cpu_seconds.values()) / 60
    stopped = "; ".join(log.stopped_early) if log.stopped_early else "no (every phase ran its full step count)"
    recipe = "\n".join(f"| `{field.name}` | {getattr(settings, field.name)} |" for field in dataclasses.fields(settings))
    rebuild = f"python -m tiengine.toyworld.train_base --out tiengine/data/default_model --seed {seed} --threads 2 --overwrite"
    if preset != "default":
        rebuild += f" --preset {preset}"
    weights = ", ".join(f"{name} {share:.0%}" for name, share in BACKGROUND_WEIGHTS.items())
    return f"""# tiengine default model: a tiny Stable Diffusion 1.x trained on the toy world

A Stable Diffusion 1.x model (CLIP text encoder, UNet2DConditionModel, AutoencoderKL, epsilon
prediction, the SD "scaled_linear" 1000-step schedule) in a tiny configuration, trained from scratch
on a CPU by `tiengine/toyworld/train_base.py` on images that `tiengine/toyworld/world.py` generates. It draws 64x64
toy scenes that follow prompts such as "two large red circles on the left", in seconds on a CPU, with
every sampler of tiengine. It knows nothing else: other prompts give arbitrary toy scenes.

## Prompts it understands
`<count> <size> <colour> <shape>[s] <position>`, e.g. "three small blue triangles at the top":
- count: a / one, two, three; size: {", ".join(SIZES)}; colour: {", ".join(COLOURS)};
- shape: {", ".join(SHAPES)} (plural after two / three);
- position: {", ".join(f'"{phrase}"' for phrase in POSITION_PHRASES.values())}.
Colour may be left out (the model then picks any hue), size and position too (training captions
sometimes omit them); ", striped background",
", dotted background", ", plain background" or ", patterned background" may follow. The other phrasings
it was trained on: "two red circles, large, on the left" and "on the left, two large red circles".

## Architecture and files
Images 64x64 RGB; latents 16x16x4 (the VAE downsamples by 4, not 8: latent side = image side / 4;
`scaling_factor` {config.vae.scaling_factor}). Weights are stored in **fp16** (load them in fp32 on a CPU).

| component | parameters | file |
|---|---|---|
{chr(10).join(rows)}

Total {total_bytes / 1e6:.2f} MB. The text encoder keeps CLIP's full 49408-token vocabulary (77-token
windows, `[BOS] + tokens + [EOS] * pad`, read at the last layer through final_layer_norm, as SD1):
hidden {text_config.hidden_size}, {text_config.num_hidden_layers} layers, {text_config.num_attention_heads} heads, so
its token table is most of its size. Rows of tokens the captions never use keep their seeded random
initialisation. UNet: block_out_channels {list(config.unet.block_out_channels)}, {config.unet.layers_per_block}
layer per block, cross-attention ({config.unet.cross_attention_dim}-wide context) at the latent sides
{_attention_sides(config)} and in the middle block. VAE: block_out_channels {list(config.vae.block_out_channels)}, {config.vae.layers_per_block} layer per block.
Full configs: `config.json`.

## Data
`tiengine.toyworld.world` renders, deterministically from the seed, {settings.dataset_size} scenes of 1-3 identical
objects on a textured background ({weights}). Captions name count, size, colour, shape and position,
and in {settings.background_probability:.0%} of training captions the background: "plain", "striped", "dotted", or
the generic "patterned" (which also covers the checkerboard, the only word it ever gets). In
{UNNAMED_COLOUR_PROBABILITY:.0%} of scenes the objects have any hue (uniform over the colour circle) and the
caption no colour word. Unnamed: exact hue (+-{HUE_JITTER:g} degrees around a colour word's), saturation, value,
size and placement, background grey level, tint, period and contrast.
{len(held_out_combinations())} of the 360 attribute combinations (fixed by `toyworld.HELD_OUT_SEED`) never
appear in training; they are the evaluation prompts.

The unnamed concept for textual inversion is **purple**, hue {CONCEPT_HUE:g} degrees: drawn among the unnamed
colours, never named (the word "purple" is in no caption; its token row is untrained).
`toyworld.concept_scenes(seed, 5)` renders examples; `toyworld_eval.detect(image).concept` detects it
(every object's hue within {CONCEPT_HUE_TOLERANCE:g} degrees). `tiengine demo` learns it back as an embedding from 5
such images and measures how often generated images show it (README, "The demo").

## Training (seed {seed}, preset "{preset}")
1. VAE on random {settings.vae_crop} px crops: MSE + L1 + {settings.vae_kl_weight} x KL, {settings.vae_steps} steps of
   {settings.vae_batch}; then frozen, and its scaling factor set to 1 / std of the dataset's latents.
2. UNet and text encoder jointly: epsilon MSE with Min-SNR-{settings.min_snr_gamma:g} weights, {settings.unet_steps}
   steps of {settings.unet_batch}, AdamW (warm-up, cosine decay), captions in three phrasings with size /
   position dropped with probability {settings.omit_probability}, the background named with probability
   {settings.background_probability}, {settings.colour_blend_probability:.0%} of unnamed-colour captions given a colour slot
   between words (the token rows of the two colour words around the hue, blended by hue, as one extra
   embedding row; `train_base.blend_colour_slots`), caption dropout {settings.caption_dropout} for
   classifier-free guidance; the weights kept are an EMA (decay {settings.ema_decay}).

| setting | value |
|---|---|
{recipe}

Machine: {machine}. Training took {train_seconds / 60:.1f} min of wall time and {cpu_minutes:.1f} min of CPU
time summed over threads ({phases}). Stopped early: {stopped}.
The loss log is `train_log.csv`.

Rebuild (same weights for the same seed, thread count and torch build):

    {rebuild}

## Scores
Measured by `python -m tiengine.toyworld.evaluation --model <this folder> --seed {result.seed}` on these fp16 weights
loaded in fp32: every held-out combination's caption, {len(result.prompts) // max(len(set(result.prompts)), 1)} seeds
each ({len(result.prompts)} images), {result.sampler}, {result.steps} steps, CFG {result.cfg_scale}, negative prompt "".

- **Prompt adherence on held-out prompts: {result.report.score:.1%}** (an image counts when the rule-based
  detector of `tiengine.toyworld.detector` finds every attribute the prompt names).
- Per attribute: {attributes}.
- Adherence by guidance scale (same prompts and seeds): {sweep}. This small model follows
  its prompts best at low guidance, so its CFG is {result.cfg_scale:g} (the scores above, `tiengine demo`, and
  `tiengine generate` when it runs this model without `--cfg`).
- The concept's colour without any embedding, from the same prompts with their colour word left out
  (the model's own choice of hue): {result.concept_rate_without_colour:.1%} of those images.
- Detector on the VAE's reconstructions of rendered held-out scenes: {result.reconstruction_accuracy:.1%}.

## License and limits
Weights made by this repository's code from generated data; same license as tiengine (MIT). A toy for
tests, demos and textual-inversion experiments, not a general image model.
"""
