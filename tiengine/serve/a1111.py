"""The A1111-compatible routes, `/sdapi/v1/...`, with AUTOMATIC1111 1.10's paths, field names and response shapes
(modules/api/api.py), so that its clients (webuiapi, front ends) drive tiengine unchanged.

Generation (txt2img, img2img) runs as a job on the model worker (tiengine.serve.worker): the request's fields
become a GenerationPlan (tiengine.serve.a1111_fields, refusing what is not done), each of its n_iter runs is one
engine call (`control.begin_run`, so /progress and /skip work per run; /interrupt ends the job with the images
made so far, the current one from its last prediction, as A1111 does). Images are sent as base64 PNGs whose
bytes are `tiengine.io.metadata.png_bytes`, the bytes `tiengine generate --out` writes; `info` is A1111's
`Processed.js()` JSON text. Folder refreshes run on the worker too; the listings (samplers, schedulers,
sd-models, embeddings, loras, hypernetworks) read the engine's current state on the request thread: the
libraries publish each reload's tables whole, so a listing is of one scan, the previous or the new.

/progress reports the running job in A1111's shape. Its `current_image` is a live preview of the running
step's prediction, as A1111's "Approx cheap" method makes it: a linear map from each latent pixel to a colour
(tiengine.diffusion.latent_preview), one preview pixel per latent pixel (64 x 64 for 512 x 512), fitted to
the model's VAE on the worker before the first generation. None with `skip_current_image=true`, with the
option live_previews_enable off, and before the job's first step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from safetensors import safe_open

from tiengine import __version__
from tiengine.diffusion.names import SAMPLER_ALIASES, SAMPLER_NAMES, SCHEDULE_TYPES
from tiengine.diffusion.samplers import SAMPLERS
from tiengine.io.metadata import (
    PARAMETERS_KEY,
    generation_parameters,
    parse_parameters,
    png_bytes,
)
from tiengine.results import GenerationResult
from tiengine.serve.a1111_fields import (
    A1111Options,
    GenerationPlan,
    ModelIdentity,
    decode_image,
    img2img_plan,
    txt2img_plan,
)
from tiengine.serve.a1111_models import (
    EmbeddingItem,
    EmbeddingsResponse,
    GenerationResponse,
    HypernetworkItem,
    Img2ImgRequest,
    LoraItem,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    Txt2ImgRequest,
)
from tiengine.weights_conv.source import model_name, model_source

if TYPE_CHECKING:
    from tiengine.diffusion.latent_preview import LatentPreview
    from tiengine.embeddings.embedding import Embedding
    from tiengine.engine import Engine
    from tiengine.networks.library import NetworkLibrary
    from tiengine.serve.state import ServeState
    from tiengine.serve.worker import Job, JobControl

# A1111's Scheduler entries: rho defaults (karras 7, polyexponential 1) and the schedules built from the model's
# own sigma table ("need_inner_model").
SCHEDULE_RHO = {"karras": 7.0, "polyexponential": 1.0}
INNER_MODEL_SCHEDULES = frozenset({"sgm_uniform", "simple", "normal", "ddim", "beta", "align_your_steps"})
# Infotext keys A1111 keeps in Processed.extra_generation_params (the ones tiengine writes).
EXTRA_GENERATION_KEYS = ("Denoising strength", "Hires upscale", "Hires resize", "Hires steps", "Hires upscaler",
                         "Emphasis", "Eta", "Eta DDIM", "Lora hashes", "TI hashes")


def router(state: ServeState) -> APIRouter:
    """The `/sdapi/v1` routes over `state`; the A1111 options live in this router (one per app)."""
    routes = APIRouter(prefix="/sdapi/v1", tags=["A1111"])
    engine = state.engine
    identity = model_identity(engine)
    options = A1111Options(identity)
    limits = state.config.limits
    sha256: dict[str, str | None] = {}  # the model file's, read once (a single file is hashed in full)

    async def run_job(kind: str, plan: GenerationPlan, request: Any) -> dict[str, Any]:
        job = state.worker.submit(kind, lambda control: generation_response(engine, identity, plan, request, control))
        return await asyncio.wrap_future(job.future)

    @routes.post("/txt2img", response_model=GenerationResponse)
    async def txt2img(request: Txt2ImgRequest) -> dict[str, Any]:
        return await run_job("txt2img", txt2img_plan(request, options, limits), request)

    @routes.post("/img2img", response_model=GenerationResponse)
    async def img2img(request: Img2ImgRequest) -> dict[str, Any]:
        plan = await run_in_threadpool(img2img_plan, request, options, limits)  # decodes the init image
        return await run_job("img2img", plan, request)

    @routes.post("/png-info", response_model=PNGInfoResponse)
    def png_info(request: PNGInfoRequest) -> PNGInfoResponse:
        if not request.image.strip():
            return PNGInfoResponse(info="")
        image = decode_image(request.image, "image", limits.max_pixels)
        text = image.info.get(PARAMETERS_KEY)
        items = {key: value for key, value in image.info.items()
                 if key != PARAMETERS_KEY and isinstance(key, str) and isinstance(value, (str, int, float))}
        if not isinstance(text, str) or not text:
            return PNGInfoResponse(info="", items=items)
        return PNGInfoResponse(info=text, items=items, parameters=generation_parameters(parse_parameters(text)))

    @routes.get("/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = False) -> ProgressResponse:
        live = not skip_current_image and options.values.get("live_previews_enable", True) is not False
        preview = engine.latent_preview(fit=False) if live else None  # fitted on the worker, or None
        return progress_response(state.worker.current(), preview)

    @routes.post("/interrupt")
    def interrupt() -> None:
        state.worker.interrupt()

    @routes.post("/skip")
    def skip() -> None:
        state.worker.skip()

    @routes.get("/options")
    def get_options() -> dict[str, Any]:
        return options.snapshot()

    @routes.post("/options")
    def set_options(changes: dict[str, Any]) -> None:
        options.update(changes)

    @routes.get("/samplers", response_model=list[SamplerItem])
    def samplers() -> list[SamplerItem]:
        return [sampler_item(name) for name in SAMPLER_NAMES]

    @routes.get("/schedulers", response_model=list[SchedulerItem])
    def schedulers() -> list[SchedulerItem]:
        return [SchedulerItem(name=kind.name, label=kind.label, aliases=list(kind.aliases) or None,
                              default_rho=SCHEDULE_RHO.get(kind.name, -1.0),
                              need_inner_model=kind.name in INNER_MODEL_SCHEDULES)
                for kind in SCHEDULE_TYPES if kind.name != "automatic"]

    @routes.get("/sd-models", response_model=list[SDModelItem])
    def sd_models() -> list[SDModelItem]:
        if "model" not in sha256:
            source = model_source(engine.model_path) if engine.model_path is not None else None
            sha256["model"] = source.sha256 if source is not None else None
        return [SDModelItem(title=identity.title, model_name=identity.name, hash=identity.hash,
                            sha256=sha256["model"], filename=identity.filename, config=None)]

    @routes.get("/embeddings", response_model=EmbeddingsResponse)
    def embeddings() -> EmbeddingsResponse:
        return embeddings_response(engine)

    @routes.get("/loras", response_model=list[LoraItem])
    def loras() -> list[LoraItem]:
        return network_items(engine.networks.loras)

    @routes.get("/hypernetworks", response_model=list[HypernetworkItem])
    def hypernetworks() -> list[HypernetworkItem]:
        library = engine.networks.hypernetworks
        return [] if library is None else [HypernetworkItem(name=file.name, path=file.relative_path)
                                           for file in library.files]

    @routes.post("/refresh-embeddings")
    async def refresh_embeddings() -> None:
        job = state.worker.submit("refresh-embeddings", lambda control: engine.reload_embeddings())
        await asyncio.wrap_future(job.future)

    @routes.post("/refresh-loras")
    async def refresh_loras() -> None:
        job = state.worker.submit("refresh-loras", lambda control: reload_networks(engine))
        await asyncio.wrap_future(job.future)

    return routes


def model_identity(engine: Engine) -> ModelIdentity:
    """The loaded model's A1111 names; its file or folder name only, never its path."""
    if engine.model_path is None:
        return ModelIdentity("model", None, "model")
    return ModelIdentity(model_name(engine.model_path), engine.model_hash(), Path(engine.model_path).name)


def generation_response(engine: Engine, identity: ModelIdentity, plan: GenerationPlan, request: Any,
                        control: JobControl) -> dict[str, Any]:
    """Run `plan` on the worker thread (one engine call per run) and build A1111's response."""
    started = time.localtime()
    with contextlib.suppress(ValueError):  # a VAE that cannot be fitted (NaN latents) gives no previews
        engine.latent_preview()  # fitted once, here on the worker, for /progress's current_image
    results = []
    for index in range(plan.n_iter):
        if control.interrupted.is_set():
            break
        control.begin_run(index, plan.n_iter)
        settings = plan.run_settings(index)
        if plan.init_image is None:
            result = engine.generate(plan.prompt, plan.negative_prompt, settings=settings, callback=control.step)
        else:
            result = engine.img2img(plan.init_image, plan.prompt, plan.negative_prompt, settings=settings,
                                    callback=control.step)
        results.append(result)
    joined = GenerationResult.join(results)
    images = [base64.b64encode(png_bytes(image, text)).decode("ascii")
              for image, text in zip(joined.images, joined.parameters)] if plan.send_images else []
    return {"images": images, "parameters": echoed_parameters(request),
            "info": json.dumps(processed_info(plan, joined, identity, started), default=lambda _: None)}


def echoed_parameters(request: Any) -> dict[str, Any]:
    """The request as A1111 echoes it (every field, defaults included; init images and masks left out)."""
    parameters = request.model_dump()
    for field in ("init_images", "mask"):
        if field in parameters:
            parameters[field] = None
    parameters.pop("include_init_images", None)
    return parameters


def processed_info(plan: GenerationPlan, result: GenerationResult, identity: ModelIdentity,
                   started: time.struct_time) -> dict[str, Any]:
    """A1111's Processed.js() keys for the images made (fewer than asked when interrupted)."""
    settings = plan.settings
    count = len(result.images)
    all_seeds = [plan.run_settings(k).seed + (0 if settings.subseed_strength else i)
                 for k in range(plan.n_iter) for i in range(settings.batch_size)][:count] or [settings.seed]
    all_subseeds = [settings.subseed + index for index in range(max(count, 1))]
    first = parse_parameters(result.parameters[0]) if result.parameters else {}
    resize = settings.seed_resize_from or (-1, -1)
    return {
        "prompt": plan.prompt, "all_prompts": [plan.prompt] * count,
        "negative_prompt": plan.negative_prompt, "all_negative_prompts": [plan.negative_prompt] * count,
        "seed": all_seeds[0], "all_seeds": all_seeds, "subseed": all_subseeds[0], "all_subseeds": all_subseeds,
        "subseed_strength": settings.subseed_strength, "width": result.images[0].width if count else settings.width,
        "height": result.images[0].height if count else settings.height,
        "sampler_name": settings.sampler, "cfg_scale": settings.cfg_scale, "steps": settings.steps,
        "batch_size": settings.batch_size, "restore_faces": None, "face_restoration_model": None,
        "sd_model_name": identity.name, "sd_model_hash": identity.hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": resize[0], "seed_resize_from_h": resize[1],
        "denoising_strength": settings.strength if plan.init_image is not None or settings.hires else None,
        "extra_generation_params": {key: first[key] for key in EXTRA_GENERATION_KEYS if key in first},
        "index_of_first_image": 0, "infotexts": list(result.parameters), "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", started), "clip_skip": settings.encode.clip_skip,
        "is_using_inpainting_conditioning": False, "version": f"tiengine {__version__}",
    }


def progress_response(job: Job | None, preview: LatentPreview | None = None) -> ProgressResponse:
    """A1111's /progress answer for the running job (job_count 0 and progress 0 when none runs); with `preview`,
    current_image is its base64 PNG of the job's latest prediction, if there is one yet."""
    if job is None:
        return ProgressResponse(progress=0.0, eta_relative=0.0, state=_state_dict(None), textinfo=None)
    snapshot = job.progress()
    current_image = None
    if preview is not None and snapshot.denoised is not None and snapshot.denoised.shape[1] == preview.channels:
        buffer = io.BytesIO()
        preview.image(snapshot.denoised).save(buffer, format="PNG")
        current_image = base64.b64encode(buffer.getvalue()).decode("ascii")
    return ProgressResponse(progress=snapshot.fraction, eta_relative=snapshot.eta_seconds or 0.0,
                            state=_state_dict(job), current_image=current_image, textinfo=snapshot.text)


def _state_dict(job: Job | None) -> dict[str, Any]:
    """A1111's shared.state.dict() keys."""
    if job is None:
        return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    snapshot = job.progress()
    started = time.localtime(snapshot.started_at or job.created_at)
    return {"skipped": snapshot.skipped, "interrupted": snapshot.interrupted, "stopping_generation": False,
            "job": f"{snapshot.kind} {job.id}", "job_count": snapshot.run_count,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", started), "job_no": snapshot.run_index,
            "sampling_step": snapshot.step, "sampling_steps": snapshot.steps}


def sampler_item(name: str) -> SamplerItem:
    """A1111's /samplers entry: name, aliases and the options its registry gives the sampler."""
    info = SAMPLERS[name]
    flags = {"second_order": info.second_order, "brownian_noise": info.brownian_noise, "uses_ensd": info.uses_ensd,
             "discard_next_to_last_sigma": info.discard_penultimate_sigma}
    options: dict[str, Any] = {key: True for key, on in flags.items() if on}
    options["scheduler"] = info.default_scheduler
    return SamplerItem(name=name, aliases=list(SAMPLER_ALIASES.get(name, ())), options=options)


def embeddings_response(engine: Engine) -> EmbeddingsResponse:
    """A1111's {"loaded", "skipped"}: the folder's embeddings this model uses, and those read but not fitting it."""
    vocabulary = engine.base_vocabulary
    loaded = {name: embedding_item(embedding) for name, embedding in sorted(vocabulary.embeddings.items())}
    library = engine.library
    skipped = {} if library is None else {
        name: embedding_item(embedding) for name, embedding in library.loaded.items() if name not in loaded}
    return EmbeddingsResponse(loaded=loaded, skipped=skipped)


def embedding_item(embedding: Embedding) -> EmbeddingItem:
    vectors = next(iter(embedding.vectors.values()))  # (n, D) of the first encoder
    return EmbeddingItem(step=embedding.step, sd_checkpoint=embedding.sd_checkpoint,
                         sd_checkpoint_name=embedding.sd_checkpoint_name, shape=int(vectors.shape[1]),
                         vectors=embedding.n_vectors)


def network_items(library: NetworkLibrary | None) -> list[LoraItem]:
    """A1111's /loras list; `path` relative to the folder, `metadata` the safetensors header's."""
    if library is None:
        return []
    return [LoraItem(name=file.name, alias=file.alias or file.name, path=file.relative_path,
                     metadata=_safetensors_metadata(file.path)) for file in library.files]


def _safetensors_metadata(path: Path) -> dict[str, Any]:
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (OSError, ValueError, RuntimeError):  # changed or removed since the scan: listed without metadata
        return {}


def reload_networks(engine: Engine) -> None:
    """Re-scan the LoRA and hypernetwork folders (on the worker thread)."""
    for library in (engine.networks.loras, engine.networks.hypernetworks):
        if library is not None:
            library.reload()
