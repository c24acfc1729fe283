"""A1111's timestep samplers (DDIM, PLMS, UniPC) as A1111 runs them, over a k-diffusion denoiser.

Where the names and constants come from: A1111's ``modules/sd_samplers_timesteps.py`` (timestep list, txt2img and
img2img starts, eta), ``modules/sd_samplers_timesteps_impl.py`` (the DDIM and PLMS loops, UniPC's call) and
``modules/models/diffusion/uni_pc/uni_pc.py`` (UniPC: Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector
Framework", multistep B(h) variants, with DPM-Solver's ``NoiseScheduleVP("discrete")``); the options and defaults
are A1111's (``eta_ddim`` 0, ``uni_pc_variant`` "bh1", ``uni_pc_skip_type`` "time_uniform", ``uni_pc_order`` 3,
``uni_pc_lower_order_final`` True).

Parameterisations. A1111 runs these samplers in LDM form: ``x_ldm = sqrt(a) x0 + sqrt(1 - a) eps`` with
``a = alphas_cumprod[t]``, the model called as ``model(x_ldm, t)`` and returning eps (a v model's output becomes
``eps = sqrt(a) v + sqrt(1 - a) x_ldm``). tiengine's denoiser maps ``(x, sigma) -> x0`` with ``x = x0 + sigma eps``;
the two meet at ``sigma = sqrt((1 - a) / a)``, ``x = x_ldm / sqrt(a) = x_ldm * sqrt(1 + sigma^2)`` and
``eps = (x - x0) / sigma``. Called at ``sigma = schedule.sigmas[t]`` in float64, ``eps_denoiser`` / ``v_denoiser``
give the model exactly timestep t and input x_ldm (to rounding): A1111's model call. The samplers keep x_ldm in
float32 (or x's dtype if wider), call the denoiser with x's dtype, and return the LDM latent A1111 decodes.

The sigmas a sampler here takes: ``[sigma_start, sigma_1, ..., sigma_n, sigma_end]`` (1-D, float64 so that each
value is exactly the table's sigma at its timestep). x is the k-diffusion latent at sigma_start; the n model calls
(one per step, PLMS adds one on its first step) are at sigma_1..sigma_n; the result is the LDM latent at
sigma_end. The lists come from ``ddim_sigmas`` / ``unipc_sigmas``; ``TimestepSamplerInfo.prepare(schedule, steps,
strength)`` gives a run's list and its sample function (UniPC's with the model's schedule bound):

- Timesteps (A1111 ``get_timesteps``): ``ts = clip(range(0, T, T // steps) + 1, 0, T - 1)``, increasing, T = 1000
  (A1111 writes 1000; here the schedule's T). 20 steps: 1, 51, ..., 951 (20 values); 30 steps: 1, 34, ..., 991
  (31 values). DDIM and PLMS step from ts[k] to ts[k - 1] for k = len(ts) - 1 .. 1, so they call the model
  len(ts) - 1 times (one fewer than `steps` when T % steps == 0) and end at alphas_cumprod[ts[0] = 1], not at 0.
- txt2img starts from the DDPM prior ``x_ldm = noise``: sigma = infinity in k-diffusion terms. The lists stand
  for it with PRIOR_SIGMA = 2^12, where ``noise * sigma / sqrt(1 + sigma^2) == noise`` exactly in float32 and
  float16, so the engine's usual ``x = noise * sigmas[0]`` gives A1111's start.
- img2img (A1111 ``sample_img2img``): ``t_enc = int(min(strength, 0.999) * steps)``; the latent is noised to
  ts[t_enc] (``latent + noise * sigmas[0]`` in k-diffusion form), but sampling runs over ts[:t_enc], whose first
  call is at ts[t_enc - 1] (A1111's own off-by-one, kept): t_enc - 1 DDIM/PLMS steps. UniPC runs t_enc steps from
  ``t_start = (ts[t_enc - 1] + 1) / T``. A1111's ``img2img_fix_steps`` and "always discard next-to-last sigma"
  options (both off by default) are not modelled; ``ddim_discretize`` is no longer read by A1111 (uniform only).

Update rules (LDM form; a_t at the current timestep, a_prev at the next one):

- DDIM (Song et al. 2021, eq. 12): ``x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)``,
  ``s = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev))``,
  ``x_next = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z``; z from ``generator`` only when eta > 0.
- PLMS (Liu et al. 2022, pseudo linear multistep): the same step with eta = 0 and eps replaced by e': the first
  step is pseudo improved Euler, ``e' = (eps + eps(x_next, t_next)) / 2`` (a second model call at the next
  timestep); then Adams-Bashforth of order 2, 3, 4 over the last model eps values:
  ``(3 e0 - e1) / 2``, ``(23 e0 - 16 e1 + 5 e2) / 12``, ``(55 e0 - 59 e1 + 37 e2 - 9 e3) / 24``.
- UniPC (multistep, data prediction, no thresholding): continuous time t in [1/T, 1]; UniPC's own schedule
  interpolates ``log alpha`` linearly between ``0.5 log alphas_cumprod[j]`` at ``t = (j + 1) / T``, so the model
  time is ``m = t T - 1``; ``sigma_vp = sqrt(1 - alpha^2)``, ``lambda = log(alpha / sigma_vp)``. The grid
  (skip_type) is uniform in t ("time_uniform"), in sqrt(t) ("time_quadratic") or in lambda ("logSNR"), from t = 1
  to 1/T in steps = len(ts) steps (31 for 30 steps), with `steps` model calls. The list holds the table sigma at
  each m (log-sigma interpolation, what ``sigma_to_t`` inverts), so the model sees A1111's fractional timestep;
  the solver takes alpha at m from UniPC's log-alpha interpolation when given the schedule (``prepare`` binds
  it), else ``1 / sqrt(1 + sigma^2)`` (up to ~5e-4 apart at fractional timesteps above 10). One model call at
  the first point, then per step from s to t, with ``h = lambda_t - lambda_s`` and the stored data predictions
  m0 (at s), m_k: predictor ``x_t = (sigma_vp_t / sigma_vp_s) x - alpha_t (e^-h - 1) m0 - alpha_t B(h) sum_k
  rho_k D_k`` with ``D_k = (m_k - m0) / r_k``, ``r_k = (lambda_k - lambda_s) / h`` and B(h) = -h ("bh1") or
  e^-h - 1 ("bh2"); except on the last step, a model call at the predicted x_t (its data prediction becomes the
  next step's m0) and the corrector, the same formula with one more point (r = 1, D = m_t - m0) and its own rho.
  rho solves ``sum_k r_k^(p-1) rho_k = p! g_(p+1)(-h) / B(h)`` (p = 1..K; ``g_1(u) = e^u - 1``,
  ``g_(k+1)(u) = g_k(u) / u - 1 / k!``), and is 0.5 for a single point (the order-2 predictor, order-1
  corrector). The first order - 1 steps warm up with orders 1, 2, ...; lower_order_final lowers the order of
  the last steps to ``steps + 1 - step``.

Where this differs from A1111 by more than float rounding: for v-prediction models under UniPC, A1111 converts v
to eps at the integer part of the fractional timestep (``sqrt_alphas_cumprod[t.int()]``), tiengine's v_denoiser
at the timestep itself (the conversion is hidden in the denoiser). A1111 computes UniPC's schedule in float32,
here in float64.

Infotext (A1111): "Eta DDIM: <eta>" when DDIM's eta is not 0; "Schedule type" is the UI's value
("Automatic") since these samplers ignore the scheduler; the UniPC options are not written.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tiengine.diffusion.sampler_core import SamplerInfo, StepCallback
from tiengine.diffusion.schedules import Denoiser, NoiseSchedule, SamplingError

PRIOR_SIGMA = 4096.0  # 2^12: stands for sigma = infinity (x_ldm = noise); 1 + 2^24 rounds to 2^24 in float32
UNIPC_VARIANTS: tuple[str, ...] = ("bh1", "bh2")  # A1111 also lists "vary_coeff", broken for batches > 1 there
UNIPC_SKIP_TYPES: tuple[str, ...] = ("time_uniform", "time_quadratic", "logSNR")
A1111_NUM_TRAIN_TIMESTEPS = 1000  # A1111's get_timesteps hard-codes T = 1000 (every SD model's T)

NoiseSource = torch.Generator | Sequence[torch.Generator] | object | None  # or anything with randn_like(x)


# ------------------------------------------------------------------------------------------- timestep lists


def timestep_list(steps: int, num_train_timesteps: int = A1111_NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """A1111's timesteps for `steps` steps: ``clip(range(0, T, T // steps) + 1, 0, T - 1)`` (int64, increasing)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_train_timesteps:
        raise SamplingError(f"steps: expected an integer in [1, {num_train_timesteps}], found {steps!r}")
    spacing = num_train_timesteps // steps
    return (torch.arange(0, num_train_timesteps, spacing) + 1).clamp(0, num_train_timesteps - 1)  # (ceil(T/spacing),)


def _img2img_steps(steps: int, strength: float) -> int:
    """A1111's t_enc: the number of img2img timesteps, ``int(min(strength, 0.999) * steps)``."""
    if not 0.0 <= strength <= 1.0:
        raise SamplingError(f"denoising strength: expected a value in [0, 1], found {strength}")
    return int(min(strength, 0.999) * steps)


def ddim_sigmas(schedule: NoiseSchedule, steps: int, strength: float | None = None) -> torch.Tensor:
    """Sigmas (float64) for DDIM and PLMS: txt2img (strength None) ``[PRIOR_SIGMA, s(ts[-1]), ..., s(ts[0])]``;
    img2img ``[s(ts[t_enc]), s(ts[t_enc - 1]), ..., s(ts[0])]`` (for t_enc = 0, ``[s(ts[0]), s(ts[0])]``: no call)."""
    timesteps = timestep_list(steps, schedule.num_train_timesteps)
    if strength is None:
        return torch.cat([torch.tensor([PRIOR_SIGMA], dtype=torch.float64), schedule.sigmas[timesteps.flip(0)]])
    t_enc = _img2img_steps(steps, strength)
    if t_enc == 0:
        return schedule.sigmas[timesteps[:1]].repeat(2)  # (2,): A1111 returns the noised latent unchanged
    return schedule.sigmas[timesteps[: t_enc + 1].flip(0)]  # (t_enc + 1,)


def _log_alpha(schedule: NoiseSchedule, model_time: torch.Tensor) -> torch.Tensor:
    """UniPC's log alpha at a (fractional) model timestep: linear between 0.5 log alphas_cumprod[j] and [j + 1]
    (DPM-Solver's discrete NoiseScheduleVP; linear beyond the ends like its interpolate_fn). float64 (N,) -> (N,)."""
    table = 0.5 * schedule.alphas_cumprod.double().log()  # (T,)
    low = model_time.floor().long().clamp(0, schedule.num_train_timesteps - 2)
    return table[low] + (model_time - low) * (table[low + 1] - table[low])


def _model_time_of_log_alpha(schedule: NoiseSchedule, log_alpha: torch.Tensor) -> torch.Tensor:
    """Inverse of _log_alpha (log alpha decreases with t). float64 (N,) -> (N,)."""
    table = 0.5 * schedule.alphas_cumprod.double().log()  # (T,), decreasing
    low = (torch.searchsorted(-table, -log_alpha) - 1).clamp(0, schedule.num_train_timesteps - 2)
    return low + (table[low] - log_alpha) / (table[low] - table[low + 1])


def _lambda(log_alpha: torch.Tensor) -> torch.Tensor:
    """Half log-SNR log(alpha / sigma_vp) with sigma_vp = sqrt(1 - alpha^2)."""
    return log_alpha - 0.5 * torch.log(-torch.expm1(2 * log_alpha))


def unipc_sigmas(
    schedule: NoiseSchedule, steps: int, strength: float | None = None, *, skip_type: str = "time_uniform"
) -> torch.Tensor:
    """Sigmas (float64) for UniPC: ``[start, s(m_0), ..., s(m_N)]``, the table sigma (log-sigma interpolated) at
    the model timesteps m = t T - 1 of UniPC's grid: N = len(ts) steps from t = 1 (txt2img, start PRIOR_SIGMA) or
    t_enc steps from t = (ts[t_enc - 1] + 1) / T (img2img, start s(ts[t_enc])), down to t = 1 / T."""
    if skip_type not in UNIPC_SKIP_TYPES:
        raise SamplingError(f"UniPC skip type: expected one of {UNIPC_SKIP_TYPES}, found {skip_type!r}")
    total = schedule.num_train_timesteps
    timesteps = timestep_list(steps, total)
    if strength is None:
        start, t_first, count = PRIOR_SIGMA, 1.0, len(timesteps)
    else:
        count = _img2img_steps(steps, strength)
        if count == 0:
            raise SamplingError(f"UniPC img2img: denoising strength {strength} at {steps} steps leaves no step")
        start = float(schedule.sigmas[timesteps[count]])
        t_first = float(timesteps[count - 1] + 1) / total
    t_last = 1.0 / total
    f64 = torch.float64
    if skip_type == "time_uniform":
        t = torch.linspace(t_first, t_last, count + 1, dtype=f64)
    elif skip_type == "time_quadratic":
        t = torch.linspace(t_first**0.5, t_last**0.5, count + 1, dtype=f64) ** 2
    else:  # logSNR: uniform in lambda between the ends' lambdas
        ends = _lambda(_log_alpha(schedule, torch.tensor([t_first, t_last], dtype=f64) * total - 1))
        lam = torch.linspace(float(ends[0]), float(ends[1]), count + 1, dtype=f64)
        log_alpha = -0.5 * torch.log1p(torch.exp(-2 * lam))
        t = (_model_time_of_log_alpha(schedule, log_alpha) + 1) / total
    return torch.cat([torch.tensor([start], dtype=f64), schedule.t_to_sigma(t * total - 1)])  # (count + 2,)


# ----------------------------------------------------------------------------------- shared sampler pieces


def _sigma_values(sigmas: torch.Tensor, sampler: str, minimum: int = 2) -> list[float]:
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < minimum:
        raise SamplingError(
            f"{sampler} sigmas: expected a 1-D tensor [start, calls..., end] of at least {minimum} values, "
            f"found shape {tuple(sigmas.shape)}"
        )
    values = sigmas.detach().to("cpu", torch.float64).tolist()
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise SamplingError(f"{sampler} sigmas: expected positive finite values, found {values}")
    return values


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _to_ldm(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """k-diffusion latent at sigma -> LDM latent: x / sqrt(1 + sigma^2)."""
    return x.to(_work_dtype(x)) / math.sqrt(1.0 + sigma * sigma)


def _model_call(
    denoiser: Denoiser, x_ldm: torch.Tensor, sigma: float, model_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model at sigma on the LDM latent: (x in k-diffusion form, x0, eps), all in x_ldm's dtype."""
    x = x_ldm * math.sqrt(1.0 + sigma * sigma)
    sigma_batch = torch.full((x.shape[0],), sigma, dtype=torch.float64, device=x.device)  # (B,) exact table sigma
    x0 = denoiser(x.to(model_dtype), sigma_batch).to(x_ldm.dtype)
    return x, x0, (x - x0) / sigma


def _report(callback: StepCallback | None, i: int, n: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(i, n, x, denoised)


def _noise_like(x: torch.Tensor, generator: NoiseSource, sampler: str) -> torch.Tensor:
    """Standard normal noise shaped like x: from ``generator.randn_like(x)``, or float32 on the CPU from one
    torch.Generator (whole batch) or one per image, then moved to x's device and dtype."""
    if generator is None:
        raise SamplingError(f"{sampler} draws noise when eta > 0: pass generator=torch.Generator('cpu') or per-image "
                            "generators, or an object with randn_like(x)")
    if hasattr(generator, "randn_like"):
        noise = generator.randn_like(x)
    else:
        single = isinstance(generator, torch.Generator)
        generators = [generator] if single else list(generator)
        if not all(isinstance(g, torch.Generator) and g.device.type == "cpu" for g in generators) or (
            not single and len(generators) != x.shape[0]
        ):
            raise SamplingError(f"{sampler}: expected one CPU torch.Generator or {x.shape[0]} (one per image), "
                                f"found {generator}")
        if single:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)  # (B, C, H, W)
        else:
            noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generators])
    if tuple(noise.shape) != tuple(x.shape):
        raise SamplingError(f"{sampler}: noise of shape {tuple(noise.shape)} for a latent of shape {tuple(x.shape)}")
    return noise.to(device=x.device, dtype=x.dtype)


def _alpha_bar(sigma: float) -> tuple[float, float]:
    """(a, 1 - a) of alphas_cumprod at sigma: a = 1 / (1 + sigma^2), 1 - a = sigma^2 / (1 + sigma^2)."""
    return 1.0 / (1.0 + sigma * sigma), sigma * sigma / (1.0 + sigma * sigma)


def _ddim_step(
    x_ldm: torch.Tensor, eps: torch.Tensor, sigma: float, sigma_next: float, noise_scale: float = 0.0
) -> torch.Tensor:
    """LDM DDIM update without its noise term: sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps."""
    a_t, one_minus_a_t = _alpha_bar(sigma)
    a_prev, one_minus_a_prev = _alpha_bar(sigma_next)
    pred_x0 = (x_ldm - math.sqrt(one_minus_a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * pred_x0 + math.sqrt(one_minus_a_prev - noise_scale**2) * eps


# ---------------------------------------------------------------------------------------------- DDIM, PLMS


def sample_ddim_timesteps(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: NoiseSource = None, callback: StepCallback | None = None, eta: float = 0.0,
) -> torch.Tensor:
    """A1111's DDIM: LDM DDIM steps between the timesteps of `sigmas` ([start, calls..., end]); eta in [0, 1]."""
    if not 0.0 <= eta <= 1.0:
        raise SamplingError(f"DDIM eta: expected a value in [0, 1], found {eta}")
    s = _sigma_values(sigmas, "DDIM")
    n = len(s) - 2
    x_ldm = _to_ldm(x, s[0])
    for i in range(n):
        sigma, sigma_next = s[i + 1], s[i + 2]
        x_k, x0, eps = _model_call(denoiser, x_ldm, sigma, x.dtype)
        _report(callback, i, n, x_k, x0)
        (a_t, one_minus_a_t), (a_prev, one_minus_a_prev) = _alpha_bar(sigma), _alpha_bar(sigma_next)
        noise_scale = eta * math.sqrt(one_minus_a_prev / one_minus_a_t * (1.0 - a_t / a_prev))
        x_ldm = _ddim_step(x_ldm, eps, sigma, sigma_next, noise_scale)
        if noise_scale > 0:
            x_ldm = x_ldm + noise_scale * _noise_like(x_ldm, generator, "DDIM")
    return x_ldm.to(x.dtype)


def _adams_bashforth(eps: torch.Tensor, previous: list[torch.Tensor]) -> torch.Tensor:
    """PLMS's e' from this step's eps and the earlier ones (newest last), orders 2 to 4."""
    if len(previous) == 1:
        return (3 * eps - previous[-1]) / 2
    if len(previous) == 2:
        return (23 * eps - 16 * previous[-1] + 5 * previous[-2]) / 12
    return (55 * eps - 59 * previous[-1] + 37 * previous[-2] - 9 * previous[-3]) / 24


def sample_plms(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: NoiseSource = None, callback: StepCallback | None = None,
) -> torch.Tensor:
    """A1111's PLMS: pseudo improved Euler on the first step (two model calls), then Adams-Bashforth up to 4."""
    s = _sigma_values(sigmas, "PLMS")
    n = len(s) - 2
    x_ldm = _to_ldm(x, s[0])
    previous: list[torch.Tensor] = []  # the last three steps' model eps, newest last
    for i in range(n):
        sigma, sigma_next = s[i + 1], s[i + 2]
        x_k, x0, eps = _model_call(denoiser, x_ldm, sigma, x.dtype)
        _report(callback, i, n, x_k, x0)
        if previous:
            eps_prime = _adams_bashforth(eps, previous)
        else:
            x_euler = _ddim_step(x_ldm, eps, sigma, sigma_next)
            eps_prime = (eps + _model_call(denoiser, x_euler, sigma_next, x.dtype)[2]) / 2
        x_ldm = _ddim_step(x_ldm, eps_prime, sigma, sigma_next)
        previous = (previous + [eps])[-3:]
    return x_ldm.to(x.dtype)


# ---------------------------------------------------------------------------------------------------- UniPC


def _unipc_coefficients(ratios: list[float], h: float, variant: str) -> list[float]:
    """rho of UniPC-B(h) for the points r_k = ratios (the corrector's include r = 1): solves
    ``sum_k r_k^(p-1) rho_k = b_p``, p = 1..K, with ``b_p = p! g_(p+1)(-h) / B(h)``, ``g_1(u) = e^u - 1``,
    ``g_(k+1)(u) = g_k(u) / u - 1 / k!``. One point gives 0.5 (UniPC's simplified order-2 predictor and
    order-1 corrector)."""
    if len(ratios) == 1:
        return [0.5]
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    b = []
    g = math.expm1(hh) / hh - 1  # g_2
    factorial = 1
    for p in range(1, len(ratios) + 1):
        b.append(g * factorial / b_h)
        factorial *= p + 1
        g = g / hh - 1 / factorial
    vandermonde = torch.tensor([[r**p for r in ratios] for p in range(len(ratios))], dtype=torch.float64)  # (K, K)
    return torch.linalg.solve(vandermonde, torch.tensor(b, dtype=torch.float64)).tolist()


def sample_unipc(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
    generator: NoiseSource = None, callback: StepCallback | None = None, schedule: NoiseSchedule | None = None,
    order: int = 3, variant: str = "bh1", lower_order_final: bool = True,
) -> torch.Tensor:
    """A1111's UniPC (multistep, data prediction) over the grid of `sigmas` ([start, grid...], see unipc_sigmas).

    With the model's `schedule` the solver takes alpha at each grid point from UniPC's own log-alpha
    interpolation (A1111's numbers); without it from the sigma (log-sigma interpolation): the same model calls,
    coefficients up to ~5e-4 apart at fractional timesteps above 10.
    """
    if variant not in UNIPC_VARIANTS:
        raise SamplingError(f"UniPC variant: expected one of {UNIPC_VARIANTS}, found {variant!r}")
    s = _sigma_values(sigmas, "UniPC", minimum=3)
    grid = s[1:]
    steps = len(grid) - 1
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= steps:
        raise SamplingError(f"UniPC order: expected an integer in [1, steps = {steps}], found {order!r}")
    grid_tensor = torch.tensor(grid, dtype=torch.float64)
    if schedule is None:
        log_alpha = -0.5 * torch.log1p(grid_tensor**2)  # alpha = 1 / sqrt(1 + sigma^2)
    else:
        log_alpha = _log_alpha(schedule, schedule.sigma_to_t(grid_tensor))
    lam = _lambda(log_alpha).tolist()
    alpha = log_alpha.exp().tolist()
    sigma_vp = (-torch.expm1(2 * log_alpha)).sqrt().tolist()

    def data_prediction(x_ldm: torch.Tensor, i: int) -> torch.Tensor:
        eps = _model_call(denoiser, x_ldm, grid[i], x.dtype)[2]
        return (x_ldm - sigma_vp[i] * eps) / alpha[i]

    x_ldm = _to_ldm(x, s[0])
    history = [(0, data_prediction(x_ldm, 0))]  # (grid index, x0 there), newest last
    for i in range(1, steps + 1):
        s0, m0 = history[-1]
        _report(callback, i - 1, steps, x_ldm / alpha[s0], m0)
        if i < order:
            step_order = i  # warm-up with lower orders
        else:
            step_order = min(order, steps + 1 - i) if lower_order_final else order
        h = lam[i] - lam[s0]
        ratios = [(lam[history[-(k + 1)][0]] - lam[s0]) / h for k in range(1, step_order)]
        differences = [(history[-(k + 1)][1] - m0) / r for k, r in zip(range(1, step_order), ratios)]
        b_h = -h if variant == "bh1" else math.expm1(-h)
        x_base = (sigma_vp[i] / sigma_vp[s0]) * x_ldm - (alpha[i] * math.expm1(-h)) * m0
        x_ldm = x_base
        if differences:  # predictor
            rhos = _unipc_coefficients(ratios, h, variant)
            x_ldm = x_base - (alpha[i] * b_h) * sum(rho * d for rho, d in zip(rhos, differences))
        if i == steps:  # no corrector and no model call on the last step
            break
        model_t = data_prediction(x_ldm, i)  # at the predicted x: the next step's m0
        rhos = _unipc_coefficients(ratios + [1.0], h, variant)  # corrector
        correction = sum((rho * d for rho, d in zip(rhos[:-1], differences)), torch.zeros_like(m0))
        x_ldm = x_base - (alpha[i] * b_h) * (correction + rhos[-1] * (model_t - m0))
        history = (history + [(i, model_t)])[-order:]
    return x_ldm.to(x.dtype)


# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class TimestepSamplerInfo(SamplerInfo):
    """A sampler that builds its own sigmas from the model's NoiseSchedule (A1111's timestep list) instead of
    taking a sigma scheduler's. ``prepare(schedule, steps, strength)`` gives one run's sigmas and sample
    function; start from ``noise * sigmas[0]`` (txt2img, strength None) or ``latent + noise * sigmas[0]``
    (img2img, with no further slicing: the list already is A1111's), then call
    ``sample(denoiser, x, sigmas, generator=..., callback=...)``. Keep the sigmas float64."""

    sigmas_from_schedule: Callable[[NoiseSchedule, int, float | None], torch.Tensor] = field(kw_only=True)
    calls_for_timesteps: Callable[[int], int] = field(kw_only=True)  # model calls of a run over that many timesteps
    binds_schedule: bool = field(default=False, kw_only=True)  # `sample` takes the model's schedule (UniPC)

    def prepare(
        self, schedule: NoiseSchedule, steps: int, strength: float | None = None
    ) -> tuple[torch.Tensor, Callable[..., torch.Tensor]]:
        """(sigmas, sample) of a txt2img (strength None) or img2img run on the model's schedule."""
        sample = functools.partial(self.sample, schedule=schedule) if self.binds_schedule else self.sample
        return self.sigmas_from_schedule(schedule, steps, strength), sample

    def model_calls(self, steps: int, num_train_timesteps: int = A1111_NUM_TRAIN_TIMESTEPS) -> int:
        """Model calls of a txt2img run of `steps` steps (A1111's count, see the module docstring)."""
        return self.calls_for_timesteps(len(timestep_list(steps, num_train_timesteps)))


def _ddim_calls(count: int) -> int:
    return count - 1


def _plms_calls(count: int) -> int:
    return count if count > 1 else 0  # one extra call on the first step


def _unipc_calls(count: int) -> int:
    return count


# default_scheduler "automatic": these samplers take no sigma scheduler (not a get_sigmas name); A1111's infotext
# says "Schedule type: Automatic" for them.
TIMESTEP_SAMPLERS: tuple[TimestepSamplerInfo, ...] = (
    TimestepSamplerInfo("DDIM", sample_ddim_timesteps, False, False, "automatic",
                        sigmas_from_schedule=ddim_sigmas, calls_for_timesteps=_ddim_calls),
    TimestepSamplerInfo("PLMS", sample_plms, False, False, "automatic",
                        sigmas_from_schedule=ddim_sigmas, calls_for_timesteps=_plms_calls),
    TimestepSamplerInfo("UniPC", sample_unipc, False, False, "automatic",
                        sigmas_from_schedule=unipc_sigmas, calls_for_timesteps=_unipc_calls, binds_schedule=True),
)
