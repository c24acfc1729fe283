"""Fused GroupNorm+SiLU and GEGLU (Triton) against the PyTorch ops, through the dispatcher the models use.

Every row calls tiengine.models.fusions (the dispatcher the UNet and VAE call) or a model block, with
fused_backend "torch" (the PyTorch ops: GroupNorm in fp32 for 16-bit inputs, then SiLU; F.linear, chunk,
GELU, product) and "triton" (the fused kernels, forced), so it measures the wired path; the "auto"
column names the backend the models would pick for these inputs (on a CPU: torch).
Rows (batch 2 = CFG, SD1.5 shapes):
- groupnorm_silu: the op alone at the UNet's resnet norms at each resolution and the VAE decoder's.
- geglu: the op alone at the transformer feed-forward of each UNet resolution (inner = 4 * dim).
- resnet: a whole UNet ResnetBlock2D (norm1 -> SiLU -> conv1 (+ temb) -> norm2 -> SiLU -> conv2).
- feed_forward: a whole transformer FeedForward (GEGLU, then the Linear back to dim).
GroupNorm+SiLU is memory-bound: GB/s counts the minimum traffic (read x, write y). GEGLU reports TFLOP/s
of its projection (2 * rows * dim * 2 * inner). Medians after warm-up (torch.utils.benchmark).
On a CPU the triton column reads "needs CUDA" and only the smaller shapes run.

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
from torch import nn
from torch.utils.benchmark import Timer

from tiengine.io.atomic import atomic_write_bytes
from tiengine.models import fusions
from tiengine.models.layers import FeedForward, ResnetBlock2D

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BACKENDS = ("torch", "triton")

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
# (name, (B, C, H, W)): UNet ResnetBlock2D with C in and out channels, temb 1280 (SD1.5)
RESNET_SHAPES = (
    ("unet.64", (2, 320, 64, 64)),
    ("unet.32", (2, 640, 32, 32)),
    ("unet.8", (2, 1280, 8, 8)),
)
TEMB_CHANNELS = 1280


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
    factory = {"device": device, "dtype": dtype}

    def rand(*shape: int, gain: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * gain).to(**factory)

    info = {
        "benchmark": "fusions", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if on_gpu else f"CPU ({platform.machine()})",
        "dtype": dtype_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    if not on_gpu:
        print("The Triton kernels need a CUDA device: the dispatcher falls back to PyTorch ('auto' picks torch);"
              " only the torch column is timed here, on the smaller shapes.")
        groupnorm_rows, geglu_rows, resnet_rows = GROUPNORM_SHAPES[2:4], GEGLU_SHAPES[3:], RESNET_SHAPES[2:]
    else:
        groupnorm_rows, geglu_rows, resnet_rows = GROUPNORM_SHAPES, GEGLU_SHAPES, RESNET_SHAPES

    rows = []

    def add_row(kind: str, name: str, dims: list[int], auto: str, calls: dict[str, Callable[[], object]],
                rate: tuple[str, float] | None = None) -> None:
        results = measure(calls, warmup, min_run_time, on_gpu)
        for r in results.values():
            if "ms" in r and rate is not None:
                r[rate[0]] = rate[1] / (r["ms"] / 1e3)
        rows.append({"kernel": kind, "shape": name, "dims": dims, "auto": auto, "results": results})

    for name, shape, eps in groupnorm_rows:
        norm = nn.GroupNorm(32, shape[1], eps=eps, **factory)
        x = rand(*shape)
        add_row("groupnorm_silu", name, list(shape), fusions.resolve_group_norm_backend(norm, x),
                {b: (lambda b=b: fusions.group_norm(norm, x, silu=True, backend=b)) for b in BACKENDS},
                ("GB/s", 2 * x.numel() * x.element_size() / 1e9))
    for name, n_rows, dim, inner in geglu_rows:
        proj = nn.Linear(dim, 2 * inner, **factory)
        x = rand(n_rows, dim)
        add_row("geglu", name, [n_rows, dim, inner], fusions.resolve_geglu_backend(proj, x),
                {b: (lambda b=b: fusions.geglu(proj, x, backend=b)) for b in BACKENDS},
                ("TFLOP/s", 2.0 * n_rows * dim * 2 * inner / 1e12))
    for name, shape in resnet_rows:
        block = ResnetBlock2D(shape[1], shape[1], temb_channels=TEMB_CHANNELS, groups=32, eps=1e-5, **factory)
        x, temb = rand(*shape), rand(shape[0], TEMB_CHANNELS)
        add_row("resnet", name, list(shape), fusions.resolve_group_norm_backend(block.norm1, x),
                {b: (lambda b=b: block(x, temb, fused_backend=b)) for b in BACKENDS})
    for name, n_rows, dim, _ in geglu_rows:
        ff = FeedForward(dim, **factory)
        x = rand(2, n_rows // 2, dim)
        add_row("feed_forward", name, [2, n_rows // 2, dim], fusions.resolve_geglu_backend(ff.net[0].proj, x),
                {b: (lambda b=b: ff(x, fused_backend=b)) for b in BACKENDS})

    print(" | ".join(f"{k}={v}" for k, v in info.items()))
    print("| op | shape | dims | auto picks | torch | triton | torch / triton |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        cells = []
        for column in BACKENDS:
            r = row["results"][column]
            rate = next((f" ({r[k]:.3g} {k})" for k in ("GB/s", "TFLOP/s") if k in r), "")
            cells.append(f"{r['ms']:.3g} ms{rate}" if "ms" in r else f"n/a ({r['error'][:40]})")
        eager, triton = row["results"]["torch"], row["results"]["triton"]
        row["ratio"] = eager["ms"] / triton["ms"] if "ms" in eager and "ms" in triton else None
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        dims = "x".join(map(str, row["dims"]))
        print(f"| {row['kernel']} | {row['shape']} | {dims} | {row['auto']} | {cells[0]} | {cells[1]} | {ratio} |")
    if args.json_path:
        atomic_write_bytes(args.json_path, json.dumps({"header": info, "rows": rows}, indent=2).encode(), overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
