"""GEGLU in Triton: the first half of SD's transformer feed-forward, projection and gate in one kernel.

Called by the models through tiengine/models/fusions.py (`geglu`), which picks this kernel for CUDA
tensors `supports` accepts and PyTorch's ops otherwise.

diffusers' GEGLU is `hidden, gate = proj(x).chunk(2, dim=-1); hidden * gelu(gate)` with proj an
nn.Linear(dim, 2 * inner) and exact (erf) GELU. Unfused, the (rows, 2 * inner) projection is written to
memory and read back by GELU and the product (about 3x the output size in extra traffic: for SD1.5's
64x64 latent, rows = 2 * 4096, inner = 1280, that is 42 MB written and read around a 13 GFLOP matmul).
Here each program computes one (BLOCK_M, BLOCK_N) tile of the output with two accumulators, one for the
hidden columns j and one for the gate columns inner + j, sharing each loaded x tile, and applies bias,
GELU and the product in fp32 before one rounding to the output dtype. Only (rows, inner) is written.

Contract
- x: (..., dim), viewable as (rows, dim) without a copy (any row stride); weight: (2 * inner, dim) in
  nn.Linear layout (rows [0, inner) hidden, [inner, 2 * inner) gate, as diffusers' chunk order);
  bias: (2 * inner,) or None. Returns (..., inner), contiguous, in x's dtype.
- fp16, bf16 (tensor-core dots, fp32 accumulation); fp32 runs too (exact fp32 dots, no tf32: for
  exactness checks) but `supports` says False for it, since cuBLAS is the faster fp32 path.
- Backward: `geglu` is differentiable through a documented fallback: the backward pass recomputes the
  projection with F.linear in the input dtype, then GELU and the product, and differentiates that.
The tile order (groups of GROUP_M row blocks sweep the columns, for L2 reuse) follows Triton's matmul
tutorial.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import KernelInputError, cuda_capability_error, device_error, interpreter_active

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) candidates for the GPU autotuner; two fp32
# accumulators per tile, so the widest tile is 128 x 128.
GPU_TILES = (
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 32, 8, 4),
    (64, 64, 64, 4, 4),
    (128, 64, 32, 4, 4),
)
# fp32 runs exact fp32 dots on the CUDA cores: smaller tiles, or the accumulators spill.
GPU_TILES_FP32 = (
    (64, 64, 32, 8, 2),
    (64, 64, 16, 4, 2),
    (32, 32, 32, 4, 2),
)
INTERPRETER_TILE = (32, 32, 32, 4, 1)
FAST_DTYPES = (torch.float16, torch.bfloat16)  # what supports() accepts: the tensor-core path
GROUP_M = 8


def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """hidden * gelu(gate) with hidden, gate = (x weight^T + bias).chunk(2, -1), in fp32 (fp64 for fp64)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    proj = F.linear(x.to(compute), weight.to(compute), bias.to(compute) if bias is not None else None)
    hidden, gate = proj.chunk(2, dim=-1)  # (..., inner) each
    return (hidden * F.gelu(gate)).to(x.dtype)


def _geglu_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The unfused computation in the input dtype (what the backward pass differentiates)."""
    hidden, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def _validation_error(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, for_launch: bool
) -> str | None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32"
    if weight.ndim != 2 or weight.shape[0] % 2 or weight.shape[0] == 0:
        return f"weight must be (2 * inner, dim) like nn.Linear(dim, 2 * inner), got shape {tuple(weight.shape)}"
    dim = weight.shape[1]
    if x.ndim < 1 or x.shape[-1] != dim:
        return f"x must be (..., dim={dim}) to match weight {tuple(weight.shape)}, got shape {tuple(x.shape)}"
    if x.dtype != weight.dtype or x.device != weight.device:
        return f"x and weight must share dtype and device, got {x.dtype} on {x.device} and {weight.dtype} on {weight.device}"
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            found = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            return f"bias must be ({weight.shape[0]},) to match weight, got {found}"
        if bias.dtype != x.dtype or bias.device != x.device or not bias.is_contiguous():
            return f"bias must be a contiguous {x.dtype} tensor on {x.device}, got {bias.dtype} on {bias.device}"
    try:
        x.view(-1, dim)
    except RuntimeError:
        return f"x with shape {tuple(x.shape)} and strides {tuple(x.stride())} cannot be viewed as (rows, {dim}) without a copy"
    if x.numel() >= 2**31 or weight.numel() >= 2**31:
        return "x and weight must each have fewer than 2**31 elements (int32 indexing)"
    if for_launch:
        return device_error("x", x.device.type)
    if x.device.type != "cuda":
        return f"the Triton GEGLU kernel runs on CUDA tensors, x is on {x.device.type}"
    return cuda_capability_error(x.device.index, (8, 0), "the Triton GEGLU kernel")


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """True for fp16/bf16 CUDA tensors geglu takes: where the fused kernel is the fast path."""
    return _validation_error(x, weight, bias, for_launch=False) is None and x.dtype in FAST_DTYPES


@triton.jit
def _geglu_kernel(
    X, W, Bias, Y, n_rows, inner, dim,
    stride_xr, stride_xk, stride_wn, stride_wk, stride_yr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y[rows, cols] = (X W_h^T + b_h) * gelu(X W_g^T + b_g) for one tile. Grid: (cdiv(R, BM) * cdiv(inner, BN),)."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(n_rows, BLOCK_M)
    blocks_n = tl.cdiv(inner, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    block_m = first_m + (pid % per_group) % group_rows
    block_n = (pid % per_group) // group_rows

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns wrap around (valid addresses, results discarded at the store).
    load_m = offs_m % n_rows
    load_n = offs_n % inner
    x_ptrs = X + load_m[:, None].to(tl.int64) * stride_xr + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    wh_ptrs = W + load_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)
    wg_ptrs = wh_ptrs + inner * stride_wn  # gate rows; < 2**31 since weight has fewer elements
    acc_h = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, dim, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w_h = tl.load(wh_ptrs)
            w_g = tl.load(wg_ptrs)
        else:
            in_k = offs_k < dim - k_start
            x = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
            w_h = tl.load(wh_ptrs, mask=in_k[:, None], other=0.0)
            w_g = tl.load(wg_ptrs, mask=in_k[:, None], other=0.0)
        acc_h = tl.dot(x, w_h, acc_h, input_precision=DOT_PRECISION)
        acc_g = tl.dot(x, w_g, acc_g, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wh_ptrs += BLOCK_K * stride_wk
        wg_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc_h += tl.load(Bias + load_n).to(tl.float32)[None, :]
        acc_g += tl.load(Bias + inner + load_n).to(tl.float32)[None, :]
    gelu_gate = 0.5 * acc_g * (1.0 + tl.erf(acc_g * 0.7071067811865476))  # exact GELU: x * Phi(x)
    y = acc_h * gelu_gate
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_yr + offs_n[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=(offs_m[:, None] < n_rows) & (offs_n[None, :] < inner))


def _autotuned(tiles: tuple[tuple[int, int, int, int, int], ...]) -> triton.runtime.Autotuner:
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in tiles
    ]
    return triton.autotune(configs=configs, key=["n_rows", "inner", "dim"])(_geglu_kernel)


_geglu_tuned = _autotuned(GPU_TILES)
_geglu_tuned_fp32 = _autotuned(GPU_TILES_FP32)


def geglu_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    tile: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """Launch the kernel. out: optional contiguous (..., inner) buffer. tile: fixed (BM, BN, BK, warps, stages)."""
    error = _validation_error(x, weight, bias, for_launch=True)
    if error is not None:
        raise KernelInputError(f"geglu: {error}")
    dim = weight.shape[1]
    inner = weight.shape[0] // 2
    out_shape = (*x.shape[:-1], inner)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    elif out.shape != out_shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise KernelInputError(
            f"geglu: out must be a contiguous {out_shape} {x.dtype} tensor on {x.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    x2 = x.view(-1, dim)  # (rows, dim)
    n_rows = x2.shape[0]
    if n_rows == 0:
        return out
    y2 = out.view(n_rows, inner)  # (rows, inner)
    args = (x2, weight, bias if bias is not None else weight, y2, n_rows, inner, dim,
            *x2.stride(), *weight.stride(), y2.stride(0))
    dot_precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    if tile is None and interpreter_active():
        tile = INTERPRETER_TILE
    if tile is None:
        grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(inner, meta["BLOCK_N"]),)  # noqa: E731
        tiles, tuned = (GPU_TILES_FP32, _geglu_tuned_fp32) if x.dtype == torch.float32 else (GPU_TILES, _geglu_tuned)
        even_k = all(dim % block_k == 0 for _, _, block_k, _, _ in tiles)
        tuned[grid](*args, HAS_BIAS=bias is not None, EVEN_K=even_k, DOT_PRECISION=dot_precision,
                           GROUP_M=GROUP_M)
        return out
    block_m, block_n, block_k, num_warps, num_stages = tile
    grid = (triton.cdiv(n_rows, block_m) * triton.cdiv(inner, block_n),)
    _geglu_kernel[grid](
        *args, HAS_BIAS=bias is not None, EVEN_K=dim % block_k == 0, DOT_PRECISION=dot_precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


class GegluFunction(torch.autograd.Function):
    """Triton forward; backward recomputes the unfused computation with PyTorch ops and differentiates it."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(x, weight, bias)
        return geglu_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, bias = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in (x, weight, bias)]
            y = _geglu_torch(*leaves)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(y, wanted, grad_out))
        return tuple(next(grads) if t is not None and t.requires_grad else None for t in leaves)


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers GEGLU with the Triton kernel: call with the module's projection,
    `geglu(x, module.proj.weight, module.proj.bias)`. Differentiable (backward by recomputation)."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (x, weight, bias)):
        return GegluFunction.apply(x, weight, bias)
    return geglu_forward(x, weight, bias)
