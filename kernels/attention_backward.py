"""Flash-attention backward in Triton: dq, dk, dv from dout, the forward output and its log-sum-exp.

Contract: the tensors of kernels/attention_forward.py's forward (same shapes, strides, dtypes, head dims, causal
rule), plus dout laid out like q and lse (B, H, N) fp32 from `flash_attention_forward(return_lse=True)`.
dq, dk, dv come back laid out like q, k, v (torch.empty_like).

Algorithm (FlashAttention-2 backward, Dao 2023), with P recomputed as exp2(s * qk_scale - lse):
  delta_i = sum_d dout_id * out_id                       (preprocess kernel, fp32)
  dv_j = sum_i P_ij dout_i,  dP_ij = dout_i . v_j,  dS_ij = P_ij (dP_ij - delta_i)
  dk_j = scale * sum_i dS_ij q_i                         (one program per key block, loops over queries)
  dq_i = scale * sum_j dS_ij k_j                         (one program per query block, loops over keys)
Two kernels instead of one with atomics keep every result written exactly once (deterministic), at the
price of computing P and dP twice. P and dS go into the dots in the input dtype, as in the forward.
The reference is autograd through kernels.attention_forward.attention_reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_forward import (
    INTERPRETER_BLOCKS,
    LOG2_E,
    AttentionBlocks,
    autotune_configs,
    check_buffer,
    check_inputs,
    dot_precision,
    head_dim_constants,
)
from .common import (
    KernelInputError,
    element_alignment,
    interpreter_active,
    load_tile,
    row_offsets,
    split_head_dim,
    store_tile,
)

# (block_m = query rows per step, block_n = key rows per program) for the dk/dv kernel, and
# (block_m = query rows per program, block_n = key rows per step) for the dq kernel.
DKDV_GPU_BLOCKS = (
    AttentionBlocks(32, 64, 4, 3),
    AttentionBlocks(32, 128, 8, 3),
    AttentionBlocks(64, 64, 4, 3),
    AttentionBlocks(64, 128, 8, 2),
    AttentionBlocks(32, 64, 8, 3),  # head dim 160: the 4-warp tiles above spill registers on sm90
    AttentionBlocks(16, 128, 8, 3),
)
DQ_GPU_BLOCKS = (
    AttentionBlocks(64, 32, 4, 3),
    AttentionBlocks(128, 32, 8, 3),
    AttentionBlocks(64, 64, 4, 3),
    AttentionBlocks(128, 64, 8, 2),
)
PREPROCESS_BLOCK_M = 32  # rows per program of the delta kernel (memory-bound; keeps d=256 tiles in registers)


@triton.jit
def _delta_kernel(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    n_heads, n_queries,
    HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, D_B_TILE: tl.constexpr,
    PAD_A: tl.constexpr, PAD_B: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta (B, H, N) fp32 = rowwise sum of dout * out. Grid: (cdiv(N, BLOCK_M), heads, batch)."""
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_rows = row_offsets(batch * stride_ob + head * stride_oh, offs_m, stride_on, ALIGN)
    g_rows = row_offsets(batch * stride_gb + head * stride_gh, offs_m, stride_gn, ALIGN)
    offs_da = tl.arange(0, D_A)
    o_a = load_tile(Out, o_rows, offs_m, offs_da, stride_od, n_queries, HEAD_DIM, True, PAD_A)
    g_a = load_tile(DOut, g_rows, offs_m, offs_da, stride_gd, n_queries, HEAD_DIM, True, PAD_A)
    delta = tl.sum(o_a.to(tl.float32) * g_a.to(tl.float32), 1)
    if D_B > 0:
        offs_db = D_A + tl.arange(0, D_B_TILE)
        o_b = load_tile(Out, o_rows, offs_m, offs_db, stride_od, n_queries, HEAD_DIM, True, PAD_B)
        g_b = load_tile(DOut, g_rows, offs_m, offs_db, stride_gd, n_queries, HEAD_DIM, True, PAD_B)
        delta += tl.sum(o_b.to(tl.float32) * g_b.to(tl.float32), 1)
    tl.store(Delta + (batch * n_heads + head) * n_queries + offs_m, delta, mask=offs_m < n_queries)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    n_heads, n_queries, n_keys, qk_scale, scale,
    HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, D_B_TILE: tl.constexpr,
    PAD_A: tl.constexpr, PAD_B: tl.constexpr, ALIGN: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: dk, dv for BLOCK_N keys of one (batch, head). Grid: (cdiv(M, BLOCK_N), heads, batch).

    Works on transposed tiles (keys x queries) so that no probability tile needs a transpose.
    """
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    q_start = batch * stride_qb + head * stride_qh
    g_start = batch * stride_gb + head * stride_gh
    row_stats = (batch * n_heads + head) * n_queries  # offset of this (batch, head) in lse and delta

    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_rows = row_offsets(batch * stride_kb + head * stride_kh, offs_n, stride_kn, ALIGN)
    v_rows = row_offsets(batch * stride_vb + head * stride_vh, offs_n, stride_vn, ALIGN)
    offs_da = tl.arange(0, D_A)
    offs_db = D_A + tl.arange(0, D_B_TILE)
    k_a = load_tile(K, k_rows, offs_n, offs_da, stride_kd, n_keys, HEAD_DIM, True, PAD_A)
    v_a = load_tile(V, v_rows, offs_n, offs_da, stride_vd, n_keys, HEAD_DIM, True, PAD_A)
    dk_a = tl.zeros([BLOCK_N, D_A], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, D_A], dtype=tl.float32)
    k_b = tl.zeros([BLOCK_N, D_B_TILE], dtype=k_a.dtype)
    v_b = tl.zeros([BLOCK_N, D_B_TILE], dtype=v_a.dtype)
    dk_b = tl.zeros([BLOCK_N, D_B_TILE], dtype=tl.float32)
    dv_b = tl.zeros([BLOCK_N, D_B_TILE], dtype=tl.float32)
    if D_B > 0:
        k_b = load_tile(K, k_rows, offs_n, offs_db, stride_kd, n_keys, HEAD_DIM, True, PAD_B)
        v_b = load_tile(V, v_rows, offs_n, offs_db, stride_vd, n_keys, HEAD_DIM, True, PAD_B)

    # Causal: queries before this key block see none of its keys.
    start_m = (start_n // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0
    offs_block = tl.arange(0, BLOCK_M)
    for block_start in range(start_m, n_queries, BLOCK_M):
        offs_m = block_start + offs_block
        q_rows = row_offsets(q_start, offs_m, stride_qn, ALIGN)
        g_rows = row_offsets(g_start, offs_m, stride_gn, ALIGN)
        q_a = load_tile(Q, q_rows, offs_m, offs_da, stride_qd, n_queries, HEAD_DIM, True, PAD_A)
        g_a = load_tile(DOut, g_rows, offs_m, offs_da, stride_gd, n_queries, HEAD_DIM, True, PAD_A)
        # Rows past the end get lse = +inf, hence probability 0.
        lse = tl.load(Lse + row_stats + offs_m, mask=offs_m < n_queries, other=float("inf"))
        delta = tl.load(Delta + row_stats + offs_m, mask=offs_m < n_queries, other=0.0)
        scores_t = tl.dot(k_a, tl.trans(q_a), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dprobs_t = tl.dot(v_a, tl.trans(g_a), input_precision=DOT_PRECISION)
        if D_B > 0:
            q_b = load_tile(Q, q_rows, offs_m, offs_db, stride_qd, n_queries, HEAD_DIM, True, PAD_B)
            g_b = load_tile(DOut, g_rows, offs_m, offs_db, stride_gd, n_queries, HEAD_DIM, True, PAD_B)
            scores_t = tl.dot(k_b, tl.trans(q_b), scores_t, input_precision=DOT_PRECISION)
            dprobs_t = tl.dot(v_b, tl.trans(g_b), dprobs_t, input_precision=DOT_PRECISION)
        probs_t = tl.math.exp2(scores_t * qk_scale - lse[None, :])
        if IS_CAUSAL:
            probs_t = tl.where(offs_m[None, :] >= offs_n[:, None], probs_t, 0.0)
        dscores_t = (probs_t * (dprobs_t - delta[None, :])).to(q_a.dtype)
        probs_t = probs_t.to(g_a.dtype)
        dv_a = tl.dot(probs_t, g_a, dv_a, input_precision=DOT_PRECISION)
        dk_a = tl.dot(dscores_t, q_a, dk_a, input_precision=DOT_PRECISION)
        if D_B > 0:
            dv_b = tl.dot(probs_t, g_b, dv_b, input_precision=DOT_PRECISION)
            dk_b = tl.dot(dscores_t, q_b, dk_b, input_precision=DOT_PRECISION)

    dk_rows = row_offsets(batch * stride_dkb + head * stride_dkh, offs_n, stride_dkn, ALIGN)
    dv_rows = row_offsets(batch * stride_dvb + head * stride_dvh, offs_n, stride_dvn, ALIGN)
    store_tile(DK, dk_a * scale, dk_rows, offs_n, offs_da, stride_dkd, n_keys, HEAD_DIM, PAD_A)
    store_tile(DV, dv_a, dv_rows, offs_n, offs_da, stride_dvd, n_keys, HEAD_DIM, PAD_A)
    if D_B > 0:
        store_tile(DK, dk_b * scale, dk_rows, offs_n, offs_db, stride_dkd, n_keys, HEAD_DIM, PAD_B)
        store_tile(DV, dv_b, dv_rows, offs_n, offs_db, stride_dvd, n_keys, HEAD_DIM, PAD_B)


@triton.jit
def _dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    n_heads, n_queries, n_keys, qk_scale, scale,
    HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, D_B_TILE: tl.constexpr,
    PAD_A: tl.constexpr, PAD_B: tl.constexpr, ALIGN: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: dq for BLOCK_M queries of one (batch, head). Grid: (cdiv(N, BLOCK_M), heads, batch)."""
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    k_start = batch * stride_kb + head * stride_kh
    v_start = batch * stride_vb + head * stride_vh
    row_stats = (batch * n_heads + head) * n_queries

    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_rows = row_offsets(batch * stride_qb + head * stride_qh, offs_m, stride_qn, ALIGN)
    g_rows = row_offsets(batch * stride_gb + head * stride_gh, offs_m, stride_gn, ALIGN)
    offs_da = tl.arange(0, D_A)
    offs_db = D_A + tl.arange(0, D_B_TILE)
    q_a = load_tile(Q, q_rows, offs_m, offs_da, stride_qd, n_queries, HEAD_DIM, True, PAD_A)
    g_a = load_tile(DOut, g_rows, offs_m, offs_da, stride_gd, n_queries, HEAD_DIM, True, PAD_A)
    dq_a = tl.zeros([BLOCK_M, D_A], dtype=tl.float32)
    q_b = tl.zeros([BLOCK_M, D_B_TILE], dtype=q_a.dtype)
    g_b = tl.zeros([BLOCK_M, D_B_TILE], dtype=g_a.dtype)
    dq_b = tl.zeros([BLOCK_M, D_B_TILE], dtype=tl.float32)
    if D_B > 0:
        q_b = load_tile(Q, q_rows, offs_m, offs_db, stride_qd, n_queries, HEAD_DIM, True, PAD_B)
        g_b = load_tile(DOut, g_rows, offs_m, offs_db, stride_gd, n_queries, HEAD_DIM, True, PAD_B)
    lse = tl.load(Lse + row_stats + offs_m, mask=offs_m < n_queries, other=float("inf"))
    delta = tl.load(Delta + row_stats + offs_m, mask=offs_m < n_queries, other=0.0)

    end_n = tl.minimum(n_keys, start_m + BLOCK_M) if IS_CAUSAL else n_keys
    offs_block = tl.arange(0, BLOCK_N)
    for block_start in range(0, end_n, BLOCK_N):
        offs_n = block_start + offs_block
        k_rows = row_offsets(k_start, offs_n, stride_kn, ALIGN)
        v_rows = row_offsets(v_start, offs_n, stride_vn, ALIGN)
        k_a = load_tile(K, k_rows, offs_n, offs_da, stride_kd, n_keys, HEAD_DIM, True, PAD_A)
        v_a = load_tile(V, v_rows, offs_n, offs_da, stride_vd, n_keys, HEAD_DIM, True, PAD_A)
        scores = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        dprobs = tl.dot(g_a, tl.trans(v_a), input_precision=DOT_PRECISION)
        if D_B > 0:
            k_b = load_tile(K, k_rows, offs_n, offs_db, stride_kd, n_keys, HEAD_DIM, True, PAD_B)
            v_b = load_tile(V, v_rows, offs_n, offs_db, stride_vd, n_keys, HEAD_DIM, True, PAD_B)
            scores = tl.dot(q_b, tl.trans(k_b), scores, input_precision=DOT_PRECISION)
            dprobs = tl.dot(g_b, tl.trans(v_b), dprobs, input_precision=DOT_PRECISION)
        probs = tl.math.exp2(scores * qk_scale - lse[:, None])
        keep = offs_n[None, :] < n_keys
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        probs = tl.where(keep, probs, 0.0)
        dscores = (probs * (dprobs - delta[:, None])).to(k_a.dtype)
        dq_a = tl.dot(dscores, k_a, dq_a, input_precision=DOT_PRECISION)
        if D_B > 0:
            dq_b = tl.dot(dscores, k_b, dq_b, input_precision=DOT_PRECISION)

    dq_rows = row_offsets(batch * stride_dqb + head * stride_dqh, offs_m, stride_dqn, ALIGN)
    store_tile(DQ, dq_a * scale, dq_rows, offs_m, offs_da, stride_dqd, n_queries, HEAD_DIM, PAD_A)
    if D_B > 0:
        store_tile(DQ, dq_b * scale, dq_rows, offs_m, offs_db, stride_dqd, n_queries, HEAD_DIM, PAD_B)


_BACKWARD_KEY = ["n_queries", "n_keys", "HEAD_DIM", "IS_CAUSAL"]
_dkdv_tuned = triton.autotune(configs=autotune_configs(DKDV_GPU_BLOCKS), key=_BACKWARD_KEY)(_dkdv_kernel)
_dq_tuned = triton.autotune(configs=autotune_configs(DQ_GPU_BLOCKS), key=_BACKWARD_KEY)(_dq_kernel)


def flash_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    blocks: tuple[AttentionBlocks, AttentionBlocks] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of flash attention. dq/dk/dv: optional buffers to write, else empty_like.

    blocks: fixed (dk/dv, dq) tile shapes; None autotunes on the GPU (fixed small tiles under the interpreter).
    """
    check_inputs(q, k, v, scale)
    check_buffer("dout", dout, q)
    check_buffer("out", out, q)
    batch, heads, n_queries, head_dim = q.shape
    n_keys = k.shape[2]
    if lse.shape != (batch, heads, n_queries) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise KernelInputError(
            f"flash_attention_backward: lse must be a contiguous ({batch}, {heads}, {n_queries}) float32 "
            f"tensor from flash_attention_forward(return_lse=True), got {tuple(lse.shape)} {lse.dtype}"
        )
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    for name, buffer, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        check_buffer(name, buffer, like)
    if n_queries == 0:
        return dq, dk.zero_(), dv.zero_()
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    dims = dict(**head_dim_constants(split_head_dim(head_dim)), ALIGN=element_alignment(q, k, v, out, dout, dq, dk, dv))

    delta = torch.empty_like(lse)
    _delta_kernel[(triton.cdiv(n_queries, PREPROCESS_BLOCK_M), heads, batch)](
        out, dout, delta, *out.stride(), *dout.stride(), heads, n_queries, **dims, BLOCK_M=PREPROCESS_BLOCK_M,
    )
    common_args = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    sizes = (heads, n_queries, n_keys, scale * LOG2_E, scale)
    constants = dict(**dims, IS_CAUSAL=bool(causal), DOT_PRECISION=dot_precision(q.dtype))
    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, *common_args, *dk.stride(), *dv.stride(), *sizes)
    dq_args = (q, k, v, dout, lse, delta, dq, *common_args, *dq.stride(), *sizes)
    if blocks is None and interpreter_active():
        blocks = (AttentionBlocks(INTERPRETER_BLOCKS.block_n, INTERPRETER_BLOCKS.block_m), INTERPRETER_BLOCKS)
    if blocks is None:
        _dkdv_tuned[lambda meta: (triton.cdiv(n_keys, meta["BLOCK_N"]), heads, batch)](*dkdv_args, **constants)
        _dq_tuned[lambda meta: (triton.cdiv(n_queries, meta["BLOCK_M"]), heads, batch)](*dq_args, **constants)
        return dq, dk, dv
    dkdv_blocks, dq_blocks = blocks
    _dkdv_kernel[(triton.cdiv(n_keys, dkdv_blocks.block_n), heads, batch)](
        *dkdv_args, **constants, BLOCK_M=dkdv_blocks.block_m, BLOCK_N=dkdv_blocks.block_n,
        num_warps=dkdv_blocks.num_warps, num_stages=dkdv_blocks.num_stages,
    )
    _dq_kernel[(triton.cdiv(n_queries, dq_blocks.block_m), heads, batch)](
        *dq_args, **constants, BLOCK_M=dq_blocks.block_m, BLOCK_N=dq_blocks.block_n,
        num_warps=dq_blocks.num_warps, num_stages=dq_blocks.num_stages,
    )
    return dq, dk, dv
