"""Latent Consistency Model sampling (Luo et al. 2023, arXiv:2310.04378) as A1111 runs its "LCM" sampler.

A1111 (``modules/sd_samplers_lcm.py``, written here from its description) wraps the model differently
for LCM and runs a one-line sampler:

- The sigma table has LCM's 50 original timesteps: every 20th of the 1000 training timesteps, ending at
  T - 1 (timesteps 19, 39, ..., 999; in general skip = T // 50 and timesteps skip - 1 + k * skip).
  Every schedule type is built on this table (``lcm_noise_schedule``); "Automatic" is its "uniform".
- The denoiser (``lcm_denoiser``) snaps sigma to the nearest table entry k (in log sigma), calls the eps
  model at that training timestep t = k * skip + skip - 1 with the input scaled by 1 / sqrt(sigma^2 + 1),
  forms x0 = x - sigma * eps, and applies LCM's boundary condition with sigma_data = 0.5 and the
  timestep scaled by 10: ``c_skip * x + c_out * x0`` with ``c_skip = sigma_data^2 / ((10 t)^2 +
  sigma_data^2)``, ``c_out = 10 t / sqrt((10 t)^2 + sigma_data^2)`` (A1111 applies it to the unscaled x).
  A1111 uses this eps form for every model, v-prediction ones included.
- The sampler (``sample_lcm``): x = denoised, plus sigma_next * fresh noise while sigma_next > 0. The
  noise comes from ``generator`` (per-step noise source, ``tiengine.diffusion.sampler_core``), as A1111
  draws it from its per-image noise source.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tiengine.diffusion.sampler_core import (
    NoiseSource,
    StepCallback,
    draw_noise,
    report,
    sigma_batch,
    sigma_values,
)
from tiengine.diffusion.schedules import Cond, CondDenoiser, Denoiser, NoiseSchedule

LCM_ORIGINAL_STEPS = 50  # LCM's original timesteps (A1111: "default=50, for current version of LCM")
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALE = 10.0


def _skip(schedule: NoiseSchedule) -> int:
    return schedule.num_train_timesteps // LCM_ORIGINAL_STEPS


def lcm_timesteps(schedule: NoiseSchedule) -> torch.Tensor:
    """LCM's training timesteps (50,), increasing: skip - 1, 2 skip - 1, ..., T - 1."""
    skip = _skip(schedule)
    last = schedule.num_train_timesteps - 1
    return torch.arange(last - (LCM_ORIGINAL_STEPS - 1) * skip, last + 1, skip)  # (50,)


def lcm_noise_schedule(schedule: NoiseSchedule) -> NoiseSchedule:
    """The 50-entry table the LCM sampler's schedules are built on."""
    return NoiseSchedule(schedule.alphas_cumprod[lcm_timesteps(schedule)])


def lcm_denoiser(eps_model: Callable[..., torch.Tensor], schedule: NoiseSchedule) -> CondDenoiser:
    """Denoiser ``(x, sigma, cond) -> x0`` of an eps model under LCM's table and boundary condition.

    ``schedule`` is the model's training schedule; the model is called like ``eps_denoiser`` calls it.
    """
    table = lcm_noise_schedule(schedule)
    timesteps = lcm_timesteps(schedule).double()  # (50,)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        nearest = table.sigma_to_t(sigma.detach().to("cpu", torch.float64), quantize=True).long()  # (B,)
        t = timesteps[nearest]  # (B,) training timesteps
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        t_model = t.to(device=sigma.device, dtype=torch.float32)
        x_in = x / (s**2 + 1).sqrt()
        if cond is None:
            eps = eps_model(x_in, t_model)
        elif isinstance(cond, torch.Tensor):
            eps = eps_model(x_in, t_model, cond)
        else:
            eps = eps_model(x_in, t_model, **cond)
        x0 = x - eps * s
        scaled = (t * LCM_TIMESTEP_SCALE).to(device=x.device, dtype=x.dtype).reshape(s.shape)  # (B, 1, 1, 1)
        c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + LCM_SIGMA_DATA**2).sqrt()
        return c_out * x0 + c_skip * x

    return denoise


def sample_lcm(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: NoiseSource = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """LCM multistep sampling: jump to the denoised x0, re-noise to sigma_next (none after the last step)."""
    s = sigma_values(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, sigma_batch(x, s[i]))
        report(callback, i, n, x, denoised)
        x = denoised
        if s[i + 1] > 0:
            x = x + draw_noise(x, generator, "LCM") * s[i + 1]
    return x
