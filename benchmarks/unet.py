"""UNet step time: tiengine's UNet2DConditionModel vs diffusers' UNet2DConditionModel, same weights.

Full-size SD1.5 UNet (random weights, shared by both models), CFG batch 2, 77-token context, latents
16x16 and 32x32 by default (short CPU runs) and 64x64 (512x512 images) with `--latents 64`; fp32 and bf16.
`--channels-last` / `--weights-layout channels_last` run tiengine on NHWC activations / weights. The two models are timed interleaved
(alternating which goes first) so load from other processes hits both alike; the median is reported,
with the speedup (diffusers / tiengine), each model's useful FLOP rate as a fraction of the measured
matmul ceiling, and the max difference between the two outputs relative to max |diffusers output|.

    python benchmarks/unet.py [--latents 16 32] [--dtypes fp32 bf16] [--repeats 7] [--threads 2]
                              [--clock wall|cpu] [--channels-last] [--weights-layout nchw|channels_last]
                              [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from tiengine.io.atomic import atomic_write_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_ceiling(dtype: torch.dtype, clock: str, size: int = 2048, repeats: int = 5) -> float:
    """Median FLOP/s of a size^3 torch.mm in dtype (the machine's dense-math ceiling)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    seconds = interleaved_medians({"mm": lambda: torch.mm(a, b)}, repeats=repeats, warmup=1, clock=clock)["mm"]
    return 2 * size**3 / seconds


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_medians(
    functions: dict[str, Callable[[], object]], *, repeats: int, warmup: int, clock: str = "wall",
    synchronize: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median seconds per function, runs interleaved and the order rotated every repetition.

    clock "cpu" counts this process's CPU seconds instead of wall seconds: with one thread it is
    insensitive to other processes taking the cores (it still shares caches and memory bandwidth).
    synchronize runs before and after each timed call (torch.cuda.synchronize on a GPU).
    """
    now = CLOCKS[clock]
    names = list(functions)
    for _ in range(warmup):
        for name in names:
            functions[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            synchronize()
            start = now()
            functions[name]()
            synchronize()
            times[name].append(now() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def dtype_passes(
    ours: torch.nn.Module, reference: torch.nn.Module, args: argparse.Namespace, header: dict[str, str]
) -> Iterator[tuple[str, torch.dtype, float]]:
    """Per dtype of args.dtypes: both models cast to it on the same tensors (the reference is loaded with
    assign=True, no copy), and the matmul ceiling in FLOP/s, also recorded in header. With
    args.weights_layout "channels_last", tiengine's 4-d weights are then copied to NHWC strides (the
    reference keeps its NCHW tensors)."""
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        ours.to(dtype)
        reference.load_state_dict(ours.state_dict(), assign=True)
        if getattr(args, "weights_layout", "nchw") == "channels_last":
            channels_last_weights_(ours)
        gc.collect()
        ceiling = matmul_ceiling(dtype, args.clock)
        header[f"matmul_ceiling_{dtype_name}"] = f"{ceiling / 1e9:.0f} GFLOP/s (2048^3 torch.mm)"
        yield dtype_name, dtype, ceiling


def measure_row(
    functions: dict[str, Callable[[], torch.Tensor]], *, shape: str, dtype_name: str, args: argparse.Namespace,
    ceiling: float,
) -> dict[str, object]:
    """Time "diffusers" against "tiengine" (same inputs) and compare their outputs: one table row."""
    with torch.inference_mode():
        difference = relative_difference(functions["tiengine"](), functions["diffusers"]())
        flops = count_flops(functions["diffusers"])
        seconds = interleaved_medians(functions, repeats=args.repeats, warmup=args.warmup, clock=args.clock)
        if args.profile:
            for name, function in functions.items():
                print(f"== profile {name} {dtype_name} {shape}\n{profile_table(function)}")
    row = {
        "shape": shape,
        "dtype": dtype_name,
        "gflop": flops / 1e9,
        "diffusers_ms": seconds["diffusers"] * 1e3,
        "tiengine_ms": seconds["tiengine"] * 1e3,
        "speedup": seconds["diffusers"] / seconds["tiengine"],
        "diffusers_eff": flops / seconds["diffusers"] / ceiling,
        "tiengine_eff": flops / seconds["tiengine"] / ceiling,
        "max_rel_diff": difference,
    }
    print(row, flush=True)
    return row


def versions_header(threads: int, clock: str) -> dict[str, str]:
    import diffusers

    return {
        "device": f"cpu: {cpu_name()}",
        "threads": str(threads),
        "clock": "wall seconds" if clock == "wall" else "process CPU seconds",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def count_flops(function: Callable[[], object]) -> float:
    """FLOPs of one call as torch's FlopCounterMode counts them (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function()
    return float(counter.get_total_flops())


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def print_table(header: dict[str, str], rows: list[dict]) -> None:
    for key, value in header.items():
        print(f"# {key}: {value}")
    columns = ["shape", "dtype", "diffusers_ms", "tiengine_ms", "speedup", "diffusers_eff", "tiengine_eff", "max_rel_diff"]
    print(" | ".join(columns))
    for row in rows:
        print(
            f"{row['shape']} | {row['dtype']} | {row['diffusers_ms']:.1f} | {row['tiengine_ms']:.1f} | "
            f"{row['speedup']:.2f}x | {row['diffusers_eff']:.0%} | {row['tiengine_eff']:.0%} | {row['max_rel_diff']:.1e}"
        )


def channels_last_weights_(module: torch.nn.Module) -> None:
    """Give every 4-d parameter (convolution weights) NHWC strides, as new tensors."""
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim == 4:
                param.data = param.data.contiguous(memory_format=torch.channels_last)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Seeded uniform weights with unit fan-in variance, norm scales near 1, small biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                bound = (3.0 / param[0].numel()) ** 0.5
                param.uniform_(-bound, bound, generator=generator)
            elif name.endswith("weight"):
                param.uniform_(0.8, 1.2, generator=generator)
            else:
                param.uniform_(-0.2, 0.2, generator=generator)


def profile_table(function: Callable[[], object], rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        function()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", type=int, nargs="+", default=[16, 32], help="latent sides (image side / 8)")
    parser.add_argument("--batch", type=int, default=2, help="2 = one classifier-free-guidance step")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (use --threads 1)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per model and row")
    parser.add_argument("--channels-last", action="store_true",
                        help="run tiengine on NHWC activations (UNet2DConditionModel(channels_last=True))")
    parser.add_argument("--weights-layout", choices=("nchw", "channels_last"), default="nchw",
                        help="tiengine's convolution weights' strides (diffusers keeps NCHW)")
    parser.add_argument("--json", type=Path, help="also write header and rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import diffusers

    from tiengine.models.unet import UNet2DConditionModel, UNetConfig

    config = UNetConfig.sd15()
    ours = UNet2DConditionModel(config, channels_last=args.channels_last).eval().requires_grad_(False)
    randomize_(ours, seed=0)
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**config.to_diffusers()).eval().requires_grad_(False)
    header = versions_header(args.threads, args.clock)
    header["model"] = ("SD1.5 UNet (859.5M parameters, random weights shared by both models), tiengine "
                       f"channels_last={args.channels_last}, weights {args.weights_layout}")
    rows = []
    for dtype_name, dtype, ceiling in dtype_passes(ours, reference, args, header):
        for side in args.latents:
            generator = torch.Generator().manual_seed(side)
            sample = torch.randn(args.batch, 4, side, side, generator=generator).to(dtype)
            timestep = torch.full((args.batch,), 500.0)
            context = torch.randn(args.batch, 77, config.cross_attention_dim, generator=generator).to(dtype)
            functions = {
                "diffusers": lambda: reference(sample, timestep, context).sample,
                "tiengine": lambda: ours(sample, timestep, context),
            }
            rows.append(
                measure_row(functions, shape=f"latent {args.batch}x4x{side}x{side}", dtype_name=dtype_name,
                            args=args, ceiling=ceiling)
            )
    print_table(header, rows)
    if args.json:
        atomic_write_bytes(args.json, json.dumps({"header": header, "rows": rows}, indent=2).encode(), overwrite=True)


if __name__ == "__main__":
    main()
