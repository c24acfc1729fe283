"""Attention dispatcher: the one place the text encoder, UNet and VAE compute softmax(q k^T * scale) v.

Inputs are (batch, heads, tokens, head_dim) tensors. The backend is an argument, never a global:
- "sdpa": torch.nn.functional.scaled_dot_product_attention (any device; PyTorch picks its kernel).
- "triton": tiengine.kernels.attention.flash_attention (CUDA tensors the kernel supports).
- "auto": "triton" when the kernel supports the inputs on a CUDA device, else "sdpa".
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

AttentionBackend = Literal["auto", "sdpa", "triton"]
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "sdpa", "triton")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    backend: AttentionBackend = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for q (B, H, N, d), k and v (B, H, M, d); returns (B, H, N, d)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "sdpa" or (backend == "auto" and not q.is_cuda):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    from tiengine.kernels import attention as triton_attention

    if backend == "auto" and not triton_attention.supports(q, k, v, causal=causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return triton_attention.flash_attention(q, k, v, causal=causal)
