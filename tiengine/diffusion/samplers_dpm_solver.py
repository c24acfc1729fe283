"""DPM-Solver (Lu et al. 2022, arXiv:2206.00927) as k-diffusion runs it: "DPM fast" and "DPM adaptive".

Restates k-diffusion's ``DPMSolver`` with ``sample_dpm_fast`` and ``sample_dpm_adaptive``
(``k_diffusion/sampling.py``, MIT). Time is t = -log(sigma); the solver works on
eps = (x - x0) / sigma. First-, second- and third-order steps from t to t_next (h = t_next - t):

- order 1: ``x - sigma(t_next) expm1(h) eps``;
- order 2 (r1 = 1/2, or 1/3 inside the adaptive order-3 pair): one more eps at s1 = t + r1 h;
- order 3 (r1 = 1/3, r2 = 2/3): eps at s1 and s2.

DPM fast: ``steps`` model calls split into m = steps // 3 + 1 intervals, evenly spaced in t, of order 3
(then 2 and 1, or steps % 3 last). DPM adaptive: order 3 (with order 2 as the error estimate) and a PID
step-size controller (rtol 0.05, atol 0.0078, h_init 0.05, integral gain 1, accept_safety 0.81): the
number of model calls follows the error, measured over the whole batch as in k-diffusion.

A1111 runs both with eta = 1 (its "eta_ancestral" option; k-diffusion's own default is 0): each step
lands at the ancestral sigma_down and adds noise of size sigma_up from the per-step noise source
(``generator``, see ``tiengine.diffusion.sampler_core``), drawn where k-diffusion draws it (every
step; adaptive: every accepted step). Neither goes to sigma 0: they integrate from sigma_max to sigma_min
and return x there. A1111 passes sigma_max = sigmas[0], sigma_min = the last positive sigma and
steps = len(sigmas) - 1 for img2img, and the model's sigma_min / sigma_max (whatever the schedule) for
txt2img: the defaults here follow ``sigmas``; pass ``sigma_min`` / ``sigma_max`` for the latter.

Times and step coefficients are float32 scalars, as in k-diffusion, so the adaptive controller takes
the same accept/reject decisions. ``callback(i, total, x, denoised)`` runs after each step's first model
call with the step's input x (total: the number of steps; None for adaptive).
"""

from __future__ import annotations

import math

import torch

from tiengine.diffusion.names import SamplingError
from tiengine.diffusion.sampler_core import (
    NoiseSource,
    StepCallback,
    draw_noise,
    report,
    sigma_batch,
    sigma_values,
)
from tiengine.diffusion.schedules import Denoiser

F32 = torch.float32


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _time(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _ancestral(t: torch.Tensor, t_next: torch.Tensor, t_end: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(time reached, noise size): the step lands at min(t_end, t(sigma_down)) and adds the rest of
    sigma(t_next)'s variance (k-diffusion's DPM-Solver ancestral step)."""
    if not eta:
        return t_next, torch.zeros((), dtype=F32)
    sigma, sigma_next = _sigma(t), _sigma(t_next)
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    t_reached = torch.minimum(t_end, _time(sigma_down))
    return t_reached, (sigma_next**2 - _sigma(t_reached) ** 2) ** 0.5


class _Solver:
    """eps evaluations of one step, cached by role ("eps", "eps_r1", "eps_r2") as k-diffusion does."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.cache: dict[str, torch.Tensor] = {}
        self.calls = 0

    def eps(self, key: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if key not in self.cache:
            sigma = _sigma(t)
            self.calls += 1
            self.cache[key] = (x - self.denoiser(x, sigma_batch(x, float(sigma)))) / sigma.to(x.device)
        return self.cache[key]

    def order_1(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        h = t_next - t
        return x - (_sigma(t_next) * h.expm1()).to(x.device) * self.eps("eps", x, t)

    def order_2(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, r1: float = 1 / 2) -> torch.Tensor:
        h = t_next - t
        eps = self.eps("eps", x, t)
        s1 = t + r1 * h
        u1 = x - (_sigma(s1) * (r1 * h).expm1()).to(x.device) * eps
        eps_r1 = self.eps("eps_r1", u1, s1)
        first = (_sigma(t_next) * h.expm1()).to(x.device)
        second = (_sigma(t_next) / (2 * r1) * h.expm1()).to(x.device)
        return x - first * eps - second * (eps_r1 - eps)

    def order_3(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        r1, r2 = 1 / 3, 2 / 3
        h = t_next - t
        eps = self.eps("eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - (_sigma(s1) * (r1 * h).expm1()).to(x.device) * eps
        eps_r1 = self.eps("eps_r1", u1, s1)
        u2 = (x - (_sigma(s2) * (r2 * h).expm1()).to(x.device) * eps
              - (_sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1)).to(x.device) * (eps_r1 - eps))
        eps_r2 = self.eps("eps_r2", u2, s2)
        first = (_sigma(t_next) * h.expm1()).to(x.device)
        second = (_sigma(t_next) / r2 * (h.expm1() / h - 1)).to(x.device)
        return x - first * eps - second * (eps_r2 - eps)

    def step(self, order: int, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        return (self.order_1, self.order_2, self.order_3)[order - 1](x, t, t_next)


def _span(sigmas: torch.Tensor, sigma_min: float | None, sigma_max: float | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(t_start, t_end, steps) from the schedule (A1111's img2img arguments) or the given bounds."""
    s = sigma_values(sigmas)
    positive = [value for value in s if value > 0]
    high = s[0] if sigma_max is None else sigma_max
    low = positive[-1] if sigma_min is None else sigma_min
    if not (0 < low <= high):
        raise SamplingError(f"DPM-Solver: expected 0 < sigma_min <= sigma_max, found {low}, {high}")
    return _time(torch.tensor(high, dtype=F32)), _time(torch.tensor(low, dtype=F32)), len(s) - 1


def sample_dpm_fast(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: NoiseSource = None,
    callback: StepCallback | None = None, eta: float = 1.0, s_noise: float = 1.0,
    sigma_min: float | None = None, sigma_max: float | None = None,
) -> torch.Tensor:
    """DPM-Solver-fast: len(sigmas) - 1 model calls in fixed third-order steps, evenly spaced in log sigma."""
    t_start, t_end, calls = _span(sigmas, sigma_min, sigma_max)
    intervals = calls // 3 + 1
    times = torch.linspace(float(t_start), float(t_end), intervals + 1, dtype=F32)  # (m + 1,)
    orders = [3] * (intervals - 2) + [2, 1] if calls % 3 == 0 else [3] * (intervals - 1) + [calls % 3]
    for i, order in enumerate(orders):
        solver = _Solver(denoiser)
        t, t_next = times[i], times[i + 1]
        t_reached, noise_size = _ancestral(t, t_next, t_end, eta)
        eps = solver.eps("eps", x, t)
        report(callback, i, len(orders), x, x - _sigma(t).to(x.device) * eps)
        x = solver.step(order, x, t, t_reached)
        if eta:
            x = x + draw_noise(x, generator, "DPM fast") * float(noise_size * s_noise)
    return x


class _StepSizeController:
    """k-diffusion's PIDStepSizeController: h grows or shrinks with the inverse error's history."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float,
                 accept_safety: float, eps: float = 1e-8) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errors: list[float] = []  # inverse errors, newest first

    def propose_step(self, error: float) -> bool:
        inverse = 1 / (error + self.eps)
        if not self.errors:
            self.errors = [inverse, inverse, inverse]
        self.errors[0] = inverse
        factor = self.errors[0] ** self.b1 * self.errors[1] ** self.b2 * self.errors[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errors[2], self.errors[1] = self.errors[1], self.errors[0]
        self.h *= factor
        return accept


def sample_dpm_adaptive(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: NoiseSource = None,
    callback: StepCallback | None = None, eta: float = 1.0, s_noise: float = 1.0,
    sigma_min: float | None = None, sigma_max: float | None = None, order: int = 3, rtol: float = 0.05,
    atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
    accept_safety: float = 0.81,
) -> torch.Tensor:
    """DPM-Solver-23 (order 3) or -12 (order 2) with adaptive steps from sigma_max to sigma_min."""
    if order not in (2, 3):
        raise SamplingError(f"DPM adaptive order: expected 2 or 3, found {order}")
    t, t_end, _ = _span(sigmas, sigma_min, sigma_max)
    controller = _StepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    x_previous = x
    step = 0
    while t < t_end - 1e-5:
        solver = _Solver(denoiser)
        t_next = torch.minimum(t_end, t + controller.h)
        t_reached, noise_size = _ancestral(t, t_next, t_end, eta)
        eps = solver.eps("eps", x, t)
        report(callback, step, None, x, x - _sigma(t).to(x.device) * eps)
        if order == 2:
            x_low, x_high = solver.order_1(x, t, t_reached), solver.order_2(x, t, t_reached)
        else:
            x_low, x_high = solver.order_2(x, t, t_reached, r1=1 / 3), solver.order_3(x, t, t_reached)
        delta = torch.maximum(torch.tensor(atol), rtol * torch.maximum(x_low.abs(), x_previous.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if controller.propose_step(float(error)):
            x_previous = x_low
            x = x_high
            if eta:
                x = x + draw_noise(x, generator, "DPM adaptive") * float(noise_size * s_noise)
            t = t_next
        step += 1
    return x
