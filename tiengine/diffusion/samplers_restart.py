"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes",
arXiv:2306.14878) as A1111 runs it under the name "Restart".

The algorithm (A1111's ``restart_sampler`` in ``modules/sd_samplers_extra.py``, written here from its
description):

- With N = len(sigmas) - 1 < 20 steps there is no restart: Heun's method over the given sigmas.
- With N >= 20, the main pass is a Karras schedule (rho = 7) of N - R * K steps between sigmas[-2] and
  sigmas[0] (whatever schedule was passed), with R = 9 restart steps done K = 1 time, or for N >= 36
  R = N // 4 steps done K = 2 times. The restart interval runs from the main sigma nearest 0.1 (its
  index i_min) up to the main sigma nearest 2 (index i_max < i_min): after the main step that reaches
  i_min, the path jumps back K times, each time adding fresh noise to climb from sigmas[i_min] to
  sigmas[i_max] (``x += z * s_noise * sqrt(sigma_max^2 - sigma_min^2)``) and descending again along a
  Karras schedule of R + 1 sigmas between the two (R Heun steps).
- Every step is a Heun step (two model calls), except a step to sigma 0 (Euler): N steps in all,
  2N - 1 calls.

Restart's Karras schedules are evaluated in float32 in k-diffusion's order of operations (its
``get_sigmas_karras``, which A1111 calls): whether the path re-noises once more after a restart descent
depends on the float32 rounding of that descent's last sigma against the main schedule's (A1111 adds
``sqrt(sigma^2 - last^2)`` of noise whenever the last sigma lies below), so it must round the same way.

The restart noise comes from ``generator`` (per-step noise source, ``tiengine.diffusion.sampler_core``):
A1111 draws it with k-diffusion's patched ``torch.randn_like``, i.e. from its per-image noise source.
``callback(i, total, x, denoised)`` runs once per step with total = the number of steps.
"""

from __future__ import annotations

import itertools

import torch

from tiengine.diffusion.sampler_core import (
    NoiseSource,
    StepCallback,
    draw_noise,
    report,
    sigma_batch,
    sigma_values,
)
from tiengine.diffusion.schedules import KARRAS_RHO, Denoiser

RESTART_MIN_STEPS = 20  # fewer steps: plain Heun
RESTART_TWICE_STEPS = 36  # from here on: N // 4 restart steps, done twice
RESTART_SIGMA_MIN, RESTART_SIGMA_MAX = 0.1, 2.0  # the restart interval's ends, snapped to the schedule


def _karras_float32(steps: int, sigma_min: float, sigma_max: float) -> list[float]:
    """Karras et al.'s sigmas (steps values, then 0) computed as k-diffusion does, in float32."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float32)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return ((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO).tolist() + [0.0]


def _nearest(values: list[float], target: float) -> int:
    """Index of the value nearest target (the first of ties, like torch.argmin)."""
    return min(range(len(values)), key=lambda k: abs(values[k] - target))


def restart_steps(sigmas: torch.Tensor) -> list[tuple[float, float]]:
    """The (sigma, sigma_next) pairs Restart steps through for a schedule of len(sigmas) - 1 steps."""
    s = sigma_values(sigmas)
    steps = len(s) - 1
    if steps < RESTART_MIN_STEPS:
        return list(itertools.pairwise(s))
    restart_count, repeats = (steps // 4, 2) if steps >= RESTART_TWICE_STEPS else (9, 1)
    main = _karras_float32(steps - restart_count * repeats, s[-2], s[0])
    low_index, high_index = _nearest(main, RESTART_SIGMA_MIN), _nearest(main, RESTART_SIGMA_MAX)
    pairs: list[tuple[float, float]] = []
    for i in range(len(main) - 1):
        pairs.append((main[i], main[i + 1]))
        if i + 1 == low_index and high_index < low_index:
            restart = _karras_float32(restart_count + 1, main[low_index], main[high_index])[:-1]
            pairs.extend(list(itertools.pairwise(restart)) * repeats)
    return pairs


def sample_restart(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: NoiseSource = None,
    callback: StepCallback | None = None, s_noise: float = 1.0,
) -> torch.Tensor:
    """Restart: Heun steps along ``restart_steps(sigmas)``, re-noising wherever the path jumps back up."""
    pairs = restart_steps(sigmas)
    last_sigma = None
    for i, (sigma, sigma_next) in enumerate(pairs):
        if last_sigma is not None and last_sigma < sigma:
            x = x + draw_noise(x, generator, "Restart") * (s_noise * (sigma**2 - last_sigma**2) ** 0.5)
        denoised = denoiser(x, sigma_batch(x, sigma))
        report(callback, i, len(pairs), x, denoised)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoiser(x_2, sigma_batch(x, sigma_next))) / sigma_next
            x = x + (d + d_2) / 2 * dt
        last_sigma = sigma_next
    return x
