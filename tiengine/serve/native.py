"""tiengine's own routes, `/tiengine/v1/...`: the CLI's prompt reports and conditioning over HTTP, and
textual-inversion training as background jobs.

- POST parse: the object `tiengine parse --json` prints (tiengine.reports.parse_report); no model needed,
  so it runs beside the queue, bounded by the engine's prompt limits.
- POST tokenize: the object `tiengine tokenize --json` prints, for the served model's family and with its
  loaded embeddings (a job on the model worker: the tokenizer is the engine's). Extra networks activated by
  an earlier prompt are removed first, so their bundled embeddings never show (as the CLI, which reads no
  network file).
- POST encode: the conditioning of `tiengine encode` (same tensor names, same metadata). By the Accept
  header: JSON (the default) `{"metadata": {...}, "safetensors": base64}`, or with
  `Accept: application/octet-stream` the bytes `tiengine encode --out` writes (the metadata is inside them,
  under the safetensors metadata key "tiengine"; no report header, which could outgrow header limits).
- POST train-embedding: 202 with the job's status (tiengine.serve.training_jobs); GET jobs/{id} its status,
  POST jobs/{id}/cancel, GET jobs/{id}/result the embedding file, DELETE jobs/{id} drops a finished job and
  its file. Unknown ids are 404, requests that do not fit the job's state 409.
Request bodies are tiengine.serve.native_models (strict: unknown fields and wrong types are 422).
"""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Header, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response

from tiengine.diffusion.samplers import get_sampler
from tiengine.reports import (
    conditioning_file,
    conditioning_metadata,
    conditioning_tensors,
    parse_report,
    tokenize_report,
)
from tiengine.serve.native_models import (
    EncodeRequest,
    JobStatus,
    ParseRequest,
    TokenizeRequest,
    TrainEmbeddingRequest,
    check_prompt_length,
    check_steps,
    check_training,
)
from tiengine.serve.training_jobs import (
    JobConflict,
    JobNotFound,
    TrainingJobs,
    decode_images,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from tiengine.serve.state import ServeState
    from tiengine.serve.worker import JobControl

PREFIX = "/tiengine/v1"
JOBS_URL = f"{PREFIX}/jobs"
OCTET_STREAM = "application/octet-stream"


def router(state: ServeState) -> APIRouter:
    jobs = TrainingJobs(state.worker, state.config.limits)
    routes = APIRouter(prefix=PREFIX, tags=["tiengine"], on_shutdown=[jobs.close])
    limits = state.config.limits
    engine = state.engine

    async def on_worker(kind: str, run: Callable[[JobControl], Any]) -> Any:
        """Run `run(control)` on the model worker, in queue order (QueueFull: 503)."""
        return await asyncio.wrap_future(state.worker.submit(kind, run).future)

    @routes.post("/parse")
    def parse(request: ParseRequest) -> dict:
        """How the prompt language reads a prompt: `tiengine parse --json`'s object."""
        check_prompt_length(limits, prompt=request.prompt)
        check_steps(limits, request.steps)
        return parse_report(request.prompt, request.steps, second_order=request.second_order,
                            limits=engine.prompt_limits)

    @routes.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> dict:
        """A prompt's 77-token chunks with the served embeddings: `tiengine tokenize --json`'s object."""
        check_prompt_length(limits, prompt=request.prompt)
        options = request.encode_options()

        def run(_: JobControl) -> dict:
            engine.apply_networks("")  # the base vocabulary: no LoRA's bundled embeddings
            return tokenize_report(request.prompt, engine.tokenizer, engine.vocabulary, family=engine.config.family,
                                   options=options, limits=engine.prompt_limits)

        return await on_worker("tokenize", run)

    @routes.post("/encode", response_model=None)
    async def encode(request: EncodeRequest, accept: str | None = Header(None)) -> Response | dict:
        """The conditioning tensors and report of `tiengine encode`, as JSON or as the safetensors bytes."""
        check_prompt_length(limits, prompt=request.prompt, negative_prompt=request.negative_prompt)
        check_steps(limits, request.steps)
        as_bytes = _wants_bytes(accept)
        second_order = get_sampler(request.sampler).second_order
        options = request.encode_options(request.clip_skip)

        def run(_: JobControl) -> tuple[dict, bytes]:
            conditioning = engine.encode(request.prompt, request.negative_prompt, steps=request.steps,
                                         second_order=second_order, options=options, dtype=engine.dtype)
            metadata = conditioning_metadata(engine, conditioning, request.prompt, request.negative_prompt,
                                             steps=request.steps, second_order=second_order, options=options)
            return metadata, conditioning_file(conditioning_tensors(conditioning), metadata)

        metadata, payload = await on_worker("encode", run)
        if as_bytes:
            return Response(payload, media_type=OCTET_STREAM,
                            headers={"Content-Disposition": 'attachment; filename="conditioning.safetensors"'})
        return {"metadata": metadata, "safetensors": base64.b64encode(payload).decode("ascii")}

    @routes.post("/train-embedding", status_code=202, response_model=JobStatus)
    async def train_embedding(request: TrainEmbeddingRequest) -> JSONResponse:
        """Queue a textual-inversion training job; poll its status_url, download its result_url."""
        check_training(limits, request)
        settings = request.settings()
        images = await run_in_threadpool(decode_images, request.images, limits)
        record = await run_in_threadpool(jobs.submit, request.name, settings, images, request.captions,
                                         request.template_lines, request.load)
        status = record.status(JOBS_URL)
        return JSONResponse(status.model_dump(), status_code=202, headers={"Location": status.status_url})

    @routes.get("/jobs/{job_id}", response_model=JobStatus)
    def job_status(job_id: str) -> JobStatus:
        """A training job's state, progress (step of steps, eta) and, when done, where its result is."""
        return _answer(lambda: jobs.get(job_id)).status(JOBS_URL)

    @routes.post("/jobs/{job_id}/cancel", response_model=JobStatus)
    def cancel_job(job_id: str) -> JobStatus:
        """A queued job never runs; a running one stops at its next step (409 once finished)."""
        return _answer(lambda: jobs.cancel(job_id)).status(JOBS_URL)

    @routes.get("/jobs/{job_id}/result", response_class=FileResponse)
    def job_result(job_id: str) -> FileResponse:
        """The trained embedding (safetensors, as `tiengine train-embedding --out` writes it)."""
        record = _answer(lambda: jobs.result(job_id))
        return FileResponse(record.result_path, media_type=OCTET_STREAM, filename=f"{record.name}.safetensors")

    @routes.delete("/jobs/{job_id}", status_code=204)
    def drop_job(job_id: str) -> Response:
        """Forget a finished job and remove its files (409 while it is queued or running)."""
        _answer(lambda: jobs.drop(job_id))
        return Response(status_code=204)

    return routes


def _answer(call: Callable[[], Any]) -> Any:
    """`call()`, with JobNotFound as 404 and JobConflict as 409."""
    try:
        return call()
    except JobNotFound as error:
        raise HTTPException(404, str(error)) from None
    except JobConflict as error:
        raise HTTPException(409, str(error)) from None


def _wants_bytes(accept: str | None) -> bool:
    """Whether the Accept header prefers application/octet-stream to application/json (missing: JSON); 406
    when it accepts neither."""
    if not accept:
        return False
    quality = {"application/json": 0.0, OCTET_STREAM: 0.0}
    for entry in accept.split(","):
        media, *parameters = [piece.strip() for piece in entry.split(";")]
        q = 1.0
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        for wanted, best in quality.items():
            if media in (wanted, "application/*", "*/*"):
                quality[wanted] = max(best, q)
    if max(quality.values()) <= 0:
        raise HTTPException(406, f"Accept {accept!r}: this endpoint answers application/json (the default) or "
                                 f"{OCTET_STREAM}")
    return quality[OCTET_STREAM] > quality["application/json"]
