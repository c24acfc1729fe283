"""Textual-inversion training: learn a new embedding's vectors from a few images, every model weight frozen.

The recipe is AUTOMATIC1111's textual inversion (Gal et al. 2022, "An Image is Worth One Word"), restated:
- Initialisation (A1111 `create_embedding`): the init text is tokenized without BOS/EOS and cut to the
  first n tokens (n = vectors per token); vector i is the token-table row of token `i * len // n`, so the
  tokens are spread over the vectors in order (2 tokens over 5 vectors: a a a b b). An empty init text
  gives zeros. Each text encoder (SDXL: both) takes the rows of its own token table.
- Data: every image's latent is encoded once (one sample of the VAE posterior, A1111's "once") and
  cached, with its mirror image when flipping is on. Prompts are templates with `[name]` and
  `[filewords]` filled (tiengine.training_data), encoded each step through
  tiengine.conditioning.encode_texts exactly as inference encodes them (emphasis, chunking, clip skip,
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
come from a generator seeded by (seed, s, micro-batch). A checkpoint (tiengine.training_state) therefore
only stores the vectors, the optimizer (and gradient-scaler) state and the step, and `resume=True` gives
bit-identical vectors to an uninterrupted run on the same machine.

Files (when `out` is given): the embedding (safetensors by default; `.pt` A1111 dict or `.png` A1111
preview carrier by suffix, more via `also_save`) written when training ends; a work folder
`.<out stem>.training/` beside it (hidden, so an embeddings folder does not load its checkpoints) with
`state.safetensors`, `loss.csv`, `checkpoints/<name>-<step>.safetensors` every `save_every` steps and
`previews/<name>-<step>.png` every `preview_every` steps. Nothing is written until every input has been
read and checked, and no existing file is replaced without `overwrite` (a resumed run may replace only
the outputs it wrote itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from tiengine.embeddings import MAX_VECTORS, SAVE_FORMATS, Embedding, file_sha256, save_embedding
from tiengine.errors import EmbeddingError
from tiengine.training_data import (FILEWORDS_PLACEHOLDER, LearningRateSchedule, TrainingError,
                                    TrainingImage, fill_template, find_images, load_image, load_templates)
from tiengine.training_state import (LossRow, TrainingState, fingerprint_differences, load_state, read_loss_log,
                                     save_state, write_loss_log)

if TYPE_CHECKING:
    from PIL import Image

    from tiengine.conditioning import TextEncoderSlot
    from tiengine.engine import Engine
    from tiengine.tokenizer import ClipTokenizer

__all__ = ["TrainEmbeddingSettings", "TrainProgress", "TrainResult", "TrainingError", "alpha_loss_weights",
           "denoising_loss", "initial_vectors", "train_embedding"]

# Generator streams: (seed, stream, ...) seeds every random draw (module docstring).
STREAM_ORDER, STREAM_STEP, STREAM_LATENT = 1, 2, 3
STATE_FILE, LOG_FILE, CHECKPOINT_DIR, PREVIEW_DIR = "state.safetensors", "loss.csv", "checkpoints", "previews"
MIXED_PRECISION = ("auto", "fp32", "bf16", "fp16")
GRAD_CLIP_MODES = ("norm", "value")
MAX_SEED = 2**63 - 1
VAE_BATCH = 8  # images per VAE encoder call while caching latents


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
        need(isinstance(self.seed, int) and -1 <= self.seed <= MAX_SEED, f"seed must be -1 or 0..{MAX_SEED}, got {self.seed!r}")
        need(self.resolution is None or (isinstance(self.resolution, int) and self.resolution >= 8),
             f"resolution must be an integer >= 8 pixels, got {self.resolution!r}")
        need(self.grad_clip is None or (math.isfinite(self.grad_clip) and self.grad_clip > 0),
             f"grad_clip must be a positive number or None, got {self.grad_clip!r}")
        need(self.grad_clip_mode in GRAD_CLIP_MODES, f"grad_clip_mode must be one of {GRAD_CLIP_MODES}, got {self.grad_clip_mode!r}")
        need(self.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
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


def train_embedding(
    engine: Engine,
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    name: str,
    settings: TrainEmbeddingSettings = TrainEmbeddingSettings(),
    *,
    out: str | os.PathLike[str] | None = None,
    also_save: Sequence[str] = (),
    work_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    callback: ProgressCallback | None = None,
) -> TrainResult:
    """Learn embedding `name` from `images` (a folder or a list of files) on `engine`'s frozen model.

    out: the embedding file to write (None: nothing is written; no checkpoints, previews or resume).
    also_save: further formats written beside `out` ("safetensors", "pt", "png").
    work_dir: checkpoints, log and previews (default `.<out stem>.training` beside `out`).
    resume: continue from the work folder's checkpoint (a fresh start, with a warning, when there is none).
    The engine is not modified; register the result with `engine.add_embedding(result.embedding)`.
    """
    from tiengine.tokenizer import ClipTokenizer

    run = _Run(engine, name, settings, callback)
    run.plan_files(out, also_save, work_dir, overwrite, resume)
    run.tokenizer = ClipTokenizer.default()
    run.check_name()
    run.load_inputs(images)
    run.prepare()
    return run.train()


class _Run:
    """One training run: inputs, the trainable vectors, the optimizer and the files."""

    def __init__(self, engine: Engine, name: str, settings: TrainEmbeddingSettings,
                 callback: ProgressCallback | None) -> None:
        if engine.config.variant == "refiner":
            raise TrainingError("the SDXL refiner has only the OpenCLIP-bigG encoder; train embeddings on the base model")
        self.engine, self.name, self.settings, self.callback = engine, name, settings, callback
        self.schedule = LearningRateSchedule.parse(settings.learning_rate)
        self.seed = settings.seed if settings.seed != -1 else random.randint(0, 2**32 - 1)
        self.warnings: list[str] = []
        self.out: Path | None = None
        self.extra_outputs: list[tuple[Path, str]] = []
        self.work_dir: Path | None = None
        self.overwrite = self.resume = False
        self.previous: TrainingState | None = None
        self.preview_engine: Engine | None = None
        self.last_preview: Image.Image | None = None

    # ------------------------------------------------------------------------------------ checks

    def plan_files(self, out, also_save, work_dir, overwrite: bool, resume: bool) -> None:
        settings = self.settings
        self.overwrite, self.resume = overwrite, resume
        if out is None:
            if work_dir is not None or also_save or resume or settings.preview_every:
                raise TrainingError("work_dir, also_save, resume and previews need an output file (out=...)")
            return
        self.out = Path(out)
        main_format = SAVE_FORMATS.get(self.out.suffix.lower())
        if main_format is None:
            raise TrainingError(f"{self.out}: the output must end in {', '.join(SAVE_FORMATS)}")
        for fmt in dict.fromkeys(also_save):
            if fmt not in SAVE_FORMATS.values():
                raise TrainingError(f"also_save: unknown format {fmt!r} (expected {', '.join(SAVE_FORMATS.values())})")
            if fmt != main_format:
                self.extra_outputs.append((self.out.with_suffix(f".{fmt}"), fmt))
        self.work_dir = Path(work_dir) if work_dir is not None else self.out.parent / f".{self.out.stem}.training"
        state_path = self.work_dir / STATE_FILE
        if resume and state_path.is_file():
            self.previous = load_state(state_path)
            if settings.seed == -1:
                self.seed = int(self.previous.fingerprint.get("seed", self.seed))
        elif resume:
            self.warnings.append(f"nothing to resume in {self.work_dir} (no {STATE_FILE}); starting at step 0")
        elif state_path.exists() and not overwrite:
            raise TrainingError(f"{self.work_dir} holds an earlier training run; pass resume=True (--resume) to continue "
                                "it or overwrite=True (--overwrite) to start over")
        for path, _ in [(self.out, main_format), *self.extra_outputs]:
            if path.exists() and not overwrite:
                written = (self.previous.outputs.get(str(path)) if self.previous else None)
                if written is None or file_sha256(path) != written:
                    raise TrainingError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")

    def check_name(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name.strip():
            raise TrainingError(f"embedding name must be a non-empty string, got {name!r}")
        if name != name.strip() or any(c in name for c in "/\\") or any(ord(c) < 32 for c in name):
            raise TrainingError(f"embedding name {name!r}: no leading/trailing spaces, slashes or control characters "
                                "(the name is also the file name)")
        ids = self.tokenizer.encode(name)
        if not ids:
            raise TrainingError(f"embedding name {name!r} gives no tokens; use letters or digits")
        if len(ids) == 1 and not self.settings.allow_word_name:
            word = self.tokenizer.token_text(ids[0]).removesuffix("</w>")
            raise TrainingError(
                f"embedding name {name!r} is the vocabulary word {word!r}: embeddings bind by token ids (A1111), so "
                f"it would replace that word in every prompt. Choose a made-up name (e.g. '{name}-ti' or 'my{name}x') "
                "or pass allow_word_name=True (--allow-word-name)"
            )
        loaded = self.engine.vocabulary.embeddings.get(name)
        if loaded is not None:
            self.warnings.append(f"an embedding named {name!r} is loaded ({loaded.label}); training binds the name "
                                 "to the new vectors instead")

    def load_inputs(self, images) -> None:
        settings, engine = self.settings, self.engine
        factor = engine.modules["vae"].downscale_factor
        grid = factor * 2 ** (len(engine.config.unet.block_out_channels) - 1)
        self.resolution = settings.resolution or engine.config.unet.sample_size * factor
        if self.resolution % grid:
            raise TrainingError(f"resolution {self.resolution}: must be a multiple of {grid} for this model")
        paths = find_images(images)
        self.images: list[TrainingImage] = [load_image(p, self.resolution, keep_alpha=settings.alpha_weight)
                                            for p in paths]
        if len(self.images) < 3:
            self.warnings.append(f"{len(self.images)} training image(s): 3 to 5 or more give a less overfitted embedding")
        template = settings.template
        if template == "auto":
            template = "object-filewords" if any(i.caption_from_file for i in self.images) else "object"
        self.templates = load_templates(template)
        if any(i.caption_from_file for i in self.images) and not any(FILEWORDS_PLACEHOLDER in t for t in self.templates):
            self.warnings.append(f"caption files found but template {template!r} has no {FILEWORDS_PLACEHOLDER}")
        self.prompts = [[fill_template(t, self.name, image.caption) for t in self.templates] for image in self.images]
        self.precision = _resolve_precision(settings.mixed_precision, engine.device)
        widths = engine.encoder_widths
        try:
            Embedding(self.name, {key: torch.zeros(settings.vectors, width) for key, width in widths.items()})
            self.storable = True
        except EmbeddingError as error:
            self.storable = False
            if self.out is not None:
                raise TrainingError(f"this model's text encoder widths {widths} fit no embedding file format "
                                    f"({error})") from None
        last = self.schedule.last_step(settings.steps)
        if last < settings.steps:
            self.warnings.append(f"the learning-rate schedule {settings.learning_rate!r} ends at step {last}: training "
                                 f"stops there (A1111's rule); end it with a rate without ':step' to train all {settings.steps}")
        self.last_step = last

    def fingerprint(self) -> dict[str, Any]:
        s, engine = self.settings, self.engine
        return {
            "name": self.name, "vectors": s.vectors, "init_text": s.init_text, "seed": self.seed,
            "batch_size": s.batch_size, "grad_accum": s.grad_accum, "learning_rate": s.learning_rate,
            "templates": list(self.templates), "resolution": self.resolution, "flip": s.flip,
            "alpha_weight": s.alpha_weight, "grad_clip": s.grad_clip, "grad_clip_mode": s.grad_clip_mode,
            "weight_decay": s.weight_decay, "precision": self.precision, "clip_skip": s.clip_skip,
            "emphasis": s.emphasis,
            "images": [[image.path.name, image.sha256, image.caption] for image in self.images],
            "model": [engine.config.family, engine.config.prediction, engine.model_hash()],
            "other_embeddings": sorted(self.other_embeddings),
        }

    # ---------------------------------------------------------------------------------- preparing

    def prepare(self) -> None:
        from tiengine.conditioning import EncodeOptions
        from tiengine.schedules import NoiseSchedule
        from tiengine.vocabulary import EmbeddingVocabulary

        engine, settings = self.engine, self.settings
        device = engine.device
        self.options = EncodeOptions(clip_skip=settings.clip_skip, emphasis=settings.emphasis)
        others = {n: e for n, e in engine.vocabulary.embeddings.items() if n != self.name}
        self.other_embeddings = {n: e.short_hash or "memory" for n, e in others.items()}
        # The init text is read with the plain vocabulary, before any embedding name can bind in it.
        self.initial = initial_vectors(self.tokenizer, engine.slots, settings.init_text, settings.vectors)
        vocabulary = EmbeddingVocabulary.build(self.tokenizer, others)
        self.other_rows = {slot.embedding_key: vocabulary.extra_rows(slot.embedding_key, device=device,
                                                                     dtype=torch.float32) for slot in engine.slots}
        self.tokenizer.add_embedding(self.name, settings.vectors)
        self.params = {key: torch.nn.Parameter(value.to(device, copy=True)) for key, value in self.initial.items()}
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=self.schedule.entries[0][0],
                                           weight_decay=settings.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type) if self._uses_scaler() else None
        self.alphas_cumprod = NoiseSchedule.from_betas(**engine.config.schedule.__dict__).alphas_cumprod.to(device)
        self.step, self.seconds, self.samples, self.losses = 0, 0.0, 0, []
        if self.previous is not None:
            differences = fingerprint_differences(self.previous.fingerprint, self.fingerprint())
            if differences:
                raise TrainingError(f"{self.work_dir / STATE_FILE}: the checkpoint belongs to a different run; "
                                    "differences: " + "; ".join(differences))
            self._restore(self.previous)
        self._cache_latents()

    def _uses_scaler(self) -> bool:
        half_weights = self.engine.dtype == torch.float16
        return self.engine.device.type == "cuda" and (self.precision == "fp16" or half_weights)

    def _restore(self, state: TrainingState) -> None:
        with torch.no_grad():
            for key, param in self.params.items():
                param.copy_(state.vectors[key])
        saved = self.optimizer.state_dict()
        saved["state"] = {index: dict(entries) for index, entries in state.optimizer_state.items()}
        self.optimizer.load_state_dict(saved)
        if self.scaler is not None and state.scaler_state:
            self.scaler.load_state_dict(state.scaler_state)
        self.step, self.seconds, self.samples = state.step, state.seconds, state.samples
        self.losses = read_loss_log(self.work_dir / LOG_FILE, state.step)

    @torch.no_grad()
    def _cache_latents(self) -> None:
        """Latents (n, views, C, h, w) float32 of every image (views: as is, mirrored) and alpha weights."""
        vae, device = self.engine.modules["vae"], self.engine.device
        dtype = next(vae.parameters()).dtype
        views = 2 if self.settings.flip else 1
        pixels = torch.stack([image.pixels for image in self.images])  # (n, 3, S, S)
        if views == 2:
            pixels = torch.stack([pixels, pixels.flip(-1)], dim=1).flatten(0, 1)  # (2n, 3, S, S)
        latents = []
        for start in range(0, pixels.shape[0], VAE_BATCH):
            batch = pixels[start : start + VAE_BATCH].to(device, dtype)
            distribution = vae.encode(batch)
            noise = torch.stack([
                torch.randn(distribution.mean.shape[1:], generator=seeded_generator(self.seed, STREAM_LATENT, start + i))
                for i in range(batch.shape[0])
            ]).to(device, dtype)  # (b, C, h, w)
            latents.append(((distribution.mean + distribution.std * noise) * vae.config.scaling_factor).float())
        self.latents = torch.cat(latents).unflatten(0, (len(self.images), views))  # (n, views, C, h, w)
        self.weights = None
        if self.settings.alpha_weight:
            size = tuple(self.latents.shape[-2:])
            weights = torch.stack([torch.ones(size) if image.alpha is None else alpha_loss_weights(image.alpha, size)
                                   for image in self.images])  # (n, h, w)
            self.weights = torch.stack([weights, weights.flip(-1)][:views], dim=1).to(device)  # (n, views, h, w)

    # ------------------------------------------------------------------------------------ training

    def train(self) -> TrainResult:
        settings = self.settings
        start_step = self.step
        session_started = time.perf_counter()
        started = session_started - self.seconds
        stopped = False
        if self.work_dir is not None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        while self.step < self.last_step and not stopped:
            loss, rate = self._optimizer_step(self.step)
            self.step += 1
            self.samples += settings.batch_size * settings.grad_accum
            self.seconds = time.perf_counter() - started
            self.losses.append(LossRow(self.step, loss, rate, self.samples, self.seconds))
            checkpoint = preview = None
            if self.work_dir is not None and settings.save_every and self.step % settings.save_every == 0:
                checkpoint = self._checkpoint(snapshot=True)
            if self.work_dir is not None and settings.preview_every and self.step % settings.preview_every == 0:
                preview = self._preview()
            if self.callback is not None:
                session = time.perf_counter() - session_started
                eta = (self.last_step - self.step) * session / (self.step - start_step)
                progress = TrainProgress(self.step, self.last_step, loss, rate, self.samples, self.seconds, eta,
                                         checkpoint, preview)
                stopped = self.callback(progress) is False and self.step < self.last_step
        return self._finish(start_step, stopped)

    def _optimizer_step(self, step: int) -> tuple[float, float]:
        settings = self.settings
        rate = self.schedule.rate_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        total = 0.0
        for micro in range(settings.grad_accum):
            loss = self._micro_batch_loss(step, micro)
            scaled = loss / settings.grad_accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += float(loss.detach())
        loss_value = total / settings.grad_accum
        if not math.isfinite(loss_value) and self.scaler is None:
            raise TrainingError(f"the loss became {loss_value} at step {step + 1} (learning rate {rate:g}); lower the "
                                "learning rate or resume from the last checkpoint")
        params = list(self.params.values())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if settings.grad_clip is not None:
            if settings.grad_clip_mode == "norm":
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            else:
                torch.nn.utils.clip_grad_value_(params, settings.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, rate

    def _image_at(self, sample: int) -> int:
        """The image shown as sample `sample` of the stream (a fresh permutation per epoch)."""
        count = len(self.images)
        epoch, position = divmod(sample, count)
        if getattr(self, "_epoch", None) != epoch:
            self._epoch = epoch
            self._order = torch.randperm(count, generator=seeded_generator(self.seed, STREAM_ORDER, epoch)).tolist()
        return self._order[position]

    def _micro_batch_loss(self, step: int, micro: int) -> torch.Tensor:
        from tiengine.conditioning import encode_texts

        settings, engine, device = self.settings, self.engine, self.engine.device
        batch = settings.batch_size
        first = (step * settings.grad_accum + micro) * batch
        index = torch.tensor([self._image_at(first + b) for b in range(batch)])
        generator = seeded_generator(self.seed, STREAM_STEP, step, micro)
        flip = (torch.rand(batch, generator=generator) < 0.5).long() if settings.flip else torch.zeros(batch, dtype=torch.long)
        template = torch.randint(len(self.templates), (batch,), generator=generator)
        timesteps = torch.randint(self.alphas_cumprod.numel(), (batch,), generator=generator)
        x0 = self.latents[index, flip]  # (B, C, h, w)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        texts = [self.prompts[i][t] for i, t in zip(index.tolist(), template.tolist())]
        rows = {key: param if self.other_rows[key] is None else torch.cat([self.other_rows[key], param])
                for key, param in self.params.items()}  # (other ids + n, D) per encoder key
        unet = engine.modules["unet"]
        with self._autocast():
            encoded = encode_texts(texts, self.tokenizer, engine.slots, rows, self.options)
            y = None
            if unet.config.addition_embed_type == "text_time":
                size = float(self.resolution)
                time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=device).expand(batch, -1)
                y = unet.text_time_conditioning(encoded.pooled.float(), time_ids)  # (B, 2816)
            weights = None if self.weights is None else self.weights[index, flip]
            return denoising_loss(unet, engine.config.prediction, self.alphas_cumprod, x0, timesteps.to(device),
                                  noise, encoded.context, y, weights)

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.engine.device.type, dtype=dtype)

    # ------------------------------------------------------------------------------------- files

    def _vectors(self) -> dict[str, torch.Tensor]:
        return {key: param.detach().to("cpu", torch.float32).clone() for key, param in self.params.items()}

    def _embedding(self, name: str) -> Embedding:
        engine = self.engine
        model_name = None
        if engine.model_path is not None:
            model_name = engine.model_path.name if engine.model_path.is_dir() else engine.model_path.stem
        return Embedding(name, self._vectors(), step=self.step, sd_checkpoint=engine.model_hash(),
                         sd_checkpoint_name=model_name)

    def _state(self, outputs: dict[str, str] | None = None) -> TrainingState:
        optimizer_state = self.optimizer.state_dict()["state"]
        return TrainingState(self.step, self.fingerprint(), self._vectors(), optimizer_state,
                             self.scaler.state_dict() if self.scaler is not None else None,
                             self.seconds, self.samples, outputs or {})

    def _checkpoint(self, *, snapshot: bool) -> Path | None:
        """Write the resumable state and the loss log; with `snapshot`, also `checkpoints/<name>-<step>`."""
        path = None
        if snapshot and self.storable:
            path = self.work_dir / CHECKPOINT_DIR / f"{self.name}-{self.step}.safetensors"
            save_embedding(self._embedding(f"{self.name}-{self.step}"), path, overwrite=True)
        save_state(self.work_dir / STATE_FILE, self._state())
        write_loss_log(self.work_dir / LOG_FILE, self.losses)
        return path

    def _preview(self) -> Path:
        from tiengine.engine import Engine
        from tiengine.metadata import save_png

        settings, engine = self.settings, self.engine
        if self.preview_engine is None:
            self.preview_engine = Engine(engine.config, engine.modules, model_path=engine.model_path,
                                         device=engine.device, dtype=engine.dtype)
            for other in engine.vocabulary.embeddings.values():
                if other.name != self.name:
                    self.preview_engine.add_embedding(other)
        self.preview_engine.add_embedding(self._embedding(self.name))
        prompt = settings.preview_prompt or self.prompts[0][0]
        result = self.preview_engine.generate(prompt, steps=settings.preview_steps, width=self.resolution,
                                              height=self.resolution,
                                              seed=self.seed if settings.preview_seed is None else settings.preview_seed)
        self.last_preview = result.images[0]
        path = self.work_dir / PREVIEW_DIR / f"{self.name}-{self.step}.png"
        return save_png(result.images[0], path, result.parameters[0], overwrite=True)

    def _finish(self, start_step: int, stopped: bool) -> TrainResult:
        embedding = self._embedding(self.name) if self.storable else None
        outputs: list[Path] = []
        if self.out is not None:
            self._checkpoint(snapshot=False)  # the final state first, so a failed output write loses no training
            replace = self.overwrite or self.previous is not None
            written = {}
            for path, fmt in [(self.out, None), *self.extra_outputs]:
                save_embedding(embedding, path, format=fmt, overwrite=replace, preview=self.last_preview)
                written[str(path)] = file_sha256(path)
                outputs.append(path)
            save_state(self.work_dir / STATE_FILE, self._state(written))
        return TrainResult(
            self.name, self._vectors(), self.initial, embedding, self.step, self.seed, list(self.losses), outputs,
            self.work_dir, start_step if self.previous is not None else None, stopped, self.warnings,
        )


def _resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and device.type != "cuda":
        raise TrainingError(f"fp16 mixed precision needs a CUDA device (the model is on {device}); use fp32 or bf16")
    return requested


def settings_from_options(**options: Any) -> TrainEmbeddingSettings:
    """TrainEmbeddingSettings from keyword options; unknown names are a TrainingError listing the known ones."""
    known = {f.name for f in dataclasses.fields(TrainEmbeddingSettings)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TrainingError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
    return TrainEmbeddingSettings(**options)
