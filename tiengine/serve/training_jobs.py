"""Textual-inversion training as background jobs of `tiengine serve` (POST /tiengine/v1/train-embedding).

`TrainingJobs.submit(...)` decodes the uploaded images into a private temporary folder that the service
creates (`tempfile.mkdtemp`, mode 0700; a client never names a path), writes the captions as `<stem>.txt`
beside them (tiengine.training.data's caption rule) and template lines as a file, and queues a
"train-embedding" job on the model worker. On the worker thread the job trains with
`Engine.train_embedding` (no output file, so no checkpoints or previews), reports each step through
`control.report(step, steps, "loss ...")`, and stops at its next step once a stop is requested (a cancel,
A1111's /interrupt or /skip, the worker closing). Then:
- done: the images are removed and the embedding is kept as `<folder>/embedding.safetensors`
  (tiengine.embeddings.embedding.save_embedding, the file `tiengine train-embedding --out` writes); with
  `load`, it is also bound in the served engine by name (in memory: a later embeddings refresh rebinds the
  folder's files only, so download the file into the folder to keep it).
- failed or cancelled: the whole folder is removed; a failed job's error is kept (with the folder's path
  removed from it) for its status.
Finished jobs are kept for lookup; beyond `max_training_results` the oldest finished one is dropped with
its folder, and `drop(id)` / `close()` remove them on request / at shutdown. Job ids are the worker's random
uuid4 hex ids: the only handle on a job.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from tiengine.embeddings.embedding import save_embedding
from tiengine.errors import TiengineError
from tiengine.serve.config import RequestRefused
from tiengine.serve.native_models import JobStatus
from tiengine.training.data import CAPTION_SUFFIX

if TYPE_CHECKING:
    from tiengine.serve.config import ServeLimits
    from tiengine.serve.worker import Job, JobControl, ModelWorker
    from tiengine.training.textual_inversion import (
        TrainEmbeddingSettings,
        TrainProgress,
    )

JOB_KIND = "train-embedding"
IMAGE_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}  # Pillow format -> file suffix
RESULT_FILE = "embedding.safetensors"  # in the job's folder; downloaded as <name>.safetensors
RECENT_RECORDS = 64  # finished jobs (results dropped or none) still answered by id
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,")  # A1111's clients may send images as data URLs
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")  # uuid4().hex


class JobNotFound(TiengineError):
    """No training job has this id (never had, or its result was dropped): answered 404."""


class JobConflict(TiengineError):
    """The job is not in a state that allows the request (a result before it is done, a cancel after): 409."""


class TrainingCancelled(TiengineError):
    """A running job stopped at a step because a stop was requested."""


@dataclass
class UploadedImage:
    """One decoded upload: its bytes as sent and the suffix of its format."""

    data: bytes
    suffix: str


@dataclass
class TrainingJob:
    """A training job's record: the worker job, its private folder and, when done, the embedding file."""

    name: str
    folder: Path
    load: bool
    job: Job | None = None
    result_path: Path | None = None
    warnings: list[str] = field(default_factory=list)
    cancel_requested: bool = False

    @property
    def images_dir(self) -> Path:
        return self.folder / "images"

    def state(self) -> str:
        future = self.job.future
        if future.cancelled():
            return "cancelled"
        if future.done() and isinstance(future.exception(), TrainingCancelled):
            return "cancelled"
        return self.job.progress().state

    def status(self, prefix: str) -> JobStatus:
        """The job as its status endpoint reports it; `prefix`: the URL of the jobs (`/tiengine/v1/jobs`)."""
        progress = self.job.progress()
        state = self.state()
        error = None
        if state == "failed":
            failure = self.job.future.exception()
            error = self._without_folder(f"{type(failure).__name__}: {failure}")
        done = state == "done" and self.result_path is not None
        return JobStatus(
            id=self.job.id, kind=self.job.kind, name=self.name, state=state,
            progress=1.0 if state == "done" else progress.fraction, step=progress.step, steps=progress.steps,
            eta=progress.eta_seconds, text=progress.text, error=error, cancel_requested=self.cancel_requested,
            warnings=[self._without_folder(warning) for warning in self.warnings],
            status_url=f"{prefix}/{self.job.id}", result_url=f"{prefix}/{self.job.id}/result" if done else None,
        )

    def _without_folder(self, message: str) -> str:
        """`message` without the service's temporary folder (a client never sees server paths)."""
        return message.replace(str(self.folder) + os.sep, "").replace(str(self.folder), "<job folder>")


class TrainingJobs:
    """The service's training jobs (see the module docstring)."""

    def __init__(self, worker: ModelWorker, limits: ServeLimits) -> None:
        self.worker = worker
        self.limits = limits
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, TrainingJob] = OrderedDict()

    def submit(self, name: str, settings: TrainEmbeddingSettings, images: list[UploadedImage],
               captions: list[str] | None, template_lines: list[str] | None, load: bool) -> TrainingJob:
        """Write the inputs into a new private folder and queue the job (raises QueueFull: the folder is
        removed)."""
        folder = Path(tempfile.mkdtemp(prefix="tiengine-train-"))
        record = TrainingJob(name, folder, load)
        try:
            record.images_dir.mkdir()
            for index, image in enumerate(images, start=1):
                stem = record.images_dir / f"{index:03d}"
                stem.with_suffix(image.suffix).write_bytes(image.data)
                if captions is not None:
                    stem.with_suffix(CAPTION_SUFFIX).write_text(captions[index - 1], encoding="utf-8")
            if template_lines is not None:
                template = folder / "template.txt"
                template.write_text("\n".join(template_lines) + "\n", encoding="utf-8")
                settings = _with_template(settings, str(template))
            record.job = self.worker.submit(JOB_KIND, lambda control: self._train(record, settings, control))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self._lock:
            self._jobs[record.job.id] = record
            self._forget_old()
        return record

    def get(self, job_id: str) -> TrainingJob:
        """The job with this id; JobNotFound for any other string (path characters included)."""
        with self._lock:
            record = self._jobs.get(job_id) if _JOB_ID.match(job_id) else None
        if record is None:
            raise JobNotFound(f"no training job {job_id!r} (unknown id, or its result was dropped)")
        return record

    def cancel(self, job_id: str) -> TrainingJob:
        """A queued job never runs (its folder is removed now); a running one stops at its next step.
        JobConflict once it has finished."""
        record = self.get(job_id)
        if record.job.future.done():
            raise JobConflict(f"training job {job_id} has already finished ({record.state()}); nothing to cancel")
        record.cancel_requested = True
        if record.job.future.cancel():
            shutil.rmtree(record.folder, ignore_errors=True)
        else:
            record.job.control.interrupted.set()
        return record

    def result(self, job_id: str) -> TrainingJob:
        """The finished job whose embedding file can be downloaded; JobConflict before or without one."""
        record = self.get(job_id)
        state = record.state()
        if state != "done" or record.result_path is None:
            raise JobConflict(f"training job {job_id} is {state}: it has no result"
                              + (" yet" if state in ("queued", "running") else ""))
        return record

    def drop(self, job_id: str) -> None:
        """Forget a finished job and remove its files; JobConflict while it is queued or running."""
        record = self.get(job_id)
        if not record.job.future.done():
            raise JobConflict(f"training job {job_id} is {record.state()}: cancel it first")
        with self._lock:
            self._jobs.pop(job_id, None)
        shutil.rmtree(record.folder, ignore_errors=True)

    def close(self) -> None:
        """At shutdown, after the worker has stopped: remove every job's folder."""
        with self._lock:
            records = list(self._jobs.values())
            self._jobs.clear()
        for record in records:
            record.job.future.cancel()
            shutil.rmtree(record.folder, ignore_errors=True)

    def _train(self, record: TrainingJob, settings: TrainEmbeddingSettings, control: JobControl) -> dict:
        """The job, on the worker thread: train, keep the embedding file, optionally bind it."""
        engine = self.worker.engine

        def progress(step: TrainProgress) -> bool:
            control.report(step.step, step.steps, f"loss {step.loss:.6g}")
            return not (control.stop_requested or self.worker.closing)

        try:
            control.report(0, settings.steps)
            result = engine.train_embedding(record.images_dir, record.name, settings, callback=progress)
            if result.stopped_early:
                raise TrainingCancelled(f"stopped at step {result.steps_done} of {settings.steps} on request")
            if result.embedding is None:
                raise RequestRefused(f"the model's text encoder widths {engine.encoder_widths} fit no embedding file")
            record.warnings = list(result.warnings)
            path = save_embedding(result.embedding, record.folder / RESULT_FILE)
            if record.load:
                engine.add_embedding(result.embedding)
            with self._lock:
                record.result_path = path
                self._forget_old()
        except BaseException:
            shutil.rmtree(record.folder, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(record.images_dir, ignore_errors=True)
            template = record.folder / "template.txt"
            template.unlink(missing_ok=True)
        return {"name": record.name, "steps": result.steps_done, "seed": result.seed}

    def _forget_old(self) -> None:
        """Drop the oldest jobs with a result beyond `max_training_results`, and the oldest finished ones beyond
        RECENT_RECORDS (their folders too); never a queued or running one. Called with the lock held."""
        with_files = [job_id for job_id, record in self._jobs.items() if record.result_path is not None]
        finished = [job_id for job_id, record in self._jobs.items() if record.job.future.done()]
        excess = set(with_files[: max(0, len(with_files) - self.limits.max_training_results)])
        excess |= set(finished[: max(0, len(self._jobs) - RECENT_RECORDS)])
        for job_id in excess:
            shutil.rmtree(self._jobs.pop(job_id).folder, ignore_errors=True)


def decode_images(encoded: list[str], limits: ServeLimits) -> list[UploadedImage]:
    """Base64 (or data URL) images -> bytes with their format's suffix; each checked to be a PNG, JPEG or
    WebP within `max_pixels` by its header (the pixels are decoded by the training job, whose error names
    a truncated file)."""
    images = []
    for index, text in enumerate(encoded):
        try:
            data = base64.b64decode(_DATA_URL.sub("", text, count=1), validate=True)
        except (binascii.Error, ValueError):
            raise RequestRefused(f"images[{index}]: not base64 (expected a base64 PNG, JPEG or WebP)") from None
        try:
            with Image.open(io.BytesIO(data)) as image:
                image_format, (width, height) = image.format, image.size
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
            raise RequestRefused(f"images[{index}]: not a readable image ({error}); expected PNG, JPEG or WebP") \
                from None
        if image_format not in IMAGE_SUFFIXES:
            raise RequestRefused(f"images[{index}]: a {image_format} image; expected PNG, JPEG or WebP")
        if width * height > limits.max_pixels:
            raise RequestRefused(f"images[{index}]: {width}x{height} pixels, over the service's limit of "
                                 f"{limits.max_pixels} (serve limit max_pixels)")
        images.append(UploadedImage(data, IMAGE_SUFFIXES[image_format]))
    return images


def _with_template(settings: TrainEmbeddingSettings, template: str) -> TrainEmbeddingSettings:
    return dataclasses.replace(settings, template=template)
