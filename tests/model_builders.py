"""Tiny random-weight models of each family, written as converted tiengine folders, for engine tests.

The weights are random (seeded) with perturbed norms so that no output is degenerate; the architecture and
key layout are the real ones at small sizes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file

from tiengine.models.config import ModelConfig
from tiengine.models.text_encoder import ClipTextEncoder, TextEncoderConfig
from tiengine.models.unet import UNet2DConditionModel, UNetConfig
from tiengine.models.vae import AutoencoderKL, VaeConfig


def tiny_encoder(hidden_size: int, **fields) -> TextEncoderConfig:
    return dataclasses.replace(
        TextEncoderConfig.tiny(**fields), hidden_size=hidden_size, intermediate_size=2 * hidden_size
    )


def tiny_model_config(family: str, prediction: str = "epsilon") -> ModelConfig:
    if family == "sd1":
        encoders = {"text_encoder": tiny_encoder(48, num_hidden_layers=3)}
        return ModelConfig("sd1", prediction, encoders, UNetConfig.tiny_sd1(), VaeConfig.tiny())
    if family == "sd2":
        encoders = {
            "text_encoder": tiny_encoder(
                64, hidden_act="gelu", num_hidden_layers=4, pad_token_id=0, output_layer=-2, clip_skip_enabled=False
            )
        }
        return ModelConfig("sd2", prediction, encoders, UNetConfig.tiny_sd2(), VaeConfig.tiny())
    encoders = {
        "text_encoder": tiny_encoder(
            32, num_hidden_layers=3, output_layer=-2, output_final_norm=False, clip_skip_enabled=False
        ),
        "text_encoder_2": tiny_encoder(
            32, hidden_act="gelu", num_hidden_layers=3, projection_dim=32, pad_token_id=0, output_layer=-2,
            output_final_norm=False, clip_skip_enabled=False,
        ),
    }
    return ModelConfig("sdxl", prediction, encoders, UNetConfig.tiny_sdxl(), VaeConfig.tiny())


def build_modules(config: ModelConfig, seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    modules: dict[str, torch.nn.Module] = {
        "unet": UNet2DConditionModel(config.unet),
        "vae": AutoencoderKL(config.vae),
    }
    for name, encoder_config in config.text_encoders.items():
        modules[name] = ClipTextEncoder(encoder_config)
    with torch.no_grad():
        for module in modules.values():
            for sub in module.modules():
                if isinstance(sub, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                    sub.weight.normal_(1.0, 0.2)
                    sub.bias.normal_(0.0, 0.2)
    return modules


def write_model_folder(folder: Path, config: ModelConfig, modules: dict[str, torch.nn.Module]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        tensors = {key: value.detach().contiguous() for key, value in module.state_dict().items()}
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / "config.json").write_text(config.to_json(), encoding="utf-8")
    return folder


def tiny_model_folder(folder: Path, family: str, prediction: str = "epsilon", seed: int = 0) -> Path:
    config = tiny_model_config(family, prediction)
    return write_model_folder(folder, config, build_modules(config, seed))
