"""Reading the files of a user's folder without trusting it: a bounded walk and one-line skip reasons.

Shared by the embeddings library (tiengine.embeddings.library) and the extra-network libraries
(tiengine.networks.library). `bounded_walk` follows AUTOMATIC1111's folder scans (every file below the
folder, sub-folders included, hidden folders skipped) within bounds: symbolic links are not followed out
of the folder (a link pointing outside is yielded with LINK_OUTSIDE; its target is never quoted), folders
deeper than `max_depth` and files beyond `max_files` are not read, and each cut is yielded with its
reason. `describe_read_error` turns any error raised while reading one file into the reason that file is
skipped, so one bad file never spoils the folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from tiengine.errors import TiengineError

# Bounds on a folder scan: real embeddings / LoRA folders are a few levels deep and hold hundreds of files.
MAX_SCAN_DEPTH = 16
MAX_SCAN_FILES = 10_000
LINK_OUTSIDE = "link points outside the folder"


def bounded_walk(
    root: Path, *, max_depth: int = MAX_SCAN_DEPTH, max_files: int = MAX_SCAN_FILES, follow_links: bool = False
) -> Iterator[tuple[Path, str, str | None]]:
    """(path, relative path, reason it is not read or None) for every file below `root`, sorted.

    Hidden folders are skipped; links are followed only inside the folder (anywhere with
    `follow_links`), each real folder once; depth and file count are bounded: a folder deeper than
    `max_depth` and every file after the first `max_files` are yielded with their reason, not read.
    """
    root_real = os.path.realpath(root)
    visited: set[str] = set()
    files_seen = 0
    pending: list[tuple[Path, int]] = [(root, 0)]
    while pending:
        folder, depth = pending.pop()
        relative_folder = folder.relative_to(root).as_posix()
        real = os.path.realpath(folder)
        if real in visited:
            continue
        visited.add(real)
        try:
            with os.scandir(folder) as scan:
                items = sorted(scan, key=lambda item: item.name)
        except OSError as error:
            yield folder, relative_folder + "/", f"folder could not be read ({error.strerror or error})"
            continue
        subfolders: list[Path] = []
        for item in items:
            path = folder / item.name
            relative = path.relative_to(root).as_posix()
            try:
                is_link = item.is_symlink()
                is_dir = item.is_dir()  # follows links
            except OSError:
                is_link, is_dir = True, False
            if is_link and not follow_links:
                target = os.path.realpath(path)
                if target != root_real and not target.startswith(root_real + os.sep):
                    yield path, relative, LINK_OUTSIDE
                    continue
            if is_dir:
                if item.name.startswith("."):
                    continue
                if depth + 1 > max_depth:
                    yield path, relative + "/", (f"folder not scanned: deeper than {max_depth} "
                                                 "levels (max_depth)")
                    continue
                subfolders.append(path)
                continue
            if is_link and not os.path.exists(path):
                yield path, relative, "broken link"
                continue
            files_seen += 1
            if files_seen > max_files:
                yield path, relative, (f"not read: the scan stops after {max_files} files "
                                       "(max_files); later files in this folder and others were not read")
                return
            yield path, relative, None
        pending.extend((subfolder, depth + 1) for subfolder in reversed(subfolders))


def describe_read_error(error: Exception, label: str) -> str:
    """A skip reason for any error: tiengine's own message as is, anything else with its type."""
    if isinstance(error, TiengineError):
        return strip_label(str(error), label)
    if isinstance(error, RecursionError):
        return "could not be read (structure nested too deeply)"
    if isinstance(error, MemoryError):
        return "could not be read (out of memory)"
    if isinstance(error, OSError):
        return f"could not be read ({error.strerror or type(error).__name__})"
    message = strip_label(str(error), label).replace(label, "<file>")
    if len(message) > 200:
        message = message[:197] + "..."
    return f"could not be read ({type(error).__name__}: {message})" if message else \
        f"could not be read ({type(error).__name__})"


def strip_label(message: str, label: str) -> str:
    """An error message without its leading "<file>: " (the listing names the file)."""
    return message[len(label) + 2 :] if message.startswith(label + ": ") else message
