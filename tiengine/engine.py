"""Engine: one loaded model with its tokenizer and embeddings; prompts -> conditioning -> images.

`Engine.load(model_path, embeddings=DIR, device=, dtype=)` accepts a converted tiengine folder, a
diffusers folder or an original single-file checkpoint (tiengine.weights_conv.convert.load_models); with no
path it loads the built-in default model (tiengine.default_model); with no embeddings folder it uses
the folder named by the environment variable TIENGINE_EMBEDDINGS, if set (`embeddings=False`: no folder,
whatever the environment says). `prompt_limits=PromptLimits(...)` bounds every prompt the engine parses
(tiengine.text.prompt; default PromptLimits()). Then:
- `encode(prompt, negative_prompt, steps=, options=EncodeOptions(...))`: the per-step conditioning
  schedule of each AND part and of the negative prompt, exactly as A1111 builds it, with a report of the
  embeddings applied (where, with which weight and hash) and of names that looked like embeddings but
  were skipped. Results are cached by text and options, so repeated prompts cost nothing.
- `generate(prompt, negative, settings=GenerateSettings(...))` / `img2img(...)` / `generate_batch(prompts,
  ...)`: sampling with classifier-free guidance, AND composition and prompt schedules
  (tiengine.diffusion.guidance), decoded to PIL images that carry A1111-style `parameters` text. Every
  one of them runs `_sample(settings, prompts, negative_prompt, seeds, init_image)`: image i of a run
  is prompt i from seed i. With `hires_scale` or `hires_resize` set, text to image adds A1111's hires fix
  (`_hires_pass`, tiengine.diffusion.hires): the latents resized by a latent upscaler and denoised again.
  Latents or decoded images that are not finite (NaN or inf, e.g. fp16 overflow) raise NonFiniteError
  naming the stage, never a black image.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import random
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from tiengine import __version__
from tiengine.default_model import (
    A1111_CFG_SCALE,
    DEFAULT_MODEL_CFG_SCALE,
    default_model_loras_path,
    default_model_path,
)
from tiengine.diffusion.brownian import brownian_noise_sampler
from tiengine.diffusion.guidance import (
    scheduled_guided_denoiser,
    stack_schedules,
    unet_schedule,
)
from tiengine.diffusion.hires import (
    HiresSize,
    crop_latents,
    hires_infotext,
    hires_size,
    img2img_sigmas,
    img2img_steps,
    upscale_latents,
)
from tiengine.diffusion.latent_preview import LatentPreview, fit_latent_preview
from tiengine.diffusion.names import schedule_label
from tiengine.diffusion.rng import ImageNoise, image_seeds, infotext_fields
from tiengine.diffusion.sampler_core import SamplingStopped
from tiengine.diffusion.samplers import SamplerInfo, resolve_sampler, resolve_schedule
from tiengine.diffusion.schedules import (
    Denoiser,
    NoiseSchedule,
    eps_denoiser,
    get_sigmas,
    img2img_start,
    v_denoiser,
)
from tiengine.diffusion.timestep_samplers import TimestepSamplerInfo
from tiengine.embeddings.embedding import Embedding
from tiengine.embeddings.library import (
    EmbeddingLibrary,
    ReloadReport,
    default_embeddings_folder,
)
from tiengine.errors import EngineError, NonFiniteError
from tiengine.infotext import (
    EMPHASIS_LABELS,
    InfotextResult,
    engine_facts,
    parse_infotext,
    plan_reproduction,
)
from tiengine.io.images import pil_to_tensor, tensor_to_pil
from tiengine.io.metadata import format_name_hashes
from tiengine.models.config import ModelConfig, size_time_ids
from tiengine.models.cpu_precision import EmulatedPrecisionWarning, emulated_precision_note
from tiengine.networks.active import (
    ActiveNetworks,
    NetworkPatcher,
    NetworkReport,
    NetworkResolver,
)
from tiengine.networks.library import NetworkLibrary
from tiengine.results import (
    Conditioning,
    GenerationResult,
    ScheduledConditioning,
    image_parameters,
    stackable,
)
from tiengine.settings import (
    MAX_SEED,
    RANDOM_SEED,
    GenerateSettings,
    encode_options_with,
    settings_with,
)
from tiengine.text.conditioning import EncodeOptions, TextEncoderSlot, encode_texts
from tiengine.text.extra_networks import strip_extra_networks
from tiengine.text.prompt import PromptLimits, prompt_schedule, split_and
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
from tiengine.weights_conv.source import model_hash, model_name

if TYPE_CHECKING:
    from PIL import Image

ENCODE_CACHE_SIZE = 64
# A1111's noise fields of the infotext (tiengine.diffusion.rng.infotext_fields), written per image
NOISE_FIELDS = ("Variation seed", "Variation seed strength", "Seed resize from", "ENSD", "RNG")
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
LoadProgress = Callable[[str, int, int], None]  # (component, components loaded, total components)
# One prompt's conditioning per denoiser call for the UNet: [(last_step, {"context": (B, T, C)[, "y": (B, P)]})]
CondSchedule = list[tuple[int, dict[str, torch.Tensor]]]
# A1111's advice when a tensor of NaNs comes out (its --no-half / --no-half-vae), in tiengine's terms.
NON_FINITE_ADVICE = {
    "unet": "try fp32 (--dtype fp32, dtype=torch.float32), a lower CFG scale, or another sampler",
    "vae": "try fp32 (--dtype fp32, dtype=torch.float32) or a different VAE (Engine.load(vae=...))",
}


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
        prompt_limits: PromptLimits | None = None,
        loras: NetworkLibrary | None = None,
        hypernetworks: NetworkLibrary | None = None,
        patcher: NetworkPatcher | None = None,
    ) -> None:
        self.config = config
        self.prompt_limits = PromptLimits() if prompt_limits is None else prompt_limits
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
        self.networks = NetworkResolver(modules, config.family, loras, hypernetworks)
        self.patcher = NetworkPatcher(modules) if patcher is None else patcher  # shared by engines on these modules
        self._bundled: tuple = ()  # the bundled embeddings in the vocabulary: (names, their LoRA files' states)
        self._latent_preview: LatentPreview | None = None  # fitted by latent_preview() on first use
        self._bind_embeddings()

    # ------------------------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        model_path: str | os.PathLike[str] | None = None,
        *,
        embeddings: str | os.PathLike[str] | Literal[False] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        prediction: str | None = None,
        vae: str | os.PathLike[str] | None = None,
        prompt_limits: PromptLimits | None = None,
        progress: LoadProgress | None = None,
        loras: str | os.PathLike[str] | None = None,
        hypernetworks: str | os.PathLike[str] | None = None,
    ) -> Engine:
        """Load a model (None: the built-in default, run at its own guidance scale) and a folder of
        embeddings (None: the folder named by $TIENGINE_EMBEDDINGS, if set, else none; False: none).

        `prompt_limits`: the bounds on every prompt this engine parses (default PromptLimits()).
        `progress(component, loaded, total)` is called after each model component is loaded.
        `loras` / `hypernetworks`: the folders that `<lora:NAME:...>` (and `<lyco:...>`) and
        `<hypernet:NAME:...>` tags in prompts name files in (A1111's models/Lora, models/hypernetworks);
        with the built-in model and no `loras`, the LoRAs packaged with it."""
        default_cfg_scale = A1111_CFG_SCALE
        if model_path is None:
            model_path = default_model_path()
            default_cfg_scale = DEFAULT_MODEL_CFG_SCALE
            if loras is None:
                loras = default_model_loras_path()  # the LoRAs made for the built-in model, if packaged
        if embeddings is None:
            embeddings = default_embeddings_folder()
        note = emulated_precision_note(device, dtype)
        if note is not None:
            warnings.warn(note, EmulatedPrecisionWarning, stacklevel=2)
        library = EmbeddingLibrary(embeddings) if embeddings is not None and embeddings is not False else None
        lora_library = NetworkLibrary(loras, "lora") if loras is not None else None
        hypernetwork_library = NetworkLibrary(hypernetworks, "hypernetwork") if hypernetworks is not None else None
        config, modules = load_models(model_path, device=device, dtype=dtype, prediction=prediction, vae=vae,
                                      progress=progress)
        return cls(config, modules, embeddings=library, model_path=Path(model_path), device=device, dtype=dtype,
                   default_cfg_scale=default_cfg_scale, prompt_limits=prompt_limits, loras=lora_library,
                   hypernetworks=hypernetwork_library)

    def sharing_weights(self) -> Engine:
        """A second engine on the same modules (no copy) with the same tokenizer and no embeddings or networks:
        the training loop's preview engine, whose vocabulary changes while this one's stays. Both share one
        NetworkPatcher, since the weights it changes are shared."""
        return type(self)(self.config, self.modules, tokenizer=self.tokenizer, model_path=self.model_path,
                          device=self.device, dtype=self.dtype, default_cfg_scale=self.default_cfg_scale,
                          prompt_limits=self.prompt_limits, patcher=self.patcher)

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
        self._set_vocabulary(self.base_vocabulary.with_embedding(embedding))

    def _bind_embeddings(self) -> None:
        """Bind the library's embeddings that fit this model (a shadowed file by its path, explicitly); the
        others become skipped names."""
        if self.library is None:
            self._set_vocabulary(EmbeddingVocabulary.build(self.tokenizer, {}))
        else:
            self._set_vocabulary(EmbeddingVocabulary.from_library(self.tokenizer, self.library, check=self._mismatch))

    def _set_vocabulary(self, vocabulary: EmbeddingVocabulary) -> None:
        """Use `vocabulary` (plus the active LoRAs' bundled embeddings): rebuild the encoders' extra rows and
        forget cached conditioning."""
        self.base_vocabulary = vocabulary
        self._use_bundled(self.patcher.active, rebuild=True)

    def _use_bundled(self, active: ActiveNetworks, *, rebuild: bool = False) -> None:
        """The vocabulary is the base one plus the embeddings bundled in the active LoRA files, as A1111 registers
        them when the LoRA loads; a name the base vocabulary has keeps the folder's embedding (A1111 skips the
        bundled one), and one that does not fit this model is left out."""
        bundled = {name: embedding for name, embedding in active.bundled_embeddings.items()
                   if name not in self.base_vocabulary.embeddings and self._mismatch(embedding) is None}
        identity = (tuple(sorted(bundled)), tuple(lora.file_state for lora in active.loras)) if bundled else ()
        if identity == self._bundled and not rebuild:
            return
        base = self.base_vocabulary
        if rebuild and not bundled:  # just built by the caller: the tokenizer holds exactly its names
            self.vocabulary = base
        else:  # built anew (not base.with_embedding) so the shared tokenizer holds exactly these names again
            self.vocabulary = EmbeddingVocabulary.build(self.tokenizer, {**base.embeddings, **bundled},
                                                        aliases=base.aliases, skipped=base.skipped,
                                                        explicit_only=base.explicit_only)
        self._bundled = identity
        self._rows = self._extra_rows()
        self._cache.clear()

    def _activate(self, active: ActiveNetworks) -> None:
        """Make the model carry exactly these networks (and their bundled embeddings)."""
        self.patcher.activate(active)
        self._use_bundled(active)

    def _mismatch(self, embedding: Embedding) -> str | None:
        """Why `embedding` cannot be used with this model's encoders, or None."""
        return embedding.width_mismatch(self.encoder_widths, self.config.family)

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
        hires_steps: int | None = None,
        options: EncodeOptions | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **option_fields: object,
    ) -> Conditioning:
        """Conditioning of a prompt (split on AND) and a negative prompt for a run of `steps` steps.

        `options`: how the prompts are encoded (default EncodeOptions(), A1111's); keyword fields of
        EncodeOptions (clip_skip=2, emphasis="lerp", ...) replace its fields. `second_order`: the sampler
        calls the model twice per step, so prompt schedules count 2 * steps model calls (A1111).
        `hires_steps`: the conditioning of a hires fix's second pass of that many steps after a first pass of
        `steps` (schedule boundaries count from the end of the first pass; A1111's hires conditioning).
        `device` / `dtype`: where the returned tensors live (default: the engine's). Cached by text and
        options.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise EngineError(f"steps must be >= 1 (an integer), got {steps!r}")
        if hires_steps is not None and (isinstance(hires_steps, bool) or not isinstance(hires_steps, int)
                                        or hires_steps < 1):
            raise EngineError(f"hires_steps must be >= 1 (an integer) or None, got {hires_steps!r}")
        options = encode_options_with(options, **option_fields)
        result = self._encode(prompt, negative_prompt, steps, second_order, options, hires_steps)
        if device is None and dtype is None:
            return result
        return result.to(device, dtype)

    def _encode(
        self, prompt: str, negative_prompt: str, steps: int, second_order: bool, options: EncodeOptions,
        hires_steps: int | None = None,
    ) -> Conditioning:
        active, reports, text, negative_text = self._networks_of(prompt, negative_prompt)
        self._activate(active)
        key = (prompt, negative_prompt, steps, second_order, options, self.prompt_limits, active.key, hires_steps)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        result = Conditioning(positive=[], negative=None, networks=reports, active_networks=active)  # type: ignore[arg-type]
        for part_index, (part, weight) in enumerate(split_and(text, limits=self.prompt_limits)):
            schedule = self._encode_schedule(part, steps, second_order, options, result, "positive", part_index,
                                             hires_steps)
            result.positive.append((schedule, weight))
        result.negative = self._encode_schedule(negative_text, steps, second_order, options, result, "negative", 0,
                                                hires_steps)
        result.add_skipped(self.vocabulary.skipped_mentions(text) + self.vocabulary.skipped_mentions(negative_text))
        self._cache[key] = result
        if len(self._cache) > ENCODE_CACHE_SIZE:
            self._cache.popitem(last=False)
        return result

    def apply_networks(self, prompt: str) -> list[NetworkReport]:
        """Apply the extra networks that `prompt`'s tags name, now (no tag: the base model back), as `encode` and
        `generate` do before they run; one report per tag. For callers that run the modules themselves."""
        active, reports, _, _ = self._networks_of(prompt, "")
        self._activate(active)
        return reports

    def _networks_of(self, prompt: str, negative_prompt: str) -> tuple[ActiveNetworks, list[NetworkReport], str, str]:
        """The networks a prompt pair names, a report per tag, and the texts the encoder reads.

        As in A1111 (processing.py strips `p.prompts`, never the negative prompts), every `<kind:...>` tag is
        removed from the positive prompt and its networks applied; the negative prompt keeps its text as
        written (a tag there is read as words, so `<EasyNegative:0.8>` still binds that embedding) and its
        tags are reported as not applied."""
        positive = strip_extra_networks(prompt, "positive", limits=self.prompt_limits)
        negative_tags = strip_extra_networks(negative_prompt, "negative", limits=self.prompt_limits).tags
        active, reports = self.networks.resolve(positive.tags + negative_tags)
        return active, reports, positive.text, negative_prompt

    def _encode_schedule(
        self, text: str, steps: int, second_order: bool, options: EncodeOptions, result: Conditioning,
        which: str, part: int, hires_steps: int | None = None,
    ) -> ScheduledConditioning:
        schedule = prompt_schedule(text, steps, second_order=second_order, hires_steps=hires_steps,
                                   limits=self.prompt_limits)
        texts = [scheduled_text for _, scheduled_text in schedule]
        with torch.no_grad():
            encoded = encode_texts(
                texts,
                self.tokenizer,
                self.slots,
                self._rows,
                options,
                zero_if_empty=which == "negative" and self.config.zero_empty_negative,
                limits=self.prompt_limits,
            )
        entries = []
        for index, (last_step, _) in enumerate(schedule):
            pooled = None if encoded.pooled is None else encoded.pooled[index : index + 1]
            entries.append((last_step, encoded.context[index : index + 1], pooled))
        result.record(encoded.prompts, self.vocabulary.short_hashes(self.vocabulary.embeddings), which, part)
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
        ...) replace those of `settings` (see `settings_with`). `callback(step, total, x, denoised)` is called
        after each step; raising tiengine.diffusion.sampler_core.SamplingStopped(latents) from it ends the run
        early and decodes those latents (A1111's interrupt: the last `denoised`)."""
        settings = settings_with(settings, **setting_fields)
        seeds, subseeds = self._batch_seeds(settings, settings.batch_size)
        return self._sample(settings, [prompt] * settings.batch_size, negative_prompt, seeds, None, callback,
                            subseeds)

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
            seeds, subseeds = self._batch_seeds(settings, len(prompts))
        else:
            seeds = [int(seed) for seed in seeds]
            _, subseeds = self._batch_seeds(settings, len(seeds))
        if len(seeds) != len(prompts):
            raise EngineError(f"generate_batch: {len(prompts)} prompts but {len(seeds)} seeds")
        runs = [
            self._sample(settings, prompts[start : start + settings.batch_size], negative_prompt,
                         seeds[start : start + settings.batch_size], None, callback,
                         None if subseeds is None else subseeds[start : start + settings.batch_size])
            for start in range(0, len(prompts), settings.batch_size)
        ]
        return GenerationResult.join(runs)

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
        seeds, subseeds = self._batch_seeds(settings, settings.batch_size)
        return self._sample(settings, [prompt] * settings.batch_size, negative_prompt, seeds, init_image, callback,
                            subseeds)

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
        step and may return False to stop. With `resume=True`, settings not given (keywords) or left at
        their defaults (a settings object) come from the checkpoint. The engine is not changed; use
        `engine.add_embedding(result.embedding)` to prompt with the result. Extra networks applied by an earlier
        prompt are removed first. See tiengine.training.textual_inversion.
        """
        self._activate(ActiveNetworks())  # train against the base weights, whatever the last prompt applied
        explicit = None  # with a settings object, its fields that differ from the defaults count as given
        if settings is None:
            settings = settings_from_options(**setting_fields)
            explicit = set(setting_fields)  # keywords: exactly the fields given (a resume takes the rest)
        elif setting_fields:
            settings = settings_from_options(**{**_fields(settings), **setting_fields})
        return train_embedding(
            self, images, name, settings, out=out, also_save=also_save,
            work_dir=work_dir, overwrite=overwrite, resume=resume, callback=callback, explicit=explicit,
        )

    def latent_preview(self, *, fit: bool = True) -> LatentPreview | None:
        """The live-preview map of this model's VAE (tiengine.diffusion.latent_preview: a latent pixel's channels
        -> RGB), fitted on the first call by one VAE encode of a small test card (192 x 192 pixels for SD), so
        call it where the VAE may be used. fit=False: the fitted map, or None before the first fit; it does not
        touch the VAE (safe from another thread)."""
        if self._latent_preview is None and fit:
            vae = self.modules["vae"]
            weight = vae.post_quant_conv.weight

            def encode(card: torch.Tensor) -> torch.Tensor:  # (1, 3, S, S) -> UNet-scale latent mean
                return vae.latents_from_images(card.to(weight.device, weight.dtype), generator=None)

            with torch.no_grad():
                self._latent_preview = fit_latent_preview(encode, vae.downscale_factor)
        return self._latent_preview

    # ------------------------------------------------------------------------------------ internals

    def _latent_factor(self) -> int:
        return self.modules["vae"].downscale_factor

    def _default_size(self) -> int:
        return self.config.unet.sample_size * self._latent_factor()

    @staticmethod
    def _first_seed(seed: int) -> int:
        return random.randint(0, MAX_SEED) if seed == RANDOM_SEED else seed

    def _batch_seeds(self, settings: GenerateSettings, count: int) -> tuple[list[int], list[int] | None]:
        """A1111's seeds of `count` images (seed + i; with a variation strength every image has the seed
        and the subseeds count up) and subseeds (None without a variation strength)."""
        seed = self._first_seed(settings.seed)
        if not settings.subseed_strength:
            return image_seeds(seed, count)
        return image_seeds(seed, count, subseed=self._first_seed(settings.subseed),
                           subseed_strength=settings.subseed_strength)

    def _sample(
        self,
        settings: GenerateSettings,
        prompts: list[str],
        negative_prompt: str,
        seeds: list[int],
        init_image: Image.Image | None,
        callback: StepCallback | None,
        subseeds: list[int] | None = None,
    ) -> GenerationResult:
        """One sampling run: image i is prompts[i] from seeds[i] (and subseeds[i], with a variation strength:
        noise and sampler stream), all sharing `negative_prompt` and `settings` (its batch_size is not read
        here: the run has len(prompts) images)."""
        info, named_schedule = resolve_sampler(settings.sampler)  # aliases, "DPM++ 2M Karras"
        scheduler = resolve_schedule(info, settings.scheduler or named_schedule)
        cfg_scale = self.default_cfg_scale if settings.cfg_scale is None else settings.cfg_scale
        width = settings.width or self._default_size()
        height = settings.height or self._default_size()
        factor = self._latent_factor()
        if width % factor or height % factor:
            raise EngineError(f"size {width}x{height}: width and height must be positive multiples of {factor}")
        hires = self._hires_size(settings, width, height, init_image)  # None: no hires fix
        network_sets = {self._networks_of(prompt, negative_prompt)[0].key for prompt in dict.fromkeys(prompts)}
        if len(network_sets) > 1:  # the weights differ between these prompts: one run per prompt
            return GenerationResult.join([
                self._sample(settings, [prompt], negative_prompt, [seed], init_image, callback,
                             None if subseeds is None else [subseeds[index]])
                for index, (prompt, seed) in enumerate(zip(prompts, seeds))
            ])
        unique = {prompt: self._encode(prompt, negative_prompt, settings.steps, info.second_order, settings.encode)
                  for prompt in dict.fromkeys(prompts)}
        conditionings = [unique[prompt] for prompt in prompts]
        self._activate(conditionings[0].active_networks)  # encoding left the last prompt's set active: the same one
        if len(prompts) > 1 and not stackable(list(unique.values())):  # run each image on its own
            return GenerationResult.join([
                self._sample(settings, [prompt], negative_prompt, [seed], init_image, callback,
                             None if subseeds is None else [subseeds[index]])
                for index, (prompt, seed) in enumerate(zip(prompts, seeds))
            ])
        batch = len(prompts)
        schedule = NoiseSchedule.from_betas(**self.config.schedule.__dict__)
        sigmas, sample = self._sampling_plan(info, scheduler, schedule, settings.steps,
                                             settings.strength if init_image is not None else None)
        vae = self.modules["vae"]
        first = conditionings[0]
        denoiser = self._guided_denoiser(info, unique, prompts, width, height, schedule, cfg_scale)
        image_noise = ImageNoise(  # A1111's per-image generators: initial noise, then the samplers' draws
            (vae.config.latent_channels, height // factor, width // factor), seeds, subseeds=subseeds,
            subseed_strength=settings.subseed_strength, seed_resize_from=settings.seed_resize_from,
            source=settings.rng, eta_noise_seed_delta=settings.eta_noise_seed_delta, device=self.device)
        noise = image_noise.first().to(self.dtype)  # (B, C, h, w)
        with torch.no_grad():
            if init_image is None:
                x = noise * sigmas[0].to(self.dtype)
                extra = self._sampler_extras(info, x, sigmas, seeds, schedule, txt2img=True, eta=settings.eta)
            else:
                pixels = pil_to_tensor(init_image, width=width, height=height).to(self.device, self.dtype)
                posterior = torch.Generator("cpu").manual_seed(seeds[0])  # the VAE's latent sample
                latent = vae.latents_from_images(pixels.expand(batch, -1, -1, -1), generator=posterior)
                _check_finite(latent, "vae", "the VAE encode of the init image (latents)")
                if isinstance(info, TimestepSamplerInfo):  # its sigmas already start at A1111's img2img step
                    x = latent + noise * sigmas[0].to(self.dtype)
                    extra = self._sampler_extras(info, x, sigmas, seeds, schedule, txt2img=False, eta=settings.eta)
                else:  # Brownian noise spans the whole schedule, as A1111's does in img2img too
                    extra = self._sampler_extras(info, noise, sigmas, seeds, schedule, txt2img=False, eta=settings.eta)
                    sigmas, x = img2img_start(latent, noise, sigmas, settings.strength)
            total = None if hires is None else settings.steps + _hires_steps_run(settings)  # steps of both passes
            try:
                latents = sample(denoiser, x, sigmas, generator=image_noise,
                                 callback=callback if total is None else _progress_over(callback, 0, total), **extra)
                _check_finite(latents, "unet", "the UNet (the sampled latents)")
                if hires is not None:
                    latents = self._hires_pass(hires, settings, prompts, negative_prompt, seeds, subseeds, latents,
                                               cfg_scale, _progress_over(callback, settings.steps, total))
            except SamplingStopped as stopped:  # the callback ended the run: decode what it kept
                latents = stopped.latents
                _check_finite(latents, "unet", "the UNet (the latents kept when sampling was stopped)")
            decoded = vae.images_from_latents(latents, tiled=settings.vae_tiling)  # (B, 3, H, W)
            _check_finite(decoded, "vae", "the VAE decode (the image)")
            images = tensor_to_pil(decoded)
        options = settings.encode
        infotext = {
            "Steps": settings.steps,
            "Sampler": info.name,
            "Schedule type": schedule_label(scheduler),
            "CFG scale": f"{cfg_scale:g}",
            "Seed": None,
            "Size": f"{width}x{height}",
            "Model hash": self.model_hash(),
            "Model": model_name(self.model_path) if self.model_path is not None else None,
            "Denoising strength": f"{settings.strength:g}" if init_image is not None or hires is not None else None,
            "Clip skip": options.clip_skip if options.clip_skip != 1 else None,
            **dict.fromkeys(NOISE_FIELDS),  # per image, below; placed here as A1111 places them
            **(hires_infotext(scale=settings.hires_scale, resize=settings.hires_resize, steps=settings.hires_steps,
                              upscaler=settings.hires_upscaler) if hires is not None else {}),
            "Emphasis": EMPHASIS_LABELS[options.emphasis] if options.emphasis != "original" else None,
            **_eta_field(info, settings.eta),
            "Lora hashes": format_name_hashes(first.active_networks.lora_hashes()),
            "TI hashes": None,
            "Version": f"tiengine {__version__}",
        }
        noise_fields = [infotext_fields(sampler=info.name, source=settings.rng,
                                        subseed=None if subseeds is None else subseeds[index],
                                        subseed_strength=settings.subseed_strength,
                                        seed_resize_from=settings.seed_resize_from,
                                        eta_noise_seed_delta=settings.eta_noise_seed_delta)
                        for index in range(batch)]
        parameters = image_parameters(prompts, negative_prompt, seeds, conditionings, infotext, noise_fields)
        return GenerationResult(images, list(seeds), parameters, first, conditionings)

    def _sampling_plan(
        self, info: SamplerInfo, scheduler: str, schedule: NoiseSchedule, steps: int, strength: float | None
    ) -> tuple[torch.Tensor, Callable[..., torch.Tensor]]:
        """(sigmas on the engine's device, sample function) of one run. A1111's timestep samplers (DDIM, PLMS,
        UniPC) build their own sigmas from the model's timesteps (img2img included: `strength`); the others
        take the named schedule's (LCM on its own sigma table)."""
        if isinstance(info, TimestepSamplerInfo):
            sigmas, sample = info.prepare(schedule, steps, strength)
            return sigmas.to(self.device), sample  # float64: each value exactly the table's sigma
        table = info.sigma_table(schedule) if info.sigma_table is not None else schedule
        sigmas = get_sigmas(table, steps, scheduler, discard_penultimate=info.discard_penultimate_sigma,
                            sdxl=self.config.family == "sdxl")
        return sigmas.to(self.device), info.sample

    @staticmethod
    def _sampler_extras(info: SamplerInfo, x: torch.Tensor, sigmas: torch.Tensor, seeds: list[int],
                        schedule: NoiseSchedule, *, txt2img: bool, eta: float | None) -> dict[str, object]:
        """A1111's per-sampler extras: Brownian-tree noise seeded with the image seeds for the SDE samplers
        (torchsde, as k-diffusion's BrownianTreeNoiseSampler), the model's sigma range for DPM fast /
        adaptive in txt2img, and a given eta for the samplers that take one (A1111 ignores it elsewhere)."""
        extra: dict[str, object] = {}
        if eta is not None and _takes_eta(info):
            extra["eta"] = eta
        if info.brownian_noise:
            extra["noise_sampler"] = brownian_noise_sampler(x, sigmas, seeds)
        if info.name in ("DPM fast", "DPM adaptive") and txt2img:
            extra.update(sigma_min=schedule.sigma_min, sigma_max=schedule.sigma_max)
        return extra

    def _guided_denoiser(
        self, info: SamplerInfo, unique: dict[str, Conditioning], prompts: list[str], width: int, height: int,
        schedule: NoiseSchedule, cfg_scale: float,
    ) -> Denoiser:
        """One sampling run's denoiser: image i follows prompts[i]'s schedules (`unique`: each prompt's
        conditioning, stackable), every image the first one's negative prompt; SDXL sizes of width x height.
        The model is wrapped as the sampler needs (LCM: its own wrapper; else by the prediction type)."""
        wrap = info.model_wrapper or (v_denoiser if self.config.prediction == "v" else eps_denoiser)
        first = unique[prompts[0]]
        uncond = self._cond_schedule(first.negative, width, height, negative=True)
        per_prompt = {prompt: [self._cond_schedule(part, width, height) for part, _ in unique[prompt].positive]
                      for prompt in unique}
        parts = [
            (stack_schedules([per_prompt[prompt][index] for prompt in prompts]), weight)
            for index, (_, weight) in enumerate(first.positive)
        ]
        return scheduled_guided_denoiser(wrap(self.modules["unet"], schedule), stack_schedules([uncond] * len(prompts)),
                                         parts, cfg_scale)

    # ------------------------------------------------------------------------------ hires fix

    def _hires_size(
        self, settings: GenerateSettings, width: int, height: int, init_image: Image.Image | None
    ) -> HiresSize | None:
        """The hires fix's second-pass size after a first pass of width x height (None: the hires fix is off)."""
        if not settings.hires:
            return None
        if init_image is not None:
            raise EngineError("the hires fix is a second pass of text to image: img2img takes no hires_scale or "
                              "hires_resize")
        factor = self._latent_factor()
        size = hires_size(width, height, scale=settings.hires_scale, resize=settings.hires_resize,
                          latent_factor=factor)
        rows, columns = size.latent
        if rows < 1 or columns < 1:
            target = f"{size.upscale_to[0]}x{size.upscale_to[1]}"
            raise EngineError(f"hires fix: {width}x{height} upscaled to {target} pixels leaves less than one latent "
                              f"pixel ({factor} pixels) on a side")
        return size

    def _hires_pass(
        self, size: HiresSize, settings: GenerateSettings, prompts: list[str], negative_prompt: str,
        seeds: list[int], subseeds: list[int] | None, latents: torch.Tensor, cfg_scale: float,
        callback: StepCallback | None,
    ) -> torch.Tensor:
        """A1111's hires fix with a latent upscaler (tiengine.diffusion.hires): the first pass's latents (B, C, h, w)
        resized and cropped to `size`, noised by fresh noise of the new shape from the same seeds (and subseeds),
        and denoised at `settings.strength` for the hires steps with the conditioning of a second pass; returns
        the second pass's latents (B, C, H, W)."""
        info, named_schedule = resolve_sampler(settings.sampler)
        if isinstance(info, TimestepSamplerInfo):
            raise EngineError(f"the hires fix with {info.name} (an A1111 timestep sampler) is not reproduced; pick a "
                              "k-diffusion sampler (Euler a, DPM++ 2M, ...) for hires runs")
        scheduler = resolve_schedule(info, settings.scheduler or named_schedule)
        requested = settings.hires_steps or settings.steps
        schedule_steps, t_enc = img2img_steps(requested, settings.strength, steps_given=True)
        resized = upscale_latents(latents.float(), size.resized_latent, settings.hires_upscaler)  # (B, C, h', w')
        x = crop_latents(resized, size.truncate).to(latents.dtype)  # (B, C, H, W)
        if schedule_steps == 0:  # strength 0: A1111's sigma schedule is [0], no step runs
            return x
        unique = {prompt: self._encode(prompt, negative_prompt, settings.steps, info.second_order, settings.encode,
                                       requested)
                  for prompt in dict.fromkeys(prompts)}
        if len(prompts) > 1 and not stackable(list(unique.values())):  # the second pass's texts differ in length
            return torch.cat([
                self._hires_pass(size, settings, [prompt], negative_prompt, [seeds[index]],
                                 None if subseeds is None else [subseeds[index]], latents[index : index + 1],
                                 cfg_scale, callback)
                for index, prompt in enumerate(prompts)
            ])
        schedule = NoiseSchedule.from_betas(**self.config.schedule.__dict__)
        full, sample = self._sampling_plan(info, scheduler, schedule, schedule_steps, None)  # (schedule_steps + 1,)
        sigmas = img2img_sigmas(full, t_enc)  # (t_enc + 2,)
        denoiser = self._guided_denoiser(info, unique, prompts, *size.upscale_to, schedule, cfg_scale)
        image_noise = ImageNoise(  # A1111: a new ImageRNG at the new shape, from the same seeds
            (x.shape[1], *size.latent), seeds, subseeds=subseeds, subseed_strength=settings.subseed_strength,
            seed_resize_from=settings.seed_resize_from, source=settings.rng,
            eta_noise_seed_delta=settings.eta_noise_seed_delta, device=self.device)
        noise = image_noise.first().to(self.dtype)  # (B, C, H, W)
        extra = self._sampler_extras(info, noise, full, seeds, schedule, txt2img=False, eta=settings.eta)  # Brownian: the whole schedule
        x = x + noise * sigmas[0].to(self.dtype)
        latents = sample(denoiser, x, sigmas, generator=image_noise, callback=callback, **extra)
        _check_finite(latents, "unet", "the UNet in the hires fix's second pass (the sampled latents)")
        return latents

    def _cond_schedule(
        self, scheduled: ScheduledConditioning, width: int, height: int, *, negative: bool = False
    ) -> CondSchedule:
        """The UNet's [(last_step, {"context": (1, T, C)[, "y": (1, P)]})] (unet_schedule, SDXL sizes)."""
        unet = self.modules["unet"]
        sizes = size_time_ids(self.config, width, height, negative=negative) \
            if unet.config.addition_embed_type == "text_time" else None
        return unet_schedule(scheduled.entries, unet, sizes, dtype=self.dtype)

    def model_hash(self) -> str | None:
        """A1111's "Model hash", the first 10 hex digits of the sha256 of the checkpoint file: a single file's
        own; a converted folder's source file's, recorded at conversion (without a record, its
        unet.safetensors'); a diffusers folder's UNet weights file's, as before (tiengine.weights_conv.source)."""
        if self._model_hash is None and self.model_path is not None:
            self._model_hash = model_hash(self.model_path)
        return self._model_hash

    def generate_from_infotext(
        self,
        text: str,
        *,
        init_image: Image.Image | None = None,
        callback: StepCallback | None = None,
        **overrides: object,
    ) -> InfotextResult:
        """Make an A1111 picture again from its infotext (the PNG `parameters` text; tiengine.infotext).

        `overrides` (prompt=, negative_prompt=, GenerateSettings and EncodeOptions fields) win over the
        infotext; with `init_image` the run is img2img. The result's `notes` say what each key became:
        mapped, checked against this engine (model, embedding and LoRA hashes), or not reproduced and why."""
        infotext = parse_infotext(text)
        facts = engine_facts(self, str(overrides.get("prompt", infotext.prompt)))
        plan = plan_reproduction(infotext, facts, init_image=init_image is not None, **overrides)
        if init_image is None:
            run = self.generate(plan.prompt, plan.negative_prompt, settings=plan.settings, callback=callback)
        else:
            run = self.img2img(init_image, plan.prompt, plan.negative_prompt, settings=plan.settings, callback=callback)
        return InfotextResult(run.images, run.seeds, run.parameters, run.conditioning, run.conditionings, plan)


def _takes_eta(info: SamplerInfo) -> bool:
    """Whether the sampler has an eta (the ancestral, SDE, DPM fast / adaptive and DDIM samplers)."""
    return "eta" in inspect.signature(info.sample).parameters


def _eta_field(info: SamplerInfo, eta: float | None) -> dict[str, str]:
    """A1111's infotext field for a given eta that differs from the sampler's default: "Eta DDIM" (default 0)
    for its timestep samplers, "Eta" (default 1, k-diffusion's eta_ancestral) for the others."""
    if eta is None or not _takes_eta(info):
        return {}
    key, default = ("Eta DDIM", 0.0) if isinstance(info, TimestepSamplerInfo) else ("Eta", 1.0)
    return {key: f"{eta:g}"} if eta != default else {}


def _check_finite(tensor: torch.Tensor, stage: str, produced_by: str) -> None:
    """Raise NonFiniteError when `tensor` holds NaN or inf (A1111: "A tensor with all NaNs was produced")."""
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    what = "all NaN" if bool(torch.isnan(tensor).all()) else f"{bad} of {tensor.numel()} values NaN or inf"
    raise NonFiniteError(f"a tensor with non-finite values ({what}) was produced by {produced_by}; "
                         f"no image was made. This usually means too little precision: {NON_FINITE_ADVICE[stage]}")


def _hires_steps_run(settings: GenerateSettings) -> int:
    """Sampler steps of the hires fix's second pass: the requested steps, none at strength 0."""
    requested = settings.hires_steps or settings.steps
    schedule_steps, t_enc = img2img_steps(requested, settings.strength, steps_given=True)
    return t_enc + 1 if schedule_steps else 0


def _progress_over(callback: StepCallback | None, offset: int, total: int) -> StepCallback | None:
    """`callback` with the step counted from `offset` and the total of every pass of the run."""
    if callback is None:
        return None

    def report(step: int, _: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        callback(offset + step, total, x, denoised)

    return report


def _fields(settings: TrainEmbeddingSettings) -> dict[str, object]:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
