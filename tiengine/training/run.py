"""The textual-inversion training loop and its entry point `train_embedding` (recipe, randomness and file
layout are described in tiengine.training.textual_inversion): checks of the name, inputs and files, the
latent cache, optimizer steps, checkpoints, previews and the final outputs.

The engine is an argument, never imported: training sits below the engine in the stage order, and
`Engine.train_embedding` calls this module.

Concurrency and interruption: a run with an output holds the lock file `lock` of its work folder
(tiengine.io.lock: pid, host, start time) from before it reads the checkpoint until it returns, so a second
run on the same output refuses before touching anything. Ctrl-C between or during steps saves the last
completed step's state atomically (the optimizer update and its bookkeeping are never cut in half) and
raises TrainingInterrupted, a KeyboardInterrupt that names the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tiengine.diffusion.schedules import NoiseSchedule
from tiengine.embeddings.embedding import SAVE_FORMATS, Embedding, file_sha256, load_embedding, save_embedding
from tiengine.errors import EmbeddingError, TiengineError
from tiengine.io.atomic import OVERWRITE_HINT, check_file_path, ensure_folder
from tiengine.io.lock import FileLock, acquire_lock
from tiengine.io.metadata import save_png
from tiengine.models.config import size_time_ids
from tiengine.text.conditioning import EncodeOptions, encode_tokenized, tokenize_texts
from tiengine.text.vocabulary import EmbeddingVocabulary
from tiengine.training.data import (
    FILEWORDS_PLACEHOLDER,
    NAME_PLACEHOLDER,
    LearningRateSchedule,
    TrainingError,
    TrainingImage,
    fill_template,
    find_images,
    load_image,
    load_templates,
)
from tiengine.training.state import (
    LossRow,
    TrainingState,
    fingerprint_differences,
    load_state,
    read_loss_log,
    recovery_hint,
    save_state,
    write_loss_log,
)
from tiengine.training.textual_inversion import (
    CHECKPOINT_DIR,
    LOG_FILE,
    PREVIEW_DIR,
    STATE_FILE,
    STREAM_LATENT,
    STREAM_ORDER,
    STREAM_STEP,
    VAE_BATCH,
    ProgressCallback,
    TrainEmbeddingSettings,
    TrainingInterrupted,
    TrainProgress,
    TrainResult,
    alpha_loss_weights,
    denoising_loss,
    initial_vectors,
    recorded_settings,
    resume_settings,
    seeded_generator,
)

LOCK_FILE = "lock"

if TYPE_CHECKING:
    from PIL import Image

    from tiengine.engine import Engine
    from tiengine.text.chunking import TokenizedPrompt


class EmbeddingTrainer:
    """One training run: inputs, the trainable vectors, the optimizer and the files."""

    def __init__(self, engine: Engine, name: str, settings: TrainEmbeddingSettings,
                 callback: ProgressCallback | None) -> None:
        if engine.config.variant == "refiner":
            raise TrainingError("the SDXL refiner has only the OpenCLIP-bigG encoder; train embeddings on the base "
                                "model")
        self.engine, self.name, self.settings, self.callback = engine, name, settings, callback
        self.schedule = LearningRateSchedule.parse(settings.learning_rate)
        self.seed = settings.seed if settings.seed != -1 else random.randint(0, 2**32 - 1)
        self.warnings: list[str] = []
        self.out: Path | None = None
        self.extra_outputs: list[tuple[Path, str]] = []
        self.also_save: list[str] = []
        self.work_dir: Path | None = None
        self.lock: FileLock | None = None
        self.overwrite = self.resume = False
        self.previous: TrainingState | None = None
        self.replaceable: set[Path] = set()  # outputs of this run's earlier session, verified by hash
        self.preview_engine: Engine | None = None
        self.last_preview: Image.Image | None = None
        self._epoch: int | None = None
        self._order: list[int] = []
        self._chunked: dict[str, TokenizedPrompt] = {}  # template text -> its chunks, tokenized once

    # ------------------------------------------------------------------------------------ checks

    def plan_files(self, out: str | os.PathLike[str] | None, also_save: Sequence[str],
                   work_dir: str | os.PathLike[str] | None, overwrite: bool, resume: bool,
                   explicit: Collection[str] | None = None) -> None:
        """Decide every output path, lock the work folder and refuse, before anything is written, to replace
        files or runs. A resumed run takes the checkpoint's settings except the `explicit` ones."""
        self.overwrite, self.resume = overwrite, resume
        if out is None:
            if work_dir is not None or also_save or resume or self.settings.preview_every:
                raise TrainingError("work_dir, also_save, resume and previews need an output file (out=...)")
            return
        self.out = Path(out)
        main_format = SAVE_FORMATS.get(self.out.suffix.lower())
        if main_format is None:
            raise TrainingError(f"{self.out}: the output must end in {', '.join(SAVE_FORMATS)}")
        check_file_path(self.out)
        self.work_dir = Path(work_dir) if work_dir is not None else self.out.parent / f".{self.out.stem}.training"
        self.lock, warning = acquire_lock(self.work_dir / LOCK_FILE)
        if warning is not None:
            self.warnings.append(warning)
        state_path = self.work_dir / STATE_FILE
        if resume and state_path.is_file():
            self.previous = load_state(state_path)
            recorded = recorded_settings(self.previous.settings, self.previous.fingerprint)
            settings, notes = resume_settings(recorded, self.settings, explicit, completed_step=self.previous.step,
                                              source=state_path)
            self._adopt(settings, self.previous.fingerprint.get("seed"))
            self.warnings.extend(notes)
            if not also_save:
                also_save = self.previous.also_save
        elif resume:
            self.warnings.append(f"nothing to resume in {self.work_dir} (no {STATE_FILE}); starting at step 0")
        elif state_path.exists() and not overwrite:
            raise TrainingError(f"{self.work_dir} holds an earlier training run; pass resume=True (--resume) to "
                                "continue it or --overwrite (overwrite=True) to start over")
        for fmt in dict.fromkeys(also_save):
            if fmt not in SAVE_FORMATS.values():
                expected = ", ".join(SAVE_FORMATS.values())
                raise TrainingError(f"also_save: unknown format {fmt!r} (expected {expected})")
            self.also_save.append(fmt)
            if fmt != main_format:
                self.extra_outputs.append((self.out.with_suffix(f".{fmt}"), fmt))
        for path, _ in [(self.out, main_format), *self.extra_outputs]:
            check_file_path(path)
            if path.exists() and not overwrite:
                written = self.previous.outputs.get(str(path)) if self.previous is not None else None
                own = written is not None and path.is_file() and file_sha256(path) == written
                if not (own or self._holds_checkpoint_vectors(path)):
                    raise TrainingError(f"{path}: already exists ({OVERWRITE_HINT})")
                self.replaceable.add(path)

    def _adopt(self, settings: TrainEmbeddingSettings, recorded_seed: Any) -> None:
        """Train with `settings` from now on (a resumed run's, merged with the checkpoint's)."""
        self.settings = settings
        self.schedule = LearningRateSchedule.parse(settings.learning_rate)
        if settings.seed != -1:
            self.seed = settings.seed
        elif isinstance(recorded_seed, int):
            self.seed = recorded_seed

    def _holds_checkpoint_vectors(self, path: Path) -> bool:
        """True when `path` is this run's own output, written from the checkpoint before its hash was recorded
        (a kill between the two): an embedding of this name and step whose vectors equal the checkpoint's."""
        previous = self.previous
        if previous is None or not path.is_file():
            return False
        try:
            written = load_embedding(path)
        except (TiengineError, OSError):
            return False
        if self.name not in (written.name, written.stored_name) or (written.step is not None and written.step != previous.step):
            return False
        if set(written.vectors) != set(previous.vectors):
            return False
        return all(torch.equal(written.vectors[key].float(), previous.vectors[key].float())
                   for key in previous.vectors)

    def release(self) -> None:
        """Remove the work folder's lock (and the folders it created, when nothing was written in them)."""
        if self.lock is not None:
            self.lock.release()

    def check_name(self) -> None:
        """Refuse names that cannot be typed, saved or told apart from ordinary words; load the tokenizer."""
        self.tokenizer = self.engine.tokenizer.copy()
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

    def load_inputs(self, images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> None:
        """Read the images, captions and templates; resolve resolution, precision and the schedule's end."""
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
            self.warnings.append(f"{len(self.images)} training image(s): 3 to 5 or more give a less overfitted "
                                 "embedding")
        template = settings.template
        if template == "auto":
            template = "object-filewords" if any(i.caption_from_file for i in self.images) else "object"
        self.templates = load_templates(template)
        uses_captions = any(FILEWORDS_PLACEHOLDER in line for line in self.templates)
        if any(image.caption_from_file for image in self.images) and not uses_captions:
            self.warnings.append(f"caption files found but template {template!r} has no {FILEWORDS_PLACEHOLDER}")
        for image in self.images:
            for line in self.templates:
                if NAME_PLACEHOLDER not in line and NAME_PLACEHOLDER not in image.caption:
                    raise TrainingError(
                        f"{image.path}: template {line!r} takes {NAME_PLACEHOLDER} from the caption, and the "
                        f"caption {image.caption!r} has none (the embedding would get no gradient from it)"
                    )
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
            self.warnings.append(f"the learning-rate schedule {settings.learning_rate!r} ends at step {last}: "
                                 "training stops there (A1111's rule); end it with a rate without ':step' to train "
                                 f"all {settings.steps}")
        self.last_step = last

    def fingerprint(self) -> dict[str, Any]:
        """Everything that shapes the trajectory; a checkpoint resumes only a run with the same fingerprint."""
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
        """Build the tokenizer's vocabulary, the vectors and the optimizer, restore a checkpoint, cache latents."""
        engine, settings = self.engine, self.settings
        device = engine.device
        self.options = EncodeOptions(clip_skip=settings.clip_skip, emphasis=settings.emphasis)
        others = {n: e for n, e in engine.vocabulary.embeddings.items() if n != self.name}
        self.other_embeddings = {n: e.short_hash or "memory" for n, e in others.items()}
        # The init text is read with the plain vocabulary, before any embedding name can bind in it.
        self.initial = initial_vectors(self.tokenizer, engine.slots, settings.init_text, settings.vectors)
        # the other embeddings bind in captions exactly as in the engine's prompts: their paths, and the
        # files another file's name shadows only through `embedding:path` (with the explicit syntax)
        bound = engine.vocabulary
        vocabulary = EmbeddingVocabulary.build(self.tokenizer, others, aliases=bound.aliases,
                                               explicit_only=bound.explicit_only)
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
        path = self.work_dir / STATE_FILE

        def damaged(what: str) -> TrainingError:
            return TrainingError(f"{path}: damaged training checkpoint ({what}); {recovery_hint(path)}")

        for index, (key, param) in enumerate(self.params.items()):
            vectors = state.vectors.get(key)
            if vectors is None or vectors.shape != param.shape:
                found = "none" if vectors is None else list(vectors.shape)
                raise damaged(f"vectors of {key!r} are {found}, expected {list(param.shape)}")
            entries = state.optimizer_state.get(index, {})
            if state.step > 0 and not entries:
                raise damaged(f"no optimizer state for {key!r} after {state.step} steps")
            for name, value in entries.items():
                if name in ("exp_avg", "exp_avg_sq") and (not isinstance(value, torch.Tensor)
                                                          or value.shape != param.shape):
                    raise damaged(f"optimizer {name} of {key!r} does not match the vectors {list(param.shape)}")
        with torch.no_grad():
            for key, param in self.params.items():
                param.copy_(state.vectors[key])
        saved = self.optimizer.state_dict()
        saved["state"] = {index: dict(entries) for index, entries in state.optimizer_state.items()}
        try:
            self.optimizer.load_state_dict(saved)
            if self.scaler is not None and state.scaler_state:
                self.scaler.load_state_dict(state.scaler_state)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise damaged(f"optimizer state: {error}") from None
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
            shape = distribution.mean.shape[1:]  # (C, h, w)
            noise = torch.stack([torch.randn(shape, generator=seeded_generator(self.seed, STREAM_LATENT, start + i))
                                 for i in range(batch.shape[0])]).to(device, dtype)  # (b, C, h, w)
            latents.append(((distribution.mean + distribution.std * noise) * vae.config.scaling_factor).float())
        self.latents = torch.cat(latents).unflatten(0, (len(self.images), views))  # (n, views, C, h, w)
        self.weights = None
        if self.settings.alpha_weight:
            size = tuple(self.latents.shape[-2:])
            weights = torch.stack([alpha_loss_weights(image.alpha, size) if image.alpha is not None
                                   else torch.ones(size) for image in self.images])  # (n, h, w)
            self.weights = torch.stack([weights, weights.flip(-1)][:views], dim=1).to(device)  # (n, views, h, w)

    # ------------------------------------------------------------------------------------ training

    def train(self) -> TrainResult:
        """Run the remaining steps (checkpoints, previews, callback), then write the outputs.

        Ctrl-C saves the last completed step's state (when there is a work folder) and raises
        TrainingInterrupted; `resume=True` continues from there exactly."""
        try:
            return self._train()
        except KeyboardInterrupt:
            if self.work_dir is None or not hasattr(self, "params"):
                raise
            self._checkpoint(snapshot=False)
            raise TrainingInterrupted(self.step, self.work_dir / STATE_FILE) from None

    def _train(self) -> TrainResult:
        settings = self.settings
        start_step = self.step
        session_started = time.perf_counter()
        started = session_started - self.seconds
        stopped = False
        if self.work_dir is not None:
            ensure_folder(self.work_dir)
        while self.step < self.last_step and not stopped:
            loss, rate = self._accumulate(self.step)
            with _interrupts_deferred():  # the update and its bookkeeping: all or nothing
                self._update()
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

    def optimizer_step(self, step: int) -> tuple[float, float]:
        """Train 0-based step `step` (its micro-batches, clipping, AdamW update); returns (loss, rate).

        `train` calls it in order; benchmarks call it alone (the draws depend only on seed and step)."""
        loss, rate = self._accumulate(step)
        self._update()
        return loss, rate

    def _accumulate(self, step: int) -> tuple[float, float]:
        """Set step `step`'s learning rate and accumulate its micro-batches' gradients; (mean loss, rate)."""
        settings = self.settings
        rate = self.schedule.rate_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        self.optimizer.zero_grad(set_to_none=True)  # an interrupted step may have left gradients behind
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
        return loss_value, rate

    def _update(self) -> None:
        """Clip the accumulated gradients and apply the AdamW (and gradient-scaler) update."""
        settings = self.settings
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

    def _image_at(self, sample: int) -> int:
        """The image shown as sample `sample` of the stream (a fresh permutation per epoch)."""
        count = len(self.images)
        epoch, position = divmod(sample, count)
        if self._epoch != epoch:
            self._epoch = epoch
            self._order = torch.randperm(count, generator=seeded_generator(self.seed, STREAM_ORDER, epoch)).tolist()
        return self._order[position]

    def _micro_batch_loss(self, step: int, micro: int) -> torch.Tensor:

        settings, engine, device = self.settings, self.engine, self.engine.device
        batch = settings.batch_size
        first = (step * settings.grad_accum + micro) * batch
        index = torch.tensor([self._image_at(first + b) for b in range(batch)])
        generator = seeded_generator(self.seed, STREAM_STEP, step, micro)
        flip = torch.zeros(batch, dtype=torch.long)  # view 0: as is, 1: mirrored
        if settings.flip:
            flip = (torch.rand(batch, generator=generator) < 0.5).long()
        template = torch.randint(len(self.templates), (batch,), generator=generator)
        timesteps = torch.randint(self.alphas_cumprod.numel(), (batch,), generator=generator)
        x0 = self.latents[index, flip]  # (B, C, h, w)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        texts = [self.prompts[i][t] for i, t in zip(index.tolist(), template.tolist())]
        rows = {key: param if self.other_rows[key] is None else torch.cat([self.other_rows[key], param])
                for key, param in self.params.items()}  # (other ids + n, D) per encoder key
        unet = engine.modules["unet"]
        with self._autocast():
            for text in set(texts) - self._chunked.keys():
                self._chunked[text] = tokenize_texts([text], self.tokenizer, self.options)[0]
            prompts = [self._chunked[text] for text in texts]
            encoded = encode_tokenized(prompts, engine.slots, rows, self.options)
            y = None
            if unet.config.addition_embed_type == "text_time":
                size_ids = size_time_ids(engine.config, self.resolution, self.resolution)
                time_ids = torch.tensor([size_ids], device=device).expand(batch, -1)  # (B, 6)
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
        settings = dataclasses.asdict(dataclasses.replace(self.settings, seed=self.seed))
        return TrainingState(self.step, self.fingerprint(), self._vectors(), optimizer_state,
                             self.scaler.state_dict() if self.scaler is not None else None,
                             self.seconds, self.samples, outputs or {}, settings, list(self.also_save))

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
        settings, engine = self.settings, self.engine
        if self.preview_engine is None:
            self.preview_engine = engine.sharing_weights()
            for other in engine.vocabulary.embeddings.values():
                if other.name != self.name:
                    self.preview_engine.add_embedding(other)
        self.preview_engine.add_embedding(self._embedding(self.name))
        prompt = settings.preview_prompt or self.prompts[0][0]
        seed = self.seed if settings.preview_seed is None else settings.preview_seed
        result = self.preview_engine.generate(prompt, steps=settings.preview_steps, width=self.resolution,
                                              height=self.resolution, seed=seed)
        self.last_preview = result.images[0]
        path = self.work_dir / PREVIEW_DIR / f"{self.name}-{self.step}.png"
        return save_png(result.images[0], path, result.parameters[0], overwrite=True)

    def _finish(self, start_step: int, stopped: bool) -> TrainResult:
        embedding = self._embedding(self.name) if self.storable else None
        outputs: list[Path] = []
        if self.out is not None:
            self._checkpoint(snapshot=False)  # the final state first, so a failed output write loses no training
            written = {}
            for path, fmt in [(self.out, None), *self.extra_outputs]:
                replace = self.overwrite or path in self.replaceable
                save_embedding(embedding, path, format=fmt, overwrite=replace, preview=self.last_preview)
                written[str(path)] = file_sha256(path)
                outputs.append(path)
            save_state(self.work_dir / STATE_FILE, self._state(written))
        return TrainResult(
            self.name, self._vectors(), self.initial, embedding, self.step, self.seed, list(self.losses), outputs,
            self.work_dir, start_step if self.previous is not None else None, stopped, self.warnings,
        )


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block ends, so the block runs whole; a no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # signals unavailable here (an embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if previous is signal.default_int_handler:
                raise KeyboardInterrupt
            if callable(previous):
                previous(signal.SIGINT, None)


def _resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and device.type != "cuda":
        raise TrainingError(f"fp16 mixed precision needs a CUDA device (the model is on {device}); use fp32 or bf16")
    return requested


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
    explicit: Collection[str] | None = None,
) -> TrainResult:
    """Learn embedding `name` from `images` (a folder or a list of files) on `engine`'s frozen model.

    out: the embedding file to write (None: nothing is written; no checkpoints, previews or resume).
    also_save: further formats written beside `out` ("safetensors", "pt", "png").
    work_dir: checkpoints, log and previews (default `.<out stem>.training` beside `out`).
    resume: continue from the work folder's checkpoint (a fresh start, with a warning, when there is none),
    with the checkpoint's settings and also_save formats except those given on purpose: `explicit` names
    the settings the caller chose (None: the fields of `settings` that differ from the defaults). Changing
    one that shapes the run (batch size, learning rate, vectors, seed, ...) is refused naming it; `steps`
    may be raised to train longer (noted in the result's warnings); checkpoint and preview options apply.
    A second run on the same work folder is refused while the first holds its lock. Ctrl-C saves the
    state of the last completed step and raises TrainingInterrupted (a KeyboardInterrupt).
    The engine is not modified; register the result with `engine.add_embedding(result.embedding)`.
    """
    trainer = EmbeddingTrainer(engine, name, settings, callback)
    try:
        trainer.plan_files(out, also_save, work_dir, overwrite, resume, explicit)
        trainer.load_inputs(images)
        trainer.check_name()
        trainer.prepare()
        return trainer.train()
    finally:
        trainer.release()
