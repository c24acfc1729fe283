"""LoRA / LyCORIS files with seeded random weights for tiny tiengine models, written as their tools write them.

Every writer takes the model's modules (Engine.modules / model_builders.build_modules) and returns the
tensors it wrote, by file key. Layer names are spelled here from the trainers' conventions, independently
of tiengine.networks (which must read them back):

- kohya-ss sd-scripts `networks/lora.py` (and LyCORIS, which names layers the same way): `lora_te_` +
  transformers path (SD1/SD2), `lora_te1_` / `lora_te2_` (SDXL), `lora_unet_` + the diffusers UNet path for
  SD1/SD2 ("diffusers" naming) or the LDM path for SDXL ("ldm" naming; the block arithmetic below is
  openaimodel.py's input_blocks / middle_block / output_blocks order, written out independently of
  tiengine.weights_conv). Default targets are the transformer blocks' Linear layers and the 1x1
  proj_in / proj_out, plus the text encoders' attention and MLP; `conv=True` adds every other Linear and
  Conv2d of the UNet (LoCon: resnets, samplers, conv_in/out, time embedding).
- diffusers / PEFT: `unet.<path>.lora_A.weight` / `lora_B.weight` (`text_encoder.`, `text_encoder_2.`).
- old diffusers: `unet.<...>.attn1.processor.to_q_lora.down.weight`, `text_encoder.<...>.self_attn.to_q_lora`,
  `<module>.lora_linear_layer.down.weight` (text MLP) and `<module>.lora.down.weight` (UNet others).
- bundled embeddings: `bundle_emb.<name>.string_to_param.*` (SD1/SD2) or `bundle_emb.<name>.clip_l/clip_g`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

RESNET_LEAVES = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection"}  # diffusers ResnetBlock2D -> LDM ResBlock
TOP_LEVEL_LDM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
                 "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                 "add_embedding.linear_2": "label_emb.0.2"}
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def ldm_path(unet: nn.Module, path: str) -> str:
    """diffusers UNet module path -> the LDM (openaimodel.py) module path kohya uses for SDXL."""
    if path in TOP_LEVEL_LDM:
        return TOP_LEVEL_LDM[path]
    config = unet.config
    # input blocks per level: the resnets plus a downsampler; output blocks: one resnet more than going down
    per_down, per_up = config.layers_per_block + 1, config.layers_per_block + 1
    parts = path.split(".")
    kind, level = parts[0], int(parts[1]) if parts[1].isdigit() else 0
    if kind == "down_blocks":
        if parts[2] == "downsamplers":  # the level's last input block
            return f"input_blocks.{(level + 1) * per_down}.0.op"
        block, index, rest = parts[2], int(parts[3]), parts[4:]
        number = 1 + level * per_down + index
        return _inner(f"input_blocks.{number}", block, rest)
    if kind == "mid_block":  # middle_block.0 resnet, .1 transformer, .2 resnet
        block, index, rest = parts[1], int(parts[2]), parts[3:]
        if block == "attentions":
            return ".".join(["middle_block.1", *rest])
        return f"middle_block.{2 * index}.{RESNET_LEAVES['.'.join(rest)]}"
    if parts[2] == "upsamplers":
        has_attention = config.up_block_types[level].startswith("CrossAttn")
        return f"output_blocks.{level * per_up + per_up - 1}.{2 if has_attention else 1}.conv"
    block, index, rest = parts[2], int(parts[3]), parts[4:]
    return _inner(f"output_blocks.{level * per_up + index}", block, rest)


def _inner(block_path: str, block: str, rest: list[str]) -> str:
    if block == "attentions":
        return ".".join([f"{block_path}.1", *rest])
    return f"{block_path}.0.{RESNET_LEAVES['.'.join(rest)]}"


def lora_layers(modules: Mapping[str, nn.Module], *, text_encoder: bool = True, unet: bool = True,
                conv: bool = False) -> Iterator[tuple[str, str, nn.Module]]:
    """(component, module path, layer) for the layers kohya trains (module docstring)."""
    if text_encoder:
        for component in ("text_encoder", "text_encoder_2"):
            if component in modules:
                for path, layer in modules[component].named_modules():
                    if path.endswith(TEXT_TARGETS):
                        yield component, path, layer
    if unet:
        for path, layer in modules["unet"].named_modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)) and (conv or ".attentions." in path):
                yield "unet", path, layer


def kohya_name(modules: Mapping[str, nn.Module], component: str, path: str, naming: str) -> str:
    two_encoders = "text_encoder_2" in modules
    if component == "unet":
        return "lora_unet_" + (ldm_path(modules["unet"], path) if naming == "ldm" else path).replace(".", "_")
    prefix = {"text_encoder": "lora_te1_" if two_encoders else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + path.replace(".", "_")


def _random(generator: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * std


def _lora_pair(generator: torch.Generator, weight: torch.Tensor, rank: int, tucker: bool) -> dict[str, torch.Tensor]:
    """lora_down / lora_up (/ lora_mid for a Tucker conv) for one weight, sized to change it noticeably."""
    out_features, in_features = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    fan_in = in_features * (kernel[0] * kernel[1] if kernel else 1)
    if tucker and kernel and kernel != (1, 1):
        return {"lora_down.weight": _random(generator, rank, in_features, 1, 1, std=in_features ** -0.5),
                "lora_mid.weight": _random(generator, rank, rank, *kernel, std=(rank * kernel[0] * kernel[1]) ** -0.5),
                "lora_up.weight": _random(generator, out_features, rank, 1, 1, std=0.5 * rank ** -0.5)}
    down_shape = (rank, in_features, *kernel)
    up_shape = (out_features, rank, 1, 1) if kernel else (out_features, rank)
    return {"lora_down.weight": _random(generator, *down_shape, std=fan_in ** -0.5),
            "lora_up.weight": _random(generator, *up_shape, std=0.5 * rank ** -0.5)}


def save(path: Path, tensors: dict[str, torch.Tensor], fmt: str = "safetensors",
         metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` as safetensors (with metadata) or as a torch.save pickle of the flat dict."""
    path = Path(path)
    if fmt == "safetensors":
        save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata=metadata)
    elif fmt == "pt":
        torch.save(dict(tensors), path)
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'pt', got {fmt!r}")
    return path


def write_kohya_lora(path: Path, modules: Mapping[str, nn.Module], *, family: str, rank: int = 4,
                     alpha: float | None = 2.0, text_encoder: bool = True, unet: bool = True, conv: bool = False,
                     tucker: bool = False, naming: str | None = None, seed: int = 0, fmt: str = "safetensors",
                     dtype: torch.dtype = torch.float32, metadata: dict[str, str] | None = None,
                     embeddings: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """A kohya-ss / LyCORIS LoCon file: `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha` per layer.

    naming: "diffusers" or "ldm" UNet names; default kohya's for the family (SDXL "ldm", else "diffusers").
    tucker: 3x3 convolutions as LyCORIS' Tucker form (1x1 down, `lora_mid` kxk, 1x1 up). alpha None: no
    alpha keys. embeddings: {name: {"string_to_param.*" | "clip_l" | "clip_g": (n, D)}} bundled as A1111 reads them.
    """
    naming = naming or ("ldm" if family == "sdxl" else "diffusers")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for component, module_path, layer in lora_layers(modules, text_encoder=text_encoder, unet=unet, conv=conv):
        name = kohya_name(modules, component, module_path, naming)
        for tensor_name, value in _lora_pair(generator, layer.weight, rank, tucker).items():
            tensors[f"{name}.{tensor_name}"] = value.to(dtype)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    tensors.update(bundle_keys(embeddings or {}))
    save(path, tensors, fmt, metadata)
    return tensors


def bundle_keys(embeddings: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"bundle_emb.{name}.{part}": value for name, parts in embeddings.items() for part, value in parts.items()}


def write_loha(path: Path, modules: Mapping[str, nn.Module], *, family: str, rank: int = 4, alpha: float = 2.0,
               conv: bool = False, tucker: bool = False, seed: int = 0,
               fmt: str = "safetensors") -> dict[str, torch.Tensor]:
    """LyCORIS LoHa: hada_w1_a (out, r), hada_w1_b (r, in*kh*kw), w2 alike; tucker: hada_t1/t2 (r, r, kh, kw)
    with w_a (r, out), w_b (r, in) for kxk convolutions."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for component, module_path, layer in lora_layers(modules, conv=conv):
        name = kohya_name(modules, component, module_path, "ldm" if family == "sdxl" else "diffusers")
        out_features, in_features = layer.weight.shape[:2]
        kernel = tuple(layer.weight.shape[2:])
        flat_in = layer.weight[0].numel()
        for factor in ("1", "2"):
            if tucker and kernel and kernel != (1, 1):
                tensors[f"{name}.hada_t{factor}"] = _random(generator, rank, rank, *kernel, std=0.5)
                tensors[f"{name}.hada_w{factor}_a"] = _random(generator, rank, out_features, std=0.5)
                tensors[f"{name}.hada_w{factor}_b"] = _random(generator, rank, in_features, std=in_features ** -0.5)
            else:
                tensors[f"{name}.hada_w{factor}_a"] = _random(generator, out_features, rank, std=0.5)
                tensors[f"{name}.hada_w{factor}_b"] = _random(generator, rank, flat_in, std=flat_in ** -0.5)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save(path, tensors, fmt)
    return tensors


def _factor(size: int) -> tuple[int, int]:
    """size = a * b with a the largest divisor <= sqrt(size) (LyCORIS `factorization` with factor -1)."""
    a = max(d for d in range(1, int(size ** 0.5) + 1) if size % d == 0)
    return a, size // a


def write_lokr(path: Path, modules: Mapping[str, nn.Module], *, family: str, rank: int = 2, alpha: float = 2.0,
               conv: bool = False, decompose_w1: bool = False, decompose_w2: bool = True, tucker: bool = False,
               seed: int = 0, fmt: str = "safetensors") -> dict[str, torch.Tensor]:
    """LyCORIS LoKr: W ~ kron(w1 (a, b), w2 (c, d[, kh, kw])) with out = a*c, in = b*d; w1 full
    (`lokr_w1`) or `lokr_w1_a @ lokr_w1_b`, w2 full or `lokr_w2_a @ lokr_w2_b` (tucker: with `lokr_t2`)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for component, module_path, layer in lora_layers(modules, conv=conv):
        name = kohya_name(modules, component, module_path, "ldm" if family == "sdxl" else "diffusers")
        out_features, in_features = layer.weight.shape[:2]
        kernel = tuple(layer.weight.shape[2:])
        (a, c), (b, d) = _factor(out_features), _factor(in_features)
        if decompose_w1:
            tensors[f"{name}.lokr_w1_a"] = _random(generator, a, rank, std=0.7)
            tensors[f"{name}.lokr_w1_b"] = _random(generator, rank, b, std=0.7)
        else:
            tensors[f"{name}.lokr_w1"] = _random(generator, a, b)
        flat_d = d * (kernel[0] * kernel[1] if kernel else 1)
        if tucker and kernel and kernel != (1, 1):
            tensors[f"{name}.lokr_t2"] = _random(generator, rank, rank, *kernel, std=0.5)
            tensors[f"{name}.lokr_w2_a"] = _random(generator, rank, c, std=0.5)
            tensors[f"{name}.lokr_w2_b"] = _random(generator, rank, d, std=d ** -0.5)
        elif decompose_w2:
            tensors[f"{name}.lokr_w2_a"] = _random(generator, c, rank, std=0.5)
            tensors[f"{name}.lokr_w2_b"] = _random(generator, rank, flat_d, std=flat_d ** -0.5)
        else:
            tensors[f"{name}.lokr_w2"] = _random(generator, c, d, *kernel, std=flat_d ** -0.5)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save(path, tensors, fmt)
    return tensors


def write_peft_lora(path: Path, modules: Mapping[str, nn.Module], *, rank: int = 4, text_encoder: bool = True,
                    unet: bool = True, conv: bool = False, peft_prefix: bool = False, text_model_prefix: bool = True,
                    seed: int = 0, fmt: str = "safetensors") -> dict[str, torch.Tensor]:
    """diffusers / PEFT: `<component>.<dotted path>.lora_A.weight` (down) / `lora_B.weight` (up), no alpha.

    peft_prefix: PEFT's `base_model.model.` in front; text_model_prefix False: transformers 5 text paths
    (no `text_model.`)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for component, module_path, layer in lora_layers(modules, text_encoder=text_encoder, unet=unet, conv=conv):
        dotted = module_path if text_model_prefix else module_path.removeprefix("text_model.")
        name = ("base_model.model." if peft_prefix else "") + f"{component}.{dotted}"
        pair = _lora_pair(generator, layer.weight, rank, tucker=False)
        tensors[f"{name}.lora_A.weight"] = pair["lora_down.weight"]
        tensors[f"{name}.lora_B.weight"] = pair["lora_up.weight"]
    save(path, tensors, fmt)
    return tensors


def old_diffusers_name(component: str, path: str) -> tuple[str, str]:
    """(layer name, tensor stem) of a layer in diffusers' pre-PEFT LoRA files: keys are
    `<layer><stem>.down.weight` / `.up.weight` (module docstring)."""
    parent, _, leaf = path.rpartition(".")
    if component == "unet" and parent.endswith(("attn1", "attn2")) and leaf in ("to_q", "to_k", "to_v"):
        return f"unet.{parent}.processor.{leaf}", "_lora"
    if component == "unet" and path.endswith(("attn1.to_out.0", "attn2.to_out.0")):
        return f"unet.{path.removesuffix('.to_out.0')}.processor.to_out", "_lora"
    if component != "unet" and parent.endswith("self_attn"):
        processor = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}[leaf]
        return f"{component}.{parent}.{processor}", "_lora"
    if component != "unet":
        return f"{component}.{path}", ".lora_linear_layer"
    return f"unet.{path}", ".lora"


def write_old_diffusers_lora(path: Path, modules: Mapping[str, nn.Module], *, rank: int = 4, seed: int = 0,
                             fmt: str = "safetensors") -> dict[str, torch.Tensor]:
    """diffusers' attention-processor era: `...processor.to_q_lora.down.weight`, `...lora_linear_layer.up.weight`."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for component, module_path, layer in lora_layers(modules):
        name, stem = old_diffusers_name(component, module_path)
        pair = _lora_pair(generator, layer.weight, rank, tucker=False)
        tensors[f"{name}{stem}.down.weight"] = pair["lora_down.weight"]
        tensors[f"{name}{stem}.up.weight"] = pair["lora_up.weight"]
    save(path, tensors, fmt)
    return tensors


SDXL_EMBEDDING_WIDTHS = {"clip_l": 768, "clip_g": 1280}  # the only two-encoder widths an Embedding accepts


def bundled_embedding(modules: Mapping[str, nn.Module], n_vectors: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One bundled embedding's parts: A1111's `string_to_param.*` at the text encoder's width for a
    one-encoder model, SDXL's clip_l / clip_g (768 / 1280) for a two-encoder one."""
    generator = torch.Generator().manual_seed(seed)
    if "text_encoder_2" not in modules:
        width = modules["text_encoder"].config.hidden_size
        return {"string_to_param.*": _random(generator, n_vectors, width, std=0.02)}
    return {part: _random(generator, n_vectors, width, std=0.02) for part, width in SDXL_EMBEDDING_WIDTHS.items()}
