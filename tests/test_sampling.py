"""Samplers against diffusers' schedulers on an exact toy denoiser, with the same sigmas and the same noise.

Every model call is compared: its sigma (within SIGMA_RTOL) and its input x (within 16 EPS32 * max|x|,
derived in tests/sampling_reference.py), and so are the final latents. diffusers runs its own sigma
computation (Karras sigmas, DDIM "leading" timesteps) and those sigmas are first checked against ours;
where diffusers has no equivalent setting (Euler a with the "normal" schedule) its sigmas are set to ours.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
from sampling_reference import (
    EPS32,
    LATENT_SHAPE,
    SD_BETAS,
    SIGMA_RTOL,
    BrownianNoise,
    exact_denoiser,
    recording,
    run_diffusers,
    sigma_at_index,
    sigma_dpm_sde,
    sigma_kdpm2,
    toy_mean,
    x_tolerance,
)

from tiengine.diffusion.samplers import SAMPLERS, get_sampler
from tiengine.diffusion.schedules import NoiseSchedule, SamplingError, get_sigmas
from tiengine.diffusion.timestep_samplers import TimestepSamplerInfo

diffusers = pytest.importorskip("diffusers")
# diffusers feeds torch tensors to numpy; numpy 2 warns about it on every call
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

STEPS = 10
NOISE_SEED = 1
SAMPLER_SEED = 5


@dataclass
class Case:
    scheduler: object
    sigmas: torch.Tensor  # ours, (STEPS + 1,)
    call_sigma: object
    vp: bool = False
    stochastic: bool = False
    sampler_kwargs: dict = field(default_factory=dict)
    step_kwargs: dict = field(default_factory=dict)


def _karras(cls, **config):
    scheduler = cls(**SD_BETAS, timestep_spacing="linspace", use_karras_sigmas=True, **config)
    scheduler.set_timesteps(STEPS)
    ours = get_sigmas(NoiseSchedule(scheduler.alphas_cumprod), STEPS, "karras")
    theirs = torch.unique_consecutive(scheduler.sigmas)
    torch.testing.assert_close(ours, theirs, rtol=2 * EPS32, atol=0)  # same sigmas on both sides
    return scheduler, ours


def _case(name: str) -> Case:
    if name == "Euler":
        return Case(*_karras(diffusers.EulerDiscreteScheduler), sigma_at_index)
    if name == "Euler a":
        scheduler = diffusers.EulerAncestralDiscreteScheduler(**SD_BETAS)
        scheduler.set_timesteps(STEPS)
        schedule = NoiseSchedule(scheduler.alphas_cumprod)
        sigmas = get_sigmas(schedule, STEPS, "normal")
        scheduler.sigmas = sigmas.clone()  # diffusers has no log-interpolated "normal" spacing: use ours
        scheduler.timesteps = schedule.sigma_to_t(sigmas[:-1])
        return Case(scheduler, sigmas, sigma_at_index, stochastic=True)
    if name == "Heun":
        return Case(*_karras(diffusers.HeunDiscreteScheduler), sigma_at_index)
    if name == "DPM2":
        return Case(*_karras(diffusers.KDPM2DiscreteScheduler), sigma_kdpm2)
    if name in ("DPM++ 2M", "DPM++ 2M SDE"):
        algorithm = "dpmsolver++" if name == "DPM++ 2M" else "sde-dpmsolver++"
        scheduler, sigmas = _karras(
            diffusers.DPMSolverMultistepScheduler, algorithm_type=algorithm, solver_order=2,
            solver_type="midpoint", lower_order_final=False, euler_at_final=False, final_sigmas_type="zero",
        )
        return Case(scheduler, sigmas, sigma_at_index, vp=True, stochastic=name.endswith("SDE"))
    if name == "DPM++ SDE":
        pytest.importorskip("torchsde")  # diffusers' DPMSolverSDEScheduler needs it (test extra)
        scheduler, sigmas = _karras(diffusers.DPMSolverSDEScheduler)
        scheduler.noise_sampler = BrownianNoise(SAMPLER_SEED, LATENT_SHAPE)
        return Case(scheduler, sigmas, sigma_dpm_sde, stochastic=True)
    if name == "LMS":
        pytest.importorskip("scipy")  # diffusers' LMS coefficients use scipy.integrate (test extra)
        return Case(*_karras(diffusers.LMSDiscreteScheduler), sigma_at_index)
    raise AssertionError(name)


def _run_both(name: str, sampler_name: str | None = None, **sampler_overrides):
    case = _case(name)
    denoiser = exact_denoiser(toy_mean())
    x_start = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(NOISE_SEED)) * case.sigmas[0]
    generator = torch.Generator().manual_seed(SAMPLER_SEED) if case.stochastic else None
    ours_calls: list = []
    sample = get_sampler(sampler_name or name).sample
    ours = sample(recording(denoiser, ours_calls), x_start, case.sigmas, generator=generator,
                  **{**case.sampler_kwargs, **sampler_overrides})
    ref_generator = torch.Generator().manual_seed(SAMPLER_SEED) if case.stochastic else None
    if name == "DPM++ SDE":
        ref_generator = None  # its noise comes from the BrownianNoise sampler
    ref, ref_calls = run_diffusers(case.scheduler, x_start, denoiser, case.call_sigma, vp=case.vp,
                                   generator=ref_generator, **case.step_kwargs)
    return ours, ours_calls, ref, ref_calls


# A1111's DDIM (and PLMS, UniPC) are its timestep samplers, not diffusers' DDIMScheduler: they are checked
# against the LDM algorithms in tests/test_timestep_samplers.py
ALL_CASES = ["Euler", "Euler a", "Heun", "DPM2", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "LMS"]


@pytest.mark.parametrize("name", ALL_CASES)
def test_sampler_matches_diffusers(name):
    ours, ours_calls, ref, ref_calls = _run_both(name)
    assert len(ours_calls) == len(ref_calls) == get_sampler(name).model_calls(STEPS)
    tol = x_tolerance(ref_calls)
    for i, ((x, sigma), (x_ref, sigma_ref)) in enumerate(zip(ours_calls, ref_calls)):
        assert sigma == pytest.approx(sigma_ref, rel=SIGMA_RTOL, abs=0), f"call {i}"
        torch.testing.assert_close(x, x_ref, rtol=0, atol=tol, msg=lambda m: f"call {i}: {m}")
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)


def test_tolerance_detects_a_subtle_change():
    """The bound is not loose: LMS of order 3 against diffusers' order 4 fails it by far."""
    ours, ours_calls, ref, ref_calls = _run_both("LMS", order=3)
    assert float((ours - ref).abs().max()) > 100 * x_tolerance(ref_calls)


def test_second_order_and_call_counts():
    denoiser = exact_denoiser(toy_mean())
    schedule = NoiseSchedule.from_betas(**SD_BETAS)
    expected_second_order = {"Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart"}  # A1111 1.10
    assert set(SAMPLERS) == {"Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE",
                             "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DPM++ 2S a", "DPM++ SDE", "DPM fast",
                             "DPM adaptive", "LMS", "Restart", "DDIM", "PLMS", "UniPC", "LCM"}
    for name, info in SAMPLERS.items():
        if isinstance(info, TimestepSamplerInfo):
            continue  # own timestep lists and call counts: tests/test_timestep_samplers.py
        assert info.second_order == (name in expected_second_order)
        table = info.sigma_table(schedule) if info.sigma_table is not None else schedule
        for steps in (1, 2, 6, 7):
            sigmas = get_sigmas(table, steps, info.default_scheduler,
                                discard_penultimate=info.discard_penultimate_sigma)
            calls: list = []
            reported: list = []
            x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0)) * sigmas[0]
            info.sample(recording(denoiser, calls), x, sigmas, generator=torch.Generator().manual_seed(0),
                        callback=lambda i, n, xi, d: reported.append((i, n)))
            if info.adaptive:  # DPM adaptive: its error control picks the steps
                assert info.model_calls(steps) is None and (len(calls) >= 3 or steps == 1)  # 1 step: no span
                assert reported == [(i, None) for i in range(len(reported))]
                continue
            assert len(calls) == info.model_calls(steps) == (2 * steps - 1 if info.second_order else steps)
            solver_steps = steps // 3 + 1 if name == "DPM fast" else steps  # fast: up to 3 calls a step
            assert reported == [(i, solver_steps) for i in range(solver_steps)]


def test_a1111_defaults_in_registry():
    assert get_sampler("DPM++ 2M").default_scheduler == "karras"
    assert get_sampler("DPM++ SDE").default_scheduler == "karras"
    assert get_sampler("DPM++ 2M SDE").default_scheduler == "exponential"
    assert get_sampler("Euler a").default_scheduler == "uniform"  # A1111 names none: k-diffusion's get_sigmas
    assert get_sampler("DPM2").default_scheduler == "karras"
    assert get_sampler("DPM2").discard_penultimate_sigma
    assert not get_sampler("Heun").discard_penultimate_sigma
    with pytest.raises(SamplingError, match="Euler A"):
        get_sampler("Euler A")


@pytest.mark.parametrize("name", [n for n, info in SAMPLERS.items() if info.stochastic])
def test_stochastic_samplers_are_deterministic_per_seed(name):
    info = get_sampler(name)
    denoiser = exact_denoiser(toy_mean())
    steps = 20 if name == "Restart" else 6  # Restart adds noise from 20 steps on
    sigmas = get_sigmas(NoiseSchedule.from_betas(**SD_BETAS), steps, "karras")
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    runs = [info.sample(denoiser, x, sigmas, generator=torch.Generator().manual_seed(seed)) for seed in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1])
    assert float((runs[0] - runs[2]).abs().max()) > 1e-2  # the noise matters
    with pytest.raises(SamplingError, match="generator"):
        info.sample(denoiser, x, sigmas)


@pytest.mark.parametrize("name", ["Euler a", "DPM++ SDE", "DPM++ 2M SDE"])
def test_per_image_generators_reproduce_single_images(name):
    """With one generator per image (A1111 batch seeds), image b of a batch equals a lone run of that image."""
    info = get_sampler(name)
    denoiser = exact_denoiser(toy_mean())
    sigmas = get_sigmas(NoiseSchedule.from_betas(**SD_BETAS), 6, "karras")
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    batch = info.sample(denoiser, x, sigmas, generator=[torch.Generator().manual_seed(10 + b) for b in range(2)])
    for b in range(2):
        single = info.sample(denoiser, x[b : b + 1], sigmas, generator=[torch.Generator().manual_seed(10 + b)])
        torch.testing.assert_close(batch[b : b + 1], single, rtol=0, atol=4 * EPS32 * float(x.abs().max()))


def test_ancestral_noise_comes_from_the_cpu_generator_as_float32():
    """One Euler a step (eta=1) on a denoiser returning 0: x_next = x * sigma_down / sigma + z * sigma_up."""
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    zero = lambda x, sigma: torch.zeros_like(x)
    out = get_sampler("Euler a").sample(zero, x, torch.tensor([2.0, 1.0]), generator=torch.Generator().manual_seed(7))
    z = torch.randn((1, 1, 2, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float32).double()
    sigma_up = math.sqrt(1.0 * (4.0 - 1.0) / 4.0)  # sqrt(s_next^2 (s^2 - s_next^2) / s^2)
    sigma_down = math.sqrt(1.0 - sigma_up**2)
    torch.testing.assert_close(out, x * sigma_down / 2.0 + z * sigma_up, rtol=0, atol=1e-15)


def test_callback_reports_each_step_input_and_first_denoised():
    denoiser = exact_denoiser(toy_mean())
    sigmas = get_sigmas(NoiseSchedule.from_betas(**SD_BETAS), 4, "karras")
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    calls: list = []
    seen: list = []
    get_sampler("Heun").sample(recording(denoiser, calls), x, sigmas,
                               callback=lambda i, n, xi, d: seen.append((i, n, xi.clone(), d.clone())))
    assert [(i, n) for i, n, _, _ in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    first_calls = [calls[0], calls[2], calls[4], calls[6]]  # Heun: two calls per step, one on the last
    for (_, _, xi, d), (x_call, sigma) in zip(seen, first_calls):
        assert torch.equal(xi, x_call)
        torch.testing.assert_close(d, denoiser(x_call, torch.full((2,), sigma)), rtol=0, atol=0)


def test_bad_sigmas_are_rejected():
    denoiser = exact_denoiser(toy_mean())
    x = torch.zeros(LATENT_SHAPE)
    for bad in (torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]), torch.tensor([1.0, 0.0, 0.5]),
                torch.tensor([float("nan"), 0.0])):
        with pytest.raises(SamplingError, match="sigmas"):
            get_sampler("Euler").sample(denoiser, x, bad)


def test_sampling_imports_no_reference_library():
    code = ("import sys, tiengine.diffusion.samplers, tiengine.diffusion.schedules; "
            "bad = [m for m in ('diffusers', 'transformers', 'scipy', 'torchsde', 'k_diffusion') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)

