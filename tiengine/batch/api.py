"""`tiengine.batch.run`: one bulk run (encode, generate or train rows) on the local or the Ray executor.

The driver reads and checks the JOBS rows (tiengine.batch.jobs), takes the output folder's lock
(`.batch.lock`, tiengine.io.lock: one run per folder; a killed run's lock is taken over), reads the journal
and keeps the rows whose outputs are verified (tiengine.batch.writer.plan), runs the rest on an executor
(tiengine.batch.local or tiengine.batch.ray_executor, both calling tiengine.batch.worker's row function),
writes outputs and journal records as results arrive, and finally rewrites the manifest as one record per
row, in JOBS order. The model is loaded only when some row is left to run.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tiengine.batch.jobs import KINDS, BatchJobError, RowFailure, read_jobs
from tiengine.batch.local import run_local
from tiengine.batch.manifest import (
    MANIFEST_FORMATS,
    ManifestJournal,
    read_journal,
    write_final,
)
from tiengine.batch.outputs import EMBEDDINGS_FOLDER, IMAGES_FOLDER
from tiengine.batch.ray_executor import run_ray
from tiengine.batch.worker import DTYPES, RowResult, WorkerSpec
from tiengine.batch.writer import RunWriter, failure_record, plan
from tiengine.io.atomic import ensure_folder
from tiengine.io.lock import acquire_lock

EXECUTORS = ("local", "ray")
STALE_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")  # tiengine.io.atomic's temporary names


@dataclass(frozen=True)
class BatchManifest:
    """A run's outcome: the manifest file and its records (one per JOBS row, file order), and counts: rows
    run now (`ran`), rows kept from an earlier run (`kept`), rows `failed` (refused or raised)."""

    path: Path
    records: list[dict]
    ran: int
    kept: int
    failed: int
    warnings: list[str]

    @property
    def ok(self) -> bool:
        return self.failed == 0


def run(
    jobs: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    out: str | os.PathLike[str],
    *,
    kind: str = "encode",
    executor: str = "local",
    model: str | os.PathLike[str] | None = None,
    embeddings: str | os.PathLike[str] | None = None,
    loras: str | os.PathLike[str] | None = None,
    hypernetworks: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    threads: int | None = None,
    batch_size: int = 16,
    shard_rows: int = 256,
    manifest_format: str = "jsonl",
    ray_address: str | None = None,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    progress: bool = False,
) -> BatchManifest:
    """Run every row of `jobs` (a JSONL / Parquet file, or a list of row objects) of `kind` ("encode",
    "generate", "train") into folder `out`; returns the manifest.

    `model` None: the built-in model; `embeddings` / `loras` / `hypernetworks`: the folders every worker
    reads (None: none; with the built-in model its own LoRAs). `batch_size`: rows per call of the row
    function (and per Ray batch). `shard_rows`: encode rows per shard (changing it between a run and its
    re-run recomputes the shards). `executor="ray"`: `actors` actors with `cpus_per_actor` /
    `gpus_per_actor` each, on the cluster at `ray_address` (None: see tiengine.batch.ray_executor).
    `threads`: torch CPU threads of the local worker (None: torch's choice); a Ray actor uses
    int(`cpus_per_actor`). The thread count can change the last bits of CPU convolutions (generate, train),
    so local and Ray bytes are equal when the counts are (e.g. threads=1 and cpus_per_actor=1).
    `progress`: a bar on stderr with rows/s and the time left. A failing row is recorded and the run goes
    on; a re-run runs only the rows without a verified output."""
    _check_arguments(kind, executor, dtype, batch_size, shard_rows, manifest_format, actors, cpus_per_actor,
                     gpus_per_actor, threads)
    job_list = read_jobs(jobs, kind)
    folder = ensure_folder(out)
    lock, lock_warning = acquire_lock(folder / ".batch.lock")
    try:
        _remove_stale_temporaries(folder)
        spec = WorkerSpec(model=_text(model), embeddings=_text(embeddings), loras=_text(loras),
                          hypernetworks=_text(hypernetworks), device=device, dtype=dtype,
                          threads=threads if threads is not None or executor == "local"
                          else max(1, int(cpus_per_actor)))
        work = plan(job_list, folder, shard_rows, read_journal(folder), spec)
        writer = RunWriter(folder, work, ManifestJournal(folder), spec)
        if work.pending:
            accept = _with_progress(writer.accept, len(work.pending), kind, progress)
            if executor == "local":
                run_local(work.pending, spec, batch_size=batch_size, accept=accept)
            else:
                run_ray(work.pending, spec, address=ray_address, actors=actors, batch_size=batch_size,
                        cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, accept=accept)
        records = [failure_record(row) if isinstance(row, RowFailure) else writer.records[row.id]
                   for row in job_list.rows]
        path = write_final(folder, records, manifest_format)
    finally:
        lock.release()
    return BatchManifest(path, records, ran=len(work.pending), kept=len(work.verified),
                         failed=sum(record["status"] == "failed" for record in records),
                         warnings=[lock_warning] if lock_warning else [])


def _check_arguments(kind: str, executor: str, dtype: str, batch_size: int, shard_rows: int, manifest_format: str,
                     actors: int, cpus_per_actor: float, gpus_per_actor: float, threads: int | None) -> None:
    choices = {"kind": (kind, KINDS), "executor": (executor, EXECUTORS), "dtype": (dtype, tuple(DTYPES)),
               "manifest_format": (manifest_format, MANIFEST_FORMATS)}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise BatchJobError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    for name, value in (("batch_size", batch_size), ("shard_rows", shard_rows), ("actors", actors)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BatchJobError(f"{name} must be an integer >= 1, got {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise BatchJobError(f"threads must be an integer >= 1 (or None), got {threads!r}")
    if not cpus_per_actor > 0 or not gpus_per_actor >= 0:
        raise BatchJobError(f"cpus_per_actor must be > 0 and gpus_per_actor >= 0, got {cpus_per_actor!r} and "
                       f"{gpus_per_actor!r}")


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files a killed run left (tiengine.io.atomic's `.NAME.HEX.tmp`); the lock keeps any
    other run out of this folder, so none of them is being written."""
    for where in (folder, folder / IMAGES_FOLDER, folder / EMBEDDINGS_FOLDER):
        for path in where.glob(".*.tmp"):
            if STALE_TEMPORARY.fullmatch(path.name):
                path.unlink(missing_ok=True)


def _text(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _with_progress(accept, total: int, kind: str, shown: bool):
    """`accept` that also advances a tqdm bar (rows/s, ETA) on stderr when `shown`."""
    if not shown:
        return accept
    bar = tqdm(total=total, desc=f"batch {kind}", unit="row", file=sys.stderr, dynamic_ncols=True)

    def accept_and_count(result: RowResult) -> None:
        accept(result)
        bar.update(1)
        if bar.n == bar.total:
            bar.close()

    return accept_and_count
