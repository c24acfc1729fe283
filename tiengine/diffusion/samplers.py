"""Samplers as pure functions over a denoiser ``(x, sigma) -> x0`` and their registry.

Each sampler is ``sample_xxx(denoiser, x, sigmas, *, generator=None, callback=None, ...) -> x`` in
k-diffusion's convention (``x = x0 + sigma * eps``; txt2img starts from ``noise * sigmas[0]``; sigmas
decrease and end with 0). The update rules restate k-diffusion's ``sample_euler``,
``sample_euler_ancestral``, ``sample_heun``, ``sample_dpm_2``, ``sample_dpmpp_2m``, ``sample_dpmpp_2m_sde``
(midpoint), ``sample_dpmpp_sde`` (r = 1/2) and ``sample_lms`` (order 4), with A1111's defaults (eta = 1,
s_noise = 1, no churn). DDIM is the DDIM update written in sigma space: with eta = 0 it is the Euler
step, with eta > 0 the ancestral step with ``sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 /
sigma^2)`` (A1111's DDIM eta default 0). Second-order samplers (Heun, DPM2, DPM++ SDE) call the
denoiser twice per step except on the last step to sigma 0, which is an Euler step: 2N - 1 calls.

Randomness comes only from ``generator``: one CPU ``torch.Generator`` for the whole batch, or one per
image (see ``tiengine.diffusion.schedules.batch_generators``). Noise is drawn in float32 on the CPU and then moved
to x's device and dtype, so a seed gives the same result on any device. Ancestral samplers draw one
(B, C, H, W) normal per step with sigma_up > 0. SDE noise is NOT k-diffusion's torchsde Brownian tree
(whose stream cannot be reproduced without it): it is drawn from the generator with the same law.
DPM++ 2M SDE draws one normal per step (increments of a Brownian path over disjoint intervals are
independent). DPM++ SDE queries the path twice per step, over [sigma_mid, sigma] and [sigma_next, sigma]:
with ``sigma_mid = sqrt(sigma * sigma_next)``: it draws z1, z2 and uses z1, then ``(sqrt(sigma - sigma_mid)
z1 + sqrt(sigma_mid - sigma_next) z2) / sqrt(sigma - sigma_next)``, the normalized increments of one
Brownian path. LMS integrates its Lagrange polynomials exactly (Gauss-Legendre) where k-diffusion calls
scipy's quad; both are exact for these polynomials.

``callback(step_index, total_steps, x, denoised)`` runs once per step, after the step's first denoiser
call, with the step's input x and that call's x0 (k-diffusion's order).

Guidance (classifier-free guidance, AND composition, prompt schedules) wraps a conditional denoiser
into a denoiser in ``tiengine.diffusion.guidance``; its names are importable from here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch

# Re-exported: the guidance wrappers lived here first.
from tiengine.diffusion.guidance import (  # noqa: F401
    PromptSchedule,
    guided_denoiser,
    scheduled_cond,
    scheduled_guided_denoiser,
)
from tiengine.diffusion.schedules import Denoiser, SamplingError

Generators = torch.Generator | Sequence[torch.Generator] | None
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def _sigma_list(sigmas: torch.Tensor) -> list[float]:
    """Sigmas as Python floats after checking: 1-D, >= 2 values, positive except possibly the last."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise SamplingError(f"sigmas: expected a 1-D tensor of at least 2 values, found shape {tuple(sigmas.shape)}")
    values = sigmas.detach().to("cpu", torch.float64).tolist()
    if not all(math.isfinite(s) and s > 0 for s in values[:-1]) or not values[-1] >= 0:
        raise SamplingError(f"sigmas: expected positive finite values and a last value >= 0, found {values}")
    return values


def _sigma_batch(x: torch.Tensor, sigma: float) -> torch.Tensor:
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device)  # (B,)


def _randn_like(x: torch.Tensor, generator: Generators, sampler: str) -> torch.Tensor:
    """Standard normal noise shaped like x: float32 on the CPU from the generator(s), then to x; or the next
    draw of a noise source with a `randn_like(x)` method (tiengine.diffusion.rng.ImageNoise)."""
    if hasattr(generator, "randn_like"):
        return generator.randn_like(x)
    if generator is None:
        raise SamplingError(f"{sampler} draws noise during sampling: pass generator=torch.Generator('cpu')")
    generators = [generator] if isinstance(generator, torch.Generator) else list(generator)
    if any(g.device.type != "cpu" for g in generators):
        raise SamplingError(f"{sampler}: expected CPU generators (noise is drawn on the CPU), found {generators}")
    if isinstance(generator, torch.Generator):
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    else:
        if len(generator) != x.shape[0]:
            raise SamplingError(f"{sampler}: expected {x.shape[0]} generators (one per image), found {len(generator)}")
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generator])
    return noise.to(device=x.device, dtype=x.dtype)  # (B, C, H, W)


def _ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) with sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion get_ancestral_step)."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _report(callback: StepCallback | None, i: int, n: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(i, n, x, denoised)


def sample_euler(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: Generators = None, callback: StepCallback | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, _sigma_batch(x, s[i]))
        _report(callback, i, n, x, denoised)
        x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
    return x


def _ancestral_loop(
    name: str, denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, eta: float, s_noise: float,
    generator: Generators, callback: StepCallback | None,
) -> torch.Tensor:
    s = _sigma_list(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, _sigma_batch(x, s[i]))
        _report(callback, i, n, x, denoised)
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
        x = denoised + (x - denoised) / s[i] * sigma_down
        if sigma_up > 0:
            x = x + _randn_like(x, generator, name) * (s_noise * sigma_up)
    return x


def sample_euler_ancestral(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: Generators = None, callback: StepCallback | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler ancestral ("Euler a"): an Euler step to sigma_down, then fresh noise of size sigma_up."""
    return _ancestral_loop("Euler a", denoiser, x, sigmas, eta, s_noise, generator, callback)


def sample_ddim(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: Generators = None, callback: StepCallback | None = None, eta: float = 0.0,
) -> torch.Tensor:
    """DDIM in sigma space: x_next = x0 + sigma_down * eps + sigma_up * z with eps = (x - x0) / sigma.

    Dividing the DDIM update by sqrt(alphas_cumprod_next) gives exactly this with sigma_up =
    eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2), sigma_down = sqrt(sigma_next^2 - sigma_up^2).
    """
    return _ancestral_loop("DDIM", denoiser, x, sigmas, eta, 1.0, generator, callback)


def sample_heun(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: Generators = None, callback: StepCallback | None = None,
) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 1 without churn); Euler on the last step to 0."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, _sigma_batch(x, s[i]))
        _report(callback, i, n, x, denoised)
        d = (x - denoised) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = (x_2 - denoiser(x_2, _sigma_batch(x, s[i + 1]))) / s[i + 1]
        x = x + (d + d_2) / 2 * dt
    return x


def sample_dpm_2(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: Generators = None, callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver-2 in k-diffusion's form: the slope at the log-midpoint sigma; Euler on the last step."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, _sigma_batch(x, s[i]))
        _report(callback, i, n, x, denoised)
        d = (x - denoised) / s[i]
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - s[i])
            continue
        sigma_mid = math.exp((math.log(s[i]) + math.log(s[i + 1])) / 2)
        x_2 = x + d * (sigma_mid - s[i])
        d_2 = (x_2 - denoiser(x_2, _sigma_batch(x, sigma_mid))) / sigma_mid
        x = x + d_2 * (s[i + 1] - s[i])
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: Generators = None, callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M): multistep, second order in lambda = -log(sigma); first order on the first/last step."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    old_denoised = None
    for i in range(n):
        denoised = denoiser(x, _sigma_batch(x, s[i]))
        _report(callback, i, n, x, denoised)
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


def sample_dpmpp_2m_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: Generators = None, callback: StepCallback | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint correction; one noise draw per step to a nonzero sigma."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        denoised = denoiser(x, _sigma_batch(x, s[i]))
        _report(callback, i, n, x, denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            eta_h = eta * h
            x = (s[i + 1] / s[i] * math.exp(-eta_h)) * x - math.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                x = x - (0.5 * math.expm1(-h - eta_h) * h / h_last) * (denoised - old_denoised)
            if eta:
                noise_scale = s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
                x = x + _randn_like(x, generator, "DPM++ 2M SDE") * noise_scale
            h_last = h
        old_denoised = denoised
    return x


def sample_dpmpp_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: Generators = None, callback: StepCallback | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++ SDE (stochastic DPM-Solver++(2S), r = 1/2): two calls per step, Euler on the last."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, _sigma_batch(x, s[i]))
        _report(callback, i, n, x, denoised)
        if s[i + 1] == 0:
            x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
            continue
        sigma_mid = math.sqrt(s[i] * s[i + 1])  # lambda midpoint: exp(-(t + h / 2)) with t = -log(sigma)
        z1 = _randn_like(x, generator, "DPM++ SDE") if eta else None
        z2 = _randn_like(x, generator, "DPM++ SDE") if eta else None
        # step 1: DPM-Solver++(1) (an Euler step in sigma) to sigma_down, plus noise: reaches sigma_mid
        sigma_down, sigma_up = _ancestral_step(s[i], sigma_mid, eta)
        x_2 = denoised + (x - denoised) * (sigma_down / s[i])
        if sigma_up > 0:
            x_2 = x_2 + z1 * (s_noise * sigma_up)
        denoised_2 = denoiser(x_2, _sigma_batch(x, sigma_mid))
        # step 2: from x again with the midpoint x0 (k-diffusion's (1 - 1/(2r)) x0 + 1/(2r) x0_mid, r = 1/2)
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
        x = denoised_2 + (x - denoised_2) * (sigma_down / s[i])
        if sigma_up > 0:
            # normalized Brownian increment over [sigma_next, sigma], sharing z1's part over [sigma_mid, sigma]
            w = (math.sqrt(s[i] - sigma_mid) * z1 + math.sqrt(sigma_mid - s[i + 1]) * z2) / math.sqrt(s[i] - s[i + 1])
            x = x + w * (s_noise * sigma_up)
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
    generator: Generators = None, callback: StepCallback | None = None, order: int = 4,
) -> torch.Tensor:
    """Linear multistep: integrates the polynomial through the last `order` slopes dx/dsigma."""
    if order < 1:
        raise SamplingError(f"LMS order: expected >= 1, found {order}")
    s = _sigma_list(sigmas)
    n = len(s) - 1
    slopes: list[torch.Tensor] = []  # newest last
    for i in range(n):
        denoised = denoiser(x, _sigma_batch(x, s[i]))
        _report(callback, i, n, x, denoised)
        slopes = (slopes + [(x - denoised) / s[i]])[-order:]
        current = min(i + 1, order)
        for j, d in enumerate(reversed(slopes)):
            x = x + _lms_coefficient(s, i, j, current) * d
    return x


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler by its A1111 name: the function, its model-call pattern and A1111's schedule choices."""

    name: str
    sample: Callable[..., torch.Tensor]
    second_order: bool  # two denoiser calls per step: prompt schedules count 2 * steps
    stochastic: bool  # draws noise during sampling at A1111's defaults: needs a generator (DDIM only with eta > 0)
    default_scheduler: str  # A1111's "Automatic" schedule for this sampler
    discard_penultimate_sigma: bool = False  # A1111 builds steps + 1 sigmas and drops the next-to-last

    def model_calls(self, steps: int) -> int:
        """Denoiser calls of a run of `steps` steps whose sigmas end with 0 (the last step is first order)."""
        return 2 * steps - 1 if self.second_order else steps


SAMPLERS: Mapping[str, SamplerInfo] = MappingProxyType({
    info.name: info
    for info in (
        SamplerInfo("Euler", sample_euler, False, False, "normal"),
        SamplerInfo("Euler a", sample_euler_ancestral, False, True, "normal"),
        SamplerInfo("Heun", sample_heun, True, False, "normal"),
        SamplerInfo("DPM2", sample_dpm_2, True, False, "normal", discard_penultimate_sigma=True),
        SamplerInfo("DPM++ 2M", sample_dpmpp_2m, False, False, "karras"),
        SamplerInfo("DPM++ 2M SDE", sample_dpmpp_2m_sde, False, True, "exponential"),
        SamplerInfo("DPM++ SDE", sample_dpmpp_sde, True, True, "karras"),
        SamplerInfo("LMS", sample_lms, False, False, "normal"),
        SamplerInfo("DDIM", sample_ddim, False, False, "ddim_uniform"),
    )
})


def get_sampler(name: str) -> SamplerInfo:
    """The registry entry for an A1111 sampler name (exact spelling, e.g. "DPM++ 2M")."""
    info = SAMPLERS.get(name)
    if info is None:
        raise SamplingError(f"sampler: expected one of {sorted(SAMPLERS)}, found {name!r}")
    return info
