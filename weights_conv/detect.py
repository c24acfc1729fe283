"""Architecture detection from tensor names and shapes (no tensor data is read).

Each `detect_*` function takes {component-relative key: TensorInfo} of one component in one layout and
returns (config dict in diffusers / transformers config.json names, evidence lines). The evidence says
which tensor gave which value, for `weights-conv inspect`.

What the weights decide, and how:
- UNet (LDM `UNetModel`): `input_blocks.0.0.weight` (C, in, 3, 3) gives model channels and input
  channels; the ResBlocks' `out_layers.3.weight` give each level's channels; `input_blocks.N.0.op`
  (Downsample) separates levels, so levels and `layers_per_block` follow from the block count;
  `input_blocks.N.1.proj_in` marks a level with cross-attention; the number of
  `transformer_blocks.K` gives the transformer depth per level; `proj_in` being 2-D gives
  `use_linear_projection`; `attn2.to_k.weight` (C, ctx) gives the context width; `label_emb.0.0.weight`
  (T, adm) gives SDXL's added text/time embedding input width.
- VAE (LDM `Encoder`/`Decoder`): `encoder.conv_in.weight` (C, in, 3, 3), the count of `encoder.down.N`
  levels and `block.M` resnets, each level's `block.0.conv2.weight` channels, `decoder.conv_in.weight`
  (C, z, 3, 3) for the latent channels, `decoder.conv_out.weight` (out, C, 3, 3).
- CLIP text towers: token embedding (vocab, D), position embedding (T, D), the number of layers,
  `fc1`/`c_fc` (4D, D) for the MLP width, and a text projection when present.

What the weights cannot say, and where it comes from instead (family conventions of the original
configs v1-inference.yaml, v2-inference(-v).yaml, sd_xl_base.yaml): the attention head layout (SD1: 8
heads; SD2/SDXL: 64-channel heads), the text activation (OpenAI CLIP-L: quick_gelu; OpenCLIP: gelu),
GroupNorm groups (32), the VAE scaling factor (0.18215; SDXL 0.13025), SDXL's time-id embedding width
(256). Attention heads are never read from shapes: a head count does not change any tensor's shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tiengine.errors import CheckpointError

from .readers import TensorInfo

Infos = Mapping[str, TensorInfo]
Detected = tuple[dict[str, Any], list[str]]

GROUP_NORM_GROUPS = 32  # every SD UNet and VAE
HEAD_CHANNELS = 64  # SD2/SDXL `num_head_channels`
SD1_HEADS = 8  # SD1 `num_heads`
SDXL_TIME_EMBED_DIM = 256  # sd_xl_base.yaml ConcatTimestepEmbedderND outdim


def _require(infos: Infos, key: str, where: str, ndim: int | None = None) -> TensorInfo:
    info = infos.get(key)
    if info is None:
        raise CheckpointError(f"{where}: missing tensor {key!r}, needed to detect the architecture")
    if ndim is not None and len(info.shape) != ndim:
        raise CheckpointError(f"{where}: tensor {key!r} has shape {list(info.shape)}, expected {ndim} dimensions")
    return info


def _indices(infos: Infos, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (a regex with one group) over the keys."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in infos if (m := regex.match(key))})


def detect_ldm_unet(infos: Infos, where: str) -> Detected:
    """LDM UNetModel -> diffusers UNet2DConditionModel config, without the heads (`set_unet_heads`)."""
    evidence: list[str] = []
    conv_in = _require(infos, "input_blocks.0.0.weight", where, 4)
    channels, in_channels = conv_in.shape[0], conv_in.shape[1]
    out_channels = _require(infos, "out.2.weight", where, 4).shape[0]
    evidence.append(f"conv_in input_blocks.0.0.weight {list(conv_in.shape)}: {in_channels} in, {channels} channels")

    # Walk input_blocks: resnets grouped into levels, levels split at downsamplers.
    levels: list[list[int]] = [[]]
    for index in _indices(infos, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{index}.0.op.weight" in infos:
            levels.append([])
        else:
            _require(infos, f"input_blocks.{index}.0.out_layers.3.weight", where, 4)
            levels[-1].append(index)
    layers_per_block = len(levels[0])
    if layers_per_block == 0 or any(len(level) != layers_per_block for level in levels):
        raise CheckpointError(
            f"{where}: UNet levels hold {[len(level) for level in levels]} ResBlocks each, expected the same "
            "number per level"
        )
    block_out_channels = [infos[f"input_blocks.{level[0]}.0.out_layers.3.weight"].shape[0] for level in levels]
    evidence.append(
        f"{len(levels)} levels (Downsample at input_blocks.N.0.op), {layers_per_block} ResBlocks each, "
        f"channels {block_out_channels} from out_layers.3.weight"
    )

    down_types, depths, linear, context = [], [], None, None
    for level in levels:
        attentions = [f"input_blocks.{index}.1" for index in level if f"input_blocks.{index}.1.proj_in.weight" in infos]
        if attentions and len(attentions) != len(level):
            raise CheckpointError(f"{where}: only some ResBlocks of level {levels.index(level)} have attention")
        if not attentions:
            down_types.append("DownBlock2D")
            depths.append(1)
            continue
        down_types.append("CrossAttnDownBlock2D")
        depths.append(len(_indices(infos, re.escape(attentions[0]) + r"\.transformer_blocks\.(\d+)\.")))
        linear = len(infos[f"{attentions[0]}.proj_in.weight"].shape) == 2
        context = _require(infos, f"{attentions[0]}.transformer_blocks.0.attn2.to_k.weight", where, 2).shape[1]
    if context is None:
        raise CheckpointError(f"{where}: no cross-attention found (no input_blocks.N.1.proj_in), not an SD UNet")
    mid_depth = len(_indices(infos, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    evidence.append(
        f"cross-attention at levels {[t.startswith('CrossAttn') for t in down_types]}, transformer depth "
        f"{depths} (mid {mid_depth}), context {context} from attn2.to_k.weight, "
        f"{'linear' if linear else '1x1 conv'} proj_in"
    )

    config: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        "down_block_types": down_types,
        "up_block_types": [t.replace("Down", "Up") for t in reversed(down_types)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": context,
        "use_linear_projection": bool(linear),
        "norm_num_groups": GROUP_NORM_GROUPS,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    if len(set(depths)) > 1 or depths[-1] != mid_depth or mid_depth != 1:
        config["transformer_layers_per_block"] = depths
    label = infos.get("label_emb.0.0.weight")
    if label is not None:
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = label.shape[1]
        config["addition_time_embed_dim"] = SDXL_TIME_EMBED_DIM
        evidence.append(f"added text/time embedding input {label.shape[1]} from label_emb.0.0.weight")
    return config, evidence


def set_unet_heads(config: dict[str, Any], family: str) -> str:
    """Set diffusers' `attention_head_dim` (heads per level) by the family convention; returns evidence."""
    if family == "sd1":
        config["attention_head_dim"] = SD1_HEADS
        return f"{SD1_HEADS} attention heads (SD1 convention, not in the weights)"
    config["attention_head_dim"] = [max(1, c // HEAD_CHANNELS) for c in config["block_out_channels"]]
    return f"{HEAD_CHANNELS}-channel attention heads (SD2/SDXL convention, not in the weights)"


def detect_ldm_vae(infos: Infos, where: str) -> Detected:
    """LDM Encoder/Decoder -> diffusers AutoencoderKL config (scaling factor set by the caller)."""
    conv_in = _require(infos, "encoder.conv_in.weight", where, 4)
    levels = _indices(infos, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise CheckpointError(f"{where}: no encoder.down.N blocks, not an LDM autoencoder")
    layers = len(_indices(infos, r"encoder\.down\.0\.block\.(\d+)\."))
    channels = [_require(infos, f"encoder.down.{level}.block.0.conv2.weight", where, 4).shape[0] for level in levels]
    latent = _require(infos, "decoder.conv_in.weight", where, 4).shape[1]
    out_channels = _require(infos, "decoder.conv_out.weight", where, 4).shape[0]
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": conv_in.shape[1],
        "out_channels": out_channels,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": latent,
        "norm_num_groups": GROUP_NORM_GROUPS,
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
    }
    evidence = [
        f"{len(levels)} levels x {layers} resnets, channels {channels} from encoder.down.N.block.0.conv2.weight, "
        f"{latent} latent channels from decoder.conv_in.weight"
    ]
    return config, evidence


def detect_hf_clip(infos: Infos, where: str, *, hidden_act: str) -> Detected:
    """transformers CLIP text names (keys with or without `text_model.`) -> CLIPTextConfig dict."""
    prefix = "text_model." if any(key.startswith("text_model.") for key in infos) else ""
    token = _require(infos, f"{prefix}embeddings.token_embedding.weight", where, 2)
    position = _require(infos, f"{prefix}embeddings.position_embedding.weight", where, 2)
    layers = _indices(infos, re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    fc1 = _require(infos, f"{prefix}encoder.layers.0.mlp.fc1.weight", where, 2)
    projection = infos.get("text_projection.weight")
    return _clip_config(token, position, len(layers), fc1.shape[0], hidden_act, projection and projection.shape[0])


def detect_open_clip(infos: Infos, where: str) -> Detected:
    """OpenCLIP text tower -> CLIPTextConfig dict (gelu; projection width from `text_projection` (D, P))."""
    token = _require(infos, "token_embedding.weight", where, 2)
    position = _require(infos, "positional_embedding", where, 2)
    layers = _indices(infos, r"transformer\.resblocks\.(\d+)\.")
    fc = _require(infos, "transformer.resblocks.0.mlp.c_fc.weight", where, 2)
    projection = infos.get("text_projection")
    return _clip_config(token, position, len(layers), fc.shape[0], "gelu", projection and projection.shape[1])


def _clip_config(
    token: TensorInfo,
    position: TensorInfo,
    layers: int,
    intermediate: int,
    hidden_act: str,
    projection_dim: int | None,
) -> Detected:
    vocab, hidden = token.shape
    config = {
        "model_type": "clip_text_model",
        "architectures": ["CLIPTextModelWithProjection" if projection_dim else "CLIPTextModel"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // HEAD_CHANNELS),
        "max_position_embeddings": position.shape[0],
        "hidden_act": hidden_act,
    }
    if projection_dim:
        config["projection_dim"] = projection_dim
    evidence = [
        f"width {hidden}, vocabulary {vocab}, {position.shape[0]} positions, {layers} layers, MLP {intermediate}, "
        f"{hidden_act}" + (f", projection {projection_dim}" if projection_dim else "")
    ]
    return config, evidence


def detect_diffusers_vae(infos: Infos, where: str) -> Detected:
    """A VAE file already in diffusers names (no config.json beside it) -> AutoencoderKL config."""
    conv_in = _require(infos, "encoder.conv_in.weight", where, 4)
    levels = _indices(infos, r"encoder\.down_blocks\.(\d+)\.")
    if not levels:
        raise CheckpointError(f"{where}: no encoder.down_blocks.N, not a diffusers autoencoder")
    layers = len(_indices(infos, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
    channels = [
        _require(infos, f"encoder.down_blocks.{level}.resnets.0.conv2.weight", where, 4).shape[0] for level in levels
    ]
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": conv_in.shape[1],
        "out_channels": _require(infos, "decoder.conv_out.weight", where, 4).shape[0],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": _require(infos, "decoder.conv_in.weight", where, 4).shape[1],
        "norm_num_groups": GROUP_NORM_GROUPS,
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
    }
    return config, [f"diffusers names: {len(levels)} levels x {layers} resnets, channels {channels}"]
