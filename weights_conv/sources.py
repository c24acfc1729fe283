"""Open any supported input and detect it: single files, diffusers folders, converted folders, VAEs.

`open_input` dispatches on what the path is; each opener returns a `layouts.Detection` whose
`ModelConfig` combines the detected architecture (tiengine.weights_conv.detect) with the family's
conventions from the config presets (how Stable Diffusion reads each text encoder, VAE scaling).
Layout tables, ignore rules and the prediction-type rule are documented in `layouts`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tiengine.errors import CheckpointError
from tiengine.io.limits import MAX_NESTING_DEPTH, json_nesting_depth
from tiengine.models.config import ModelConfig, ScheduleConfig
from tiengine.models.text_encoder import TextEncoderConfig
from tiengine.models.unet import UNetConfig
from tiengine.models.vae import VaeConfig

from . import detect
from .layouts import (
    CONTEXT_FAMILIES,
    EMA_BOOKKEEPING,
    EMA_PREFIX,
    FAMILY_SCALING_FACTOR,
    MARKER_KEYS,
    SCHEDULE_BUFFERS,
    TEXT_IGNORED,
    TEXT_LAYOUTS,
    TEXT_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    ComponentSource,
    Detection,
    TextSlot,
    choose_prediction,
    ema_read_keys,
    read_ldm_yaml,
    split_by_prefix,
)
from .readers import TensorSource, open_tensor_file
from .rules import hf_clip_module_table, open_clip_module_table, unet_module_table, vae_module_table

# (family, component) -> preset giving how Stable Diffusion reads that encoder
TEXT_PRESETS = {
    ("sd1", "text_encoder"): TextEncoderConfig.sd1_clip_l,
    ("sd2", "text_encoder"): lambda: TextEncoderConfig.sd2_openclip_h(24),
    ("sdxl", "text_encoder"): TextEncoderConfig.sdxl_clip_l,
    ("sdxl", "text_encoder_2"): TextEncoderConfig.sdxl_openclip_bigg,
}
READING_FIELDS = ("pad_token_id", "eos_token_id", "output_layer", "output_final_norm", "clip_skip_enabled")
SAMPLE_SIZES = {"sd1": 64, "sd2": 64, "sdxl": 128}  # latent side; SD2 768-v: 96
DIFFUSERS_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),
}
SCHEDULER_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v"}


def text_encoder_config(family: str, component: str, arch: Mapping[str, Any], *, full_tower: bool) -> TextEncoderConfig:
    """Architecture from the weights / config.json, reading fields from the family preset. SD2's
    context is layer 23 of OpenCLIP-H: index -2 of a full 24-layer tower (single files), -1 of the
    23-layer tower diffusers folders keep."""
    preset = TEXT_PRESETS[(family, component)]()
    reading = {name: getattr(preset, name) for name in READING_FIELDS}
    if family == "sd2":
        reading["output_layer"] = -2 if full_tower else -1
    return TextEncoderConfig.from_hf(dict(arch), **reading)


def unet_config(arch: dict[str, Any], family: str, prediction: str) -> UNetConfig:
    """diffusers dict + family numerics (SD2 upcasts attention) and training resolution."""
    arch = dict(arch)
    arch.setdefault("upcast_attention", family == "sd2")
    arch.setdefault("sample_size", 96 if (family, prediction) == ("sd2", "v") else SAMPLE_SIZES[family])
    return UNetConfig.from_diffusers(arch)


def vae_config(arch: dict[str, Any], family: str, scaling_factor: float | None = None) -> VaeConfig:
    arch = dict(arch)
    arch.setdefault("scaling_factor", scaling_factor or FAMILY_SCALING_FACTOR[family])
    arch.setdefault("sample_size", 1024 if family == "sdxl" else 512)
    return VaeConfig.from_diffusers(arch)


def check_family(override: str | None, detected: str, why: str) -> None:
    if override is not None and override != detected:
        raise CheckpointError(f"family override {override!r} contradicts the checkpoint, which is {detected}: {why}")


def _infos(source: TensorSource, prefix: str, keys: list[str]) -> dict[str, Any]:
    return {key: source.info(prefix + key) for key in keys}


def read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        if json_nesting_depth(text, MAX_NESTING_DEPTH) > MAX_NESTING_DEPTH:
            raise CheckpointError(f"{path}: JSON nests deeper than {MAX_NESTING_DEPTH} levels; refused")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# Single files -------------------------------------------------------------------------------------


def open_single_file(
    path: Path,
    *,
    family: str | None,
    prediction: str | None,
    ema: bool,
    ignore_unknown: bool,
    has_vae_override: bool = False,
) -> Detection:
    source = open_tensor_file(path)
    try:
        return _detect_single_file(source, path, family, prediction, ema, ignore_unknown, has_vae_override)
    except BaseException:
        source.close()
        raise


def _detect_single_file(
    source: TensorSource,
    path: Path,
    family_override: str | None,
    prediction_override: str | None,
    use_ema: bool,
    ignore_unknown: bool,
    has_vae_override: bool,
) -> Detection:
    keys = source.keys()
    key_set = set(keys)
    ignored: dict[str, list[str]] = {}
    unknown: list[str] = []
    ema_keys: list[str] = []
    for key in keys:
        if key.startswith((UNET_PREFIX, VAE_PREFIX, *TEXT_PREFIXES)):
            continue
        if key.startswith(EMA_PREFIX):
            ema_keys.append(key)
        elif key in SCHEDULE_BUFFERS:
            ignored.setdefault("schedule", []).append(key)
        elif key in MARKER_KEYS:
            ignored.setdefault("markers", []).append(key)
        else:
            unknown.append(key)

    unet_keys = split_by_prefix(keys, UNET_PREFIX)
    vae_keys = split_by_prefix(keys, VAE_PREFIX)
    text_present = {prefix for prefix in TEXT_PREFIXES if any(key.startswith(prefix) for key in keys)}
    recognised = (
        f"recognised: {len(unet_keys)} UNet keys (model.diffusion_model.*), {len(vae_keys)} VAE keys "
        f"(first_stage_model.*), text encoder prefixes {sorted(text_present) or 'none'}, {len(ema_keys)} "
        f"model_ema.* keys, {len(keys) - len(unet_keys) - len(vae_keys) - len(ema_keys)} other keys"
    )
    evidence: dict[str, list[str]] = {"family": []}

    # Family and variant: the text-encoder layout (the one whose prefixes include those present), else
    # the UNet's context width.
    candidates = [fv for fv, slots in TEXT_LAYOUTS.items() if text_present <= {s.prefix for s in slots}]
    layout = candidates[0] if text_present and len(candidates) == 1 else None
    unet_arch: dict[str, Any] | None = None
    if unet_keys:
        unet_arch, evidence["unet"] = detect.detect_ldm_unet(_infos(source, UNET_PREFIX, unet_keys), f"{path} (UNet)")
    if layout is not None:
        evidence["family"].append(f"text encoders under {sorted(text_present)}")
    elif text_present:
        raise CheckpointError(
            f"{path}: text encoder keys under {sorted(text_present)} match no known layout (expected one of "
            + "; ".join(f"{f} {v}: {[s.prefix for s in slots]}" for (f, v), slots in TEXT_LAYOUTS.items())
            + f"); {recognised}"
        )
    elif unet_arch is not None and unet_arch["cross_attention_dim"] in CONTEXT_FAMILIES:
        layout = CONTEXT_FAMILIES[unet_arch["cross_attention_dim"]]
        evidence["family"].append(f"UNet context width {unet_arch['cross_attention_dim']} (no text encoder keys)")
    elif unet_arch is not None:
        raise CheckpointError(
            f"{path}: missing component text_encoder (no keys under any of {list(TEXT_PREFIXES)}), and the UNet's "
            f"context width {unet_arch['cross_attention_dim']} names no family; {recognised}"
        )
    else:
        hint = ""
        if vae_keys or any(key.startswith("encoder.") for key in keys):
            hint = " It looks like a standalone VAE: pass it as the VAE of a model (vae=... / --vae)."
        elif any(key.startswith("lora_") for key in keys):
            hint = " It looks like a LoRA, not a model."
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint of a known family; {recognised}.{hint}")
    family, variant = layout
    check_family(family_override, family, "; ".join(evidence["family"]))
    if unet_arch is None:
        raise CheckpointError(f"{path}: missing component unet (no model.diffusion_model.* keys); {recognised}")
    evidence["unet"].append(detect.set_unet_heads(unet_arch, family))
    for slot in TEXT_LAYOUTS[layout]:
        if slot.prefix not in text_present:
            raise CheckpointError(
                f"{path}: missing component {slot.component} of this {family} checkpoint (no {slot.prefix}* keys); "
                f"{recognised}"
            )
    if not vae_keys and not has_vae_override:
        raise CheckpointError(
            f"{path}: missing component vae (no first_stage_model.* keys); pass a VAE file (vae=... / --vae); "
            f"{recognised}"
        )
    if unknown and not ignore_unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} unknown keys (not part of any {family} component, EMA, or schedule): "
            + ", ".join(sorted(unknown))
        )
    if unknown:
        ignored["unknown"] = unknown

    yaml_path, yaml_values = read_ldm_yaml(path)
    chosen, prediction_source = choose_prediction(
        family, prediction_override, yaml_path, yaml_values, "v_pred" in key_set
    )

    # EMA: LitEma copies of every UNet tensor.
    ema_map = ema_read_keys(unet_keys, key_set) if ema_keys else None
    if ema_map is not None and use_ema:
        ignored["non_ema"] = [UNET_PREFIX + key for key in unet_keys]
        used = set(ema_map.values())
        ignored.setdefault("ema", []).extend(k for k in ema_keys if k not in used)
        unet_origin = "model_ema.* (EMA weights)"
    else:
        ignored.setdefault("ema", []).extend(ema_keys)
        unet_origin = UNET_PREFIX + "*"
    ema_info = {
        "present": ema_map is not None,
        "used": ema_map is not None and use_ema,
        "tensors": len([k for k in ema_keys if k not in EMA_BOOKKEEPING]),
    }
    if ema_keys and ema_map is None:
        evidence["unet"].append(f"{len(ema_keys)} model_ema.* keys do not cover every UNet tensor: not used")

    # Text encoders.
    text_configs: dict[str, TextEncoderConfig] = {}
    components: dict[str, ComponentSource] = {}
    for slot in TEXT_LAYOUTS[layout]:
        relative = split_by_prefix(keys, slot.prefix)
        kept = drop_text_ignored(slot, relative, ignored)
        infos = _infos(source, slot.prefix, kept)
        if slot.kind == "hf_clip":
            arch, evidence[slot.component] = detect.detect_hf_clip(
                infos, f"{path} ({slot.component})", hidden_act="quick_gelu"
            )
            table = hf_clip_module_table()
        else:
            arch, evidence[slot.component] = detect.detect_open_clip(infos, f"{path} ({slot.component})")
            table = open_clip_module_table(arch["num_hidden_layers"], slot.with_projection)
        text_configs[slot.component] = text_encoder_config(family, slot.component, arch, full_tower=True)
        components[slot.component] = ComponentSource(
            slot.component, source, slot.prefix, table, kept, slot.prefix + "*"
        )

    scaling = float(yaml_values["scale_factor"]) if "scale_factor" in yaml_values else None
    vae_cfg = None
    if vae_keys:
        vae_arch, evidence["vae"] = detect.detect_ldm_vae(_infos(source, VAE_PREFIX, vae_keys), f"{path} (VAE)")
        vae_cfg = vae_config(vae_arch, family, scaling)
        components["vae"] = ComponentSource(
            "vae", source, VAE_PREFIX, vae_module_table(len(vae_cfg.block_out_channels), vae_cfg.layers_per_block),
            vae_keys, VAE_PREFIX + "*",
        )  # fmt: skip
    unet_cfg = unet_config(unet_arch, family, chosen)
    components["unet"] = ComponentSource(
        "unet", source, UNET_PREFIX, _unet_table(unet_cfg), unet_keys, unet_origin,
        read_keys=ema_map if (ema_map is not None and use_ema) else {},
    )  # fmt: skip
    schedule = ScheduleConfig(
        num_train_timesteps=int(yaml_values.get("timesteps", 1000)),
        beta_start=float(yaml_values.get("linear_start", 0.00085)),
        beta_end=float(yaml_values.get("linear_end", 0.012)),
    )
    # Without VAE keys (a replacement VAE was given) the SD VAE config stands in until replace_vae.
    config = ModelConfig(
        family,
        chosen,
        text_configs,
        unet_cfg,
        vae_cfg or vae_config(VaeConfig.sd().to_diffusers(), family),
        schedule,
        variant,
    )
    extras = source.extras | {f"metadata.{key}": value[:200] for key, value in source.metadata.items()}
    return Detection(
        path, "single file", config, components, prediction_source, evidence, ignored, extras,
        ema_info, len(keys), [source],
    )  # fmt: skip


def _unet_table(config: UNetConfig) -> dict[str, Any]:
    return unet_module_table(
        config.layers_per_block,
        [kind.startswith("CrossAttn") for kind in config.down_block_types],
        [kind.startswith("CrossAttn") for kind in config.up_block_types],
        config.addition_embed_type == "text_time",
    )


def drop_text_ignored(slot: TextSlot, relative: list[str], ignored: dict[str, list[str]]) -> list[str]:
    kept = []
    for key in relative:
        category = TEXT_IGNORED[slot.kind].get(key)
        if category is None and slot.kind == "open_clip" and key == "text_projection" and not slot.with_projection:
            category = "unused"
        if category is None:
            kept.append(key)
        else:
            ignored.setdefault(category, []).append(slot.prefix + key)
    return kept
