"""A1111's k-diffusion samplers, Brownian SDE noise and names against k-diffusion itself and A1111's tables.

References: k-diffusion 0.0.16's ``sampling.py`` (A1111 1.10's pin; loaded by tests/kdiffusion_reference.py)
run on the same denoiser with the same injected noise: per-step noise from a ``NoiseTape`` both sides draw
from (ours through ``generator=``, k-diffusion through ``noise_sampler=``), Brownian noise from
k-diffusion's ``BrownianTreeNoiseSampler`` seeded with the same per-image seeds. Denoisers: the exact
posterior mean of a Gaussian-mixture toy distribution (nonlinear, tests/sampling_reference.py) and a tiny
random SD1 UNet. A1111's sampler table (names, aliases, options) is transcribed from
``modules/sd_samplers_kdiffusion.py`` / ``sd_samplers_lcm.py`` of stable-diffusion-webui 1.10.

Tolerances: every model call's sigma within SIGMA_RTOL (4 float32 ulps; model-call sigmas are formed with
k-diffusion's float32 arithmetic and came out bit-equal), every call's x and the result within
X_TOL_ULPS = 16 float32 ulps of the run's largest |x| (tests/sampling_reference.py: the O(10) roundings
of a step plus the carried error). Observed: at most 0.8 ulps on the toy denoiser and 5.4 on the tiny
UNet, whose output amplifies its input's rounding differences; many runs are bit-equal.
"""

from __future__ import annotations

import pytest
import torch
from kdiffusion_reference import NoiseTape, load_k_diffusion, tiny_unet_denoiser
from sampling_reference import (
    EPS32,
    LATENT_SHAPE,
    SD_BETAS,
    SIGMA_RTOL,
    exact_denoiser,
    recording,
    toy_mean,
    x_tolerance,
)

from tiengine.diffusion.brownian import brownian_noise_sampler
from tiengine.diffusion.lcm import lcm_denoiser, lcm_noise_schedule, lcm_timesteps
from tiengine.diffusion.names import (
    SAMPLER_NAMES,
    SamplingError,
    schedule_label,
    schedule_name,
    split_sampler_name,
)
from tiengine.diffusion.samplers import (
    SAMPLERS,
    get_sampler,
    resolve_sampler,
    resolve_schedule,
)
from tiengine.diffusion.samplers_k import sample_euler_ancestral
from tiengine.diffusion.samplers_restart import restart_steps, sample_restart
from tiengine.diffusion.schedules import NoiseSchedule, get_sigmas

STEPS = 8
SEEDS = (1234, 98765)  # A1111's per-image seeds of the batch
# DDIM, PLMS, UniPC: A1111's timestep samplers, against the LDM algorithms in tests/test_timestep_samplers.py
K_NAMES = [name for name in SAMPLER_NAMES if name not in ("DDIM", "PLMS", "UniPC", "LCM", "Restart")]

# A1111 1.10's samplers_k_diffusion + samplers_data_lcm: name -> (aliases, "scheduler", options).
A1111_SAMPLERS = {
    "DPM++ 2M": (["k_dpmpp_2m"], "karras", {}),
    "DPM++ SDE": (["k_dpmpp_sde"], "karras", {"second_order", "brownian_noise"}),
    "DPM++ 2M SDE": (["k_dpmpp_2m_sde"], "exponential", {"brownian_noise"}),
    "DPM++ 2M SDE Heun": (["k_dpmpp_2m_sde_heun"], "exponential", {"brownian_noise"}),  # solver_type heun
    "DPM++ 2S a": (["k_dpmpp_2s_a"], "karras", {"uses_ensd", "second_order"}),
    "DPM++ 3M SDE": (["k_dpmpp_3m_sde"], "exponential", {"discard_next_to_last_sigma", "brownian_noise"}),
    "Euler a": (["k_euler_a", "k_euler_ancestral"], None, {"uses_ensd"}),
    "Euler": (["k_euler"], None, set()),
    "LMS": (["k_lms"], None, set()),
    "Heun": (["k_heun"], None, {"second_order"}),
    "DPM2": (["k_dpm_2"], "karras", {"discard_next_to_last_sigma", "second_order"}),
    "DPM2 a": (["k_dpm_2_a"], "karras", {"discard_next_to_last_sigma", "uses_ensd", "second_order"}),
    "DPM fast": (["k_dpm_fast"], None, {"uses_ensd"}),
    "DPM adaptive": (["k_dpm_ad"], None, {"uses_ensd"}),
    "Restart": (["restart"], "karras", {"second_order"}),
    "LCM": (["k_lcm"], None, set()),
}


pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")  # k-diffusion's torchsde queries


@pytest.fixture(scope="module")
def kd():
    return load_k_diffusion()[0]


# ------------------------------------------------------------------------------------ registry and names


def test_registry_carries_a1111_options():
    assert tuple(SAMPLERS) == SAMPLER_NAMES
    for name, (aliases, scheduler, options) in A1111_SAMPLERS.items():
        info = get_sampler(name)
        assert info.default_scheduler == (scheduler or "uniform"), name  # none named: k-diffusion get_sigmas
        assert info.second_order == ("second_order" in options), name
        assert info.discard_penultimate_sigma == ("discard_next_to_last_sigma" in options), name
        assert info.uses_ensd == ("uses_ensd" in options), name
        assert info.brownian_noise == ("brownian_noise" in options), name
        for alias in aliases:
            assert resolve_sampler(alias) == (info, None) and resolve_sampler(alias.upper()) == (info, None)
    assert get_sampler("DPM adaptive").adaptive and get_sampler("DPM adaptive").model_calls(20) is None
    assert get_sampler("LCM").sigma_table is not None and get_sampler("LCM").model_wrapper is not None


@pytest.mark.parametrize("text,expected", [
    ("DPM++ 2M Karras", ("DPM++ 2M", "karras")),
    ("dpm++ 2m karras", ("DPM++ 2M", "karras")),
    ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "exponential")),
    ("DPM++ 2M SDE Heun Karras", ("DPM++ 2M SDE Heun", "karras")),
    ("DPM++ 3M SDE Karras", ("DPM++ 3M SDE", "karras")),
    ("Euler a SGM Uniform", ("Euler a", "sgm_uniform")),
    ("Euler a SGMUniform", ("Euler a", "sgm_uniform")),
    ("Euler Align Your Steps", ("Euler", "align_your_steps")),
    ("LMS Karras", ("LMS", "karras")),
    ("k_dpmpp_2m_ka", ("DPM++ 2M", "karras")),
    ("k_dpmpp_2m_sde_exp", ("DPM++ 2M SDE", "exponential")),
    ("  Euler   a ", ("Euler a", None)),
    ("DDIM", ("DDIM", None)),
    ("Euler a Automatic", ("Euler a", "automatic")),
])
def test_sampler_names_split_like_a1111(text, expected):
    assert split_sampler_name(text) == expected
    info, schedule = resolve_sampler(text)
    assert info.name == expected[0] and schedule == (None if expected[1] == "automatic" else expected[1])


def test_schedule_names_labels_and_automatic():
    assert [schedule_label(name) for name in ("karras", "SGM uniform", "kl_optimal", "align_your_steps", "ddim")] == \
        ["Karras", "SGM Uniform", "KL Optimal", "Align Your Steps", "DDIM"]
    assert schedule_name("Karras") == schedule_name("KARRAS") == "karras"
    assert resolve_schedule(get_sampler("DPM++ 2M"), None) == "karras"
    assert resolve_schedule(get_sampler("DPM++ 2M"), "Automatic") == "karras"
    assert resolve_schedule(get_sampler("Euler a"), "automatic") == "uniform"
    assert resolve_schedule(get_sampler("Euler a"), "Exponential") == "exponential"
    for bad, match in (("Karras 7", "schedule type"), ("DPM++ 2X", "sampler.*DPM\\+\\+ 2X"),
                       ("DPM++ 2M Karrass", "sampler")):
        with pytest.raises(SamplingError, match=match):
            (schedule_name if bad.startswith("Karras") else split_sampler_name)(bad)


# ------------------------------------------------------------------------ samplers against k-diffusion


def _reference(kd, name: str, model, x, sigmas, tape: NoiseTape | None, noise_sampler):
    """k-diffusion's function for the A1111 sampler `name`, with A1111's arguments."""
    noise = tape.sampler(x) if tape is not None else None
    simple = {"Euler": kd.sample_euler, "Heun": kd.sample_heun, "DPM2": kd.sample_dpm_2, "LMS": kd.sample_lms,
              "DPM++ 2M": kd.sample_dpmpp_2m}
    if name in simple:
        return simple[name](model, x, sigmas, disable=True)
    ancestral = {"Euler a": kd.sample_euler_ancestral, "DPM2 a": kd.sample_dpm_2_ancestral,
                 "DPM++ 2S a": kd.sample_dpmpp_2s_ancestral}
    if name in ancestral:
        return ancestral[name](model, x, sigmas, disable=True, noise_sampler=noise)
    if name == "DPM fast":
        return kd.sample_dpm_fast(model, x, float(sigmas[-2]), float(sigmas[0]), len(sigmas) - 1, disable=True,
                                  eta=1.0, noise_sampler=noise)
    if name == "DPM adaptive":
        return kd.sample_dpm_adaptive(model, x, float(sigmas[-2]), float(sigmas[0]), disable=True, eta=1.0,
                                      noise_sampler=noise)
    sde = {"DPM++ SDE": (kd.sample_dpmpp_sde, {}), "DPM++ 2M SDE": (kd.sample_dpmpp_2m_sde, {}),
           "DPM++ 2M SDE Heun": (kd.sample_dpmpp_2m_sde, {"solver_type": "heun"}),
           "DPM++ 3M SDE": (kd.sample_dpmpp_3m_sde, {})}
    function, extra = sde[name]
    return function(model, x, sigmas, disable=True, noise_sampler=noise_sampler, **extra)


def _run_both(kd, name: str, denoiser, x, sigmas):
    """(ours, our calls, k-diffusion's, its calls, our tape, its tape)."""
    info = get_sampler(name)
    ours_tape, ref_tape = NoiseTape(7), NoiseTape(7)
    ours_calls: list = []
    ref_calls: list = []
    extra = {}
    ref_noise = None
    if info.brownian_noise:
        seeds = list(SEEDS[: x.shape[0]])
        extra["noise_sampler"] = brownian_noise_sampler(x, sigmas, seeds)
        ref_noise = kd.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
    ours = info.sample(recording(denoiser, ours_calls), x, sigmas, generator=ours_tape, **extra)
    ref = _reference(kd, name, recording(denoiser, ref_calls), x, sigmas, ref_tape, ref_noise)
    return ours, ours_calls, ref, ref_calls, ours_tape, ref_tape


def _assert_same_run(ours, ours_calls, ref, ref_calls) -> None:
    assert len(ours_calls) == len(ref_calls)
    tol = x_tolerance(ref_calls)
    for i, ((x, sigma), (x_ref, sigma_ref)) in enumerate(zip(ours_calls, ref_calls)):
        assert sigma == pytest.approx(sigma_ref, rel=SIGMA_RTOL, abs=0), f"call {i}"
        torch.testing.assert_close(x, x_ref, rtol=0, atol=tol, msg=lambda m, i=i: f"call {i}: {m}")
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)


def _default_sigmas(name: str, steps: int, schedule: NoiseSchedule) -> torch.Tensor:
    info = get_sampler(name)
    return get_sigmas(schedule, steps, info.default_scheduler, discard_penultimate=info.discard_penultimate_sigma)


@pytest.mark.parametrize("name", K_NAMES)
def test_sampler_matches_k_diffusion_on_the_toy_denoiser(kd, name):
    sigmas = _default_sigmas(name, STEPS, NoiseSchedule.from_betas(**SD_BETAS))
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    ours, ours_calls, ref, ref_calls, ours_tape, ref_tape = _run_both(kd, name, exact_denoiser(toy_mean()), x, sigmas)
    _assert_same_run(ours, ours_calls, ref, ref_calls)
    assert ours_tape.draws == ref_tape.draws  # the per-image noise stream stays aligned with A1111's
    if get_sampler(name).stochastic and not get_sampler(name).brownian_noise:
        assert ours_tape.draws > 0


@pytest.mark.parametrize("name", K_NAMES)
def test_sampler_matches_k_diffusion_on_a_tiny_unet(kd, name):
    denoiser, schedule = tiny_unet_denoiser(batch=1)
    steps = 4 if name != "DPM adaptive" else 2  # adaptive: the span, not the steps, sets its calls
    sigmas = _default_sigmas(name, steps, schedule)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5)) * sigmas[0]
    ours, ours_calls, ref, ref_calls, _, _ = _run_both(kd, name, denoiser, x, sigmas)
    _assert_same_run(ours, ours_calls, ref, ref_calls)


@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive"])
def test_dpm_solver_without_eta_matches_k_diffusion(kd, name):
    """eta = 0 (k-diffusion's default): the deterministic DPM-Solver, no draws."""
    sigmas = get_sigmas(NoiseSchedule.from_betas(**SD_BETAS), 10, "uniform")
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    denoiser = exact_denoiser(toy_mean())
    ours_calls: list = []
    ref_calls: list = []
    ours = get_sampler(name).sample(recording(denoiser, ours_calls), x, sigmas, eta=0.0)
    low, high = float(sigmas[-2]), float(sigmas[0])
    if name == "DPM fast":
        ref = kd.sample_dpm_fast(recording(denoiser, ref_calls), x, low, high, 10, disable=True)
    else:
        ref = kd.sample_dpm_adaptive(recording(denoiser, ref_calls), x, low, high, disable=True)
    _assert_same_run(ours, ours_calls, ref, ref_calls)


@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive"])
def test_dpm_solver_takes_the_model_bounds_for_txt2img(kd, name):
    """A1111's txt2img passes the model's sigma_min / sigma_max whatever the schedule (here "simple",
    whose last positive sigma is not the table's smallest)."""
    schedule = NoiseSchedule.from_betas(**SD_BETAS)
    sigmas = get_sigmas(schedule, 9, "simple")
    assert float(sigmas[-2]) > 1.01 * schedule.sigma_min
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(6)) * sigmas[0]
    denoiser = exact_denoiser(toy_mean())
    ours_calls: list = []
    ref_calls: list = []
    ours = get_sampler(name).sample(recording(denoiser, ours_calls), x, sigmas, generator=NoiseTape(2),
                                    sigma_min=schedule.sigma_min, sigma_max=schedule.sigma_max)
    bounds = (schedule.sigma_min, schedule.sigma_max)
    noise = NoiseTape(2).sampler(x)
    if name == "DPM fast":
        ref = kd.sample_dpm_fast(recording(denoiser, ref_calls), x, *bounds, 9, disable=True, eta=1.0,
                                 noise_sampler=noise)
    else:
        ref = kd.sample_dpm_adaptive(recording(denoiser, ref_calls), x, *bounds, disable=True, eta=1.0,
                                     noise_sampler=noise)
    _assert_same_run(ours, ours_calls, ref, ref_calls)
    assert ours_calls[-1][1] < float(sigmas[-2])  # it went below the schedule's last positive sigma


def test_the_tolerance_detects_a_subtle_change(kd):
    """The bound is not loose: DPM++ 2M SDE run with the Heun correction against k-diffusion's midpoint
    one differs by far more."""
    sigmas = _default_sigmas("DPM++ 2M SDE", STEPS, NoiseSchedule.from_betas(**SD_BETAS))
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    ours, _, ref, ref_calls, _, _ = _run_both(kd, "DPM++ 2M SDE", exact_denoiser(toy_mean()), x, sigmas)
    heun = get_sampler("DPM++ 2M SDE Heun").sample(exact_denoiser(toy_mean()), x, sigmas,
                                                   noise_sampler=brownian_noise_sampler(x, sigmas, SEEDS))
    assert float((heun - ref).abs().max()) > 100 * x_tolerance(ref_calls) > float((ours - ref).abs().max())


# ---------------------------------------------------------------------------------- Brownian noise


def test_brownian_noise_equals_k_diffusion_bit_for_bit(kd):
    sigmas = get_sigmas(NoiseSchedule.from_betas(**SD_BETAS), 10, "karras")
    x = torch.zeros(LATENT_SHAPE)
    ours = brownian_noise_sampler(x, sigmas, SEEDS)
    ref = kd.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=list(SEEDS))
    queries = [(sigmas[i], sigmas[i + 1]) for i in range(9)] + [(sigmas[2], sigmas[5]), (sigmas[4], sigmas[3])]
    for sigma, sigma_next in queries:
        assert torch.equal(ours(float(sigma), float(sigma_next)), ref(sigma, sigma_next))
    other = brownian_noise_sampler(x, sigmas, (SEEDS[0], SEEDS[1] + 1))(float(sigmas[1]), float(sigmas[2]))
    same = ours(float(sigmas[1]), float(sigmas[2]))
    assert torch.equal(other[0], same[0]) and not torch.allclose(other[1], same[1])  # one tree per image
    assert abs(float(same.std()) - 1) < 0.25  # unit variance (512 values)
    logs = brownian_noise_sampler(x, sigmas, SEEDS, transform=torch.log)  # k-diffusion's transform argument
    ref_logs = kd.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=list(SEEDS),
                                           transform=torch.log)
    assert torch.equal(logs(float(sigmas[3]), float(sigmas[4])), ref_logs(sigmas[3], sigmas[4]))


@pytest.mark.parametrize("name", ["DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"])
def test_brownian_batches_reproduce_single_images(name):
    """A1111's batch determinism: image b of a batch equals a lone run with seed b."""
    info = get_sampler(name)
    sigmas = _default_sigmas(name, 6, NoiseSchedule.from_betas(**SD_BETAS))
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    denoiser = exact_denoiser(toy_mean())
    batch = info.sample(denoiser, x, sigmas, noise_sampler=brownian_noise_sampler(x, sigmas, SEEDS))
    for b in range(2):
        single = info.sample(denoiser, x[b:b + 1], sigmas,
                             noise_sampler=brownian_noise_sampler(x[b:b + 1], sigmas, SEEDS[b:b + 1]))
        torch.testing.assert_close(batch[b:b + 1], single, rtol=0, atol=4 * EPS32 * float(x.abs().max()))


def test_brownian_noise_checks_its_seeds():
    sigmas = get_sigmas(NoiseSchedule.from_betas(**SD_BETAS), 4, "karras")
    with pytest.raises(SamplingError, match="expected 2 seeds"):
        brownian_noise_sampler(torch.zeros(LATENT_SHAPE), sigmas, [1])


# ------------------------------------------------------------------------------- per-step noise objects


def test_ancestral_noise_comes_from_a_randn_like_object():
    """One Euler a step (eta = 1) on a denoiser returning 0: x_next = x * sigma_down / sigma + z * sigma_up,
    z being the object's draw."""
    x = torch.ones(2, 1, 2, 2)
    source = NoiseTape(11)
    out = sample_euler_ancestral(lambda x, sigma: torch.zeros_like(x), x, torch.tensor([2.0, 1.0]), generator=source)
    z = NoiseTape(11).randn_like(x)
    sigma_up = (1.0 * (4.0 - 1.0) / 4.0) ** 0.5
    torch.testing.assert_close(out, x * (1 - sigma_up**2) ** 0.5 / 2.0 + z * sigma_up, rtol=0, atol=1e-6)
    assert source.draws == 1

    class WrongShape:
        def randn_like(self, x):
            return torch.zeros(3)

    with pytest.raises(SamplingError, match="noise source gave shape"):
        sample_euler_ancestral(lambda x, sigma: x, x, torch.tensor([2.0, 1.0]), generator=WrongShape())


# ------------------------------------------------------------------------------------------ Restart


def test_restart_below_20_steps_is_heun(kd):
    sigmas = get_sigmas(NoiseSchedule.from_betas(**SD_BETAS), 12, "karras")
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    denoiser = exact_denoiser(toy_mean())
    ours_calls: list = []
    ref_calls: list = []
    tape = NoiseTape(1)
    ours = sample_restart(recording(denoiser, ours_calls), x, sigmas, generator=tape)
    ref = kd.sample_heun(recording(denoiser, ref_calls), x, sigmas, disable=True)
    _assert_same_run(ours, ours_calls, ref, ref_calls)
    assert tape.draws == 0


@pytest.mark.parametrize("steps,restart_count,repeats", [(20, 9, 1), (36, 9, 2), (41, 10, 2)])
def test_restart_is_heun_segments_with_renoising(kd, steps, restart_count, repeats):
    """The restart algorithm rebuilt from k-diffusion's pieces: Heun along a Karras main schedule down
    to the sigma nearest 0.1, then `repeats` times: noise up to the main sigma nearest 2 and Heun down a
    Karras schedule of restart_count + 1 sigmas; noise to close any gap; Heun to the end."""
    sigmas = get_sigmas(NoiseSchedule.from_betas(**SD_BETAS), steps, "exponential")  # Restart re-plans as Karras
    main = kd.get_sigmas_karras(steps - restart_count * repeats, float(sigmas[-2]), float(sigmas[0]))
    low, high = int((main - 0.1).abs().argmin()), int((main - 2.0).abs().argmin())
    restart = kd.get_sigmas_karras(restart_count + 1, float(main[low]), float(main[high]))[:-1]
    pairs = [*zip(main[:low].tolist(), main[1:low + 1].tolist())]
    pairs += [*zip(restart[:-1].tolist(), restart[1:].tolist())] * repeats
    pairs += [*zip(main[low:-1].tolist(), main[low + 1:].tolist())]
    assert restart_steps(sigmas) == pairs and len(pairs) == steps

    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    denoiser = exact_denoiser(toy_mean())
    ref_calls: list = []
    model, tape = recording(denoiser, ref_calls), NoiseTape(5)
    ref = kd.sample_heun(model, x, main[: low + 1], disable=True)
    last = main[low]
    for _ in range(repeats):
        ref = ref + tape.randn_like(ref) * float((restart[0] ** 2 - last**2) ** 0.5)
        ref = kd.sample_heun(model, ref, restart, disable=True)
        last = restart[-1]
    if last < main[low]:
        ref = ref + tape.randn_like(ref) * float((main[low] ** 2 - last**2) ** 0.5)
    ref = kd.sample_heun(model, ref, main[low:], disable=True)
    ours_calls: list = []
    ours_tape = NoiseTape(5)
    ours = sample_restart(recording(denoiser, ours_calls), x, sigmas, generator=ours_tape)
    _assert_same_run(ours, ours_calls, ref, ref_calls)
    assert ours_tape.draws == tape.draws >= repeats
    assert len(ours_calls) == get_sampler("Restart").model_calls(steps)


# ---------------------------------------------------------------------------------------------- LCM


def _toy_eps_model(x_in: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """An eps model whose output depends on its input, its timestep and its cond."""
    return torch.tanh(x_in) * (1 + t.reshape(-1, 1, 1, 1) / 1000) + cond


def test_lcm_table_and_denoiser_against_k_diffusion():
    """LCM's 50 timesteps are 19, 39, ..., 999; the denoiser is k-diffusion's DiscreteEpsDDPMDenoiser on
    that table (quantized: the nearest entry's training timestep) followed by LCM's boundary scaling."""
    _, external = load_k_diffusion()
    schedule = NoiseSchedule.from_betas(**SD_BETAS)
    assert torch.equal(lcm_timesteps(schedule), torch.arange(19, 1000, 20))
    table = lcm_noise_schedule(schedule)
    assert torch.equal(table.sigmas, schedule.sigmas[19::20])
    seen: list = []

    def indexed_model(x_in, index, cond):  # k-diffusion hands the table index; LCM maps it to a timestep
        seen.append(index.clone())
        return _toy_eps_model(x_in, index * 20.0 + 19.0, cond)

    reference = external.DiscreteEpsDDPMDenoiser(indexed_model, schedule.alphas_cumprod[19::20], quantize=True)
    ours = lcm_denoiser(_toy_eps_model, schedule)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    cond = torch.randn(4, 4, 1, 1, generator=torch.Generator().manual_seed(1))
    sigma = torch.cat([table.sigmas[[49, 20]].float(), torch.tensor([1.0, 0.05])])  # (4,): on and off the table
    x0 = reference(x, sigma, cond=cond)
    scaled = (seen[0] * 20.0 + 19.0).reshape(-1, 1, 1, 1) * 10.0
    expected = scaled / (scaled**2 + 0.25) ** 0.5 * x0 + 0.25 / (scaled**2 + 0.25) * x
    assert seen[0].tolist()[:2] == [49, 20]
    torch.testing.assert_close(ours(x, sigma, cond), expected, rtol=0, atol=8 * EPS32 * float(x.abs().max()))


def test_lcm_sampler_and_its_automatic_schedule():
    """x = D(x, sigma_i) + sigma_{i+1} z; Automatic is "uniform" on LCM's table, which equals A1111's LCM
    get_sigmas: timesteps linspace(999, 19, n) mapped to table positions (t - 19) / 20."""
    _, external = load_k_diffusion()
    schedule = NoiseSchedule.from_betas(**SD_BETAS)
    info = get_sampler("LCM")
    sigmas = get_sigmas(info.sigma_table(schedule), 6, info.default_scheduler)
    table = external.DiscreteSchedule(schedule.sigmas[19::20].float(), quantize=False)
    positions = ((torch.linspace(999, 19, 6) - 19) / 20).clamp(0, 49)
    expected = torch.cat([table.t_to_sigma(positions), torch.zeros(1)])
    # float32 positions are off by up to 49 * 2^-24 table steps; log sigma moves < 0.4 per step
    torch.testing.assert_close(sigmas, expected, rtol=4 * EPS32, atol=0)
    denoiser = exact_denoiser(toy_mean())
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    ours = info.sample(denoiser, x, sigmas, generator=NoiseTape(4))
    tape, ref = NoiseTape(4), x
    for i in range(6):
        ref = denoiser(ref, torch.full((2,), float(sigmas[i])))
        if sigmas[i + 1] > 0:
            ref = ref + tape.randn_like(ref) * float(sigmas[i + 1])
    torch.testing.assert_close(ours, ref, rtol=0, atol=4 * EPS32 * float(x.abs().max()))
    assert tape.draws == 5
