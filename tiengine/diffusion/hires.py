"""AUTOMATIC1111's "Hires. fix" with its latent upscalers: the second pass's size, steps and latent resize.

Written from the behaviour of A1111's ``modules/processing.py`` (``StableDiffusionProcessingTxt2Img``:
``calculate_target_resolution``, ``sample``, ``sample_hr_pass``), ``modules/sd_samplers_common.py``
(``setup_img2img_steps``), ``modules/sd_samplers_kdiffusion.py`` (``sample_img2img``) and
``modules/shared.py`` (``latent_upscale_modes``), v1.6 to v1.10. Names in brackets are A1111's.

A text-to-image run with the hires fix and a latent upscaler:

1. The first pass samples latents at (width, height) as without it.
2. The target size [hr_upscale_to_x, hr_upscale_to_y] in pixels (``hires_size``). A scale s ("Hires
   upscale"): (int(width * s), int(height * s)). A resize (W, H) ("Hires resize"): W x (W * height //
   width) when H is 0, (H * width // height) x H when W is 0, and otherwise the size with the first pass's
   aspect ratio that covers W x H, whose excess is cut off after the resize: [truncate_x, truncate_y] =
   (excess pixels) // f latent columns and rows, f being the latent factor (A1111's ``opt_f`` = 8; here the
   VAE's, which is 8 for every SD model).
3. The latents are resized to (target height // f, target width // f) by ``torch.nn.functional.interpolate``
   with the upscaler's mode and antialias flag (``LATENT_UPSCALE_MODES``), then cropped to rows
   [ty // 2, rows - (ty + 1) // 2) and columns [tx // 2, columns - (tx + 1) // 2) (``crop_latents``).
4. Fresh noise at the cropped latents' shape from the same seeds, subseeds, variation strength and seed
   resize (a new ImageRNG; tiengine.diffusion.rng.ImageNoise): its first draw noises the start, its later
   draws are the second pass's sampler noise.
5. An img2img run of the requested steps [hr_second_pass_steps; 0 means the first pass's steps] at the
   denoising strength s ("Denoising strength"). ``setup_img2img_steps`` (``img2img_steps``) is called with
   the steps given, so the schedule is built for int(requested / min(s, 0.999)) steps (0 when s is 0) and
   t_enc = requested - 1. Without steps given and without the "img2img_fix_steps" option (A1111's plain
   img2img), the schedule has the steps asked and t_enc = int(min(s, 0.999) * steps). Either way sampling
   runs sigmas[steps - t_enc - 1:] (``img2img_sigmas``), t_enc + 1 steps, from x + noise * that first sigma.
   At strength 0 A1111's schedule is the single sigma 0: no step runs and the resized latents are the result.
6. The second pass's conditioning counts prompt-schedule boundaries from the end of the first pass
   (tiengine.text.prompt.prompt_schedule's ``hires_steps``); SDXL's size conditioning takes the target size.

The infotext keys (``hires_infotext``): "Hires upscale" (the scale) or "Hires resize" ("WxH"), "Hires steps"
when nonzero, "Hires upscaler" (the mode's name), in A1111's order; the caller adds "Denoising strength".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from tiengine.diffusion.names import LATENT_UPSCALERS
from tiengine.diffusion.schedules import SamplingError

A1111_LATENT_FACTOR = 8  # A1111's opt_f: image pixels per latent pixel
MAX_DENOISING_FOR_STEPS = 0.999  # A1111's setup_img2img_steps uses min(strength, 0.999)


@dataclass(frozen=True)
class LatentUpscaleMode:
    """How a latent upscaler resizes: ``torch.nn.functional.interpolate``'s mode and antialias flag."""

    mode: str
    antialias: bool


# A1111's shared.latent_upscale_modes (align_corners left at interpolate's default, as A1111 leaves it).
LATENT_UPSCALE_MODES: Mapping[str, LatentUpscaleMode] = MappingProxyType({
    "Latent": LatentUpscaleMode("bilinear", False),
    "Latent (antialiased)": LatentUpscaleMode("bilinear", True),
    "Latent (bicubic)": LatentUpscaleMode("bicubic", False),
    "Latent (bicubic antialiased)": LatentUpscaleMode("bicubic", True),
    "Latent (nearest)": LatentUpscaleMode("nearest", False),
    "Latent (nearest-exact)": LatentUpscaleMode("nearest-exact", False),
})


def latent_upscale_mode(name: str) -> LatentUpscaleMode:
    """The mode of a latent upscaler by its A1111 name; any other upscaler is refused by name."""
    mode = LATENT_UPSCALE_MODES.get(name) if isinstance(name, str) else None
    if mode is None:
        raise SamplingError(
            f"hires upscaler {name!r} is not available: tiengine has A1111's latent upscalers only "
            f"({', '.join(LATENT_UPSCALERS)}); the others (ESRGAN, R-ESRGAN, SwinIR, LDSR, ScuNET, Lanczos, "
            f"Nearest, None) upscale the decoded picture with models or image resizes that tiengine does not have"
        )
    return mode


@dataclass(frozen=True)
class HiresSize:
    """The second pass's size: the resize target and the crop after it.

    ``upscale_to`` is (width, height) in pixels [hr_upscale_to_x, hr_upscale_to_y] (also SDXL's size
    conditioning); ``truncate`` is (columns, rows) of latent pixels cut off after the resize [truncate_x,
    truncate_y]; ``latent_factor`` is image pixels per latent pixel."""

    upscale_to: tuple[int, int]
    truncate: tuple[int, int]
    latent_factor: int

    @property
    def resized_latent(self) -> tuple[int, int]:
        """(rows, columns) the latents are interpolated to: the target // latent factor."""
        width, height = self.upscale_to
        return height // self.latent_factor, width // self.latent_factor

    @property
    def latent(self) -> tuple[int, int]:
        """(rows, columns) of the second pass's latents, after the crop."""
        rows, columns = self.resized_latent
        return rows - self.truncate[1], columns - self.truncate[0]

    @property
    def image(self) -> tuple[int, int]:
        """(width, height) in pixels of the pictures the second pass decodes to."""
        rows, columns = self.latent
        return columns * self.latent_factor, rows * self.latent_factor


def hires_size(
    width: int,
    height: int,
    *,
    scale: float | None = None,
    resize: tuple[int, int] | None = None,
    latent_factor: int = A1111_LATENT_FACTOR,
) -> HiresSize:
    """A1111's ``calculate_target_resolution`` for a first pass of width x height pixels: by ``scale`` or,
    when ``resize`` (W, H) is given (a 0 side follows the aspect ratio), by resize."""
    for name, value in (("width", width), ("height", height), ("latent factor", latent_factor)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SamplingError(f"hires size: the {name} must be a positive integer, found {value!r}")
    if resize is None or resize == (0, 0):  # A1111: a 0x0 resize means "by scale"
        if scale is None or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
            raise SamplingError(f"hires scale: expected a finite number > 0, found {scale!r}")
        return HiresSize((int(width * scale), int(height * scale)), (0, 0), latent_factor)
    if len(resize) != 2 or any(isinstance(side, bool) or not isinstance(side, int) or side < 0 for side in resize):
        raise SamplingError(f"hires resize: expected (width, height) in pixels, integers >= 0, found {resize!r}")
    target_width, target_height = resize
    if target_height == 0:
        return HiresSize((target_width, target_width * height // width), (0, 0), latent_factor)
    if target_width == 0:
        return HiresSize((target_height * width // height, target_height), (0, 0), latent_factor)
    if width / height < target_width / target_height:  # the first pass is taller: full width, rows cut
        upscale_to = (target_width, target_width * height // width)
    else:  # wider (or the same shape): full height, columns cut
        upscale_to = (target_height * width // height, target_height)
    truncate = ((upscale_to[0] - target_width) // latent_factor, (upscale_to[1] - target_height) // latent_factor)
    return HiresSize(upscale_to, truncate, latent_factor)


def img2img_steps(steps: int, strength: float, *, steps_given: bool) -> tuple[int, int]:
    """A1111's ``setup_img2img_steps``: (steps of the sigma schedule to build, t_enc); t_enc + 1 steps run.

    ``steps_given``: the caller names the steps to run (the hires pass always does; A1111's
    "img2img_fix_steps" option does it for img2img): the schedule is stretched to int(steps / min(strength,
    0.999)) steps (0 at strength 0) and t_enc = steps - 1. Otherwise the schedule has ``steps`` steps and
    t_enc = int(min(strength, 0.999) * steps)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SamplingError(f"img2img steps: expected an integer >= 1, found {steps!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise SamplingError(f"denoising strength: expected a value in [0, 1], found {strength!r}")
    if steps_given:
        schedule_steps = int(steps / min(strength, MAX_DENOISING_FOR_STEPS)) if strength > 0 else 0
        return schedule_steps, steps - 1
    return steps, int(min(strength, MAX_DENOISING_FOR_STEPS) * steps)


def img2img_sigmas(sigmas: torch.Tensor, t_enc: int) -> torch.Tensor:
    """The sub-schedule an img2img run samples: sigmas[steps - t_enc - 1:] of an (steps + 1,) schedule,
    (t_enc + 2,) values from the noise level of the start down to 0 (A1111's ``sigma_sched``)."""
    steps = sigmas.numel() - 1
    if sigmas.ndim != 1 or steps < 1:
        raise SamplingError(f"sigmas: expected a 1-D schedule of at least 2 values, found {tuple(sigmas.shape)}")
    if isinstance(t_enc, bool) or not isinstance(t_enc, int) or not 0 <= t_enc < steps:
        raise SamplingError(f"t_enc: expected an integer in [0, {steps - 1}] for a {steps}-step schedule, "
                            f"found {t_enc!r}")
    return sigmas[steps - t_enc - 1 :]  # (t_enc + 2,)


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], upscaler: str) -> torch.Tensor:
    """Latents (B, C, h, w) resized to ``size`` (rows, columns) by a latent upscaler (LATENT_UPSCALE_MODES)."""
    mode = latent_upscale_mode(upscaler)
    if latents.ndim != 4:
        raise SamplingError(f"latents: expected (B, C, H, W), found shape {tuple(latents.shape)}")
    rows, columns = size
    if rows < 1 or columns < 1:
        raise SamplingError(f"hires latent size: expected at least 1 x 1, found {rows} rows x {columns} columns")
    return torch.nn.functional.interpolate(latents, size=(rows, columns), mode=mode.mode,
                                           antialias=mode.antialias)  # (B, C, rows, columns)


def crop_latents(latents: torch.Tensor, truncate: tuple[int, int]) -> torch.Tensor:
    """Latents (B, C, h, w) with ``truncate`` = (columns, rows) cut off, the odd one at the end (A1111)."""
    columns, rows = truncate
    height, width = latents.shape[-2:]
    if not (0 <= rows < height and 0 <= columns < width):
        raise SamplingError(f"hires crop: cannot cut {columns} columns and {rows} rows from latents of "
                            f"{width} x {height}")
    return latents[:, :, rows // 2 : height - (rows + 1) // 2, columns // 2 : width - (columns + 1) // 2]


def hires_infotext(
    *, scale: float | None, resize: tuple[int, int] | None, steps: int, upscaler: str
) -> dict[str, str]:
    """A1111's hires keys of the infotext, in its order: "Hires upscale" or "Hires resize", "Hires steps" (when
    nonzero), "Hires upscaler". The scale is written as %g (A1111 writes the number it was given)."""
    fields: dict[str, str] = {}
    if resize is None or resize == (0, 0):
        fields["Hires upscale"] = f"{scale:g}"
    else:
        fields["Hires resize"] = f"{resize[0]}x{resize[1]}"
    if steps:
        fields["Hires steps"] = str(steps)
    fields["Hires upscaler"] = upscaler
    return fields
