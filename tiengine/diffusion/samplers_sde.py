"""k-diffusion's SDE samplers: DPM++ SDE, DPM++ 2M SDE (midpoint and Heun), DPM++ 3M SDE.

Each restates the k-diffusion function (``k_diffusion/sampling.py``, MIT) ``sample_dpmpp_sde`` (r = 1/2),
``sample_dpmpp_2m_sde`` (``solver_type`` "midpoint" or "heun") and ``sample_dpmpp_3m_sde``, at A1111's
defaults (eta = 1, s_noise = 1). Their noise is a Brownian path queried over [sigma_next, sigma]:

- ``noise_sampler=`` ``(sigma, sigma_next) -> unit-variance increment``: what A1111 passes, a
  torchsde Brownian tree per image seeded with that image's seed
  (``tiengine.diffusion.brownian.brownian_noise_sampler``). DPM++ SDE queries it where k-diffusion does,
  at float32 sigmas rebuilt from float32 lambdas (``exp(-(-log sigma))``), so a tree gives the same noise.
- Without a noise sampler, the fallback draws from ``generator`` (any noise source of
  ``tiengine.diffusion.sampler_core``) with the same law but not the same values: DPM++ 2M SDE and 3M SDE
  draw one normal per step (increments of a Brownian path over disjoint intervals are independent);
  DPM++ SDE queries the path twice per step, over [sigma_mid, sigma] and [sigma_next, sigma], so it draws
  z1, z2 and uses z1, then ``(sqrt(sigma - sigma_mid) z1 + sqrt(sigma_mid - sigma_next) z2) /
  sqrt(sigma - sigma_next)``, the normalized increments of one Brownian path.

Sigmas usually end with 0: the last step returns the denoised x0 (2M/3M SDE) or is an Euler step (DPM++
SDE). ``callback`` runs once per step after its first denoiser call (``tiengine.diffusion.samplers_k``).
"""

from __future__ import annotations

import math

import torch

from tiengine.diffusion.names import SamplingError
from tiengine.diffusion.sampler_core import (
    NoiseSampler,
    NoiseSource,
    StepCallback,
    ancestral_step,
    draw_noise,
    lambda_points_float32,
    report,
    sigma_batch,
    sigma_values,
)
from tiengine.diffusion.schedules import Denoiser

SOLVER_TYPES = ("midpoint", "heun")  # k-diffusion's solver_type values for DPM++ 2M SDE


def _drawn_noise(x: torch.Tensor, generator: NoiseSource, name: str) -> NoiseSampler:
    """The fallback noise sampler: one fresh normal per query."""
    return lambda sigma, sigma_next: draw_noise(x, generator, name)


def sample_dpmpp_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: NoiseSource = None,
    noise_sampler: NoiseSampler | None = None, callback: StepCallback | None = None, eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++ SDE (stochastic DPM-Solver++(2S), r = 1/2): two calls per step, Euler on the last."""
    s = sigma_values(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, sigma_batch(x, s[i]))
        report(callback, i, n, x, denoised)
        if s[i + 1] == 0:
            x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
            continue
        sigma, sigma_mid, sigma_next = lambda_points_float32(s[i], s[i + 1], 0.5)
        noise_mid = noise_next = None  # unit increments over [sigma_mid, sigma] and [sigma_next, sigma]
        if eta and noise_sampler is not None:
            noise_mid, noise_next = noise_sampler(sigma, sigma_mid), noise_sampler(sigma, sigma_next)
        elif eta:
            noise_mid, z2 = draw_noise(x, generator, "DPM++ SDE"), draw_noise(x, generator, "DPM++ SDE")
            noise_next = (math.sqrt(sigma - sigma_mid) * noise_mid + math.sqrt(sigma_mid - sigma_next) * z2) \
                / math.sqrt(sigma - sigma_next)
        # step 1: DPM-Solver++(1) (an Euler step in sigma) to sigma_down, plus noise: reaches sigma_mid
        sigma_down, sigma_up = ancestral_step(sigma, sigma_mid, eta)
        x_2 = denoised + (x - denoised) * (sigma_down / sigma)
        if sigma_up > 0:
            x_2 = x_2 + noise_mid * (s_noise * sigma_up)
        denoised_2 = denoiser(x_2, sigma_batch(x, sigma_mid))
        # step 2: from x again with the midpoint x0 (k-diffusion's (1 - 1/(2r)) x0 + 1/(2r) x0_mid, r = 1/2)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised_2 + (x - denoised_2) * (sigma_down / sigma)
        if sigma_up > 0:
            x = x + noise_next * (s_noise * sigma_up)
    return x


def sample_dpmpp_2m_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: NoiseSource = None,
    noise_sampler: NoiseSampler | None = None, callback: StepCallback | None = None, eta: float = 1.0,
    s_noise: float = 1.0, solver_type: str = "midpoint",
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE: one call and one noise query per step; the second-order correction from the
    previous x0 is the midpoint or the Heun form (A1111's "DPM++ 2M SDE Heun")."""
    if solver_type not in SOLVER_TYPES:
        raise SamplingError(f"DPM++ 2M SDE solver_type: expected one of {SOLVER_TYPES}, found {solver_type!r}")
    noise = noise_sampler or _drawn_noise(x, generator, "DPM++ 2M SDE")
    s = sigma_values(sigmas)
    n = len(s) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        denoised = denoiser(x, sigma_batch(x, s[i]))
        report(callback, i, n, x, denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            eta_h = eta * h
            x = (s[i + 1] / s[i] * math.exp(-eta_h)) * x - math.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                if solver_type == "heun":
                    weight = (math.expm1(-h - eta_h) / (h + eta_h) + 1) * h / h_last
                else:
                    weight = -0.5 * math.expm1(-h - eta_h) * h / h_last
                x = x + weight * (denoised - old_denoised)
            if eta:
                x = x + noise(s[i], s[i + 1]) * (s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
            h_last = h
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde_heun(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: NoiseSource = None,
    noise_sampler: NoiseSampler | None = None, callback: StepCallback | None = None, eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM++ 2M SDE with the Heun correction (A1111's "DPM++ 2M SDE Heun": solver_type="heun")."""
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, generator=generator, noise_sampler=noise_sampler,
                               callback=callback, eta=eta, s_noise=s_noise, solver_type="heun")


def sample_dpmpp_3m_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: NoiseSource = None,
    noise_sampler: NoiseSampler | None = None, callback: StepCallback | None = None, eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: third-order multistep from the last three x0 (second order on the second
    step, first order on the first), one noise query per step."""
    noise = noise_sampler or _drawn_noise(x, generator, "DPM++ 3M SDE")
    s = sigma_values(sigmas)
    n = len(s) - 1
    denoised_1 = denoised_2 = None  # x0 of the previous step and the one before
    h_1 = h_2 = None  # their step sizes in lambda
    for i in range(n):
        denoised = denoiser(x, sigma_batch(x, s[i]))
        report(callback, i, n, x, denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        h = math.log(s[i]) - math.log(s[i + 1])
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:
            x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
        if eta:
            x = x + noise(s[i], s[i + 1]) * (s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x
