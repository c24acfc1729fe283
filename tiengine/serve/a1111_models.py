"""The request and response bodies of the A1111-compatible routes, as pydantic models.

Field names, types and defaults are AUTOMATIC1111's (stable-diffusion-webui 1.10): the request models are
its `StableDiffusionProcessingTxt2Img` / `StableDiffusionProcessingImg2Img` dataclass fields (modules/
processing.py) minus its API_NOT_ALLOWED list, plus the fields modules/api/models.py adds (sampler_index,
script_name, script_args, send_images, save_images, alwayson_scripts, force_task_id, infotext); the
responses are its TextToImageResponse, PNGInfoResponse, ProgressResponse, SamplerItem, SchedulerItem,
SDModelItem, HypernetworkItem, EmbeddingItem and EmbeddingsResponse. Unknown request fields are ignored,
as A1111's models do (pydantic's default); which fields are used, refused or ignored is
tiengine.serve.a1111_fields' business.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ProcessingRequest(BaseModel):
    """Fields txt2img and img2img share (A1111's StableDiffusionProcessing)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    sampler_index: str = "Euler"  # the old name of sampler_name, used when sampler_name is not given
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(ProcessingRequest):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionProcessingTxt2Img fields)."""

    enable_hr: bool = False
    denoising_strength: float | None = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(ProcessingRequest):
    """POST /sdapi/v1/img2img (A1111's StableDiffusionProcessingImg2Img fields)."""

    init_images: list[str] | None = None  # base64 images; the first is used
    resize_mode: int = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    """A1111's TextToImageResponse / ImageToImageResponse: base64 PNGs, the request echoed, `info` as JSON text."""

    images: list[str] | None = None
    parameters: dict[str, Any]
    info: str


class PNGInfoRequest(BaseModel):
    image: str  # a base64 image, optionally as a data: URL


class PNGInfoResponse(BaseModel):
    info: str  # the `parameters` text ("" when the image has none)
    items: dict[str, Any] = Field(default_factory=dict)  # the image's other text entries
    parameters: dict[str, Any] = Field(default_factory=dict)  # `info` read as A1111's parse_generation_parameters


class ProgressResponse(BaseModel):
    progress: float  # 0..1
    eta_relative: float  # seconds left
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float | None
    need_inner_model: bool | None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class HypernetworkItem(BaseModel):
    name: str
    path: str | None


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str  # relative to the LoRA folder
    metadata: dict[str, Any]


class EmbeddingItem(BaseModel):
    step: int | None
    sd_checkpoint: str | None
    sd_checkpoint_name: str | None
    shape: int  # width of each vector
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]
