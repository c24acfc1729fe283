"""Fused-op dispatcher: GroupNorm(+SiLU) and GEGLU for the UNet and VAE, as attention.py is for attention.

The UNet's and VAE's resnet blocks compute GroupNorm -> SiLU (norm1, norm2, conv_norm_out) and plain
GroupNorm (Transformer2DModel.norm, the VAE mid-block attention's group_norm); the UNet's transformer
feed-forward computes diffusers' GEGLU (`hidden, gate = proj(x).chunk(2); hidden * gelu(gate)`). Both
go through this module, which picks the kernel. The backend is an argument, never a global:
- "torch": PyTorch ops, GroupNorm in fp32 for fp16/bf16 inputs then SiLU; F.linear, chunk, GELU,
  product. Exactly the ops (in the same order) the models ran before the kernels were wired, so CPU
  outputs are bit-for-bit unchanged.
- "triton": tiengine.kernels.groupnorm.group_norm_silu / tiengine.kernels.geglu.geglu, forced; they raise
  KernelInputError (naming the argument) when they cannot take the inputs, e.g. CPU tensors without
  TRITON_INTERPRET=1, or channels_last activations for GroupNorm.
- "auto": "triton" for CUDA tensors the kernel's `supports` accepts (fp16/bf16, compute capability
  8.0+, triton importable; GroupNorm also needs contiguous NCHW input), else "torch" (CPU, fp32,
  channels_last). fp32 stays on PyTorch, as for attention: the kernels keep fp32 exact (no tf32) and
  cuBLAS / cuDNN are the faster fp32 paths.
`resolve_group_norm_backend` and `resolve_geglu_backend` tell which backend "auto" picks for given inputs.
Models take `fused_backend` in their constructor (the default for every forward) and in forward /
encode / decode (an override for one call), as they take `attention_backend`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

FusedBackend = Literal["auto", "torch", "triton"]
FUSED_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check(backend: str) -> None:
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"fused backend must be one of {FUSED_BACKENDS}, got {backend!r}")


def _resolve(backend: FusedBackend, x: torch.Tensor, kernel: str, supported: Callable[[ModuleType], bool]) -> str:
    """`backend` unless "auto"; for "auto", "triton" when x is on CUDA, tiengine.kernels.<kernel> imports
    (triton installed) and `supported(module)` says the kernel takes these inputs, else "torch"."""
    _check(backend)
    if backend != "auto":
        return backend
    if not x.is_cuda:
        return "torch"
    try:
        module = importlib.import_module(f"tiengine.kernels.{kernel}")
    except ImportError:  # triton not installed (e.g. a platform without wheels)
        return "torch"
    return "triton" if supported(module) else "torch"


def resolve_group_norm_backend(norm: nn.GroupNorm, x: torch.Tensor, backend: FusedBackend = "auto") -> str:
    """The concrete backend `group_norm` runs for `norm` on x: `backend` itself unless it is "auto"."""
    return _resolve(backend, x, "groupnorm",
                    lambda kernel: kernel.supports(x, norm.num_groups, norm.weight, norm.bias, norm.eps))


def group_norm(
    norm: nn.GroupNorm, x: torch.Tensor, *, silu: bool = False, backend: FusedBackend = "auto"
) -> torch.Tensor:
    """norm(x) (then SiLU if `silu`) for x (B, C, *spatial), computed in fp32 for fp16/bf16 inputs."""
    if resolve_group_norm_backend(norm, x, backend) == "triton":
        from tiengine.kernels import groupnorm as triton_groupnorm

        return triton_groupnorm.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu)
    if x.dtype in HALF_DTYPES:
        y = F.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
        return (F.silu(y, inplace=True) if silu else y).to(x.dtype)
    y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(y, inplace=True) if silu else y


def resolve_geglu_backend(proj: nn.Linear, x: torch.Tensor, backend: FusedBackend = "auto") -> str:
    """The concrete backend `geglu` runs for projection `proj` on x: `backend` itself unless it is "auto"."""
    return _resolve(backend, x, "geglu", lambda kernel: kernel.supports(x, proj.weight, proj.bias))


def geglu(proj: nn.Linear, x: torch.Tensor, *, backend: FusedBackend = "auto") -> torch.Tensor:
    """diffusers GEGLU: x (..., dim) -> hidden * gelu(gate) (..., inner), hidden, gate = proj(x).chunk(2)."""
    if resolve_geglu_backend(proj, x, backend) == "triton":
        from tiengine.kernels import geglu as triton_geglu

        return triton_geglu.geglu(x, proj.weight, proj.bias)
    hidden, gate = F.linear(x, proj.weight, proj.bias).chunk(2, dim=-1)  # each (..., inner)
    return F.gelu(gate).mul_(hidden)
