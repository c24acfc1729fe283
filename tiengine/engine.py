"""Engine: one loaded model with its tokenizer and embeddings; prompts -> conditioning -> images.

`Engine.load(model_path, embeddings=DIR, device=, dtype=)` accepts a converted tiengine folder, a
diffusers folder or an original single-file checkpoint (tiengine.weights_conv.convert.load_models); with no
path it loads the built-in default model (tiengine.default_model). Then:
- `encode(prompt, negative_prompt, steps=, ...)`: the per-step conditioning schedule of each AND part
  and of the negative prompt, exactly as A1111 builds it, with a report of the embeddings applied
  (where, with which weight and hash) and of names that looked like embeddings but were skipped.
  Results are cached by text and options, so repeated prompts cost nothing.
- `generate(...)` / `img2img(...)`: sampling with classifier-free guidance, AND composition and prompt
  schedules (tiengine.diffusion.samplers), decoded to PIL images that carry A1111-style `parameters` text.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tiengine import __version__
from tiengine.default_model import A1111_CFG_SCALE, DEFAULT_MODEL_CFG_SCALE, default_model_path
from tiengine.diffusion.samplers import get_sampler, scheduled_guided_denoiser
from tiengine.diffusion.schedules import (
    NoiseSchedule,
    batch_generators,
    eps_denoiser,
    get_sigmas,
    img2img_start,
    initial_noise,
    v_denoiser,
)
from tiengine.embeddings.embedding import Embedding
from tiengine.embeddings.library import EmbeddingLibrary, ReloadReport
from tiengine.errors import TiengineError
from tiengine.io.images import pil_to_tensor, tensor_to_pil
from tiengine.io.metadata import format_parameters, format_ti_hashes
from tiengine.models.config import ModelConfig
from tiengine.text.conditioning import EncodeOptions, TextEncoderSlot, encode_texts
from tiengine.text.prompt import prompt_schedule, split_and
from tiengine.text.tokenizer import ClipTokenizer
from tiengine.text.vocabulary import EmbeddingVocabulary, SkippedMention
from tiengine.training.run import train_embedding
from tiengine.training.textual_inversion import TrainProgress, TrainResult, settings_from_options
from tiengine.weights_conv.convert import load_models

if TYPE_CHECKING:
    from PIL import Image

# Embedding-vector key each text encoder reads, per model family (the keys of tiengine.embeddings.embedding).
ENCODER_KEYS = {
    "sd1": {"text_encoder": "clip_l"},
    "sd2": {"text_encoder": "clip_h"},
    "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
}
ENCODE_CACHE_SIZE = 64
REFINER_AESTHETIC_SCORE = 6.0
REFINER_NEGATIVE_AESTHETIC_SCORE = 2.5
MAX_SEED = 2**32 - 1
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class EngineError(TiengineError):
    """Bad generation settings, or a request the loaded model cannot serve."""


@dataclass(frozen=True)
class AppliedEmbedding:
    """An embedding placed in an encoded text: which prompt, schedule entry, chunk and slots, weight."""

    name: str
    short_hash: str | None
    prompt: str  # "positive" or "negative"
    part: int  # AND part (0 for the negative prompt)
    schedule_entry: int
    chunk: int
    slot: int  # first slot in the chunk (BOS is 0)
    n_vectors: int
    weight: float


@dataclass
class ScheduledConditioning:
    """A prompt's conditioning per sampling step: entries (last_step, context (1, T, C), pooled (1, P) | None).

    The entry for denoiser call i (0-based) is the first with i <= last_step (A1111's rule)."""

    entries: list[tuple[int, torch.Tensor, torch.Tensor | None]]
    texts: list[str]
    token_counts: list[int]


@dataclass
class Conditioning:
    """`Engine.encode`'s result: AND parts with weights, the negative prompt, and what happened to embeddings."""

    positive: list[tuple[ScheduledConditioning, float]]
    negative: ScheduledConditioning
    applied: list[AppliedEmbedding] = field(default_factory=list)
    skipped: list[SkippedMention] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def ti_hashes(self) -> dict[str, str | None]:
        """Name -> short hash of each embedding used, in order of first use."""
        return {applied.name: applied.short_hash for applied in self.applied}


@dataclass
class GenerationResult:
    """Images with their seeds and the `parameters` text written into each PNG."""

    images: list[Image.Image]
    seeds: list[int]
    parameters: list[str]
    conditioning: Conditioning


class Engine:
    """A model (text encoders, UNet, VAE) with a tokenizer and an embedding vocabulary."""

    def __init__(
        self,
        config: ModelConfig,
        modules: dict[str, torch.nn.Module],
        *,
        tokenizer: ClipTokenizer | None = None,
        embeddings: EmbeddingLibrary | None = None,
        model_path: Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        default_cfg_scale: float = A1111_CFG_SCALE,
    ) -> None:
        self.config = config
        self.default_cfg_scale = default_cfg_scale  # generate / img2img without a cfg_scale
        self.modules = modules
        self.device = torch.device(device)
        self.dtype = dtype
        self.model_path = model_path
        self.tokenizer = tokenizer or ClipTokenizer.default()
        self.library = embeddings
        self.slots = [
            TextEncoderSlot(name, ENCODER_KEYS[config.family][name], modules[name])
            for name in config.text_encoders
        ]
        for module in modules.values():
            module.eval().requires_grad_(False)
        self._cache: OrderedDict[tuple, Conditioning] = OrderedDict()
        self._model_hash: str | None = None
        self._bind_embeddings()

    # ------------------------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        model_path: str | os.PathLike[str] | None = None,
        *,
        embeddings: str | os.PathLike[str] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        prediction: str | None = None,
        vae: str | os.PathLike[str] | None = None,
    ) -> Engine:
        """Load a model (None: the built-in default, run at its own guidance scale) and optionally a folder
        of embeddings."""
        default_cfg_scale = A1111_CFG_SCALE
        if model_path is None:
            model_path = default_model_path()
            default_cfg_scale = DEFAULT_MODEL_CFG_SCALE
        config, modules = load_models(model_path, device=device, dtype=dtype, prediction=prediction, vae=vae)
        library = None
        if embeddings is not None:
            library = EmbeddingLibrary(embeddings)
        return cls(config, modules, embeddings=library, model_path=Path(model_path), device=device, dtype=dtype,
                   default_cfg_scale=default_cfg_scale)

    def sharing_weights(self) -> Engine:
        """A second engine on the same modules (no copy) with the same tokenizer and no embeddings: the
        training loop's preview engine, whose vocabulary changes while this one's stays."""
        return type(self)(self.config, self.modules, tokenizer=self.tokenizer, model_path=self.model_path,
                          device=self.device, dtype=self.dtype, default_cfg_scale=self.default_cfg_scale)

    # ----------------------------------------------------------------------------------- embeddings

    @property
    def encoder_widths(self) -> dict[str, int]:
        """Embedding key -> hidden width of the text encoder that reads it."""
        return {slot.embedding_key: slot.encoder.config.hidden_size for slot in self.slots}

    def reload_embeddings(self) -> ReloadReport | None:
        """Re-scan the embeddings folder (changed files only) and rebind; None without a folder."""
        if self.library is None:
            return None
        report = self.library.reload()
        self._bind_embeddings()
        return report

    def add_embedding(self, embedding: Embedding) -> None:
        """Make an in-memory embedding usable by name (it must fit this model's encoders)."""
        reason = self._mismatch(embedding)
        if reason is not None:
            raise EngineError(f"{embedding.label}: {reason}")
        embeddings = dict(self.vocabulary.embeddings)
        embeddings[embedding.name] = embedding
        self._set_vocabulary(EmbeddingVocabulary.build(self.tokenizer, embeddings, skipped=self.vocabulary.skipped))

    def _bind_embeddings(self) -> None:
        """Bind the library's embeddings that fit this model; the others become skipped names."""
        usable: dict[str, Embedding] = {}
        aliases: dict[str, list[str]] = {}
        skipped: dict[str, str] = {}
        if self.library is not None:
            for entry in self.library.entries:
                stem = Path(entry.relative_path).stem
                if entry.embedding is None:
                    skipped.setdefault(stem, entry.reason or "unreadable")
                    continue
                name = entry.embedding.name
                if self.library.get(name) is not entry.embedding:
                    continue  # shadowed by a collision winner
                reason = self._mismatch(entry.embedding)
                if reason is not None:
                    skipped[name] = reason
                    continue
                usable[name] = entry.embedding
                aliases[name] = self.library.path_keys(name)
        self._set_vocabulary(
            EmbeddingVocabulary.build(
                self.tokenizer, usable, aliases=aliases, skipped={k: v for k, v in skipped.items() if k not in usable}
            )
        )

    def _set_vocabulary(self, vocabulary: EmbeddingVocabulary) -> None:
        """Use `vocabulary`: rebuild the encoders' extra rows and forget cached conditioning."""
        self.vocabulary = vocabulary
        self._rows = self._extra_rows()
        self._cache.clear()

    def _mismatch(self, embedding: Embedding) -> str | None:
        """Why `embedding` cannot be used with this model's encoders, or None."""
        widths = self.encoder_widths
        if embedding.widths == widths:
            return None
        made_for = " + ".join(f"{key} {width}" for key, width in sorted(embedding.widths.items()))
        model = " + ".join(f"{key} {width}" for key, width in sorted(widths.items()))
        label = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
        return (
            f"made for {label.get(embedding.family, embedding.family)} ({made_for}), "
            f"this model is {label[self.config.family]} ({model})"
        )

    def _extra_rows(self) -> dict[str, torch.Tensor]:
        rows = {}
        for slot in self.slots:
            table = self.vocabulary.extra_rows(slot.embedding_key, device=self.device, dtype=self.dtype)
            if table is not None:
                rows[slot.embedding_key] = table
        return rows

    # --------------------------------------------------------------------------------------- encode

    def encode(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        steps: int = 20,
        second_order: bool = False,
        clip_skip: int = 1,
        emphasis: str = "original",
        comma_backtrack: int = 20,
        bare_names: bool = True,
        keep_embeddings_on_backtrack: bool = False,
    ) -> Conditioning:
        """Conditioning of a prompt (split on AND) and a negative prompt for a run of `steps` steps.

        `second_order`: the sampler calls the model twice per step, so prompt schedules count
        2 * steps model calls (A1111). Cached by text and options.
        """
        if steps < 1:
            raise EngineError(f"steps must be >= 1, got {steps}")
        options = EncodeOptions(clip_skip, emphasis, comma_backtrack, bare_names, keep_embeddings_on_backtrack)
        key = (prompt, negative_prompt, steps, second_order, options)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        result = Conditioning(positive=[], negative=None)  # type: ignore[arg-type]
        for part_index, (text, weight) in enumerate(split_and(prompt)):
            schedule = self._encode_schedule(text, steps, second_order, options, result, "positive", part_index)
            result.positive.append((schedule, weight))
        result.negative = self._encode_schedule(negative_prompt, steps, second_order, options, result, "negative", 0)
        seen = set()
        for mention in self.vocabulary.skipped_mentions(prompt) + self.vocabulary.skipped_mentions(negative_prompt):
            if mention.name not in seen:
                seen.add(mention.name)
                result.skipped.append(mention)
        self._cache[key] = result
        if len(self._cache) > ENCODE_CACHE_SIZE:
            self._cache.popitem(last=False)
        return result

    def _encode_schedule(
        self, text: str, steps: int, second_order: bool, options: EncodeOptions, result: Conditioning,
        which: str, part: int,
    ) -> ScheduledConditioning:
        schedule = prompt_schedule(text, steps, second_order=second_order)
        texts = [scheduled_text for _, scheduled_text in schedule]
        with torch.no_grad():
            encoded = encode_texts(
                texts,
                self.tokenizer,
                self.slots,
                self._rows,
                options,
                zero_if_empty=which == "negative" and self.config.family == "sdxl",
            )
        entries = []
        for index, (last_step, _) in enumerate(schedule):
            pooled = None if encoded.pooled is None else encoded.pooled[index : index + 1]
            entries.append((last_step, encoded.context[index : index + 1], pooled))
        hashes = self.vocabulary.short_hashes(self.vocabulary.embeddings)
        for entry_index, tokenized in enumerate(encoded.prompts):
            result.warnings.extend(tokenized.warnings)
            result.warnings.extend(f"embedding:{name} names no loaded embedding" for name in tokenized.unresolved)
            for chunk_index, chunk in enumerate(tokenized.chunks):
                for placed in chunk.embeddings:
                    result.applied.append(
                        AppliedEmbedding(
                            placed.name, hashes.get(placed.name), which, part, entry_index, chunk_index,
                            placed.slot, placed.n_vectors, chunk.weights[min(placed.slot, len(chunk.weights) - 1)],
                        )
                    )
        return ScheduledConditioning(entries, texts, [p.token_count for p in encoded.prompts])

    # ------------------------------------------------------------------------------------- generate

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        steps: int = 20,
        sampler: str = "Euler a",
        scheduler: str | None = None,
        cfg_scale: float | None = None,
        seed: int = -1,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        clip_skip: int = 1,
        emphasis: str = "original",
        vae_tiling: bool = False,
        callback: StepCallback | None = None,
    ) -> GenerationResult:
        """Text to image: `batch_size` images from seeds seed, seed + 1, ... (seed -1: a random seed);
        cfg_scale None: the engine's default_cfg_scale."""
        return self._sample(
            None, 1.0, prompt, negative_prompt, steps, sampler, scheduler, cfg_scale, seed, width, height,
            batch_size, clip_skip, emphasis, vae_tiling, callback,
        )

    def img2img(
        self,
        init_image: Image.Image,
        prompt: str,
        negative_prompt: str = "",
        *,
        strength: float = 0.75,
        steps: int = 20,
        sampler: str = "Euler a",
        scheduler: str | None = None,
        cfg_scale: float | None = None,
        seed: int = -1,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        clip_skip: int = 1,
        emphasis: str = "original",
        vae_tiling: bool = False,
        callback: StepCallback | None = None,
    ) -> GenerationResult:
        """Image to image: the init image is encoded, noised to `strength` (0..1) and denoised (A1111's
        img2img runs int(strength * steps) steps). Size defaults to the init image's, rounded down to
        the latent grid."""
        if width is None or height is None:
            factor = self._latent_factor()
            width = width or init_image.width // factor * factor
            height = height or init_image.height // factor * factor
        return self._sample(
            init_image, strength, prompt, negative_prompt, steps, sampler, scheduler, cfg_scale, seed, width,
            height, batch_size, clip_skip, emphasis, vae_tiling, callback,
        )

    # ------------------------------------------------------------------------------------ training

    def train_embedding(
        self,
        images: str | os.PathLike[str] | list[str | os.PathLike[str]],
        name: str,
        *,
        out: str | os.PathLike[str] | None = None,
        also_save: tuple[str, ...] = (),
        work_dir: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        resume: bool = False,
        callback: Callable[[TrainProgress], bool | None] | None = None,
        **settings: object,
    ) -> TrainResult:
        """Learn a textual-inversion embedding from a few images; every weight of this model stays frozen.

        `settings` are `tiengine.training.textual_inversion.TrainEmbeddingSettings` fields (vectors, init_text, steps,
        batch_size, grad_accum, learning_rate, template, seed, save_every, ...). `callback` gets a
        TrainProgress after each step and may return False to stop. The engine is not changed; use
        `engine.add_embedding(result.embedding)` to prompt with the result. See tiengine.training.textual_inversion.
        """
        return train_embedding(
            self, images, name, settings_from_options(**settings), out=out, also_save=also_save,
            work_dir=work_dir, overwrite=overwrite, resume=resume, callback=callback,
        )

    # ------------------------------------------------------------------------------------ internals

    def _latent_factor(self) -> int:
        return self.modules["vae"].downscale_factor

    def _default_size(self) -> int:
        return self.config.unet.sample_size * self._latent_factor()

    def _sample(
        self, init_image, strength, prompt, negative_prompt, steps, sampler, scheduler, cfg_scale, seed, width,
        height, batch_size, clip_skip, emphasis, vae_tiling, callback,
    ) -> GenerationResult:
        info = get_sampler(sampler)
        cfg_scale = self.default_cfg_scale if cfg_scale is None else cfg_scale
        width = width or self._default_size()
        height = height or self._default_size()
        factor = self._latent_factor()
        if width % factor or height % factor or width <= 0 or height <= 0:
            raise EngineError(f"size {width}x{height}: width and height must be positive multiples of {factor}")
        if batch_size < 1:
            raise EngineError(f"batch size must be >= 1, got {batch_size}")
        if seed == -1:
            seed = random.randint(0, MAX_SEED)
        conditioning = self.encode(
            prompt, negative_prompt, steps=steps, second_order=info.second_order, clip_skip=clip_skip,
            emphasis=emphasis,
        )
        schedule = NoiseSchedule.from_betas(**self.config.schedule.__dict__)
        sigmas = get_sigmas(
            schedule, steps, scheduler or info.default_scheduler, discard_penultimate=info.discard_penultimate_sigma
        ).to(self.device)
        unet, vae = self.modules["unet"], self.modules["vae"]
        wrap = v_denoiser if self.config.prediction == "v" else eps_denoiser
        denoiser = scheduled_guided_denoiser(
            wrap(unet, schedule),
            self._cond_schedule(conditioning.negative, batch_size, width, height, negative=True),
            [(self._cond_schedule(part, batch_size, width, height), weight) for part, weight in conditioning.positive],
            cfg_scale,
        )
        generators = batch_generators(seed, batch_size)
        latent_shape = (batch_size, vae.config.latent_channels, height // factor, width // factor)
        noise = initial_noise(generators, latent_shape, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            if init_image is None:
                x = noise * sigmas[0].to(self.dtype)
            else:
                pixels = pil_to_tensor(init_image, width=width, height=height).to(self.device, self.dtype)
                latent = vae.latents_from_images(pixels.expand(batch_size, -1, -1, -1), generator=generators[0])
                sigmas, x = img2img_start(latent, noise, sigmas, strength)
            latents = info.sample(denoiser, x, sigmas, generator=generators, callback=callback)
            images = tensor_to_pil(vae.images_from_latents(latents, tiled=vae_tiling))
        settings = {
            "Steps": steps,
            "Sampler": sampler,
            "Schedule type": (scheduler or info.default_scheduler).capitalize(),
            "CFG scale": f"{cfg_scale:g}",
            "Seed": None,
            "Size": f"{width}x{height}",
            "Model hash": self.model_hash(),
            "Model": self.model_path.name if self.model_path is not None else None,
            "Denoising strength": f"{strength:g}" if init_image is not None else None,
            "Clip skip": clip_skip if clip_skip != 1 else None,
            "Emphasis": emphasis if emphasis != "original" else None,
            "TI hashes": format_ti_hashes(conditioning.ti_hashes()),
            "Version": f"tiengine {__version__}",
        }
        seeds = [seed + index for index in range(batch_size)]
        parameters = [
            format_parameters(prompt, negative_prompt, {**settings, "Seed": image_seed}) for image_seed in seeds
        ]
        return GenerationResult(images, seeds, parameters, conditioning)

    def _cond_schedule(
        self, scheduled: ScheduledConditioning, batch: int, width: int, height: int, *, negative: bool = False
    ):
        """[(last_step, cond)] with cond {"context": (B, T, C)[, "y": (B, P)]} for the UNet.

        SDXL's size conditioning: original size and target size are the output size, crop (0, 0); the
        refiner conditions on an aesthetic score instead of the target size (6.0, 2.5 for the negative:
        the reference implementation's defaults)."""
        unet = self.modules["unet"]
        if self.config.variant == "refiner":
            score = REFINER_NEGATIVE_AESTHETIC_SCORE if negative else REFINER_AESTHETIC_SCORE
            size_ids = [height, width, 0, 0, score]
        else:
            size_ids = [height, width, 0, 0, height, width]
        entries = []
        for last_step, context, pooled in scheduled.entries:
            cond = {"context": context.expand(batch, -1, -1)}
            if unet.config.addition_embed_type == "text_time":
                time_ids = torch.tensor([size_ids], dtype=torch.float32, device=self.device)
                y = unet.text_time_conditioning(pooled.to(torch.float32), time_ids)  # (1, 2816)
                cond["y"] = y.to(self.dtype).expand(batch, -1)
            entries.append((last_step, cond))
        return entries

    def model_hash(self) -> str | None:
        """First 10 hex digits of the sha256 of the model file (of unet weights for folders), as A1111."""
        if self._model_hash is None and self.model_path is not None:
            path = self.model_path
            if path.is_dir():
                candidates = [path / "unet.safetensors", path / "unet" / "diffusion_pytorch_model.safetensors"]
                path = next((candidate for candidate in candidates if candidate.is_file()), None)
            if path is not None and path.is_file():
                digest = hashlib.sha256()
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
                self._model_hash = digest.hexdigest()[:10]
        return self._model_hash

