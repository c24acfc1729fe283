"""A1111 hypernetworks (`<hypernet:name:strength>`): the `models/hypernetworks/*.pt` files of AUTOMATIC1111's
"Train > Create hypernetwork", read without running code, applied to the UNet's attention context.

Restated from the algorithm of A1111's modules/hypernetworks/hypernetwork.py (HypernetworkModule,
parse_dropout_structure, Hypernetwork.load and shorthash, apply_single_hypernetwork, apply_hypernetworks)
and modules/extra_networks_hypernet.py; the key names below are A1111's.

The file is a pickled dict. Each int key is a context width (SD1: 768 for the text context and 320, 640,
1280 for self-attention; SD2: 1024; SDXL: 2048, 640, 1280) holding a pair (tuple, or list in the first
files) of state dicts: the module for the key context, then the one for the value context. The other keys,
with A1111's defaults when absent: layer_structure [1, 2, 1]; activation_func None; is_layer_norm False;
activate_output True; dropout_structure None, then derived from use_dropout (False) and last_layer_dropout
(False) as parse_dropout_structure does; weight_initialization "Normal"; name, step 0, sd_checkpoint,
sd_checkpoint_name, optional_info. Older versions also kept "optimizer_state_dict" here; it is never read.
The first hypernetworks (NovelAI's) name their two layers linear1 / linear2, renamed to linear.0 /
linear.1 as A1111 does.

The module for width d (HypernetworkModule) is `linear`, an nn.Sequential whose indices fix the state-dict
keys. For each layer i of the n - 1 that layer_structure m (n entries) describes, in this order:
Linear(int(d * m[i]), int(d * m[i+1])); the activation, unless activation_func is None or "linear" or i is
the last layer and activate_output is false; LayerNorm(int(d * m[i+1])) when is_layer_norm; a Dropout slot
when dropout_structure[i+1] > 0 (an identity here: inference only, the slot keeps the indices). Its output
is x + linear(x) * multiplier, the multiplier being the tag's strength (1.0 when the tag gives none).

Activations (ACTIVATIONS): A1111's "relu", "leakyrelu", "elu", "swish" (torch's Hardswish), "tanh",
"sigmoid", and every class of torch.nn.modules.activation under its lower-cased name. Of those, GLU
(halves the width) and Threshold / MultiheadAttention (need constructor arguments) cannot run, in A1111
either, and are refused. A1111 builds Softmax, Softmin and LogSoftmax without a dim, for which torch
picks dim 0 on a 3-D context (B, M, C): they normalise over the batch (built here with dim=0, the same
result without the deprecation warning); Softmax2d does the same (its dim -3).

In every attention of the UNet, self- and cross-attention alike, the key/value source (B, M, C) goes
through the k module into to_k and through the v module into to_v, when the hypernetwork has a pair for
width C; several hypernetworks chain in order. A width that no attention of the model has is never used
(A1111 ignores it silently; apply_hypernetworks reports it). A1111's short hash is the first 10 hex digits
of the file's sha256.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tiengine.errors import CheckpointError, NetworkError, UnsafePickleError
from tiengine.io.safe_pickle import TensorRef, open_torch_file
from tiengine.models.layers import Attention
from tiengine.models.layers import layer_norm as upcast_layer_norm
from tiengine.models.unet import UNet2DConditionModel

SHORT_HASH_LENGTH = 10  # A1111 Hypernetwork.shorthash
# declared tensor bytes (optimizer state included); an SD1 [1, 2, 1] file holds 88 MB, SDXL's 200 MB
MAX_HYPERNETWORK_BYTES = 4 * 2**30
MAX_LAYERS = 64  # layer_structure entries; real files have 3 to 6
MAX_SIZES = 64  # context widths in one file; real files have 3 or 4
MAX_WIDTH = 2**20  # features of one layer; real files: up to a few thousand (SDXL 2048 x 4)
DEFAULT_LAYER_STRUCTURE = (1.0, 2.0, 1.0)  # A1111 Hypernetwork.load
IMPLIED_DROPOUT = 0.3  # A1111 parse_dropout_structure
NO_ACTIVATION = (None, "linear")

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish, "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    # the rest of torch.nn.modules.activation, by lower-cased class name
    "celu": nn.CELU, "gelu": nn.GELU, "hardshrink": nn.Hardshrink, "hardsigmoid": nn.Hardsigmoid,
    "hardswish": nn.Hardswish, "hardtanh": nn.Hardtanh, "logsigmoid": nn.LogSigmoid, "mish": nn.Mish,
    "prelu": nn.PReLU, "relu6": nn.ReLU6, "rrelu": nn.RReLU, "selu": nn.SELU, "silu": nn.SiLU,
    "softmax2d": nn.Softmax2d, "softplus": nn.Softplus, "softshrink": nn.Softshrink, "softsign": nn.Softsign,
    "tanhshrink": nn.Tanhshrink,
    # A1111 builds these without a dim, for which torch picks dim 0 on a 3-D input (its _get_softmax_dim)
    "softmax": partial(nn.Softmax, dim=0), "softmin": partial(nn.Softmin, dim=0),
    "logsoftmax": partial(nn.LogSoftmax, dim=0),
}  # fmt: skip
REFUSED_ACTIVATIONS = {
    "glu": "GLU halves the width, so the layers after it cannot take its output",
    "threshold": "torch.nn.Threshold needs constructor arguments that A1111 does not give",
    "multiheadattention": "torch.nn.MultiheadAttention needs constructor arguments that A1111 does not give",
}
OLD_KEY_NAMES = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
                 "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}  # fmt: skip

KeyValueContext = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class HypernetworkModule(nn.Module):
    """A1111's HypernetworkModule for context width `width` (see the module docstring); built for
    inference: a Dropout slot is an identity and RReLU runs its fixed evaluation slope."""

    def __init__(self, width: int, *, layer_structure: Sequence[float], activation: str | None,
                 layer_norm: bool, activate_output: bool, dropout_structure: Sequence[float]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        last = len(layer_structure) - 2
        for i in range(len(layer_structure) - 1):
            out_features = int(width * layer_structure[i + 1])
            layers.append(nn.Linear(int(width * layer_structure[i]), out_features))
            if activation not in NO_ACTIVATION and (i < last or activate_output):
                layers.append(ACTIVATIONS[activation]())
            if layer_norm:
                layers.append(nn.LayerNorm(out_features))
            if dropout_structure[i + 1] > 0:
                layers.append(nn.Identity())  # A1111's Dropout(p): nothing at inference, keeps the indices
        self.linear = nn.Sequential(*layers)
        self.eval()

    def forward(self, x: torch.Tensor, multiplier: float) -> torch.Tensor:
        """x (B, M, width) -> x + linear(x) * multiplier, computed in the weights' dtype, returned in x's."""
        source = x.to(self.linear[0].weight.dtype)
        h = source
        for layer in self.linear:
            h = upcast_layer_norm(layer, h) if isinstance(layer, nn.LayerNorm) else layer(h)  # fp32 for halves
        return (source + h * multiplier).to(x.dtype)


@dataclass
class Hypernetwork:
    """One loaded hypernetwork: `layers` maps a context width to its (k, v) modules.

    `name` is the file stem (what `<hypernet:name>` refers to); `stored_name` the file's own "name".
    """

    name: str
    path: Path
    sha256: str
    layer_structure: tuple[float, ...]
    activation: str | None
    layer_norm: bool
    activate_output: bool
    dropout_structure: tuple[float, ...]
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = field(repr=False)
    stored_name: str | None = None
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    weight_initialization: str | None = None
    optional_info: str | None = None
    has_optimizer_state: bool = False
    stored_dtypes: tuple[str, ...] = ()

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self.layers))

    @property
    def short_hash(self) -> str:
        return self.sha256[:SHORT_HASH_LENGTH]

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for pair in self.layers.values() for module in pair for p in module.parameters())

    def description(self) -> dict[str, Any]:
        """The JSON-able facts of this hypernetwork, for a listing."""
        return {
            "name": self.name, "path": str(self.path), "sha256": self.sha256, "short_hash": self.short_hash,
            "stored_name": self.stored_name, "sizes": list(self.sizes),
            "layer_structure": list(self.layer_structure), "activation": self.activation,
            "layer_norm": self.layer_norm, "activate_output": self.activate_output,
            "dropout_structure": list(self.dropout_structure),
            "weight_initialization": self.weight_initialization, "step": self.step,
            "sd_checkpoint": self.sd_checkpoint, "sd_checkpoint_name": self.sd_checkpoint_name,
            "optional_info": self.optional_info, "parameters": self.parameter_count,
            "stored_dtypes": list(self.stored_dtypes), "has_optimizer_state": self.has_optimizer_state,
        }  # fmt: skip


# -- reading ----------------------------------------------------------------------------------------
def hypernetwork_file_hash(path: str | os.PathLike[str]) -> str:
    """Full sha256 (hex) of the file's bytes: A1111's Hypernetwork.shorthash source."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(2**20), b""):
                digest.update(chunk)
    except OSError as error:
        raise NetworkError(f"{path}: cannot read ({error.strerror})") from None
    return digest.hexdigest()


def load_hypernetwork(path: str | os.PathLike[str], *, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32, max_bytes: int = MAX_HYPERNETWORK_BYTES) -> Hypernetwork:
    """Read an A1111 hypernetwork .pt and build its modules on `device` in `dtype` (the engine's).

    Raises NetworkError naming the file, the key, what was expected and what was found, for any file that
    is not a well-formed hypernetwork; the pickle is read by tiengine.io.safe_pickle (no code runs).
    max_bytes bounds the tensor bytes the file declares (refused before any is read).
    """
    path = Path(path)
    try:
        with open_torch_file(path, max_storage_bytes=max_bytes) as archive:
            root = archive.root
            if not isinstance(root, dict):
                raise NetworkError(f"{path}: expected a dict (an A1111 hypernetwork), found {_shown(root)}")
            settings = _read_settings(path, root)
            pairs = _read_pairs(path, root)
            layers = {size: (_build(path, size, "k", states[0], settings, device, dtype),
                             _build(path, size, "v", states[1], settings, device, dtype))
                      for size, states in pairs.items()}  # fmt: skip
    except (CheckpointError, UnsafePickleError) as error:
        message = str(error).replace("(max_storage_bytes)", "(max_bytes)")  # this function's option
        raise NetworkError(message if str(path) in message else f"{path}: {message}") from None
    stored_dtypes = sorted({str(ref.dtype).removeprefix("torch.") for states in pairs.values()
                            for state in states for ref in state.values()})  # fmt: skip
    return Hypernetwork(
        name=path.stem, path=path, sha256=hypernetwork_file_hash(path), layers=layers,
        has_optimizer_state="optimizer_state_dict" in root, stored_dtypes=tuple(stored_dtypes), **settings,
    )


def describe_hypernetwork(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check one file (on the CPU, fp32) and return its JSON-able description."""
    return load_hypernetwork(path).description()


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.80}"


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def _setting(path: Path, root: dict, key: str, kinds: tuple[type, ...], default: Any, expected: str) -> Any:
    """root[key] (default when absent) if it is None or one of `kinds` (bool excluded unless asked)."""
    value = root.get(key, default)
    if value is None or (isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))):
        return value
    raise NetworkError(f"{path}: key '{key}': expected {expected}, found {_shown(value)}")


def _read_settings(path: Path, root: dict) -> dict[str, Any]:
    """The module layout and metadata keys, checked, with A1111's defaults (Hypernetwork.load)."""
    structure = root.get("layer_structure", DEFAULT_LAYER_STRUCTURE)
    if (not isinstance(structure, (list, tuple)) or not 2 <= len(structure) <= MAX_LAYERS
            or not all(_is_number(m) and m > 0 for m in structure) or structure[0] != 1 or structure[-1] != 1):
        raise NetworkError(f"{path}: key 'layer_structure': expected 2 to {MAX_LAYERS} positive width "
                           f"multipliers starting and ending with 1 (e.g. [1, 2, 1]), found {_shown(structure)}")
    layer_structure = tuple(float(m) for m in structure)
    activation = _setting(path, root, "activation_func", (str,), None, "an activation name or None")
    if activation in REFUSED_ACTIVATIONS:
        raise NetworkError(f"{path}: key 'activation_func': '{activation}' cannot run: "
                           f"{REFUSED_ACTIVATIONS[activation]}")
    if activation not in NO_ACTIVATION and activation not in ACTIVATIONS:
        raise NetworkError(f"{path}: key 'activation_func': expected one of linear, "
                           f"{', '.join(sorted(ACTIVATIONS))}, found {activation!r:.80}")
    flags = {key: bool(_setting(path, root, key, (bool,), default, "true or false"))  # None reads as false
             for key, default in (("is_layer_norm", False), ("use_dropout", False),
                                  ("activate_output", True), ("last_layer_dropout", False))}  # fmt: skip
    dropout = root.get("dropout_structure")
    if dropout is None:
        dropout = _implied_dropout(len(layer_structure), flags["use_dropout"], flags["last_layer_dropout"])
    elif (not isinstance(dropout, (list, tuple)) or len(dropout) < len(layer_structure)
          or not all(_is_number(p) and p < 1 for p in dropout[: len(layer_structure)])):
        raise NetworkError(f"{path}: key 'dropout_structure': expected a dropout probability below 1 for each "
                           f"of the {len(layer_structure)} entries of layer_structure, found {_shown(dropout)}")
    return {
        "layer_structure": layer_structure, "activation": activation, "layer_norm": flags["is_layer_norm"],
        "activate_output": flags["activate_output"],
        "dropout_structure": tuple(float(p) for p in dropout[: len(layer_structure)]),
        "stored_name": _setting(path, root, "name", (str,), None, "a string"),
        "step": _setting(path, root, "step", (int,), 0, "a step count") or 0,
        "sd_checkpoint": _setting(path, root, "sd_checkpoint", (str,), None, "a checkpoint hash string"),
        "sd_checkpoint_name": _setting(path, root, "sd_checkpoint_name", (str,), None, "a checkpoint name"),
        "weight_initialization": _setting(path, root, "weight_initialization", (str,), "Normal", "a string"),
        "optional_info": _setting(path, root, "optional_info", (str,), None, "a string"),
    }  # fmt: skip


def _implied_dropout(count: int, use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's parse_dropout_structure: p after every hidden layer but the last, which has it only
    with last_layer_dropout; none without use_dropout. Entry i+1 follows layer i."""
    if not use_dropout:
        return [0.0] * count
    return [0.0, *[IMPLIED_DROPOUT] * (count - 3), IMPLIED_DROPOUT if last_layer_dropout else 0.0, 0.0]


def _read_pairs(path: Path, root: dict) -> dict[int, tuple[dict[str, TensorRef], dict[str, TensorRef]]]:
    """int key -> (k state, v state) with old layer names renamed; other keys are metadata (ignored
    unless read by _read_settings, as A1111 does)."""
    pairs = {}
    for size, value in root.items():
        if type(size) is not int:
            continue
        if size <= 0:
            raise NetworkError(f"{path}: key {size}: expected a positive context width")
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(s, dict) for s in value):
            raise NetworkError(f"{path}: key {size}: expected a pair of state dicts (the k and v modules), "
                               f"found {_shown(value)}")
        pairs[size] = tuple({OLD_KEY_NAMES.get(key, key): ref for key, ref in state.items()} for state in value)
    if not pairs:
        raise NetworkError(f"{path}: expected int keys (context widths such as 768) holding the hypernetwork's "
                           f"layers, found none (keys: {', '.join(map(str, list(root)[:12]))})")
    if len(pairs) > MAX_SIZES:
        raise NetworkError(f"{path}: expected at most {MAX_SIZES} context widths, found {len(pairs)}")
    return pairs


def _build(path: Path, size: int, which: str, state: dict[Any, Any], settings: dict[str, Any],
           device: torch.device | str, dtype: torch.dtype) -> HypernetworkModule:
    """One module: shapes checked against the layout before any tensor is read, then the tensors."""
    widths = [int(size * m) for m in settings["layer_structure"]]
    if not all(1 <= width <= MAX_WIDTH for width in widths):
        raise NetworkError(f"{path}: key {size}: layer_structure {list(settings['layer_structure'])} gives the "
                           f"layer widths {widths}; expected each from 1 to {MAX_WIDTH}")
    with torch.device("meta"):  # no memory: only the expected keys and shapes
        module = HypernetworkModule(
            size, layer_structure=settings["layer_structure"], activation=settings["activation"],
            layer_norm=settings["layer_norm"], activate_output=settings["activate_output"],
            dropout_structure=settings["dropout_structure"],
        )
    where = f"{path}: key {size}, {which} module"
    expected = {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(map(str, set(state) - set(expected)))
    if missing or unexpected:
        raise NetworkError(
            f"{where}: layer_structure {list(settings['layer_structure'])}, activation {settings['activation']}, "
            f"layer norm {settings['layer_norm']} and dropout {list(settings['dropout_structure'])} expect "
            f"the keys {', '.join(expected)}; missing: {', '.join(missing) or 'none'}; "
            f"unexpected: {', '.join(unexpected[:12]) or 'none'}"
        )
    tensors = {}
    for key, shape in expected.items():
        ref = state[key]
        if not isinstance(ref, TensorRef) or not ref.dtype.is_floating_point:
            raise NetworkError(f"{where}: '{key}': expected a floating-point tensor, found "
                               f"{ref.dtype if isinstance(ref, TensorRef) else _shown(ref)}")
        if ref.shape != shape:
            raise NetworkError(f"{where}: '{key}': expected shape {list(shape)} (width {size}), "
                               f"found {list(ref.shape)}")
        tensor = ref.load(copy=True)
        if not torch.isfinite(tensor).all():
            raise NetworkError(f"{where}: '{key}' holds NaN or infinite values")
        tensors[key] = tensor.to(device=device, dtype=dtype)
        if not torch.isfinite(tensors[key]).all():
            raise NetworkError(f"{where}: '{key}' overflows {dtype} (largest magnitude "
                               f"{tensor.abs().max().item():.4g}); load it in a wider dtype")
    module.load_state_dict(tensors, assign=True)
    return module.requires_grad_(False)


# -- applying ---------------------------------------------------------------------------------------
def hypernetwork_context(active: Sequence[tuple[Hypernetwork, float]]) -> KeyValueContext:
    """The attention hook (UNet2DConditionModel.set_key_value_context) for these hypernetworks and
    multipliers: context (B, M, C) -> (key context, value context), chained in order as A1111's
    apply_hypernetworks; a hypernetwork without a pair for width C leaves both unchanged."""
    chain = []
    for hypernetwork, multiplier in active:
        if not _is_number(multiplier):
            raise NetworkError(f"hypernetwork '{hypernetwork.name}': expected a finite strength, found "
                               f"{multiplier!r:.40}")
        chain.append((dict(hypernetwork.layers), float(multiplier)))

    def key_value_context(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = value = context
        for layers, multiplier in chain:
            pair = layers.get(context.shape[-1])
            if pair is not None:
                key, value = pair[0](key, multiplier), pair[1](value, multiplier)
        return key, value

    return key_value_context


def attention_context_widths(unet: UNet2DConditionModel) -> frozenset[int]:
    """The widths of the key/value sources of the UNet's attentions (self-attention: its channels;
    cross-attention: the text context's)."""
    return frozenset(module.to_k.in_features for module in unet.modules() if isinstance(module, Attention))


def apply_hypernetworks(unet: UNet2DConditionModel, active: Sequence[tuple[Hypernetwork, float]]) -> tuple[str, ...]:
    """Set the hook for `active` on every attention of `unet` (an empty `active` removes it, restoring the
    plain attention). Returns one notice per hypernetwork with sizes no attention of this UNet has."""
    widths = attention_context_widths(unet)
    device = next(unet.parameters()).device
    notices = []
    for hypernetwork, _multiplier in active:
        module_device = next(hypernetwork.layers[hypernetwork.sizes[0]][0].parameters()).device
        if module_device != device:
            raise NetworkError(f"{hypernetwork.path}: hypernetwork is on {module_device}, the UNet on {device}; "
                               "load it with the engine's device")
        unused = [size for size in hypernetwork.sizes if size not in widths]
        if unused:
            notices.append(f"{hypernetwork.path}: hypernetwork '{hypernetwork.name}' has layers for context "
                           f"width {', '.join(map(str, unused))}, which no attention of this model has (its "
                           f"widths: {', '.join(map(str, sorted(widths)))}); they are not used")
    unet.set_key_value_context(hypernetwork_context(active) if active else None)
    return tuple(notices)
