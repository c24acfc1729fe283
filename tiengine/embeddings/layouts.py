"""The textual-inversion layouts found in the wild, turned into vectors per text encoder.

Input is what a file holds once read safely (a dict or list from tiengine.io.safe_pickle, the
tensors of a safetensors file, or the JSON of an A1111 image); output is a ParsedEmbedding
with one (n, D) tensor per encoder: "clip_l" (768, SD1 and SDXL encoder 1), "clip_h" (1024,
SD2) and "clip_g" (1280, SDXL encoder 2). Layout names and keys follow
/work/shared/spec/embedding-formats.md:

  a1111           {"string_to_param": {"*": (n, D)}, "name", "step", ...} (AUTOMATIC1111 webui)
  ti_parameterdict  the same with string_to_param an nn.ParameterDict (original TI repo)
  diffusers       {"<token>": (D,) or (n, D)} (diffusers learned_embeds.bin / .safetensors)
  kohya           {"emb_params": (n, D)}
  sdxl            {"clip_l": (n, 768), "clip_g": (n, 1280)}
  text_encoders   {"text_encoders_0": clip_l, "text_encoders_1": clip_g} (older SDXL services)
  emb_emb2        {"emb": (768,), "emb2": (1280,)} (oss-roettger/XL-Textual-Inversion)
  emb_emb2_list   [{"emb", "emb2"}, ...] the same repo's training history; the last entry is
                  the final embedding and is the one loaded
  lora_bundle     "bundle_emb.<name>.string_to_param.*" or "bundle_emb.<name>.clip_l/clip_g"
                  keys inside a kohya LoRA safetensors file
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from tiengine.errors import EmbeddingError
from tiengine.io.safe_pickle import InertObject

# hidden width of each text encoder: CLIP ViT-L/14, OpenCLIP ViT-H/14, OpenCLIP ViT-bigG/14
ENCODER_WIDTHS = {"clip_l": 768, "clip_h": 1024, "clip_g": 1280}
# Single-encoder vectors of another width at least this wide belong to a small custom model.
MIN_CUSTOM_WIDTH = 8
T5XXL_WIDTH = 4096  # T5-XXL (SD3/Flux) embeddings are not CLIP embeddings
METADATA_KEYS = ("string_to_token", "name", "step", "sd_checkpoint", "sd_checkpoint_name")
SDXL_KEY_PAIRS = (("clip_l", "clip_g"), ("text_encoders_0", "text_encoders_1"), ("emb", "emb2"))
BUNDLE_PREFIX = "bundle_emb."


@dataclass
class ParsedEmbedding:
    """Vectors per encoder (as stored: any float dtype, (n, D)) plus A1111 metadata."""

    vectors: dict[str, torch.Tensor]
    layout: str
    stored_name: str | None = None
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def describe_keys(keys: Any, limit: int = 12) -> str:
    """`a, b, c (+4 more)` for error messages."""
    names = [str(k) for k in keys]
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "") or "none"


def parse_embedding_data(data: Any, label: str) -> ParsedEmbedding:
    """Recognize the layout of `data` (see module docstring) and extract its vectors.

    `label` (the file) starts every error message.
    """
    if isinstance(data, list):
        return _parse_emb_list(data, label)
    if not isinstance(data, dict):
        raise EmbeddingError(f"{label}: expected a dict of tensors, found {_type_name(data)}")
    if "string_to_param" in data or "string_to_param.*" in data:
        return _parse_a1111(data, label)
    for first, second in SDXL_KEY_PAIRS:
        if first in data or second in data:
            layout = {"clip_l": "sdxl", "text_encoders_0": "text_encoders", "emb": "emb_emb2"}
            return _parse_sdxl(data, first, second, layout[first], label)
    if "emb_params" in data:
        tensor = _tensor_value(data, "emb_params", label)
        return _with_metadata(ParsedEmbedding(_single_encoder(tensor, "emb_params", label),
                                              "kohya"), data, label)
    tensor_keys = [k for k, v in data.items() if isinstance(v, torch.Tensor)]
    other_keys = [k for k in data if k not in tensor_keys and k not in METADATA_KEYS]
    for key in tensor_keys:
        if data[key].ndim and data[key].shape[-1] == T5XXL_WIDTH:
            raise EmbeddingError(f"{label}: not a CLIP embedding: t5xxl {T5XXL_WIDTH} (key "
                                 f"{key!r}, shape {tuple(data[key].shape)})")
    if len(tensor_keys) == 1 and not other_keys:
        key = tensor_keys[0]
        parsed = ParsedEmbedding(_single_encoder(data[key], key, label), "diffusers",
                                 stored_name=str(key))
        return _with_metadata(parsed, data, label)
    if any(str(k).startswith(BUNDLE_PREFIX) for k in data):
        names = sorted(parse_bundles(data, label))
        raise EmbeddingError(f"{label}: LoRA file with {len(names)} bundled embeddings "
                             f"({', '.join(names)}); load them with load_bundled_embeddings")
    raise EmbeddingError(f"{label}: unknown embedding layout (keys found: "
                         f"{describe_keys(data.keys())})")


def parse_bundles(tensors: dict[str, Any], label: str) -> dict[str, ParsedEmbedding]:
    """Every `bundle_emb.<name>.*` embedding of a LoRA state dict, by name."""
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not str(key).startswith(BUNDLE_PREFIX):
            continue
        parts = str(key).split(".", 2)
        if len(parts) != 3 or not parts[1]:
            raise EmbeddingError(f"{label}: malformed bundled-embedding key {key!r}")
        grouped.setdefault(parts[1], {})[parts[2]] = value
    parsed = {}
    for name, data in grouped.items():
        if "string_to_param" in data:  # "bundle_emb.x.string_to_param" without ".*"
            data["string_to_param.*"] = data.pop("string_to_param")
        result = parse_embedding_data(data, f"{label} [bundle_emb.{name}]")
        result.layout, result.stored_name = "lora_bundle", name
        parsed[name] = result
    return parsed


def join_sdxl_pair(first: ParsedEmbedding, second: Any, label: str) -> ParsedEmbedding:
    """diffusers SDXL pair: {token: (n, 768)} + the second file's {token: (n, 1280)}."""
    if first.layout != "diffusers" or "clip_l" not in first.vectors:
        raise EmbeddingError(f"{label}: not a diffusers SDXL pair (first file is {first.layout} "
                             f"{list(first.vectors)}, expected {{token: (n, 768)}})")
    tensors = [(k, v) for k, v in second.items() if isinstance(v, torch.Tensor)] if isinstance(
        second, dict) else []
    if len(tensors) != 1:
        found = describe_keys(second.keys()) if isinstance(second, dict) else _type_name(second)
        raise EmbeddingError(f"{label}: second file of an SDXL pair must hold one tensor "
                             f"{{token: (n, 1280)}}, found {found}")
    key, tensor = tensors[0]
    matrix = _as_matrix(tensor, key, label)
    if matrix.shape[-1] != ENCODER_WIDTHS["clip_g"]:
        raise EmbeddingError(f"{label}: second file of an SDXL pair must be 1280 wide, found "
                             f"{key!r} with shape {tuple(matrix.shape)}")
    first.vectors["clip_g"] = matrix
    first.layout = "diffusers_sdxl_pair"
    return first


def _parse_a1111(data: dict[str, Any], label: str) -> ParsedEmbedding:
    layout = "a1111"
    if "string_to_param" in data:
        params = data["string_to_param"]
        if isinstance(params, InertObject):  # nn.ParameterDict: tensors in its _parameters
            layout = "ti_parameterdict"
            state = params.state if isinstance(params.state, dict) else {}
            params = state.get("_parameters")
        if not isinstance(params, dict):
            raise EmbeddingError(f"{label}: 'string_to_param' is a {_type_name(params)}, "
                                 "expected a dict of one tensor")
    else:  # the same dict flattened into safetensors keys
        params = {"*": data["string_to_param.*"]}
    if len(params) != 1:
        raise EmbeddingError(f"{label}: 'string_to_param' holds {len(params)} tensors "
                             f"({describe_keys(params)}), expected exactly one")
    (param_key, tensor), = params.items()
    if not isinstance(tensor, torch.Tensor):
        raise EmbeddingError(f"{label}: 'string_to_param.{param_key}' is a "
                             f"{_type_name(tensor)}, expected a tensor")
    vectors = _single_encoder(tensor, f"string_to_param.{param_key}", label)
    return _with_metadata(ParsedEmbedding(vectors, layout), data, label)


def _parse_sdxl(data: dict[str, Any], first: str, second: str, layout: str,
                label: str) -> ParsedEmbedding:
    missing = [k for k in (first, second) if k not in data]
    if missing:
        present = first if second in missing else second
        raise EmbeddingError(f"{label}: SDXL embedding needs both halves: found {present!r}, "
                             f"missing {missing[0]!r} (keys: {describe_keys(data.keys())})")
    vectors = {}
    for key, encoder in ((first, "clip_l"), (second, "clip_g")):
        tensor = _as_matrix(_tensor_value(data, key, label), key, label)
        width = tensor.shape[-1]
        if width != ENCODER_WIDTHS[encoder]:
            _refuse_t5(width, key, tensor, label)
            raise EmbeddingError(f"{label}: {key!r} should be the {encoder} half, width "
                                 f"{ENCODER_WIDTHS[encoder]}; found shape {tuple(tensor.shape)}")
        vectors[encoder] = tensor
    return _with_metadata(ParsedEmbedding(vectors, layout), data, label)


def _parse_emb_list(data: list[Any], label: str) -> ParsedEmbedding:
    if not data or not all(isinstance(item, dict) and "emb" in item for item in data):
        raise EmbeddingError(f"{label}: expected a dict of tensors or a list of "
                             "{'emb', 'emb2'} dicts, found a list of "
                             f"{len(data)} {_type_name(data[0]) if data else 'items'}")
    parsed = _parse_sdxl(data[-1], "emb", "emb2", "emb_emb2_list", f"{label} [entry {len(data) - 1}]")
    parsed.extra["history_length"] = len(data)
    return parsed


def _single_encoder(tensor: Any, key: str, label: str) -> dict[str, torch.Tensor]:
    """One tensor of a single-encoder layout -> {encoder: (n, D)} by its width."""
    matrix = _as_matrix(tensor, key, label)
    width = matrix.shape[-1]
    _refuse_t5(width, key, matrix, label)
    if width == ENCODER_WIDTHS["clip_g"]:
        raise EmbeddingError(f"{label}: {key!r} is 1280 wide, the clip_g half of an SDXL "
                             "embedding alone; SDXL needs both clip_l (768) and clip_g (1280)")
    for encoder in ("clip_l", "clip_h"):
        if width == ENCODER_WIDTHS[encoder]:
            return {encoder: matrix}
    if width >= MIN_CUSTOM_WIDTH:
        return {"clip_l": matrix}  # a custom model's single encoder (family "custom")
    raise EmbeddingError(f"{label}: {key!r} has width {width} (shape {tuple(matrix.shape)}); "
                         f"expected 768 (SD1), 1024 (SD2), 768+1280 (SDXL) or a custom width >= {MIN_CUSTOM_WIDTH}")


def _refuse_t5(width: int, key: str, tensor: torch.Tensor, label: str) -> None:
    if width == T5XXL_WIDTH:
        raise EmbeddingError(f"{label}: not a CLIP embedding: t5xxl {T5XXL_WIDTH} (key {key!r}, "
                             f"shape {tuple(tensor.shape)})")


def _as_matrix(tensor: Any, key: str, label: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise EmbeddingError(f"{label}: {key!r} is a {_type_name(tensor)}, expected a tensor")
    if tensor.ndim == 1:
        return tensor.unsqueeze(0)  # (D,) -> (1, D)
    if tensor.ndim != 2:
        raise EmbeddingError(f"{label}: {key!r} has shape {tuple(tensor.shape)}, expected "
                             "(n, D) or (D,)")
    return tensor


def _tensor_value(data: dict[str, Any], key: str, label: str) -> torch.Tensor:
    value = data[key]
    if not isinstance(value, torch.Tensor):
        raise EmbeddingError(f"{label}: {key!r} is a {_type_name(value)}, expected a tensor")
    return value


def _with_metadata(parsed: ParsedEmbedding, data: dict[str, Any], label: str) -> ParsedEmbedding:
    name = data.get("name")
    if isinstance(name, str):
        parsed.stored_name = name
    step = data.get("step")
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = step.item()
    parsed.step = int(step) if isinstance(step, numbers.Integral) else None
    if parsed.step is not None and abs(parsed.step) >= 2**63:
        raise EmbeddingError(f"{label}: 'step' is not a training step (an integer of "
                             f"{parsed.step.bit_length()} bits)")
    for key in ("sd_checkpoint", "sd_checkpoint_name"):
        value = data.get(key)
        setattr(parsed, key, str(value) if isinstance(value, (str, int)) else None)
    return parsed


def _type_name(value: Any) -> str:
    if isinstance(value, InertObject):
        return value.qualified_name
    return type(value).__name__
