"""Atomic file writes: a temporary file in the destination folder, fsync, then one rename or link.

A reader never sees a half-written file, and an existing file is only replaced when the caller says so:
without `overwrite`, the finished file is hard-linked into place, which fails if the name exists even
when another process created it a moment ago (file systems without hard links fall back to a check
followed by a rename).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from tiengine.errors import TiengineError


# How every refusal to replace a file ends: command-line users read the flag, Python users the argument.
OVERWRITE_HINT = "pass --overwrite (overwrite=True in Python) to replace it"


class FileExistsRefusal(TiengineError):
    """The destination exists and overwriting was not asked for."""


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call `write(temporary_path)`, then move the finished file onto `path` in one step."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsRefusal(f"{path}: already exists ({OVERWRITE_HINT})")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary_path = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    # Created like any new file (mode 0o666 less the umask), unlike mkstemp's owner-only 0o600.
    os.close(os.open(temporary_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(temporary_path)
        with open(temporary_path, "rb+") as written:
            os.fsync(written.fileno())
        if overwrite:
            os.replace(temporary_path, path)
        else:
            _publish_without_replacing(temporary_path, path)
    except FileExistsError:
        raise FileExistsRefusal(f"{path}: already exists ({OVERWRITE_HINT})") from None
    finally:
        temporary_path.unlink(missing_ok=True)
    return path


def _publish_without_replacing(temporary_path: Path, path: Path) -> None:
    """Give the finished temporary file its final name unless that name exists (FileExistsError)."""
    try:
        os.link(temporary_path, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here: check, then rename
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(temporary_path, path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False) -> Path:
    """Write `data` to `path` atomically."""
    return atomic_write(path, lambda temporary: temporary.write_bytes(data), overwrite=overwrite)


def make_readable(path: Path) -> Path:
    """rw-r--r--: atomic writes create owner-only files; package data must be readable by everyone."""
    os.chmod(path, 0o644)
    return path
