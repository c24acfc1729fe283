"""Reading a user's UTF-8 text file with errors that name the file and what was expected of it."""

from __future__ import annotations

from pathlib import Path


def read_utf8_text(path: Path, expected: str, error: type[Exception]) -> str:
    """The text of `path`; `error` (the caller's error type) for a missing file, a folder, bytes that are
    not UTF-8 or a failed read. `expected` describes the file, e.g. "a text file with one prompt per line"."""
    try:
        return path.read_text(encoding="utf-8")  # universal newlines: "\r\n" and "\r" read as "\n"
    except FileNotFoundError:
        raise error(f"{path}: no such file (expected {expected})") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder (expected {expected})") from None
    except UnicodeDecodeError as decode_error:
        raise error(f"{path}: not UTF-8 text ({decode_error.reason} at byte {decode_error.start})") from None
    except OSError as os_error:
        raise error(f"{path}: cannot be read ({os_error.strerror or os_error})") from None
