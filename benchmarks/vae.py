"""VAE decode time: tiengine's AutoencoderKL vs diffusers' AutoencoderKL, same weights.

Full-size SD VAE (random weights shared by both models), batch 1, latents 16x16 and 32x32 (128 and 256
pixel images) so CPU runs stay short; fp32 and bf16. Timing, columns and JSON as benchmarks/unet.py:
interleaved runs, medians, speedup = diffusers / tiengine, FLOP rate as a fraction of the measured matmul
ceiling, and the max output difference relative to max |diffusers output|.

    python benchmarks/vae.py [--latents 16 32] [--dtypes fp32 bf16] [--repeats 7] [--threads 2]
                             [--clock wall|cpu] [--nchw] [--weights-layout nchw|channels_last] [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet import (  # noqa: E402  (benchmarks/unet.py: shared timing and table helpers)
    CLOCKS,
    DTYPES,
    dtype_passes,
    measure_row,
    print_table,
    randomize_,
    versions_header,
)

from tiengine.io.atomic import atomic_write_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", type=int, nargs="+", default=[16, 32], help="latent sides (image side / 8)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (use --threads 1)")
    parser.add_argument("--nchw", action="store_true", help="run tiengine with channels_last=False")
    parser.add_argument("--weights-layout", choices=("nchw", "channels_last"), default="nchw",
                        help="tiengine's convolution weights' strides (diffusers keeps NCHW)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per model and row")
    parser.add_argument("--json", type=Path, help="also write header and rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import diffusers

    from tiengine.models.vae import AutoencoderKL, VaeConfig

    config = VaeConfig.sd()
    ours = AutoencoderKL(config, channels_last=not args.nchw).eval().requires_grad_(False)
    randomize_(ours, seed=0)
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(**config.to_diffusers()).eval().requires_grad_(False)
    header = versions_header(args.threads, args.clock)
    header["model"] = (f"SD VAE decoder (random weights shared by both models), tiengine channels_last={not args.nchw}, "
                       f"weights {args.weights_layout}")
    rows = []
    for dtype_name, dtype, ceiling in dtype_passes(ours, reference, args, header):
        for side in args.latents:
            latents = torch.randn(1, config.latent_channels, side, side, generator=torch.Generator().manual_seed(side))
            latents = latents.to(dtype)
            functions = {
                "diffusers": lambda: reference.decode(latents).sample,
                "tiengine": lambda: ours.decode(latents),
            }
            shape = f"latent 1x4x{side}x{side} -> image {8 * side}x{8 * side}"
            rows.append(measure_row(functions, shape=shape, dtype_name=dtype_name, args=args, ceiling=ceiling))
    print_table(header, rows)
    if args.json:
        atomic_write_bytes(args.json, json.dumps({"header": header, "rows": rows}, indent=2).encode(), overwrite=True)


if __name__ == "__main__":
    main()
