"""One model worker per device: a thread that owns the Engine and runs jobs one at a time, in FIFO order,
from a bounded queue.

Every request that uses the model (txt2img, img2img, encode, training, a folder refresh) is a job:
`worker.submit(kind, run)` queues `run(control)` and returns its Job at once, or raises QueueFull (answered
503 with Retry-After, estimated from recent job durations) when `queue_size` jobs are already waiting. The
thread never dies with a job: an exception is kept in the job's future and raised to that job's caller only.
A job whose caller cancelled its future before it started (a client that went away) is skipped.

`JobControl` is what a running job sees: `step(step, total, denoised)` records sampling progress and raises
SamplingStopped(denoised) once the job is interrupted or skipped (A1111's /interrupt and /skip; the engine
then decodes that last prediction, as A1111 does); `begin_run(index, count)` marks the run of a request's
`n_iter` runs (A1111's job_no / job_count); `stop_requested` is for loops that are not sampling (training
checks it between steps). `Job.progress()` is the snapshot the progress endpoints report.
"""

from __future__ import annotations

import concurrent.futures
import math
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tiengine.diffusion.sampler_core import SamplingStopped
from tiengine.errors import TiengineError

if TYPE_CHECKING:
    import torch

    from tiengine.engine import Engine

RECENT_JOBS = 256  # finished jobs kept for lookup by id (progress, results of background jobs)
RECENT_DURATIONS = 32  # job durations the Retry-After estimate is the median of


class QueueFull(TiengineError):
    """Every place in the worker's queue is taken; `retry_after` (whole seconds) estimates when one frees."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"the model is busy: {waiting} jobs are waiting (the queue's limit); retry in about "
                         f"{retry_after} s")
        self.retry_after = retry_after


class WorkerClosed(TiengineError):
    """The worker was closed (the service is shutting down) before the job could run."""


@dataclass(frozen=True)
class JobProgress:
    """A job's progress at one moment. fraction in [0, 1] over all its runs; eta_seconds None before the
    first step; denoised: the last step's prediction (B, C, h, w) for a live preview, or None."""

    job_id: str
    kind: str
    state: str  # "queued", "running", "done", "failed", "cancelled"
    fraction: float
    eta_seconds: float | None
    step: int
    steps: int
    run_index: int
    run_count: int
    interrupted: bool
    skipped: bool
    started_at: float | None  # wall-clock seconds since the epoch
    text: str | None
    denoised: torch.Tensor | None = field(repr=False)


class Job:
    """One unit of model work: `future` resolves to the value `run(control)` returned, or raises its error."""

    def __init__(self, kind: str, run: Callable[[JobControl], Any]) -> None:
        self.id = uuid.uuid4().hex
        self.kind = kind
        self.run = run
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.control = JobControl()

    def progress(self) -> JobProgress:
        control = self.control
        with control.lock:
            step, steps, run_index, run_count = control.step_index, control.steps, control.run_index, control.run_count
            denoised, text = control.denoised, control.text
        if self.future.cancelled():
            state = "cancelled"
        elif self.future.done():
            state = "failed" if self.future.exception() is not None else "done"
        else:
            state = "running" if self.started_at is not None else "queued"
        if state == "done":
            fraction = 1.0
        else:
            within = step / steps if steps else 0.0
            fraction = min(1.0, (run_index + within) / max(run_count, 1))
        eta = None
        if state == "running" and fraction > 0 and self.started_at is not None:
            elapsed = time.time() - self.started_at
            eta = elapsed / fraction - elapsed
        return JobProgress(self.id, self.kind, state, fraction, eta, step, steps, run_index, run_count,
                           control.interrupted.is_set(), control.skipped.is_set(), self.started_at, text, denoised)


class JobControl:
    """The running job's side: progress reports in, interrupt and skip requests out (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.interrupted = threading.Event()  # stop this job (and the rest of its runs)
        self.skipped = threading.Event()  # stop the current run only; cleared when the next run begins
        self.step_index = 0
        self.steps = 0
        self.run_index = 0
        self.run_count = 1
        self.text: str | None = None
        self.denoised: torch.Tensor | None = None

    @property
    def stop_requested(self) -> bool:
        return self.interrupted.is_set() or self.skipped.is_set()

    def begin_run(self, index: int, count: int) -> None:
        """Run `index` (0-based) of `count` starts; a skip of the previous run is spent."""
        self.skipped.clear()
        with self.lock:
            self.run_index, self.run_count, self.step_index, self.denoised = index, count, 0, None

    def report(self, step: int, steps: int, text: str | None = None) -> None:
        """Progress of work that is not sampling (training): `step` of `steps` done."""
        with self.lock:
            self.step_index, self.steps, self.text = step, steps, text

    def step(self, step: int, total: int | None, x: torch.Tensor, denoised: torch.Tensor) -> None:
        """An engine step callback (tiengine.engine.StepCallback): step `step` (0-based) of `total` is done."""
        with self.lock:
            self.step_index = step + 1
            self.steps = total or max(self.steps, step + 1)  # DPM adaptive picks its own count: None
            self.denoised = denoised
        if self.stop_requested:
            raise SamplingStopped(denoised)


class ModelWorker:
    """The thread that owns `engine`; see the module docstring."""

    def __init__(self, engine: Engine, *, queue_size: int, name: str = "tiengine-model-worker") -> None:
        self.engine = engine
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._recent: OrderedDict[str, Job] = OrderedDict()
        self._durations: deque[float] = deque(maxlen=RECENT_DURATIONS)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, kind: str, run: Callable[[JobControl], Any]) -> Job:
        """Queue `run(control)` to run on the worker thread with the engine; raises QueueFull or WorkerClosed."""
        if self._closed.is_set():
            raise WorkerClosed("the model worker is shutting down; no new jobs are taken")
        job = Job(kind, run)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(self._queue.qsize(), self.retry_after()) from None
        with self._lock:
            self._remember(job)
        return job

    def current(self) -> Job | None:
        """The running job, if any."""
        with self._lock:
            return self._current

    def job(self, job_id: str) -> Job | None:
        """A queued, running or recently finished job by id."""
        with self._lock:
            return self._recent.get(job_id)

    def waiting(self) -> int:
        return self._queue.qsize()

    @property
    def closing(self) -> bool:
        """Whether `close` was called: long jobs (training) stop at their next step instead of running on."""
        return self._closed.is_set()

    def interrupt(self) -> bool:
        """Stop the running job (its runs end early with what they have); False when none runs."""
        job = self.current()
        if job is not None:
            job.control.interrupted.set()
        return job is not None

    def skip(self) -> bool:
        """Stop the running job's current run only; False when none runs."""
        job = self.current()
        if job is not None:
            job.control.skipped.set()
        return job is not None

    def retry_after(self) -> int:
        """Seconds until a queue place is likely free: the median recent job duration (1 s before any)."""
        with self._lock:
            durations = sorted(self._durations)
        median = durations[len(durations) // 2] if durations else 1.0
        return max(1, math.ceil(median))

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, cancel the queued ones, let the running one finish, and stop the thread."""
        self._closed.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        self._queue.put(None)
        self._thread.join(timeout)

    def _remember(self, job: Job) -> None:
        self._recent[job.id] = job
        while len(self._recent) > RECENT_JOBS:
            oldest = next(iter(self._recent))
            if not self._recent[oldest].future.done():
                break  # never forget a job still queued or running
            del self._recent[oldest]

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue  # its caller went away before it started
            job.started_at = time.time()
            with self._lock:
                self._current = job
            try:
                result = job.run(job.control)
            except BaseException as error:  # noqa: BLE001 - the job's failure is its caller's, never the thread's
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
            finally:
                job.finished_at = time.time()
                with self._lock:
                    self._current = None
                    self._durations.append(job.finished_at - job.started_at)
