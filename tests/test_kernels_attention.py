"""Triton flash attention (forward, backward, dispatcher) against the fp32-softmax PyTorch reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. TRITON_INTERPRET must be set before
triton defines a kernel, and other tests in the same pytest process may already have imported the kernel
modules, so every interpreted launch happens in a child process: this file runs itself as a script with
TRITON_INTERPRET=1 (`run_cases`). The parent draws fresh random inputs (seed in every failure message;
TIENGINE_KERNEL_SEED replays one), the child runs the kernels into NaN-poisoned buffers, and the parent
checks the results against the reference computed in fp64. On a GPU the same checks run in-process at the
performance spec's sizes, plus bf16.

Tolerances: `max |kernel - ref64| <= eps(dtype) * max|v| + 4 * max |ref32 - ref64|` for outputs. The first
term is the rounding the kernel must do (probabilities go into the P.V dot in the input dtype, the output
is rounded to it: eps/2 each, times at most max|v| since the output is a convex combination of rows of v);
the second is four times the reference's own fp32 noise on the same inputs (summation order differs).
Gradients use 2 * eps(dtype) * max|grad| for the rounding of P and dS before their dots, plus the
first-order error of recomputing P as exp2(s * scale * log2(e) - lse) (`exponent_rounding`): the exponent
is a difference of fp32 numbers as large as |s * scale * log2(e)| and |lse|, so each probability carries a
relative error up to ln(2) times its absolute rounding, which the reference's softmax (exp(s - max) / sum)
does not have; it reaches the gradients through their sums over P (measured at head dim 160: up to 4.8x
the autograd reference's own fp32 noise on dk without this term).
"""

from __future__ import annotations

import math
import os
import secrets
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

CHILD_TIMEOUT_S = 900
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SD_HEAD_DIMS = (40, 64, 80, 160)


@dataclass(frozen=True)
class Case:
    """One kernel call. op: forward | backward | autograd | dispatch. layout: how q, k, v sit in memory."""

    op: str
    head_dim: int
    n_queries: int
    n_keys: int
    causal: bool
    dtype: str
    batch: int = 1
    heads: int = 2
    layout: str = "bhnd"  # bhnd | bnhd (views of a linear layer's output) | packed (one qkv buffer) | dstride
    scale: float | None = None
    blocks: tuple[int, int] | None = None  # (block_m, block_n) instead of the default tiles

    @property
    def name(self) -> str:
        extra = f"-{self.layout}" if self.layout != "bhnd" else ""
        extra += f"-scale{self.scale}" if self.scale is not None else ""
        extra += f"-blocks{self.blocks[0]}x{self.blocks[1]}" if self.blocks else ""
        return (
            f"{self.op}-d{self.head_dim}-n{self.n_queries}-m{self.n_keys}-{'causal' if self.causal else 'full'}"
            f"-{self.dtype}-b{self.batch}h{self.heads}{extra}"
        )


def _interpreter_cases() -> list[Case]:
    cases = []
    for head_dim in SD_HEAD_DIMS:
        for n_keys in (77, 130):  # CLIP/cross-attention length; several blocks plus a tail
            for causal in (False, True):
                for dtype, (batch, heads) in (("fp32", (1, 2)), ("fp16", (2, 1))):
                    n_queries = n_keys if causal else 40
                    cases.append(Case("forward", head_dim, n_queries, n_keys, causal, dtype, batch, heads))
        for causal in (False, True):
            for dtype in ("fp32", "fp16"):
                cases.append(Case("backward", head_dim, 77 if causal else 40, 77, causal, dtype))
    cases += [
        # head dims off the SD list: padded part A (8), padded part B (72 = 64 + 16 masked), one padded part (24)
        Case("forward", 8, 40, 77, False, "fp32"),
        Case("forward", 72, 40, 70, True, "fp16"),
        Case("forward", 24, 40, 70, False, "fp16"),
        # causal with more / fewer queries than keys (top-left aligned like torch's is_causal)
        Case("forward", 40, 100, 77, True, "fp32"),
        Case("forward", 80, 30, 77, True, "fp16"),
        Case("forward", 64, 40, 77, False, "fp16", scale=0.3),
        # the layouts the models hand over, without copies
        Case("forward", 40, 70, 70, False, "fp16", batch=2, heads=2, layout="bnhd"),
        Case("forward", 80, 70, 70, True, "fp32", batch=2, heads=2, layout="packed"),
        Case("forward", 40, 40, 77, False, "fp32", layout="dstride"),
        Case("backward", 40, 70, 70, True, "fp16", batch=2, heads=2, layout="bnhd"),
        # other tile shapes: key blocks wider than query blocks (the causal bounds), several tails
        Case("forward", 80, 77, 77, True, "fp16", blocks=(16, 64)),
        Case("forward", 40, 50, 130, False, "fp32", blocks=(64, 32)),
        Case("backward", 80, 77, 77, True, "fp32", blocks=(16, 32)),
        Case("backward", 160, 40, 130, False, "fp16"),
        Case("autograd", 40, 77, 77, True, "fp16"),
        Case("autograd", 80, 40, 77, False, "fp32", layout="bnhd"),
        Case("dispatch", 64, 40, 77, False, "fp32"),
    ]
    return cases


INTERPRETER_CASES = _interpreter_cases()


def make_inputs(case: Case, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random q, k, v (queries scaled by 2 for peaked softmax rows) and dout, in the case's layout."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = DTYPES[case.dtype]
    b, h, n, m, d = case.batch, case.heads, case.n_queries, case.n_keys, case.head_dim

    def rand(*shape: int, gain: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * gain).to(device=device, dtype=dtype)

    if case.layout == "bhnd":
        q, k, v = rand(b, h, n, d, gain=2.0), rand(b, h, m, d), rand(b, h, m, d)
    elif case.layout == "bnhd":  # (B, N, H, d) buffers seen as (B, H, N, d)
        q, k, v = rand(b, n, h, d, gain=2.0).transpose(1, 2), rand(b, m, h, d).transpose(1, 2), rand(b, m, h, d).transpose(1, 2)
    elif case.layout == "packed":  # one (B, N, 3, H, d) projection output
        assert n == m, "packed layout needs as many queries as keys"
        qkv = rand(b, n, 3, h, d)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    elif case.layout == "dstride":  # head_dim is not the unit-stride axis
        q, k, v = rand(b, h, d, n, gain=2.0).transpose(2, 3), rand(b, h, d, m).transpose(2, 3), rand(b, h, d, m).transpose(2, 3)
    else:
        raise ValueError(case.layout)
    return {"q": q, "k": k, "v": v, "dout": rand(b, h, n, d)}


# ---------------------------------------------------------------- child process (TRITON_INTERPRET=1)


def run_case(case: Case, inputs: dict[str, torch.Tensor]) -> dict[str, object]:
    """Run one case with the Triton kernels; outputs go into NaN-filled buffers so unwritten elements show."""
    from tiengine.kernels.attention import AttentionBlocks, flash_attention, flash_attention_forward
    from tiengine.kernels.attention_backward import flash_attention_backward

    from tiengine.models.attention import attention

    q, k, v, dout = inputs["q"], inputs["k"], inputs["v"], inputs["dout"]
    blocks = AttentionBlocks(*case.blocks) if case.blocks else None
    kwargs = dict(causal=case.causal, scale=case.scale)
    if case.op == "forward":
        out, lse = flash_attention_forward(
            q, k, v, **kwargs, out=torch.full_like(q, float("nan")), return_lse=True, blocks=blocks
        )
        if case.layout == "bhnd":
            return {"out": out, "lse": lse}
        # the launcher's own output buffer keeps q's layout
        return {"out": out, "lse": lse, "out_stride": list(flash_attention(q, k, v, **kwargs).stride())}
    if case.op == "backward":
        out, lse = flash_attention_forward(q, k, v, **kwargs, return_lse=True, blocks=blocks)
        nan_like = lambda t: torch.full_like(t, float("nan"))  # noqa: E731
        bwd_blocks = (AttentionBlocks(blocks.block_n, blocks.block_m), blocks) if blocks else None
        dq, dk, dv = flash_attention_backward(
            dout, q, k, v, out, lse, **kwargs, dq=nan_like(q), dk=nan_like(k), dv=nan_like(v), blocks=bwd_blocks
        )
        return {"out": out, "dq": dq, "dk": dk, "dv": dv}
    if case.op == "autograd":
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = flash_attention(*leaves, **kwargs)
        out.backward(dout)
        return {"out": out.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad,
                "out_stride": list(out.stride()), "dq_stride": list(leaves[0].grad.stride())}
    if case.op == "dispatch":
        return {"out": attention(q, k, v, **kwargs, backend="triton")}
    raise ValueError(case.op)


def run_cases(cases_path: str, results_path: str) -> int:
    batch = torch.load(cases_path, weights_only=True)
    results = {}
    for name, entry in batch.items():
        case = Case(**{**entry["case"], "blocks": tuple(entry["case"]["blocks"]) if entry["case"]["blocks"] else None})
        try:
            results[name] = {"outputs": run_case(case, entry["inputs"]), "error": None}
        except Exception:  # reported per case by the parent
            results[name] = {"outputs": {}, "error": traceback.format_exc()}
    torch.save(results, results_path)
    return 0


# ---------------------------------------------------------------- checks shared by interpreter and GPU tests


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def reference_outputs(case: Case, inputs: dict[str, torch.Tensor], compute: torch.dtype) -> dict[str, torch.Tensor]:
    """Reference out, base-2 lse and gradients, computed from the same inputs in `compute` precision."""
    from tiengine.kernels.attention import attention_reference

    q, k, v = (inputs[n].to(compute).detach().requires_grad_(True) for n in ("q", "k", "v"))
    out = attention_reference(q, k, v, case.causal, case.scale)
    out.backward(inputs["dout"].to(compute))
    scale = case.scale if case.scale is not None else 1.0 / math.sqrt(case.head_dim)
    with torch.no_grad():
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, N, M)
        if case.causal:
            keep = torch.ones(case.n_queries, case.n_keys, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1) / math.log(2.0)
    return {"out": out.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def check_results(case: Case, inputs: dict[str, torch.Tensor], got: dict[str, torch.Tensor], seed: int) -> None:
    dtype = DTYPES[case.dtype]
    exact = reference_outputs(case, inputs, torch.float64)
    fp32 = reference_outputs(case, inputs, torch.float32)
    where = f"{case.name} (seed {seed})"
    recomputed_p = exponent_rounding(case, inputs, exact) if "dk" in got else {}
    for key, value in got.items():
        if key.endswith("_stride"):
            continue
        assert value.dtype == (torch.float32 if key == "lse" else dtype), f"{where}: {key} dtype {value.dtype}"
        assert value.shape == exact[key].shape, f"{where}: {key} shape {tuple(value.shape)}"
        assert not torch.isnan(value).any(), f"{where}: {key} has NaN (unwritten elements of the poisoned buffer)"
        err = (value.double() - exact[key]).abs().max().item()
        noise = (fp32[key].double() - exact[key]).abs().max().item()
        if key == "out":
            bound = eps(dtype) * inputs["v"].abs().max().item() + 4 * noise
        elif key == "lse":  # fp32 throughout: the reference's noise plus a few fp32 ulps of the value
            bound = 4 * noise + 4 * eps(torch.float32) * exact[key].abs().max().item()
        else:
            bound = 2 * eps(dtype) * exact[key].abs().max().item() + 4 * noise + recomputed_p[key]
        assert err <= bound, f"{where}: {key} max error {err:.3e} exceeds {bound:.3e} (fp32 reference noise {noise:.3e})"
    for key, source in (("out_stride", "q"), ("dq_stride", "q")):  # results keep the inputs' memory layout
        if key in got:
            expected = list(torch.empty_like(inputs[source]).stride())
            assert list(got[key]) == expected, f"{where}: {key} {list(got[key])}, {source}'s layout gives {expected}"


def exponent_rounding(case: Case, inputs: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest first-order error, per gradient, from the backward kernels' exp2(s * c - lse), c = scale * log2(e).

    The exponent's absolute error is at most eps32 * (c * sum_d |q_d k_d| + |s c| + |lse|) (the score's dot
    product, its scaling, the subtraction), so P_ij carries a relative error ln(2) times that, e_ij. Through
    dS_ij = P_ij (dP_ij - delta_i) and dV_j = sum_i P_ij dout_i that gives, in fp64,
    dq: scale * sum_j |P (dP - delta) e|_ij |k_j|, dk: scale * sum_i |...|_ij |q_i|, dv: sum_i P_ij e_ij |dout_i|.
    """
    q, k, v, dout = (inputs[name].double() for name in ("q", "k", "v", "dout"))
    scale = case.scale if case.scale is not None else 1.0 / math.sqrt(case.head_dim)
    c = scale / math.log(2.0)
    scores = torch.matmul(q, k.transpose(-1, -2)) * c  # (B, H, N, M), base 2
    magnitude = torch.matmul(q.abs(), k.abs().transpose(-1, -2)) * c
    lse = exact["lse"].unsqueeze(-1)  # (B, H, N, 1), base 2
    probs = torch.exp2(scores - lse)
    if case.causal:
        probs = probs * torch.ones(case.n_queries, case.n_keys, dtype=probs.dtype).tril()
    relative = math.log(2.0) * eps(torch.float32) * (magnitude + scores.abs() + lse.abs())
    delta = (exact["out"] * dout).sum(-1, keepdim=True)
    dscores = (probs * (torch.matmul(dout, v.transpose(-1, -2)) - delta)).abs() * relative
    return {
        "out": 0.0,
        "dq": scale * torch.matmul(dscores, k.abs()).max().item(),
        "dk": scale * torch.matmul(dscores.transpose(-1, -2), q.abs()).max().item(),
        "dv": torch.matmul((probs * relative).transpose(-1, -2), dout.abs()).max().item(),
    }


# ---------------------------------------------------------------- interpreter tests (CPU, child process)


@pytest.fixture(scope="module")
def seed() -> int:
    return int(os.environ.get("TIENGINE_KERNEL_SEED") or secrets.randbits(31))


@pytest.fixture(scope="module")
def interpreted(seed: int, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """Inputs and child-process results for every INTERPRETER_CASES entry."""
    folder = tmp_path_factory.mktemp("attention_interpreter")
    inputs = {c.name: make_inputs(c, seed + i) for i, c in enumerate(INTERPRETER_CASES)}
    torch.save({c.name: {"case": asdict(c), "inputs": inputs[c.name]} for c in INTERPRETER_CASES}, folder / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(folder / "cases.pt"), str(folder / "results.pt")],
        env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter child process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return inputs, torch.load(folder / "results.pt", weights_only=True)


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda c: c.name)
def test_interpreted_kernel_matches_reference(case: Case, interpreted: tuple[dict, dict], seed: int) -> None:
    inputs, results = interpreted
    result = results[case.name]
    assert result["error"] is None, f"{case.name}: kernel raised\n{result['error']}"
    check_results(case, inputs[case.name], result["outputs"], seed)


def test_split_head_dim_rule() -> None:
    from tiengine.kernels.common import split_head_dim

    expected = {  # head_dim: (part A, part B); see kernels/common.py
        40: (32, 16), 64: (64, 0), 80: (64, 16), 160: (128, 32), 8: (16, 0), 24: (32, 0), 72: (64, 16),
        96: (64, 32), 112: (128, 0), 256: (256, 0),
    }
    for head_dim, parts in expected.items():
        split = split_head_dim(head_dim)
        assert (split.part_a, split.part_b) == parts, head_dim
        assert split.padded >= head_dim


def test_element_alignment_hint() -> None:
    """The alignment the kernels promise the compiler must divide every row and slice offset."""
    from tiengine.kernels.common import element_alignment

    base = torch.zeros(2, 4, 77, 40, dtype=torch.float16)  # strides (12320, 3080, 40, 1)
    assert element_alignment(base) == 8
    assert element_alignment(torch.zeros(2, 4, 77, 80, dtype=torch.float16)) == 16
    assert element_alignment(torch.zeros(2, 77, 4, 40).transpose(1, 2)) == 8  # head stride 40
    assert element_alignment(base[:, :, 3:]) == 8  # starts 120 elements in
    assert element_alignment(base[..., 1:]) == 1  # starts 1 element in
    assert element_alignment(torch.zeros(2, 4, 77, 36, dtype=torch.float16)) == 4
    assert element_alignment(base, torch.zeros(2, 4, 77, 36, dtype=torch.float16)) == 4


def _cpu_qkv(shape_q=(1, 2, 5, 40), shape_kv=(1, 2, 7, 40), dtype=torch.float16):
    return torch.zeros(shape_q, dtype=dtype), torch.zeros(shape_kv, dtype=dtype), torch.zeros(shape_kv, dtype=dtype)


@pytest.mark.parametrize(
    ("q", "k", "v", "message"),
    [
        (torch.zeros(2, 5, 40), torch.zeros(2, 7, 40), torch.zeros(2, 7, 40), "must be 4-D"),
        (*_cpu_qkv()[:2], torch.zeros(1, 2, 7, 40, dtype=torch.float32), "share a dtype"),
        (*_cpu_qkv(dtype=torch.int32), "supported: float16, bfloat16, float32"),
        (*_cpu_qkv((1, 2, 5, 512), (1, 2, 7, 512)), "head_dim must be 1-256"),
        (torch.zeros(1, 2, 5, 40), torch.zeros(1, 3, 7, 40), torch.zeros(1, 3, 7, 40), "heads=2"),
        (torch.zeros(1, 2, 5, 40), torch.zeros(1, 2, 7, 40), torch.zeros(1, 2, 8, 40), "same shape"),
        (*_cpu_qkv((1, 2, 5, 40), (1, 2, 0, 40)), "at least one key"),
    ],
)
def test_launcher_rejects_bad_inputs(q, k, v, message: str) -> None:
    from tiengine.kernels.attention import KernelInputError, flash_attention, supports

    assert not supports(q, k, v)
    with pytest.raises(KernelInputError, match=message):
        flash_attention(q, k, v)


def test_launcher_names_the_device_and_bad_scale() -> None:
    from tiengine.kernels.attention import KernelInputError, flash_attention
    from tiengine.kernels.common import interpreter_active

    q, k, v = _cpu_qkv()
    with pytest.raises(KernelInputError, match="scale must be a positive"):
        flash_attention(q, k, v, scale=-1.0)
    if not interpreter_active():
        with pytest.raises(KernelInputError, match="TRITON_INTERPRET"):
            flash_attention(q, k, v)


def test_dispatcher_cpu_uses_sdpa_without_triton() -> None:
    """`auto` on CPU resolves to SDPA and never imports triton (checked in a fresh interpreter)."""
    code = (
        "import sys, torch\n"
        "from tiengine.models.attention import attention, resolve_backend\n"
        "q = torch.randn(1, 2, 9, 40)\n"
        "assert resolve_backend(q, q, q) == 'sdpa'\n"
        "ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)\n"
        "assert torch.equal(attention(q, q, q, causal=True), ref)\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_dispatcher_forced_sdpa_kernels_match_reference() -> None:
    from tiengine.kernels.attention import attention_reference

    from tiengine.models.attention import attention, resolve_backend

    gen = torch.Generator().manual_seed(secrets.randbits(31))
    q, k, v = (torch.randn(1, 2, 9, 40, generator=gen) for _ in range(3))
    exact = attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert resolve_backend(q, k, v, backend="sdpa_math") == "sdpa_math"
    out = attention(q, k, v, causal=True, backend="sdpa_math")
    assert (out.double() - exact).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="attention backend must be one of"):
        attention(q, k, v, backend="xformers")  # type: ignore[arg-type]


# ---------------------------------------------------------------- GPU tests (real sizes, bf16)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernels ran in the interpreter above)")

GPU_CASES = [  # the performance spec's attention shapes, then backward at training sizes
    Case(op, d, n, m, causal, dtype, batch=b, heads=h, layout=layout)
    for dtype in ("fp16", "bf16")
    for op, d, n, m, causal, b, h, layout in (
        ("forward", 40, 4096, 4096, False, 2, 8, "bnhd"),
        ("forward", 80, 1024, 1024, False, 2, 8, "bnhd"),
        ("forward", 160, 256, 256, False, 2, 8, "bnhd"),
        ("forward", 40, 4096, 77, False, 2, 8, "bnhd"),
        ("forward", 80, 1024, 77, False, 2, 8, "bnhd"),
        ("forward", 160, 256, 77, False, 2, 8, "bnhd"),
        ("forward", 64, 4096, 4096, False, 2, 5, "bnhd"),
        ("forward", 64, 77, 77, True, 4, 12, "packed"),
        ("autograd", 40, 1024, 1024, False, 2, 8, "bnhd"),
        ("autograd", 80, 1024, 77, False, 2, 8, "bnhd"),
        ("autograd", 160, 256, 256, False, 2, 8, "bnhd"),
        ("autograd", 64, 77, 77, True, 2, 12, "packed"),
    )
]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_gpu_kernel_matches_reference(case: Case, seed: int) -> None:
    from tiengine.kernels.common import interpreter_active

    if interpreter_active():
        pytest.skip("TRITON_INTERPRET is set in this process; GPU tests need compiled kernels")
    inputs = make_inputs(case, seed, device="cuda")
    got = run_case(case, inputs)
    check_results(case, inputs, got, seed)


@needs_gpu
@pytest.mark.gpu
def test_gpu_dispatcher_choices() -> None:
    from tiengine.models.attention import resolve_backend

    half = torch.zeros(2, 8, 64, 40, device="cuda", dtype=torch.float16)
    wide = torch.zeros(1, 1, 64, 512, device="cuda", dtype=torch.float16)
    assert resolve_backend(half, half, half) == ("triton" if torch.cuda.get_device_capability() >= (8, 0) else "sdpa")
    assert resolve_backend(wide, wide, wide) == "sdpa"  # the VAE mid-block's 512-wide head
    assert resolve_backend(half.float(), half.float(), half.float()) == "sdpa"


if __name__ == "__main__":
    sys.exit(run_cases(sys.argv[1], sys.argv[2]))
