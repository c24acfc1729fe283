"""Noise table, sigma schedulers, timestep interpolation, eps/v wrappers, initial noise and img2img start.

References: diffusers' schedulers (same alphas_cumprod where a comparison is of the spacing rule), a
numpy float64 restatement of LDM's table and k-diffusion's log-sigma interpolation, and A1111's formulas
worked by hand. Tolerances: sigmas built from the same float64 values and rounded once to float32 agree
within 2 ulps (2 EPS32 relative); diffusers' float32 cumprod of 1000 factors may drift from our float64
one by at most 1000 EPS32 relative (one rounding per factor).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sampling_reference import (
    EPS32,
    LATENT_SHAPE,
    SD_BETAS,
    closed_form_log_sigmas,
    closed_form_t_to_sigma,
    exact_denoiser,
    recording,
    toy_mean,
    x_tolerance,
)

from tiengine.diffusion.samplers import sample_euler
from tiengine.diffusion.schedules import (
    NoiseSchedule,
    SamplingError,
    batch_generators,
    eps_denoiser,
    get_sigmas,
    img2img_start,
    initial_noise,
    sigmas_karras,
    v_denoiser,
)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")


def _diffusers_euler(**config):
    return diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="linspace", **config)


def test_training_table_matches_ldm_and_diffusers():
    ours = NoiseSchedule.from_betas(**SD_BETAS)
    log_sigmas = closed_form_log_sigmas()
    np.testing.assert_allclose(ours.log_sigmas.numpy(), log_sigmas, rtol=0, atol=1e-12)
    theirs = _diffusers_euler().alphas_cumprod.double()
    torch.testing.assert_close(ours.alphas_cumprod.double(), theirs, rtol=1000 * EPS32, atol=0)
    assert ours.sigma_min == pytest.approx(math.exp(log_sigmas[0]), rel=1e-12)
    assert ours.sigma_max == pytest.approx(14.6146, abs=1e-4)  # SD's well-known sigma_max
    linear = NoiseSchedule.from_betas(1000, 0.0001, 0.02, "linear")
    reference = diffusers.DDIMScheduler(beta_schedule="linear").alphas_cumprod.double()
    torch.testing.assert_close(linear.alphas_cumprod.double(), reference, rtol=1000 * EPS32, atol=0)


@pytest.mark.parametrize("scheduler,flag", [("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas")])
@pytest.mark.parametrize("steps", [2, 10, 25])  # diffusers degenerates at 1 step (sigma_max = sigma_min)
def test_karras_and_exponential_match_diffusers(scheduler, flag, steps):
    reference = _diffusers_euler(**{flag: True})
    reference.set_timesteps(steps)
    ours = get_sigmas(NoiseSchedule(reference.alphas_cumprod), steps, scheduler)
    assert ours.shape == (steps + 1,) and ours.dtype == torch.float32 and ours[-1] == 0
    torch.testing.assert_close(ours, reference.sigmas, rtol=2 * EPS32, atol=0)


@pytest.mark.parametrize("steps", [1, 20, 33])
def test_normal_matches_closed_form(steps):
    """k-diffusion's get_sigmas: log sigma interpolated at linspace(999, 0, steps); then 0."""
    log_sigmas = closed_form_log_sigmas()
    expected = np.append(closed_form_t_to_sigma(np.linspace(999, 0, steps), log_sigmas), 0.0)
    ours = get_sigmas(NoiseSchedule.from_betas(**SD_BETAS), steps, "normal")
    np.testing.assert_allclose(ours.numpy(), expected, rtol=2 * EPS32, atol=0)


def test_normal_matches_diffusers_at_integer_timesteps():
    """With 10 steps linspace(999, 0, 10) hits integers (step 111), where diffusers' linear-in-sigma
    interpolation and k-diffusion's log-linear one agree."""
    reference = _diffusers_euler()
    reference.set_timesteps(10)
    ours = get_sigmas(NoiseSchedule(reference.alphas_cumprod), 10, "normal")
    torch.testing.assert_close(ours, reference.sigmas, rtol=2 * EPS32, atol=0)


@pytest.mark.parametrize("steps", [10, 20, 30, 50])
def test_ddim_uniform_matches_diffusers_timesteps(steps):
    reference = diffusers.DDIMScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading")
    reference.set_timesteps(steps)
    schedule = NoiseSchedule(reference.alphas_cumprod)
    ours = get_sigmas(schedule, steps, "ddim_uniform")
    assert ours.shape == (steps + 1,) and ours[-1] == 0
    torch.testing.assert_close(ours[:-1], schedule.sigmas[reference.timesteps].float(), rtol=0, atol=0)


def test_discard_penultimate_sigma_drops_the_next_to_last():
    schedule = NoiseSchedule.from_betas(**SD_BETAS)
    longer = get_sigmas(schedule, 11, "normal")
    discarded = get_sigmas(schedule, 10, "normal", discard_penultimate=True)
    assert discarded.shape == (11,)
    assert torch.equal(discarded, torch.cat([longer[:10], longer[11:]]))


def test_sigma_to_t_matches_diffusers_and_inverts_t_to_sigma():
    schedule = NoiseSchedule.from_betas(**SD_BETAS)
    log_sigmas = schedule.log_sigmas.numpy()
    sigmas = np.concatenate([np.exp(np.linspace(np.log(0.01), np.log(20.0), 301)), schedule.sigmas[::97].numpy()])
    reference = _diffusers_euler()._sigma_to_t(sigmas, log_sigmas)  # k-diffusion's rule, in numpy
    ours = schedule.sigma_to_t(torch.from_numpy(sigmas))
    assert ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), reference, rtol=0, atol=1e-9)
    inside = torch.from_numpy(sigmas[(sigmas >= schedule.sigma_min) & (sigmas <= schedule.sigma_max)])
    torch.testing.assert_close(schedule.t_to_sigma(schedule.sigma_to_t(inside)), inside, rtol=1e-12, atol=0)
    t = torch.tensor([0.0, 1.0, 500.0, 999.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.t_to_sigma(t), schedule.sigmas[t.long()], rtol=4e-16, atol=0)  # exp(log)
    np.testing.assert_allclose(schedule.t_to_sigma(torch.tensor([123.4], dtype=torch.float64)).numpy(),
                               closed_form_t_to_sigma(np.array([123.4]), log_sigmas), rtol=1e-12)


def test_sigma_to_t_quantize_gives_the_nearest_timestep():
    schedule = NoiseSchedule.from_betas(**SD_BETAS)
    sigma = torch.tensor([3.0, 0.5, 14.0])
    t = schedule.sigma_to_t(sigma, quantize=True)
    nearest = (sigma.double().log()[None] - schedule.log_sigmas[:, None]).abs().argmin(dim=0)
    assert torch.equal(t, nearest.float())


def _toy_prediction_model(kind: str, log_sigmas: np.ndarray, denoiser, seen: list):
    """A model of (x_in, t) predicting eps or v exactly for the toy data; sigma(t) from the closed form."""

    def model(x_in: torch.Tensor, t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        seen.append((args, kwargs))
        sigma = torch.from_numpy(closed_form_t_to_sigma(t.double().numpy(), log_sigmas)).to(x_in.dtype)
        s = sigma.reshape(-1, 1, 1, 1)
        x = x_in * (s**2 + 1).sqrt()
        x0 = denoiser(x, sigma)
        eps = (x - x0) / s
        if kind == "epsilon":
            return eps
        return (eps - s * x0) / (s**2 + 1).sqrt()  # v = alpha eps - sigma_vp x0

    return model


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_prediction_wrappers_recover_x0_and_match_diffusers(kind):
    denoiser = exact_denoiser(toy_mean())
    reference = _diffusers_euler(use_karras_sigmas=True, prediction_type=kind)
    reference.set_timesteps(8)
    schedule = NoiseSchedule(reference.alphas_cumprod)
    seen: list = []
    model = _toy_prediction_model(kind, schedule.log_sigmas.numpy(), denoiser, seen)
    wrap = eps_denoiser if kind == "epsilon" else v_denoiser
    wrapped = wrap(model, schedule)

    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(3)) * 4
    sigma = torch.tensor([5.0, 0.2])
    torch.testing.assert_close(wrapped(x, sigma, None), denoiser(x, sigma), rtol=0,
                               atol=16 * EPS32 * float(x.abs().max()))
    assert seen[-1] == ((), {})

    sigmas = get_sigmas(schedule, 8, "karras")
    x_start = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    calls: list = []
    ours = sample_euler(recording(lambda x, s: wrapped(x, s, None), calls), x_start, sigmas)

    def diffusers_model_output(scheduler, x_start):
        """diffusers' loop proper: model(scale_model_input(x), t) -> step."""
        sample = x_start
        for t in scheduler.timesteps:
            out = model(scheduler.scale_model_input(sample, t), t.reshape(1).expand(sample.shape[0]))
            sample = scheduler.step(out, t, sample).prev_sample
        return sample

    ref = diffusers_model_output(reference, x_start)
    torch.testing.assert_close(ours, ref, rtol=0, atol=x_tolerance(calls))


def test_prediction_wrapper_passes_conditioning():
    schedule = NoiseSchedule.from_betas(**SD_BETAS)
    seen: list = []
    model = lambda x_in, t, *args, **kwargs: seen.append((t, args, kwargs)) or torch.zeros_like(x_in)
    wrapped = eps_denoiser(model, schedule, quantize=True)
    x = torch.zeros(2, 4, 2, 2)
    context = torch.ones(2, 77, 8)
    wrapped(x, torch.tensor([1.0, 1.0]), context)
    wrapped(x, torch.tensor([1.0, 1.0]), {"context": context, "y": torch.ones(2, 16)})
    assert seen[0][1][0] is context and seen[0][2] == {}
    assert seen[1][1] == () and set(seen[1][2]) == {"context", "y"}
    assert torch.equal(seen[0][0], torch.round(seen[0][0]))  # quantized timesteps


def test_initial_noise_uses_a1111_batch_seeds():
    shape = (3, 4, 8, 6)
    noise = initial_noise(1234, shape)
    for b in range(3):
        expected = torch.randn(shape[1:], generator=torch.Generator("cpu").manual_seed(1234 + b))
        assert torch.equal(noise[b], expected)
        assert torch.equal(noise[b], initial_noise(1234 + b, (1, *shape[1:]))[0])
    half = initial_noise(1234, shape, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, noise.half())


def test_initial_noise_generators_continue_into_the_sampler():
    generators = batch_generators(7, 2)
    first = initial_noise(generators, (2, 4, 4, 4))
    second = torch.randn((4, 4, 4), generator=generators[1])
    fresh = torch.Generator().manual_seed(8)
    torch.randn((4, 4, 4), generator=fresh)
    assert torch.equal(first[1], initial_noise(8, (1, 4, 4, 4))[0])
    assert torch.equal(second, torch.randn((4, 4, 4), generator=fresh))
    with pytest.raises(SamplingError, match="generators"):
        initial_noise(batch_generators(7, 1), (2, 4, 4, 4))
    with pytest.raises(SamplingError, match="seed"):
        initial_noise(1.5, (1, 4, 4, 4))


@pytest.mark.parametrize(
    "steps,strength,start", [(20, 0.75, 4), (20, 1.0, 0), (20, 0.0, 19), (7, 0.5, 3), (10, 0.85, 1)]
)
def test_img2img_start_follows_a1111(steps, strength, start):
    """A1111: t_enc = int(min(s, 0.999) * N); sigmas[N - t_enc - 1:] (start index worked out by hand)."""
    sigmas = get_sigmas(NoiseSchedule.from_betas(**SD_BETAS), steps, "karras")
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sub, x = img2img_start(latent, noise, sigmas, strength)
    assert torch.equal(sub, sigmas[start:])
    assert torch.equal(x, latent + noise * sigmas[start])


def test_bad_options_raise():
    schedule = NoiseSchedule.from_betas(**SD_BETAS)
    with pytest.raises(SamplingError, match="unknown schedule type 'Karass'; expected one of .*Karras"):
        get_sigmas(schedule, 10, "Karass")
    with pytest.raises(SamplingError, match="'Automatic' is the sampler's own default"):
        get_sigmas(schedule, 10, "Automatic")
    with pytest.raises(SamplingError, match="steps"):
        get_sigmas(schedule, 0)
    with pytest.raises(SamplingError, match="beta_schedule"):
        NoiseSchedule.from_betas(beta_schedule="cosine")
    with pytest.raises(SamplingError, match="alphas_cumprod"):
        NoiseSchedule(torch.tensor([0.5, 0.9]))
    with pytest.raises(SamplingError, match="strength"):
        img2img_start(torch.zeros(1), torch.zeros(1), sigmas_karras(4, 0.1, 10.0), 1.5)
