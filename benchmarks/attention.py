"""Attention kernels on Stable Diffusion's shapes: the Triton kernel against every torch SDPA backend.

One row per shape of the performance spec's table (/work/shared/spec/performance.md, "Attention shapes
that matter"); columns: the Triton kernel, SDPA restricted to each of its kernels (flash, efficient,
cuDNN, math), what the dispatcher's "auto" picks, and the ratio best-SDPA time / Triton time (> 1: the
Triton kernel is faster). Times are medians after warm-up, with CUDA events on a GPU; useful TFLOP/s
counts 4 * B * H * N * M * d for the forward (two matmuls; causal rows count only their unmasked keys)
and 3x that for forward + backward (four more matmuls, recomputation not counted).

Inputs are laid out as the models produce them: (B, N, H * d) projections viewed as (B, H, N, d).
On a CPU the Triton column reads "needs CUDA" and the SDPA backends that run there are timed, on token
counts divided by --shrink (default 4 on CPU, 1 on CUDA; cross-attention keeps its 77 keys).

    python benchmarks/attention.py [--dtype fp16|bf16|fp32] [--mode fwd|fwd+bwd] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import torch

from tiengine.io.atomic import atomic_write_bytes
from tiengine.models.attention import attention, resolve_backend

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SDPA_BACKENDS = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math")
COLUMNS = ("triton", *SDPA_BACKENDS)


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    queries: int
    keys: int
    head_dim: int
    causal: bool = False
    self_attention: bool = True  # keys shrink with queries on CPU; cross-attention keeps 77


# The performance spec's table; clip.causal uses batch 2 (one prompt and the negative prompt).
SPEC_SHAPES = (
    Shape("sd15.self64", 2, 8, 4096, 4096, 40),
    Shape("sd15.self32", 2, 8, 1024, 1024, 80),
    Shape("sd15.self16", 2, 8, 256, 256, 160),
    Shape("sd15.cross64", 2, 8, 4096, 77, 40, self_attention=False),
    Shape("sd15.cross32", 2, 8, 1024, 77, 80, self_attention=False),
    Shape("sd15.cross16", 2, 8, 256, 77, 160, self_attention=False),
    Shape("sd2.self64", 2, 5, 4096, 4096, 64),
    Shape("vae.mid", 1, 1, 4096, 4096, 512),
    Shape("clip.causal", 2, 12, 77, 77, 64, causal=True, self_attention=False),
)


def shrink(shape: Shape, factor: int) -> Shape:
    if factor == 1:
        return shape
    queries = max(1, shape.queries // factor) if shape.name != "clip.causal" else shape.queries
    keys = max(1, shape.keys // factor) if shape.self_attention else shape.keys
    return Shape(f"{shape.name}/{factor}", shape.batch, shape.heads, queries, keys, shape.head_dim, shape.causal,
                 shape.self_attention)


def useful_flops(shape: Shape, mode: str) -> float:
    if shape.causal:  # top-left causal: query i sees keys 0..i
        pairs = sum(min(i + 1, shape.keys) for i in range(shape.queries))
    else:
        pairs = shape.queries * shape.keys
    forward = 4.0 * shape.batch * shape.heads * pairs * shape.head_dim
    return forward if mode == "fwd" else 3.0 * forward


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, grad: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, h, n, m, d = shape.batch, shape.heads, shape.queries, shape.keys, shape.head_dim

    def projection(tokens: int) -> torch.Tensor:  # (B, tokens, H * d) seen as (B, H, tokens, d)
        x = torch.randn(b, tokens, h * d, generator=gen).to(device=device, dtype=dtype)
        x = x.view(b, tokens, h, d).transpose(1, 2)
        return x.requires_grad_(grad)

    return projection(n), projection(m), projection(m), torch.randn(b, h, n, d, generator=gen).to(device, dtype)


def timer(device: torch.device) -> Callable[[Callable[[], object], int, int], float]:
    """Returns time_it(fn, warmup, repeats) -> median seconds per call."""

    def time_cuda(fn: Callable[[], object], warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        inner = max(1, min(1000, int(1e-3 / max(time.perf_counter() - start, 1e-7))))  # >= ~1 ms per sample
        samples = []
        for _ in range(repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3 / inner)
        return statistics.median(samples)

    def time_cpu(fn: Callable[[], object], warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    return time_cuda if device.type == "cuda" else time_cpu


def run_shape(shape: Shape, dtype: torch.dtype, device: torch.device, mode: str, warmup: int, repeats: int) -> dict:
    q, k, v, dout = make_inputs(shape, dtype, device, grad=mode == "fwd+bwd")
    time_it = timer(device)
    flops = useful_flops(shape, mode)
    row: dict = {
        "shape": shape.name, "batch": shape.batch, "heads": shape.heads, "queries": shape.queries,
        "keys": shape.keys, "head_dim": shape.head_dim, "causal": shape.causal, "useful_gflop": flops / 1e9,
        "auto": resolve_backend(q, k, v, causal=shape.causal), "results": {},
    }
    reference = None
    for column in COLUMNS:
        if column == "triton" and device.type != "cuda":
            row["results"][column] = {"error": "needs CUDA"}
            continue

        def call(backend: str = column) -> torch.Tensor:
            out = attention(q, k, v, causal=shape.causal, backend=backend)  # type: ignore[arg-type]
            if mode == "fwd+bwd":
                torch.autograd.grad(out, (q, k, v), dout)
            return out

        try:
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                out = call().detach()
                seconds = time_it(call, warmup, repeats)
        except Exception as error:  # a backend that cannot take this shape/dtype/device
            message = (str(error).splitlines() or [type(error).__name__])[0]
            unavailable = "No viable backend" in message or "No available kernel" in message
            row["results"][column] = {"error": "n/a (not available)" if unavailable else f"n/a ({message[:120]})"}
            continue
        if reference is None:  # outputs are compared with the first backend that ran
            reference = out.float()
            row["diff_reference"] = column
        row["results"][column] = {
            "ms": seconds * 1e3, "tflops": flops / seconds / 1e12,
            "max_abs_diff": (out.float() - reference).abs().max().item(),
        }
    sdpa_times = [r["ms"] for name, r in row["results"].items() if name != "triton" and "ms" in r]
    triton = row["results"].get("triton", {})
    row["best_sdpa_ms"] = min(sdpa_times) if sdpa_times else None
    row["ratio"] = row["best_sdpa_ms"] / triton["ms"] if sdpa_times and "ms" in triton else None
    return row


def header(device: torch.device, dtype_name: str, mode: str, shrink_factor: int, threads: int) -> dict:
    info = {
        "benchmark": "attention", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "dtype": dtype_name, "mode": mode, "shrink": shrink_factor, "threads": threads,
        "python": platform.python_version(), "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def format_table(info: dict, rows: list[dict]) -> str:
    lines = [" | ".join(f"{k}={v}" for k, v in info.items())]
    cells = ["shape", "B,H,N,M,d", "auto", *COLUMNS, "best SDPA / triton"]
    lines.append("| " + " | ".join(cells) + " |")
    lines.append("|" + "---|" * len(cells))
    for row in rows:
        dims = f"{row['batch']},{row['heads']},{row['queries']},{row['keys']},{row['head_dim']}" + (" causal" if row["causal"] else "")
        values = []
        for column in COLUMNS:
            result = row["results"][column]
            values.append(f"{result['ms']:.3g} ms ({result['tflops']:.3g} TF/s)" if "ms" in result else result["error"][:48])
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        lines.append("| " + " | ".join([row["shape"], dims, row["auto"], *values, ratio]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd")
    parser.add_argument("--shrink", type=int, default=None, help="divide token counts (default 4 on CPU, 1 on CUDA)")
    parser.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype_name = args.dtype or ("fp16" if on_gpu else "fp32")
    shrink_factor = args.shrink or (1 if on_gpu else 4)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    repeats = args.repeats if args.repeats is not None else (30 if on_gpu else 3)
    wanted = set(args.shapes.split(",")) if args.shapes else None
    shapes = [shrink(s, shrink_factor) for s in SPEC_SHAPES if wanted is None or s.name in wanted]

    info = header(device, dtype_name, args.mode, shrink_factor, torch.get_num_threads())
    if not on_gpu:
        print("The Triton kernels need a CUDA device: the triton column is empty here and 'auto' resolves to SDPA.")
    print("Triton autotunes on its first call per shape (inside warm-up).", file=sys.stderr)
    rows = []
    for shape in shapes:
        print(f"... {shape.name}", file=sys.stderr, flush=True)
        rows.append(run_shape(shape, DTYPES[dtype_name], device, args.mode, warmup, repeats))
    print(format_table(info, rows))
    if args.json_path:
        atomic_write_bytes(args.json_path, json.dumps({"header": info, "rows": rows}, indent=2).encode(), overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
