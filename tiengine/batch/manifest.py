"""The manifest of a bulk run: one record per JOBS row, kept as an append-only journal while the run goes.

`manifest.jsonl` in the output folder. During a run, records are appended (one JSON object per line) only
after the output they name is final (renamed into place), and each append is fsynced, so after a kill -9 at
any moment every complete line names a complete file. A line cut short by the kill is dropped when the
journal is next opened. A later record for an id replaces an earlier one. When the run ends, the journal
is rewritten (atomically) as exactly one record per JOBS row, in file order; with `--format parquet` the same
records are also written to `manifest.parquet` (the journal stays: it is what a re-run reads).

Record fields (MANIFEST_FIELDS): id (None for a row whose id could not be read), line, status ("done" or
"failed"), output (path relative to the output folder), sha256 (of that file), tensors (encode: the row's
tensor names in its shard), job_sha256 (of the row's fields and the engine it ran on: a re-run
recomputes a row whose fields, model, folders, device or dtype changed), report (encode: `tiengine encode`'s report; generate: seed, infotext, embeddings
and networks applied or skipped; train: steps, final loss, seed, warnings), error (the message of a failed
row), seconds (the row's compute time: the one field that differs between runs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tiengine.io.atomic import atomic_write_bytes, describe_os_error
from tiengine.io.metadata import valid_text

MANIFEST_NAME = "manifest.jsonl"
PARQUET_NAME = "manifest.parquet"
MANIFEST_FORMATS = ("jsonl", "parquet")
MANIFEST_FIELDS = ("id", "line", "status", "output", "sha256", "tensors", "job_sha256", "report", "error", "seconds")
TIMING_FIELDS = ("seconds",)


class ManifestJournal:
    """The append side of `manifest.jsonl`: `append(records)` writes and fsyncs them."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / MANIFEST_NAME
        _drop_torn_tail(self.path)

    def append(self, records: Iterable[dict]) -> None:
        text = "".join(record_line(record) for record in records)
        if not text:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as journal:
                journal.write(text)
                journal.flush()
                os.fsync(journal.fileno())
        except OSError as error:
            raise OSError(error.errno, describe_os_error(self.path, error), str(self.path)) from None


def record_line(record: dict) -> str:
    return valid_text(json.dumps({name: record.get(name) for name in MANIFEST_FIELDS}, ensure_ascii=False)) + "\n"


def read_journal(folder: Path) -> dict[str, dict]:
    """The latest "done" record per id in `folder`'s journal (none without a journal); torn lines skipped.
    Failed records are left out: a failed row is always run again, and a refused duplicate of an id must not
    hide the first row's output."""
    path = folder / MANIFEST_NAME
    latest: dict[str, dict] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return latest
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("id"), str) and record.get("status") == "done":
            latest[record["id"]] = record
    return latest


def write_final(folder: Path, records: list[dict], manifest_format: str) -> Path:
    """Rewrite the journal as exactly `records` (atomically); Parquet too when asked. Returns the manifest."""
    atomic_write_bytes(folder / MANIFEST_NAME, "".join(record_line(r) for r in records).encode("utf-8"),
                       overwrite=True)
    if manifest_format != "parquet":
        return folder / MANIFEST_NAME
    import pyarrow
    import pyarrow.parquet

    # report as JSON text: its shape differs per kind and per row
    columns = {name: [record.get(name) for record in records] for name in MANIFEST_FIELDS}
    columns["report"] = [None if report is None else json.dumps(report, ensure_ascii=False)
                         for report in columns["report"]]
    table = pyarrow.table({name: pyarrow.array(values, type=_PARQUET_TYPES[name](pyarrow))
                           for name, values in columns.items()})
    sink = pyarrow.BufferOutputStream()
    pyarrow.parquet.write_table(table, sink)
    atomic_write_bytes(folder / PARQUET_NAME, sink.getvalue().to_pybytes(), overwrite=True)
    return folder / PARQUET_NAME


_PARQUET_TYPES = {
    "id": lambda pa: pa.string(), "line": lambda pa: pa.int64(), "status": lambda pa: pa.string(),
    "output": lambda pa: pa.string(), "sha256": lambda pa: pa.string(), "tensors": lambda pa: pa.list_(pa.string()),
    "job_sha256": lambda pa: pa.string(),
    "report": lambda pa: pa.string(), "error": lambda pa: pa.string(), "seconds": lambda pa: pa.float64(),
}


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a killed run left without its newline, so the next append starts a fresh line."""
    try:
        with open(path, "rb+") as journal:
            data = journal.read()
            if data and not data.endswith(b"\n"):
                journal.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        return
