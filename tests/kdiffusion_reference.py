"""k-diffusion itself as the samplers' reference, loaded without the package's heavy imports.

A1111 1.10 pins k-diffusion 0.0.16 (commit ab527a9), whose ``k_diffusion/sampling.py`` is unchanged
on k-diffusion's main branch. ``import k_diffusion`` pulls torchvision, kornia, clip and wandb through its
``__init__``; only ``sampling.py`` (needs scipy, torchdiffeq, torchsde, tqdm) and ``external.py``
(``DiscreteSchedule``, ``DiscreteEpsDDPMDenoiser``) are needed, and of ``utils.py`` (which imports
torchvision) only ``append_dims``. So the two files are loaded by path as a private package whose
``utils`` holds a restated ``append_dims``. Install for these tests (CI too):
``pip install --no-deps k-diffusion==0.0.16 torchdiffeq`` (scipy, torchsde and tqdm are already test or
runtime requirements).

Also here: ``NoiseTape``, a per-step noise source both sides draw from (the object A1111 puts behind
k-diffusion's ``torch.randn_like``), and the tiny UNet denoiser.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from model_builders import build_modules, tiny_model_config

from tiengine.diffusion.schedules import NoiseSchedule, eps_denoiser

PACKAGE = "_kdiffusion_reference"


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """k-diffusion utils.append_dims: trailing singleton dimensions up to target_dims."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load_k_diffusion() -> tuple[types.ModuleType, types.ModuleType]:
    """(k_diffusion.sampling, k_diffusion.external) from the installed distribution; skips without it."""
    for requirement in ("scipy", "torchdiffeq", "torchsde", "tqdm"):
        pytest.importorskip(requirement)
    spec = importlib.util.find_spec("k_diffusion")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.0.16 torchdiffeq)")
    if PACKAGE not in sys.modules:
        folder = Path(next(iter(spec.submodule_search_locations)))
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(folder)]
        utils = types.ModuleType(f"{PACKAGE}.utils")
        utils.append_dims = _append_dims
        sys.modules[PACKAGE], sys.modules[f"{PACKAGE}.utils"] = package, utils
        for name in ("sampling", "external"):
            module_spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{name}", folder / f"{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
            setattr(package, name, module)
    return sys.modules[f"{PACKAGE}.sampling"], sys.modules[f"{PACKAGE}.external"]


class NoiseTape:
    """A per-step noise source: the next draws of a seeded CPU generator, float32, shaped like x."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = 0

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        self.draws += 1
        return torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x.device, x.dtype)

    def sampler(self, x: torch.Tensor):
        """As k-diffusion's noise_sampler argument: (sigma, sigma_next) -> the next draw."""
        return lambda sigma, sigma_next: self.randn_like(x)


def tiny_unet_denoiser(batch: int, seed: int = 0):
    """(denoiser (x, sigma) -> x0, NoiseSchedule): tiny SD1 UNet, eps prediction, fixed random context."""
    config = tiny_model_config("sd1")
    unet = build_modules(config, seed)["unet"].eval()
    context = torch.randn(batch, 8, config.unet.cross_attention_dim, generator=torch.Generator().manual_seed(seed))
    schedule = NoiseSchedule.from_betas()
    conditional = eps_denoiser(unet, schedule)

    @torch.no_grad()
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return conditional(x, sigma, context)

    return denoise, schedule
