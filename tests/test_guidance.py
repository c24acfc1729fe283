"""Classifier-free guidance, AND composition and per-call prompt schedules against hand-computed results.

The fake conditional denoiser records every call and returns a value that depends on x, sigma and the
conditioning row, so a cond mixed up with another one, a wrong weight or a wrong batch layout changes the
result. Expected values are computed by calling the fake once per cond (no batching) and applying
A1111's formula ``uncond + sum_j (cond_j - uncond) * w_j * cfg_scale`` by hand.
"""

from __future__ import annotations

import pytest
import torch

from tiengine.diffusion.samplers import (
    get_sampler,
    guided_denoiser,
    sample_euler,
    scheduled_cond,
    scheduled_guided_denoiser,
)
from tiengine.diffusion.schedules import NoiseSchedule, SamplingError, eps_denoiser, get_sigmas

B, C, T = 2, 8, 77


class FakeDenoiser:
    """(x, sigma, cond) -> x * 0.5 + sigma + per-row summary of the cond; records its inputs."""

    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        self.calls.append((x.clone(), sigma.clone(), cond))
        context = cond["context"] if isinstance(cond, dict) else cond
        summary = context.double().mul(torch.arange(1, context.shape[1] + 1, dtype=torch.float64)[None, :, None])
        summary = summary.sum(dim=(1, 2)).to(x.dtype)  # (N,), weighs token positions differently
        if isinstance(cond, dict):
            summary = summary + cond["y"].sum(dim=1)
        return x * 0.5 + sigma.reshape(-1, 1, 1, 1) + summary.reshape(-1, 1, 1, 1)


def _cond(seed: int, tokens: int = T) -> torch.Tensor:
    return torch.randn(B, tokens, C, generator=torch.Generator().manual_seed(seed))


def _expected(fake_values: list[torch.Tensor], uncond_value: torch.Tensor, weights, cfg_scale) -> torch.Tensor:
    out = uncond_value.clone()
    for value, weight in zip(fake_values, weights):
        out = out + (value - uncond_value) * (weight * cfg_scale)
    return out


def _assert_guided(out, fake_values, uncond_value, weights, cfg_scale) -> None:
    """Equal up to fp32 rounding: batched and single calls may reduce in another order (a few ulps of the
    largest term), amplified by at most 1 + cfg_scale * sum|w| in the combination."""
    expected = _expected(fake_values, uncond_value, weights, cfg_scale)
    largest = max(float(v.abs().max()) for v in [*fake_values, uncond_value])
    atol = 4 * 2.0**-23 * largest * (1 + cfg_scale * sum(abs(w) for w in weights))
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)


def test_and_composition_in_one_batched_call():
    x = torch.randn(B, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([3.0, 3.0])
    conds, weights, uncond = [_cond(1), _cond(2), _cond(3)], [1.0, 0.7, -0.2], _cond(4)
    fake = FakeDenoiser()
    out = guided_denoiser(fake, uncond, list(zip(conds, weights)), 7.5)(x, sigma)

    assert len(fake.calls) == 1
    x_in, sigma_in, cond_in = fake.calls[0]
    assert torch.equal(x_in, torch.cat([x, x, x, x]))  # (4B, ...): cond_1, cond_2, cond_3, uncond
    assert torch.equal(sigma_in, sigma.repeat(4))
    assert torch.equal(cond_in, torch.cat(conds + [uncond]))

    single = FakeDenoiser()
    _assert_guided(out, [single(x, sigma, c) for c in conds], single(x, sigma, uncond), weights, 7.5)


def test_positive_conds_of_different_lengths_are_padded_with_their_last_vector():
    """A1111's stack_conds; an uncond of another token count is then run as its own call."""
    x = torch.randn(B, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([2.0, 2.0])
    short, long, uncond = _cond(1, T), _cond(2, 2 * T), _cond(3, T)
    fake = FakeDenoiser()
    out = guided_denoiser(fake, uncond, [(short, 1.0), (long, 0.5)], 5.0)(x, sigma)

    assert len(fake.calls) == 2
    _, _, positive = fake.calls[0]
    padded = torch.cat([short, short[:, -1:].repeat(1, T, 1)], dim=1)  # (B, 154, C)
    assert torch.equal(positive, torch.cat([padded, long]))
    assert torch.equal(fake.calls[1][2], uncond) and torch.equal(fake.calls[1][0], x)

    single = FakeDenoiser()
    _assert_guided(out, [single(x, sigma, padded), single(x, sigma, long)], single(x, sigma, uncond), [1.0, 0.5], 5.0)


def test_dict_conds_reach_the_model_as_keywords():
    """SDXL-style {"context": (B, T, C), "y": (B, 2816)} through the eps wrapper and the guidance."""
    seen: list = []

    def eps_model(x_in, t, *, context, y):
        seen.append((x_in.shape, t.shape, context, y))
        return torch.zeros_like(x_in) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + y[:, :1].reshape(-1, 1, 1, 1)

    denoiser = eps_denoiser(eps_model, NoiseSchedule.from_betas())
    cond = {"context": _cond(1), "y": torch.randn(B, 2816)}
    uncond = {"context": _cond(2), "y": torch.zeros(B, 2816)}
    x = torch.randn(B, 4, 4, 4)
    sigma = torch.tensor([1.5, 1.5])
    out = guided_denoiser(denoiser, uncond, [(cond, 1.0)], 6.0)(x, sigma)
    assert len(seen) == 1
    assert seen[0][0] == (2 * B, 4, 4, 4) and seen[0][1] == (2 * B,)
    assert torch.equal(seen[0][2], torch.cat([cond["context"], uncond["context"]]))
    assert torch.equal(seen[0][3], torch.cat([cond["y"], uncond["y"]]))
    _assert_guided(out, [denoiser(x, sigma, cond)], denoiser(x, sigma, uncond), [1.0], 6.0)


def test_batch_size_mismatch_names_the_key():
    fake = FakeDenoiser()
    bad = {"context": _cond(1), "y": torch.zeros(B + 1, 2816)}
    good = {"context": _cond(2), "y": torch.zeros(B, 2816)}
    with pytest.raises(SamplingError, match=r"conds\[0\]\['y'\].*batch size 2"):
        guided_denoiser(fake, good, [(bad, 1.0)], 7.0)(torch.zeros(B, 4, 4, 4), torch.ones(B))
    with pytest.raises(SamplingError, match="at least one"):
        guided_denoiser(fake, good, [], 7.0)(torch.zeros(B, 4, 4, 4), torch.ones(B))


def test_scheduled_cond_follows_a1111():
    schedule = [(2, "a"), (4, "b"), (9, "c")]
    assert [scheduled_cond(schedule, i) for i in range(11)] == ["a"] * 3 + ["b"] * 2 + ["c"] * 5 + ["a"]
    with pytest.raises(SamplingError):
        scheduled_cond([], 0)


def _tagged(value: float, tokens: int = T) -> torch.Tensor:
    return torch.full((B, tokens, C), value)


def test_prompt_schedules_advance_once_per_model_call():
    """Heun with 4 steps makes 7 calls; call i uses the first entry with i <= last_step."""
    fake = FakeDenoiser()
    positive = [(2, _tagged(1.0)), (4, _tagged(2.0)), (8, _tagged(3.0))]  # cf. "[[a:b:2]:c:4]" doubled steps
    second = [(8, _tagged(10.0))]
    uncond = [(3, _tagged(-1.0)), (8, _tagged(-2.0))]
    denoiser = scheduled_guided_denoiser(fake, uncond, [(positive, 1.0), (second, 0.5)], 7.0)
    sigmas = get_sigmas(NoiseSchedule.from_betas(), 4, "karras")
    x = torch.randn(B, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    get_sampler("Heun").sample(denoiser, x, sigmas)

    assert len(fake.calls) == get_sampler("Heun").model_calls(4) == 7
    tags = [tuple(cond[::B, 0, 0].tolist()) for _, _, cond in fake.calls]  # one row per cond block
    assert tags == [(1.0, 10.0, -1.0)] * 3 + [(2.0, 10.0, -1.0)] + [(2.0, 10.0, -2.0)] + [(3.0, 10.0, -2.0)] * 2


def test_guided_denoiser_is_a_plain_denoiser_for_every_sampler():
    """The Euler loop is untouched: guidance with one cond at cfg 1 equals sampling the cond alone."""
    fake = FakeDenoiser()
    cond, uncond = _cond(1), _cond(2)
    sigmas = get_sigmas(NoiseSchedule.from_betas(), 5, "karras")
    x = torch.randn(B, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    guided = sample_euler(guided_denoiser(fake, uncond, [(cond, 1.0)], 1.0), x, sigmas)
    plain = sample_euler(lambda x, s: fake(x, s, cond), x, sigmas)
    # uncond + (cond - uncond) * 1 rounds once or twice per step at the scale of the values involved
    scale = max(float(t.abs().max()) for t in (x, guided, plain, fake(x, sigmas[:1].expand(B), uncond)))
    torch.testing.assert_close(guided, plain, rtol=0, atol=4 * 2.0**-23 * scale * len(sigmas))
