"""Noise schedules, sigma schedules, model parameterizations, initial noise and the img2img start.

Everything here speaks the k-diffusion convention: a noisy latent is ``x = x0 + sigma * eps`` and a
denoiser maps ``(x, sigma) -> x0``. Names and constants come from:

- ``NoiseSchedule``: the discrete DDPM training schedule of latent diffusion (and diffusers'
  ``beta_schedule`` names). "scaled_linear": ``betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``
  (SD1, SD2 and SDXL: T = 1000, 0.00085, 0.012); "linear": ``betas = linspace(beta_start, beta_end, T)``.
  ``alphas_cumprod = cumprod(1 - betas)`` is computed in float64 and kept in float32, as in the
  ``alphas_cumprod`` buffer of LDM checkpoints. ``sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])``;
  ``sigma_to_t`` / ``t_to_sigma`` interpolate linearly in log sigma between integer timesteps, as
  k-diffusion's ``DiscreteSchedule`` does (``quantize`` snaps to the nearest timestep, its option).
- Sigma schedules: A1111's "Schedule type" menu (``modules/sd_schedulers.py``, names and labels in
  ``tiengine.diffusion.names``), each giving float32 sigmas, decreasing, ending with 0 (except KL
  Optimal, see below), for ``steps`` steps; sigma_min / sigma_max are the training table's ends:
  "uniform": ``t_to_sigma(linspace(T - 1, 0, steps))`` (k-diffusion ``DiscreteSchedule.get_sigmas``, what
  A1111 uses when a sampler names no schedule);
  "normal": the same between ``sigma_to_t(sigma_max)`` and ``sigma_to_t(sigma_min)`` (equal to uniform for
  the table's own ends);
  "sgm_uniform": ``linspace(sigma_to_t(sigma_max), sigma_to_t(sigma_min), steps + 1)`` without its last
  timestep (SGM / SDXL's "uniform" discretization);
  "karras": Karras et al. 2022, evenly spaced in sigma^(1/rho), rho = 7 (k-diffusion get_sigmas_karras);
  "exponential": evenly spaced in log sigma (get_sigmas_exponential);
  "polyexponential": log sigma along ``ramp ** rho``, rho = 1 (get_sigmas_polyexponential);
  "kl_optimal": ``tan((k / n) atan(sigma_min) + (1 - k / n) atan(sigma_max))`` for k = 0 .. n; A1111 returns
  these n + 1 values as they are, so the last step ends at sigma_min, not 0;
  "align_your_steps": NVIDIA's Align Your Steps 10-step tables for SD 1.5 and SDXL (the ``sdxl`` switch;
  A1111 uses the SD 1.5 table for every non-SDXL model), log-linearly interpolated to other step counts
  (NVIDIA's ``loglinear_interp``);
  "simple": the table's sigmas at indices ``T - 1 - int(k * T / steps)``, k = 0 .. steps - 1;
  "ddim": the table's sigmas at timesteps 1, 1 + c, 1 + 2c, ... below T with ``c = max(T // steps, 1)``,
  reversed: LDM's "uniform" DDIM discretization, which gives more than ``steps`` sigmas when c does not
  divide T - 1 evenly enough (30 steps give 31); A1111 then runs them all;
  "beta": ``sigma_min + ppf(1 - linspace(0, 1, steps)) * (sigma_max - sigma_min)`` with the Beta(0.6, 0.6)
  quantile function (A1111's defaults for its beta_dist_alpha / beta_dist_beta options);
  "ddim_uniform" (tiengine's earlier name): the table's sigmas at timesteps ``1 + k * (T // steps)``,
  k = steps-1 .. 0, exactly ``steps`` of them (diffusers' DDIM "leading" spacing with steps_offset 1).
  "automatic" is not a schedule: it is the sampler's default (``SamplerInfo.default_scheduler``).
  ``discard_penultimate=True`` builds steps + 1 steps' sigmas and drops the next-to-last one (A1111's
  ``discard_next_to_last_sigma``, for DPM2 and DPM++ 3M SDE). A1111 computes the table and the
  schedules in float32; here they are computed in float64 and rounded once, which agrees with it to a
  few float32 ulps.
- Model parameterizations (k-diffusion ``CompVisDenoiser`` / ``CompVisVDenoiser``): an epsilon model
  sees ``x * c_in`` with ``c_in = 1 / sqrt(sigma^2 + 1)`` and gives ``x0 = x - sigma * eps``; a v model
  gives ``x0 = c_skip * x + c_out * v`` with ``c_skip = 1 / (sigma^2 + 1)``,
  ``c_out = -sigma / sqrt(sigma^2 + 1)``. The model is called as ``model(x_in, t, cond)`` for a tensor
  cond, ``model(x_in, t, **cond)`` for a dict cond and ``model(x_in, t)`` for ``cond=None``, with ``t``
  the interpolated (float) timestep.
- Initial noise: image b of a batch draws its noise from ``torch.Generator("cpu")`` seeded with
  ``seed + b`` (A1111's batch seeds with its "CPU" random source), so image b of a batch equals a
  single image made with seed + b, on any device. Pass the same generators to an ancestral or SDE
  sampler to continue each image's stream, as A1111 does.
- img2img (A1111 defaults): with N steps and denoising strength s, ``t_enc = int(min(s, 0.999) * N)``;
  sampling runs the last t_enc + 1 steps of the N-step schedule, i.e. ``sigmas[N - t_enc - 1:]``, from
  ``latent + noise * sigmas[N - t_enc - 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from tiengine.diffusion.beta_dist import beta_ppf
from tiengine.diffusion.names import SamplingError, schedule_name

BETA_SCHEDULES: tuple[str, ...] = ("scaled_linear", "linear")
KARRAS_RHO = 7.0  # Karras et al. 2022, also k-diffusion's and A1111's default
POLYEXPONENTIAL_RHO = 1.0  # k-diffusion's and A1111's default
BETA_SCHEDULE_ALPHA = 0.6  # A1111's beta_dist_alpha default
BETA_SCHEDULE_BETA = 0.6  # A1111's beta_dist_beta default
# Align Your Steps (NVIDIA, research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html): 10 steps.
AYS_SD15_SIGMAS = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL_SIGMAS = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)

# Conditioning as the caller's model takes it: a tensor (B, ...) or a dict of such tensors.
Cond = torch.Tensor | Mapping[str, torch.Tensor]
# k-diffusion denoiser: x (B, C, H, W), sigma (B,) -> x0 (B, C, H, W).
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# The same with the conditioning passed through to the model.
CondDenoiser = Callable[[torch.Tensor, torch.Tensor, Cond | None], torch.Tensor]


class NoiseSchedule:
    """The model's discrete training schedule: alphas_cumprod (T,) and the sigmas derived from it."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float32)
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
            raise SamplingError(
                f"alphas_cumprod: expected a 1-D tensor of at least 2 timesteps, found shape "
                f"{tuple(alphas_cumprod.shape)}"
            )
        ok = (alphas_cumprod > 0) & (alphas_cumprod < 1)
        if not bool(ok.all()) or not bool((alphas_cumprod[1:] < alphas_cumprod[:-1]).all()):
            raise SamplingError("alphas_cumprod: expected values strictly decreasing inside (0, 1)")
        self.alphas_cumprod = alphas_cumprod  # (T,) float32, as stored in checkpoints
        a = alphas_cumprod.double()
        self.sigmas = ((1 - a) / a).sqrt()  # (T,) float64, increasing with t
        self.log_sigmas = self.sigmas.log()  # (T,) float64

    @classmethod
    def from_betas(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
    ) -> NoiseSchedule:
        """The training schedule from its beta parameters (defaults: SD1, SD2 and SDXL)."""
        if beta_schedule not in BETA_SCHEDULES:
            raise SamplingError(f"beta_schedule: expected one of {BETA_SCHEDULES}, found {beta_schedule!r}")
        if num_train_timesteps < 2 or not 0 < beta_start < beta_end < 1:
            raise SamplingError(
                "noise schedule: expected num_train_timesteps >= 2 and 0 < beta_start < beta_end < 1, found "
                f"{num_train_timesteps}, {beta_start}, {beta_end}"
            )
        f64 = torch.float64
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=f64) ** 2
        else:
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=f64)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor, *, quantize: bool = False) -> torch.Tensor:
        """Timestep (float, same shape and device as sigma) whose log sigma interpolates to log(sigma)."""
        sigma = torch.as_tensor(sigma)
        log_sigma = sigma.detach().to("cpu", torch.float64).clamp(min=0).log()
        if quantize:
            t = (log_sigma.reshape(1, -1) - self.log_sigmas[:, None]).abs().argmin(dim=0).double()
        else:
            flat = log_sigma.reshape(-1)  # (N,)
            # index of the last table entry <= log_sigma, kept inside [0, T - 2]
            low = torch.searchsorted(self.log_sigmas, flat, right=True) - 1
            low = low.clamp(0, self.num_train_timesteps - 2)
            low_log, high_log = self.log_sigmas[low], self.log_sigmas[low + 1]
            w = ((low_log - flat) / (low_log - high_log)).clamp(0, 1)
            t = low.double() + w
        out_dtype = torch.float64 if sigma.dtype == torch.float64 else torch.float32
        return t.reshape(sigma.shape).to(device=sigma.device, dtype=out_dtype)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at a (float) timestep: linear interpolation of log sigma between integer timesteps."""
        t = torch.as_tensor(t)
        tc = t.detach().to("cpu", torch.float64).clamp(0, self.num_train_timesteps - 1)
        low = tc.floor().long()
        high = tc.ceil().long()
        w = tc - low
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        out_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        return log_sigma.exp().to(device=t.device, dtype=out_dtype)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)  # (steps + 1,)


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SamplingError(f"steps: expected an integer >= 1, found {steps!r}")


def sigmas_uniform(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """k-diffusion's ``get_sigmas``: sigmas at ``steps`` evenly spaced timesteps from T-1 to 0, then 0."""
    _check_steps(steps)
    t = torch.linspace(schedule.num_train_timesteps - 1, 0, steps, dtype=torch.float64)
    return _append_zero(schedule.t_to_sigma(t))


def sigmas_normal(
    schedule: NoiseSchedule, steps: int, sigma_min: float | None = None, sigma_max: float | None = None,
    *, sgm: bool = False,
) -> torch.Tensor:
    """Sigmas at evenly spaced timesteps between those of sigma_max and sigma_min (default: the table's
    ends), then 0; ``sgm``: steps + 1 timesteps without the last (A1111's normal / sgm_uniform)."""
    _check_steps(steps)
    bounds = torch.tensor([schedule.sigma_max if sigma_max is None else sigma_max,
                           schedule.sigma_min if sigma_min is None else sigma_min], dtype=torch.float64)
    start, end = schedule.sigma_to_t(bounds).tolist()
    t = torch.linspace(start, end, steps + 1, dtype=torch.float64)[:-1] if sgm else \
        torch.linspace(start, end, steps, dtype=torch.float64)
    return _append_zero(schedule.t_to_sigma(t))


def sigmas_karras(steps: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> torch.Tensor:
    """Karras et al. 2022: evenly spaced in sigma^(1/rho) from sigma_max to sigma_min, then 0."""
    _check_steps(steps)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def sigmas_exponential(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in log sigma from sigma_max to sigma_min, then 0."""
    _check_steps(steps)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp())


def sigmas_polyexponential(
    steps: int, sigma_min: float, sigma_max: float, rho: float = POLYEXPONENTIAL_RHO
) -> torch.Tensor:
    """log sigma = log sigma_min + ramp^rho * (log sigma_max - log sigma_min), ramp from 1 to 0; then 0."""
    _check_steps(steps)
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho
    return _append_zero((ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp())


def sigmas_kl_optimal(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """tan of evenly spaced angles from atan(sigma_max) to atan(sigma_min): steps + 1 values, the last
    sigma_min (A1111 appends no 0)."""
    _check_steps(steps)
    fraction = torch.arange(steps + 1, dtype=torch.float64) / steps  # (steps + 1,)
    angles = fraction * math.atan(sigma_min) + (1.0 - fraction) * math.atan(sigma_max)
    return angles.tan().to(torch.float32)


def sigmas_align_your_steps(steps: int, *, sdxl: bool = False) -> torch.Tensor:
    """NVIDIA's 10-step table (SD 1.5 or SDXL), log-linearly interpolated to `steps` steps, then 0."""
    _check_steps(steps)
    table = AYS_SDXL_SIGMAS if sdxl else AYS_SD15_SIGMAS
    if steps == len(table):  # A1111 takes the table itself for 11 steps
        return _append_zero(torch.tensor(table, dtype=torch.float64))
    log_increasing = np.log(np.asarray(table[::-1], dtype=np.float64))
    interpolated = np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(table)), log_increasing)
    return _append_zero(torch.from_numpy(np.exp(interpolated)[::-1].copy()))


def sigmas_simple(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """The table's sigmas at indices T - 1 - int(k * T / steps), k = 0 .. steps - 1, then 0."""
    _check_steps(steps)
    stride = schedule.num_train_timesteps / steps
    indices = [schedule.num_train_timesteps - 1 - int(k * stride) for k in range(steps)]
    return _append_zero(schedule.sigmas[indices])


def sigmas_ddim(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """The table's sigmas at timesteps 1, 1 + c, ... < T with c = max(T // steps, 1), decreasing, then 0."""
    _check_steps(steps)
    stride = max(schedule.num_train_timesteps // steps, 1)
    timesteps = torch.arange(1, schedule.num_train_timesteps, stride).flip(0)  # (>= steps,), decreasing
    return _append_zero(schedule.sigmas[timesteps])


def sigmas_beta(
    steps: int, sigma_min: float, sigma_max: float, alpha: float = BETA_SCHEDULE_ALPHA,
    beta: float = BETA_SCHEDULE_BETA,
) -> torch.Tensor:
    """sigma_min + (sigma_max - sigma_min) * Beta(alpha, beta) quantiles at 1 - linspace(0, 1, steps); then 0."""
    _check_steps(steps)
    quantiles = [beta_ppf(q, alpha, beta) for q in (1.0 - np.linspace(0, 1, steps)).tolist()]
    return _append_zero(torch.tensor([sigma_min + q * (sigma_max - sigma_min) for q in quantiles], dtype=torch.float64))


def sigmas_ddim_uniform(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """The table's sigmas at timesteps 1 + k * (T // steps) for k = steps-1 .. 0, then 0."""
    _check_steps(steps)
    total = schedule.num_train_timesteps
    if steps >= total:
        raise SamplingError(f"steps: the ddim_uniform scheduler takes fewer than {total} steps, found {steps}")
    timesteps = torch.arange(steps - 1, -1, -1) * (total // steps) + 1  # (steps,), decreasing
    return _append_zero(schedule.sigmas[timesteps])


def get_sigmas(
    schedule: NoiseSchedule, steps: int, scheduler: str = "normal", *, discard_penultimate: bool = False,
    rho: float | None = None, sdxl: bool = False, beta_alpha: float = BETA_SCHEDULE_ALPHA,
    beta_beta: float = BETA_SCHEDULE_BETA,
) -> torch.Tensor:
    """Float32 sigmas for `steps` steps of a schedule given by name, A1111 label or alias (any case).

    Usually (steps + 1,) ending with 0; "ddim" can give more, "kl_optimal" ends with sigma_min (see the
    module docstring). ``rho`` replaces the Karras / Polyexponential default (A1111's "rho" option; other
    schedules have none); ``sdxl`` picks the Align Your Steps table; ``beta_alpha`` / ``beta_beta`` are
    the Beta schedule's parameters.
    """
    name = schedule_name(scheduler)
    if name == "automatic":
        raise SamplingError(
            "scheduler 'Automatic' is the sampler's own default: pass SamplerInfo.default_scheduler "
            "(tiengine.diffusion.samplers.resolve_sampler gives it)"
        )
    _check_steps(steps)
    if rho is not None and not (math.isfinite(rho) and rho > 0):
        raise SamplingError(f"rho: expected a positive number, found {rho!r}")
    if not (beta_alpha > 0 and beta_beta > 0):
        raise SamplingError(f"Beta schedule: expected alpha > 0 and beta > 0, found {beta_alpha}, {beta_beta}")
    n = steps + 1 if discard_penultimate else steps
    low, high = schedule.sigma_min, schedule.sigma_max
    builders: dict[str, Callable[[], torch.Tensor]] = {
        "uniform": lambda: sigmas_uniform(schedule, n),
        "normal": lambda: sigmas_normal(schedule, n),
        "sgm_uniform": lambda: sigmas_normal(schedule, n, sgm=True),
        "karras": lambda: sigmas_karras(n, low, high, KARRAS_RHO if rho is None else rho),
        "exponential": lambda: sigmas_exponential(n, low, high),
        "polyexponential": lambda: sigmas_polyexponential(n, low, high, POLYEXPONENTIAL_RHO if rho is None else rho),
        "kl_optimal": lambda: sigmas_kl_optimal(n, low, high),
        "align_your_steps": lambda: sigmas_align_your_steps(n, sdxl=sdxl),
        "simple": lambda: sigmas_simple(schedule, n),
        "ddim": lambda: sigmas_ddim(schedule, n),
        "beta": lambda: sigmas_beta(n, low, high, beta_alpha, beta_beta),
        "ddim_uniform": lambda: sigmas_ddim_uniform(schedule, n),
    }
    sigmas = builders[name]()
    if discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def _call_model(model: Callable[..., torch.Tensor], x_in: torch.Tensor, t: torch.Tensor, cond: Cond | None):
    if cond is None:
        return model(x_in, t)
    if isinstance(cond, Mapping):
        return model(x_in, t, **cond)
    return model(x_in, t, cond)


def _per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)


def eps_denoiser(
    eps_model: Callable[..., torch.Tensor], schedule: NoiseSchedule, *, quantize: bool = False
) -> CondDenoiser:
    """Denoiser ``(x, sigma, cond) -> x0`` for a model that predicts the noise epsilon."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        s = _per_sample(sigma, x)
        eps = _call_model(eps_model, x / (s**2 + 1).sqrt(), schedule.sigma_to_t(sigma, quantize=quantize), cond)
        return x - eps * s

    return denoise


def v_denoiser(
    v_model: Callable[..., torch.Tensor], schedule: NoiseSchedule, *, quantize: bool = False
) -> CondDenoiser:
    """Denoiser ``(x, sigma, cond) -> x0`` for a model that predicts v (SD2 768-v)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        s = _per_sample(sigma, x)
        root = (s**2 + 1).sqrt()
        v = _call_model(v_model, x / root, schedule.sigma_to_t(sigma, quantize=quantize), cond)
        return x / (s**2 + 1) - v * (s / root)

    return denoise


def batch_generators(seed: int, batch_size: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded seed, seed + 1, ... (A1111's batch seeds)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SamplingError(f"seed: expected an integer, found {seed!r}")
    if batch_size < 1:
        raise SamplingError(f"batch size: expected >= 1, found {batch_size}")
    return [torch.Generator("cpu").manual_seed(seed + b) for b in range(batch_size)]


def initial_noise(
    seed: int | Sequence[torch.Generator],
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Unit Gaussian noise of ``shape`` (B, 4, H/8, W/8); image b from its own CPU generator.

    ``seed`` is an int (generators seeded seed + b are made here) or B generators from
    ``batch_generators`` that the caller then passes on to an ancestral/SDE sampler. Drawn in float32
    on the CPU, then moved to device/dtype. txt2img starts from ``noise * sigmas[0]``.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) < 2:
        raise SamplingError(f"noise shape: expected (B, C, ...), found {shape}")
    if isinstance(seed, Sequence) and all(isinstance(g, torch.Generator) for g in seed):
        generators = list(seed)
    else:
        generators = batch_generators(seed, shape[0])
    if len(generators) != shape[0]:
        raise SamplingError(f"noise: expected {shape[0]} generators (one per image), found {len(generators)}")
    noise = torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generators])
    return noise.to(device=device, dtype=dtype)  # (B, C, H, W)


def img2img_start(
    latent: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, strength: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma sub-schedule, noised start latent) for denoising strength in [0, 1] (A1111 semantics).

    ``sigmas`` is the full (N + 1,) schedule of an N-step run; the result runs its last
    ``int(min(strength, 0.999) * N) + 1`` steps.
    """
    if not 0.0 <= strength <= 1.0:
        raise SamplingError(f"denoising strength: expected a value in [0, 1], found {strength}")
    steps = sigmas.numel() - 1
    if sigmas.ndim != 1 or steps < 1:
        raise SamplingError(f"sigmas: expected a 1-D schedule of at least 2 values, found {tuple(sigmas.shape)}")
    if latent.shape != noise.shape:
        raise SamplingError(f"img2img: latent {tuple(latent.shape)} and noise {tuple(noise.shape)} differ in shape")
    t_enc = int(min(strength, 0.999) * steps)
    sub_sigmas = sigmas[steps - t_enc - 1 :]  # (t_enc + 2,)
    return sub_sigmas, latent + noise * sub_sigmas[0].to(latent.dtype)
