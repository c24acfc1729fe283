"""Declarative rename rules and named tensor transforms from checkpoint layouts to tiengine's names.

tiengine's parameter names are diffusers' (`UNet2DConditionModel`, `AutoencoderKL`) and transformers'
(`CLIPTextModel(WithProjection)`, with the `text_model.` prefix). The original single-file layouts are
those of CompVis latent-diffusion / Stability's stablediffusion and generative-models repositories
(`model.diffusion_model.input_blocks.N.M...`, `first_stage_model.decoder.up.N...`, OpenCLIP's
`transformer.resblocks.N.attn.in_proj_weight`, ...).

A component's rules are a *module table*: {source module path: ModuleRule(target module path, leaves)},
built from the component's config (block counts decide which `input_blocks.N` is which resnet). A source
key is split at the longest dotted prefix found in the table; the rest (the *leaf*, e.g.
`in_layers.0.weight`) is renamed by the rule's `LeafMap`. Lookups are exact, so the result never depends
on the order in which rules are tried, and a key matching nothing is reported, never guessed.

Tensor transforms (the only places where values change layout, never values):
- `copy`: unchanged.
- `squeeze_1x1_conv`: (O, I, 1, 1) -> (O, I); the VAE mid-block attention q/k/v/proj_out are 1x1 convs in
  LDM files and linear layers in diffusers. A tensor already (O, I) is kept.
- `split_qkv`: OpenCLIP's fused `in_proj_weight` (3D, D) / `in_proj_bias` (3D,) -> q, k, v rows in that
  order (torch.nn.MultiheadAttention's packing).
- `transpose`: OpenCLIP's `text_projection` is applied as `x @ P` with P (D, P_out); a Linear stores
  P.T (P_out, D).
The VAE decoder's up-block reversal is a rename (LDM `up.0` is the highest-resolution block, diffusers'
`up_blocks.0` the lowest), expressed in `vae_module_table`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tiengine.errors import CheckpointError

Shape = tuple[int, ...]


# Transforms ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    """A named tensor transform: output shapes from the input shape (no data read) and the values."""

    name: str
    outputs: int
    shapes: Callable[[Shape], list[Shape]]
    apply: Callable[[torch.Tensor], list[torch.Tensor]]


def _squeeze_shapes(shape: Shape) -> list[Shape]:
    if len(shape) == 4 and shape[2:] == (1, 1):
        return [shape[:2]]
    if len(shape) == 2:
        return [shape]
    raise ValueError(f"expected a 1x1 conv weight (O, I, 1, 1) or a linear weight (O, I), found {list(shape)}")


def _squeeze_apply(tensor: torch.Tensor) -> list[torch.Tensor]:
    _squeeze_shapes(tuple(tensor.shape))
    return [tensor.reshape(tensor.shape[:2])]  # (O, I, 1, 1) -> (O, I)


def _split_shapes(shape: Shape) -> list[Shape]:
    if not shape or shape[0] % 3:
        raise ValueError(f"expected a fused q/k/v tensor with 3*D rows, found {list(shape)}")
    return [(shape[0] // 3, *shape[1:])] * 3


def _split_apply(tensor: torch.Tensor) -> list[torch.Tensor]:
    _split_shapes(tuple(tensor.shape))
    return [part.contiguous() for part in tensor.chunk(3, dim=0)]  # (3D, ...) -> 3 x (D, ...)


def _transpose_shapes(shape: Shape) -> list[Shape]:
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D projection matrix, found {list(shape)}")
    return [(shape[1], shape[0])]


def _transpose_apply(tensor: torch.Tensor) -> list[torch.Tensor]:
    _transpose_shapes(tuple(tensor.shape))
    return [tensor.t().contiguous()]  # (D, P) -> (P, D)


TRANSFORMS: dict[str, Transform] = {
    "copy": Transform("copy", 1, lambda shape: [shape], lambda tensor: [tensor]),
    "squeeze_1x1_conv": Transform("squeeze_1x1_conv", 1, _squeeze_shapes, _squeeze_apply),
    "split_qkv": Transform("split_qkv", 3, _split_shapes, _split_apply),
    "transpose": Transform("transpose", 1, _transpose_shapes, _transpose_apply),
}


# Rules --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeafRule:
    """One source leaf -> its target leaf names (one per transform output)."""

    targets: tuple[str, ...]
    transform: str = "copy"

    def __post_init__(self) -> None:
        if TRANSFORMS[self.transform].outputs != len(self.targets):
            raise ValueError(f"transform {self.transform} gives {TRANSFORMS[self.transform].outputs} tensors")


@dataclass(frozen=True)
class LeafMap:
    """Renames of the leaves under one module; with `passthrough`, unlisted leaves keep their name."""

    name: str
    rules: Mapping[str, LeafRule] = field(default_factory=dict)
    passthrough: bool = False


@dataclass(frozen=True)
class ModuleRule:
    target: str
    leaves: LeafMap


@dataclass(frozen=True)
class Conversion:
    """Read `source`, apply `transform`, store the results as `targets` (component-relative names)."""

    source: str
    targets: tuple[str, ...]
    transform: str


def _params(source: str, target: str, weight_transform: str = "copy") -> dict[str, LeafRule]:
    """weight + bias of one layer."""
    return {
        f"{source}.weight": LeafRule((f"{target}.weight",), weight_transform),
        f"{source}.bias": LeafRule((f"{target}.bias",)),
    }


SAME = LeafMap("same names", passthrough=True)

# LDM ResBlock (openaimodel.py) -> diffusers ResnetBlock2D.
UNET_RESNET = LeafMap(
    "LDM ResBlock",
    {
        **_params("in_layers.0", "norm1"),
        **_params("in_layers.2", "conv1"),
        **_params("emb_layers.1", "time_emb_proj"),
        **_params("out_layers.0", "norm2"),
        **_params("out_layers.3", "conv2"),
        **_params("skip_connection", "conv_shortcut"),
    },
)

# LDM autoencoder ResnetBlock -> diffusers ResnetBlock2D (only the shortcut is renamed).
VAE_RESNET = LeafMap("LDM VAE ResnetBlock", _params("nin_shortcut", "conv_shortcut"), passthrough=True)

# LDM AttnBlock (1x1 convs) -> diffusers Attention (linear layers).
VAE_ATTENTION = LeafMap(
    "LDM VAE AttnBlock",
    {
        **_params("norm", "group_norm"),
        **_params("q", "to_q", "squeeze_1x1_conv"),
        **_params("k", "to_k", "squeeze_1x1_conv"),
        **_params("v", "to_v", "squeeze_1x1_conv"),
        **_params("proj_out", "to_out.0", "squeeze_1x1_conv"),
    },
)

# diffusers < 0.14 AttentionBlock names in old `vae/` folders -> current Attention names.
LEGACY_DIFFUSERS_VAE_ATTENTION = LeafMap(
    "diffusers legacy AttentionBlock",
    {
        **_params("query", "to_q", "squeeze_1x1_conv"),
        **_params("key", "to_k", "squeeze_1x1_conv"),
        **_params("value", "to_v", "squeeze_1x1_conv"),
        **_params("proj_attn", "to_out.0", "squeeze_1x1_conv"),
    },
    passthrough=True,
)

# OpenCLIP ResidualAttentionBlock -> transformers CLIPEncoderLayer.
OPENCLIP_LAYER = LeafMap(
    "OpenCLIP ResidualAttentionBlock",
    {
        "attn.in_proj_weight": LeafRule(
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "split_qkv"
        ),
        "attn.in_proj_bias": LeafRule(
            ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "split_qkv"
        ),
        **_params("attn.out_proj", "self_attn.out_proj"),
        **_params("ln_1", "layer_norm1"),
        **_params("ln_2", "layer_norm2"),
        **_params("mlp.c_fc", "mlp.fc1"),
        **_params("mlp.c_proj", "mlp.fc2"),
    },
)


def _openclip_top(with_projection: bool) -> LeafMap:
    """The tower's own tensors (embeddings, final norm, optionally the projection)."""
    rules = {
        "token_embedding.weight": LeafRule(("text_model.embeddings.token_embedding.weight",)),
        "positional_embedding": LeafRule(("text_model.embeddings.position_embedding.weight",)),
        **_params("ln_final", "text_model.final_layer_norm"),
    }
    if with_projection:
        rules["text_projection"] = LeafRule(("text_projection.weight",), "transpose")
    return LeafMap("OpenCLIP text tower", rules)


def unet_module_table(
    layers_per_block: int,
    down_attention: Sequence[bool],
    up_attention: Sequence[bool],
    has_add_embedding: bool,
) -> dict[str, ModuleRule]:
    """LDM `UNetModel` module paths -> diffusers `UNet2DConditionModel` paths.

    input_blocks: [conv_in] then per level `layers_per_block` x (ResBlock[, SpatialTransformer]) and,
    except at the last level, a Downsample (`.0.op`). output_blocks: per level `layers_per_block + 1` x
    (ResBlock[, SpatialTransformer]), the last one of each level but the final carrying an Upsample
    (`.1.conv` without attention, `.2.conv` with it). down_attention / up_attention: one flag per level,
    in diffusers' order (up_blocks.0 is the lowest resolution, as output_blocks.0).
    """
    table = {
        "time_embed.0": ModuleRule("time_embedding.linear_1", SAME),
        "time_embed.2": ModuleRule("time_embedding.linear_2", SAME),
        "input_blocks.0.0": ModuleRule("conv_in", SAME),
        "middle_block.0": ModuleRule("mid_block.resnets.0", UNET_RESNET),
        "middle_block.1": ModuleRule("mid_block.attentions.0", SAME),
        "middle_block.2": ModuleRule("mid_block.resnets.1", UNET_RESNET),
        "out.0": ModuleRule("conv_norm_out", SAME),
        "out.2": ModuleRule("conv_out", SAME),
    }
    if has_add_embedding:
        table["label_emb.0.0"] = ModuleRule("add_embedding.linear_1", SAME)
        table["label_emb.0.2"] = ModuleRule("add_embedding.linear_2", SAME)

    levels = len(down_attention)
    index = 1
    for level, attention in enumerate(down_attention):
        for layer in range(layers_per_block):
            table[f"input_blocks.{index}.0"] = ModuleRule(f"down_blocks.{level}.resnets.{layer}", UNET_RESNET)
            if attention:
                table[f"input_blocks.{index}.1"] = ModuleRule(f"down_blocks.{level}.attentions.{layer}", SAME)
            index += 1
        if level < levels - 1:
            table[f"input_blocks.{index}.0.op"] = ModuleRule(f"down_blocks.{level}.downsamplers.0.conv", SAME)
            index += 1

    index = 0
    for level, attention in enumerate(up_attention):
        for layer in range(layers_per_block + 1):
            table[f"output_blocks.{index}.0"] = ModuleRule(f"up_blocks.{level}.resnets.{layer}", UNET_RESNET)
            if attention:
                table[f"output_blocks.{index}.1"] = ModuleRule(f"up_blocks.{level}.attentions.{layer}", SAME)
            if layer == layers_per_block and level < levels - 1:
                slot = 2 if attention else 1
                table[f"output_blocks.{index}.{slot}.conv"] = ModuleRule(f"up_blocks.{level}.upsamplers.0.conv", SAME)
            index += 1
    return table


def vae_module_table(levels: int, layers_per_block: int) -> dict[str, ModuleRule]:
    """LDM `Encoder`/`Decoder` module paths -> diffusers `AutoencoderKL` paths.

    The encoder has `layers_per_block` resnets per level, the decoder one more; LDM numbers decoder
    levels from the highest resolution (`up.{levels-1}` runs first), diffusers in running order.
    """
    table = {
        "quant_conv": ModuleRule("quant_conv", SAME),
        "post_quant_conv": ModuleRule("post_quant_conv", SAME),
    }
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in"] = ModuleRule(f"{part}.conv_in", SAME)
        table[f"{part}.norm_out"] = ModuleRule(f"{part}.conv_norm_out", SAME)
        table[f"{part}.conv_out"] = ModuleRule(f"{part}.conv_out", SAME)
        table[f"{part}.mid.block_1"] = ModuleRule(f"{part}.mid_block.resnets.0", VAE_RESNET)
        table[f"{part}.mid.attn_1"] = ModuleRule(f"{part}.mid_block.attentions.0", VAE_ATTENTION)
        table[f"{part}.mid.block_2"] = ModuleRule(f"{part}.mid_block.resnets.1", VAE_RESNET)
    for level in range(levels):
        for layer in range(layers_per_block):
            table[f"encoder.down.{level}.block.{layer}"] = ModuleRule(
                f"encoder.down_blocks.{level}.resnets.{layer}", VAE_RESNET
            )
        if level < levels - 1:
            table[f"encoder.down.{level}.downsample.conv"] = ModuleRule(
                f"encoder.down_blocks.{level}.downsamplers.0.conv", SAME
            )
        up_level = levels - 1 - level  # the reversal
        for layer in range(layers_per_block + 1):
            table[f"decoder.up.{level}.block.{layer}"] = ModuleRule(
                f"decoder.up_blocks.{up_level}.resnets.{layer}", VAE_RESNET
            )
        if level > 0:
            table[f"decoder.up.{level}.upsample.conv"] = ModuleRule(
                f"decoder.up_blocks.{up_level}.upsamplers.0.conv", SAME
            )
    return table


def diffusers_vae_module_table() -> dict[str, ModuleRule]:
    """diffusers `vae/` weights: the identity, plus the pre-0.14 attention names."""
    return {
        "": ModuleRule("", SAME),
        "encoder.mid_block.attentions.0": ModuleRule("encoder.mid_block.attentions.0", LEGACY_DIFFUSERS_VAE_ATTENTION),
        "decoder.mid_block.attentions.0": ModuleRule("decoder.mid_block.attentions.0", LEGACY_DIFFUSERS_VAE_ATTENTION),
    }


def hf_clip_module_table() -> dict[str, ModuleRule]:
    """transformers CLIP text names, with or without the `text_model.` prefix (old LDM files and
    transformers 5 `CLIPTextModel` omit it)."""
    return {
        "text_model": ModuleRule("text_model", SAME),
        "embeddings": ModuleRule("text_model.embeddings", SAME),
        "encoder": ModuleRule("text_model.encoder", SAME),
        "final_layer_norm": ModuleRule("text_model.final_layer_norm", SAME),
        "text_projection": ModuleRule("text_projection", SAME),
    }


def open_clip_module_table(num_layers: int, with_projection: bool) -> dict[str, ModuleRule]:
    """OpenCLIP text tower (`FrozenOpenCLIPEmbedder(2).model`) -> transformers CLIP text names."""
    table = {"": ModuleRule("", _openclip_top(with_projection))}
    for layer in range(num_layers):
        table[f"transformer.resblocks.{layer}"] = ModuleRule(f"text_model.encoder.layers.{layer}", OPENCLIP_LAYER)
    return table


def identity_table() -> dict[str, ModuleRule]:
    return {"": ModuleRule("", SAME)}


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix and leaf else prefix or leaf


def plan_conversions(keys: Iterable[str], table: Mapping[str, ModuleRule]) -> tuple[list[Conversion], list[str]]:
    """Map component-relative source keys through a module table.

    Returns (conversions, unmatched keys). A key is split at its longest dotted prefix present in the
    table (the empty prefix, when listed, matches every key); its leaf is renamed by that rule's LeafMap.
    Two source keys producing the same target is an error (the table would be ambiguous).
    """
    conversions: list[Conversion] = []
    unmatched: list[str] = []
    produced: dict[str, str] = {}
    for key in keys:
        parts = key.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            module = ".".join(parts[:cut])
            rule = table.get(module)
            if rule is not None:
                break
        else:
            unmatched.append(key)
            continue
        leaf = ".".join(parts[cut:])
        leaf_rule = rule.leaves.rules.get(leaf)
        if leaf_rule is None:
            if not rule.leaves.passthrough:
                unmatched.append(key)
                continue
            leaf_rule = LeafRule((leaf,))
        targets = tuple(_join(rule.target, target_leaf) for target_leaf in leaf_rule.targets)
        for target in targets:
            if target in produced:
                raise CheckpointError(f"keys {produced[target]!r} and {key!r} both convert to {target!r}")
            produced[target] = key
        conversions.append(Conversion(key, targets, leaf_rule.transform))
    return conversions, unmatched
