"""Engine: one loaded model with its tokenizer and embeddings; prompts -> conditioning -> images.

`Engine.load(model_path, embeddings=DIR, device=, dtype=)` accepts a converted tiengine folder, a
diffusers folder or an original single-file checkpoint (tiengine.weights_conv.convert.load_models); with no
path it loads the built-in default model (tiengine.default_model); with no embeddings folder it uses
the folder named by the environment variable TIENGINE_EMBEDDINGS, if set. Then:
- `encode(prompt, negative_prompt, steps=, options=EncodeOptions(...))`: the per-step conditioning
  schedule of each AND part and of the negative prompt, exactly as A1111 builds it, with a report of the
  embeddings applied (where, with which weight and hash) and of names that looked like embeddings but
  were skipped. Results are cached by text and options, so repeated prompts cost nothing.
- `generate(prompt, negative, settings=GenerateSettings(...))` / `img2img(...)` / `generate_batch(prompts,
  ...)`: sampling with classifier-free guidance, AND composition and prompt schedules
  (tiengine.diffusion.samplers), decoded to PIL images that carry A1111-style `parameters` text. Every
  one of them runs `_sample(settings, prompts, negative_prompt, seeds, init_image)`: image i of a run
  is prompt i from seed i.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tiengine import __version__
from tiengine.default_model import A1111_CFG_SCALE, DEFAULT_MODEL_CFG_SCALE, default_model_path
from tiengine.diffusion.samplers import get_sampler, scheduled_cond, scheduled_guided_denoiser
from tiengine.diffusion.schedules import (
    NoiseSchedule,
    eps_denoiser,
    get_sigmas,
    img2img_start,
    initial_noise,
    v_denoiser,
)
from tiengine.embeddings.embedding import Embedding
from tiengine.embeddings.library import EmbeddingLibrary, ReloadReport, default_embeddings_folder
from tiengine.errors import EngineError
from tiengine.io.images import pil_to_tensor, tensor_to_pil
from tiengine.io.metadata import format_parameters, format_ti_hashes
from tiengine.models.config import ModelConfig, size_time_ids
from tiengine.results import AppliedEmbedding, Conditioning, GenerationResult, ScheduledConditioning
from tiengine.settings import ENCODE_OPTION_NAMES, MAX_SEED, RANDOM_SEED, GenerateSettings, settings_with
from tiengine.text.conditioning import EncodeOptions, TextEncoderSlot, encode_texts
from tiengine.text.prompt import prompt_schedule, split_and
from tiengine.text.tokenizer import ClipTokenizer
from tiengine.text.vocabulary import EmbeddingVocabulary
from tiengine.training.run import train_embedding
from tiengine.training.textual_inversion import (
    TrainEmbeddingSettings,
    TrainProgress,
    TrainResult,
    settings_from_options,
)
from tiengine.weights_conv.convert import load_models

if TYPE_CHECKING:
    from PIL import Image

ENCODE_CACHE_SIZE = 64
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
# One prompt's conditioning per denoiser call for the UNet: [(last_step, {"context": (B, T, C)[, "y": (B, P)]})]
CondSchedule = list[tuple[int, dict[str, torch.Tensor]]]


def _encode_options(options: EncodeOptions | None, fields: dict[str, object]) -> EncodeOptions:
    """`options` (default EncodeOptions()) with the keyword fields replaced."""
    unknown = sorted(set(fields) - set(ENCODE_OPTION_NAMES))
    if unknown:
        raise EngineError(f"unknown encode option(s) {', '.join(unknown)}; expected some of: "
                          f"{', '.join(ENCODE_OPTION_NAMES)}")
    options = EncodeOptions() if options is None else options
    return dataclasses.replace(options, **fields) if fields else options


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
            TextEncoderSlot(name, config.embedding_keys[name], modules[name])
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
        """Load a model (None: the built-in default, run at its own guidance scale) and a folder of
        embeddings (None: the folder named by $TIENGINE_EMBEDDINGS, if set; else none)."""
        default_cfg_scale = A1111_CFG_SCALE
        if model_path is None:
            model_path = default_model_path()
            default_cfg_scale = DEFAULT_MODEL_CFG_SCALE
        config, modules = load_models(model_path, device=device, dtype=dtype, prediction=prediction, vae=vae)
        library = None
        if embeddings is None:
            embeddings = default_embeddings_folder()
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
        options: EncodeOptions | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **option_fields: object,
    ) -> Conditioning:
        """Conditioning of a prompt (split on AND) and a negative prompt for a run of `steps` steps.

        `options`: how the prompts are encoded (default EncodeOptions(), A1111's); keyword fields of
        EncodeOptions (clip_skip=2, emphasis="lerp", ...) replace its fields. `second_order`: the sampler
        calls the model twice per step, so prompt schedules count 2 * steps model calls (A1111).
        `device` / `dtype`: where the returned tensors live (default: the engine's). Cached by text and
        options.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise EngineError(f"steps must be >= 1 (an integer), got {steps!r}")
        options = _encode_options(options, option_fields)
        result = self._encode(prompt, negative_prompt, steps, second_order, options)
        if device is None and dtype is None:
            return result
        return result.to(device, dtype)

    def _encode(
        self, prompt: str, negative_prompt: str, steps: int, second_order: bool, options: EncodeOptions
    ) -> Conditioning:
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
                zero_if_empty=which == "negative" and self.config.zero_empty_negative,
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
        settings: GenerateSettings | None = None,
        callback: StepCallback | None = None,
        **setting_fields: object,
    ) -> GenerationResult:
        """Text to image: `settings.batch_size` images of one prompt from seeds seed, seed + 1, ... (seed -1:
        a random seed); cfg_scale None: the engine's default_cfg_scale.

        Keyword fields of GenerateSettings or EncodeOptions (steps=20, sampler="DPM++ 2M", clip_skip=2,
        ...) replace those of `settings` (see `settings_with`)."""
        settings = settings_with(settings, **setting_fields)
        seed = self._first_seed(settings.seed)
        seeds = [seed + index for index in range(settings.batch_size)]
        return self._sample(settings, [prompt] * settings.batch_size, negative_prompt, seeds, None, callback)

    def generate_batch(
        self,
        prompts: Sequence[str],
        negative_prompt: str = "",
        *,
        settings: GenerateSettings | None = None,
        seeds: Sequence[int] | None = None,
        callback: StepCallback | None = None,
        **setting_fields: object,
    ) -> GenerationResult:
        """Text to image for a list of different prompts: image i is prompt i from seeds[i] (default: seed + i,
        as a batch of `generate`). Image i equals `generate(prompts[i], seed=seeds[i], batch_size=1)`.

        `settings.batch_size` is how many of the prompts share one sampling run (one UNet batch); prompts
        whose conditioning cannot be stacked (different AND weights or token counts) run on their own."""
        settings = settings_with(settings, **setting_fields)
        prompts = list(prompts)
        if not prompts:
            raise EngineError("generate_batch needs at least one prompt")
        if seeds is None:
            first = self._first_seed(settings.seed)
            seeds = [first + index for index in range(len(prompts))]
        seeds = [int(seed) for seed in seeds]
        if len(seeds) != len(prompts):
            raise EngineError(f"generate_batch: {len(prompts)} prompts but {len(seeds)} seeds")
        runs = [
            self._sample(settings, prompts[start : start + settings.batch_size], negative_prompt,
                         seeds[start : start + settings.batch_size], None, callback)
            for start in range(0, len(prompts), settings.batch_size)
        ]
        return _concatenate(runs)

    def img2img(
        self,
        init_image: Image.Image,
        prompt: str,
        negative_prompt: str = "",
        *,
        settings: GenerateSettings | None = None,
        callback: StepCallback | None = None,
        **setting_fields: object,
    ) -> GenerationResult:
        """Image to image: the init image is encoded, noised to `settings.strength` (0..1) and denoised
        (A1111's img2img runs int(strength * steps) steps). Size defaults to the init image's, rounded down
        to the latent grid."""
        settings = settings_with(settings, **setting_fields)
        if settings.width is None or settings.height is None:
            factor = self._latent_factor()
            settings = dataclasses.replace(settings, width=settings.width or init_image.width // factor * factor,
                                           height=settings.height or init_image.height // factor * factor)
        seed = self._first_seed(settings.seed)
        seeds = [seed + index for index in range(settings.batch_size)]
        return self._sample(settings, [prompt] * settings.batch_size, negative_prompt, seeds, init_image, callback)

    # ------------------------------------------------------------------------------------ training

    def train_embedding(
        self,
        images: str | os.PathLike[str] | list[str | os.PathLike[str]],
        name: str,
        settings: TrainEmbeddingSettings | None = None,
        *,
        out: str | os.PathLike[str] | None = None,
        also_save: tuple[str, ...] = (),
        work_dir: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        resume: bool = False,
        callback: Callable[[TrainProgress], bool | None] | None = None,
        **setting_fields: object,
    ) -> TrainResult:
        """Learn a textual-inversion embedding from a few images; every weight of this model stays frozen.

        `settings`: a `tiengine.training.textual_inversion.TrainEmbeddingSettings` (default: its
        defaults); keyword fields of it (vectors, init_text, steps, batch_size, grad_accum, learning_rate,
        template, seed, save_every, ...) replace its fields. `callback` gets a TrainProgress after each
        step and may return False to stop. The engine is not changed; use
        `engine.add_embedding(result.embedding)` to prompt with the result. See tiengine.training.textual_inversion.
        """
        if settings is None:
            settings = settings_from_options(**setting_fields)
        elif setting_fields:
            settings = settings_from_options(**{**_fields(settings), **setting_fields})
        return train_embedding(
            self, images, name, settings, out=out, also_save=also_save,
            work_dir=work_dir, overwrite=overwrite, resume=resume, callback=callback,
        )

    # ------------------------------------------------------------------------------------ internals

    def _latent_factor(self) -> int:
        return self.modules["vae"].downscale_factor

    def _default_size(self) -> int:
        return self.config.unet.sample_size * self._latent_factor()

    @staticmethod
    def _first_seed(seed: int) -> int:
        return random.randint(0, MAX_SEED) if seed == RANDOM_SEED else seed

    def _sample(
        self,
        settings: GenerateSettings,
        prompts: list[str],
        negative_prompt: str,
        seeds: list[int],
        init_image: Image.Image | None,
        callback: StepCallback | None,
    ) -> GenerationResult:
        """One sampling run: image i is prompts[i] from seeds[i] (noise and sampler stream), all sharing
        `negative_prompt` and `settings` (its batch_size is not read here: the run has len(prompts) images)."""
        info = get_sampler(settings.sampler)
        scheduler = settings.scheduler or info.default_scheduler
        cfg_scale = self.default_cfg_scale if settings.cfg_scale is None else settings.cfg_scale
        width = settings.width or self._default_size()
        height = settings.height or self._default_size()
        factor = self._latent_factor()
        if width % factor or height % factor:
            raise EngineError(f"size {width}x{height}: width and height must be positive multiples of {factor}")
        unique = {prompt: self._encode(prompt, negative_prompt, settings.steps, info.second_order, settings.encode)
                  for prompt in dict.fromkeys(prompts)}
        conditionings = [unique[prompt] for prompt in prompts]
        if len(prompts) > 1 and not _stackable(list(unique.values())):  # run each image on its own
            return _concatenate([
                self._sample(settings, [prompt], negative_prompt, [seed], init_image, callback)
                for prompt, seed in zip(prompts, seeds)
            ])
        batch = len(prompts)
        schedule = NoiseSchedule.from_betas(**self.config.schedule.__dict__)
        sigmas = get_sigmas(schedule, settings.steps, scheduler,
                            discard_penultimate=info.discard_penultimate_sigma).to(self.device)
        unet, vae = self.modules["unet"], self.modules["vae"]
        wrap = v_denoiser if self.config.prediction == "v" else eps_denoiser
        first = conditionings[0]
        uncond = self._cond_schedule(first.negative, width, height, negative=True)
        per_prompt = {prompt: [self._cond_schedule(part, width, height) for part, _ in unique[prompt].positive]
                      for prompt in unique}
        parts = [
            (_stack_schedules([per_prompt[prompt][index] for prompt in prompts]), weight)
            for index, (_, weight) in enumerate(first.positive)
        ]
        denoiser = scheduled_guided_denoiser(wrap(unet, schedule), _stack_schedules([uncond] * batch), parts,
                                             cfg_scale)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]  # A1111's per-image seeds
        latent_shape = (batch, vae.config.latent_channels, height // factor, width // factor)
        noise = initial_noise(generators, latent_shape, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            if init_image is None:
                x = noise * sigmas[0].to(self.dtype)
            else:
                pixels = pil_to_tensor(init_image, width=width, height=height).to(self.device, self.dtype)
                latent = vae.latents_from_images(pixels.expand(batch, -1, -1, -1), generator=generators[0])
                sigmas, x = img2img_start(latent, noise, sigmas, settings.strength)
            latents = info.sample(denoiser, x, sigmas, generator=generators, callback=callback)
            images = tensor_to_pil(vae.images_from_latents(latents, tiled=settings.vae_tiling))
        options = settings.encode
        infotext = {
            "Steps": settings.steps,
            "Sampler": settings.sampler,
            "Schedule type": scheduler.capitalize(),
            "CFG scale": f"{cfg_scale:g}",
            "Seed": None,
            "Size": f"{width}x{height}",
            "Model hash": self.model_hash(),
            "Model": self.model_path.name if self.model_path is not None else None,
            "Denoising strength": f"{settings.strength:g}" if init_image is not None else None,
            "Clip skip": options.clip_skip if options.clip_skip != 1 else None,
            "Emphasis": options.emphasis if options.emphasis != "original" else None,
            "TI hashes": None,
            "Version": f"tiengine {__version__}",
        }
        parameters = [
            format_parameters(prompt, negative_prompt, {
                **infotext, "Seed": seed, "TI hashes": format_ti_hashes(conditioning.ti_hashes()),
            })
            for prompt, seed, conditioning in zip(prompts, seeds, conditionings)
        ]
        return GenerationResult(images, list(seeds), parameters, first, conditionings)

    def _cond_schedule(
        self, scheduled: ScheduledConditioning, width: int, height: int, *, negative: bool = False
    ) -> CondSchedule:
        """[(last_step, cond)] with cond {"context": (1, T, C)[, "y": (1, P)]} for the UNet; SDXL's pooled
        output and size conditioning (tiengine.models.config.size_time_ids) make "y"."""
        unet = self.modules["unet"]
        entries = []
        for last_step, context, pooled in scheduled.entries:
            cond = {"context": context}
            if unet.config.addition_embed_type == "text_time":
                size_ids = size_time_ids(self.config, width, height, negative=negative)
                time_ids = torch.tensor([size_ids], dtype=torch.float32, device=self.device)  # (1, K)
                y = unet.text_time_conditioning(pooled.to(torch.float32), time_ids)  # (1, 2816)
                cond["y"] = y.to(self.dtype)
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



def _stackable(conditionings: list[Conditioning]) -> bool:
    """Whether different prompts can share one UNet batch: the same AND weights and, per AND part, one
    context shape across every prompt and schedule entry."""
    weights = [[weight for _, weight in conditioning.positive] for conditioning in conditionings]
    if any(w != weights[0] for w in weights):
        return False
    for index in range(len(weights[0])):
        shapes = {(tuple(context.shape), None if pooled is None else tuple(pooled.shape))
                  for conditioning in conditionings for _, context, pooled in conditioning.positive[index][0].entries}
        if len(shapes) > 1:
            return False
    return True


def _stack_schedules(schedules: list[CondSchedule]) -> CondSchedule:
    """Per-image schedules of (1, ...) conds -> one schedule of (B, ...) conds, image i at row i.

    The entries are the union of the images' step boundaries; the entry for boundary s holds each
    image's cond for denoiser call s, which is its cond for every call that entry covers (A1111's
    first-entry-with-call <= last_step rule). One schedule repeated B times is expanded, not copied."""
    batch = len(schedules)
    if all(schedule is schedules[0] for schedule in schedules):
        return [(last_step, {key: value.expand(batch, *value.shape[1:]) for key, value in cond.items()})
                for last_step, cond in schedules[0]]  # (B, ...) views of (1, ...)
    boundaries = sorted({last_step for schedule in schedules for last_step, _ in schedule})
    stacked = []
    for last_step in boundaries:
        conds = [scheduled_cond(schedule, last_step) for schedule in schedules]
        stacked.append((last_step, {key: torch.cat([cond[key] for cond in conds]) for key in conds[0]}))  # (B, ...)
    return stacked


def _concatenate(results: list[GenerationResult]) -> GenerationResult:
    """Several runs' results as one, in order."""
    if len(results) == 1:
        return results[0]
    return GenerationResult(
        [image for result in results for image in result.images],
        [seed for result in results for seed in result.seeds],
        [text for result in results for text in result.parameters],
        results[0].conditioning,
        [conditioning for result in results for conditioning in result.conditionings],
    )


def _fields(settings: TrainEmbeddingSettings) -> dict[str, object]:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
