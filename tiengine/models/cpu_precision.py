"""Whether this CPU computes a half-precision dtype natively, and the warning given when it does not.

PyTorch runs bfloat16 and float16 matmuls and convolutions on the CPU through oneDNN, which has native
kernels only where the CPU has the instructions for them (bfloat16: AVX-512 BF16 or AMX; float16:
AVX-512 FP16 or AMX-FP16). Elsewhere, on an AVX2 CPU for one, the ops are emulated. Measured by
benchmarks/cpu_precision.py on a 2-core AVX2 AMD EPYC, one thread (benchmarks/RESULTS.md): against fp32,
bf16 takes 5.9x on a CLIP-L linear, 94x on a 1024^3 matmul and 120x on an SD1.5 3x3 convolution; fp16
5.0x, 101x and 137x.
"""

from __future__ import annotations

import torch

from tiengine.errors import TiengineWarning

HALF_DTYPES = (torch.bfloat16, torch.float16)


class EmulatedPrecisionWarning(TiengineWarning):
    """The model is to run in a dtype this CPU has no native kernels for (many times slower than float32)."""


def onednn_bf16_supported() -> bool:
    """Whether oneDNN has bfloat16 kernels on this CPU (without them its bf16 inner product fails to build)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def onednn_fp16_supported() -> bool:
    """Whether oneDNN has float16 kernels on this CPU."""
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def emulated_precision_note(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why running a model in `dtype` on `device` will be slow, or None when it is native (or not the CPU)."""
    if torch.device(device).type != "cpu" or dtype not in HALF_DTYPES:
        return None
    native = onednn_bf16_supported() if dtype == torch.bfloat16 else onednn_fp16_supported()
    if native:
        return None
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    needs = "AVX-512 BF16 or AMX" if dtype == torch.bfloat16 else "AVX-512 FP16 or AMX-FP16"
    return (f"this CPU has no native {name} kernels (they need {needs}): {name} runs emulated, up to about 100 "
            f"times slower than fp32 (convolutions, matmuls); use fp32 (--dtype fp32, dtype=torch.float32)")
