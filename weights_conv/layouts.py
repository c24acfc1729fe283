"""What a checkpoint is: component sources, recognised extras, family, prediction type, configs.

A `Detection` is the answer for one input: per component a `ComponentSource` (the tensor source, the
key prefix, the keys to convert and the module table that renames them), the `ModelConfig`, and an
account of every other key (ignored, with the reason) and of how each fact was decided.

Single-file layouts (CompVis/Stability originals; prefixes from their `LatentDiffusion` and
`DiffusionEngine` module trees):

| family / variant | UNet | VAE | text encoders |
|---|---|---|---|
| sd1 | model.diffusion_model. | first_stage_model. | cond_stage_model.transformer. (transformers CLIP-L) |
| sd2 | same | same | cond_stage_model.model. (OpenCLIP-H) |
| sdxl base | same | same | conditioner.embedders.0.transformer. (CLIP-L), conditioner.embedders.1.model. (bigG) |
| sdxl refiner | same | same | conditioner.embedders.0.model. (OpenCLIP-bigG, diffusers' text_encoder_2) |

The family is the text-encoder layout; the UNet's context width must equal the encoders' widths summed.
Without any text encoder keys the context width alone (768 / 1024 / 2048 / 1280) names the family, and
the missing component is then reported.

Keys that are read but never converted: `model_ema.*` (LitEma's copy of the UNet; its names are the
UNet's with the dots removed, `model_ema.diffusion_modelinput_blocks00weight`), the DDPM schedule
buffers (`betas`, `alphas_cumprod`, ...), k-diffusion's `denoiser.sigmas`, marker tensors (`v_pred`,
`ztsnr`, written by ComfyUI-era tools), `position_ids` / `logit_scale` / `attn_mask` buffers, SD2's
unused `text_projection`, and a standalone VAE's training loss (`loss.*`). Anything else is unknown and
an error unless the caller asks to ignore unknown keys.

Prediction type, first that applies: the caller's override; a `.yaml` with the checkpoint's name beside
it: ldm's `parameterization` ("eps" -> epsilon, "v" -> v; absent means eps) or generative-models'
`denoiser_scaling.EpsScaling` / `VScaling`; a `v_pred` marker key; the family default (sd1 epsilon, sd2
v as most SD2 single files are 768-v, sdxl epsilon).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiengine.errors import CheckpointError

from .readers import TensorInfo, TensorSource
from .rules import ModuleRule

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = frozenset({"model_ema.decay", "model_ema.num_updates"})
# ldm.models.diffusion.ddpm.DDPM.register_schedule buffers, and k-diffusion's sigma table
SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "denoiser.sigmas",
    }
)
MARKER_KEYS = frozenset({"v_pred", "ztsnr"})
VAE_LOSS_PREFIX = "loss."  # LPIPS + discriminator of a VAE training checkpoint
FAMILY_DEFAULT_PREDICTION = {"sd1": "epsilon", "sd2": "v", "sdxl": "epsilon"}
FAMILY_SCALING_FACTOR = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
CONTEXT_FAMILIES = {768: ("sd1", "base"), 1024: ("sd2", "base"), 2048: ("sdxl", "base"), 1280: ("sdxl", "refiner")}
YAML_SCALARS = ("parameterization", "scale_factor", "linear_start", "linear_end", "timesteps")
YAML_PREDICTIONS = {"eps": "epsilon", "v": "v"}  # ldm `parameterization`
SGM_SCALINGS = {"EpsScaling": "epsilon", "VScaling": "v", "VScalingWithEDMcNoise": "v"}  # sgm denoiser_scaling
CATEGORY_NAMES = {
    "ema": "model_ema.* not used (EMA bookkeeping; the EMA weights too when EMA is off)",
    "non_ema": "non-EMA UNet weights, replaced by model_ema.*",
    "schedule": "noise-schedule buffers",
    "markers": "marker tensors",
    "buffers": "buffers the modules recompute",
    "unused": "tensors the model does not use",
    "vae_loss": "VAE training loss",
    "unknown": "unknown keys (ignored on request)",
    "replaced_vae": "the checkpoint's own VAE, replaced by the given one",
}


@dataclass(frozen=True)
class TextSlot:
    """Where one text encoder lives in a single file, and in which naming."""

    component: str
    prefix: str
    kind: str  # "hf_clip" (transformers names) or "open_clip"
    with_projection: bool  # keep the OpenCLIP text_projection (SDXL's pooled embedding)


TEXT_LAYOUTS: dict[tuple[str, str], tuple[TextSlot, ...]] = {
    ("sd1", "base"): (TextSlot("text_encoder", "cond_stage_model.transformer.", "hf_clip", False),),
    ("sd2", "base"): (TextSlot("text_encoder", "cond_stage_model.model.", "open_clip", False),),
    ("sdxl", "base"): (
        TextSlot("text_encoder", "conditioner.embedders.0.transformer.", "hf_clip", False),
        TextSlot("text_encoder_2", "conditioner.embedders.1.model.", "open_clip", True),
    ),
    ("sdxl", "refiner"): (TextSlot("text_encoder_2", "conditioner.embedders.0.model.", "open_clip", True),),
}
TEXT_PREFIXES = tuple(sorted({slot.prefix for slots in TEXT_LAYOUTS.values() for slot in slots}))
# Component-relative keys that are buffers or unused, per text naming.
TEXT_IGNORED = {
    "hf_clip": {"text_model.embeddings.position_ids": "buffers", "embeddings.position_ids": "buffers"},
    "open_clip": {"logit_scale": "unused", "attn_mask": "buffers"},
}


@dataclass
class ComponentSource:
    """One component's tensors inside a source: keys relative to `prefix`, renamed by `table`."""

    name: str
    source: TensorSource
    prefix: str
    table: Mapping[str, ModuleRule]
    keys: list[str]
    origin: str
    read_keys: dict[str, str] = field(default_factory=dict)  # relative key -> key actually read (EMA)

    def full_key(self, key: str) -> str:
        return self.read_keys.get(key, self.prefix + key)

    def info(self, key: str) -> TensorInfo:
        return self.source.info(self.full_key(key))


@dataclass
class Detection:
    """Everything decided about one input (see the module docstring)."""

    path: Path
    layout: str  # "single file", "diffusers folder", "converted folder"
    config: Any  # tiengine.models.config.ModelConfig
    components: dict[str, ComponentSource]
    prediction_source: str
    evidence: dict[str, list[str]]
    ignored: dict[str, list[str]]
    extras: dict[str, str]
    ema: dict[str, Any]
    total_keys: int
    sources: list[TensorSource]

    def close(self) -> None:
        for source in self.sources:
            source.close()


def read_ldm_yaml(checkpoint: Path) -> tuple[Path | None, dict[str, str]]:
    """The scalar settings of `<checkpoint stem>.yaml` beside the checkpoint, when there is one.

    Only YAML_SCALARS are read, each at its first occurrence (they appear once under `model.params` in
    every original config), and the class name of a generative-models `denoiser_scaling` target (as
    "denoiser_scaling"); nothing else of the file is interpreted.
    """
    path = checkpoint.with_suffix(".yaml")
    if not path.is_file():
        return None, {}
    found: dict[str, str] = {}
    pattern = re.compile(r"^\s*(" + "|".join(YAML_SCALARS) + r")\s*:\s*[\"']?([^\"'#\s]+)")
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = pattern.match(line)
        if match and match.group(1) not in found:
            found[match.group(1)] = match.group(2)
        scaling = re.search(r"denoiser_scaling\.(\w+)", line)
        if scaling and "denoiser_scaling" not in found:
            found["denoiser_scaling"] = scaling.group(1)
    return path, found


def choose_prediction(
    family: str,
    override: str | None,
    yaml_path: Path | None,
    yaml_values: Mapping[str, str],
    has_v_marker: bool,
    folder_prediction: tuple[str, str] | None = None,
) -> tuple[str, str]:
    """(prediction, how it was decided) by the rule in the module docstring."""
    if override is not None:
        if override not in FAMILY_DEFAULT_PREDICTION.values():
            raise CheckpointError(f"prediction override {override!r}: expected 'epsilon' or 'v'")
        return override, "override"
    if "parameterization" in yaml_values:
        value = yaml_values["parameterization"]
        if value not in YAML_PREDICTIONS:
            raise CheckpointError(f"{yaml_path}: parameterization {value!r} is not one of {sorted(YAML_PREDICTIONS)}")
        return YAML_PREDICTIONS[value], f"parameterization {value!r} in {yaml_path}"
    if "denoiser_scaling" in yaml_values:
        value = yaml_values["denoiser_scaling"]
        if value not in SGM_SCALINGS:
            raise CheckpointError(f"{yaml_path}: denoiser scaling {value!r} is not one of {sorted(SGM_SCALINGS)}")
        return SGM_SCALINGS[value], f"denoiser_scaling {value} in {yaml_path}"
    if yaml_path is not None:
        return "epsilon", f"{yaml_path} has no parameterization (LDM's default is eps)"
    if folder_prediction is not None:
        return folder_prediction
    if has_v_marker:
        return "v", "v_pred marker key"
    default = FAMILY_DEFAULT_PREDICTION[family]
    note = " (SD2 512-base models are epsilon: pass the override)" if family == "sd2" else ""
    return default, f"default for {family}{note}"


def split_by_prefix(keys: list[str], prefix: str) -> list[str]:
    return [key[len(prefix) :] for key in keys if key.startswith(prefix)]


def ema_read_keys(unet_keys: list[str], all_keys: set[str]) -> dict[str, str] | None:
    """{UNet relative key: model_ema key} when every UNet tensor has an EMA copy, else None.

    LitEma stores `model.diffusion_model.X` as `model_ema.` + "diffusion_model.X" without dots.
    """
    mapping = {key: EMA_PREFIX + ("diffusion_model." + key).replace(".", "") for key in unet_keys}
    if unet_keys and all(ema_key in all_keys for ema_key in mapping.values()):
        return mapping
    return None
