"""GroupNorm followed by SiLU in Triton: the norm1/norm2 -> SiLU pairs of UNet and VAE resnet blocks.

Called by the models through tiengine/models/fusions.py (`group_norm`), which picks this kernel for CUDA
tensors `supports` accepts and PyTorch's ops otherwise.

Contract
- x: (batch, channels, *spatial) contiguous (NCHW, or (B, C, L)), channels divisible by num_groups;
  weight, bias: (channels,) or None (no affine); eps as nn.GroupNorm's (1e-5 UNet, 1e-6 VAE).
- fp16, bf16, fp32 inputs; statistics, normalisation and SiLU in fp32 (as tiengine.models.layers.group_norm
  computes them); the result is rounded once to x's dtype. silu=False gives plain GroupNorm.
  `supports` accepts fp16/bf16 only (the memory-bound speed path); fp32 runs for exactness checks.
- Returns a new contiguous tensor shaped like x.

Memory traffic: x is read twice and y written once (3 passes), against 5 for torch's GroupNorm kernel
followed by a separate SiLU (2 reads + 1 write, then 1 read + 1 write).

Kernels. In NCHW each (batch, group) is one contiguous run of (C / G) * H * W elements.
1. `_group_stats_kernel`, grid (B * G, splits): each program reduces one chunk of a run to
   (count, mean, M2) with Chan et al.'s pairwise merge of per-block statistics (no E[x^2] - E[x]^2
   cancellation). Splitting a run keeps the GPU busy when B * G is small (2 * 32 for SD).
   The statistics are of the run shifted by its first element, s = x - x[0]: for data far from zero
   (a mean of 300 with a spread of 2) a mean rounded at x's magnitude would put an error of
   eps * |mean| * rstd into every output; s is exact wherever x is within a factor 2 of x[0] (Sterbenz),
   so the mean's rounding is at the spread's magnitude instead.
2. `_group_apply_kernel`, grid (B * G, cdiv(run, BLOCK)): merges the run's split statistics, then
   y = silu(((x - x[0]) - mean_s) * rstd * weight[c] + bias[c]).
Backward: `group_norm_silu` is differentiable through a documented fallback: the backward pass recomputes
the forward with PyTorch ops (F.group_norm + F.silu) under autograd, and differentiates that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import KernelInputError, cuda_capability_error, device_error, interpreter_active

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FAST_DTYPES = (torch.float16, torch.bfloat16)
STATS_BLOCK = 1024  # elements per merge step in the statistics kernel
APPLY_BLOCK = 1024  # elements per program in the apply kernel
MIN_SPLIT_ELEMENTS = 8192  # below this a run is not split further
MAX_SPLITS = 64
TARGET_PROGRAMS = 1024  # statistics programs to aim for: several waves on a 132-SM H100
INTERPRETER_BLOCK = 64  # small blocks under TRITON_INTERPRET so that tails and splits are exercised


def group_norm_silu_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool = True,
) -> torch.Tensor:
    """F.group_norm (+ SiLU) computed in fp32 (fp64 for fp64 inputs), returned in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    w = weight.to(compute) if weight is not None else None
    b = bias.to(compute) if bias is not None else None
    y = F.group_norm(x.to(compute), num_groups, w, b, eps)
    return (F.silu(y) if silu else y).to(x.dtype)


def _validation_error(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    *, for_launch: bool,
) -> str | None:
    if not isinstance(x, torch.Tensor):
        return f"x must be a torch.Tensor, got {type(x).__name__}"
    if x.ndim < 2:
        return f"x must be (batch, channels, *spatial), got shape {tuple(x.shape)}"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"x has dtype {x.dtype}; supported: float16, bfloat16, float32"
    if not x.is_contiguous():
        return f"x must be contiguous (NCHW), got strides {tuple(x.stride())} for shape {tuple(x.shape)}"
    channels = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or channels % num_groups:
        return f"num_groups must be a positive divisor of channels={channels}, got {num_groups!r}"
    if x.numel() >= 2**31:
        return f"x has {x.numel()} elements; the kernel indexes with int32 (at most 2**31 - 1)"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (channels,) or t.device != x.device:
            found = f"{tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            return f"{name} must be a ({channels},) tensor on {x.device}, got {found}"
        if not t.is_contiguous() or t.dtype not in SUPPORTED_DTYPES:
            return f"{name} must be a contiguous float16/bfloat16/float32 tensor, got {t.dtype}"
    if not (isinstance(eps, (int, float)) and eps >= 0):
        return f"eps must be a non-negative number, got {eps!r}"
    if for_launch:
        return device_error("x", x.device.type)
    if x.device.type != "cuda":
        return f"the Triton GroupNorm kernel runs on CUDA tensors, x is on {x.device.type}"
    return cuda_capability_error(x.device.index, (8, 0), "the Triton GroupNorm kernel")


def supports(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> bool:
    """True for fp16/bf16 CUDA tensors group_norm_silu takes (the path where fusing pays)."""
    return _validation_error(x, num_groups, weight, bias, eps, for_launch=False) is None and x.dtype in FAST_DTYPES


@triton.jit
def _group_stats_kernel(
    X, Count, Mean, M2, run_length, chunk_length, n_splits, BLOCK: tl.constexpr,
):
    """(count, mean, M2) of chunk `split` of run `run`, shifted by the run's first element.

    Grid: (B * G, n_splits); outputs (B * G, n_splits).
    """
    run = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * chunk_length
    end = tl.minimum(start + chunk_length, run_length)
    base = X + run * run_length
    shift = tl.load(base).to(tl.float32)  # the run's first element; see the module docstring
    offs = tl.arange(0, BLOCK)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for block_start in range(start, end, BLOCK):
        idx = block_start + offs
        valid = idx < end
        x = tl.where(valid, tl.load(base + idx, mask=valid, other=0.0).to(tl.float32) - shift, 0.0)
        block_count = tl.minimum(end - block_start, BLOCK).to(tl.float32)
        block_mean = tl.sum(x, 0) / block_count
        centred = tl.where(valid, x - block_mean, 0.0)
        block_m2 = tl.sum(centred * centred, 0)
        # Chan et al. (1979): merge (count, mean, m2) with the block's statistics.
        total = count + block_count
        delta = block_mean - mean
        mean = mean + delta * (block_count / total)
        m2 = m2 + block_m2 + delta * delta * (count * block_count / total)
        count = total
    out = run * n_splits + split
    tl.store(Count + out, count)
    tl.store(Mean + out, mean)
    tl.store(M2 + out, m2)


@triton.jit
def _group_apply_kernel(
    X, Y, W, B, Count, Mean, M2, run_length, channel_length, channels, channels_per_group, n_splits, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, APPLY_SILU: tl.constexpr,
    SPLITS_POW2: tl.constexpr, BLOCK: tl.constexpr,
):
    """y = silu(((x - x[0]) - mean_s) * rstd * w[c] + b[c]) for BLOCK elements of run `run`.

    Grid: (B * G, cdiv(run, BLOCK)).
    """
    run = tl.program_id(0).to(tl.int64)
    offs_split = tl.arange(0, SPLITS_POW2)
    has_split = offs_split < n_splits
    counts = tl.load(Count + run * n_splits + offs_split, mask=has_split, other=0.0)
    means = tl.load(Mean + run * n_splits + offs_split, mask=has_split, other=0.0)
    m2s = tl.load(M2 + run * n_splits + offs_split, mask=has_split, other=0.0)
    mean = tl.sum(counts * means, 0) / run_length
    spread = tl.where(has_split, means - mean, 0.0)
    var = (tl.sum(m2s, 0) + tl.sum(counts * spread * spread, 0)) / run_length
    rstd = 1.0 / tl.sqrt(var + eps)

    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < run_length
    shift = tl.load(X + run * run_length).to(tl.float32)
    x = tl.load(X + run * run_length + idx, mask=valid, other=0.0).to(tl.float32)
    y = ((x - shift) - mean) * rstd
    channel = (run % (channels // channels_per_group)) * channels_per_group + idx // channel_length
    if HAS_WEIGHT:
        y = y * tl.load(W + channel, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + channel, mask=valid, other=0.0).to(tl.float32)
    if APPLY_SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + run * run_length + idx, y.to(Y.dtype.element_ty), mask=valid)


def group_norm_silu_forward(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    silu: bool = True,
    out: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Launch the two kernels. out: optional contiguous buffer like x. splits: chunks per (batch, group) run."""
    error = _validation_error(x, num_groups, weight, bias, eps, for_launch=True)
    if error is not None:
        raise KernelInputError(f"group_norm_silu: {error}")
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise KernelInputError(
            f"group_norm_silu: out must be a contiguous {tuple(x.shape)} {x.dtype} tensor on {x.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    batch, channels = x.shape[:2]
    runs = batch * num_groups
    run_length = x.numel() // runs if runs else 0
    if run_length == 0:
        return out
    channel_length = run_length // (channels // num_groups)  # H * W
    interpreting = interpreter_active()
    stats_block = INTERPRETER_BLOCK if interpreting else STATS_BLOCK
    apply_block = INTERPRETER_BLOCK if interpreting else APPLY_BLOCK
    if splits is None:
        splits = min(MAX_SPLITS, triton.cdiv(TARGET_PROGRAMS, runs), triton.cdiv(run_length, MIN_SPLIT_ELEMENTS))
    if not 1 <= splits <= MAX_SPLITS:
        raise KernelInputError(f"group_norm_silu: splits must be 1-{MAX_SPLITS}, got {splits}")
    splits = max(1, min(splits, triton.cdiv(run_length, stats_block)))  # no chunk without elements
    chunk_length = triton.cdiv(triton.cdiv(run_length, splits), stats_block) * stats_block
    splits = triton.cdiv(run_length, chunk_length)

    stats = torch.empty((3, runs, splits), dtype=torch.float32, device=x.device)  # count, mean, M2
    _group_stats_kernel[(runs, splits)](x, stats[0], stats[1], stats[2], run_length, chunk_length, splits,
                                        BLOCK=stats_block)
    _group_apply_kernel[(runs, triton.cdiv(run_length, apply_block))](
        x, out, weight if weight is not None else x, bias if bias is not None else x,
        stats[0], stats[1], stats[2], run_length, channel_length, channels, channels // num_groups, splits,
        float(eps), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, APPLY_SILU=bool(silu),
        SPLITS_POW2=triton.next_power_of_2(splits), BLOCK=apply_block,
    )
    return out


class GroupNormSiLUFunction(torch.autograd.Function):
    """Triton forward; backward recomputes the forward with PyTorch ops and differentiates it."""

    @staticmethod
    def forward(ctx, x, num_groups: int, weight, bias, eps: float, silu: bool):  # type: ignore[override]
        ctx.save_for_backward(x, weight, bias)
        ctx.num_groups, ctx.eps, ctx.silu = num_groups, eps, silu
        return group_norm_silu_forward(x, num_groups, weight, bias, eps, silu=silu)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, bias = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in (x, weight, bias)]
            y = group_norm_silu_reference(leaves[0], ctx.num_groups, leaves[1], leaves[2], ctx.eps, ctx.silu)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(y, wanted, grad_out))
        dx, dw, db = (next(grads) if t is not None and t.requires_grad else None for t in leaves)
        return dx, None, dw, db, None, None


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = True,
) -> torch.Tensor:
    """silu(group_norm(x)) with the Triton kernels (fp32 statistics, one rounding to x's dtype).

    Call it with an nn.GroupNorm's parameters: `group_norm_silu(x, norm.num_groups, norm.weight,
    norm.bias, norm.eps)`. Differentiable (backward by recomputation, see the module docstring).
    """
    tensors = (x, weight, bias)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return GroupNormSiLUFunction.apply(x, num_groups, weight, bias, eps, silu)
    return group_norm_silu_forward(x, num_groups, weight, bias, eps, silu=silu)
