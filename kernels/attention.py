"""Flash attention in Triton, differentiable: the entry point the attention dispatcher calls.

`flash_attention(q, k, v)` computes softmax(q k^T * scale) v with the forward kernel of
kernels/attention_forward.py (its docstring holds the contract: shapes, strides, head dims, dtypes) and,
when gradients are needed, the backward kernel of kernels/attention_backward.py, which recomputes the
probabilities from the saved per-row log-sum-exp, so training (textual inversion) runs fused in both
directions. The names the dispatcher and tests use (`supports`, `attention_reference`,
`KernelInputError`, ...) are re-exported from the forward module.
"""

from __future__ import annotations

import torch

from .attention_backward import flash_attention_backward
from .attention_forward import (
    FAST_DTYPES,
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    AttentionBlocks,
    KernelInputError,
    attention_reference,
    flash_attention_forward,
    supports,
)

__all__ = [
    "FAST_DTYPES", "MAX_HEAD_DIM", "SUPPORTED_DTYPES", "AttentionBlocks", "KernelInputError",
    "attention_reference", "flash_attention", "flash_attention_forward", "supports",
]


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd node: Triton forward (saving the log-sum-exp) and Triton backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float | None):  # type: ignore[override]
        out, lse = flash_attention_forward(q, k, v, causal=causal, scale=scale, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(grad_out, q, k, v, out, lse, causal=ctx.causal, scale=ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v with the Triton kernel, always (the SDPA fallback is the dispatcher's).

    q (B, H, N, d), k and v (B, H, M, d); returns (B, H, N, d) laid out like q. scale defaults to
    1/sqrt(d). Differentiable: when grad is needed the Triton backward kernel computes dq, dk, dv.
    """
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v)):
        return FlashAttentionFunction.apply(q, k, v, causal, scale)
    out, _ = flash_attention_forward(q, k, v, causal=causal, scale=scale)
    return out
