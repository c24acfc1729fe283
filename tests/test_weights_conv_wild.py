"""weights_conv against the real model configs in the `wild` folder (skipped when it is absent).

- Detection from shapes: the real diffusers configs (SD1.5, SD2.1 base and 768-v, SDXL base) are built on
  the meta device, laid out in the single-file names by the tests' inverse mapping, and detected back;
  the architecture must equal the real config's.
- Sizes: the published single files' sizes (from their Git LFS pointers) must equal our converted
  parameter count times the file's element size, plus the tensors we ignore and the header (< 1 MB).
- The original .yaml configs give the prediction type and scale factor.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_weights_conv import diffusers, ldm_unet_name, ldm_vae_name, open_clip_state, transformers
from tiengine.weights_conv import detect
from tiengine.weights_conv.layouts import choose_prediction, read_ldm_yaml
from tiengine.weights_conv.readers import TensorInfo

from tiengine.models.config import ModelConfig
from tiengine.models.text_encoder import TextEncoderConfig
from tiengine.models.unet import UNetConfig
from tiengine.models.vae import VaeConfig

FOLDERS = {
    "sd15_runwayml_mirror_HDRJ-One": "sd1",
    "sd21_base_mirror_jack-op11": "sd2",
    "sd21_768v_flax_branch_mirror_Vikas-2025": "sd2",
    "sdxl_base_1.0_mirror_HDRJ-One": "sdxl",
}


def _config(path: Path) -> dict:
    return json.loads(path.read_text())


def _infos(state: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {key: TensorInfo(value.dtype, tuple(value.shape)) for key, value in state.items()}


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_detection_reproduces_real_configs(wild_dir, folder):
    root = wild_dir / "models" / folder
    family = FOLDERS[folder]
    unet_json = _config(root / "unet" / "config.json")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(unet_json)
        vae = diffusers.AutoencoderKL.from_config(_config(root / "vae" / "config.json"))
    ldm_unet = {ldm_unet_name(k, unet_json): v for k, v in unet.state_dict().items()}
    detected, evidence = detect.detect_ldm_unet(_infos(ldm_unet), folder)
    evidence.append(detect.set_unet_heads(detected, family))
    ours, real = UNetConfig.from_diffusers(detected), UNetConfig.from_diffusers(unet_json)
    fields = ("block_out_channels", "down_block_types", "up_block_types", "num_attention_heads",
              "transformer_layers_per_block", "cross_attention_dim", "layers_per_block", "use_linear_projection",
              "addition_embed_type", "projection_class_embeddings_input_dim", "in_channels",
              "out_channels")  # fmt: skip
    for field in fields:
        assert getattr(ours, field) == getattr(real, field), (folder, field, evidence)

    ldm_vae = {}
    for key, value in vae.state_dict().items():
        name, as_conv = ldm_vae_name(key, 4)
        ldm_vae[name] = torch.empty((*value.shape, 1, 1), device="meta") if as_conv else value
    detected_vae, _ = detect.detect_ldm_vae(_infos(ldm_vae), folder)
    real_vae = VaeConfig.from_diffusers(_config(root / "vae" / "config.json"))
    assert VaeConfig.from_diffusers(detected_vae | {"scaling_factor": real_vae.scaling_factor}).to_dict() == (
        real_vae.to_dict() | {"sample_size": VaeConfig().sample_size, "force_upcast": True}
    )

    for name in ("text_encoder", "text_encoder_2"):
        if not (root / name).is_dir():
            continue
        real_text = _config(root / name / "config.json")
        hf = transformers.CLIPTextConfig(**{k: v for k, v in real_text.items() if not k.startswith("_")})
        open_clip = real_text["hidden_act"] == "gelu"
        if family == "sd2":
            hf.num_hidden_layers += 1  # single files keep OpenCLIP-H's 24th layer
        with torch.device("meta"):
            model = (
                transformers.CLIPTextModelWithProjection if name == "text_encoder_2" else transformers.CLIPTextModel
            )(hf)
        state = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
                 for k, v in model.state_dict().items()}  # fmt: skip
        if open_clip:
            state.setdefault("text_projection.weight", torch.empty(hf.hidden_size, hf.hidden_size, device="meta"))
            arch, _ = detect.detect_open_clip(_infos(open_clip_state(state, None)), folder)
        else:
            arch, _ = detect.detect_hf_clip(_infos(state), folder, hidden_act="quick_gelu")
        assert arch["hidden_act"] == real_text["hidden_act"]
        for field in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "vocab_size",
            "max_position_embeddings",
        ):
            assert arch[field] == real_text[field], (folder, name, field)
        assert arch["num_hidden_layers"] == hf.num_hidden_layers


def _pointer_size(path: Path) -> int:
    return int(re.search(r"^size (\d+)$", path.read_text(), re.M).group(1))


@pytest.mark.parametrize(
    "pointer,config,itemsize,extra_params",
    [
        # v1-5-pruned-emaonly: fp32; 12 schedule buffers of 1000 float32 are not model weights
        ("sd15_runwayml_mirror_HDRJ-One/v1-5-pruned-emaonly.safetensors", ModelConfig.sd15(), 4, 0),
        # SD 2.1: fp32; OpenCLIP's unused text_projection (1024 x 1024) and logit_scale
        (
            "sd21_768v_flax_branch_mirror_Vikas-2025/v2-1_768-ema-pruned.safetensors",
            ModelConfig.sd21_v(),
            4,
            1024 * 1024 + 1,
        ),
        ("sdxl_base_1.0_mirror_HDRJ-One/sd_xl_base_1.0.safetensors", ModelConfig.sdxl_base(), 2, 0),
    ],
)
def test_converted_parameter_counts_match_published_file_sizes(wild_dir, pointer, config, itemsize, extra_params):
    from tiengine.weights_conv.convert import empty_module

    size = _pointer_size(wild_dir / "models" / f"{pointer}.lfs-pointer")
    modules = [empty_module(name, config, device="meta", dtype=None) for name in config.components]
    params = sum(p.numel() for module in modules for p in module.parameters())
    rest = size - itemsize * (params + extra_params)
    assert 0 < rest < 1_000_000, f"{pointer}: {size} bytes, {params} parameters leave {rest} bytes"


@pytest.mark.parametrize(
    "yaml,prediction,scale",
    [
        ("v1-inference.yaml_from_runwayml_sd15_mirror", "epsilon", "0.18215"),
        ("Stability-AI_stablediffusion/v2-inference.yaml", "epsilon", "0.18215"),
        ("Stability-AI_stablediffusion/v2-inference-v.yaml", "v", "0.18215"),
        ("Stability-AI_generative-models/sd_2_1_768.yaml", "v", "0.18215"),
        ("Stability-AI_generative-models/sd_2_1.yaml", "epsilon", "0.18215"),
        ("Stability-AI_generative-models/sd_xl_base.yaml", "epsilon", "0.13025"),
        ("Stability-AI_generative-models/sd_xl_refiner.yaml", "epsilon", "0.13025"),
    ],
)
def test_real_yaml_configs_give_prediction_and_scale(wild_dir, tmp_path, yaml, prediction, scale):
    shutil.copy(wild_dir / "ldm_configs" / yaml, tmp_path / "model.yaml")
    path, values = read_ldm_yaml(tmp_path / "model.safetensors")
    assert path == tmp_path / "model.yaml"
    assert values["scale_factor"] == scale
    assert choose_prediction("sd2", None, path, values, False)[0] == prediction


def test_wild_text_encoder_configs_load_with_sd_reading(wild_dir):
    """SD2 diffusers folders keep 23 layers: read at the last one, through the final norm."""
    from tiengine.weights_conv.sources import text_encoder_config

    real = _config(wild_dir / "models" / "sd21_base_mirror_jack-op11" / "text_encoder" / "config.json")
    config = text_encoder_config("sd2", "text_encoder", real, full_tower=False)
    assert config == TextEncoderConfig.sd2_openclip_h(23)
    bigg = _config(wild_dir / "models" / "sdxl_base_1.0_mirror_HDRJ-One" / "text_encoder_2" / "config.json")
    assert (
        text_encoder_config("sdxl", "text_encoder_2", bigg, full_tower=False) == TextEncoderConfig.sdxl_openclip_bigg()
    )
