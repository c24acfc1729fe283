"""Test references for the samplers: an exact toy denoiser, a closed-form noise table, diffusers drivers.

The toy data distribution is, per element, an equal mixture of N(mu - A, S^2) and N(mu + A, S^2). For
``x = x0 + sigma * n`` the exact posterior mean is
``D(x, sigma) = (S^2 x + sigma^2 (mu + A tanh(A (x - mu) / v))) / v`` with ``v = S^2 + sigma^2``: nonlinear
in x, so samplers of different order give visibly different results.

Tolerances (fp32): every denoiser call and update rounds each element a handful of times at relative
EPS32 = 2^-23; the largest values in a run are at the start (sigma_max ~ 14.6 times the noise), and the
ODE steps do not amplify earlier errors (the weight on x is sigma_next / sigma <= 1). Two independent fp32
implementations therefore agree within a small multiple of EPS32 * max|x|; X_TOL_ULPS = 16 covers the
O(10) roundings of one call plus the carried error (observed: at most ~1.5 EPS32 * max|x|). Sigmas at each
call agree within a few ulps (SIGMA_RTOL): the reference forms midpoints with fp32 log/exp.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

EPS32 = 2.0**-23
X_TOL_ULPS = 16
SIGMA_RTOL = 4 * EPS32
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
LATENT_SHAPE = (2, 4, 8, 8)
MIX_OFFSET, MIX_STD = 0.8, 0.3


def toy_mean(seed: int = 0) -> torch.Tensor:
    return 0.5 * torch.randn(LATENT_SHAPE[1:], generator=torch.Generator().manual_seed(seed))


def exact_denoiser(mu: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Posterior mean E[x0 | x] of the Gaussian-mixture data for x (B, ...) and sigma (B,) or a float."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        v = MIX_STD**2 + sig**2
        mean = mu.to(x.dtype)
        return (MIX_STD**2 * x + sig**2 * (mean + MIX_OFFSET * torch.tanh(MIX_OFFSET * (x - mean) / v))) / v

    return denoise


def recording(denoiser, calls: list) -> Callable:
    """Wrap a denoiser to append (x, sigma) of every call to `calls`."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.shape == (x.shape[0],) and bool((sigma == sigma[0]).all())
        calls.append((x.clone(), float(sigma[0])))
        return denoiser(x, sigma)

    return denoise


def closed_form_log_sigmas(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012) -> np.ndarray:
    """LDM's scaled-linear table in numpy float64, alphas_cumprod stored as float32 (as in checkpoints)."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas).astype(np.float32).astype(np.float64)
    return np.log(np.sqrt((1 - alphas_cumprod) / alphas_cumprod))


def closed_form_t_to_sigma(t: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    return np.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas))


def x_tolerance(calls: list) -> float:
    return X_TOL_ULPS * EPS32 * max(float(x.abs().max()) for x, _ in calls)


def step_index(scheduler) -> int:
    return scheduler.step_index if scheduler.step_index is not None else 0


def run_diffusers(
    scheduler, x_start: torch.Tensor, denoiser, call_sigma: Callable, *, vp: bool = False,
    generator: torch.Generator | None = None, **step_kwargs,
) -> tuple[torch.Tensor, list]:
    """Drive a diffusers scheduler (after set_timesteps) with the epsilon derived from `denoiser`.

    ``call_sigma(scheduler, t)`` gives the k-diffusion sigma the scheduler evaluates at this call. With
    ``vp`` the scheduler's sample is the variance-preserving latent x / sqrt(sigma^2 + 1). Returns the final
    sample and (x, sigma) of every model call in k-diffusion scaling, like ``recording``.
    """
    calls = []
    sample = None
    for t in scheduler.timesteps:
        if sample is None:
            sample = x_start
            if vp:
                sample = x_start / math.sqrt(call_sigma(scheduler, t) ** 2 + 1)
        scheduler.scale_model_input(sample, t)  # sets the scheduler's step index / stage
        sigma = call_sigma(scheduler, t)
        x = sample * math.sqrt(sigma**2 + 1) if vp else sample
        calls.append((x.clone(), sigma))
        eps = (x - denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype))) / sigma
        kwargs = dict(step_kwargs)
        if generator is not None:
            kwargs["generator"] = generator
        sample = scheduler.step(eps, t, sample, **kwargs).prev_sample
    return sample, calls


def sigma_at_index(scheduler, t) -> float:
    return float(scheduler.sigmas[step_index(scheduler)])


def sigma_kdpm2(scheduler, t) -> float:
    table = scheduler.sigmas if scheduler.state_in_first_order else scheduler.sigmas_interpol
    return float(table[step_index(scheduler)])


def sigma_dpm_sde(scheduler, t) -> float:
    if scheduler.state_in_first_order:
        return float(scheduler.sigmas[step_index(scheduler)])
    return float(scheduler.mid_point_sigma)


def sigma_from_timestep(scheduler, t) -> float:
    a = scheduler.alphas_cumprod[int(t)].double()
    return float(((1 - a) / a).sqrt())


class BrownianNoise:
    """Noise sampler for diffusers' DPMSolverSDEScheduler restating our DPM++ SDE draws.

    Per step the scheduler asks for (sigma, sigma_mid) then (sigma, sigma_next): draw z1, z2 from the
    generator; answer z1, then the normalized Brownian increment over [sigma_next, sigma] that contains
    z1's increment over [sigma_mid, sigma].
    """

    def __init__(self, seed: int, shape: tuple[int, ...]) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.shape = shape
        self.pending = None

    def __call__(self, sigma, sigma_to) -> torch.Tensor:
        sigma, sigma_to = float(sigma), float(sigma_to)
        if self.pending is None:
            z1 = torch.randn(self.shape, generator=self.generator)
            z2 = torch.randn(self.shape, generator=self.generator)
            self.pending = (z1, z2, sigma_to)
            return z1
        z1, z2, sigma_mid = self.pending
        self.pending = None
        return (math.sqrt(sigma - sigma_mid) * z1 + math.sqrt(sigma_mid - sigma_to) * z2) / math.sqrt(sigma - sigma_to)
