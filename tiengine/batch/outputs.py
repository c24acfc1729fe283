"""Where a bulk run's outputs go, how they are named, written and verified.

- encode: safetensors shards `encode-NNNNN.safetensors`. Shard N holds the rows at positions
  [N * shard_rows, (N + 1) * shard_rows) of the JOBS file (failed rows left out), so which shard a row
  lands in depends on the file alone, never on timing or worker count. Tensor names are `<id>/<name>` with
  `<name>` those of `tiengine encode` (`positive.<part>.<entry>.context`, ...); the metadata key
  `tiengine.batch` holds JSON {id: that row's `tiengine encode` report}.
- generate: `images/<safe id>.png` with the infotext (`parameters` chunk) inside.
- train: `embeddings/<safe id>.safetensors`, the file `tiengine train-embedding` writes with its header's
  keys sorted (`canonical_safetensors`), so the bytes do not change between runs.

`<safe id>` (`safe_stem`) keeps letters, digits, "-", "_" and "." of the id (at most 64 characters, no leading
dot) and adds 8 hex digits of sha256(id), so two ids never share a file and no id is a path. Every file is
written to a temporary name, fsynced and renamed (tiengine.io.atomic); `file_sha256` is the hash the
manifest records and a re-run checks.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import load, save

from tiengine.io.atomic import atomic_write_bytes

SHARD_METADATA_KEY = "tiengine.batch"
IMAGES_FOLDER = "images"
EMBEDDINGS_FOLDER = "embeddings"
MAX_STEM_CHARS = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(row_id: str) -> str:
    """A file stem for a row id: its safe characters and a hash of the whole id (ids are user text)."""
    kept = _UNSAFE.sub("_", row_id)[:MAX_STEM_CHARS].lstrip(".") or "row"
    return f"{kept}-{hashlib.sha256(row_id.encode('utf-8')).hexdigest()[:8]}"


def shard_name(index: int) -> str:
    return f"encode-{index:05d}.safetensors"


def row_output_name(kind: str, row_id: str) -> str:
    """The output of a generate or train row, relative to the output folder."""
    if kind == "generate":
        return f"{IMAGES_FOLDER}/{safe_stem(row_id)}.png"
    return f"{EMBEDDINGS_FOLDER}/{safe_stem(row_id)}.safetensors"


def shard_bytes(rows: Mapping[str, tuple[bytes, dict]]) -> bytes:
    """One shard from {id: (the row's `tiengine encode` safetensors bytes, its report)}, ids in the given order."""
    tensors = {}
    for row_id, (payload, _) in rows.items():
        for name, tensor in load(payload).items():
            tensors[f"{row_id}/{name}"] = tensor
    reports = {row_id: report for row_id, (_, report) in rows.items()}
    return save(tensors, metadata={SHARD_METADATA_KEY: json.dumps(reports, ensure_ascii=False)})


def canonical_safetensors(payload: bytes) -> bytes:
    """The same safetensors file with its header's keys sorted: safetensors writes the metadata keys in a
    hash-map order that changes between processes, so an embedding file with several metadata keys would
    differ run to run. The data section is unchanged (its offsets are relative to it); the header is padded
    with spaces to a multiple of 8 bytes, as safetensors pads it."""
    length = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + length])
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(dict(sorted(header.items())), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + payload[8 + length :]


def write_output(path: Path, payload: bytes) -> str:
    """Write `payload` atomically at `path` (replacing what a crashed run left) and return its sha256."""
    atomic_write_bytes(path, payload, overwrite=True)
    return hashlib.sha256(payload).hexdigest()


def file_sha256(path: Path) -> str | None:
    """sha256 of a file's bytes; None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()
