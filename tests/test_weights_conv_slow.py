"""Full-size SD1.5 round trip: a random fp16 checkpoint of the real architecture (2.1 GB), written in the
original single-file layout by the tests' independent inverse mapping and safetensors' own writer,
converted to a tiengine folder, read back with safetensors' reader and compared bit for bit.

The detected config must equal the published SD1.5 presets, and the key sets the real model's.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_weights_conv import SCHEDULE_BUFFERS, assert_bit_equal, diffusers, ldm_unet_name, ldm_vae_name, transformers
from tiengine.weights_conv import open_model

from tiengine.models.config import ModelConfig

# runwayml/stable-diffusion-v1-5 unet/config.json and text_encoder/config.json (architecture fields)
SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64)  # fmt: skip
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, hidden_act="quick_gelu", max_position_embeddings=77)  # fmt: skip


def random_fp16(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random fp16 values for every tensor of a model built on the meta device."""
    return {
        key: torch.randn(value.shape, generator=generator, dtype=torch.float16)
        for key, value in model.state_dict().items()
        if not key.endswith("position_ids")
    }


@pytest.mark.slow
def test_full_size_sd15_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SD15_UNET)
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_CLIP))
    states = {
        "unet": random_fp16(unet, generator),
        "vae": random_fp16(vae, generator),
        "text_encoder": {f"text_model.{k}": v for k, v in random_fp16(text, generator).items()},
    }
    ldm = {f"model.diffusion_model.{ldm_unet_name(k, SD15_UNET)}": v for k, v in states["unet"].items()}
    for key, value in states["vae"].items():
        name, as_conv = ldm_vae_name(key, 4)
        ldm[f"first_stage_model.{name}"] = value[:, :, None, None] if as_conv else value
    ldm |= {f"cond_stage_model.transformer.{k}": v for k, v in states["text_encoder"].items()}
    ldm |= {name: torch.rand(1000) for name in SCHEDULE_BUFFERS}
    ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "v1-5-random.safetensors"
    save_file(ldm, str(path))
    del ldm

    with open_model(path) as model:
        assert model.config == ModelConfig.sd15()
        report = model.inspect()
        model.write_folder(tmp_path / "converted")
    assert report["problems"] == []
    assert report["components"]["unet"]["params"] == 859_520_964  # published SD1.5 UNet size
    assert report["components"]["text_encoder"]["params"] == 123_060_480
    assert report["components"]["vae"]["params"] == 83_653_863
    for name, state in states.items():
        written = load_file(tmp_path / "converted" / f"{name}.safetensors")
        assert_bit_equal(written, state, f"full-size {name}")
        del written
