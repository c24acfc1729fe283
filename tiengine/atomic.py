"""Atomic file writes: a temporary file in the destination folder, fsync, then os.replace.

A reader never sees a half-written file, and an existing file is only replaced when the caller says so.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from tiengine.errors import TiengineError


class FileExistsRefusal(TiengineError):
    """The destination exists and overwriting was not asked for."""


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call `write(temporary_path)`, then move the finished file onto `path` in one step."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsRefusal(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        write(temporary_path)
        with open(temporary_path, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False) -> Path:
    """Write `data` to `path` atomically."""
    return atomic_write(path, lambda temporary: temporary.write_bytes(data), overwrite=overwrite)
