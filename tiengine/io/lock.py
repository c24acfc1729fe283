"""A lock file that keeps two processes out of one folder (two training runs on the same work folder).

The lock is a small JSON file `{"pid", "host", "started"}` created with O_CREAT | O_EXCL, so exactly one
process creates it. A second process reads it and refuses, naming the owner. A lock whose owner is gone
(same host, no process with that pid) is stale: it is moved aside under a private name, checked to be
the same stale lock (not a fresh one another process created meanwhile) and deleted, and the lock is
taken with a warning. A lock from another host, or one that cannot be read, is never taken over: the
message says which file to delete once no run uses the folder.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiengine.errors import TiengineError
from tiengine.io.atomic import ensure_folder, write_error

MAX_LOCK_BYTES = 4096  # a lock file is a few dozen bytes; never read more than this


class LockHeldError(TiengineError):
    """Another process (or an unreadable lock file) holds the lock of a folder."""


@dataclass
class FileLock:
    """A held lock: `release()` deletes the lock file (if it is still ours) and the folders it created."""

    path: Path
    record: bytes
    created_folders: list[Path] = field(default_factory=list)  # deepest first
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        try:
            if _read_bytes(self.path) == self.record:
                self.path.unlink()
        except OSError:
            pass  # a lock left behind names a finished pid and is taken over as stale
        for folder in self.created_folders:  # only the ones still empty: nothing was written in them
            try:
                folder.rmdir()
            except OSError:
                break


def acquire_lock(path: str | os.PathLike[str]) -> tuple[FileLock, str | None]:
    """Create lock file `path` (its folder too) for this process; (lock, warning about a stale lock or None).

    LockHeldError when a live process holds it, or when it cannot be read or belongs to another host."""
    path = Path(path)
    created = [folder for folder in [path.parent, *path.parent.parents] if not folder.exists()]
    ensure_folder(path.parent)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}).encode("utf-8")
    warning = None
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            stale = _read_bytes(path)
            owner = _parse(stale)
            if owner is None:
                raise LockHeldError(f"{path}: locked by an unknown process (the lock file is unreadable); if no run "
                                    f"is using {path.parent}, delete {path}") from None
            if not _is_stale(owner):
                where = "" if owner["host"] == socket.gethostname() else f" on host {owner['host']!r}"
                raise LockHeldError(f"{path.parent} is in use by process {owner['pid']}{where} (started "
                                    f"{owner.get('started', '?')}); wait for it to finish, or if that run is gone, "
                                    f"delete {path}") from None
            if _take_over(path, stale):
                warning = (f"took over the stale lock {path} of process {owner['pid']} (started "
                           f"{owner.get('started', '?')}), which is no longer running")
            continue
        except OSError as error:
            raise write_error(path, error) from None
        try:
            os.write(descriptor, record)
        finally:
            os.close(descriptor)
        return FileLock(path, record, created), warning
    raise LockHeldError(f"{path}: another process keeps taking this lock; try again")


def _read_bytes(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read(MAX_LOCK_BYTES)
    except OSError:
        return None


def _parse(data: bytes | None) -> dict[str, Any] | None:
    """The lock's owner record, or None when it is not one."""
    try:
        owner = json.loads(data.decode("utf-8")) if data else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if (not isinstance(owner, dict) or not isinstance(owner.get("pid"), int) or isinstance(owner["pid"], bool)
            or not isinstance(owner.get("host"), str)):
        return None
    return owner


def _is_stale(owner: dict[str, Any]) -> bool:
    """True when the owner ran on this host and no process with its pid exists any more."""
    if owner["host"] != socket.gethostname() or os.name == "nt":  # os.kill(pid, 0) would kill on Windows
        return False
    pid = owner["pid"]
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def _take_over(path: Path, stale: bytes | None) -> bool:
    """Remove the stale lock `path` if it still holds `stale`; False when a live lock was found instead."""
    private = path.with_name(f"{path.name}.{secrets.token_hex(8)}.stale")
    try:
        os.rename(path, private)
    except FileNotFoundError:
        return True  # someone else removed it: try to create it again
    except OSError as error:
        raise write_error(path, error) from None
    if _read_bytes(private) == stale:
        private.unlink(missing_ok=True)
        return True
    try:  # a fresh lock replaced the stale one meanwhile: put it back
        os.link(private, path)
    except OSError:
        pass
    private.unlink(missing_ok=True)
    return False
