"""Brownian-tree noise for the SDE samplers, as A1111 seeds it (k-diffusion's BrownianTreeNoiseSampler).

A1111 runs DPM++ SDE, DPM++ 2M SDE, DPM++ 2M SDE Heun and DPM++ 3M SDE (its "brownian_noise" samplers)
with ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=<the batch's seeds>)`` from k-diffusion
(``k_diffusion/sampling.py``, MIT): one ``torchsde.BrownianTree`` per image, seeded (``entropy``) with that
image's seed, spanning [transform(sigma_min), transform(sigma_max)] with sigma_min the smallest positive
and sigma_max the largest sigma of the schedule (A1111 passes the full schedule, also in img2img where
sampling runs only its tail). A query (sigma, sigma_next) returns the path's increment between
transform(sigma_next) and transform(sigma), with the sign of the interval's direction, divided by
sqrt(|transform(sigma_next) - transform(sigma)|): unit-variance noise. Because the tree depends only on
its seed, image b of a batch gets the same noise as a lone run with its seed.

The trees are float32 (A1111's latents are float32) and live on ``device`` (default: x's device, as in
k-diffusion): torchsde draws with that device's generator, so CPU and CUDA trees differ, like A1111 on
either. Noise is returned on x's device and dtype. torchsde rounds every time to 6 decimals (the
tree's 1e-6 tolerance) and clamps queries into its span; float32 round trips such as DPM++ SDE's
``exp(-(-log sigma))`` can land a hair outside it, which torchsde warns about. The same happens in
A1111; the queries here are k-diffusion's, unchanged, and only that warning is silenced.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torchsde

from tiengine.diffusion.names import SamplingError
from tiengine.diffusion.sampler_core import NoiseSampler


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def brownian_noise_sampler(
    x: torch.Tensor,
    sigmas: torch.Tensor,
    seeds: Sequence[int],
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] = _identity,
    device: torch.device | str | None = None,
) -> NoiseSampler:
    """A noise sampler ``(sigma, sigma_next) -> (B, C, H, W)`` with one Brownian tree per image of x.

    ``seeds``: image b's seed at position b (A1111's seeds of the batch). ``transform`` maps a sigma
    (float32 0-d tensor) to the tree's time (k-diffusion's argument; A1111 uses the identity).
    """
    seeds = [int(seed) for seed in seeds]
    if len(seeds) != x.shape[0]:
        raise SamplingError(f"Brownian noise: expected {x.shape[0]} seeds (one per image), found {len(seeds)}")
    if any(seed < 0 for seed in seeds):
        raise SamplingError(f"Brownian noise: expected seeds >= 0, found {seeds}")
    values = torch.as_tensor(sigmas).detach().to("cpu", torch.float32).reshape(-1)
    positive = values[values > 0]
    if positive.numel() == 0:
        raise SamplingError(f"Brownian noise: expected a schedule with a positive sigma, found {values.tolist()}")
    ends = [transform(positive.min()), transform(values.max())]
    start, end = sorted(float(t) for t in ends)
    direction = 1.0 if float(ends[0]) < float(ends[1]) else -1.0  # k-diffusion's tree sign
    tree_device = x.device if device is None else torch.device(device)
    w0 = torch.zeros(x.shape[1:], dtype=torch.float32, device=tree_device)  # (C, H, W)
    trees = [torchsde.BrownianTree(start, w0, end, entropy=seed) for seed in seeds]

    def sample(sigma: float, sigma_next: float) -> torch.Tensor:
        t0 = transform(torch.as_tensor(sigma, dtype=torch.float32))
        t1 = transform(torch.as_tensor(sigma_next, dtype=torch.float32))
        sign = direction if float(t0) < float(t1) else -direction
        low, high = sorted((float(t0), float(t1)))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            increment = torch.stack([tree(low, high) for tree in trees]) * sign  # (B, C, H, W)
        return (increment / (t1 - t0).abs().sqrt().to(increment.device)).to(device=x.device, dtype=x.dtype)

    return sample
