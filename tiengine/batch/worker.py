"""The one row-processing function of both executors: a loaded engine turns Jobs into output bytes.

`WorkerSpec` says which engine to load (model, embeddings, LoRA / hypernetwork folders, device, dtype,
threads); `RowWorker(spec)` loads it once and `process(jobs)` returns one `RowResult` per job, in order.
The local executor calls it in a loop; each Ray actor holds a RowWorker and calls the same method, so a
row's bytes are the same on both by construction.

Each row is computed alone, from its own fields: encode by `Engine.encode` (the bytes of `tiengine encode
--out`), generate by `Engine.generate` with the row's seed and batch size 1 (the PNG bytes `tiengine generate`
writes), train by `Engine.train_embedding` (the embedding file `tiengine train-embedding` writes, without its
checkpoints; its header's keys sorted, tiengine.batch.outputs). Encoding several rows in one forward pass changes the last bits of most rows on the CPU (396
of 400 wild prompts differed, grouped by chunk count; benchmarks/batch.py), so rows are never batched
together: a row's output never depends on its neighbours. Identical encode rows (same prompt, negative and
settings) are encoded once per worker (`ENCODE_MEMO_ROWS` most recent). A row that raises becomes a failed
RowResult with the error; the others go on.
"""

from __future__ import annotations

import json
import tempfile
import time
import traceback
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tiengine.batch.jobs import Job, job_settings
from tiengine.batch.outputs import canonical_safetensors
from tiengine.engine import Engine
from tiengine.errors import TiengineError
from tiengine.io.metadata import png_bytes
from tiengine.reports import (
    conditioning_file,
    conditioning_metadata,
    conditioning_tensors,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ENCODE_MEMO_ROWS = 256  # finished encode rows kept per worker for repeated prompts


@dataclass(frozen=True)
class WorkerSpec:
    """The engine every worker loads: paths as strings (None: the built-in model / no folder)."""

    model: str | None = None
    embeddings: str | None = None
    loras: str | None = None
    hypernetworks: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int | None = None  # torch CPU threads per worker (None: torch's choice)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))

    def load(self) -> Engine:
        if self.dtype not in DTYPES:
            raise TiengineError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return Engine.load(self.model, embeddings=self.embeddings or False, device=self.device,
                           dtype=DTYPES[self.dtype], loras=self.loras, hypernetworks=self.hypernetworks)


@dataclass(frozen=True)
class RowResult:
    """A processed row: payload (the output file's bytes) and report when done, error when failed."""

    id: str
    status: str  # "done" | "failed"
    payload: bytes
    report: dict | None
    error: str | None
    seconds: float

    def to_json(self) -> str:
        """Everything but the payload (the Ray path carries the payload as its own binary column)."""
        return json.dumps({"id": self.id, "status": self.status, "report": self.report, "error": self.error,
                           "seconds": self.seconds}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, payload: bytes) -> RowResult:
        data = json.loads(text)
        return cls(data["id"], data["status"], payload, data["report"], data["error"], data["seconds"])


class RowWorker:
    """An engine loaded once and the row function both executors call."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.engine = spec.load()
        self._memo: OrderedDict[str, tuple[bytes, dict]] = OrderedDict()

    def process(self, jobs: list[Job]) -> list[RowResult]:
        return [self.process_one(job) for job in jobs]

    def process_one(self, job: Job) -> RowResult:
        start = time.perf_counter()
        try:
            payload, report = getattr(self, f"_{job.kind}")(job)
        except (TiengineError, OSError, ValueError, RuntimeError) as error:
            message = f"line {job.line}: {type(error).__name__}: {error}"
            return RowResult(job.id, "failed", b"", None, message, time.perf_counter() - start)
        except Exception as error:  # noqa: BLE001 - one row's bug must not stop the others; recorded in full
            message = f"line {job.line}: {type(error).__name__}: {error}\n{traceback.format_exc(limit=5)}"
            return RowResult(job.id, "failed", b"", None, message, time.perf_counter() - start)
        return RowResult(job.id, "done", payload, report, None, time.perf_counter() - start)

    def _encode(self, job: Job) -> tuple[bytes, dict]:
        steps, second_order, options = job_settings("encode", job.fields)
        prompt, negative = job.fields["prompt"], job.fields["negative"]
        key = json.dumps([prompt, negative, steps, second_order, asdict(options)], ensure_ascii=False)
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        conditioning = self.engine.encode(prompt, negative, steps=steps, second_order=second_order,
                                          options=options)
        report = conditioning_metadata(self.engine, conditioning, prompt, negative, steps=steps,
                                       second_order=second_order, options=options)
        result = conditioning_file(conditioning_tensors(conditioning), report), report
        self._memo[key] = result
        if len(self._memo) > ENCODE_MEMO_ROWS:
            self._memo.popitem(last=False)
        return result

    def _generate(self, job: Job) -> tuple[bytes, dict]:
        settings = job_settings("generate", job.fields)
        result = self.engine.generate(job.fields["prompt"], job.fields["negative"], settings=settings)
        conditioning = result.conditioning
        report = {
            "seed": result.seeds[0],
            "parameters": result.parameters[0],
            "applied_embeddings": [{"name": a.name, "short_hash": a.short_hash, "prompt": a.prompt}
                                   for a in conditioning.applied],
            "skipped_embeddings": [{"name": m.name, "reason": m.reason} for m in conditioning.skipped],
            "extra_networks": [network.as_dict() for network in conditioning.networks],
            "warnings": conditioning.warnings,
        }
        return png_bytes(result.images[0], result.parameters[0]), report

    def _train(self, job: Job) -> tuple[bytes, dict]:
        settings = job_settings("train", job.fields)
        with tempfile.TemporaryDirectory(prefix="tiengine-batch-") as folder:  # checkpoints and log: dropped
            out = Path(folder) / "embedding.safetensors"
            result = self.engine.train_embedding(job.fields["images"], job.fields["name"], settings, out=out,
                                                 work_dir=Path(folder) / "work")
            payload = canonical_safetensors(out.read_bytes())  # `tiengine train-embedding`'s file, keys sorted
        report = {"name": result.name, "steps": result.steps_done, "seed": result.seed,
                  "final_loss": result.losses[-1].loss if result.losses else None, "warnings": result.warnings}
        return payload, report
