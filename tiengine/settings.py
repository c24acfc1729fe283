"""GenerateSettings: one generation request's settings, shared by the Python API, the CLI and services.

A frozen dataclass validated once, in `__post_init__`, with messages that name the setting, what was
found and what is allowed. The encode options are `tiengine.text.conditioning.EncodeOptions` (clip skip,
emphasis, comma backtrack, bare names, embeddings on backtrack), validated by that class. What depends
on the loaded model (sizes on its latent grid, the default size and guidance scale) is checked by the
Engine. Option names come from `tiengine.diffusion.names` (samplers, schedules),
`tiengine.diffusion.hires` (latent upscalers) and `tiengine.text.chunking.EMPHASIS_MODES`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from tiengine.diffusion.hires import latent_upscale_mode
from tiengine.diffusion.names import SamplingError, schedule_name, split_sampler_name
from tiengine.diffusion.rng import RNG_SOURCES
from tiengine.errors import EngineError
from tiengine.text.conditioning import EncodeOptions

MAX_SEED = 2**32 - 1  # A1111's random seeds are drawn in [0, 2**32 - 1]
RANDOM_SEED = -1  # a seed of -1 asks for a random one


@dataclass(frozen=True)
class GenerateSettings:
    """How to sample: steps, sampler, schedule, guidance, seed, size, batch, img2img strength, encoding.

    sampler: an A1111 sampler name, alias ("k_dpmpp_2m") or old combined name ("DPM++ 2M Karras", which
    also sets the schedule). cfg_scale None: the engine's default_cfg_scale. width / height None: the
    model's native size (for img2img: the init image's, rounded down to the latent grid). scheduler None
    (or "Automatic"): the sampler's own schedule, as A1111's Automatic; else a schedule type's name or
    A1111 label ("karras", "Karras", "SGM Uniform"). seed -1: a random seed; image i of a batch uses seed + i. strength: img2img's denoising
    strength (unused by text to image).

    Hires fix (A1111's "Hires. fix", text to image only; tiengine.diffusion.hires): on when `hires_scale`
    (the first pass's size times this) or `hires_resize` ((width, height) in pixels; a 0 side keeps the
    aspect ratio, two nonzero sides are covered and the excess cut off) is given, not both. The first pass's
    latents are resized by `hires_upscaler`, one of A1111's latent upscale modes, and denoised again at
    `strength` for `hires_steps` steps (0: as many as the first pass).

    Noise, as A1111 makes it (tiengine.diffusion.rng): `rng` is the random source, "cpu" (torch's CPU
    generator), "gpu" (torch.randn on the CUDA card; A1111's default) or "nv" (NVIDIA's Philox stream
    computed on any device: an A1111 picture whose infotext has no RNG field was made with GPU noise, and
    "nv" reproduces it on a CPU). `subseed` / `subseed_strength`: A1111's variation seed (-1: random) and
    its strength in [0, 1]; `seed_resize_from`: (width, height) in pixels whose noise is kept, centred
    ("Seed resize from"); `eta_noise_seed_delta`: ENSD, added to the seed of the noise drawn after the
    first. `eta`: the noise amount of the samplers that have one (None: A1111's defaults, 1 for the
    ancestral and SDE samplers, 0 for DDIM); others ignore it, as in A1111."""

    steps: int = 20
    sampler: str = "Euler a"
    scheduler: str | None = None
    cfg_scale: float | None = None
    seed: int = RANDOM_SEED
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    strength: float = 0.75
    vae_tiling: bool = False
    rng: str = "cpu"
    subseed: int = RANDOM_SEED
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None
    eta_noise_seed_delta: int = 0
    eta: float | None = None
    hires_scale: float | None = None
    hires_steps: int = 0
    hires_upscaler: str = "Latent"
    hires_resize: tuple[int, int] | None = None
    encode: EncodeOptions = field(default_factory=EncodeOptions)

    def __post_init__(self) -> None:
        if not _is_int(self.steps) or self.steps < 1:
            raise EngineError(f"steps must be >= 1 (an integer), got {self.steps!r}")
        try:  # A1111's names, aliases (k_euler_a) and old combined names (DPM++ 2M Karras), any case
            split_sampler_name(self.sampler)
            if self.scheduler is not None:
                schedule_name(self.scheduler)  # a name, A1111 label ("Karras") or alias
        except SamplingError as error:
            raise EngineError(str(error)) from None
        if self.cfg_scale is not None and (isinstance(self.cfg_scale, bool)
                                           or not isinstance(self.cfg_scale, (int, float))):
            raise EngineError(f"cfg_scale must be a number (or None for the engine's default), got {self.cfg_scale!r}")
        if not _is_int(self.seed) or not RANDOM_SEED <= self.seed:
            raise EngineError(f"seed must be an integer >= 0 (or -1 for a random seed), got {self.seed!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise EngineError(f"{name} must be a positive integer (or None for the model's size), got {value!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise EngineError(f"batch size must be an integer >= 1, got {self.batch_size!r}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or not 0 <= self.strength <= 1:
            raise EngineError(f"denoising strength must be between 0 and 1, got {self.strength!r}")
        if self.rng not in RNG_SOURCES:
            raise EngineError(f"unknown random source {self.rng!r}; expected one of: {', '.join(RNG_SOURCES)}")
        if not _is_int(self.subseed) or not RANDOM_SEED <= self.subseed:
            raise EngineError(f"subseed must be an integer >= 0 (or -1 for a random one), got {self.subseed!r}")
        if isinstance(self.subseed_strength, bool) or not isinstance(self.subseed_strength, (int, float)) \
                or not 0 <= self.subseed_strength <= 1:
            raise EngineError(f"subseed strength must be between 0 and 1, got {self.subseed_strength!r}")
        if self.seed_resize_from is not None and (
                not isinstance(self.seed_resize_from, tuple) or len(self.seed_resize_from) != 2
                or not all(_is_int(side) and side > 0 for side in self.seed_resize_from)):
            raise EngineError(f"seed_resize_from must be (width, height) in pixels, positive integers, or None; "
                              f"got {self.seed_resize_from!r}")
        if self.eta is not None and (isinstance(self.eta, bool) or not isinstance(self.eta, (int, float))
                                     or not math.isfinite(self.eta) or self.eta < 0):
            raise EngineError(f"eta must be a finite number >= 0 (or None for the sampler's own), got {self.eta!r}")
        if not _is_int(self.eta_noise_seed_delta) or self.eta_noise_seed_delta < 0:
            raise EngineError(f"eta_noise_seed_delta must be an integer >= 0, got {self.eta_noise_seed_delta!r}")
        if not isinstance(self.encode, EncodeOptions):
            raise EngineError(f"encode must be an EncodeOptions, got {type(self.encode).__name__}")
        self._check_hires()

    @property
    def hires(self) -> bool:
        """Whether the hires fix is on (a hires_scale or a hires_resize is given)."""
        return self.hires_scale is not None or self.hires_resize is not None

    def _check_hires(self) -> None:
        if self.hires_scale is not None and (isinstance(self.hires_scale, bool)
                                             or not isinstance(self.hires_scale, (int, float))
                                             or not math.isfinite(self.hires_scale) or self.hires_scale <= 0):
            raise EngineError(f"hires_scale must be a number > 0 (or None: no hires fix), got {self.hires_scale!r}")
        if self.hires_resize is not None and (
                not isinstance(self.hires_resize, tuple) or len(self.hires_resize) != 2
                or not all(_is_int(side) and side >= 0 for side in self.hires_resize) or not any(self.hires_resize)):
            raise EngineError(f"hires_resize must be (width, height) in pixels, integers >= 0 and not both 0 "
                              f"(0: that side follows the aspect ratio), or None; got {self.hires_resize!r}")
        if self.hires_scale is not None and self.hires_resize is not None:
            raise EngineError(f"give hires_scale ({self.hires_scale!r}) or hires_resize ({self.hires_resize!r}), "
                              f"not both")
        if not _is_int(self.hires_steps) or self.hires_steps < 0:
            raise EngineError(f"hires_steps must be an integer >= 0 (0: as many as the first pass), "
                              f"got {self.hires_steps!r}")
        try:
            latent_upscale_mode(self.hires_upscaler)
        except SamplingError as error:
            raise EngineError(str(error)) from None
        if not self.hires and (self.hires_steps or self.hires_upscaler != "Latent"):
            raise EngineError("hires_steps and hires_upscaler need the hires fix on: give hires_scale or "
                              "hires_resize too")


ENCODE_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(EncodeOptions))
SETTING_NAMES = tuple(f.name for f in dataclasses.fields(GenerateSettings) if f.name != "encode")


def settings_with(settings: GenerateSettings | None = None, **fields: object) -> GenerateSettings:
    """`settings` (default GenerateSettings()) with `fields` replaced: GenerateSettings fields, and
    EncodeOptions fields (clip_skip, emphasis, comma_backtrack, bare_names, keep_embeddings_on_backtrack),
    which go to `settings.encode`. The keyword convenience of `generate` / `img2img` / `generate_batch`."""
    settings = GenerateSettings() if settings is None else settings
    unknown = sorted(set(fields) - set(SETTING_NAMES) - set(ENCODE_OPTION_NAMES))
    if unknown:
        raise EngineError(f"unknown generation setting(s) {', '.join(unknown)}; expected some of: "
                          f"{', '.join(SETTING_NAMES + ENCODE_OPTION_NAMES)}")
    encode_fields = {name: value for name, value in fields.items() if name in ENCODE_OPTION_NAMES}
    own = {name: value for name, value in fields.items() if name in SETTING_NAMES}
    if encode_fields:
        own["encode"] = dataclasses.replace(settings.encode, **encode_fields)
    return dataclasses.replace(settings, **own) if own else settings


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def encode_options_with(options: EncodeOptions | None = None, **fields: object) -> EncodeOptions:
    """`options` (default EncodeOptions()) with the keyword fields replaced; unknown names are refused."""
    unknown = sorted(set(fields) - set(ENCODE_OPTION_NAMES))
    if unknown:
        raise EngineError(f"unknown encode option(s) {', '.join(unknown)}; expected some of: "
                          f"{', '.join(ENCODE_OPTION_NAMES)}")
    options = EncodeOptions() if options is None else options
    return dataclasses.replace(options, **fields) if fields else options
