"""The weight updates of LoRA, LoCon / Tucker LoRA, LoHa and LoKr layers, and their shape checks.

Formulas (tensor names as kohya-ss sd-scripts and LyCORIS write them; the reconstructions follow
AUTOMATIC1111's `extensions-builtin/Lora/{network_lora,network_hada,network_lokr,lyco_helpers}.py`):

- lora: `up (out, r[, 1, 1])`, `down (r, in[, kh, kw])`: delta = up @ down.flatten(1), reshaped to the
  weight (LoCon convolutions: `(up.flatten(1) @ down.flatten(1)).reshape(W.shape)`). With `lora_mid
  (r, r, kh, kw)` (LyCORIS' Tucker / CP form of a convolution, down and up then 1x1):
  delta[i, j, k, l] = sum_{n,m} up[i, n] mid[n, m, k, l] down[m, j]. dim = down.shape[0].
- loha: (w1_a @ w1_b) * (w2_a @ w2_b), elementwise. With `hada_t1` / `hada_t2 (r, r, kh, kw)` each factor
  is the CP product t[n, m, k, l] w_a[n, i] w_b[m, j] (LyCORIS stores w_a (r, out), w_b (r, in) then).
  dim = w1_b.shape[0].
- lokr: kron(w1, w2) with w1 = `lokr_w1` or w1_a @ w1_b, w2 = `lokr_w2`, or w2_a @ w2_b, or the CP product
  of `lokr_t2` with w2_a, w2_b; a 4-D w2 makes w1 (a, b, 1, 1). dim = w2_b.shape[0], else w1_b.shape[0],
  else none (A1111 reads both and the second wins).

scale = alpha / dim when the layer has an `alpha` and a dim, else 1 (A1111 `NetworkModule.calc_scale`).
`dyn_dim` (A1111's `<lora:name:te:unet:dyn>`) keeps the first `dyn_dim` ranks of a plain lora layer
(`up[:, :dyn]`, `down[:dyn]`) and changes nothing else, the scale included; A1111 applies it in
`rebuild_conventional` only, so Tucker, LoHa and LoKr layers ignore it here too.

A1111 pads a 4-input-channel update of `conv_in` with zeros for an inpainting UNet (9 input channels);
so does `compute_delta`.

All shape checks work on shapes alone, so `describe_lora` and `load_lora` can run them before reading data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

Shape = tuple[int, ...]

ALGORITHM_TENSORS: dict[str, frozenset[str]] = {
    "lora": frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"}),
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}),
    "lokr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}),
}
# The tensor that tells each algorithm apart (A1111's ModuleType.create_module tests).
ALGORITHM_MARKERS = (("lora", ("lora_down.weight", "lora_up.weight", "lora_mid.weight")),
                     ("loha", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
                     ("lokr", ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a")))
# Tensors of network types that exist in the wild but are not implemented, with what they are.
UNSUPPORTED_TENSORS = {
    "dora_scale": "DoRA (weight-decomposed LoRA)",
    "lora_magnitude_vector": "DoRA (PEFT's weight-decomposed LoRA)",
    "oft_blocks": "LyCORIS OFT",
    "oft_diag": "OFT",
    "on_input": "(IA)^3",
    "diff": "a full weight difference (LyCORIS 'full')",
    "diff_b": "a full bias difference (LyCORIS 'full')",
    "w_norm": "a norm-layer update (LyCORIS 'norm')",
    "a1.weight": "GLoRA",
    "bias_indices": "a LyCORIS sparse bias",
    "scale": "an explicit scale",
}
INPAINT_INPUT_CHANNELS, LATENT_CHANNELS = 9, 4  # A1111 pads conv_in updates 4 -> 9 channels


class _LayerFormatError(ValueError):
    """A layer's tensors do not form an update of its weight (the caller adds the file and key)."""


def identify(names: set[str] | frozenset[str]) -> str:
    """The algorithm of a layer from its tensor names; _LayerFormatError naming what is not supported."""
    unsupported = sorted(name for name in names if name in UNSUPPORTED_TENSORS)
    algorithm = next((algo for algo, markers in ALGORITHM_MARKERS if any(name in names for name in markers)), None)
    if unsupported:
        what = ", ".join(f"{name!r} ({UNSUPPORTED_TENSORS[name]})" for name in unsupported)
        raise _LayerFormatError(f"has {what}, which tiengine does not support")
    if algorithm is None:
        raise _LayerFormatError(f"tensors {sorted(names)} are none of LoRA (lora_down/lora_up), LoHa (hada_w*) "
                               "or LoKr (lokr_w*)")
    unknown = sorted(names - ALGORITHM_TENSORS[algorithm])
    if unknown:
        raise _LayerFormatError(f"has tensors {unknown} that a {algorithm} layer does not have "
                               f"(expected only {sorted(ALGORITHM_TENSORS[algorithm])})")
    return algorithm


def _require(shapes: Mapping[str, Shape], *names: str) -> None:
    missing = [name for name in names if name not in shapes]
    if missing:
        raise _LayerFormatError(f"lacks {missing} (has {sorted(shapes)})")


def _matrix(shapes: Mapping[str, Shape], name: str) -> tuple[int, int]:
    """(rows, columns) of a tensor read as a matrix: (r, in, kh, kw) -> (r, in * kh * kw)."""
    shape = shapes[name]
    if len(shape) not in (2, 4) or 0 in shape:
        raise _LayerFormatError(f"{name} has shape {list(shape)}, expected a non-empty 2-D or 4-D tensor")
    return shape[0], math.prod(shape[1:])


def _inner(shapes: Mapping[str, Shape], left: str, right: str) -> tuple[int, int]:
    """Shape of left @ right, or a rank-mismatch error naming both."""
    rows, inner = _matrix(shapes, left)
    rank, columns = _matrix(shapes, right)
    if inner != rank:
        raise _LayerFormatError(f"rank mismatch: {left} {list(shapes[left])} has rank {inner} but {right} "
                               f"{list(shapes[right])} has rank {rank}")
    return rows, columns


def _cp(shapes: Mapping[str, Shape], core: str, left: str, right: str) -> Shape:
    """Shape of the CP product core[n, m, k, l] left[n, i] right[m, j] -> (i, j, k, l)."""
    t, a, b = shapes[core], _matrix(shapes, left), _matrix(shapes, right)
    if len(t) != 4 or t[0] != a[0] or t[1] != b[0]:
        raise _LayerFormatError(f"rank mismatch: {core} {list(t)} does not join {left} {list(shapes[left])} "
                               f"and {right} {list(shapes[right])} (expected ({a[0]}, {b[0]}, kh, kw))")
    return (a[1], b[1], *t[2:])


def produced_shape(algorithm: str, shapes: Mapping[str, Shape]) -> Shape:
    """The shape the layer's tensors multiply out to (before the reshape to the weight)."""
    if algorithm == "lora":
        _require(shapes, "lora_down.weight", "lora_up.weight")
        up = shapes["lora_up.weight"]
        if len(up) == 4 and up[2:] != (1, 1):
            raise _LayerFormatError(f"lora_up.weight has shape {list(up)}, expected (out, rank) or (out, rank, 1, 1)")
        if "lora_mid.weight" not in shapes:
            return _inner(shapes, "lora_up.weight", "lora_down.weight")
        mid, down = shapes["lora_mid.weight"], shapes["lora_down.weight"]
        if len(down) == 4 and down[2:] != (1, 1):
            raise _LayerFormatError(f"lora_down.weight has shape {list(down)}; with lora_mid it must be 1x1")
        if len(mid) != 4 or mid[0] != up[1] or mid[1] != down[0]:
            raise _LayerFormatError(f"rank mismatch: lora_mid.weight {list(mid)} does not join lora_up.weight "
                                   f"{list(up)} and lora_down.weight {list(down)} "
                                   f"(expected ({up[1]}, {down[0]}, kh, kw))")
        return (up[0], down[1], *mid[2:])
    if algorithm == "loha":
        _require(shapes, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        first = _cp(shapes, "hada_t1", "hada_w1_a", "hada_w1_b") if "hada_t1" in shapes else _inner(
            shapes, "hada_w1_a", "hada_w1_b")
        second = _cp(shapes, "hada_t2", "hada_w2_a", "hada_w2_b") if "hada_t2" in shapes else _inner(
            shapes, "hada_w2_a", "hada_w2_b")
        if math.prod(first) != math.prod(second) or first[0] != second[0]:
            raise _LayerFormatError(f"the LoHa factors differ in shape: {list(first)} (w1) and {list(second)} (w2)")
        return first if len(first) >= len(second) else second
    _require(shapes, "lokr_w1" if "lokr_w1" in shapes else "lokr_w1_a",
             "lokr_w2" if "lokr_w2" in shapes else "lokr_w2_a")
    if "lokr_w1" in shapes:
        w1: Shape = shapes["lokr_w1"]
        if len(w1) != 2:
            raise _LayerFormatError(f"lokr_w1 has shape {list(w1)}, expected 2-D")
    else:
        _require(shapes, "lokr_w1_a", "lokr_w1_b")
        w1 = _inner(shapes, "lokr_w1_a", "lokr_w1_b")
    if "lokr_w2" in shapes:
        w2: Shape = shapes["lokr_w2"]
        if len(w2) not in (2, 4):
            raise _LayerFormatError(f"lokr_w2 has shape {list(w2)}, expected 2-D or 4-D")
    else:
        _require(shapes, "lokr_w2_a", "lokr_w2_b")
        w2 = _cp(shapes, "lokr_t2", "lokr_w2_a", "lokr_w2_b") if "lokr_t2" in shapes else _inner(
            shapes, "lokr_w2_a", "lokr_w2_b")
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


def check_fits(produced: Shape, weight_shape: Shape) -> None:
    """The update can be reshaped to the weight: same rows and elements, and a 4-D update is the kernel."""
    inpaint = _inpaint_padding(produced, weight_shape)
    fits = produced[0] == weight_shape[0] and math.prod(produced) == math.prod(weight_shape)
    if len(produced) == 4 and produced != tuple(weight_shape):
        fits = False
    if not (fits or inpaint):
        raise _LayerFormatError(f"makes an update of shape {list(produced)} (elements {math.prod(produced)}), "
                               f"which does not fit the layer's weight {list(weight_shape)}")


def _inpaint_padding(produced: Shape, weight_shape: Shape) -> int:
    """Zero channels to append for a 4-channel conv_in update on an inpainting UNet, else 0."""
    if len(weight_shape) != 4 or weight_shape[1] != INPAINT_INPUT_CHANNELS:
        return 0
    latent_update = ((weight_shape[0], LATENT_CHANNELS, *weight_shape[2:]),
                     (weight_shape[0], LATENT_CHANNELS * math.prod(weight_shape[2:])))  # 4-D or flat
    return INPAINT_INPUT_CHANNELS - LATENT_CHANNELS if tuple(produced) in latent_update else 0


def layer_dim(algorithm: str, shapes: Mapping[str, Shape]) -> int | None:
    """The `dim` that alpha is divided by (module docstring); None when the layer has none."""
    if algorithm == "lora":
        return shapes["lora_down.weight"][0]
    if algorithm == "loha":
        return shapes["hada_w1_b"][0]
    for name in ("lokr_w2_b", "lokr_w1_b"):
        if name in shapes:
            return shapes[name][0]
    return None


def input_width(algorithm: str, shapes: Mapping[str, Shape]) -> int | None:
    """Input features of the layer the tensors were made for (a linear layer's), when shapes tell it."""
    try:
        return produced_shape(algorithm, shapes)[1]
    except (_LayerFormatError, KeyError):
        return None


def compute_delta(algorithm: str, tensors: Mapping[str, torch.Tensor], weight_shape: Shape, scale: float,
                  device: torch.device, dyn_dim: int | None = None) -> torch.Tensor:
    """scale * the layer's update, float32 on `device`, shaped as the weight (checked tensors only).

    The scale multiplies the smallest factor (up, w1_a, w1) before the products: one pass over the
    weight-sized result instead of two, which halves the time of a full-model update on CPU.
    """

    def get(name: str) -> torch.Tensor:
        return tensors[name].to(device=device, dtype=torch.float32)

    def matrix(name: str) -> torch.Tensor:
        tensor = get(name)
        return tensor.reshape(tensor.shape[0], -1)  # (rows, in * kh * kw)

    if algorithm == "lora":
        up, down = matrix("lora_up.weight") * scale, matrix("lora_down.weight")  # (out, r), (r, in * kh * kw)
        if "lora_mid.weight" in tensors:
            update = torch.einsum("nmkl,in,mj->ijkl", get("lora_mid.weight"), up, down)  # (out, in, kh, kw)
        else:
            if dyn_dim is not None:
                up, down = up[:, :dyn_dim], down[:dyn_dim]
            update = up @ down  # (out, in * kh * kw)
    elif algorithm == "loha":
        w1_a = get("hada_w1_a") * scale  # (out, r), or (r, out) with hada_t1
        first = _cp_product(get("hada_t1"), w1_a, get("hada_w1_b")) if "hada_t1" in tensors else (
            w1_a @ matrix("hada_w1_b"))
        second = _cp_product(get("hada_t2"), get("hada_w2_a"), get("hada_w2_b")) if "hada_t2" in tensors else (
            matrix("hada_w2_a") @ matrix("hada_w2_b"))
        # (out, in * kh * kw) and (out, in, kh, kw) hold their elements in the same order
        update = first * second.reshape(first.shape)
    else:
        w1 = get("lokr_w1") if "lokr_w1" in tensors else matrix("lokr_w1_a") @ matrix("lokr_w1_b")  # (a, b)
        w1 = w1 * scale
        if "lokr_w2" in tensors:
            w2 = get("lokr_w2")
        elif "lokr_t2" in tensors:
            w2 = _cp_product(get("lokr_t2"), get("lokr_w2_a"), get("lokr_w2_b"))  # (c, d, kh, kw)
        else:
            w2 = matrix("lokr_w2_a") @ matrix("lokr_w2_b")  # (c, d)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]  # (a, b, 1, 1)
        update = torch.kron(w1.contiguous(), w2.contiguous())  # (a * c, b * d[, kh, kw])
    padding = _inpaint_padding(tuple(update.shape), tuple(weight_shape))
    if padding:
        update = update.reshape(weight_shape[0], LATENT_CHANNELS, *weight_shape[2:])  # (out, 4, kh, kw)
        update = F.pad(update, (0, 0, 0, 0, 0, padding))  # (out, 9, kh, kw): the mask and image channels get 0
    return update.reshape(weight_shape)


def _cp_product(core: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """core (r1, r2, kh, kw), left (r1, out), right (r2, in) -> (out, in, kh, kw) (LyCORIS `make_weight_cp`)."""
    return torch.einsum("nmkl,ni,mj->ijkl", core, left.reshape(left.shape[0], -1), right.reshape(right.shape[0], -1))
