"""Textual-inversion training: learn a new embedding's vectors from a few images, every model weight frozen.

The recipe is AUTOMATIC1111's textual inversion (Gal et al. 2022, "An Image is Worth One Word"), restated:
- Initialisation (A1111 `create_embedding`): the init text is tokenized without BOS/EOS and cut to the
  first n tokens (n = vectors per token); vector i is the token-table row of token `i * len // n`, so the
  tokens are spread over the vectors in order (2 tokens over 5 vectors: a a a b b). An empty init text
  gives zeros. Each text encoder (SDXL: both) takes the rows of its own token table. (A1111 cuts to n
  tokens through the CLIP-L tokenizer's max_length; its OpenCLIP path spreads all tokens. tiengine cuts
  for every encoder, so an init text means the same on every model.)
- Data: every image's latent is encoded once (one sample of the VAE posterior, A1111's "once") and
  cached, with its mirror image when flipping is on. Prompts are templates with `[name]` and
  `[filewords]` filled (tiengine.training.data), encoded each step through
  tiengine.text.conditioning.encode_texts exactly as inference encodes them (emphasis, chunking, clip skip,
  SDXL pooled), with the trainable vectors as the tokenizer's extra rows: gradients reach them through
  the emphasis normalisation as in A1111 and reach nothing else.
- Loss: uniform integer timesteps of the model's DDPM schedule, `x_t = sqrt(a) x0 + sqrt(1 - a) noise`,
  MSE against the noise (epsilon models) or `v = sqrt(a) noise - sqrt(1 - a) x0` (v models), optionally
  weighted per latent pixel by the image's alpha (A1111's `use_weight`: alpha shifted to minimum 0 and
  scaled to mean 1). SDXL's size conditioning is the training resolution with crop (0, 0), as inference.
- Optimiser: AdamW (weight decay 0.01, the default of A1111 and diffusers) on the new vectors only, an
  A1111 learning-rate schedule, gradient accumulation, optional clipping by norm or value. On a GPU the
  forward passes run under bf16 (fp16 with a gradient scaler where bf16 is missing) autocast, so the
  fused attention kernels apply; on a CPU everything is fp32.

Randomness is a pure function of the seed: sample j of the stream shows image `perm_e[j mod n]` with
`perm_e` a permutation drawn per epoch e = j // n, and the flips, templates, timesteps and noise of step s
come from a generator seeded by (seed, s, micro-batch). A checkpoint (tiengine.training.state) therefore
only stores the vectors, the optimizer (and gradient-scaler) state and the step, and `resume=True` gives
bit-identical vectors to an uninterrupted run on the same machine.

Files (when `out` is given): the embedding (safetensors by default; `.pt` A1111 dict or `.png` A1111
preview carrier by suffix, more via `also_save`) written when training ends; a work folder
`.<out stem>.training/` beside it (hidden, so an embeddings folder does not load its checkpoints) with
`state.safetensors`, `loss.csv`, `checkpoints/<name>-<step>.safetensors` every `save_every` steps and
`previews/<name>-<step>.png` every `preview_every` steps. Nothing is written until every input has been
read and checked, and no existing file is replaced without `overwrite` (a resumed run may replace only
the outputs it wrote itself).

This module holds the settings, progress and result types, the initialisation and the loss. The loop
itself (checks, latent cache, steps, checkpoints, previews, outputs) and its entry point
`train_embedding(engine, images, name, settings, ...)` are tiengine.training.run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from tiengine.embeddings.embedding import MAX_VECTORS, Embedding
from tiengine.training.data import LearningRateSchedule, TrainingError
from tiengine.training.state import LossRow

if TYPE_CHECKING:
    from tiengine.text.conditioning import TextEncoderSlot
    from tiengine.text.tokenizer import ClipTokenizer

__all__ = ["TrainEmbeddingSettings", "TrainProgress", "TrainResult", "TrainingError", "TrainingInterrupted",
           "alpha_loss_weights", "denoising_loss", "initial_vectors", "resume_settings", "settings_from_options"]

# Generator streams: (seed, stream, ...) seeds every random draw (module docstring).
STREAM_ORDER, STREAM_STEP, STREAM_LATENT = 1, 2, 3
STATE_FILE, LOG_FILE, CHECKPOINT_DIR, PREVIEW_DIR = "state.safetensors", "loss.csv", "checkpoints", "previews"
MIXED_PRECISION = ("auto", "fp32", "bf16", "fp16")
GRAD_CLIP_MODES = ("norm", "value")
MAX_SEED = 2**63 - 1
VAE_BATCH = 8  # images per VAE encoder call while caching latents
# Settings a resumed run may change: they shape no step of the trajectory (steps only says where it ends).
SESSION_SETTINGS = ("steps", "save_every", "preview_every", "preview_prompt", "preview_seed", "preview_steps",
                    "allow_word_name")
# Settings of checkpoints written before the settings were recorded, as their fingerprint holds them.
FINGERPRINT_SETTINGS = ("vectors", "init_text", "seed", "batch_size", "grad_accum", "learning_rate", "resolution",
                        "flip", "alpha_weight", "grad_clip", "grad_clip_mode", "weight_decay", "clip_skip", "emphasis")


@dataclass(frozen=True)
class TrainEmbeddingSettings:
    """Every knob of a training run; the defaults are A1111's (1 vector, init "*", rate 0.005, batch 1).

    template: a built-in set ("object", "style", "object-filewords", "style-filewords"), a template
    file, or "auto": "object-filewords" when any image has a caption file, else "object".
    resolution: training image side in pixels (None: the model's native size).
    seed: -1 draws one at random (reported in the result and kept in checkpoints).
    """

    vectors: int = 1
    init_text: str = "*"
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: str = "0.005"
    template: str = "auto"
    seed: int = 0
    resolution: int | None = None
    flip: bool = False
    alpha_weight: bool = False
    grad_clip: float | None = None
    grad_clip_mode: str = "norm"
    weight_decay: float = 0.01
    mixed_precision: str = "auto"
    clip_skip: int = 1
    emphasis: str = "original"
    save_every: int = 500
    preview_every: int = 0
    preview_prompt: str | None = None
    preview_seed: int | None = None
    preview_steps: int = 20
    allow_word_name: bool = False

    def __post_init__(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise TrainingError(message)

        for key in ("steps", "batch_size", "grad_accum", "preview_steps"):
            value = getattr(self, key)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{key} must be an integer >= 1, got {value!r}")
        need(isinstance(self.vectors, int) and 1 <= self.vectors <= MAX_VECTORS,
             f"vectors per token must be an integer in 1..{MAX_VECTORS} (one prompt chunk), got {self.vectors!r}")
        for key in ("save_every", "preview_every"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 0,
                 f"{key} must be an integer >= 0 (0 = never), got {getattr(self, key)!r}")
        need(isinstance(self.seed, int) and -1 <= self.seed <= MAX_SEED,
             f"seed must be -1 or 0..{MAX_SEED}, got {self.seed!r}")
        need(self.resolution is None or (isinstance(self.resolution, int) and self.resolution >= 8),
             f"resolution must be an integer >= 8 pixels, got {self.resolution!r}")
        need(self.grad_clip is None or (math.isfinite(self.grad_clip) and self.grad_clip > 0),
             f"grad_clip must be a positive number or None, got {self.grad_clip!r}")
        need(self.grad_clip_mode in GRAD_CLIP_MODES,
             f"grad_clip_mode must be one of {GRAD_CLIP_MODES}, got {self.grad_clip_mode!r}")
        need(self.mixed_precision in MIXED_PRECISION,
             f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        LearningRateSchedule.parse(self.learning_rate)

    @classmethod
    def a1111(cls) -> TrainEmbeddingSettings:
        """AUTOMATIC1111's defaults (the class defaults)."""
        return cls()


@dataclass(frozen=True)
class TrainProgress:
    """Passed to the callback after every optimizer step; the callback may return False to stop."""

    step: int  # completed optimizer steps
    steps: int  # steps this run will train
    loss: float
    learning_rate: float
    samples: int
    elapsed_s: float
    eta_s: float
    checkpoint: Path | None = None
    preview: Path | None = None


ProgressCallback = Callable[[TrainProgress], "bool | None"]


@dataclass
class TrainResult:
    """The trained vectors, their Embedding (None when the model's widths fit no embedding file), the log."""

    name: str
    vectors: dict[str, torch.Tensor]
    initial_vectors: dict[str, torch.Tensor]
    embedding: Embedding | None
    steps_done: int
    seed: int
    losses: list[LossRow] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    work_dir: Path | None = None
    resumed_from: int | None = None
    stopped_early: bool = False
    warnings: list[str] = field(default_factory=list)


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C) between steps; the state of `step` was saved to `state_path`."""

    def __init__(self, step: int, state_path: Path) -> None:
        super().__init__(f"interrupted at step {step}; the state is saved in {state_path}")
        self.step, self.state_path = step, state_path


def resume_settings(
    recorded: dict[str, Any],
    given: TrainEmbeddingSettings,
    explicit: Collection[str] | None,
    *,
    completed_step: int,
    source: Path,
) -> tuple[TrainEmbeddingSettings, list[str]]:
    """The settings of a resumed run: the checkpoint's `recorded` ones, except those the caller set on purpose.

    explicit: the fields the caller chose (None: those of `given` that differ from the defaults). An
    explicit field that would change the run's trajectory is refused, naming it; `steps` may move the end
    (not before `completed_step`) and the other SESSION_SETTINGS apply as given. Returns the settings and
    notes about the changes applied.
    """
    defaults = TrainEmbeddingSettings()
    names = [f.name for f in dataclasses.fields(TrainEmbeddingSettings)]
    if explicit is None:
        explicit = {name for name in names if getattr(given, name) != getattr(defaults, name)}
    merged: dict[str, Any] = {}
    refused, notes = [], []
    for name in names:
        mine = getattr(given, name)
        if name not in recorded:
            merged[name] = mine
            continue
        theirs = recorded[name]
        merged[name] = theirs
        if name not in explicit or mine == theirs or (name == "seed" and mine == -1):
            continue
        if name == "steps":
            if mine < completed_step:
                refused.append(f"steps {mine} (the checkpoint has trained {completed_step} steps already)")
                continue
            notes.append(f"steps changed from the run's {theirs} to {mine}")
        elif name not in SESSION_SETTINGS:
            refused.append(f"{name} {mine!r} (the run's is {theirs!r})")
            continue
        merged[name] = mine
    if refused:
        raise TrainingError(f"{source}: resuming continues the checkpoint's run, and these settings would change "
                            f"it: {'; '.join(refused)}. Leave them out to keep the run's values, or pass --overwrite "
                            "(overwrite=True) to start a new run")
    try:
        return TrainEmbeddingSettings(**merged), notes
    except (TrainingError, TypeError, ValueError) as error:
        raise TrainingError(f"{source}: damaged training checkpoint (its recorded settings: {error}); delete the "
                            f"work folder {source.parent} or pass --overwrite (overwrite=True) to start over") from None


def recorded_settings(settings: dict[str, Any] | None, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's recorded settings (known fields only); older checkpoints: those in the fingerprint."""
    names = {f.name for f in dataclasses.fields(TrainEmbeddingSettings)}
    if settings is None:
        return {name: fingerprint[name] for name in FINGERPRINT_SETTINGS if name in fingerprint}
    return {name: value for name, value in settings.items() if name in names}


def initial_vectors(tokenizer: ClipTokenizer, slots: Sequence[TextEncoderSlot], init_text: str,
                    n_vectors: int) -> dict[str, torch.Tensor]:
    """(n, D) float32 starting vectors per encoder key from the init text (A1111's rule, module docstring)."""
    ids = tokenizer.encode(init_text)[:n_vectors] if init_text.strip() else []
    vectors = {}
    for slot in slots:
        table = slot.encoder.text_model.embeddings.token_embedding.weight  # (vocab, D)
        if not ids:
            vectors[slot.embedding_key] = torch.zeros(n_vectors, table.shape[1], dtype=torch.float32)
            continue
        spread = [ids[i * len(ids) // n_vectors] for i in range(n_vectors)]
        vectors[slot.embedding_key] = table.detach()[spread].to("cpu", torch.float32).clone()  # (n, D)
    return vectors


def denoising_loss(
    unet: torch.nn.Module,
    prediction: str,
    alphas_cumprod: torch.Tensor,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    context: torch.Tensor,
    y: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The DDPM training loss of latents x0 (B, C, h, w) at integer timesteps (B,) with noise (B, C, h, w).

    The UNet sees `sqrt(a) x0 + sqrt(1 - a) noise` (a = alphas_cumprod[t]) and the float timestep, as
    inference's denoiser wrappers call it; its output is compared in fp32 with the noise ("epsilon") or
    with `v = sqrt(a) noise - sqrt(1 - a) x0` ("v"). weights (B, h, w) scale each latent pixel's error.
    """
    a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    dtype = next(unet.parameters()).dtype
    prediction_output = unet(noisy.to(dtype), timesteps.to(torch.float32), context, y)
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    error = (prediction_output.float() - target).square()  # (B, C, h, w)
    if weights is not None:
        error = error * weights.unsqueeze(1)
    return error.mean()


def alpha_loss_weights(alpha: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-latent-pixel loss weights (h, w) from an alpha map (H, W) in [0, 1]: area-averaged to the
    latent grid, shifted to minimum 0 and scaled to mean 1 (A1111's `use_weight`); constant alpha gives ones."""
    weight = F.interpolate(alpha[None, None].float(), size=size, mode="area")[0, 0]  # (h, w)
    weight = weight - weight.min()
    mean = weight.mean()
    return weight / mean if mean > 0 else torch.ones(size)


def seeded_generator(*words: int) -> torch.Generator:
    """A CPU generator seeded by a hash of the words (numpy SeedSequence), e.g. (seed, stream, step)."""
    high, low = np.random.SeedSequence(list(words)).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed((int(high) << 32) | int(low))


def settings_from_options(**options: Any) -> TrainEmbeddingSettings:
    """TrainEmbeddingSettings from keyword options; unknown names are a TrainingError listing the known ones."""
    known = {f.name for f in dataclasses.fields(TrainEmbeddingSettings)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TrainingError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
    return TrainEmbeddingSettings(**options)
