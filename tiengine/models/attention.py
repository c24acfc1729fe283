"""Attention dispatcher: the one place the text encoder, UNet and VAE compute softmax(q k^T * scale) v.

Inputs are (batch, heads, tokens, head_dim) tensors. The backend is an argument, never a global:
- "sdpa": torch.nn.functional.scaled_dot_product_attention (any device; PyTorch picks its kernel).
- "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math": SDPA restricted to one of its kernels
  (torch.nn.attention.sdpa_kernel, scoped to the call); an error if that kernel cannot take the inputs.
  For benchmarks and comparisons.
- "triton": tiengine.kernels.attention.flash_attention, forced (an error if it cannot take the inputs).
- "auto": "triton" for CUDA tensors the kernel supports (fp16/bf16, head dim <= 256, compute capability
  8.0+, triton importable), else "sdpa" (CPU, fp32, the VAE's 512-wide heads). fp32 stays on SDPA because
  the Triton kernel keeps fp32 exact (no tf32), which is slower than PyTorch's fp32 kernels.
`resolve_backend` tells which concrete backend "auto" picks for given inputs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

AttentionBackend = Literal["auto", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "triton"]
ATTENTION_BACKENDS: tuple[str, ...] = (
    "auto", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "triton",
)
# backend name -> torch.nn.attention.SDPBackend member name
SDPA_KERNELS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_math": "MATH",
}


def _triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None) -> bool:
    if not q.is_cuda:
        return False
    try:
        from tiengine.kernels import attention as triton_attention
    except ImportError:  # triton not installed (e.g. a platform without wheels)
        return False
    return triton_attention.supports(q, k, v, causal=causal, scale=scale)


def resolve_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: AttentionBackend = "auto",
) -> str:
    """The concrete backend `attention` runs for these inputs: `backend` itself unless it is "auto"."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "triton" if _triton_supports(q, k, v, causal, scale) else "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: AttentionBackend = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale) v for q (B, H, N, d), k and v (B, H, M, d); returns (B, H, N, d).

    scale defaults to 1/sqrt(d); causal masks key j > query i (top-left aligned, as torch's is_causal).
    """
    chosen = resolve_backend(q, k, v, causal=causal, scale=scale, backend=backend)
    if chosen == "triton":
        from tiengine.kernels import attention as triton_attention

        return triton_attention.flash_attention(q, k, v, causal=causal, scale=scale)
    if chosen == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, SDPA_KERNELS[chosen])):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
