"""Streaming safetensors writer: the header is computed from shapes first, then tensors are written one
at a time, so writing a multi-GB component needs one tensor's worth of memory.

Format (https://github.com/huggingface/safetensors, "Format"): 8-byte little-endian header length, the
JSON header (padded with spaces to a multiple of 8 bytes, as the reference writer does, so every
tensor's data stays 8-byte aligned), then each tensor's bytes in little-endian order at its
`data_offsets`. The data is laid out in the order the tensors are produced; the header's JSON object is
sorted by name. The file is written to a temporary file beside the destination and moved into place
(tiengine.io.atomic).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from tiengine.errors import CheckpointError
from tiengine.io.atomic import atomic_write

from .readers import TORCH_TO_SAFETENSORS, TensorInfo

HEADER_ALIGNMENT = 8


def safetensors_header(entries: Iterable[tuple[str, TensorInfo]], metadata: Mapping[str, str]) -> bytes:
    """The length-prefixed, padded header for tensors laid out in `entries` order."""
    header: dict[str, object] = {}
    offset = 0
    for name, info in entries:
        if info.dtype not in TORCH_TO_SAFETENSORS:
            raise CheckpointError(f"tensor {name!r}: dtype {info.dtype} cannot be stored in safetensors")
        header[name] = {
            "dtype": TORCH_TO_SAFETENSORS[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    ordered = {"__metadata__": dict(metadata)} if metadata else {}
    ordered.update(sorted(header.items()))
    raw = json.dumps(ordered, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % HEADER_ALIGNMENT)
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(
    path: str | os.PathLike[str],
    entries: list[tuple[str, TensorInfo]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `tensors` (yielded in `entries` order, each matching its entry) to `path` atomically."""
    header = safetensors_header(entries, metadata or {})

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as file:
            file.write(header)
            produced = iter(tensors)
            for name, info in entries:
                got = next(produced, None)
                if got is None:
                    raise CheckpointError(f"{path}: tensor {name!r} was never produced")
                got_name, tensor = got
                if got_name != name or tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
                    raise CheckpointError(
                        f"{path}: expected tensor {name!r} {info.dtype} {list(info.shape)}, got {got_name!r} "
                        f"{tensor.dtype} {list(tensor.shape)}"
                    )
                flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
                if flat.numel():
                    file.write(memoryview(flat.view(torch.uint8).numpy()))
            if next(produced, None) is not None:
                raise CheckpointError(f"{path}: more tensors produced than the header lists")

    return atomic_write(path, write, overwrite=overwrite)
