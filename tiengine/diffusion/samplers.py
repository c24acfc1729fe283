"""The sampler registry: A1111's samplers by name, with A1111's options, and name resolution.

Samplers are pure functions over a denoiser ``(x, sigma) -> x0`` in k-diffusion's convention, each
``sample_xxx(denoiser, x, sigmas, *, generator=None, callback=None, ...) -> x`` (txt2img starts from
``noise * sigmas[0]``):

- ``tiengine.diffusion.samplers_k``: Euler, Euler a, Heun, DPM2, DPM2 a, DPM++ 2S a, DPM++ 2M, LMS and
  a sigma-space DDIM;
- ``tiengine.diffusion.samplers_sde``: DPM++ SDE, DPM++ 2M SDE, DPM++ 2M SDE Heun, DPM++ 3M SDE (their
  ``noise_sampler=`` takes ``tiengine.diffusion.brownian.brownian_noise_sampler``, A1111's seeded
  Brownian tree; without it they draw from ``generator``);
- ``tiengine.diffusion.samplers_dpm_solver``: DPM fast, DPM adaptive;
- ``tiengine.diffusion.samplers_restart``: Restart; ``tiengine.diffusion.lcm``: LCM (with its own sigma
  table and model wrapper, ``SamplerInfo.sigma_table`` / ``model_wrapper``).

The registry lists them in A1111's order (``tiengine.diffusion.names.SAMPLER_NAMES``) with the options of
A1111 1.10's ``samplers_k_diffusion`` / ``samplers_data_lcm``: the schedule its "Automatic" picks
("scheduler"; "uniform" where A1111 names none, k-diffusion's ``get_sigmas``), "second_order",
"discard_next_to_last_sigma", "brownian_noise", "uses_ensd", and the eta A1111 passes (its
"eta_ancestral" option, 1, for every sampler with an eta, which the functions' defaults already are).
A1111's "DDIM" is a timestep sampler; until ``tiengine.diffusion.timestep_samplers`` provides it, "DDIM"
here is the sigma-space DDIM on tiengine's "ddim_uniform" schedule. Sampler modules build their records
with ``tiengine.diffusion.sampler_core.SamplerInfo`` (importing it from there, not from this module, so
this module can import them).

``resolve_sampler`` accepts A1111's names and aliases in any case and the old combined names ("DPM++ 2M
Karras"); ``get_sampler`` takes the exact name. Guidance (classifier-free guidance, AND composition,
prompt schedules) wraps a conditional denoiser in ``tiengine.diffusion.guidance``; its names are
importable from here too, as are the sampler functions and the shared types.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

# Re-exported: the guidance wrappers and the sampler functions lived here first.
from tiengine.diffusion.guidance import (  # noqa: F401
    PromptSchedule,
    guided_denoiser,
    scheduled_cond,
    scheduled_guided_denoiser,
)
from tiengine.diffusion.lcm import lcm_denoiser, lcm_noise_schedule, sample_lcm
from tiengine.diffusion.names import SamplingError, schedule_name, split_sampler_name
from tiengine.diffusion.sampler_core import (  # noqa: F401
    NoiseSampler,
    NoiseSource,
    SamplerInfo,
    StepCallback,
)
from tiengine.diffusion.samplers_dpm_solver import sample_dpm_adaptive, sample_dpm_fast
from tiengine.diffusion.samplers_k import (
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2s_ancestral,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
)
from tiengine.diffusion.samplers_restart import sample_restart
from tiengine.diffusion.samplers_sde import (
    sample_dpmpp_2m_sde,
    sample_dpmpp_2m_sde_heun,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
)
from tiengine.diffusion.timestep_samplers import TIMESTEP_SAMPLERS

# A1111's k-diffusion samplers, in its order. Columns: name, function, second_order, stochastic,
# Automatic's schedule, then A1111's other options.
K_DIFFUSION_SAMPLERS: tuple[SamplerInfo, ...] = (
    SamplerInfo("DPM++ 2M", sample_dpmpp_2m, False, False, "karras"),
    SamplerInfo("DPM++ SDE", sample_dpmpp_sde, True, True, "karras", brownian_noise=True),
    SamplerInfo("DPM++ 2M SDE", sample_dpmpp_2m_sde, False, True, "exponential", brownian_noise=True),
    SamplerInfo("DPM++ 2M SDE Heun", sample_dpmpp_2m_sde_heun, False, True, "exponential", brownian_noise=True),
    SamplerInfo("DPM++ 2S a", sample_dpmpp_2s_ancestral, True, True, "karras", uses_ensd=True),
    SamplerInfo("DPM++ 3M SDE", sample_dpmpp_3m_sde, False, True, "exponential", discard_penultimate_sigma=True,
                brownian_noise=True),
    SamplerInfo("Euler a", sample_euler_ancestral, False, True, "uniform", uses_ensd=True),
    SamplerInfo("Euler", sample_euler, False, False, "uniform"),
    SamplerInfo("LMS", sample_lms, False, False, "uniform"),
    SamplerInfo("Heun", sample_heun, True, False, "uniform"),
    SamplerInfo("DPM2", sample_dpm_2, True, False, "karras", discard_penultimate_sigma=True),
    SamplerInfo("DPM2 a", sample_dpm_2_ancestral, True, True, "karras", discard_penultimate_sigma=True,
                uses_ensd=True),
    SamplerInfo("DPM fast", sample_dpm_fast, False, True, "uniform", uses_ensd=True),
    SamplerInfo("DPM adaptive", sample_dpm_adaptive, False, True, "uniform", uses_ensd=True, adaptive=True),
    SamplerInfo("Restart", sample_restart, True, True, "karras"),
)
LCM_SAMPLERS: tuple[SamplerInfo, ...] = (
    SamplerInfo("LCM", sample_lcm, False, True, "uniform", sigma_table=lcm_noise_schedule,
                model_wrapper=lcm_denoiser),
)

SAMPLERS: Mapping[str, SamplerInfo] = MappingProxyType(
    {info.name: info for info in K_DIFFUSION_SAMPLERS + TIMESTEP_SAMPLERS + LCM_SAMPLERS}
)


def get_sampler(name: str) -> SamplerInfo:
    """The registry entry for an exact A1111 sampler name (e.g. "DPM++ 2M"); see resolve_sampler."""
    info = SAMPLERS.get(name)
    if info is None:
        raise SamplingError(f"sampler: expected one of {', '.join(SAMPLERS)}, found {name!r}")
    return info


def resolve_sampler(name: str) -> tuple[SamplerInfo, str | None]:
    """(registry entry, schedule name or None) for an A1111 sampler name or alias in any case, or an old
    combined name: "k_euler_a" -> (Euler a, None); "DPM++ 2M Karras" -> (DPM++ 2M, "karras").
    The schedule is None where the name carries none (or says "Automatic"): use default_scheduler."""
    sampler, schedule = split_sampler_name(name)
    return get_sampler(sampler), None if schedule in (None, "automatic") else schedule


def resolve_schedule(info: SamplerInfo, scheduler: str | None) -> str:
    """The schedule name a run of `info` uses: `scheduler` (any A1111 spelling) or, for None or
    "Automatic", the sampler's default (A1111's Automatic)."""
    if scheduler is None or schedule_name(scheduler) == "automatic":
        return info.default_scheduler
    return schedule_name(scheduler)
