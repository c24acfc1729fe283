"""Fused GroupNorm+SiLU and GEGLU (Triton) against the unfused PyTorch ops the models run otherwise.

Rows: SD1.5's UNet and VAE GroupNorm+SiLU shapes and its transformer GEGLU shapes (batch 2 = CFG).
Columns: eager PyTorch as tiengine.models.layers computes it (GroupNorm in fp32 for 16-bit inputs, then SiLU;
F.linear, chunk, GELU, product), the Triton kernel, and eager / Triton (> 1: the fused kernel is faster).
GroupNorm+SiLU is memory-bound: GB/s counts the minimum traffic (read x, write y). GEGLU reports TFLOP/s
of its projection (2 * rows * dim * 2 * inner). Medians after warm-up, CUDA events on a GPU.

    python benchmarks/fusions.py [--dtype fp16|bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from tiengine.io.atomic import atomic_write_bytes

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# (name, (B, C, H, W), eps): UNet resnets at each resolution, VAE decoder blocks
GROUPNORM_SHAPES = (
    ("unet.64", (2, 320, 64, 64), 1e-5),
    ("unet.32", (2, 640, 32, 32), 1e-5),
    ("unet.16", (2, 1280, 16, 16), 1e-5),
    ("unet.8", (2, 1280, 8, 8), 1e-5),
    ("vae.128", (1, 512, 128, 128), 1e-6),
    ("vae.512", (1, 128, 512, 512), 1e-6),
)
# (name, rows, dim, inner): transformer feed-forward at each UNet resolution (inner = 4 * dim)
GEGLU_SHAPES = (
    ("ff.64", 2 * 4096, 320, 1280),
    ("ff.32", 2 * 1024, 640, 2560),
    ("ff.16", 2 * 256, 1280, 5120),
    ("ff.8", 2 * 64, 1280, 5120),
)


def eager_group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.silu(F.group_norm(x.float(), 32, weight.float(), bias.float(), eps)).to(x.dtype)
    return F.silu(F.group_norm(x, 32, weight, bias, eps))


def eager_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    hidden, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return F.gelu(gate) * hidden


def measure(calls: dict[str, Callable[[], object]], warmup: int, min_run_time: float, on_gpu: bool) -> dict:
    """Median ms per call of each callable (torch.utils.benchmark: synchronises CUDA, blocks of runs)."""
    results = {}
    for name, call in calls.items():
        if name == "triton" and not on_gpu:
            results[name] = {"error": "needs CUDA"}
            continue
        try:
            with torch.no_grad():
                for _ in range(warmup):
                    call()
                timing = Timer(stmt="call()", globals={"call": call}).blocked_autorange(min_run_time=min_run_time)
            results[name] = {"ms": timing.median * 1e3}
        except Exception as error:  # e.g. the Triton kernel on a CPU
            results[name] = {"error": (str(error).splitlines() or [type(error).__name__])[0][:100]}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype_name = args.dtype or ("fp16" if on_gpu else "fp32")
    dtype = DTYPES[dtype_name]
    warmup, min_run_time = (10, 1.0) if on_gpu else (1, 0.5)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int, gain: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * gain).to(device=device, dtype=dtype)

    info = {
        "benchmark": "fusions", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if on_gpu else f"CPU ({platform.machine()})",
        "dtype": dtype_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    if not on_gpu:
        print("The Triton kernels need a CUDA device: only the eager column is timed here, on the smaller shapes.")
        groupnorm_rows, geglu_rows = GROUPNORM_SHAPES[2:4], GEGLU_SHAPES[3:]
    else:
        groupnorm_rows, geglu_rows = GROUPNORM_SHAPES, GEGLU_SHAPES
    from tiengine.kernels.geglu import geglu
    from tiengine.kernels.groupnorm import group_norm_silu

    rows = []
    for name, shape, eps in groupnorm_rows:
        x, weight, bias = rand(*shape), rand(shape[1]), rand(shape[1])
        results = measure({
            "eager": lambda: eager_group_norm_silu(x, weight, bias, eps),
            "triton": lambda: group_norm_silu(x, 32, weight, bias, eps),
        }, warmup, min_run_time, on_gpu)
        traffic = 2 * x.numel() * x.element_size()
        for r in results.values():
            if "ms" in r:
                r["GB/s"] = traffic / (r["ms"] / 1e3) / 1e9
        rows.append({"kernel": "groupnorm_silu", "shape": name, "dims": list(shape), "results": results})
    for name, n_rows, dim, inner in geglu_rows:
        x, weight, bias = rand(n_rows, dim), rand(2 * inner, dim, gain=dim**-0.5), rand(2 * inner)
        results = measure({
            "eager": lambda: eager_geglu(x, weight, bias),
            "triton": lambda: geglu(x, weight, bias),
        }, warmup, min_run_time, on_gpu)
        flops = 2.0 * n_rows * dim * 2 * inner
        for r in results.values():
            if "ms" in r:
                r["TFLOP/s"] = flops / (r["ms"] / 1e3) / 1e12
        rows.append({"kernel": "geglu", "shape": name, "dims": [n_rows, dim, inner], "results": results})

    print(" | ".join(f"{k}={v}" for k, v in info.items()))
    print("| kernel | shape | dims | eager | triton | eager / triton |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cells = []
        for column in ("eager", "triton"):
            r = row["results"][column]
            rate = next((f"{r[k]:.3g} {k}" for k in ("GB/s", "TFLOP/s") if k in r), "")
            cells.append(f"{r['ms']:.3g} ms ({rate})" if "ms" in r else f"n/a ({r['error'][:40]})")
        eager, triton = row["results"]["eager"], row["results"]["triton"]
        row["ratio"] = eager["ms"] / triton["ms"] if "ms" in eager and "ms" in triton else None
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        print(f"| {row['kernel']} | {row['shape']} | {'x'.join(map(str, row['dims']))} | {cells[0]} | {cells[1]} | {ratio} |")
    if args.json_path:
        atomic_write_bytes(args.json_path, json.dumps({"header": info, "rows": rows}, indent=2).encode(), overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
