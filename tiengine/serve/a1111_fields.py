"""A1111 request fields -> what tiengine runs: a GenerationPlan (prompt, GenerateSettings, n_iter, init image),
or a RequestRefused (422) naming the field, the value and why.

The mapping follows AUTOMATIC1111 1.10 (modules/processing.py, modules/api/api.py, modules/shared_options.py):
sampler_name (else the old sampler_index) and scheduler ("Automatic": the sampler's own); seed / subseed -1
drawn once (`random.randrange(4294967294)`, A1111's get_fixed_seed), image k of n_iter x batch_size using
seed + k (with a variation strength: the seed, and subseed + k); seed_resize_from_w/h (<= 0: off); the hires
fix (enable_hr, hr_scale or hr_resize_x/y, hr_second_pass_steps, a latent hr_upscaler); the img2img init
image (init_images[0], resize_mode 0: resized to width x height). Server options and override_settings
(A1111_OPTIONS) that change the picture are CLIP_stop_at_last_layers, eta_noise_seed_delta, randn_source,
emphasis and comma_padding_backtrack; sd_model_checkpoint must name the loaded model (it is compared as
text, never opened). Options in DEFAULT_ONLY_OPTIONS are accepted at A1111's default value only, options in
NEUTRAL_OPTIONS (saving, previews) change nothing here and are accepted; any other option is refused, since
it may change the picture. Everything that would change the picture and is not done (face restoration,
tiling, styles, the s_* sampler parameters, a refiner, a different hires checkpoint / sampler / prompt,
a non-latent upscaler, masks and inpainting, resize modes other than 0, scripts) is refused; UI-only and
unknown fields are ignored, as A1111 ignores them.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

from tiengine.diffusion.hires import hires_size, latent_upscale_mode
from tiengine.diffusion.names import SamplingError, schedule_name, split_sampler_name
from tiengine.infotext import EMPHASIS_LABELS
from tiengine.serve.config import RequestRefused
from tiengine.settings import GenerateSettings
from tiengine.text.chunking import DEFAULT_COMMA_BACKTRACK
from tiengine.text.conditioning import EncodeOptions

if TYPE_CHECKING:
    from tiengine.serve.a1111_models import (
        Img2ImgRequest,
        ProcessingRequest,
        Txt2ImgRequest,
    )
    from tiengine.serve.config import ServeLimits

A1111_SEED_RANGE = 4294967294  # get_fixed_seed: random.randrange(4294967294)
LATENT_FACTOR = 8  # the SD VAEs' pixels per latent pixel, for the hires target size of the pixel limit
RANDN_SOURCES = {"CPU": "cpu", "GPU": "gpu", "NV": "nv"}  # A1111's randn_source values -> GenerateSettings.rng
EMPHASIS_BY_LABEL = {label: mode for mode, label in EMPHASIS_LABELS.items()}
# The options that change the picture and are done, with the service's defaults (A1111's, except
# randn_source: tiengine's CPU noise, as the CLI's --rng default).
A1111_OPTIONS = {"sd_model_checkpoint": None, "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0,
                 "randn_source": "CPU", "emphasis": "Original", "comma_padding_backtrack": DEFAULT_COMMA_BACKTRACK}
# Options accepted at A1111's default only: any other value changes the picture in a way tiengine does not do.
DEFAULT_ONLY_OPTIONS = {
    "eta_ancestral": 1.0, "eta_ddim": 0.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0,
    "s_min_uncond": 0.0, "sd_vae": "Automatic", "sd_unet": "Automatic", "initial_noise_multiplier": 1.0,
    "img2img_fix_steps": False, "always_discard_next_to_last_sigma": False, "sgm_noise_multiplier": False,
    "use_old_emphasis_implementation": False, "use_old_karras_scheduler_sigmas": False,
    "use_old_hires_fix_width_height": False, "use_old_scheduling": False, "no_dpmpp_sde_batch_determinism": False,
    "token_merging_ratio": 0.0, "token_merging_ratio_hr": 0.0, "token_merging_ratio_img2img": 0.0,
    "sd_vae_encode_method": "Full", "sd_vae_decode_method": "Full", "enable_pnginfo": True, "return_grid": False,
    "pad_cond_uncond": False, "pad_cond_uncond_v0": False, "fp8_storage": "Disable",
}
# Options about saving files, previews and the UI: nothing in a response's pictures depends on them.
NEUTRAL_OPTIONS = frozenset({
    "samples_save", "samples_format", "samples_filename_pattern", "save_images_add_number", "grid_save",
    "grid_format", "save_txt", "jpeg_quality", "export_for_4chan", "live_previews_enable",
    "show_progress_every_n_steps", "live_preview_refresh_period", "show_progressbar", "persistent_cond_cache",
    "batch_cond_uncond", "do_not_show_images", "add_model_hash_to_info", "add_model_name_to_info",
    "sd_checkpoint_cache", "sd_vae_checkpoint_cache", "grid_only_if_multiple", "save_to_dirs",
})
NEUTRAL_PREFIXES = ("outdir_", "save_", "live_preview", "show_", "directories_")


def refuse(field: str, value: object, why: str) -> RequestRefused:
    return RequestRefused(f"{field}={value!r}: {why}")


@dataclass(frozen=True)
class ModelIdentity:
    """The loaded model as A1111 names it: `title` "name [hash]", `name`, short `hash`, `filename` (the
    model's file or folder name only)."""

    name: str
    hash: str | None
    filename: str

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    def matches(self, text: str) -> bool:
        """Whether an A1111 checkpoint name (title, name, hash or file name) names this model (text only)."""
        return text.strip() in {self.title, self.name, self.filename, *((self.hash,) if self.hash else ())}


class A1111Options:
    """The service's A1111 options (GET / POST /sdapi/v1/options): the ones that apply, set server-wide."""

    def __init__(self, model: ModelIdentity) -> None:
        self.model = model
        self.values: dict[str, Any] = {**A1111_OPTIONS, "sd_model_checkpoint": model.title,
                                       **DEFAULT_ONLY_OPTIONS}

    def snapshot(self) -> dict[str, Any]:
        return dict(self.values)

    def update(self, changes: dict[str, Any]) -> None:
        """Check every change first (RequestRefused), then apply them all."""
        checked = merged_options(self.values, changes, self.model, "options")
        self.values.update(checked)


def merged_options(base: dict[str, Any], changes: dict[str, Any], model: ModelIdentity, where: str) -> dict[str, Any]:
    """`base` with `changes` checked and applied (`where`: "options" or "override_settings", for messages)."""
    merged = dict(base)
    for key, value in changes.items():
        field = f"{where}.{key}"
        if key == "sd_model_checkpoint":
            if not isinstance(value, str) or not model.matches(value):
                raise refuse(field, value, f"the service has one model, {model.title!r}; it does not load others")
            value = model.title
        elif key in A1111_OPTIONS:
            _option_value(key, value, field)
        elif key in DEFAULT_ONLY_OPTIONS:
            default = DEFAULT_ONLY_OPTIONS[key]
            if value != default:
                raise refuse(field, value, f"only A1111's default {default!r} is done by tiengine")
        elif key not in NEUTRAL_OPTIONS and not key.startswith(NEUTRAL_PREFIXES):
            raise refuse(field, value, "not an option tiengine applies; it may change the picture, so it is refused "
                                       f"rather than ignored (applied: {', '.join(A1111_OPTIONS)})")
        merged[key] = value
    return merged


def _option_value(key: str, value: object, field: str) -> None:
    if key == "randn_source" and value not in RANDN_SOURCES:
        raise refuse(field, value, f"expected one of {', '.join(RANDN_SOURCES)}")
    if key == "emphasis" and value not in EMPHASIS_BY_LABEL:
        raise refuse(field, value, f"expected one of {', '.join(EMPHASIS_BY_LABEL)}")
    if key in ("CLIP_stop_at_last_layers", "eta_noise_seed_delta", "comma_padding_backtrack"):
        lowest = 1 if key == "CLIP_stop_at_last_layers" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise refuse(field, value, f"expected an integer >= {lowest}")


@dataclass(frozen=True)
class GenerationPlan:
    """What one txt2img / img2img request runs: `n_iter` engine calls of `settings.batch_size` images each
    (`run_settings(k)` for call k), the seeds already drawn."""

    prompt: str
    negative_prompt: str
    settings: GenerateSettings
    n_iter: int
    init_image: Image.Image | None
    send_images: bool
    options: dict[str, Any]  # the A1111 options the run used (server-wide ones with the overrides)

    def run_settings(self, index: int) -> GenerateSettings:
        """Settings of run `index` (0-based): its first image is image index * batch_size of the request."""
        offset = index * self.settings.batch_size
        varied = self.settings.subseed_strength != 0
        return dataclasses.replace(self.settings, seed=self.settings.seed + (0 if varied else offset),
                                   subseed=self.settings.subseed + offset)


def fixed_seed(seed: int) -> int:
    """A1111's get_fixed_seed: -1 draws a random seed."""
    return random.randrange(A1111_SEED_RANGE) if seed == -1 else seed


def txt2img_plan(request: Txt2ImgRequest, options: A1111Options, limits: ServeLimits) -> GenerationPlan:
    _refuse_unsupported(request, options)
    hires: dict[str, Any] = {}
    if request.enable_hr:
        hires = _hires_fields(request, options.model)
    if request.firstphase_width or request.firstphase_height:
        raise refuse("firstphase_width/firstphase_height", (request.firstphase_width, request.firstphase_height),
                     "A1111's old hires fix layout is not done; give width/height and hr_scale or hr_resize_x/y")
    if request.firstpass_image is not None:
        raise refuse("firstpass_image", "<image>", "a given first-pass image for the hires fix is not supported")
    return _plan(request, options, limits, hires, None, request.denoising_strength if request.enable_hr else None)


def img2img_plan(request: Img2ImgRequest, options: A1111Options, limits: ServeLimits) -> GenerationPlan:
    _refuse_unsupported(request, options)
    for field in ("mask", "latent_mask"):
        if getattr(request, field) is not None:
            raise refuse(field, "<image>", "inpainting (masks) is not supported")
    if request.resize_mode != 0:
        raise refuse("resize_mode", request.resize_mode, "only 0 (just resize) is done")
    if request.initial_noise_multiplier not in (None, 1.0):
        raise refuse("initial_noise_multiplier", request.initial_noise_multiplier, "only 1 is done")
    if request.include_init_images:
        raise refuse("include_init_images", True, "returning the init images is not supported")
    if not request.init_images:
        raise refuse("init_images", request.init_images, "img2img needs one base64 image in init_images")
    init_image = decode_image(request.init_images[0], "init_images[0]", limits.max_pixels)
    return _plan(request, options, limits, {}, init_image, request.denoising_strength)


def _plan(request: ProcessingRequest, options: A1111Options, limits: ServeLimits, hires: dict[str, Any],
          init_image: Image.Image | None, strength: float | None) -> GenerationPlan:
    values = merged_options(options.values, request.override_settings or {}, options.model, "override_settings")
    if not request.override_settings_restore_afterwards and request.override_settings:
        options.update(request.override_settings)  # A1111 keeps the overrides when asked not to restore them
    _check_limits(request, limits, hires)
    sampler = request.sampler_name or request.sampler_index
    try:
        sampler_name, combined_schedule = split_sampler_name(sampler)
        scheduler = combined_schedule
        if request.scheduler is not None and schedule_name(request.scheduler) != "automatic":
            scheduler = schedule_name(request.scheduler)
    except SamplingError as error:
        field = "sampler_name" if request.sampler_name else "sampler_index"
        raise RequestRefused(f"{field if 'sampler' in str(error) else 'scheduler'}: {error}") from None
    seed_resize = None
    if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0:
        seed_resize = (request.seed_resize_from_w, request.seed_resize_from_h)
    encode = EncodeOptions(clip_skip=values["CLIP_stop_at_last_layers"], emphasis=EMPHASIS_BY_LABEL[values["emphasis"]],
                           comma_backtrack=values["comma_padding_backtrack"])
    settings = GenerateSettings(
        steps=request.steps, sampler=sampler_name, scheduler=scheduler, cfg_scale=float(request.cfg_scale),
        seed=fixed_seed(request.seed), width=request.width, height=request.height, batch_size=request.batch_size,
        strength=0.75 if strength is None else strength, rng=RANDN_SOURCES[values["randn_source"]],
        subseed=fixed_seed(request.subseed), subseed_strength=request.subseed_strength,
        seed_resize_from=seed_resize, eta_noise_seed_delta=values["eta_noise_seed_delta"], eta=request.eta,
        encode=encode, **hires)
    return GenerationPlan(request.prompt, request.negative_prompt, settings, request.n_iter, init_image,
                          request.send_images, values)


def _refuse_unsupported(request: ProcessingRequest, options: A1111Options) -> None:
    """Refuse the shared fields that would change the picture and are not done."""
    if request.restore_faces:
        raise refuse("restore_faces", True, "face restoration (GFPGAN / CodeFormer) is not supported")
    if request.tiling:
        raise refuse("tiling", True, "seamless tiling is not supported")
    if request.styles:
        raise refuse("styles", request.styles, "prompt styles need A1111's styles file; put the text in the prompt")
    for field, default in (("s_churn", 0.0), ("s_tmin", 0.0), ("s_tmax", 0.0), ("s_noise", 1.0),
                           ("s_min_uncond", 0.0)):
        value = getattr(request, field)
        if value is not None and value != default:
            raise refuse(field, value, f"only A1111's default ({default:g}) is done")
    if request.refiner_checkpoint not in (None, "", "None") and not options.model.matches(request.refiner_checkpoint):
        raise refuse("refiner_checkpoint", request.refiner_checkpoint, "a refiner model is not supported")
    if request.disable_extra_networks:
        raise refuse("disable_extra_networks", True, "not supported; remove the <lora:...> tags from the prompt")
    if request.script_name:
        raise refuse("script_name", request.script_name, "A1111 scripts are not supported")
    if request.alwayson_scripts:
        raise refuse("alwayson_scripts", sorted(request.alwayson_scripts), "A1111 extensions are not supported")


def _hires_fields(request: Txt2ImgRequest, model: ModelIdentity) -> dict[str, Any]:
    """GenerateSettings fields of A1111's hires fix; the second pass must be the first pass's model, sampler,
    schedule and prompts (tiengine runs one of each)."""
    if request.hr_checkpoint_name not in (None, "", "Use same checkpoint") and \
            not model.matches(request.hr_checkpoint_name):
        raise refuse("hr_checkpoint_name", request.hr_checkpoint_name, "the second pass uses the loaded model only")
    first_sampler = request.sampler_name or request.sampler_index
    if request.hr_sampler_name not in (None, "") and request.hr_sampler_name != first_sampler:
        raise refuse("hr_sampler_name", request.hr_sampler_name, f"the second pass uses the first's sampler "
                                                                  f"({first_sampler!r})")
    if request.hr_scheduler not in (None, "", request.scheduler):
        raise refuse("hr_scheduler", request.hr_scheduler, f"the second pass uses the first's schedule "
                                                            f"({request.scheduler!r})")
    for field, first in (("hr_prompt", request.prompt), ("hr_negative_prompt", request.negative_prompt)):
        if getattr(request, field) not in ("", first):
            raise refuse(field, getattr(request, field), "the second pass uses the first pass's prompt")
    upscaler = request.hr_upscaler or "Latent"
    try:
        latent_upscale_mode(upscaler)
    except SamplingError as error:
        raise RequestRefused(f"hr_upscaler: {error}") from None
    resize = (request.hr_resize_x, request.hr_resize_y)
    return {"hires_scale": None if any(resize) else request.hr_scale, "hires_resize": resize if any(resize) else None,
            "hires_steps": request.hr_second_pass_steps, "hires_upscaler": upscaler}


def _check_limits(request: ProcessingRequest, limits: ServeLimits, hires: dict[str, Any]) -> None:
    """The service's caps (ServeLimits), each named with the `tiengine serve` flag that raises it."""
    for field in ("width", "height"):
        value = getattr(request, field)
        if value < 1:
            raise refuse(field, value, "expected a positive number of pixels")
    for field in ("steps", "batch_size", "n_iter"):
        if getattr(request, field) < 1:
            raise refuse(field, getattr(request, field), "expected an integer >= 1")
    for field in ("prompt", "negative_prompt"):
        length = len(getattr(request, field))
        if length > limits.max_prompt_chars:
            raise RequestRefused(f"{field}: {length} characters, over the service's limit of "
                                 f"{limits.max_prompt_chars} (tiengine serve --max-prompt-chars)")
    width, height = request.width, request.height
    pixels = width * height
    hires_steps = 0
    if hires:
        try:
            size = hires_size(width, height, scale=hires["hires_scale"], resize=hires["hires_resize"],
                              latent_factor=LATENT_FACTOR)
        except (SamplingError, ValueError, ZeroDivisionError) as error:
            raise RequestRefused(f"hr_scale / hr_resize_x / hr_resize_y: {error}") from None
        pixels = max(pixels, size.upscale_to[0] * size.upscale_to[1])
        hires_steps = hires["hires_steps"] or request.steps
    if pixels > limits.max_pixels:
        raise RequestRefused(f"width x height: {pixels} pixels (hires target included), over the service's limit "
                             f"of {limits.max_pixels} (tiengine serve --max-pixels)")
    if request.steps + hires_steps > limits.max_steps:
        raise RequestRefused(f"steps: {request.steps} + hires steps {hires_steps} is over the service's limit of "
                             f"{limits.max_steps} sampling steps (tiengine serve --max-steps)")
    if request.batch_size > limits.max_batch_size:
        raise RequestRefused(f"batch_size: {request.batch_size}, over the service's limit of {limits.max_batch_size} "
                             "(tiengine serve --max-batch-size)")
    if request.n_iter > limits.max_n_iter:
        raise RequestRefused(f"n_iter: {request.n_iter}, over the service's limit of {limits.max_n_iter} "
                             "(tiengine serve --max-n-iter)")


def decode_image(text: str, field: str, max_pixels: int) -> Image.Image:
    """A base64 image (optionally a data: URL, as A1111's decode_base64_to_image takes); never a URL or a path."""
    text = text.strip()
    if text.startswith(("http://", "https://", "file:", "/")):
        raise refuse(field, text[:60], "expected a base64 image; the service never fetches URLs or reads paths")
    if text.startswith("data:image/"):
        text = text.split(",", 1)[-1]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise refuse(field, text[:60], f"not a base64-encoded image ({type(error).__name__}: {error})") from None
    if image.width * image.height > max_pixels:
        raise RequestRefused(f"{field}: {image.width}x{image.height} pixels, over the service's limit of {max_pixels} "
                             "(tiengine serve --max-pixels)")
    try:
        image.load()
    except (OSError, ValueError) as error:
        raise refuse(field, text[:60], f"the image cannot be decoded ({error})") from None
    return image
