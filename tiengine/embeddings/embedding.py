"""Textual-inversion embeddings: the Embedding type, reading every layout, writing, a library.

Files are recognized by content, not extension: PyTorch zip/legacy pickles (read with
tiengine.io.safe_pickle, never executed), safetensors, and PNG/WebP images (A1111 carriers, in
tiengine.embeddings.image). Layouts are listed in tiengine.embeddings.layouts. Encoder names and
widths: "clip_l" 768 (SD1, SDXL encoder 1), "clip_h" 1024 (SD2), "clip_g" 1280 (SDXL
encoder 2). Naming follows A1111: the file stem, except for images, whose stored name wins.
The hash is sha256 of the file bytes; its short form is the first 12 hex digits.
EmbeddingLibrary (a scanned folder) lives in tiengine.embeddings.library.

Limits (keyword options of load_embedding; README, "Threat model and limits"): real embeddings
hold kilobytes (75 vectors of SDXL's 768 + 1280 in fp32 are 600 KiB; the largest file in the
wild set is 1.4 MiB), so `max_bytes` (MAX_EMBEDDING_BYTES) caps the *uncompressed* data a file
may make us hold: the tensor bytes a pickle's storages or a safetensors header declare (checked
before anything is read; for a LoRA file, its bundled tensors only), a pickle stream, an image's
inflated payload. `max_depth` caps nesting (pickles, JSON), `max_pixels` an image's size.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from tiengine.embeddings.image import (
    MAX_IMAGE_FILE_BYTES,
    MAX_IMAGE_PIXELS,
    PNG_SIGNATURE,
    TEXT_CHUNK_KEY,
    caption_card,
    is_image,
    read_image_embedding,
    write_png,
)
from tiengine.embeddings.layouts import (
    BUNDLE_PREFIX,
    ENCODER_WIDTHS,
    MIN_CUSTOM_WIDTH,
    T5XXL_WIDTH,
    ParsedEmbedding,
    describe_keys,
    join_sdxl_pair,
    parse_bundles,
    parse_embedding_data,
)
from tiengine.errors import CheckpointError, EmbeddingError
from tiengine.io.atomic import OVERWRITE_HINT, atomic_write_bytes, check_file_path
from tiengine.io.limits import MAX_NESTING_DEPTH
from tiengine.io.safe_pickle import load_pickle

if TYPE_CHECKING:
    from PIL.Image import Image

FAMILY_ENCODERS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}
FAMILY_LABELS = {"sd1": "SD1 (768)", "sd2": "SD2 (1024)", "sdxl": "SDXL (768+1280)"}
# A single-encoder embedding of another width (a small model such as tiengine's default) has this family.
CUSTOM_FAMILY = "custom"
MAX_VECTORS = 75  # one prompt chunk: 77 tokens minus BOS and EOS
MAX_EMBEDDING_BYTES = 16 * 2**20  # uncompressed tensor/pickle/payload bytes (module docstring)
MAX_STEP_DIGITS = 18  # a training step of more digits is not a step (and int() of 4,301+ fails)
# bytes per element of the safetensors dtypes (format spec); unknown dtypes count as 8
SAFETENSORS_ITEMSIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                         "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
MAX_SAFETENSORS_KEYS = 8
SHORT_HASH_LENGTH = 12
SAVE_FORMATS = {".safetensors": "safetensors", ".pt": "pt", ".png": "png"}
PAIR_STEM, PAIR_SECOND_STEM = "learned_embeds", "learned_embeds_2"  # diffusers SDXL file pair


@dataclass(eq=False)
class Embedding:
    """One textual-inversion embedding: (n, D) float32 vectors per text encoder.

    `name` is what a prompt uses; `stored_name` the name or token kept inside the file.
    `family`, `n_vectors` and `short_hash` are derived; construction validates the vectors
    (encoder set, widths, 1..75 vectors, finite values) and raises EmbeddingError.
    """

    name: str
    vectors: dict[str, torch.Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    format: str = "memory"
    path: Path | None = None
    sha256: str | None = None
    stored_name: str | None = None
    container: str = "memory"
    family: str = field(init=False)
    n_vectors: int = field(init=False)
    short_hash: str | None = field(init=False)

    def __post_init__(self) -> None:
        label = self.label
        encoders = tuple(sorted(self.vectors))
        family = next((f for f, e in FAMILY_ENCODERS.items() if tuple(sorted(e)) == encoders), None)
        if family is None:
            raise EmbeddingError(f"{label}: encoders {list(encoders)} do not form an SD1 "
                                 "(clip_l), SD2 (clip_h) or SDXL (clip_l + clip_g) embedding")
        counts = set()
        normalized = {}
        for encoder in FAMILY_ENCODERS[family]:
            tensor = self.vectors[encoder]
            width = ENCODER_WIDTHS[encoder]
            if family == "sd1" and _is_custom_width(tensor):
                family, width = CUSTOM_FAMILY, tensor.shape[1]
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or tensor.shape[1] != width:
                shape = tuple(getattr(tensor, "shape", ()))
                raise EmbeddingError(f"{label}: {encoder} vectors must be (n, {width}), found "
                                     f"{shape or type(tensor).__name__}")
            if not tensor.dtype.is_floating_point:
                raise EmbeddingError(f"{label}: {encoder} vectors are {tensor.dtype}, expected "
                                     "floating point")
            if tensor.shape[0] == 0:
                raise EmbeddingError(f"{label}: {encoder} holds no vectors (shape "
                                     f"{tuple(tensor.shape)})")
            if tensor.shape[0] > MAX_VECTORS:
                raise EmbeddingError(f"{label}: {tensor.shape[0]} vectors; at most {MAX_VECTORS} "
                                     "fit in one prompt chunk")
            vectors = tensor.detach().to("cpu", torch.float32).contiguous()
            bad = (~torch.isfinite(vectors)).any(dim=1).nonzero().flatten().tolist()
            if bad:
                raise EmbeddingError(f"{label}: {encoder} vector(s) {bad[:8]} contain NaN or "
                                     "infinite values")
            normalized[encoder] = vectors
            counts.add(vectors.shape[0])
        if len(counts) != 1:
            sizes = ", ".join(f"{e} {t.shape[0]}" for e, t in normalized.items())
            raise EmbeddingError(f"{label}: the SDXL halves differ in length ({sizes} vectors)")
        self.vectors = normalized
        self.family = family
        self.n_vectors = counts.pop()
        self.short_hash = self.sha256[:SHORT_HASH_LENGTH] if self.sha256 else None

    @property
    def label(self) -> str:
        """How errors name this embedding: its file, else its name."""
        return str(self.path) if self.path is not None else self.name

    @property
    def widths(self) -> dict[str, int]:
        return {encoder: int(t.shape[1]) for encoder, t in self.vectors.items()}

    def vector_norms(self) -> dict[str, list[float]]:
        """L2 norm of every vector, per encoder."""
        return {e: t.norm(dim=1).tolist() for e, t in self.vectors.items()}

    @property
    def family_label(self) -> str:
        """"SD1 (768)", ..., or "a custom model (clip_l 64)"."""
        if self.family == CUSTOM_FAMILY:
            return f"a custom model (clip_l {self.widths['clip_l']})"
        return FAMILY_LABELS[self.family]

    def mismatch(self, family: str) -> str | None:
        """Why this embedding cannot be used with a `family` model, or None if it fits."""
        if family not in FAMILY_LABELS:
            raise EmbeddingError(f"unknown model family {family!r} (expected "
                                 f"{', '.join(FAMILY_LABELS)})")
        if family == self.family:
            return None
        return f"made for {self.family_label}, this model is {FAMILY_LABELS[family]}"

    def width_mismatch(self, widths: Mapping[str, int], family: str) -> str | None:
        """Why this embedding cannot be used with text encoders of `widths` (embedding key -> width) in a
        `family` model ("made for SD2 (clip_h 1024), this model is SD1 (clip_l 768)"), or None if it fits."""
        if self.widths == dict(widths):
            return None
        made_for = " + ".join(f"{key} {width}" for key, width in sorted(self.widths.items()))
        model = " + ".join(f"{key} {width}" for key, width in sorted(widths.items()))
        label = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
        return (f"made for {label.get(self.family, self.family)} ({made_for}), "
                f"this model is {label.get(family, family)} ({model})")

    def check_family(self, family: str) -> None:
        """Raise EmbeddingError "<file>: made for SD2 (1024), this model is SD1 (768)"."""
        reason = self.mismatch(family)
        if reason is not None:
            raise EmbeddingError(f"{self.label}: {reason}")


def _is_custom_width(tensor: Any) -> bool:
    """A 2-D clip_l tensor whose width is none of the standard encoders' (a small custom model)."""
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.ndim == 2
        and tensor.shape[1] not in (*ENCODER_WIDTHS.values(), T5XXL_WIDTH)
        and tensor.shape[1] >= MIN_CUSTOM_WIDTH
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_embedding(path: str | os.PathLike[str], name: str | None = None, *,
                   max_bytes: int = MAX_EMBEDDING_BYTES, max_depth: int = MAX_NESTING_DEPTH,
                   max_pixels: int = MAX_IMAGE_PIXELS) -> Embedding:
    """Read one embedding from any supported file (see module docstring).

    `name` overrides the prompt name (default: the file stem; for images and LoRA bundles
    the stored name). A diffusers `learned_embeds` file with a `learned_embeds_2` file beside
    it loads as one SDXL embedding (from either file; `path` is then the first file). A LoRA
    file with exactly one bundled embedding loads it; with several, use
    load_bundled_embeddings. `max_bytes`, `max_depth` and `max_pixels` are the limits of the
    module docstring; a file over one raises EmbeddingError naming it and the option.
    """
    path = Path(path)
    limits = _Limits(max_bytes, max_depth, max_pixels)
    primary, second = path, pair_partner(path)
    if second is not None and PAIR_SECOND_STEM in path.stem:
        primary, second = second, path
    parsed, container = _read_parsed(primary, limits)
    if second is not None:
        second_data, _, _ = _read_data(second, limits)
        parsed = join_sdxl_pair(parsed, second_data, f"{primary} + {second.name}")
    return _build(parsed, primary, container, name)


def pair_partner(path: Path) -> Path | None:
    """The other file of a diffusers SDXL pair (learned_embeds / learned_embeds_2), if any."""
    stem = path.stem
    if PAIR_SECOND_STEM in stem:
        other = stem.replace(PAIR_SECOND_STEM, PAIR_STEM, 1)
    elif PAIR_STEM in stem:
        other = stem.replace(PAIR_STEM, PAIR_SECOND_STEM, 1)
    else:
        return None
    for suffix in dict.fromkeys((path.suffix, ".safetensors", ".bin")):
        candidate = path.with_name(other + suffix)
        if candidate.is_file() and candidate.stat().st_size:
            return candidate
    return None


@dataclass(frozen=True)
class _Limits:
    max_bytes: int = MAX_EMBEDDING_BYTES
    max_depth: int = MAX_NESTING_DEPTH
    max_pixels: int = MAX_IMAGE_PIXELS


def list_bundled_embeddings(path: str | os.PathLike[str]) -> list[str]:
    """Names of the `bundle_emb.<name>` embeddings inside a LoRA safetensors file."""
    path = Path(path)
    _check_size(path, limit=None)
    with _safe_open(path) as handle:
        return sorted({k.split(".")[1] for k in handle.keys() if k.startswith(BUNDLE_PREFIX)})


def load_bundled_embeddings(path: str | os.PathLike[str]) -> dict[str, Embedding]:
    """Every embedding bundled in a LoRA safetensors file, by its bundled name."""
    path = Path(path)
    _check_size(path, limit=None)
    with _safe_open(path) as handle:
        keys = [k for k in handle.keys() if k.startswith(BUNDLE_PREFIX)]
        _check_declared_bytes(handle, keys, path, MAX_EMBEDDING_BYTES)
        tensors = {k: handle.get_tensor(k) for k in keys}
    if not tensors:
        raise EmbeddingError(f"{path}: no bundled embeddings (no '{BUNDLE_PREFIX}*' keys)")
    return {name: _build(parsed, path, "safetensors", name)
            for name, parsed in sorted(parse_bundles(tensors, str(path)).items())}


def _read_parsed(path: Path, limits: _Limits) -> tuple[ParsedEmbedding, str]:
    """(parsed layout, container) of one file."""
    label = str(path)
    data, container, carrier = _read_data(path, limits)
    bundles = sorted({k.split(".")[1] for k in data if str(k).startswith(BUNDLE_PREFIX)}
                     ) if container == "safetensors" else []
    if len(bundles) == 1:
        return next(iter(parse_bundles(data, label).values())), container
    parsed = parse_embedding_data(data, label)
    if carrier is not None:
        parsed.layout = f"a1111_image_{carrier}"
    return parsed, container


def _read_data(path: Path, limits: _Limits) -> tuple[Any, str, str | None]:
    """(file contents, container, image carrier) without interpreting the layout."""
    label = str(path)
    head = _check_size(path, limit=None)
    if is_image(head):
        _check_size(path, limit=MAX_IMAGE_FILE_BYTES)
        found = read_image_embedding(path.read_bytes(), label, max_bytes=limits.max_bytes,
                                     max_depth=limits.max_depth, max_pixels=limits.max_pixels)
        if found is None:
            raise EmbeddingError(f"{label}: image holds no embedding (no '"
                                 f"{TEXT_CHUNK_KEY}' text chunk, no pixel data)")
        container = "png" if head.startswith(PNG_SIGNATURE) else "webp"
        return found[0], container, found[1]
    if _looks_like_safetensors(head):
        return _read_safetensors(path, limits.max_bytes), "safetensors", None
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        _check_size(path, limit=2 * limits.max_bytes)  # pickle + storages, each within max_bytes
        try:
            data = load_pickle(path, max_depth=limits.max_depth, max_pickle_bytes=limits.max_bytes,
                               max_inflated_bytes=limits.max_bytes,
                               max_storage_bytes=limits.max_bytes)
        except CheckpointError as error:  # name load_embedding's options, not load_pickle's
            message = str(error)
            for option in ("max_pickle_bytes", "max_inflated_bytes", "max_storage_bytes"):
                message = message.replace(f"({option})", "(max_bytes)")
            raise EmbeddingError(message) from None
        return data, "torch_zip" if head[:1] == b"P" else "torch_legacy", None
    raise EmbeddingError(f"{label}: not an embedding file (expected a PyTorch .pt/.bin, "
                         f"safetensors or PNG/WebP; file starts with {head[:8]!r})")


def _check_size(path: Path, limit: int | None) -> bytes:
    """The first 16 bytes; refuses missing, empty and (with `limit`) oversized files.

    The file size only guards reading a whole file (images); what a file may expand to is
    checked by each format's reader against max_bytes.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError as error:
        raise EmbeddingError(f"{path}: cannot read ({error.strerror})") from None
    if size == 0:
        raise EmbeddingError(f"{path}: file is empty (0 bytes)")
    if limit is not None and size > limit:
        raise EmbeddingError(f"{path}: {size / 2**20:.0f} MiB is too large for an embedding "
                             f"file of this kind (limit {limit / 2**20:.0f} MiB)")
    return head


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then the JSON header's "{"
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _safe_open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise EmbeddingError(f"{path}: corrupt or truncated safetensors file ({error})") from None


def _check_declared_bytes(handle: Any, keys: list[str], path: Path, max_bytes: int) -> None:
    """Refuse tensors whose header-declared sizes add up to more than `max_bytes` (none read)."""
    total = 0
    for key in keys:
        info = handle.get_slice(key)
        numel = 1
        for size in info.get_shape():
            numel *= size
        total += numel * SAFETENSORS_ITEMSIZES.get(info.get_dtype(), 8)
    if total > max_bytes:
        raise EmbeddingError(f"{path}: the header declares {total} bytes of tensor data, more than "
                             f"an embedding may hold ({max_bytes} bytes, max_bytes); refused "
                             "before reading any")


def _metadata_step(metadata: dict[str, str], label: str) -> int | None:
    """The header's "step" as an int: None when it is no number, an error when it only looks like
    one (Unicode digits such as "²", or more than MAX_STEP_DIGITS digits)."""
    value = metadata.get("step", "")
    if not isinstance(value, str) or not value.isdigit():
        return None
    if not value.isascii() or len(value) > MAX_STEP_DIGITS:
        raise EmbeddingError(f"{label}: metadata 'step' is not a training step ({value[:20]!r}"
                             f"{'...' if len(value) > 20 else ''}, {len(value)} characters; "
                             f"expected at most {MAX_STEP_DIGITS} ASCII digits)")
    return int(value)


def _read_safetensors(path: Path, max_bytes: int = MAX_EMBEDDING_BYTES) -> dict[str, Any]:
    """The tensors (and A1111 metadata from the header) of a small safetensors file.

    LoRA files keep only their `bundle_emb.*` tensors; files with many tensors, or whose tensors
    declare more than `max_bytes`, are refused before any tensor is read.
    """
    label = str(path)
    with _safe_open(path) as handle:
        keys = list(handle.keys())
        metadata = handle.metadata() or {}
        bundled = [k for k in keys if k.startswith(BUNDLE_PREFIX)]
        if bundled:
            keys = bundled
        elif len(keys) > MAX_SAFETENSORS_KEYS:
            raise EmbeddingError(f"{label}: unknown embedding layout ({len(keys)} tensors, keys "
                                 f"found: {describe_keys(keys)})")
        _check_declared_bytes(handle, keys, path, max_bytes)
        try:
            data: dict[str, Any] = {k: handle.get_tensor(k) for k in keys}
        except Exception as error:
            raise EmbeddingError(f"{label}: corrupt or truncated safetensors file ({error})"
                                 ) from None
    if bundled:
        return data
    for key in ("name", "sd_checkpoint", "sd_checkpoint_name"):
        if key in metadata and key not in data:
            data[key] = metadata[key]
    step = _metadata_step(metadata, label)
    if step is not None and "step" not in data:
        data["step"] = step
    return data


def _build(parsed: ParsedEmbedding, path: Path, container: str, name: str | None) -> Embedding:
    if name is None:
        stored_wins = parsed.layout.startswith("a1111_image") or parsed.layout == "lora_bundle"
        name = parsed.stored_name if stored_wins and parsed.stored_name else path.stem
    return Embedding(
        name=name, vectors=parsed.vectors, step=parsed.step, sd_checkpoint=parsed.sd_checkpoint,
        sd_checkpoint_name=parsed.sd_checkpoint_name, format=parsed.layout, path=path,
        sha256=file_sha256(path), stored_name=parsed.stored_name, container=container,
    )


def a1111_dict(embedding: Embedding) -> dict[str, Any]:
    """The dict A1111 saves: string_to_token {"*": 265}, string_to_param {"*": (n, D)}, ...

    SDXL embeddings (which A1111 does not train) use {"clip_l", "clip_g"} in place of the two
    string_to_* entries, the layout A1111 reads for SDXL.
    """
    if embedding.family == "sdxl":
        tensors: dict[str, Any] = {e: t.clone() for e, t in embedding.vectors.items()}
    else:
        (tensor,) = embedding.vectors.values()
        tensors = {"string_to_token": {"*": 265}, "string_to_param": {"*": tensor.clone()}}
    return {**tensors, "name": embedding.name, "step": embedding.step,
            "sd_checkpoint": embedding.sd_checkpoint,
            "sd_checkpoint_name": embedding.sd_checkpoint_name}


def embedding_card(embedding: Embedding, picture: Image) -> Image:
    """`picture` captioned as A1111 captions its embedding images: "<name>" at the top; at the bottom
    "Trained on <checkpoint name>", "[checkpoint hash]" and "<N>v <step>s" (fields it does not know
    are left out). Pass the result to `save_embedding(..., preview=...)` to write a card."""
    footer_left = f"Trained on {embedding.sd_checkpoint_name}" if embedding.sd_checkpoint_name else ""
    footer_mid = f"[{embedding.sd_checkpoint}]" if embedding.sd_checkpoint else ""
    footer_right = f"{embedding.n_vectors}v" + (f" {embedding.step}s" if embedding.step is not None else "")
    return caption_card(picture, f"<{embedding.name}>", footer_left, footer_mid, footer_right)


def save_embedding(embedding: Embedding, path: str | os.PathLike[str], *,
                   format: str | None = None, overwrite: bool = False,
                   preview: Image | None = None) -> Path:
    """Write `embedding` atomically; refuses an existing file unless overwrite=True.

    format: "safetensors" (SD1/SD2 as {"emb_params"}, SDXL as {"clip_l", "clip_g"}, A1111
    metadata in the header), "pt" (the A1111 dict, torch.save) or "png" (A1111 preview image
    with the text-chunk and pixel carriers, on `preview` or a generated picture). Default:
    from the file extension.
    """
    path = Path(path)
    fmt = format or SAVE_FORMATS.get(path.suffix.lower())
    if fmt not in SAVE_FORMATS.values():
        raise EmbeddingError(f"{path}: unknown output format {format or path.suffix!r} (expected "
                             f"{', '.join(SAVE_FORMATS.values())})")
    check_file_path(path)
    if path.exists() and not overwrite:
        raise EmbeddingError(f"{path}: already exists ({OVERWRITE_HINT})")
    if fmt == "safetensors":
        tensors = dict(embedding.vectors) if embedding.family == "sdxl" else {
            "emb_params": next(iter(embedding.vectors.values()))}
        metadata = {k: str(v) for k, v in (("name", embedding.name), ("step", embedding.step),
                    ("sd_checkpoint", embedding.sd_checkpoint),
                    ("sd_checkpoint_name", embedding.sd_checkpoint_name)) if v is not None}
        payload = save_safetensors({k: t.contiguous() for k, t in tensors.items()}, metadata=metadata)
    elif fmt == "pt":
        buffer = io.BytesIO()
        torch.save(a1111_dict(embedding), buffer)
        payload = buffer.getvalue()
    else:
        first = embedding.vectors["clip_l" if "clip_l" in embedding.vectors else "clip_h"]
        payload = write_png(a1111_dict(embedding), first, preview)
    atomic_write_bytes(path, payload, overwrite=overwrite)
    return path


__all__ = ["Embedding", "load_embedding", "save_embedding", "embedding_card",
           "load_bundled_embeddings", "list_bundled_embeddings"]
