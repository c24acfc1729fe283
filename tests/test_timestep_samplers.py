"""A1111's DDIM, PLMS and UniPC against references restated here in the LDM parameterisation.

The references below are written from the algorithms (Song et al. 2021 DDIM; Liu et al. 2022 PLMS; Zhao et al.
2023 UniPC-B(h) with DPM-Solver's discrete noise schedule) the way A1111 drives them: an eps model called as
``model(x_ldm, t)`` at A1111's timesteps, ``a = alphas_cumprod[t]``, txt2img from ``x_T = noise``. tiengine runs
the same samplers through its k-diffusion denoiser (``eps_denoiser`` / ``v_denoiser`` / ``guided_denoiser``).

Tolerances come from the reference's own float32 noise: each reference runs in float64 and in float32, and
tiengine (float32) must stay within ``4 * |ref32 - ref64| + 4 EPS32 max|x|`` of the float64 run (two float32
implementations of one algorithm differ by a small multiple of one's rounding).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from model_builders import build_modules, tiny_model_config
from sampling_reference import EPS32, SD_BETAS, exact_denoiser, toy_mean

from tiengine.diffusion.guidance import guided_denoiser
from tiengine.diffusion.samplers import SamplerInfo
from tiengine.diffusion.schedules import (
    NoiseSchedule,
    SamplingError,
    eps_denoiser,
    v_denoiser,
)
from tiengine.diffusion.timestep_samplers import (
    PRIOR_SIGMA,
    TIMESTEP_SAMPLERS,
    TimestepSamplerInfo,
    ddim_sigmas,
    sample_ddim_timesteps,
    sample_plms,
    sample_unipc,
    timestep_list,
    unipc_sigmas,
)

SCHEDULE = NoiseSchedule.from_betas(**SD_BETAS)
ALPHAS = SCHEDULE.alphas_cumprod.double().numpy()  # the model's float32 alphas_cumprod, as float64 values
T = len(ALPHAS)
SHAPE = (2, 4, 8, 8)
INFO = {info.name: info for info in TIMESTEP_SAMPLERS}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# --------------------------------------------------------------------------------------------- references


def a1111_timesteps(steps: int) -> list[int]:
    return [min(t + 1, 999) for t in range(0, 1000, 1000 // steps)]


def ldm_ddim_step(x, e, a, a_prev, scale=0.0):
    """sqrt(a_prev) x0 + sqrt(1 - a_prev - scale^2) e with x0 = (x - sqrt(1 - a) e) / sqrt(a)."""
    x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - scale**2) * e


def ref_ddim(model, x_t, timesteps, *, dtype, eta=0.0, noise=None, plms=False):
    """LDM DDIM (or PLMS) from x_t at timesteps[-1] down to timesteps[0]; model(x, t) -> eps."""
    x = x_t.to(dtype)
    old = []
    for index in range(len(timesteps) - 1, 0, -1):
        t, t_prev = timesteps[index], timesteps[index - 1]
        a, a_prev = ALPHAS[t], ALPHAS[t_prev]
        e = model(x, t)
        if not plms:
            scale = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
            x = ldm_ddim_step(x, e, a, a_prev, scale) + (scale * noise().to(dtype) if eta else 0)
            continue
        if not old:
            e_prime = (e + model(ldm_ddim_step(x, e, a, a_prev), t_prev)) / 2
        else:
            coefficients = {1: [3, -1], 2: [23, -16, 5], 3: [55, -59, 37, -9]}[len(old)]
            e_prime = sum(c * v for c, v in zip(coefficients, [e, *reversed(old)])) / {1: 2, 2: 12, 3: 24}[len(old)]
        x = ldm_ddim_step(x, e_prime, a, a_prev)
        old = (old + [e])[-3:]
    return x


class VPSchedule:
    """DPM-Solver's discrete VP schedule: log alpha(t) linear between 0.5 log a_j at t = (j + 1) / T."""

    t_array = (np.arange(T) + 1.0) / T
    log_alpha_array = 0.5 * np.log(ALPHAS)

    def log_alpha(self, t):
        return float(np.interp(t, self.t_array, self.log_alpha_array))

    def alpha(self, t):
        return math.exp(self.log_alpha(t))

    def sigma(self, t):
        return math.sqrt(1 - math.exp(2 * self.log_alpha(t)))

    def lam(self, t):
        return self.log_alpha(t) - math.log(self.sigma(t))

    def inverse_lam(self, lam):
        log_alpha = -0.5 * np.logaddexp(0.0, -2 * lam)
        return float(np.interp(log_alpha, self.log_alpha_array[::-1], self.t_array[::-1]))


def g_series(k: int, u: float) -> float:
    """g_k(u) = (e^u - sum_{j<k} u^j / j!) / u^(k-1), summed as its series sum_{j>=k} u^(j-k+1) / j!."""
    return sum(u ** (j - k + 1) / math.factorial(j) for j in range(k, k + 30))


def ref_unipc(model, x_t, steps, *, dtype, t_start=1.0, order=3, variant="bh1", lower_order_final=True,
              skip_type="time_uniform"):
    """UniPC-B(h), multistep, data prediction; model(x, model_time) -> eps with model_time = t T - 1."""
    vp = VPSchedule()
    t_end = 1.0 / T
    if skip_type == "time_uniform":
        grid = np.linspace(t_start, t_end, steps + 1)
    elif skip_type == "time_quadratic":
        grid = np.linspace(t_start**0.5, t_end**0.5, steps + 1) ** 2
    else:
        grid = [vp.inverse_lam(lam) for lam in np.linspace(vp.lam(t_start), vp.lam(t_end), steps + 1)]

    def data(x, t):
        eps = model(x, t * T - 1)
        return (x - vp.sigma(t) * eps) / vp.alpha(t)

    def solve(ratios, b):
        if len(ratios) == 1:
            return [0.5]
        return np.linalg.solve(np.vander(ratios, increasing=True).T, b).tolist()

    x = x_t.to(dtype)
    ms, ts = [data(x, grid[0])], [grid[0]]
    for step in range(1, steps + 1):
        k = step if step < order else (min(order, steps + 1 - step) if lower_order_final else order)
        t, s = grid[step], ts[-1]
        h = vp.lam(t) - vp.lam(s)
        ratios = [(vp.lam(ts[-1 - i]) - vp.lam(s)) / h for i in range(1, k)]
        d = [(ms[-1 - i] - ms[-1]) / r for i, r in enumerate(ratios, start=1)]
        b_h = -h if variant == "bh1" else math.expm1(-h)
        b = [math.factorial(p) * g_series(p + 1, -h) / b_h for p in range(1, k + 1)]
        base = vp.sigma(t) / vp.sigma(s) * x - vp.alpha(t) * math.expm1(-h) * ms[-1]
        x = base - vp.alpha(t) * b_h * sum(r * di for r, di in zip(solve(ratios, b[: k - 1]), d)) if d else base
        if step == steps:
            break
        m_t = data(x, t)
        rho = solve(ratios + [1.0], b)
        x = base - vp.alpha(t) * b_h * (sum(r * di for r, di in zip(rho[:-1], d)) + rho[-1] * (m_t - ms[-1]))
        ms, ts = ms + [m_t], ts + [t]
    return x


def analytic_eps(calls: list | None = None):
    """An eps model from the exact toy denoiser: at model time t (float), sigma(t) interpolates log sigma."""
    denoise = exact_denoiser(toy_mean())
    log_sigmas = np.log(np.sqrt((1 - ALPHAS) / ALPHAS))

    def model(x_ldm, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_ldm.shape[0])
        if calls is not None:
            calls.append(float(t[0]))
        sigma = torch.from_numpy(np.exp(np.interp(t.numpy(), np.arange(T), log_sigmas))).to(x_ldm.dtype)  # (B,)
        s = sigma.reshape(-1, 1, 1, 1)
        x = x_ldm * (1 + s**2).sqrt()
        return (x - denoise(x, sigma)) / s

    return model


def never_called(x, sigma):
    raise AssertionError("no model call expected")


def noise(seed=0, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_within_fp32_noise(ours, ref64, ref32, extra=0.0):
    noise32 = float((ref32.double() - ref64).abs().max())
    tol = 4 * noise32 + 4 * EPS32 * float(ref64.abs().max()) + extra
    err = float((ours.double() - ref64).abs().max())
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g} (reference float32 noise {noise32:.3g})"
    return tol


def run_ours(name, model, steps, x_start=None, strength=None, **kwargs):
    """tiengine's sampler on eps_denoiser(model) as the engine runs it: prepare's sigmas and sample function,
    started from noise * sigmas[0] (txt2img) or latent + noise * sigmas[0] (img2img)."""
    sigmas, sample = INFO[name].prepare(SCHEDULE, steps, strength)
    x = noise() * sigmas[0].float() if x_start is None else x_start + noise() * sigmas[0].float()
    return sample(lambda x, s: eps_denoiser(model, SCHEDULE)(x, s), x, sigmas, **kwargs)


# ------------------------------------------------------------------------------------------ timestep lists


@pytest.mark.parametrize("steps, first_calls, count", [(20, [951, 901, 851], 20), (30, [991, 958, 925], 31),
                                                       (50, [981, 961, 941], 50)])
def test_a1111_timestep_lists_and_call_counts(steps, first_calls, count):
    timesteps = timestep_list(steps)
    assert timesteps.tolist() == a1111_timesteps(steps)
    assert len(timesteps) == count and timesteps[0] == 1 and timesteps.tolist()[-3:][::-1] == first_calls
    sigmas = ddim_sigmas(SCHEDULE, steps)
    assert sigmas.dtype == torch.float64 and sigmas[0] == PRIOR_SIGMA
    assert torch.equal(sigmas[1:], SCHEDULE.sigmas[timesteps.flip(0)])  # exact table sigmas, ending at t = 1
    for name, calls_expected in (("DDIM", count - 1), ("PLMS", count), ("UniPC", count)):
        calls: list = []
        run_ours(name, analytic_eps(calls), steps)
        assert len(calls) == calls_expected == INFO[name].model_calls(steps)
        if name == "DDIM":
            assert calls == timesteps.flip(0)[:-1].double().tolist()  # exactly A1111's integer timesteps
        if name == "PLMS":
            assert calls == [float(timesteps[-1]), float(timesteps[-2])] + timesteps.flip(0)[1:-1].double().tolist()


def test_timestep_list_edges():
    assert timestep_list(1).tolist() == [1]
    assert timestep_list(7).tolist() == [1 + 142 * k for k in range(8)]
    assert timestep_list(600).tolist()[-2:] == [999, 999]  # spacing 1, clipped like A1111
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(SamplingError, match="steps"):
            timestep_list(bad)


def test_registry_entries():
    assert [info.name for info in TIMESTEP_SAMPLERS] == ["DDIM", "PLMS", "UniPC"]
    for info in TIMESTEP_SAMPLERS:
        assert isinstance(info, SamplerInfo) and isinstance(info, TimestepSamplerInfo)
        assert not info.second_order and not info.stochastic and info.default_scheduler == "automatic"
    assert INFO["DDIM"].sigmas_from_schedule is ddim_sigmas and INFO["PLMS"].sigmas_from_schedule is ddim_sigmas
    assert INFO["UniPC"].sigmas_from_schedule is unipc_sigmas


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_txt2img_starts_from_the_prior_exactly(dtype):
    """One step: no model call (A1111's DDIM loop is empty), so the result is the LDM start, == noise."""
    x = noise().to(dtype)
    sigmas = ddim_sigmas(SCHEDULE, 1)
    for sample in (sample_ddim_timesteps, sample_plms):
        assert torch.equal(sample(never_called, x * sigmas[0].to(dtype), sigmas), x)


# ------------------------------------------------------------------------------- analytic eps model, txt2img


@pytest.mark.parametrize("name, steps", [("DDIM", 20), ("DDIM", 30), ("PLMS", 20), ("PLMS", 30)])
def test_ddim_plms_match_the_ldm_reference(name, steps):
    model = analytic_eps()
    refs = [ref_ddim(model, noise(), a1111_timesteps(steps), dtype=d, plms=name == "PLMS")
            for d in (torch.float64, torch.float32)]
    assert_within_fp32_noise(run_ours(name, model, steps), *refs)


@pytest.mark.parametrize("steps, options", [(20, {}), (30, {}), (20, {"variant": "bh2"}), (20, {"order": 2}),
                                            (10, {"order": 4, "lower_order_final": False}), (5, {"order": 1}),
                                            (15, {"skip_type": "time_quadratic"}), (15, {"skip_type": "logSNR"})])
def test_unipc_matches_the_reference(steps, options):
    options = dict(options)
    skip_type = options.pop("skip_type", "time_uniform")
    ours_times: list = []
    sigmas, sample = INFO["UniPC"].prepare(SCHEDULE, steps)
    if skip_type != "time_uniform":
        sigmas = unipc_sigmas(SCHEDULE, steps, skip_type=skip_type)
    ours = sample(lambda x, s: eps_denoiser(analytic_eps(ours_times), SCHEDULE)(x, s), noise() * float(sigmas[0]),
                  sigmas, **options)
    count = len(a1111_timesteps(steps))
    ref_times: list = []
    refs = [ref_unipc(analytic_eps(ref_times), noise(), count, dtype=d, skip_type=skip_type, **options)
            for d in (torch.float64, torch.float32)]
    ref_times = ref_times[: len(ours_times)]  # the float64 run's calls
    assert len(ours_times) == count and ref_times[0] == 999
    torch.testing.assert_close(torch.tensor(ours_times), torch.tensor(ref_times), rtol=0, atol=1e-9)
    assert_within_fp32_noise(ours, *refs)


def test_unipc_without_the_schedule_reads_alpha_from_sigma():
    """Called without the model's schedule, UniPC makes the same model calls and takes alpha = 1 / sqrt(1 +
    sigma^2) (log-sigma interpolation) instead of UniPC's log-alpha interpolation at fractional timesteps: a
    different image, but close (1e-4 max|x|; measured 3e-6 at 30 steps)."""
    model = analytic_eps()
    sigmas = unipc_sigmas(SCHEDULE, 30)
    ours = sample_unipc(lambda x, s: eps_denoiser(model, SCHEDULE)(x, s), noise() * float(sigmas[0]), sigmas)
    refs = [ref_unipc(model, noise(), 31, dtype=d) for d in (torch.float64, torch.float32)]
    err = float((ours.double() - refs[0]).abs().max())
    assert err > 2 * float((refs[1].double() - refs[0]).abs().max())  # not float rounding
    assert err < 1e-4 * float(refs[0].abs().max())


def test_ddim_eta_noise_from_per_image_generators_or_any_randn_like():
    steps, eta = 10, 0.7
    model = analytic_eps()

    def per_image(seed):
        return [torch.Generator().manual_seed(seed + b) for b in range(SHAPE[0])]

    def draws(generators):
        return lambda: torch.stack([torch.randn(SHAPE[1:], generator=g) for g in generators])

    refs = [ref_ddim(model, noise(), a1111_timesteps(steps), dtype=dtype, eta=eta, noise=draws(per_image(100)))
            for dtype in (torch.float64, torch.float32)]
    ours = run_ours("DDIM", model, steps, generator=per_image(100), eta=eta)
    assert_within_fp32_noise(ours, *refs)

    class Recorded:
        def __init__(self):
            self.generators = per_image(100)

        def randn_like(self, x):
            return torch.stack([torch.randn(x.shape[1:], generator=g) for g in self.generators])

    assert torch.equal(run_ours("DDIM", model, steps, generator=Recorded(), eta=eta), ours)
    assert float((ours - run_ours("DDIM", model, steps)).abs().max()) > 0.05  # the noise matters
    whole_batch = torch.Generator().manual_seed(5)
    ref = ref_ddim(model, noise(), a1111_timesteps(steps), dtype=torch.float64, eta=eta,
                   noise=lambda: torch.randn(SHAPE, generator=whole_batch))
    one = run_ours("DDIM", model, steps, generator=torch.Generator().manual_seed(5), eta=eta)
    torch.testing.assert_close(one.double(), ref, rtol=0, atol=4 * float((ours.double() - refs[0]).abs().max()) + 1e-6)
    with pytest.raises(SamplingError, match="generator"):
        run_ours("DDIM", model, steps, eta=eta)
    with pytest.raises(SamplingError, match="one per image"):
        run_ours("DDIM", model, steps, eta=eta, generator=per_image(0)[:1])
    with pytest.raises(SamplingError, match="eta"):
        run_ours("DDIM", model, steps, eta=1.5)


# ------------------------------------------------------------------------------------------------ img2img


@pytest.mark.parametrize("name", ["DDIM", "PLMS", "UniPC"])
def test_img2img_noises_to_ts_t_enc_and_starts_one_timestep_lower(name):
    steps, strength = 20, 0.75
    t_enc = int(strength * steps)  # 15
    timesteps = a1111_timesteps(steps)
    latent = 0.5 * noise(seed=3)
    a = ALPHAS[timesteps[t_enc]]
    x_t = math.sqrt(a) * latent.double() + math.sqrt(1 - a) * noise().double()  # A1111's xi
    calls: list = []
    ours = run_ours(name, analytic_eps(calls), steps, x_start=latent, strength=strength)
    model = analytic_eps()
    if name == "UniPC":
        t_start = (timesteps[t_enc - 1] + 1) / T
        refs = [ref_unipc(model, x_t, t_enc, dtype=d, t_start=t_start) for d in (torch.float64, torch.float32)]
        assert len(calls) == t_enc and abs(calls[0] - timesteps[t_enc - 1]) < 1e-9
        assert_within_fp32_noise(ours, *refs)
    else:
        refs = [ref_ddim(model, x_t, timesteps[:t_enc], dtype=d, plms=name == "PLMS")
                for d in (torch.float64, torch.float32)]
        assert calls[0] == timesteps[t_enc - 1] and len(calls) == t_enc - 1 + (name == "PLMS")
        assert_within_fp32_noise(ours, *refs)
    sigmas = INFO[name].sigmas_from_schedule(SCHEDULE, steps, strength)
    assert float(sigmas[0]) == float(SCHEDULE.sigmas[timesteps[t_enc]])


def test_img2img_without_a_step_returns_the_noised_latent():
    sigmas = ddim_sigmas(SCHEDULE, 20, 0.02)  # t_enc = 0
    x = noise()
    assert torch.equal(sigmas, SCHEDULE.sigmas[[1, 1]])
    out = sample_ddim_timesteps(never_called, x, sigmas)
    torch.testing.assert_close(out, x / math.sqrt(1 + float(sigmas[0]) ** 2), rtol=0, atol=0)
    with pytest.raises(SamplingError, match="no step"):
        unipc_sigmas(SCHEDULE, 20, 0.02)


# ------------------------------------------------------------------------------------------ the tiny UNet


@pytest.fixture(scope="module")
def unets():
    config = tiny_model_config("sd1")
    unet = build_modules(config, seed=0)["unet"].eval()
    unet64 = build_modules(config, seed=0)["unet"].double().eval()
    contexts = torch.randn((2, 1, 5, config.unet.cross_attention_dim), generator=torch.Generator().manual_seed(9))
    return unet, unet64, contexts[0], contexts[1]


def guided_eps(unet, cond, uncond, scale, *, v=False, calls=None):
    """A1111's CFG in eps form: eps_u + scale (eps_c - eps_u), one batched call; a v model's output is turned
    into eps at the integer part of t, as A1111's CompVisTimestepsVDenoiser does."""

    def model(x, t):
        if calls is not None:
            calls.append(float(t))
        dtype = next(unet.parameters()).dtype
        out = unet(torch.cat([x, x]).to(dtype), torch.full((2,), float(t), dtype=dtype),
                   torch.cat([cond, uncond]).to(dtype))
        if v:
            a = ALPHAS[int(t)]
            out = math.sqrt(a) * out + math.sqrt(1 - a) * torch.cat([x, x]).to(dtype)
        e_c, e_u = out.chunk(2)
        return (e_u + scale * (e_c - e_u)).to(x.dtype)

    return model


@pytest.mark.parametrize("name", ["DDIM", "PLMS", "UniPC"])
@torch.no_grad()
def test_tiny_unet_with_cfg(name, unets):
    """The engine's guided denoiser (CFG on x0) against A1111's CFG on eps, tiny SD1 UNet, cfg 7, 20 steps."""
    unet, unet64, cond, uncond = unets
    steps, scale = 20, 7.0
    sigmas, sample = INFO[name].prepare(SCHEDULE, steps)
    start = noise(shape=(1, 4, 8, 8))
    ours = sample(guided_denoiser(eps_denoiser(unet, SCHEDULE), uncond, [(cond, 1.0)], scale),
                  start * sigmas[0].float(), sigmas)
    if name == "UniPC":
        refs = [ref_unipc(guided_eps(u, cond, uncond, scale), start, len(a1111_timesteps(steps)), dtype=d)
                for u, d in ((unet64, torch.float64), (unet, torch.float32))]
    else:
        refs = [ref_ddim(guided_eps(u, cond, uncond, scale), start, a1111_timesteps(steps), dtype=d,
                         plms=name == "PLMS") for u, d in ((unet64, torch.float64), (unet, torch.float32))]
    assert_within_fp32_noise(ours, *refs)


@pytest.mark.parametrize("name", ["DDIM", "PLMS"])
@torch.no_grad()
def test_tiny_unet_as_a_v_model(name, unets):
    unet, unet64, cond, _ = unets
    steps = 10
    info = INFO[name]
    sigmas = info.sigmas_from_schedule(SCHEDULE, steps, None)
    v_model = lambda x, t: unet(x, t, cond)
    ours = info.sample(lambda x, s: v_denoiser(v_model, SCHEDULE)(x, s), noise(shape=(1, 4, 8, 8)) * sigmas[0].float(),
                       sigmas)
    refs = [ref_ddim(guided_eps(u, cond, cond, 1.0, v=True), noise(shape=(1, 4, 8, 8)), a1111_timesteps(steps),
                     dtype=d, plms=name == "PLMS") for u, d in ((unet64, torch.float64), (unet, torch.float32))]
    assert_within_fp32_noise(ours, *refs)


# ------------------------------------------------------------------------------- bounds, callbacks, errors


def test_tolerance_detects_a_subtle_change():
    """The bound is not loose: ending at alphas_cumprod[0] instead of [1] (diffusers' DDIM), plain DDIM for
    PLMS, or UniPC's bh2 for bh1 fail it by far."""
    model = analytic_eps()
    timesteps = a1111_timesteps(20)
    refs = [ref_ddim(model, noise(), timesteps, dtype=d) for d in (torch.float64, torch.float32)]
    tol = assert_within_fp32_noise(run_ours("DDIM", model, 20), *refs)
    sigmas = torch.cat([ddim_sigmas(SCHEDULE, 20), SCHEDULE.sigmas[:1]])  # one more step, to t = 0
    moved = sample_ddim_timesteps(lambda x, s: eps_denoiser(model, SCHEDULE)(x, s), noise() * PRIOR_SIGMA, sigmas)
    assert float((moved.double() - refs[0]).abs().max()) > 100 * tol
    plms = [ref_ddim(model, noise(), timesteps, dtype=d, plms=True) for d in (torch.float64, torch.float32)]
    tol = assert_within_fp32_noise(run_ours("PLMS", model, 20), *plms)
    assert float((refs[0] - plms[0]).abs().max()) > 100 * tol
    unipc = [ref_unipc(model, noise(), 20, dtype=d) for d in (torch.float64, torch.float32)]
    tol = assert_within_fp32_noise(run_ours("UniPC", model, 20), *unipc)
    bh2 = ref_unipc(model, noise(), 20, dtype=torch.float64, variant="bh2")
    assert float((bh2 - unipc[0]).abs().max()) > 100 * tol


@pytest.mark.parametrize("name", ["DDIM", "PLMS", "UniPC"])
def test_callback_reports_each_step(name):
    """callback(i, n, x, x0) once per step with the step's input (k-diffusion form) and the x0 it steps with:
    the step's first call's (DDIM, PLMS; PLMS calls twice on its first step), UniPC's data prediction."""
    seen: list = []
    calls: list = []
    model = analytic_eps()

    def denoiser(x, s):
        x0 = eps_denoiser(model, SCHEDULE)(x, s)
        calls.append((x.clone(), x0.clone()))
        return x0

    sigmas, sample = INFO[name].prepare(SCHEDULE, 8)
    sample(denoiser, noise() * sigmas[0].float(), sigmas,
           callback=lambda i, n, x, d: seen.append((i, n, x.clone(), d.clone())))
    steps = len(sigmas) - 2
    assert [(i, n) for i, n, _, _ in seen] == [(i, steps) for i in range(steps)]
    firsts = [calls[0]] + (calls[2:] if name == "PLMS" else calls[1:])
    for (_, _, x, d), (x_call, x0_call) in zip(seen, firsts):
        if name == "UniPC":  # its x0 comes from UniPC's alpha; its call was at the predicted x, not the corrected
            torch.testing.assert_close(d, x0_call, rtol=0, atol=1e-5)
        else:
            assert torch.equal(d, x0_call) and torch.equal(x, x_call)


def test_bad_options_are_rejected():
    model = analytic_eps()
    sigmas = unipc_sigmas(SCHEDULE, 4)
    with pytest.raises(SamplingError, match="order"):
        sample_unipc(lambda x, s: eps_denoiser(model, SCHEDULE)(x, s), noise(), sigmas, order=6)
    with pytest.raises(SamplingError, match="variant"):
        sample_unipc(lambda x, s: eps_denoiser(model, SCHEDULE)(x, s), noise(), sigmas, variant="vary_coeff")
    with pytest.raises(SamplingError, match="skip type"):
        unipc_sigmas(SCHEDULE, 4, skip_type="uniform")
    with pytest.raises(SamplingError, match="strength"):
        ddim_sigmas(SCHEDULE, 20, 1.5)
    for bad in (torch.tensor([1.0]), torch.tensor([[1.0, 0.5]]), torch.tensor([2.0, 1.0, 0.0]),
                torch.tensor([float("nan"), 1.0])):
        with pytest.raises(SamplingError, match="sigmas"):
            sample_plms(lambda x, s: x, noise(), bad)
