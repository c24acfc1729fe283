"""A1111's schedule types against k-diffusion's schedule functions, scipy and hand-worked tables.

References: k-diffusion 0.0.16's ``get_sigmas_karras`` / ``_exponential`` / ``_polyexponential`` and its
``DiscreteSchedule`` (``get_sigmas``, ``sigma_to_t``, ``t_to_sigma``), loaded by
tests/kdiffusion_reference.py; ``scipy.stats.beta.ppf``; the Align Your Steps tables and NVIDIA's
log-linear interpolation; the KL-optimal closed form; index lists worked out by hand from A1111's
Simple and DDIM rules.

Tolerances: k-diffusion evaluates in float32 (the table's log sigmas, the linspace of timesteps, Karras'
base raised to rho = 7, which multiplies the base's rounding by 7), we in float64 rounded once, so
values agree within UNIFORM_RTOL = 4 ulps for table interpolation and KARRAS_RTOL = 12 ulps for the
rho-powers (7 * 1.5 ulps of the base plus the final rounding); float64 references rounded once agree
within 2 ulps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kdiffusion_reference import load_k_diffusion
from sampling_reference import EPS32, SD_BETAS

from tiengine.diffusion.beta_dist import beta_ppf
from tiengine.diffusion.names import SCHEDULERS, SamplingError
from tiengine.diffusion.schedules import (
    AYS_SD15_SIGMAS,
    AYS_SDXL_SIGMAS,
    NoiseSchedule,
    get_sigmas,
)

UNIFORM_RTOL = 4 * EPS32
KARRAS_RTOL = 12 * EPS32
EXACT_RTOL = 2 * EPS32


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_betas(**SD_BETAS)


@pytest.fixture(scope="module")
def kd():
    return load_k_diffusion()


def _table(kd, schedule: NoiseSchedule):
    """k-diffusion's DiscreteSchedule over the model's float32 sigma table (what A1111 wraps models in)."""
    return kd[1].DiscreteSchedule(schedule.sigmas.float(), quantize=False)


@pytest.mark.parametrize("steps", [1, 7, 20])
def test_karras_exponential_polyexponential_match_k_diffusion(kd, schedule, steps):
    sampling = kd[0]
    low, high = schedule.sigma_min, schedule.sigma_max
    pairs = [
        ("karras", {}, sampling.get_sigmas_karras(steps, low, high)),
        ("Karras", {"rho": 5.0}, sampling.get_sigmas_karras(steps, low, high, rho=5.0)),
        ("exponential", {}, sampling.get_sigmas_exponential(steps, low, high)),
        ("polyexponential", {}, sampling.get_sigmas_polyexponential(steps, low, high)),
        ("Polyexponential", {"rho": 2.0}, sampling.get_sigmas_polyexponential(steps, low, high, rho=2.0)),
    ]
    for name, options, expected in pairs:
        ours = get_sigmas(schedule, steps, name, **options)
        assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
        torch.testing.assert_close(ours, expected, rtol=KARRAS_RTOL, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("steps", [1, 10, 33])
def test_uniform_normal_and_sgm_uniform_follow_the_discrete_table(kd, schedule, steps):
    """uniform: k-diffusion's get_sigmas; normal / sgm_uniform: timesteps evenly spaced between
    sigma_to_t(sigma_max) and sigma_to_t(sigma_min) (sgm: steps + 1 of them, the last dropped)."""
    table = _table(kd, schedule)
    torch.testing.assert_close(get_sigmas(schedule, steps, "uniform"), table.get_sigmas(steps), rtol=UNIFORM_RTOL, atol=0)
    start, end = table.sigma_to_t(table.sigma_max), table.sigma_to_t(table.sigma_min)
    normal = torch.cat([table.t_to_sigma(torch.linspace(start, end, steps)), torch.zeros(1)])
    sgm = torch.cat([table.t_to_sigma(torch.linspace(start, end, steps + 1)[:-1]), torch.zeros(1)])
    torch.testing.assert_close(get_sigmas(schedule, steps, "Normal"), normal, rtol=UNIFORM_RTOL, atol=0)
    torch.testing.assert_close(get_sigmas(schedule, steps, "SGM Uniform"), sgm, rtol=UNIFORM_RTOL, atol=0)


@pytest.mark.parametrize("steps,indices", [
    (10, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),  # stride 100
    (7, [999, 857, 714, 571, 428, 285, 142]),  # 999 - int(k * 1000 / 7)
])
def test_simple_takes_table_entries(schedule, steps, indices):
    expected = torch.cat([schedule.sigmas[indices].float(), torch.zeros(1)])
    torch.testing.assert_close(get_sigmas(schedule, steps, "Simple"), expected, rtol=0, atol=0)


@pytest.mark.parametrize("steps,timesteps", [
    (10, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
    (7, [995, 853, 711, 569, 427, 285, 143, 1]),  # stride 142: eight timesteps below 1000, as A1111 runs
    (30, list(range(991, 0, -33))),  # stride 33: 31 timesteps
])
def test_ddim_schedule_is_ldm_uniform_discretization(schedule, steps, timesteps):
    ours = get_sigmas(schedule, steps, "DDIM")
    torch.testing.assert_close(ours, torch.cat([schedule.sigmas[timesteps].float(), torch.zeros(1)]), rtol=0, atol=0)
    assert get_sigmas(schedule, steps, "ddim_uniform").shape == (steps + 1,)  # tiengine's own: exactly `steps`


@pytest.mark.parametrize("steps", [1, 5, 12])
def test_kl_optimal_closed_form(schedule, steps):
    """sigma_k = tan((k / n) atan(sigma_min) + (1 - k / n) atan(sigma_max)), k = 0 .. n; no 0 appended."""
    k = np.arange(steps + 1) / steps
    expected = np.tan(k * np.arctan(schedule.sigma_min) + (1 - k) * np.arctan(schedule.sigma_max))
    ours = get_sigmas(schedule, steps, "KL Optimal")
    np.testing.assert_allclose(ours.numpy(), expected, rtol=EXACT_RTOL, atol=0)
    assert float(ours[-1]) == pytest.approx(schedule.sigma_min, rel=EXACT_RTOL)


@pytest.mark.parametrize("steps", [5, 10, 11, 20])
@pytest.mark.parametrize("sdxl", [False, True])
def test_align_your_steps_tables_and_interpolation(schedule, steps, sdxl):
    table = np.asarray(AYS_SDXL_SIGMAS if sdxl else AYS_SD15_SIGMAS)
    if steps == 11:
        expected = table
    else:  # NVIDIA's loglinear_interp: log sigma linear in position, both grids over [0, 1]
        expected = np.exp(np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, 11), np.log(table[::-1])))[::-1]
    ours = get_sigmas(schedule, steps, "Align Your Steps", sdxl=sdxl)
    np.testing.assert_allclose(ours.numpy(), np.append(expected, 0.0), rtol=EXACT_RTOL, atol=0)
    assert AYS_SD15_SIGMAS[1] == 6.475 and AYS_SDXL_SIGMAS[1] == 6.315  # the published tables


@pytest.mark.parametrize("steps", [1, 6, 25])
def test_beta_schedule_matches_scipy(schedule, steps):
    stats = pytest.importorskip("scipy.stats")
    quantiles = stats.beta.ppf(1 - np.linspace(0, 1, steps), 0.6, 0.6)
    expected = np.append(schedule.sigma_min + quantiles * (schedule.sigma_max - schedule.sigma_min), 0.0)
    np.testing.assert_allclose(get_sigmas(schedule, steps, "Beta").numpy(), expected, rtol=EXACT_RTOL, atol=0)
    other = stats.beta.ppf(1 - np.linspace(0, 1, steps), 2.0, 0.5)
    ours = get_sigmas(schedule, steps, "beta", beta_alpha=2.0, beta_beta=0.5).numpy()
    np.testing.assert_allclose(ours[:-1], schedule.sigma_min + other * (schedule.sigma_max - schedule.sigma_min),
                               rtol=EXACT_RTOL, atol=0)


def test_beta_quantiles_match_scipy():
    """Within the problem's conditioning: q carries 2^-52 of rounding, which moves the quantile by
    2^-52 / density; 4 times that, plus 1e-15, bounds both implementations' disagreement."""
    stats = pytest.importorskip("scipy.stats")
    for a, b in ((0.6, 0.6), (0.5, 0.5), (2.0, 5.0), (1.0, 1.0), (7.5, 0.3)):
        for q in (1e-9, 0.001, 0.1, 0.25, 0.5, 0.8, 0.999, 1 - 1e-9):
            expected = float(stats.beta.ppf(q, a, b))
            bound = 4 * 2.0**-52 / float(stats.beta.pdf(expected, a, b)) + 1e-15
            assert abs(beta_ppf(q, a, b) - expected) <= bound, (q, a, b)
    assert (beta_ppf(0.0, 0.6, 0.6), beta_ppf(1.0, 0.6, 0.6)) == (0.0, 1.0)


def test_every_listed_schedule_builds_and_discard_drops_the_penultimate(schedule):
    for name in SCHEDULERS:
        for steps in (1, 4, 21):
            sigmas = get_sigmas(schedule, steps, name)
            assert sigmas.dtype == torch.float32 and bool((sigmas[:-1] > sigmas[1:]).all()), (name, steps)
            assert sigmas.shape[0] >= steps + 1 and float(sigmas[0]) <= 14.62
            longer = get_sigmas(schedule, steps + 1, name)
            dropped = get_sigmas(schedule, steps, name, discard_penultimate=True)
            assert torch.equal(dropped, torch.cat([longer[:-2], longer[-1:]])), (name, steps)


def test_bad_schedule_options_raise(schedule):
    with pytest.raises(SamplingError, match="Automatic"):
        get_sigmas(schedule, 10, "automatic")
    with pytest.raises(SamplingError, match="unknown schedule type 'cosine'; expected one of Automatic"):
        get_sigmas(schedule, 10, "cosine")
    with pytest.raises(SamplingError, match="rho"):
        get_sigmas(schedule, 10, "karras", rho=0.0)
    with pytest.raises(SamplingError, match="Beta schedule"):
        get_sigmas(schedule, 10, "beta", beta_alpha=-1.0)
    with pytest.raises(SamplingError, match="steps"):
        get_sigmas(schedule, 0, "simple")
