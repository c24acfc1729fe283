"""LoRA / LyCORIS files -> exact per-layer weight updates of tiengine's text encoders and UNet.

`load_lora(path, modules, family=...)` reads a file (safetensors, or a pickle through
`tiengine.io.safe_pickle` via `tiengine.weights_conv.readers.open_tensor_file`: nothing in it runs), maps its
layer names to the model's modules (`tiengine.networks.lora_keys`), checks that it was made for this model
and that every layer's tensors form an update of its weight (`tiengine.networks.lora_algorithms`), and
returns a `LoraNetwork` of `LayerUpdate`s. `LayerUpdate.delta(weight)` is the update already scaled by
alpha / dim (A1111's `calc_scale`), without the user's multiplier: a patcher applies
`weight + multiplier * update.delta(weight)`.

What A1111 (`extensions-builtin/Lora/networks.py`) does and this module does too: keys naming no layer of
the model are reported (`LoraNetwork.unmatched`) and skipped; `bundle_emb.<name>.*` keys are textual
inversion embeddings shipped inside the LoRA, returned as `Embedding`s (A1111 gives them no hash of their
own, so `Embedding.sha256` is None). What it refuses, each as a NetworkError naming the file, the key, what
was expected and what was found: a file made for another family (te1/te2 keys on a one-encoder model, a
cross-attention context or text-encoder width other than the model's), a file none of whose keys names a
layer of this model, a layer whose tensors do not fit (rank mismatch, shape not fitting the weight,
missing or unknown tensors such as DoRA's `dora_scale`), NaN or infinite values in any tensor it applies,
and two keys naming the same layer. Unreadable files (bad headers, hostile pickles) raise the reader's
NetworkError or UnsafePickleError.

`describe_lora(path)` needs no model (for `tiengine loras inspect FILE --json`): algorithms, ranks and
alphas, touched blocks, bundled embeddings, the sd-scripts `ss_*` metadata users look for, and the file's
A1111 hash. It reads the header and the scalar alphas, never the weights (the hash streams the file).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tiengine.embeddings.embedding import MAX_EMBEDDING_BYTES, Embedding
from tiengine.embeddings.layouts import BUNDLE_PREFIX, ENCODER_WIDTHS, parse_bundles
from tiengine.errors import CheckpointError, EmbeddingError, NetworkError
from tiengine.io.limits import MAX_NESTING_DEPTH, json_nesting_depth
from tiengine.networks.hashes import lora_file_hash, short_hash
from tiengine.networks.lora_algorithms import (
    _LayerFormatError,
    check_fits,
    compute_delta,
    identify,
    input_width,
    layer_dim,
    produced_shape,
)
from tiengine.networks.lora_keys import (
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    LayerIndex,
    Target,
    collect_evidence,
    component_of,
    family_mismatch,
    metadata_family,
    split_key,
)
from tiengine.weights_conv.readers import (
    ZIP_MAGIC,
    SafetensorsFile,
    TensorSource,
    open_tensor_file,
)

__all__ = ["LayerUpdate", "LoraNetwork", "describe_lora", "load_lora", "lora_file_hash"]

# sd-scripts training metadata shown by describe_lora (the rest is counted, not shown)
SHOWN_METADATA = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                  "ss_base_model_version", "ss_sd_model_name", "ss_output_name", "ss_training_comment",
                  "ss_num_train_images", "ss_num_epochs", "ss_resolution", "ss_clip_skip", "sshs_model_hash",
                  "modelspec.architecture", "modelspec.title")
TOP_TAGS = 20
MAX_SHOWN_VALUE_CHARS = 2000


@dataclass(frozen=True)
class LayerUpdate:
    """The update one file layer makes to one module's weight (module docstring)."""

    component: str  # Engine.modules key: "text_encoder", "text_encoder_2" or "unet"
    module: str  # module path in that component, e.g. "down_blocks.0.attentions.0.proj_in"
    algorithm: str  # "lora" (incl. LoCon conv and Tucker lora_mid), "loha", "lokr"
    key: str  # the file's key prefix it came from
    tensors: Mapping[str, torch.Tensor] = field(repr=False, compare=False)  # kohya tensor name -> as stored
    weight_shape: tuple[int, ...] = ()  # the target weight's shape when the file was loaded
    alpha: float | None = None
    dim: int | None = None  # what alpha is divided by (lora_algorithms docstring); None: no scaling

    @property
    def scale(self) -> float:
        """alpha / dim (A1111 `calc_scale`), 1 without an alpha or a dim."""
        return self.alpha / self.dim if self.alpha is not None and self.dim else 1.0

    def delta(self, weight: torch.Tensor, dyn_dim: int | None = None) -> torch.Tensor:
        """The update for `weight` (the target module's current weight), same shape, float32 on weight's
        device, already scaled by alpha/rank (A1111's calc_scale); the user's multiplier NOT included.

        dyn_dim: keep only the first `dyn_dim` ranks of a plain LoRA layer (A1111 `dyn=`); None keeps all.
        """
        if tuple(weight.shape) != self.weight_shape:
            raise NetworkError(f"{self.key}: the update was made for {self.component}.{self.module} of shape "
                               f"{list(self.weight_shape)}, the weight given has shape {list(weight.shape)}")
        if dyn_dim is not None and dyn_dim < 1:
            raise NetworkError(f"{self.key}: dyn_dim must be at least 1, got {dyn_dim}")
        return compute_delta(self.algorithm, self.tensors, self.weight_shape, self.scale, weight.device, dyn_dim)


@dataclass
class LoraNetwork:
    """A LoRA file read for one model: its updates, what did not match, bundled embeddings, metadata.

    `family` is what the file's keys and widths say (te1/te2 keys, a 768 / 1024 / 2048-wide context, ...);
    where its widths are no released model's (small test models) but fit the model, the model's family.
    """

    path: Path
    family: str | None  # "sd1" | "sd2" | "sdxl", detected from the keys/shapes
    updates: tuple[LayerUpdate, ...]
    unmatched: tuple[str, ...]  # file keys naming no layer of this model (reported, not fatal)
    bundled_embeddings: dict[str, Embedding]  # tiengine.embeddings.embedding.Embedding
    metadata: dict[str, str]  # safetensors __metadata__ (ss_* training metadata), {} for pickles


def _open(path: Path) -> TensorSource:
    try:
        return open_tensor_file(path)
    except CheckpointError as error:
        raise NetworkError(str(error)) from None


def _group(keys: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """({layer prefix: {tensor name: key}}, bundled-embedding keys), in file order."""
    layers: dict[str, dict[str, str]] = {}
    bundled = []
    for key in keys:
        if key.startswith(BUNDLE_PREFIX):
            bundled.append(key)
            continue
        prefix, tensor = split_key(key)
        layers.setdefault(prefix, {})[tensor] = key
    return layers, bundled


def _shapes(source: TensorSource, names: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    return {tensor: source.info(key).shape for tensor, key in names.items()}


def _layer_inputs(source: TensorSource, layers: Mapping[str, Mapping[str, str]]) -> dict[str, tuple[int | None, str]]:
    """{layer prefix: (input width, a key)} for the family evidence; shapes only."""
    found = {}
    for prefix, names in layers.items():
        try:
            algorithm = identify(set(names))
        except _LayerFormatError:
            continue
        found[prefix] = (input_width(algorithm, _shapes(source, names)), next(iter(names.values())))
    return found


def read_checked_tensor(source: TensorSource, key: str) -> torch.Tensor:
    """One tensor, refused (NetworkError naming the file and key) unless it is floating point and finite."""
    try:
        tensor = source.read(key)
    except CheckpointError as error:
        raise NetworkError(str(error)) from None
    if not tensor.dtype.is_floating_point:
        raise NetworkError(f"{source.path}: tensor {key!r} is {tensor.dtype}, expected floating point")
    # Fast path: a float32 sum is finite when every element is (NaN and inf propagate); only a non-finite
    # sum (a bad value, or an overflow of huge finite ones) pays for the elementwise check.
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return tensor
    bad = int((~torch.isfinite(tensor.float())).sum())  # .float(): isfinite has no float8 kernel
    if bad:
        raise NetworkError(f"{source.path}: tensor {key!r} {list(tensor.shape)} holds {bad} NaN or infinite "
                           "value(s); expected finite numbers")
    return tensor


def read_alpha(source: TensorSource, key: str) -> float:
    """A LoRA layer's `.alpha`: one finite number (NetworkError naming the file and key otherwise)."""
    tensor = read_checked_tensor(source, key)
    if tensor.numel() != 1:
        raise NetworkError(f"{source.path}: {key!r} has shape {list(tensor.shape)}, expected a scalar alpha")
    return float(tensor.reshape(()).item())


def _layer_update(source: TensorSource, prefix: str, names: Mapping[str, str], target: Target) -> LayerUpdate:
    where = (f"{source.path}: layer {prefix!r} ({target.component}.{target.module}, "
             f"weight {list(target.weight_shape)})")
    try:
        algorithm = identify(set(names))
        shapes = _shapes(source, {name: key for name, key in names.items() if name != "alpha"})
        check_fits(produced_shape(algorithm, shapes), target.weight_shape)
        for name, shape in shapes.items():
            if 0 in shape:
                raise _LayerFormatError(f"{name} has an empty shape {list(shape)}")
    except _LayerFormatError as error:
        raise NetworkError(f"{where} {error}") from None
    tensors = {name: read_checked_tensor(source, key) for name, key in names.items() if name != "alpha"}
    alpha = read_alpha(source, names["alpha"]) if "alpha" in names else None
    return LayerUpdate(target.component, target.module, algorithm, prefix, tensors, target.weight_shape, alpha,
                       layer_dim(algorithm, shapes))


def _bundled_embeddings(source: TensorSource, keys: list[str]) -> dict[str, Embedding]:
    """`bundle_emb.<name>.*` tensors -> Embeddings (tiengine.embeddings.layouts.parse_bundles)."""
    if not keys:
        return {}
    declared = sum(source.info(key).nbytes for key in keys)
    if declared > MAX_EMBEDDING_BYTES:
        raise NetworkError(f"{source.path}: the bundled embeddings declare {declared} bytes, more than embeddings "
                           f"may hold ({MAX_EMBEDDING_BYTES}); refused before reading them")
    try:
        tensors = {key: source.read(key) for key in keys}
        parsed = parse_bundles(tensors, str(source.path))
        container = _container(source)
        return {name: Embedding(name=name, vectors=entry.vectors, step=entry.step, sd_checkpoint=entry.sd_checkpoint,
                                sd_checkpoint_name=entry.sd_checkpoint_name, format=entry.layout, path=source.path,
                                stored_name=name, container=container)
                for name, entry in sorted(parsed.items())}
    except (EmbeddingError, CheckpointError) as error:
        raise NetworkError(str(error)) from None


def _container(source: TensorSource) -> str:
    """The container names Embedding uses: "safetensors", "torch_zip" or "torch_legacy"."""
    if isinstance(source, SafetensorsFile):
        return "safetensors"
    with open(source.path, "rb") as file:
        return "torch_zip" if file.read(len(ZIP_MAGIC)) == ZIP_MAGIC else "torch_legacy"


def load_lora(path: str | os.PathLike[str], modules: Mapping[str, nn.Module], *, family: str) -> LoraNetwork:
    """Read a LoRA / LyCORIS file as updates of `modules` (Engine.modules) of a `family` model.

    See the module docstring for what is accepted and refused.
    """
    path = Path(path)
    index = LayerIndex(modules)
    source = _open(path)
    try:
        keys = source.keys()
        layers, bundled_keys = _group(keys)
        evidence = collect_evidence(_layer_inputs(source, layers))
        mismatch = family_mismatch(evidence, index, family)
        if mismatch is not None:
            raise NetworkError(f"{path}: {mismatch}")
        matched: dict[str, tuple[str, Target]] = {}
        unmatched: list[str] = []
        for prefix, names in layers.items():
            target = index.resolve(prefix)
            if target is None:
                unmatched.extend(names.values())
                continue
            owner = matched.get(f"{target.component}.{target.module}")
            if owner is not None:
                raise NetworkError(f"{path}: keys {owner[0]!r} and {prefix!r} both name {target.component}."
                                   f"{target.module}; expected one layer per module")
            matched[f"{target.component}.{target.module}"] = (prefix, target)
        if not matched and not bundled_keys:
            raise NetworkError(
                f"{path}: no key names a layer of this {family} model ({len(keys)} keys, e.g. "
                f"{', '.join(repr(key) for key in keys[:3]) or 'none'}); expected kohya names (lora_unet_*, "
                "lora_te_*) or diffusers/PEFT names (unet.*, text_encoder.*) of this model's layers"
            )
        updates = tuple(_layer_update(source, prefix, layers[prefix], target) for prefix, target in matched.values())
        embeddings = _bundled_embeddings(source, bundled_keys)
        metadata = source.metadata
    finally:
        source.close()
    return LoraNetwork(path, evidence.guess() or family, updates, tuple(unmatched), embeddings, metadata)


# describe_lora ------------------------------------------------------------------------------------


def describe_lora(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a LoRA file holds, without a model (JSON-able; module docstring). Keys:

    path, file_bytes; hash / short_hash (A1111's, tiengine.networks.hashes), metadata_hash (sd-scripts'
    `sshs_model_hash`, or None) and metadata_hash_matches; algorithms {name: layers}; family ("sd1" / "sd2" /
    "sdxl" / None) and family_evidence; layers, keys; rank and alpha ({min, max, values} or None); text_encoder
    (bool); blocks {component: {layers, conv_layers, encoder_layers | down / mid / up / other {block: layers}}}
    in the file's own block names; conv_layers (kernels wider than 1x1); unsupported_layers {prefix: reason}
    (first 20) and unsupported_count; bundled_embeddings [{name, vectors, widths {encoder: width}}];
    metadata (the sd-scripts keys users look for, ss_tag_frequency summarised) and metadata_keys (count).
    """
    path = Path(path)
    source = _open(path)
    try:
        keys = source.keys()
        layers, bundled_keys = _group(keys)
        evidence = collect_evidence(_layer_inputs(source, layers))
        algorithms: dict[str, int] = {}
        unsupported: dict[str, str] = {}
        ranks, alphas = [], []
        blocks: dict[str, dict[str, Any]] = {}
        for prefix, names in layers.items():
            try:
                algorithm = identify(set(names))
            except _LayerFormatError as error:
                unsupported[prefix] = str(error)
                continue
            algorithms[algorithm] = algorithms.get(algorithm, 0) + 1
            shapes = _shapes(source, names)
            dim = layer_dim(algorithm, shapes)
            if dim is not None:
                ranks.append(dim)
            if "alpha" in names:
                alphas.append(read_alpha(source, names["alpha"]))
            _count_block(blocks, prefix, shapes)
        metadata = source.metadata
        bundled = _describe_bundles(source, bundled_keys)
    finally:
        source.close()
    full = lora_file_hash(path)
    stored = metadata.get("sshs_model_hash")
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "hash": full,
        "short_hash": short_hash(full),
        "metadata_hash": stored,
        "metadata_hash_matches": None if stored is None else stored.lower() == full,
        "algorithms": algorithms,
        "family": evidence.guess() or metadata_family(metadata),
        "family_evidence": evidence.summary() or (["training metadata"] if metadata_family(metadata) else []),
        "layers": sum(algorithms.values()),
        "keys": len(keys),
        "rank": _range(ranks),
        "alpha": _range(alphas),
        "text_encoder": any(name in blocks for name in (TEXT_ENCODER, TEXT_ENCODER_2)),
        "blocks": blocks,
        "conv_layers": sum(part.get("conv_layers", 0) for part in blocks.values()),
        "unsupported_layers": dict(list(unsupported.items())[:20]),
        "unsupported_count": len(unsupported),
        "bundled_embeddings": bundled,
        "metadata": _shown_metadata(metadata),
        "metadata_keys": len(metadata),
    }


def _range(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    distinct = sorted(set(values))
    return {"min": distinct[0], "max": distinct[-1], "values": distinct[:16]}


UNET_REGIONS = {("down", "blocks"): "down", ("input", "blocks"): "down", ("mid", "block"): "mid",
                ("middle", "block"): "mid", ("up", "blocks"): "up", ("output", "blocks"): "up"}
NAME_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_", "base_model.model.", "unet.", "text_encoder_2.",
                 "text_encoder.")


def _count_block(blocks: dict[str, dict[str, Any]], prefix: str, shapes: Mapping[str, tuple]) -> None:
    """Add one layer to the per-component summary: text-encoder layer numbers, UNet blocks by region.

    Works on the file's own names: UNet blocks are diffusers' (`down_blocks.1`) or LDM's (`input_blocks.4`),
    whichever the file uses; without a model the two cannot be related.
    """
    body = prefix
    for name in NAME_PREFIXES:
        body = body.removeprefix(name)
    component = component_of(prefix) or (TEXT_ENCODER if body.startswith(("text_model", "encoder")) else UNET)
    tokens = body.replace(".", "_").split("_")  # kohya and dotted names read alike
    part = blocks.setdefault(component, {"layers": 0, "conv_layers": 0})
    part["layers"] += 1
    if any(len(shape) == 4 and shape[2:] != (1, 1) for shape in shapes.values()):  # a kernel wider than 1x1
        part["conv_layers"] += 1
    if component != UNET:
        numbers = [int(after) for token, after in pairwise(tokens) if token == "layers" and after.isdigit()]
        if numbers:
            part["encoder_layers"] = sorted(set(part.get("encoder_layers", [])) | {numbers[0]})
        return
    region = UNET_REGIONS.get(tuple(tokens[:2]), "other")
    if region == "mid":
        label = "_".join(tokens[:2])
    elif region != "other" and len(tokens) > 2 and tokens[2].isdigit():
        label = f"{tokens[0]}_{tokens[1]}.{tokens[2]}"
    else:
        label = body
    found = part.setdefault(region, {})
    found[label] = found.get(label, 0) + 1


def _describe_bundles(source: TensorSource, keys: list[str]) -> list[dict[str, Any]]:
    """Name, vector count and widths of each bundled embedding, from the header's shapes."""
    found: dict[str, dict[str, Any]] = {}
    for key in keys:
        _, name, rest = (key.split(".", 2) + ["", ""])[:3]
        shape = source.info(key).shape
        entry = found.setdefault(name, {"name": name, "vectors": None, "widths": {}})
        if shape:  # (n, D) or (D,)
            entry["vectors"] = shape[0] if len(shape) == 2 else 1
            # A1111's one-encoder layout: the encoder by width as tiengine.embeddings reads it (custom: clip_l)
            part = ("clip_h" if shape[-1] == ENCODER_WIDTHS["clip_h"] else "clip_l") if rest.startswith(
                "string_to_param") else rest
            entry["widths"][part] = shape[-1]
    return [found[name] for name in sorted(found)]


def _shown_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    shown: dict[str, Any] = {key: metadata[key][:MAX_SHOWN_VALUE_CHARS] for key in SHOWN_METADATA if key in metadata}
    if "ss_tag_frequency" in metadata:
        shown["ss_tag_frequency"] = _tag_summary(metadata["ss_tag_frequency"])
    return shown


def _tag_summary(raw: str) -> dict[str, Any]:
    """ss_tag_frequency ({dataset folder: {tag: count}}) -> datasets, distinct tags, the most frequent."""
    if json_nesting_depth(raw, MAX_NESTING_DEPTH) > MAX_NESTING_DEPTH:
        return {"error": f"nests deeper than {MAX_NESTING_DEPTH} levels; not decoded"}
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as error:
        return {"error": f"not valid JSON ({error})"}
    if not isinstance(data, dict):
        return {"error": f"a JSON {type(data).__name__}, expected an object of datasets"}
    totals: dict[str, float] = {}
    for tags in data.values():
        if isinstance(tags, dict):
            for tag, count in tags.items():
                if isinstance(count, (int, float)) and math.isfinite(count):
                    totals[str(tag)] = totals.get(str(tag), 0) + count
    top = sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:TOP_TAGS]
    return {"datasets": len(data), "distinct_tags": len(totals), "top": [[tag, count] for tag, count in top]}
