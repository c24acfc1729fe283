"""The local executor: one process, the model loaded once, rows handed to the shared row function in batches.

Rows run in JOBS order, `batch_size` at a time through `RowWorker.process` (tiengine.batch.worker), the
same call each Ray actor makes; each result goes to `accept` (the driver's RunWriter) as soon as its batch
is done.
"""

from __future__ import annotations

from collections.abc import Callable

from tiengine.batch.jobs import Job
from tiengine.batch.worker import RowResult, RowWorker, WorkerSpec


def run_local(pending: list[Job], spec: WorkerSpec, *, batch_size: int, accept: Callable[[RowResult], None]) -> None:
    """Run `pending` on one RowWorker built from `spec`; `accept(result)` per row, in order."""
    worker = RowWorker(spec)
    for start in range(0, len(pending), batch_size):
        for result in worker.process(pending[start : start + batch_size]):
            accept(result)
