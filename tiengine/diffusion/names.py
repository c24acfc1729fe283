"""The option strings of the diffusion stage, importable without torch (the CLI's `--help` reads them).

Names, aliases and labels are AUTOMATIC1111's (stable-diffusion-webui 1.10: ``samplers_k_diffusion`` in
``modules/sd_samplers_kdiffusion.py``, ``samplers_data_lcm`` in ``modules/sd_samplers_lcm.py``, the
``schedulers`` list in ``modules/sd_schedulers.py``):

- SAMPLER_NAMES: the samplers in A1111's menu order, the order `tiengine.diffusion.samplers.SAMPLERS`
  registers them (a test checks the two agree). SAMPLER_ALIASES: A1111's aliases (``k_dpmpp_2m``, ...).
- SCHEDULE_TYPES: (name, label, aliases) of A1111's "Schedule type" menu. The name is what A1111's
  sampler options and API use ("karras"), the label what its menu and infotext show ("Karras").
  "automatic" means the sampler's own default schedule. "ddim_uniform" is tiengine's earlier schedule
  (diffusers' DDIM "leading" spacing, exactly `steps` sigmas), kept under its name; A1111's "DDIM"
  schedule type is "ddim".
- SCHEDULERS: the schedule names a caller may pick (the CLI's `--scheduler` choices); leaving the
  schedule unset means "automatic".

Every lookup here is case-insensitive. Old combined sampler names ("DPM++ 2M Karras", "Euler a
Exponential") split into a sampler and a schedule as A1111's ``get_sampler_and_scheduler`` does: the
longest-known schedule label, name or alias at the end after a space. A1111 1.5's "_ka"/"_exp" alias
suffixes (``k_dpmpp_2m_ka``) mean the Karras/Exponential schedule.

LATENT_UPSCALERS are the hires fix's latent upscale modes (`tiengine.diffusion.hires`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

from tiengine.errors import TiengineError


class SamplingError(TiengineError):
    """A sampler, scheduler, seed or strength option is unknown or out of range."""


class ScheduleType(NamedTuple):
    name: str  # A1111's Scheduler.name
    label: str  # A1111's Scheduler.label: the menu and the infotext's "Schedule type"
    aliases: tuple[str, ...] = ()


SAMPLER_NAMES: tuple[str, ...] = (
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
    "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "PLMS", "UniPC",
    "LCM",
)
SAMPLER_ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "DPM++ 2M": ("k_dpmpp_2m",),
    "DPM++ SDE": ("k_dpmpp_sde",),
    "DPM++ 2M SDE": ("k_dpmpp_2m_sde",),
    "DPM++ 2M SDE Heun": ("k_dpmpp_2m_sde_heun",),
    "DPM++ 2S a": ("k_dpmpp_2s_a",),
    "DPM++ 3M SDE": ("k_dpmpp_3m_sde",),
    "Euler a": ("k_euler_a", "k_euler_ancestral"),
    "Euler": ("k_euler",),
    "LMS": ("k_lms",),
    "Heun": ("k_heun",),
    "DPM2": ("k_dpm_2",),
    "DPM2 a": ("k_dpm_2_a",),
    "DPM fast": ("k_dpm_fast",),
    "DPM adaptive": ("k_dpm_ad",),
    "Restart": ("restart",),
    "DDIM": ("ddim",),
    "LCM": ("k_lcm",),
})
SCHEDULE_TYPES: tuple[ScheduleType, ...] = (
    ScheduleType("automatic", "Automatic"),
    ScheduleType("uniform", "Uniform"),
    ScheduleType("karras", "Karras"),
    ScheduleType("exponential", "Exponential"),
    ScheduleType("polyexponential", "Polyexponential"),
    ScheduleType("sgm_uniform", "SGM Uniform", ("SGMUniform",)),
    ScheduleType("kl_optimal", "KL Optimal"),
    ScheduleType("align_your_steps", "Align Your Steps"),
    ScheduleType("simple", "Simple"),
    ScheduleType("normal", "Normal"),
    ScheduleType("ddim", "DDIM"),
    ScheduleType("beta", "Beta"),
    ScheduleType("ddim_uniform", "DDIM uniform"),
)
SCHEDULERS: tuple[str, ...] = tuple(kind.name for kind in SCHEDULE_TYPES if kind.name != "automatic")
# A1111 1.5's alias suffixes for the combined names ("k_dpmpp_2m_ka" = "DPM++ 2M Karras").
_ALIAS_SCHEDULE_SUFFIXES = (("_ka", "karras"), ("_exp", "exponential"))


def _spellings(kind: ScheduleType) -> tuple[str, ...]:
    return (kind.name, kind.label, *kind.aliases)


def schedule_name(text: str) -> str:
    """The schedule name ("karras") of a name, A1111 label ("Karras") or alias, in any case."""
    key = str(text).strip().lower()
    for kind in SCHEDULE_TYPES:
        if key in (spelling.lower() for spelling in _spellings(kind)):
            return kind.name
    raise SamplingError(
        f"unknown schedule type {text!r}; expected one of {', '.join(kind.label for kind in SCHEDULE_TYPES)} "
        f"(or the names {', '.join(kind.name for kind in SCHEDULE_TYPES)})"
    )


def schedule_label(name: str) -> str:
    """A1111's label of a schedule ("karras" -> "Karras", "sgm_uniform" -> "SGM Uniform"), as its
    infotext writes it after "Schedule type: "."""
    canonical = schedule_name(name)
    return next(kind.label for kind in SCHEDULE_TYPES if kind.name == canonical)


def _sampler_by_spelling(key: str) -> str | None:
    for name in SAMPLER_NAMES:
        if key == name.lower() or key in SAMPLER_ALIASES.get(name, ()):
            return name
    return None


def split_sampler_name(text: str) -> tuple[str, str | None]:
    """(A1111 sampler name, schedule name or None) of a sampler name, alias or old combined name.

    "DPM++ 2M" -> ("DPM++ 2M", None); "k_euler_a" -> ("Euler a", None); "DPM++ 2M Karras" and
    "k_dpmpp_2m_ka" -> ("DPM++ 2M", "karras"); "Euler a Automatic" -> ("Euler a", "automatic").
    """
    key = " ".join(str(text).split()).lower()
    name = _sampler_by_spelling(key)
    if name is not None:
        return name, None
    for suffix, schedule in _ALIAS_SCHEDULE_SUFFIXES:
        if key.endswith(suffix) and (name := _sampler_by_spelling(key[: -len(suffix)])) is not None:
            return name, schedule
    candidates = [(spelling.lower(), kind.name) for kind in SCHEDULE_TYPES for spelling in _spellings(kind)]
    for spelling, schedule in sorted(candidates, key=lambda item: -len(item[0])):
        if key.endswith(" " + spelling) and (name := _sampler_by_spelling(key[: -len(spelling) - 1])) is not None:
            return name, schedule
    raise SamplingError(
        f"unknown sampler {text!r}; expected one of {', '.join(SAMPLER_NAMES)}, an A1111 alias (k_euler_a, "
        f"k_dpmpp_2m, ...) or a sampler name followed by a schedule type (\"DPM++ 2M Karras\")"
    )
# A1111's latent upscale modes for the hires fix (`shared.latent_upscale_modes`), in A1111's order; what each
# one does is tiengine.diffusion.hires.LATENT_UPSCALE_MODES (a test checks the two agree).
RNG_SOURCES = ("cpu", "gpu", "nv")  # A1111's "Random number generator source" values (tiengine.diffusion.rng)
LATENT_UPSCALERS: tuple[str, ...] = (
    "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
    "Latent (nearest-exact)",
)
