"""What a half-precision dtype costs on this CPU: SD's dense ops in fp32, bf16 and fp16, as ratios to fp32.

PyTorch has native CPU kernels for bf16 only with AVX-512 BF16 or AMX, for fp16 only with AVX-512 FP16 or
AMX-FP16 (tiengine.models.cpu_precision, which makes Engine.load warn where they are missing); elsewhere
the ops are emulated. Each op runs on one thread, CPU time, interleaved medians (benchmarks/unet.py):
- linear: CLIP-L's MLP up-projection on one 77-token chunk, (77, 768) x (768, 3072)
- conv: an SD1.5 UNet 3x3 convolution at the first level for a 256x256 image, (1, 320, 32, 32)
- matmul: a 1024^3 torch.mm
- attention: SD1.5's first-level self-attention at 256x256, SDPA (1, 8, 1024, 40)

    python benchmarks/cpu_precision.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet import cpu_name, interleaved_medians  # benchmarks/unet.py

from tiengine.models.cpu_precision import emulated_precision_note, onednn_bf16_supported, onednn_fp16_supported

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def operations(dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """Each op of the module docstring on random inputs in `dtype`."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    tokens, up = rand(77, 768), rand(3072, 768)
    image, kernel = rand(1, 320, 32, 32), rand(320, 320, 3, 3)
    left, right = rand(1024, 1024), rand(1024, 1024)
    q, k, v = rand(1, 8, 1024, 40), rand(1, 8, 1024, 40), rand(1, 8, 1024, 40)
    return {
        "linear": lambda: F.linear(tokens, up),
        "conv": lambda: F.conv2d(image, kernel, padding=1),
        "matmul": lambda: torch.mm(left, right),
        "attention": lambda: F.scaled_dot_product_attention(q, k, v),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# device: cpu: {cpu_name()}; torch {torch.__version__}; 1 thread, CPU time, median of {args.repeats}")
    print(f"# oneDNN bf16 kernels: {onednn_bf16_supported()}; fp16 kernels: {onednn_fp16_supported()}")
    for name in ("bf16", "fp16"):
        note = emulated_precision_note("cpu", DTYPES[name])
        print(f"# Engine.load(dtype={name}) on this CPU: {'warns' if note else 'no warning'}")
    timed = {}
    with torch.no_grad():
        for dtype_name, dtype in DTYPES.items():
            for op_name, function in operations(dtype).items():
                timed[(op_name, dtype_name)] = function
        medians = interleaved_medians({f"{op}/{dt}": f for (op, dt), f in timed.items()},
                                      repeats=args.repeats, warmup=1, clock="cpu")
    print("| op | fp32 ms | bf16 ms | fp16 ms | bf16 / fp32 | fp16 / fp32 |")
    print("|---|---|---|---|---|---|")
    for op_name in operations(torch.float32):
        ms = {dt: 1000 * medians[f"{op_name}/{dt}"] for dt in DTYPES}
        print(f"| {op_name} | {ms['fp32']:.1f} | {ms['bf16']:.1f} | {ms['fp16']:.1f} | "
              f"{ms['bf16'] / ms['fp32']:.1f}x | {ms['fp16'] / ms['fp32']:.1f}x |")


if __name__ == "__main__":
    main()
