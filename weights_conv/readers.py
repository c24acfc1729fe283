"""Lazy tensor readers: one tensor in memory at a time, every header checked before any data is read.

A `TensorSource` lists the tensors of one file (names, dtypes, shapes) without reading their data and
reads one tensor on request. Implementations:

- `SafetensorsFile`: the safetensors format (https://github.com/huggingface/safetensors, "Format"):
  8-byte little-endian header length N, N bytes of JSON `{name: {"dtype", "shape", "data_offsets"},
  "__metadata__": {str: str}}`, then the data buffer. The header is validated as safetensors' own
  `safe_open` does (offsets inside the buffer, contiguous, no holes or overlaps, byte counts equal to
  dtype size x shape, JSON nesting at most MAX_NESTING_DEPTH) but with errors naming the file and the tensor. Data is read with positioned reads
  into a fresh tensor rather than through a memory map, so the pages of a multi-GB file never pile up in
  the process's resident set: converting needs one tensor's worth of memory, not the file's.
- `PickleCheckpoint`: `.ckpt` / `.pt` / `.bin` through `tiengine.io.safe_pickle` (tensors, storages and
  plain containers only; nothing in the file is executed; safe_pickle's default limits: nesting depth,
  pickle size, inflated storages, every tensor view inside its storage). The Lightning layout `{"state_dict": {...},
  "global_step": ..., "optimizer_states": [...], ...}` and flat state dicts are both accepted; the
  top-level entries other than the state dict are reported (`extras`) and never converted.
- `MergedSource`: several files seen as one (sharded safetensors with an index, or a folder's shards).

`open_tensor_file` picks the reader from the file's first bytes, not its extension.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

from tiengine.errors import CheckpointError
from tiengine.io.limits import MAX_NESTING_DEPTH, json_nesting_depth
from tiengine.io.safe_pickle import TensorRef, TorchArchive

# safetensors dtype names (format spec) -> torch dtypes; sizes in bytes come from torch.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers (a lying length would allocate GBs)


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor, known before its data is read."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class TensorSource(Protocol):
    """A file (or set of files) of named tensors, listed without reading data, read one at a time."""

    path: Path

    def keys(self) -> list[str]: ...

    def info(self, key: str) -> TensorInfo: ...

    def read(self, key: str) -> torch.Tensor: ...

    @property
    def metadata(self) -> dict[str, str]: ...

    @property
    def extras(self) -> dict[str, str]: ...

    def close(self) -> None: ...


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> "float16" (the names used in config.json and `inspect`)."""
    return str(dtype).removeprefix("torch.")


class SafetensorsFile:
    """A validated safetensors file read with positioned reads (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._file: BinaryIO | None = open(self.path, "rb")  # noqa: SIM115 (closed by close())
        try:
            self._infos, self._offsets, self._metadata, self._data_start = _parse_safetensors_header(
                self._file, self.path
            )
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    @property
    def extras(self) -> dict[str, str]:
        return {}

    def read(self, key: str) -> torch.Tensor:
        info = self.info(key)
        if self._file is None:
            raise CheckpointError(f"{self.path}: read {key!r} after the file was closed")
        begin, end = self._offsets[key]
        raw = torch.empty(end - begin, dtype=torch.uint8)  # (nbytes,)
        self._file.seek(self._data_start + begin)
        got = self._file.readinto(raw.numpy()) if raw.numel() else 0
        if got != raw.numel():
            raise CheckpointError(
                f"{self.path}: tensor {key!r} should have {raw.numel()} bytes at offset "
                f"{self._data_start + begin}, the file gave {got} (truncated or changed while reading)"
            )
        return raw.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _parse_safetensors_header(
    file: BinaryIO, path: Path
) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]], dict[str, str], int]:
    """Validate the header: every tensor's bytes inside the file, contiguous, sized as dtype x shape."""
    file_size = os.fstat(file.fileno()).st_size
    prefix = file.read(8)
    if len(prefix) < 8:
        raise CheckpointError(
            f"{path}: truncated safetensors file: {file_size} bytes, expected at least the 8-byte header length"
        )
    header_len = int.from_bytes(prefix, "little")
    if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise CheckpointError(
            f"{path}: safetensors header length says {header_len} bytes but the file has only "
            f"{file_size - 8} after the length (truncated, or not a safetensors file)"
        )
    raw = file.read(header_len)
    if json_nesting_depth(raw, MAX_NESTING_DEPTH) > MAX_NESTING_DEPTH:
        raise CheckpointError(f"{path}: safetensors header nests deeper than {MAX_NESTING_DEPTH} levels "
                              "(a real header nests 3); refused before decoding it")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, expected an object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings, found {metadata!r:.200}")

    data_start = 8 + header_len
    data_size = file_size - data_start
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for key, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError(
                f"{path}: header entry {key!r} must hold dtype, shape and data_offsets, found {entry!r:.200}"
            )
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {key!r} has dtype {entry['dtype']!r}, expected one of {sorted(SAFETENSORS_DTYPES)}"
            )
        shape, span = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {shape!r}, expected a list of sizes >= 0")
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(o, int) and o >= 0 for o in span)):
            raise CheckpointError(f"{path}: tensor {key!r} has data_offsets {span!r}, expected [begin, end]")
        info = TensorInfo(dtype, tuple(shape))
        begin, end = span
        if end - begin != info.nbytes:
            raise CheckpointError(
                f"{path}: header lies about tensor {key!r}: {entry['dtype']} {list(shape)} needs "
                f"{info.nbytes} bytes but its data_offsets [{begin}, {end}] span {end - begin}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {key!r} ends at byte {end} of the data but the file holds only "
                f"{data_size} data bytes (truncated file)"
            )
        infos[key] = info
        offsets[key] = (begin, end)

    expected_begin = 0
    for key, (begin, end) in sorted(offsets.items(), key=lambda item: item[1]):
        if begin != expected_begin:
            what = "overlaps the previous tensor" if begin < expected_begin else "leaves a hole before it"
            raise CheckpointError(
                f"{path}: header lies about tensor {key!r}: it starts at data byte {begin}, expected "
                f"{expected_begin} ({what})"
            )
        expected_begin = end
    if expected_begin != data_size:
        raise CheckpointError(
            f"{path}: the header's tensors cover {expected_begin} data bytes but the file holds {data_size}"
        )
    return infos, offsets, metadata, data_start


class MergedSource:
    """Several tensor sources seen as one (shards); a key present in two of them is an error."""

    def __init__(self, path: Path, sources: Iterable[TensorSource]):
        self.path = path
        self._sources = list(sources)
        self._owner: dict[str, TensorSource] = {}
        for source in self._sources:
            for key in source.keys():
                if key in self._owner:
                    raise CheckpointError(
                        f"{path}: tensor {key!r} is in both {self._owner[key].path.name} and {source.path.name}"
                    )
                self._owner[key] = source

    def keys(self) -> list[str]:
        return list(self._owner)

    def info(self, key: str) -> TensorInfo:
        return self._source_of(key).info(key)

    def read(self, key: str) -> torch.Tensor:
        return self._source_of(key).read(key)

    @property
    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for source in self._sources:
            merged.update(source.metadata)
        return merged

    @property
    def extras(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for source in self._sources:
            merged.update(source.extras)
        return merged

    def close(self) -> None:
        for source in self._sources:
            source.close()

    def _source_of(self, key: str) -> TensorSource:
        try:
            return self._owner[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None


def _describe(value: Any) -> str:
    """A short description of a non-state-dict checkpoint entry (for `inspect`); reads no tensor."""
    if isinstance(value, (int, float, bool, str)) or value is None:
        return repr(value)[:80]
    if isinstance(value, Mapping):
        return f"{type(value).__name__} of {len(value)} entries"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)} items"
    qualified = getattr(value, "qualified_name", "")  # safe_pickle's inert stand-ins
    return qualified or type(value).__name__


class PickleCheckpoint:
    """A pickled checkpoint read through `tiengine.io.safe_pickle.TorchArchive` (see the module docstring).

    The state dict is the mapping under "state_dict" when there is one (Lightning checkpoints), else the
    top-level mapping itself. Its tensors stay unread `TensorRef`s until `read`.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._archive = TorchArchive(self.path)
        root = self._archive.root
        if not isinstance(root, Mapping):
            self._archive.close()
            raise CheckpointError(
                f"{self.path}: the pickle holds a {_describe(root)}, expected a dict of tensors "
                "(a state dict, or a checkpoint with a 'state_dict' entry)"
            )
        nested = isinstance(root.get("state_dict"), Mapping)
        state = root["state_dict"] if nested else root
        self._tensors: dict[str, TensorRef] = {}
        self._extras: dict[str, str] = {}
        for key, value in state.items():
            if isinstance(value, TensorRef):
                self._tensors[str(key)] = value
            else:
                self._extras[f"state_dict.{key}" if nested else str(key)] = _describe(value)
        if nested:
            for key, value in root.items():
                if key != "state_dict":
                    self._extras[str(key)] = _describe(value)

    def __enter__(self) -> PickleCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        ref = self._get(key)
        return TensorInfo(ref.dtype, tuple(ref.shape))

    def read(self, key: str) -> torch.Tensor:
        return self._get(key).load(copy=True)

    @property
    def metadata(self) -> dict[str, str]:
        return {}

    @property
    def extras(self) -> dict[str, str]:
        return dict(self._extras)

    def close(self) -> None:
        self._archive.close()

    def _get(self, key: str) -> Any:
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None


ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_OPCODE = 0x80  # first byte of a pickle of protocol >= 2 (torch's legacy format starts with one)


def open_tensor_file(path: str | os.PathLike[str]) -> TensorSource:
    """Open a safetensors or pickled (zip or legacy torch) file, chosen by its first bytes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as file:
        head = file.read(9)
    size = path.stat().st_size
    # safetensors: a plausible little-endian header length, then the JSON object's "{"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return SafetensorsFile(path)
    if head.startswith(ZIP_MAGIC) or (head and head[0] == PICKLE_PROTOCOL_OPCODE):
        return PickleCheckpoint(path)
    if head.startswith(b"version "):
        raise CheckpointError(f"{path}: a Git LFS pointer file, not the weights (fetch them, e.g. `git lfs pull`)")
    if len(head) < 9 or head[8:9] == b"{":
        # Too short to be anything, or a safetensors header whose length is wrong: say so precisely.
        return SafetensorsFile(path)
    raise CheckpointError(
        f"{path}: not a safetensors file (no JSON header) nor a torch pickle (no zip or pickle "
        f"signature); first bytes {head!r}"
    )
