"""Atomic file writes: a temporary file in the destination folder, fsync, then one rename or link.

A reader never sees a half-written file, and an existing file is only replaced when the caller says so:
without `overwrite`, the finished file is hard-linked into place, which fails if the name exists even
when another process created it a moment ago (file systems without hard links fall back to a check
followed by a rename).

Every operating-system failure of a write (creating the folder, the temporary file, writing it,
renaming it) becomes a `WriteError` naming the path and the reason in words ("permission denied",
"is a directory", "parent ... is a file", "no space left on device"), never a bare OSError.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from tiengine.errors import TiengineError

# How every refusal to replace a file ends: command-line users read the flag, Python users the argument.
OVERWRITE_HINT = "pass --overwrite (overwrite=True in Python) to replace it"

# errno -> the reason a write failed, in the words the messages use.
_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "is a directory",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.ENAMETOOLONG: "file name too long",
}
if hasattr(errno, "EDQUOT"):
    _REASONS[errno.EDQUOT] = "disk quota exceeded"


class FileExistsRefusal(TiengineError):
    """The destination exists and overwriting was not asked for."""


class WriteError(TiengineError):
    """A file or folder could not be written: the message names the path and the reason."""


def write_error(path: str | os.PathLike[str], error: OSError) -> WriteError:
    """The WriteError for `error`, raised while writing `path` (a file, or a folder to create)."""
    return WriteError(f"{path}: cannot write ({describe_os_error(path, error)})")


def describe_os_error(path: str | os.PathLike[str], error: OSError) -> str:
    """The reason of an OSError in words: "permission denied", "parent X is a file", ..."""
    blocker = _file_in_the_way(Path(path).parent)
    if blocker is not None:
        return f"parent {blocker} is a file"
    if error.errno == errno.ENOTDIR:
        return "parent is a file"
    reason = _REASONS.get(error.errno) if error.errno is not None else None
    return reason or error.strerror or str(error) or type(error).__name__


def os_error_line(error: OSError) -> str:
    """One line for an OSError no stage named: the file(s) it names and the reason in words (the CLIs' last resort)."""
    if error.filename is None:
        return error.strerror or str(error) or type(error).__name__
    names = str(error.filename) + (f" -> {error.filename2}" if error.filename2 is not None else "")
    return f"{names}: {describe_os_error(error.filename, error)}"


def check_file_path(path: str | os.PathLike[str]) -> None:
    """WriteError when `path` is a directory or a file stands where one of its folders should be (a check
    before long work, so a command fails at once instead of after computing what it would write)."""
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"{path}: cannot write (is a directory)")
    blocker = _file_in_the_way(path.parent)
    if blocker is not None:
        raise WriteError(f"{path}: cannot write (parent {blocker} is a file)")


def check_folder_path(folder: str | os.PathLike[str]) -> None:
    """WriteError when a file stands where `folder` or one of its parents should be (a check before long work)."""
    folder = Path(folder)
    blocker = _file_in_the_way(folder)
    if blocker is not None:
        reason = f"parent {blocker} is a file" if blocker != folder else "it is a file, not a folder"
        raise WriteError(f"{folder}: cannot create the folder ({reason})")


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest of `path`'s parents (or `path` itself) that exists and is not a folder, if any."""
    for candidate in [*reversed(path.parents), path]:
        try:
            if candidate.exists() and not candidate.is_dir():
                return candidate
        except OSError:
            return None
    return None


def ensure_folder(folder: str | os.PathLike[str]) -> Path:
    """Create `folder` and its parents if missing; a WriteError says why it cannot be."""
    folder = Path(folder)
    check_folder_path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WriteError(f"{folder}: cannot create the folder ({describe_os_error(folder, error)})") from None
    return folder


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call `write(temporary_path)`, then move the finished file onto `path` in one step."""
    path = Path(path)
    check_file_path(path)
    if path.exists() and not overwrite:
        raise FileExistsRefusal(f"{path}: already exists ({OVERWRITE_HINT})")
    ensure_folder(path.parent)
    temporary_path = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        # Created like any new file (mode 0o666 less the umask), unlike mkstemp's owner-only 0o600.
        os.close(os.open(temporary_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as error:
        raise write_error(path, error) from None
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
    except OSError as error:
        raise write_error(path, error) from None
    finally:
        try:
            temporary_path.unlink(missing_ok=True)
        except OSError:
            pass  # the write's own error (or success) is what the caller needs to hear about
    return path


def _publish_without_replacing(temporary_path: Path, path: Path) -> None:
    """Give the finished temporary file its final name unless that name exists (FileExistsError)."""
    try:
        os.link(temporary_path, path)
    except FileExistsError:
        raise
    except OSError as error:  # no hard links here: check, then rename
        if error.errno in (errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EISDIR):
            raise
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
