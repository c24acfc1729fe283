"""Where a second thread starts to pay: one UNet call (CFG batch 2) on 1 thread against every CPU.

The calibration of tiengine.threads.SMALL_WORK_MACS: for the built-in model and the full-size SD1.5 UNet
(random weights) at several image sizes, the median wall time of a UNet call with 1 thread and with
all CPUs, interleaved (benchmarks/unet.py's interleaved_medians), next to the policy's work measure
(the widest convolution's multiply-adds per image) and its choice. Run it on an idle machine, and
with --neighbour beside benchmarks/contention.py's busy process (matmuls on every core).

    python benchmarks/threads.py [--builtin-sizes 64 128 256 512] [--sd15-sizes 64 128 256] [--repeats 5]
                                 [--neighbour]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contention import neighbour  # benchmarks/contention.py
from tiengine.weights_conv import load_models
from unet import cpu_name, interleaved_medians, randomize_  # benchmarks/unet.py

from tiengine.default_model import default_model_path
from tiengine.models.config import ModelConfig
from tiengine.models.unet import UNet2DConditionModel
from tiengine.threads import available_cpus, choose_threads, widest_conv_macs


def unet_call(unet: UNet2DConditionModel, config: ModelConfig, size: int):
    """A function running one CFG-batch UNet call for size x size pixels."""
    factor = 2 ** (len(config.vae.block_out_channels) - 1)
    generator = torch.Generator().manual_seed(size)
    sample = torch.randn(2, config.unet.in_channels, size // factor, size // factor, generator=generator)
    context = torch.randn(2, 77, config.unet.cross_attention_dim, generator=generator)
    timestep = torch.full((2,), 500.0)
    return lambda: unet(sample, timestep, context)


def threaded(function, threads: int):
    def run():
        torch.set_num_threads(threads)
        return function()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--builtin-sizes", type=int, nargs="*", default=[64, 128, 256, 512])
    parser.add_argument("--sd15-sizes", type=int, nargs="*", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--neighbour", action="store_true", help="time beside a process busy on every core")
    args = parser.parse_args()
    cpus = available_cpus()
    print(f"# device: cpu: {cpu_name()}, {cpus} CPUs; torch {torch.__version__}; "
          f"load {Path('/proc/loadavg').read_text().split()[0]} (1-minute average); "
          f"{'beside a busy neighbour' if args.neighbour else 'no neighbour'}")
    print("model | image | widest conv MMAC | 1 thread ms | "
          f"{cpus} threads ms | 1 / {cpus} | policy picks")
    models = []
    if args.builtin_sizes:
        config, modules = load_models(default_model_path(), dtype=torch.float32)
        models.append(("built-in", config, modules["unet"].eval(), args.builtin_sizes))
    if args.sd15_sizes:
        config = ModelConfig.sd15()
        unet = UNet2DConditionModel(config.unet).eval().requires_grad_(False)
        randomize_(unet, seed=0)
        models.append(("SD1.5", config, unet, args.sd15_sizes))
    for label, config, unet, sizes in models:
        for size in sizes:
            call = unet_call(unet, config, size)
            with torch.inference_mode(), neighbour() if args.neighbour else contextlib.nullcontext():
                seconds = interleaved_medians({"one": threaded(call, 1), "all": threaded(call, cpus)},
                                              repeats=args.repeats, warmup=1)
            choice = choose_threads(config, size, size)
            print(f"{label} | {size}x{size} | {widest_conv_macs(config, size, size) / 1e6:.0f} | "
                  f"{seconds['one'] * 1e3:.1f} | {seconds['all'] * 1e3:.1f} | {seconds['one'] / seconds['all']:.2f}x | "
                  f"{choice.threads} ({choice.reason})", flush=True)
    print(f"# load after: {Path('/proc/loadavg').read_text().split()[0]}; os.cpu_count() {os.cpu_count()}")


if __name__ == "__main__":
    main()
