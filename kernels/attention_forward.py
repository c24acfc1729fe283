"""Flash attention forward in Triton: softmax(q k^T * scale) v without the (queries x keys) matrix in memory.

Contract
- q: (batch, heads, queries, head_dim); k, v: (batch, heads, keys, head_dim); returns (batch, heads,
  queries, head_dim) with q's memory layout (torch.empty_like(q)), e.g. a (B, N, H, d) buffer seen as
  (B, H, N, d) stays that way, so the caller's transpose back is free.
- Any strides: the transposed views of a linear layer's (B, N, H * d) output go in without copies.
  The launcher tells the kernel the largest power of two dividing every row/slice offset
  (common.element_alignment, e.g. 8 for a head stride of 40) so that loads vectorise and pipeline.
- head_dim 1-256, cut into power-of-two dot widths (kernels/common.py): 40 = 32 + 16 (8 columns masked,
  1.2x the dot work instead of 1.6x for padding to 64), 80 = 64 + 16 and 160 = 128 + 32 (no padding),
  64 as is. Wider heads (the VAE mid-block's 512) are not supported: the dispatcher uses SDPA.
- Any key length >= 1 (77 for cross-attention): the last key block is masked; the full blocks before it
  run without masks.
- causal=True masks key j > query i (top-left aligned, torch's `is_causal`), for CLIP's text encoder.
- fp16 and bf16 (dots in the input dtype on tensor cores, fp32 accumulation and softmax statistics);
  fp32 runs too, with exact fp32 dots (slow: for exactness checks and explicit requests), but
  `supports` says False for it, so the dispatcher leaves fp32 to SDPA.
- batch and heads up to 65535 each (grid dimensions 2 and 1).
- Backward: kernels/attention_backward.py; kernels/attention.py joins both into the autograd function.

The algorithm is FlashAttention-2 (Dao, 2023): each program owns BLOCK_M query rows, streams key/value
blocks, and keeps a running row maximum m, row sum l and unnormalised output acc (online softmax, in
base 2: exp(x) = exp2(x * log2(e)), with log2(e) folded into the scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (
    HeadDimSplit,
    KernelInputError,
    cuda_capability_error,
    device_error,
    element_alignment,
    interpreter_active,
    load_tile,
    row_offsets,
    split_head_dim,
    store_tile,
)

MAX_HEAD_DIM = 256
MAX_GRID_BATCH_HEADS = 65535  # CUDA limit on grid dimensions 1 and 2
LOG2_E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FAST_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionBlocks:
    """Tile shape and launch parameters of one attention kernel launch."""

    block_m: int  # query rows per program
    block_n: int  # key rows per inner step
    num_warps: int = 4
    num_stages: int = 1


# Under TRITON_INTERPRET (CPU) one fixed configuration; unequal blocks exercise the causal bounds.
INTERPRETER_BLOCKS = AttentionBlocks(block_m=64, block_n=32)

# Forward candidates for the GPU autotuner (keyed on shape, head dim, causality and dtype).
FORWARD_GPU_BLOCKS = (
    AttentionBlocks(128, 64, 4, 3),
    AttentionBlocks(128, 64, 8, 3),
    AttentionBlocks(128, 128, 8, 3),
    AttentionBlocks(128, 32, 4, 4),
    AttentionBlocks(64, 64, 4, 3),
    AttentionBlocks(64, 32, 4, 4),
)


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """Plain PyTorch attention computed in fp32 (or fp64 for fp64 inputs), returned in q's dtype."""
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # (B, H, N, M)
    if causal:
        n_queries, n_keys = scores.shape[-2:]
        keep = torch.ones(n_queries, n_keys, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vc).to(q.dtype)  # (B, H, N, d)


def _validation_error(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, *, for_launch: bool
) -> str | None:
    """Why the kernel cannot take these inputs, or None. for_launch allows CPU tensors under the interpreter."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.ndim != 4:
            return f"{name} must be 4-D (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}"
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (q.device == k.device == v.device):
        return f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
    batch, heads, _, head_dim = q.shape
    if k.shape != v.shape:
        return f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    if k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != head_dim:
        return (
            f"k and v must be (batch={batch}, heads={heads}, keys, head_dim={head_dim}) to match q "
            f"{tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"head_dim must be 1-{MAX_HEAD_DIM}, got {head_dim} (wider heads go to SDPA)"
    if k.shape[2] < 1:
        return "k and v need at least one key token, got 0"
    if batch > MAX_GRID_BATCH_HEADS or heads > MAX_GRID_BATCH_HEADS:
        return f"batch and heads must each be at most {MAX_GRID_BATCH_HEADS}, got {batch} and {heads}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        # Offsets within one (batch, head) slice are int32 inside the kernel.
        if (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3) >= 2**31:
            return f"{name}'s (tokens, head_dim) slice spans more than 2**31 elements: {tuple(t.stride())}"
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        return f"scale must be a positive finite number or None, got {scale!r}"
    if for_launch:
        return device_error("q", q.device.type)
    if q.device.type != "cuda":
        return f"the Triton kernel runs on CUDA tensors, q is on {q.device.type}"
    return cuda_capability_error(q.device.index, (8, 0), "the Triton attention kernel")


def supports(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: float | None = None
) -> bool:
    """True for fp16/bf16 CUDA tensors flash_attention takes (shape, head dim, device capability): where
    the fused kernel is the fast path."""
    return _validation_error(q, k, v, scale, for_launch=False) is None and q.dtype in FAST_DTYPES


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
    """Raise KernelInputError when the launcher cannot take these tensors."""
    error = _validation_error(q, k, v, scale, for_launch=True)
    if error is not None:
        raise KernelInputError(f"flash_attention: {error}")


def check_buffer(name: str, buffer: torch.Tensor, like: torch.Tensor) -> None:
    """A caller-provided output buffer must match the tensor it stands for in shape, dtype and device."""
    if buffer.shape != like.shape or buffer.dtype != like.dtype or buffer.device != like.device:
        raise KernelInputError(
            f"flash_attention: {name} must be {tuple(like.shape)} {like.dtype} on {like.device}, "
            f"got {tuple(buffer.shape)} {buffer.dtype} on {buffer.device}"
        )


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots ("ieee"), never tf32; fp16/bf16 dots are exact products anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def head_dim_constants(split: HeadDimSplit) -> dict[str, int | bool]:
    """The head-dim constexprs every attention kernel takes."""
    return dict(
        HEAD_DIM=split.head_dim, D_A=split.part_a, D_B=split.part_b, D_B_TILE=split.part_b_tile,
        PAD_A=split.pad_a, PAD_B=split.pad_b,
    )


def autotune_configs(candidates: tuple[AttentionBlocks, ...]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps, num_stages=c.num_stages)
        for c in candidates
    ]


@triton.jit
def _forward_key_blocks(
    acc_a, acc_b, l_i, m_i, q_a, q_b, K, V, k_start, v_start,
    stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_da, offs_db, start_n, end_n, n_keys, qk_scale,
    HEAD_DIM: tl.constexpr, D_B: tl.constexpr, PAD_A: tl.constexpr, PAD_B: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold key blocks [start_n, end_n) into the running softmax state of one query block."""
    offs_block = tl.arange(0, BLOCK_N)
    for block_start in range(start_n, end_n, BLOCK_N):
        offs_n = block_start + offs_block
        k_rows = row_offsets(k_start, offs_n, stride_kn, ALIGN)
        v_rows = row_offsets(v_start, offs_n, stride_vn, ALIGN)
        k_a = load_tile(K, k_rows, offs_n, offs_da, stride_kd, n_keys, HEAD_DIM, MASK_KEYS, PAD_A)
        scores = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if D_B > 0:
            k_b = load_tile(K, k_rows, offs_n, offs_db, stride_kd, n_keys, HEAD_DIM, MASK_KEYS, PAD_B)
            scores = tl.dot(q_b, tl.trans(k_b), scores, input_precision=DOT_PRECISION)
        if MASK_KEYS:
            scores = tl.where(offs_n[None, :] < n_keys, scores, float("-inf"))
        if IS_CAUSAL:
            scores = tl.where(offs_n[None, :] <= offs_m[:, None], scores, float("-inf"))
        # Every row has a finite score in its first block (key 0 is valid for all rows), so m stays finite.
        m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
        probs = tl.math.exp2(scores * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(probs, 1)
        v_a = load_tile(V, v_rows, offs_n, offs_da, stride_vd, n_keys, HEAD_DIM, MASK_KEYS, PAD_A)
        probs_v = probs.to(v_a.dtype)
        acc_a = tl.dot(probs_v, v_a, acc_a * alpha[:, None], input_precision=DOT_PRECISION)
        if D_B > 0:
            v_b = load_tile(V, v_rows, offs_n, offs_db, stride_vd, n_keys, HEAD_DIM, MASK_KEYS, PAD_B)
            acc_b = tl.dot(probs_v, v_b, acc_b * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc_a, acc_b, l_i, m_i


@triton.jit
def _attention_forward_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    n_heads, n_queries, n_keys, qk_scale,
    HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, D_B_TILE: tl.constexpr,
    PAD_A: tl.constexpr, PAD_B: tl.constexpr, ALIGN: tl.constexpr, IS_CAUSAL: tl.constexpr,
    STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head). Grid: (cdiv(queries, BLOCK_M), heads, batch)."""
    block_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    k_start = batch * stride_kb + head * stride_kh
    v_start = batch * stride_vb + head * stride_vh
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_rows = row_offsets(batch * stride_qb + head * stride_qh, offs_m, stride_qn, ALIGN)
    offs_da = tl.arange(0, D_A)
    offs_db = D_A + tl.arange(0, D_B_TILE)
    q_a = load_tile(Q, q_rows, offs_m, offs_da, stride_qd, n_queries, HEAD_DIM, True, PAD_A)
    acc_a = tl.zeros([BLOCK_M, D_A], dtype=tl.float32)
    # Without a part B these 16-wide tiles are never touched (the compiler drops them).
    q_b = tl.zeros([BLOCK_M, D_B_TILE], dtype=q_a.dtype)
    acc_b = tl.zeros([BLOCK_M, D_B_TILE], dtype=tl.float32)
    if D_B > 0:
        q_b = load_tile(Q, q_rows, offs_m, offs_db, stride_qd, n_queries, HEAD_DIM, True, PAD_B)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Key blocks [0, unmasked_end) need no mask at all; [unmasked_end, masked_end) get key/causal masks.
    full_blocks_end = (n_keys // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        unmasked_end = tl.minimum((block_m * BLOCK_M) // BLOCK_N * BLOCK_N, full_blocks_end)
        masked_end = tl.minimum(n_keys, (block_m + 1) * BLOCK_M)
    else:
        unmasked_end = full_blocks_end
        masked_end = n_keys
    acc_a, acc_b, l_i, m_i = _forward_key_blocks(
        acc_a, acc_b, l_i, m_i, q_a, q_b, K, V, k_start, v_start, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_da, offs_db, 0, unmasked_end, n_keys, qk_scale,
        HEAD_DIM, D_B, PAD_A, PAD_B, ALIGN, BLOCK_N, False, False, DOT_PRECISION,
    )
    acc_a, acc_b, l_i, m_i = _forward_key_blocks(
        acc_a, acc_b, l_i, m_i, q_a, q_b, K, V, k_start, v_start, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_da, offs_db, unmasked_end, masked_end, n_keys, qk_scale,
        HEAD_DIM, D_B, PAD_A, PAD_B, ALIGN, BLOCK_N, True, IS_CAUSAL, DOT_PRECISION,
    )

    inv_l = 1.0 / l_i
    o_rows = row_offsets(batch * stride_ob + head * stride_oh, offs_m, stride_on, ALIGN)
    store_tile(Out, acc_a * inv_l[:, None], o_rows, offs_m, offs_da, stride_od, n_queries, HEAD_DIM, PAD_A)
    if D_B > 0:
        store_tile(Out, acc_b * inv_l[:, None], o_rows, offs_m, offs_db, stride_od, n_queries, HEAD_DIM, PAD_B)
    if STORE_LSE:
        # Base-2 log-sum-exp of the scaled scores, (B, H, N) contiguous: the backward pass recomputes
        # probabilities as exp2(score * qk_scale - lse).
        lse_ptrs = Lse + (batch * n_heads + head) * n_queries + offs_m
        tl.store(lse_ptrs, m_i + tl.math.log2(l_i), mask=offs_m < n_queries)


_attention_forward_tuned = triton.autotune(
    configs=autotune_configs(FORWARD_GPU_BLOCKS), key=["n_queries", "n_keys", "HEAD_DIM", "IS_CAUSAL"]
)(_attention_forward_kernel)


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    blocks: AttentionBlocks | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel; returns (out, lse or None).

    out: optional (B, H, N, d) buffer to write (any strides), else torch.empty_like(q).
    lse: (B, H, N) fp32 base-2 log-sum-exp of the scaled scores, for the backward pass.
    blocks: a fixed tile shape; None autotunes on the GPU and uses INTERPRETER_BLOCKS under the interpreter.
    """
    check_inputs(q, k, v, scale)
    batch, heads, n_queries, head_dim = q.shape
    n_keys = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if out is None:
        out = torch.empty_like(q)
    else:
        check_buffer("out", out, q)
    lse = torch.empty((batch, heads, n_queries), dtype=torch.float32, device=q.device) if return_lse else None
    if n_queries == 0:
        return out, lse
    args = (
        q, k, v, out, lse if lse is not None else out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, n_queries, n_keys, scale * LOG2_E,
    )
    constants = dict(
        **head_dim_constants(split_head_dim(head_dim)), ALIGN=element_alignment(q, k, v, out),
        IS_CAUSAL=bool(causal), STORE_LSE=return_lse, DOT_PRECISION=dot_precision(q.dtype),
    )
    if blocks is None and interpreter_active():
        blocks = INTERPRETER_BLOCKS
    if blocks is None:
        grid = lambda meta: (triton.cdiv(n_queries, meta["BLOCK_M"]), heads, batch)  # noqa: E731
        _attention_forward_tuned[grid](*args, **constants)
    else:
        grid = (triton.cdiv(n_queries, blocks.block_m), heads, batch)
        _attention_forward_kernel[grid](
            *args, **constants, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
            num_warps=blocks.num_warps, num_stages=blocks.num_stages,
        )
    return out, lse
