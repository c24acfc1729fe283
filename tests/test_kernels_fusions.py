"""Triton GroupNorm+SiLU and GEGLU kernels against their fp32 PyTorch references.

As in test_kernels_attention.py: without a GPU the kernels run in Triton's interpreter, in a child
process (this file run as a script with TRITON_INTERPRET=1) so that the setting cannot leak into or be
pre-empted by other tests; the parent draws fresh random inputs (seed in failure messages,
TIENGINE_KERNEL_SEED replays one) and compares the NaN-poisoned outputs with the references in fp64.
On a GPU the same checks run in-process at SD's sizes, plus bf16.

Tolerance: `max |kernel - ref64| <= eps(dtype) * max|ref64| + 4 * max |ref32 - ref64|`: the kernels keep
everything in fp32 and round once to the output dtype (eps/2 relative, doubled for headroom), plus four
times the fp32 reference's own noise on the same inputs. Gradients come from the backward fallback,
PyTorch's own ops in the input dtype (GEGLU: about six roundings per term), so they get 4 * eps(dtype).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

CHILD_TIMEOUT_S = 600
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """kernel: groupnorm | geglu. shape: x's shape. groups/eps: GroupNorm; inner: GEGLU. grad: run backward."""

    kernel: str
    shape: tuple[int, ...]
    dtype: str
    groups: int = 0
    eps: float = 1e-5
    silu: bool = True
    affine: bool = True
    mean: float = 0.0  # offset added to x (GroupNorm statistics far from zero)
    splits: int | None = None
    inner: int = 0
    layout: str = "contiguous"  # geglu: contiguous | strided_rows (x rows padded) | weight_t (weight a transposed view)
    grad: bool = False

    @property
    def name(self) -> str:
        shape = "x".join(map(str, self.shape))
        if self.kernel == "groupnorm":
            extra = f"-g{self.groups}-eps{self.eps}" + ("" if self.silu else "-nosilu") + ("" if self.affine else "-noaffine")
            extra += f"-mean{self.mean:g}" if self.mean else ""
            extra += f"-splits{self.splits}" if self.splits else ""
        else:
            extra = f"-inner{self.inner}" + ("" if self.affine else "-nobias") + (f"-{self.layout}" if self.layout != "contiguous" else "")
        return f"{self.kernel}-{shape}-{self.dtype}{extra}{'-grad' if self.grad else ''}"


INTERPRETER_CASES = [
    Case("groupnorm", (2, 32, 6, 5), "fp32", groups=8),
    Case("groupnorm", (2, 32, 6, 5), "fp16", groups=8),
    Case("groupnorm", (1, 64, 4, 4), "fp16", groups=32, eps=1e-6),  # SD's 32 groups
    Case("groupnorm", (2, 24, 37), "fp32", groups=4, splits=3),  # (B, C, L), a run split in three
    Case("groupnorm", (1, 16, 9, 9), "fp16", groups=4, splits=2, silu=False),
    Case("groupnorm", (1, 16, 9, 9), "fp32", groups=2, affine=False),
    Case("groupnorm", (2, 16, 8, 8), "fp32", groups=4, mean=300.0, splits=3),  # E[x^2] - E[x]^2 would cancel
    Case("groupnorm", (1, 16, 5, 6), "fp32", groups=4, grad=True),
    Case("geglu", (2, 35, 64), "fp32", inner=80),
    Case("geglu", (2, 35, 64), "fp16", inner=80),
    Case("geglu", (66, 40), "fp16", inner=48),  # dim not a multiple of BLOCK_K, inner not of BLOCK_N
    Case("geglu", (3, 7, 96), "fp32", inner=40, affine=False),
    Case("geglu", (2, 9, 64), "fp16", inner=32, layout="strided_rows"),
    Case("geglu", (2, 9, 48), "fp32", inner=32, layout="weight_t"),
    Case("geglu", (2, 9, 64), "fp32", inner=48, grad=True),
]


def make_inputs(case: Case, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = DTYPES[case.dtype]

    def rand(*shape: int, gain: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * gain + offset).to(device=device, dtype=dtype)

    if case.kernel == "groupnorm":
        channels = case.shape[1]
        inputs = {"x": rand(*case.shape, gain=2.0, offset=case.mean), "dout": rand(*case.shape)}
        if case.affine:
            inputs["weight"], inputs["bias"] = rand(channels, offset=1.0), rand(channels)
        return inputs
    dim = case.shape[-1]
    if case.layout == "strided_rows":  # rows of x are `dim` wide inside a wider buffer
        x = rand(*case.shape[:-1], dim + 16)[..., :dim]
    else:
        x = rand(*case.shape)
    if case.layout == "weight_t":  # weight stored as (dim, 2 * inner), seen transposed
        weight = rand(dim, 2 * case.inner, gain=dim**-0.5).t()
    else:
        weight = rand(2 * case.inner, dim, gain=dim**-0.5)
    inputs = {"x": x, "weight": weight, "dout": rand(*case.shape[:-1], case.inner)}
    if case.affine:
        inputs["bias"] = rand(2 * case.inner)
    return inputs


def _kernel_args(case: Case, inputs: dict[str, torch.Tensor]) -> tuple:
    if case.kernel == "groupnorm":
        return (inputs["x"], case.groups, inputs.get("weight"), inputs.get("bias"), case.eps)
    return (inputs["x"], inputs["weight"], inputs.get("bias"))


# ---------------------------------------------------------------- child process (TRITON_INTERPRET=1)


def run_case(case: Case, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the Triton kernel into a NaN-filled output buffer; with grad, also the autograd path."""
    from tiengine.kernels.geglu import geglu, geglu_forward
    from tiengine.kernels.groupnorm import group_norm_silu, group_norm_silu_forward

    args = _kernel_args(case, inputs)
    if case.kernel == "groupnorm":
        poisoned = torch.full_like(inputs["x"], float("nan"))
        outputs = {"out": group_norm_silu_forward(*args, silu=case.silu, out=poisoned, splits=case.splits)}
    else:
        poisoned = torch.full_like(inputs["dout"], float("nan"))
        outputs = {"out": geglu_forward(*args, out=poisoned)}
    if case.grad:
        leaves = [a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]
        out = group_norm_silu(*leaves, silu=case.silu) if case.kernel == "groupnorm" else geglu(*leaves)
        out.backward(inputs["dout"])
        outputs["grad_out"] = out.detach()
        names = ("x", "weight", "bias") if case.kernel == "geglu" else ("x", "groups", "weight", "bias", "eps")
        outputs.update({f"grad_{n}": leaf.grad for n, leaf in zip(names, leaves) if isinstance(leaf, torch.Tensor)})
    return outputs


def run_cases(cases_path: str, results_path: str) -> int:
    batch = torch.load(cases_path, weights_only=True)
    results = {}
    for name, entry in batch.items():
        case = Case(**{**entry["case"], "shape": tuple(entry["case"]["shape"])})
        try:
            results[name] = {"outputs": run_case(case, entry["inputs"]), "error": None}
        except Exception:  # reported per case by the parent
            results[name] = {"outputs": {}, "error": traceback.format_exc()}
    torch.save(results, results_path)
    return 0


# ---------------------------------------------------------------- checks


def reference_outputs(case: Case, inputs: dict[str, torch.Tensor], compute: torch.dtype) -> dict[str, torch.Tensor]:
    from tiengine.kernels.geglu import geglu_reference
    from tiengine.kernels.groupnorm import group_norm_silu_reference

    leaves = {k: v.to(compute).detach().requires_grad_(True) for k, v in inputs.items() if k != "dout"}
    if case.kernel == "groupnorm":
        out = group_norm_silu_reference(leaves["x"], case.groups, leaves.get("weight"), leaves.get("bias"), case.eps, case.silu)
    else:
        out = geglu_reference(leaves["x"], leaves["weight"], leaves.get("bias"))
    out.backward(inputs["dout"].to(compute))
    result = {"out": out.detach(), "grad_out": out.detach()}
    result.update({f"grad_{k}": v.grad for k, v in leaves.items()})
    return result


def check_results(case: Case, inputs: dict[str, torch.Tensor], got: dict[str, torch.Tensor], seed: int) -> None:
    dtype = DTYPES[case.dtype]
    exact = reference_outputs(case, inputs, torch.float64)
    fp32 = reference_outputs(case, inputs, torch.float32)
    where = f"{case.name} (seed {seed})"
    assert "out" in got and (not case.grad or "grad_x" in got), f"{where}: missing outputs {sorted(got)}"
    for key, value in got.items():
        assert value.shape == exact[key].shape, f"{where}: {key} shape {tuple(value.shape)}"
        assert value.dtype == dtype, f"{where}: {key} dtype {value.dtype}"
        assert not torch.isnan(value).any(), f"{where}: {key} has NaN (unwritten elements of the poisoned buffer)"
        err = (value.double() - exact[key]).abs().max().item()
        noise = (fp32[key].double() - exact[key]).abs().max().item()
        rounding = 4 * eps(dtype) if key.startswith("grad_") and key != "grad_out" else eps(dtype)
        bound = rounding * exact[key].abs().max().item() + 4 * noise
        assert err <= bound, f"{where}: {key} max error {err:.3e} exceeds {bound:.3e} (fp32 reference noise {noise:.3e})"


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


# ---------------------------------------------------------------- interpreter tests


@pytest.fixture(scope="module")
def seed() -> int:
    return int(os.environ.get("TIENGINE_KERNEL_SEED") or secrets.randbits(31))


@pytest.fixture(scope="module")
def interpreted(seed: int, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    folder = tmp_path_factory.mktemp("fusions_interpreter")
    inputs = {c.name: make_inputs(c, seed + i) for i, c in enumerate(INTERPRETER_CASES)}
    torch.save({c.name: {"case": asdict(c), "inputs": inputs[c.name]} for c in INTERPRETER_CASES}, folder / "cases.pt")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(folder / "cases.pt"), str(folder / "results.pt")],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
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


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda gn, ge: gn(torch.zeros(2, 30, 4, 4), 8), "positive divisor of channels=30"),
        (lambda gn, ge: gn(torch.zeros(2, 32, 4, 4).transpose(2, 3), 8), "must be contiguous"),
        (lambda gn, ge: gn(torch.zeros(2, 32, 4, 4), 8, torch.zeros(16)), r"weight must be a \(32,\) tensor"),
        (lambda gn, ge: gn(torch.zeros(2, 32, 4, 4, dtype=torch.int64), 8), "supported: float16"),
        (lambda gn, ge: ge(torch.zeros(3, 64), torch.zeros(81, 64)), r"weight must be \(2 \* inner, dim\)"),
        (lambda gn, ge: ge(torch.zeros(3, 48), torch.zeros(80, 64)), r"x must be \(\.\.\., dim=64\)"),
        (lambda gn, ge: ge(torch.zeros(3, 64), torch.zeros(80, 64), torch.zeros(40)), r"bias must be \(80,\)"),
        (lambda gn, ge: ge(torch.zeros(4, 3, 64).transpose(0, 1), torch.zeros(80, 64)), "without a copy"),
        (lambda gn, ge: ge(torch.zeros(3, 64, dtype=torch.float16), torch.zeros(80, 64)), "share dtype"),
    ],
)
def test_launchers_reject_bad_inputs(call, message: str) -> None:
    from tiengine.kernels.common import KernelInputError
    from tiengine.kernels.geglu import geglu_forward
    from tiengine.kernels.groupnorm import group_norm_silu_forward

    gn = lambda x, groups, weight=None, bias=None: group_norm_silu_forward(x, groups, weight, bias, 1e-5)  # noqa: E731
    with pytest.raises(KernelInputError, match=message):
        call(gn, geglu_forward)


def test_supports_is_false_on_cpu() -> None:
    from tiengine.kernels.geglu import supports as geglu_supports
    from tiengine.kernels.groupnorm import supports as groupnorm_supports

    x = torch.zeros(2, 32, 4, 4, dtype=torch.float16)
    assert not groupnorm_supports(x, 8)
    assert not geglu_supports(torch.zeros(3, 64, dtype=torch.float16), torch.zeros(80, 64, dtype=torch.float16))


# ---------------------------------------------------------------- GPU tests (SD sizes, bf16)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernels ran in the interpreter above)")

GPU_CASES = [
    case
    for dtype in ("fp16", "bf16")
    for case in (
        Case("groupnorm", (2, 320, 64, 64), dtype, groups=32),  # UNet down block 0
        Case("groupnorm", (2, 1280, 8, 8), dtype, groups=32),  # UNet mid block
        Case("groupnorm", (1, 512, 128, 128), dtype, groups=32, eps=1e-6),  # VAE decoder
        Case("groupnorm", (1, 128, 512, 512), dtype, groups=32, eps=1e-6),  # VAE decoder, last block
        Case("groupnorm", (2, 640, 32, 32), dtype, groups=32, grad=True),
        Case("geglu", (2, 4096, 320), dtype, inner=1280),
        Case("geglu", (2, 1024, 640), dtype, inner=2560),
        Case("geglu", (2, 64, 1280), dtype, inner=5120),
        Case("geglu", (2, 1024, 640), dtype, inner=2560, grad=True),
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
    check_results(case, inputs, run_case(case, inputs), seed)


if __name__ == "__main__":
    sys.exit(run_cases(sys.argv[1], sys.argv[2]))
