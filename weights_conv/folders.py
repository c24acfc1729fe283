"""Model folders (diffusers, converted) and standalone VAE replacement.

diffusers folders (https://huggingface.co/docs/diffusers, "Pipelines > model_index.json"): one
subfolder per component with its config.json and weights, named `diffusion_pytorch_model` (UNet, VAE)
or `model` / `pytorch_model` (transformers text encoders), as `.safetensors` or `.bin`, optionally with
an `.fp16` variant infix or sharded with a `.index.json` weight map. Their names are already tiengine's,
apart from the pre-0.14 VAE attention names and transformers 5's CLIPTextModel without `text_model.`
(see rules.py). The family is read from the components: a `text_encoder_2` means SDXL (refiner when it
has no `text_encoder`), else the text encoder's activation tells OpenAI CLIP (quick_gelu: SD1) from
OpenCLIP (gelu: SD2). The prediction type comes from scheduler/scheduler_config.json.

Converted folders are what `weights-conv convert` writes: config.json (tiengine.models.config) and one
safetensors file per component, loaded by identity.

A replacement VAE (`*.vae.safetensors`, `*.vae.pt`, a full checkpoint's `first_stage_model.*`, a VAE
file in diffusers names, or a diffusers `vae/` folder) takes the place of the model's own; its latent
scaling is the model family's unless its diffusers config.json says otherwise.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tiengine.errors import CheckpointError
from tiengine.models.config import COMPONENT_NAMES, ModelConfig, ScheduleConfig, read_model_config
from tiengine.models.vae import VaeConfig

from . import detect
from .layouts import (
    EMA_PREFIX,
    FAMILY_DEFAULT_PREDICTION,
    VAE_LOSS_PREFIX,
    VAE_PREFIX,
    ComponentSource,
    Detection,
    TextSlot,
    choose_prediction,
)
from .readers import MergedSource, TensorSource, open_tensor_file
from .rules import diffusers_vae_module_table, hf_clip_module_table, identity_table, vae_module_table
from .sources import (
    DIFFUSERS_WEIGHT_NAMES,
    SCHEDULER_PREDICTIONS,
    check_family,
    drop_text_ignored,
    read_json,
    text_encoder_config,
    unet_config,
    vae_config,
)

# Keys of a full SD checkpoint that a VAE taken from it does not use.
FULL_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.", "model_ema.")


def open_diffusers_weights(folder: Path, component: str) -> TensorSource:
    """The weights of one diffusers component folder (first match of: plain before `.fp16`, safetensors
    before `.bin`, a single file before a sharded index)."""
    tried = []
    for variant in ("", ".fp16"):
        for stem in DIFFUSERS_WEIGHT_NAMES[component]:
            for extension in (".safetensors", ".bin"):
                name = f"{stem}{variant}{extension}"
                tried.append(name)
                if (folder / name).is_file():
                    return open_tensor_file(folder / name)
                index = folder / f"{name}.index.json"
                if index.is_file():
                    return _open_sharded(index)
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(tried)} and their .index.json)")


def _open_sharded(index: Path) -> TensorSource:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no 'weight_map' of tensor name -> shard file")
    shards = sorted(set(weight_map.values()))
    opened: list[TensorSource] = []
    try:
        for shard in shards:
            opened.append(open_tensor_file(index.parent / shard))
        return MergedSource(index, opened)
    except BaseException:
        for source in opened:
            source.close()
        raise


def open_diffusers_folder(
    path: Path, *, family: str | None, prediction: str | None, has_vae_override: bool = False
) -> Detection:
    model_index = read_json(path / "model_index.json")
    present = [name for name in COMPONENT_NAMES if isinstance(model_index.get(name), list) and model_index[name][0]]
    required = ["unet"] + ([] if has_vae_override else ["vae"])
    missing = [name for name in required if name not in present]
    if not any(name.startswith("text_encoder") for name in present):
        missing.append("text_encoder")
    if missing:
        raise CheckpointError(f"{path}: missing component {', '.join(missing)} in model_index.json (has {present})")

    evidence: dict[str, list[str]] = {"family": []}
    text_configs = {name: read_json(path / name / "config.json") for name in present if name.startswith("text_encoder")}
    if "text_encoder_2" in text_configs:
        detected, variant = "sdxl", ("base" if "text_encoder" in text_configs else "refiner")
        evidence["family"].append("model_index.json lists text_encoder_2")
    else:
        activation = text_configs["text_encoder"].get("hidden_act")
        detected, variant = {"quick_gelu": ("sd1", "base"), "gelu": ("sd2", "base")}.get(activation, (None, None))
        if detected is None:
            raise CheckpointError(f"{path}/text_encoder/config.json: hidden_act {activation!r} is neither CLIP-L's "
                                  "quick_gelu (SD1) nor OpenCLIP's gelu (SD2)")  # fmt: skip
        evidence["family"].append(
            f"text_encoder hidden_act {activation} ({'OpenAI CLIP' if detected == 'sd1' else 'OpenCLIP'})"
        )
    check_family(family, detected, evidence["family"][0])

    scheduler_path = path / "scheduler" / "scheduler_config.json"
    scheduler = read_json(scheduler_path) if scheduler_path.is_file() else {}
    if prediction is not None:
        chosen, prediction_source = choose_prediction(detected, prediction, None, {}, False)
    elif "prediction_type" in scheduler:
        value = scheduler["prediction_type"]
        if value not in SCHEDULER_PREDICTIONS:
            raise CheckpointError(
                f"{scheduler_path}: prediction_type {value!r} is not one of {sorted(SCHEDULER_PREDICTIONS)}"
            )
        chosen, prediction_source = SCHEDULER_PREDICTIONS[value], f"prediction_type {value!r} in {scheduler_path}"
    else:
        chosen, prediction_source = FAMILY_DEFAULT_PREDICTION[detected], f"default for {detected}"

    sources: list[TensorSource] = []
    components: dict[str, ComponentSource] = {}
    ignored: dict[str, list[str]] = {}
    try:
        for name in present:
            source = open_diffusers_weights(path / name, name)
            sources.append(source)
            table = {"unet": identity_table(), "vae": diffusers_vae_module_table()}.get(name, hf_clip_module_table())
            keys = source.keys()
            if name.startswith("text_encoder"):
                keys = drop_text_ignored(TextSlot(name, "", "hf_clip", True), keys, ignored)
            components[name] = ComponentSource(name, source, "", table, keys, f"{path / name}")
        unet_dict = read_json(path / "unet" / "config.json")
        unet_cfg = unet_config(unet_dict, detected, chosen)
        schedule_keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
        schedule = {key: scheduler[key] for key in schedule_keys if key in scheduler}
        # Without a vae/ folder (a replacement VAE was given) the SD VAE config stands in until replace_vae.
        vae_dict = read_json(path / "vae" / "config.json") if "vae" in present else VaeConfig.sd().to_diffusers()
        config = ModelConfig(
            detected,
            chosen,
            {name: text_encoder_config(detected, name, cfg, full_tower=False) for name, cfg in text_configs.items()},
            unet_cfg,
            vae_config(vae_dict, detected),
            ScheduleConfig(**schedule),
            variant,
        )
    except BaseException:
        for source in sources:
            source.close()
        raise
    for name in present:
        evidence.setdefault(name, []).append(f"{path / name}/config.json")
    total = sum(len(source.keys()) for source in sources)
    ema = {"present": False, "used": False, "tensors": 0}
    return Detection(
        path, "diffusers folder", config, components, prediction_source, evidence, ignored, {}, ema, total, sources
    )


def open_converted_folder(path: Path, *, family: str | None, prediction: str | None) -> Detection:
    config = read_model_config(path)
    check_family(family, config.family, f"{path}/config.json says family {config.family!r}")
    prediction_source = f"{path}/config.json"
    if prediction is not None:
        chosen, prediction_source = choose_prediction(config.family, prediction, None, {}, False)
        config = dataclasses.replace(config, prediction=chosen)
    sources: list[TensorSource] = []
    components: dict[str, ComponentSource] = {}
    try:
        for name in config.components:
            file = path / f"{name}.safetensors"
            if not file.is_file():
                raise CheckpointError(f"{path}: missing component {name} ({file.name} not found)")
            source = open_tensor_file(file)
            sources.append(source)
            components[name] = ComponentSource(name, source, "", identity_table(), source.keys(), str(file))
    except BaseException:
        for source in sources:
            source.close()
        raise
    total = sum(len(source.keys()) for source in sources)
    ema = {"present": False, "used": False, "tensors": 0}
    evidence = {"family": [f"{path}/config.json"]}
    return Detection(
        path, "converted folder", config, components, prediction_source, evidence, {}, {}, ema, total, sources
    )


def replace_vae(detection: Detection, vae_path: Path) -> None:
    """Install a standalone VAE as `detection`'s "vae" component (see the module docstring)."""
    family = detection.config.family
    old = detection.components.get("vae")
    if vae_path.is_dir():
        config_json = read_json(vae_path / "config.json")
        source = open_diffusers_weights(vae_path, "vae")
        component = ComponentSource("vae", source, "", diffusers_vae_module_table(), source.keys(), str(vae_path))
        config = vae_config(config_json, family)
        evidence = [f"{vae_path}/config.json"]
        ignored: dict[str, list[str]] = {}
    else:
        source = open_tensor_file(vae_path)
        try:
            component, config, evidence, ignored = _vae_file_component(source, vae_path, family)
        except BaseException:
            source.close()
            raise
    detection.sources.append(source)
    detection.total_keys += len(source.keys())
    if old is not None:
        detection.ignored.setdefault("replaced_vae", []).extend(old.prefix + key for key in old.keys)
    for category, keys in ignored.items():
        detection.ignored.setdefault(category, []).extend(f"{vae_path.name}:{key}" for key in keys)
    detection.components["vae"] = component
    detection.evidence["vae"] = [f"replaced by {vae_path}", *evidence]
    detection.config = dataclasses.replace(detection.config, vae=config)


def _vae_file_component(
    source: TensorSource, path: Path, family: str
) -> tuple[ComponentSource, Any, list[str], dict[str, list[str]]]:
    keys = source.keys()
    prefix = VAE_PREFIX if any(key.startswith(VAE_PREFIX) for key in keys) else ""
    relative, ignored, unknown = [], {}, []
    for key in keys:
        if prefix and key.startswith(prefix):
            relative.append(key[len(prefix) :])
        elif not prefix and key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
            relative.append(key)
        elif key.startswith(VAE_LOSS_PREFIX):
            ignored.setdefault("vae_loss", []).append(key)
        elif key.startswith(EMA_PREFIX):
            ignored.setdefault("ema", []).append(key)
        elif prefix and key.startswith(FULL_CHECKPOINT_PREFIXES):
            ignored.setdefault("unused", []).append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} keys that are not part of a VAE: " + ", ".join(sorted(unknown)))
    infos = {key: source.info(prefix + key) for key in relative}
    if any(key.startswith("encoder.down_blocks.") for key in relative):
        arch, evidence = detect.detect_diffusers_vae(infos, str(path))
        table = diffusers_vae_module_table()
    elif any(key.startswith("encoder.down.") for key in relative):
        arch, evidence = detect.detect_ldm_vae(infos, str(path))
        config = vae_config(arch, family)
        table = vae_module_table(len(config.block_out_channels), config.layers_per_block)
    else:
        raise CheckpointError(
            f"{path}: no VAE encoder found (expected encoder.down.N.* in LDM names or encoder.down_blocks.N.* in "
            f"diffusers names, optionally under first_stage_model.); {len(keys)} keys"
        )
    config = vae_config(arch, family)
    return ComponentSource("vae", source, prefix, table, relative, str(path)), config, evidence, ignored
