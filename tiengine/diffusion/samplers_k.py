"""k-diffusion's deterministic and ancestral samplers as pure functions over a denoiser ``(x, sigma) -> x0``.

Each is ``sample_xxx(denoiser, x, sigmas, *, generator=None, callback=None, ...) -> x`` and restates the
k-diffusion function of the same name (``k_diffusion/sampling.py``, MIT): ``sample_euler``,
``sample_euler_ancestral``, ``sample_heun``, ``sample_dpm_2``, ``sample_dpm_2_ancestral``,
``sample_dpmpp_2s_ancestral``, ``sample_dpmpp_2m`` and ``sample_lms`` (order 4), at A1111's defaults
(eta = 1 for the ancestral ones, s_noise = 1, no churn); A1111's DDIM, PLMS and UniPC are
tiengine.diffusion.timestep_samplers. Two-call samplers (Heun, DPM2, DPM2 a,
DPM++ 2S a) make a first-order step to sigma 0 on the last step: 2N - 1 calls; their midpoint sigmas
(and DPM2 a / DPM++ 2S a's sigma_down) are formed in k-diffusion's float32 arithmetic
(``tiengine.diffusion.sampler_core``), so the model is called at A1111's sigmas.

Ancestral noise comes from ``generator`` (see ``tiengine.diffusion.sampler_core``), drawn where
k-diffusion draws it: once per step to a nonzero sigma_next (DPM2 a: per step that is not the last
Euler step), so a per-image noise source gives A1111's stream. LMS integrates its Lagrange polynomials
exactly (Gauss-Legendre) where k-diffusion calls scipy's quad; both are exact for these polynomials.

``callback(step_index, total_steps, x, denoised)`` runs once per step, after the step's first denoiser
call, with the step's input x and that call's x0 (k-diffusion's order).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tiengine.diffusion.names import SamplingError
from tiengine.diffusion.sampler_core import (
    NoiseSource,
    StepCallback,
    ancestral_step,
    ancestral_step_float32,
    draw_noise,
    lambda_points_float32,
    log_midpoint_float32,
    report,
    sigma_batch,
    sigma_values,
)
from tiengine.diffusion.schedules import Denoiser


def sample_euler(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: NoiseSource = None, callback: StepCallback | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma."""
    s = sigma_values(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, sigma_batch(x, s[i]))
        report(callback, i, n, x, denoised)
        x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
    return x


def _ancestral_loop(
    name: str, denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, eta: float, s_noise: float,
    generator: NoiseSource, callback: StepCallback | None,
) -> torch.Tensor:
    s = sigma_values(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, sigma_batch(x, s[i]))
        report(callback, i, n, x, denoised)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        x = denoised + (x - denoised) / s[i] * sigma_down
        if sigma_up > 0:
            x = x + draw_noise(x, generator, name) * (s_noise * sigma_up)
    return x


def sample_euler_ancestral(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: NoiseSource = None, callback: StepCallback | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler ancestral ("Euler a"): an Euler step to sigma_down, then fresh noise of size sigma_up."""
    return _ancestral_loop("Euler a", denoiser, x, sigmas, eta, s_noise, generator, callback)


def sample_heun(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: NoiseSource = None, callback: StepCallback | None = None,
) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 1 without churn); Euler on the last step to 0."""
    s = sigma_values(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, sigma_batch(x, s[i]))
        report(callback, i, n, x, denoised)
        d = (x - denoised) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = (x_2 - denoiser(x_2, sigma_batch(x, s[i + 1]))) / s[i + 1]
        x = x + (d + d_2) / 2 * dt
    return x


def _dpm_2_step(denoiser: Denoiser, x: torch.Tensor, d: torch.Tensor, sigma: float, sigma_to: float) -> torch.Tensor:
    """DPM-Solver-2 from sigma to sigma_to (> 0) with the slope d at sigma: the slope at the log-midpoint."""
    sigma_mid = log_midpoint_float32(sigma, sigma_to)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = (x_2 - denoiser(x_2, sigma_batch(x, sigma_mid))) / sigma_mid
    return x + d_2 * (sigma_to - sigma)


def sample_dpm_2(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: NoiseSource = None, callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver-2 in k-diffusion's form: the slope at the log-midpoint sigma; Euler on the last step."""
    s = sigma_values(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, sigma_batch(x, s[i]))
        report(callback, i, n, x, denoised)
        d = (x - denoised) / s[i]
        x = x + d * (s[i + 1] - s[i]) if s[i + 1] == 0 else _dpm_2_step(denoiser, x, d, s[i], s[i + 1])
    return x


def sample_dpm_2_ancestral(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: NoiseSource = None, callback: StepCallback | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM2 a: a DPM-Solver-2 step to sigma_down, then noise of size sigma_up; Euler where sigma_down = 0."""
    s = sigma_values(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, sigma_batch(x, s[i]))
        report(callback, i, n, x, denoised)
        sigma_down, sigma_up = ancestral_step_float32(s[i], s[i + 1], eta)
        d = (x - denoised) / s[i]
        if sigma_down == 0:
            x = x + d * (sigma_down - s[i])
            continue
        x = _dpm_2_step(denoiser, x, d, s[i], sigma_down)
        if sigma_up > 0:
            x = x + draw_noise(x, generator, "DPM2 a") * (s_noise * sigma_up)
    return x


def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: NoiseSource = None, callback: StepCallback | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2S) ancestral: a single-step second-order update in lambda = -log(sigma) to sigma_down
    through the lambda-midpoint, then noise of size sigma_up; Euler where sigma_down = 0."""
    s = sigma_values(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, sigma_batch(x, s[i]))
        report(callback, i, n, x, denoised)
        sigma_down, sigma_up = ancestral_step_float32(s[i], s[i + 1], eta)
        if sigma_down == 0:
            x = x + (x - denoised) / s[i] * (sigma_down - s[i])
        else:
            sigma, sigma_mid, sigma_to = lambda_points_float32(s[i], sigma_down, 0.5)  # lambda midpoint
            h = math.log(sigma) - math.log(sigma_to)  # t_next - t with t = -log(sigma)
            x_2 = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
            denoised_2 = denoiser(x_2, sigma_batch(x, sigma_mid))
            x = (sigma_to / sigma) * x - math.expm1(-h) * denoised_2
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + draw_noise(x, generator, "DPM++ 2S a") * (s_noise * sigma_up)
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: NoiseSource = None, callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M): multistep, second order in lambda = -log(sigma); first order on the first/last step."""
    s = sigma_values(sigmas)
    n = len(s) - 1
    old_denoised = None
    for i in range(n):
        denoised = denoiser(x, sigma_batch(x, s[i]))
        report(callback, i, n, x, denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            target = denoised
            if old_denoised is not None:
                r = (math.log(s[i - 1]) - math.log(s[i])) / h  # h_last / h
                target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * target
        old_denoised = denoised
    return x


def _lms_coefficient(s: list[float], i: int, j: int, order: int) -> float:
    """Integral over [s[i], s[i+1]] of the Lagrange basis polynomial through s[i], ..., s[i-order+1]
    that is 1 at s[i-j]. Exact: Gauss-Legendre with order // 2 + 1 points integrates degree order - 1."""
    nodes, weights = np.polynomial.legendre.leggauss(order // 2 + 1)
    half, mid = (s[i + 1] - s[i]) / 2, (s[i + 1] + s[i]) / 2
    total = 0.0
    for node, weight in zip(nodes, weights):
        tau = mid + half * node
        basis = 1.0
        for k in range(order):
            if k != j:
                basis *= (tau - s[i - k]) / (s[i - j] - s[i - k])
        total += weight * basis
    return float(total * half)


def sample_lms(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: NoiseSource = None, callback: StepCallback | None = None, order: int = 4,
) -> torch.Tensor:
    """Linear multistep: integrates the polynomial through the last `order` slopes dx/dsigma."""
    if order < 1:
        raise SamplingError(f"LMS order: expected >= 1, found {order}")
    s = sigma_values(sigmas)
    n = len(s) - 1
    slopes: list[torch.Tensor] = []  # newest last
    for i in range(n):
        denoised = denoiser(x, sigma_batch(x, s[i]))
        report(callback, i, n, x, denoised)
        slopes = (slopes + [(x - denoised) / s[i]])[-order:]
        current = min(i + 1, order)
        for j, d in enumerate(reversed(slopes)):
            x = x + _lms_coefficient(s, i, j, current) * d
    return x
