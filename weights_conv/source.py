"""The checkpoint file a model came from, named and hashed as AUTOMATIC1111 names and hashes it.

A1111 writes two facts about the model into every picture's infotext (modules/processing.py,
`create_infotext`): "Model hash", the first 10 hex digits of the sha256 of the whole checkpoint file
(modules/hashes.py, `sha256` / the checkpoint's `shorthash`), and "Model", the file's name without its
extension (modules/sd_models.py, `CheckpointInfo.name_for_extra`). Infotexts written before A1111 v1.0
carry the older 8-digit hash instead: the first 8 hex digits of the sha256 of the 64 KiB at offset
0x100000 (1 MiB) of the file (sd_models.py, `model_hash`; a file shorter than that hashes what is
there, possibly nothing).

A folder written by `weights-conv convert` from a single file records that file's name and hashes in
`source.json` ({"format": SOURCE_FORMAT, "file", "sha256", "old_hash"}), written atomically beside the
weights, so that the converted model still answers with the hash and name of the file the user has.
Converting a converted folder carries the record over; a diffusers folder has no single file to hash,
so its conversion records nothing.

`model_hash(path)`, `model_name(path)` and `old_model_hash(path)` answer for whatever the engine loads:
a single file (computed from it), a converted folder (its record; without one, as before records
existed: the hash of its unet.safetensors and the folder's name), a diffusers folder (unchanged
behaviour: the hash of its UNet weights file, unet/diffusion_pytorch_model.safetensors, and the folder's
name; no old hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tiengine.errors import CheckpointError
from tiengine.io.atomic import atomic_write_bytes
from tiengine.models.config import FORMAT_NAME

from .sources import read_json

SOURCE_FILE = "source.json"
SOURCE_FORMAT = "tiengine.model-source"
MODEL_HASH_LENGTH = 10  # A1111's checkpoint `shorthash`
OLD_HASH_OFFSET = 0x100000  # A1111's pre-v1.0 `model_hash`: 64 KiB read at 1 MiB
OLD_HASH_BYTES = 0x10000
OLD_HASH_LENGTH = 8
BLOCK_BYTES = 1 << 20  # read 1 MiB at a time, as A1111 does
HEX_DIGITS = {"sha256": 64, "old_hash": OLD_HASH_LENGTH}  # source.json's hash keys and their lengths
# Where a folder's weights are hashed when there is no source record (converted, then diffusers layout).
UNET_FILES = (Path("unet.safetensors"), Path("unet") / "diffusion_pytorch_model.safetensors")


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint file as A1111 knows it: `file` (its name), `sha256` (of every byte, 64 hex digits) and
    `old_hash` (the pre-v1.0 8-digit hash)."""

    file: str
    sha256: str
    old_hash: str

    @property
    def name(self) -> str:
        """A1111's "Model": the file name without its extension."""
        return os.path.splitext(self.file)[0]

    @property
    def model_hash(self) -> str:
        """A1111's "Model hash": the first 10 hex digits of the sha256."""
        return self.sha256[:MODEL_HASH_LENGTH]

    def to_json(self) -> str:
        return json.dumps({"format": SOURCE_FORMAT, "file": self.file, "sha256": self.sha256,
                           "old_hash": self.old_hash}, indent=2) + "\n"


def file_source(path: str | os.PathLike[str]) -> ModelSource:
    """Hash a checkpoint file (one full read): its name, sha256 and old 8-digit hash."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(BLOCK_BYTES), b""):
                digest.update(block)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the file to hash it ({error.strerror or error})") from None
    return ModelSource(path.name, digest.hexdigest(), old_file_hash(path))


def old_file_hash(path: str | os.PathLike[str]) -> str:
    """A1111's pre-v1.0 model hash of a file (module docstring)."""
    try:
        with open(path, "rb") as file:
            file.seek(OLD_HASH_OFFSET)
            return hashlib.sha256(file.read(OLD_HASH_BYTES)).hexdigest()[:OLD_HASH_LENGTH]
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the file to hash it ({error.strerror or error})") from None


def read_source(folder: str | os.PathLike[str]) -> ModelSource | None:
    """The source record of a converted folder, or None when it has none; CheckpointError names the file
    and the key of a record that is not one."""
    path = Path(folder) / SOURCE_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    if data.get("format") != SOURCE_FORMAT:
        raise CheckpointError(f"{path}: 'format' is {data.get('format')!r}, expected {SOURCE_FORMAT!r}")
    file = data.get("file")
    if not isinstance(file, str) or not file or Path(file).name != file:
        raise CheckpointError(f"{path}: 'file' must be the source file's name (no folders), found {file!r}")
    for key, length in HEX_DIGITS.items():
        value = data.get(key)
        if not isinstance(value, str) or not re.fullmatch(f"[0-9a-f]{{{length}}}", value):
            raise CheckpointError(f"{path}: '{key}' must be {length} lower-case hex digits, found {value!r}")
    return ModelSource(file, data["sha256"], data["old_hash"])


def write_source(folder: str | os.PathLike[str], source: ModelSource, *, overwrite: bool = False) -> Path:
    """Write `folder`/source.json atomically."""
    return atomic_write_bytes(Path(folder) / SOURCE_FILE, source.to_json().encode("utf-8"), overwrite=overwrite)


def _folder_record(folder: Path) -> ModelSource | None:
    """A converted folder's source record (None for any other folder, or a converted one without)."""
    config = folder / "config.json"
    converted = config.is_file() and read_json(config).get("format") == FORMAT_NAME
    return read_source(folder) if converted else None


def model_source(path: str | os.PathLike[str]) -> ModelSource | None:
    """The file behind a model path: a single file (hashed now, one full read), a converted folder's record,
    or None (a diffusers folder, a converted folder without a record)."""
    path = Path(path)
    if path.is_dir():
        return _folder_record(path)
    return file_source(path)


def model_hash(path: str | os.PathLike[str]) -> str | None:
    """A1111's "Model hash" of what `path` loads (module docstring); None when there is nothing to hash."""
    path = Path(path)
    if path.is_dir():
        source = _folder_record(path)
        if source is not None:
            return source.model_hash
        path = next((path / name for name in UNET_FILES if (path / name).is_file()), None)
        if path is None:
            return None
    if not path.is_file():
        return None
    return file_source(path).model_hash


def model_name(path: str | os.PathLike[str]) -> str:
    """A1111's "Model": a file's name without its extension; a converted folder's source file's, else the
    folder's name."""
    path = Path(path)
    if path.is_dir():
        source = _folder_record(path)
        return source.name if source is not None else path.name
    return os.path.splitext(path.name)[0]


def old_model_hash(path: str | os.PathLike[str]) -> str | None:
    """A1111's pre-v1.0 8-digit hash of what `path` loads: a file's, a converted folder's record; else None."""
    path = Path(path)
    if path.is_dir():
        source = _folder_record(path)
        return None if source is None else source.old_hash
    return old_file_hash(path) if path.is_file() else None
