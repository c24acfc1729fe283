"""What every sampler shares: sigma checks, noise sources, the ancestral step, the registry record.

Samplers follow k-diffusion's convention (``k_diffusion/sampling.py``): a denoiser maps ``(x, sigma)`` to
x0, ``x = x0 + sigma * eps``, sigmas decrease and usually end with 0. Shared pieces:

- Noise sources for per-step noise (a sampler's ``generator=`` argument): a CPU ``torch.Generator`` for
  the whole batch, one per image (A1111's per-image seeds, see
  ``tiengine.diffusion.schedules.batch_generators``), or any object with a ``randn_like(x) -> Tensor``
  method (A1111's per-image noise source, which k-diffusion reaches through its patched
  ``torch.randn_like``). Generator noise is drawn in float32 on the CPU, so a seed gives the
  same result on any device; every source's noise is then moved to x's device and dtype.
- A noise sampler ``(sigma, sigma_next) -> Tensor`` (k-diffusion's ``noise_sampler``): the SDE samplers'
  Brownian noise, see ``tiengine.diffusion.brownian``.
- ``ancestral_step``: k-diffusion's ``get_ancestral_step``. Where a sampler derives the sigma of a model
  call (a midpoint) from other sigmas, it uses the ``*_float32`` helpers, which repeat k-diffusion's
  float32 arithmetic on 0-d tensors, so the model sees the sigma A1111 gives it (float64 differs there
  by a few float32 ulps: ``sqrt(sigma_next^2 - sigma_up^2)`` cancels).
- ``SamplerInfo``: a sampler by its A1111 name with the options of A1111's sampler list
  (``samplers_k_diffusion``: "scheduler", "second_order", "discard_next_to_last_sigma", "uses_ensd",
  "brownian_noise"). Sampler modules build their ``SamplerInfo`` records from here, and
  ``tiengine.diffusion.samplers`` collects them into the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from tiengine.diffusion.names import SamplingError
from tiengine.diffusion.schedules import CondDenoiser, NoiseSchedule


@runtime_checkable
class RandnLike(Protocol):
    """A per-step noise source: standard normal noise shaped like x (B, ...), one stream per image."""

    def randn_like(self, x: torch.Tensor) -> torch.Tensor: ...


NoiseSource = torch.Generator | Sequence[torch.Generator] | RandnLike | None
# k-diffusion's noise_sampler: (sigma, sigma_next) -> unit-variance noise shaped like x.
NoiseSampler = Callable[[float, float], torch.Tensor]
# callback(step_index, total_steps, x, denoised); total_steps is None where the sampler picks its own
# steps (DPM adaptive).
StepCallback = Callable[[int, int | None, torch.Tensor, torch.Tensor], None]


def sigma_values(sigmas: torch.Tensor) -> list[float]:
    """Sigmas as Python floats after checking: 1-D, >= 2 values, positive except possibly the last."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise SamplingError(f"sigmas: expected a 1-D tensor of at least 2 values, found shape {tuple(sigmas.shape)}")
    values = sigmas.detach().to("cpu", torch.float64).tolist()
    if not all(math.isfinite(s) and s > 0 for s in values[:-1]) or not values[-1] >= 0:
        raise SamplingError(f"sigmas: expected positive finite values and a last value >= 0, found {values}")
    return values


def sigma_batch(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """sigma for every image of x: (B,) in x's float dtype (at least float32) on x's device."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device)  # (B,)


def draw_noise(x: torch.Tensor, source: NoiseSource, sampler: str) -> torch.Tensor:
    """Standard normal noise shaped like x from `source` (see the module docstring), on x's device and dtype."""
    if source is None:
        raise SamplingError(
            f"{sampler} draws noise during sampling: pass generator=torch.Generator('cpu') (or one per image, "
            "or an object with randn_like(x))"
        )
    if isinstance(source, RandnLike):
        noise = source.randn_like(x)
        if tuple(noise.shape) != tuple(x.shape):
            raise SamplingError(f"{sampler}: the noise source gave shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
        return noise.to(device=x.device, dtype=x.dtype)
    generators = [source] if isinstance(source, torch.Generator) else list(source)
    if any(not isinstance(g, torch.Generator) or g.device.type != "cpu" for g in generators):
        raise SamplingError(f"{sampler}: expected CPU generators (noise is drawn on the CPU), found {generators}")
    if isinstance(source, torch.Generator):
        noise = torch.randn(x.shape, generator=source, dtype=torch.float32)
    else:
        if len(generators) != x.shape[0]:
            raise SamplingError(f"{sampler}: expected {x.shape[0]} generators (one per image), found {len(generators)}")
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generators])
    return noise.to(device=x.device, dtype=x.dtype)  # (B, C, H, W)


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) with sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion get_ancestral_step)."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def ancestral_step_float32(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """``ancestral_step`` in float32, as k-diffusion computes it on float32 sigmas."""
    if not eta:
        return sigma_next, 0.0
    s, s_next = torch.tensor(sigma, dtype=torch.float32), torch.tensor(sigma_next, dtype=torch.float32)
    sigma_up = torch.minimum(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
    return float((s_next**2 - sigma_up**2) ** 0.5), float(sigma_up)


def log_midpoint_float32(sigma: float, sigma_to: float) -> float:
    """exp of the mean of the logs, in float32 (k-diffusion's ``sigma.log().lerp(sigma_to.log(), 0.5).exp()``)."""
    logs = torch.tensor([sigma, sigma_to], dtype=torch.float32).log()
    return float(torch.lerp(logs[0], logs[1], 0.5).exp())


def lambda_points_float32(sigma: float, sigma_to: float, r: float) -> tuple[float, float, float]:
    """k-diffusion's float32 (sigma(t), sigma(t + r h), sigma(t_to)) with t = -log(sigma), h = t_to - t:
    the DPM-Solver++ intermediate point and the float32 round trips of the ends."""
    t, t_to = -torch.tensor([sigma, sigma_to], dtype=torch.float32).log()
    t_mid = t + (t_to - t) * r
    sigma_t, sigma_mid, sigma_t_to = (-torch.stack([t, t_mid, t_to])).exp().tolist()
    return sigma_t, sigma_mid, sigma_t_to


class SamplingStopped(Exception):
    """Raised by a step callback to end sampling early (a service's interrupt or skip). `latents` (B, C, h, w):
    what the caller decodes instead of the finished result; A1111 keeps the last denoised prediction."""

    def __init__(self, latents: torch.Tensor) -> None:
        super().__init__("sampling stopped by its step callback")
        self.latents = latents


def report(callback: StepCallback | None, i: int, n: int | None, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(i, n, x, denoised)


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler by its A1111 name: the function, its model-call pattern and A1111's options for it."""

    name: str
    sample: Callable[..., torch.Tensor]
    second_order: bool  # A1111's "second_order": prompt schedules count 2 * steps model calls
    stochastic: bool  # draws noise during sampling at A1111's defaults: needs a noise source
    default_scheduler: str  # the schedule A1111's "Automatic" picks for this sampler
    discard_penultimate_sigma: bool = False  # A1111 builds steps + 1 sigmas and drops the next-to-last
    brownian_noise: bool = False  # A1111 passes a seeded Brownian-tree noise_sampler (brownian_noise_sampler)
    uses_ensd: bool = False  # A1111 writes "ENSD" (eta noise seed delta) to the infotext for it
    adaptive: bool = False  # picks its own steps (DPM adaptive): the model-call count is not known ahead
    # The sigma table the model is wrapped with, from the model's training table (LCM: its 50-step table);
    # None: the model's own. Schedules are built on it.
    sigma_table: Callable[[NoiseSchedule], NoiseSchedule] | None = None
    # Replaces eps_denoiser/v_denoiser: (model, training NoiseSchedule) -> denoiser (LCM's boundary scaling).
    model_wrapper: Callable[[Callable[..., torch.Tensor], NoiseSchedule], CondDenoiser] | None = None

    def model_calls(self, steps: int) -> int | None:
        """Denoiser calls of a run of `steps` steps whose sigmas end with 0 (the last step is first order);
        None where the sampler picks its own steps."""
        if self.adaptive:
            return None
        return 2 * steps - 1 if self.second_order else steps
