"""Textual-inversion embeddings: the Embedding type, reading every layout, writing, a library.

Files are recognized by content, not extension: PyTorch zip/legacy pickles (read with
tiengine.io.safe_pickle, never executed), safetensors, and PNG/WebP images (A1111 carriers, in
tiengine.embeddings.image). Layouts are listed in tiengine.embeddings.layouts. Encoder names and
widths: "clip_l" 768 (SD1, SDXL encoder 1), "clip_h" 1024 (SD2), "clip_g" 1280 (SDXL
encoder 2). Naming follows A1111: the file stem, except for images, whose stored name wins.
The hash is sha256 of the file bytes; its short form is the first 12 hex digits.
EmbeddingLibrary (a scanned folder) lives in tiengine.embeddings.library.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from tiengine.embeddings.image import (
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
from tiengine.io.safe_pickle import load_pickle

if TYPE_CHECKING:
    from PIL.Image import Image

FAMILY_ENCODERS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}
FAMILY_LABELS = {"sd1": "SD1 (768)", "sd2": "SD2 (1024)", "sdxl": "SDXL (768+1280)"}
# A single-encoder embedding of another width (a small model such as tiengine's default) has this family.
CUSTOM_FAMILY = "custom"
MAX_VECTORS = 75  # one prompt chunk: 77 tokens minus BOS and EOS
MAX_FILE_BYTES = 64 * 2**20  # larger pickles/safetensors without bundles are not embeddings
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


def load_embedding(path: str | os.PathLike[str], name: str | None = None) -> Embedding:
    """Read one embedding from any supported file (see module docstring).

    `name` overrides the prompt name (default: the file stem; for images and LoRA bundles
    the stored name). A diffusers `learned_embeds` file with a `learned_embeds_2` file beside
    it loads as one SDXL embedding (from either file; `path` is then the first file). A LoRA
    file with exactly one bundled embedding loads it; with several, use
    load_bundled_embeddings.
    """
    path = Path(path)
    primary, second = path, pair_partner(path)
    if second is not None and PAIR_SECOND_STEM in path.stem:
        primary, second = second, path
    parsed, container = _read_parsed(primary)
    if second is not None:
        second_data, _, _ = _read_data(second)
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
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(BUNDLE_PREFIX)}
    if not tensors:
        raise EmbeddingError(f"{path}: no bundled embeddings (no '{BUNDLE_PREFIX}*' keys)")
    return {name: _build(parsed, path, "safetensors", name)
            for name, parsed in sorted(parse_bundles(tensors, str(path)).items())}


def _read_parsed(path: Path) -> tuple[ParsedEmbedding, str]:
    """(parsed layout, container) of one file."""
    label = str(path)
    data, container, carrier = _read_data(path)
    bundles = sorted({k.split(".")[1] for k in data if str(k).startswith(BUNDLE_PREFIX)}
                     ) if container == "safetensors" else []
    if len(bundles) == 1:
        return next(iter(parse_bundles(data, label).values())), container
    parsed = parse_embedding_data(data, label)
    if carrier is not None:
        parsed.layout = f"a1111_image_{carrier}"
    return parsed, container


def _read_data(path: Path) -> tuple[Any, str, str | None]:
    """(file contents, container, image carrier) without interpreting the layout."""
    label = str(path)
    head = _check_size(path, limit=None)
    if is_image(head):
        found = read_image_embedding(path.read_bytes(), label)
        if found is None:
            raise EmbeddingError(f"{label}: image holds no embedding (no '"
                                 f"{TEXT_CHUNK_KEY}' text chunk, no pixel data)")
        container = "png" if head.startswith(PNG_SIGNATURE) else "webp"
        return found[0], container, found[1]
    if _looks_like_safetensors(head):
        return _read_safetensors(path), "safetensors", None
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        _check_size(path, limit=MAX_FILE_BYTES)
        try:
            data = load_pickle(path)
        except CheckpointError as error:
            raise EmbeddingError(str(error)) from None
        return data, "torch_zip" if head[:1] == b"P" else "torch_legacy", None
    raise EmbeddingError(f"{label}: not an embedding file (expected a PyTorch .pt/.bin, "
                         f"safetensors or PNG/WebP; file starts with {head[:8]!r})")


def _check_size(path: Path, limit: int | None) -> bytes:
    """The first 16 bytes; refuses missing, empty and (with `limit`) oversized files."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError as error:
        raise EmbeddingError(f"{path}: cannot read ({error.strerror})") from None
    if size == 0:
        raise EmbeddingError(f"{path}: file is empty (0 bytes)")
    if limit is not None and size > limit:
        raise EmbeddingError(f"{path}: {size / 2**20:.0f} MiB is too large for an embedding")
    return head


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then the JSON header's "{"
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _safe_open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise EmbeddingError(f"{path}: corrupt or truncated safetensors file ({error})") from None


def _read_safetensors(path: Path) -> dict[str, Any]:
    """The tensors (and A1111 metadata from the header) of a small safetensors file.

    LoRA files keep only their `bundle_emb.*` tensors; files with many tensors are refused
    before any tensor is read.
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
    if metadata.get("step", "").isdigit() and "step" not in data:
        data["step"] = int(metadata["step"])
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
