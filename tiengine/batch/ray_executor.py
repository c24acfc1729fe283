"""The Ray executor: the same rows through Ray Data, each actor holding one engine (the only module using ray).

read -> map_batches -> write: the pending Jobs become a dataset (`ray.data.from_items`, one JSON text per
row: the driver has read and checked the JOBS file, since duplicate ids and resume need every row), then
`map_batches(RayRowActor, compute=ActorPoolStrategy(size=actors), num_cpus=/num_gpus= per actor,
batch_size=...)` runs them on an actor pool in which each actor loads the model once (`RowWorker`, the local executor's very function),
and the results stream back to the driver, whose RunWriter writes shards, files and the manifest. Writing
stays in one process, so atomic writes and the journal work the same for both executors, and a cluster
needs no shared output folder (train rows' images folders must be readable where the actors run).

Batches are Arrow tables: the payload column is Arrow binary, so bytes pass unchanged (a NumPy "S" array
would drop trailing zero bytes). `ray`, `ray.data` and `pyarrow` are imported when a run starts (the
[ray] extra), so importing this module needs neither.
"""

from __future__ import annotations

from collections.abc import Callable

from tiengine.batch.jobs import Job
from tiengine.batch.worker import RowResult, RowWorker, WorkerSpec
from tiengine.errors import TiengineError


class BatchRayError(TiengineError):
    """Ray is missing, or the Ray run failed as a whole (a failing row is recorded, not raised)."""


class RayRowActor:
    """One actor of the pool: an engine loaded once; each call processes an Arrow batch of Jobs."""

    def __init__(self, spec_json: str) -> None:
        self.worker = RowWorker(WorkerSpec.from_json(spec_json))

    def __call__(self, batch):  # pyarrow.Table {"job": string} -> pyarrow.Table {"result": string, "payload": binary}
        import pyarrow

        results = self.worker.process([Job.from_json(text) for text in batch.column("job").to_pylist()])
        return pyarrow.table({"result": pyarrow.array([r.to_json() for r in results], pyarrow.string()),
                              "payload": pyarrow.array([r.payload for r in results], pyarrow.binary())})


def run_ray(pending: list[Job], spec: WorkerSpec, *, address: str | None, actors: int, batch_size: int,
            cpus_per_actor: float, gpus_per_actor: float, accept: Callable[[RowResult], None]) -> None:
    """Run `pending` on `actors` Ray actors; `accept(result)` per row as results arrive (any order).

    Uses the Ray instance this process already joined, else `ray.init(address)` (None: a running local
    cluster from `ray start --head` if there is one, else a new local instance), shut down afterwards."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise BatchRayError("--ray needs Ray Data: pip install 'tiengine[ray]' (or pip install -e \".[ray]\")") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's own bar counts rows
    try:
        dataset = ray.data.from_items([{"job": job.to_json()} for job in pending])
        results = dataset.map_batches(
            RayRowActor, fn_constructor_kwargs={"spec_json": spec.to_json()},
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, batch_size=batch_size, batch_format="pyarrow",
        )
        for row in results.iter_rows():
            accept(RowResult.from_json(row["result"], bytes(row["payload"])))
    except (ray.exceptions.BatchRayError, ValueError, TypeError) as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise BatchRayError(f"the Ray run failed: {first_line}") from error
    finally:
        if started:
            ray.shutdown()
