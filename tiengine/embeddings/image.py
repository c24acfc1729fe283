"""Embeddings carried by PNG/WebP images, as AUTOMATIC1111's training previews store them.

Two carriers (behaviour of A1111 modules/textual_inversion/image_embedding.py, reimplemented
from /work/shared/spec/embedding-formats.md):

- text chunk: PNG tEXt "sd-ti-embedding" = base64 of the JSON of the A1111 dict, tensors
  written as {"TORCHTENSOR": nested lists}.
- pixels: zlib (level 9) of that JSON, split into high and low nibbles laid out as
  (h, w, 3) blocks in extra columns: [low block | black column | picture | black column |
  high block]. The low nibble of every block byte is the data XORed with an LCG stream
  (seed 0; seed = (1664525 * seed + 1013904223) mod 2**32; each step yields seed % 255, of
  which the low 4 bits are used); the upper nibble is a decorative pattern.

A1111 saves its image embeddings as a *card*: the training preview with the name drawn at the top and
the checkpoint, vector count and step at the bottom over darkened bands, then the carriers around it.
`caption_card` draws such a caption (its own layout: shaded bands, title fitted to three quarters of
the width, three footer fields); the carriers do not depend on what the picture shows.

Reading is bounded (README, "Threat model and limits"): the image's pixel count is checked
before its pixels are decoded (`max_pixels`), the pixel payload is inflated at most to
`max_bytes`, and JSON is refused when larger than `max_bytes` or nested deeper than `max_depth`.

Pillow is imported only inside the functions that handle images.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tiengine.errors import EmbeddingError
from tiengine.io.fonts import label_font
from tiengine.io.limits import MAX_NESTING_DEPTH, json_nesting_depth

if TYPE_CHECKING:
    from PIL.Image import Image

TEXT_CHUNK_KEY = "sd-ti-embedding"
TENSOR_TAG = "TORCHTENSOR"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LCG_MULTIPLIER, LCG_INCREMENT, LCG_MODULUS = 1664525, 1013904223, 2**32
CHANNELS = 3  # the carrier blocks are RGB
PREVIEW_SIZE = 256  # side of the generated preview picture, pixels
# A1111 previews are 512-1024 px a side plus the carrier columns (~1.4 Mpx for 75 SD1 vectors on
# 1024 px); 4 Mpx leaves room and keeps decoding under ~100 MB.
MAX_IMAGE_PIXELS = 2048 * 2048
MAX_IMAGE_FILE_BYTES = 64 * 2**20
MAX_PAYLOAD_BYTES = 16 * 2**20  # inflated pixel payload / JSON text (an embedding is kilobytes)


def is_image(head: bytes) -> bool:
    """True for a PNG or WebP file's first 12 bytes."""
    return head.startswith(PNG_SIGNATURE) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def lcg_nibbles(count: int) -> np.ndarray:
    """The first `count` values of the A1111 LCG (`seed % 255`), low 4 bits, as uint8.

    The first block is stepped in Python; later blocks jump `block` steps at once with
    seed' = A_block * seed + C_block (mod 2**32), in uint64 arithmetic.
    """
    block = max(1, min(count, 4096))
    seeds = np.empty(block, dtype=np.uint64)
    seed, jump_mul, jump_add = 0, 1, 0
    for i in range(block):
        seed = (LCG_MULTIPLIER * seed + LCG_INCREMENT) % LCG_MODULUS
        seeds[i] = seed
        jump_mul = (LCG_MULTIPLIER * jump_mul) % LCG_MODULUS
        jump_add = (LCG_MULTIPLIER * jump_add + LCG_INCREMENT) % LCG_MODULUS
    blocks, current = [seeds], seeds
    produced = block
    while produced < count:
        current = (current * np.uint64(jump_mul) + np.uint64(jump_add)) & np.uint64(0xFFFFFFFF)
        blocks.append(current)
        produced += block
    values = np.concatenate(blocks)[:count] % np.uint64(255)
    return (values & np.uint64(0x0F)).astype(np.uint8)


def encode_json(data: dict[str, Any]) -> str:
    """JSON of an embedding dict with tensors as {"TORCHTENSOR": nested lists}."""

    def tensor_to_json(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {TENSOR_TAG: value.detach().cpu().to(torch.float64).tolist()}
        raise TypeError(f"cannot store a {type(value).__name__} in an embedding image")

    return json.dumps(data, default=tensor_to_json)


def decode_json(text: str | bytes, label: str, *, max_bytes: int = MAX_PAYLOAD_BYTES,
                max_depth: int = MAX_NESTING_DEPTH) -> dict[str, Any]:
    """Inverse of encode_json; tensors come back as float tensors.

    Text over `max_bytes` or nested deeper than `max_depth` is refused before decoding.
    """
    if len(text) > max_bytes:
        raise EmbeddingError(f"{label}: embedding JSON in the image is {len(text)} bytes, more "
                             f"than the limit of {max_bytes} (max_bytes)")
    if json_nesting_depth(text, max_depth) > max_depth:
        raise EmbeddingError(f"{label}: embedding JSON in the image nests deeper than "
                             f"{max_depth} levels (max_depth)")

    def object_hook(obj: dict[str, Any]) -> Any:
        if TENSOR_TAG in obj:
            try:
                array = np.asarray(obj[TENSOR_TAG], dtype=np.float64)
            except (ValueError, TypeError) as error:
                raise EmbeddingError(f"{label}: malformed tensor in embedding JSON ({error})")
            return torch.from_numpy(array)
        return obj

    try:
        data = json.loads(text, object_hook=object_hook)
    except (ValueError, RecursionError) as error:
        raise EmbeddingError(f"{label}: embedding data in the image is not valid JSON "
                             f"({error})") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"{label}: embedding data in the image is a "
                             f"{type(data).__name__}, expected a dict")
    return data


def read_image_embedding(data: bytes, label: str, *, max_bytes: int = MAX_PAYLOAD_BYTES,
                         max_depth: int = MAX_NESTING_DEPTH,
                         max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[dict[str, Any], str] | None:
    """(embedding dict, "text" or "pixels") from an image's bytes; None if it holds none.

    The text chunk wins when both carriers are present, as in A1111. Limits: module docstring.
    """
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    limits = {"max_bytes": max_bytes, "max_depth": max_depth}
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise EmbeddingError(f"{label}: image of {width}x{height} pixels is larger than "
                                     f"the limit of {max_pixels} pixels (max_pixels) for an "
                                     "embedding image; refused before decoding it")
            image.load()
            text = getattr(image, "text", None) or {}
            chunk = text.get(TEXT_CHUNK_KEY) if isinstance(text, dict) else None
            if chunk is not None:
                try:
                    payload = base64.b64decode(chunk, validate=False)
                except (binascii.Error, ValueError) as error:
                    raise EmbeddingError(f"{label}: '{TEXT_CHUNK_KEY}' text chunk is not base64 "
                                         f"({error})") from None
                return decode_json(payload, label, **limits), "text"
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except EmbeddingError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError,
            PILImage.DecompressionBombError) as error:
        raise EmbeddingError(f"{label}: unreadable image ({type(error).__name__}: {error})") from None
    payload = extract_pixel_payload(pixels, max_bytes=max_bytes, label=label)
    if payload is None:
        return None
    return decode_json(payload, label, **limits), "pixels"


def extract_pixel_payload(pixels: np.ndarray, *, max_bytes: int = MAX_PAYLOAD_BYTES,
                          label: str = "image") -> bytes | None:
    """The JSON bytes hidden in an (H, W, 3) uint8 picture, or None if there are none.

    A payload that inflates to more than `max_bytes` raises EmbeddingError.
    """
    content = (pixels > 0).all(axis=2)  # (H, W): a pixel is content if no channel is 0
    if not content.any():
        return None
    rows, cols = content.any(axis=1), content.any(axis=0)
    top, bottom = int(rows.argmax()), len(rows) - int(rows[::-1].argmax())
    left, right = int(cols.argmax()), len(cols) - int(cols[::-1].argmax())
    nibbles = pixels[top:bottom, left:right] & 0x0F  # (h, w, 3)
    black_columns = np.flatnonzero(nibbles.sum(axis=(0, 2)) == 0)
    if len(black_columns) < 2:
        return None
    low = nibbles[:, : black_columns.min()]
    high = nibbles[:, black_columns.max() + 1 :]
    if low.size == 0 or low.shape != high.shape:
        return None
    low = low ^ lcg_nibbles(low.size).reshape(low.shape)
    high = high ^ lcg_nibbles(high.size).reshape(high.shape)
    stream = ((high << 4) | low).astype(np.uint8).tobytes()  # row-major (h, w, 3) order
    decompressor = zlib.decompressobj()
    try:
        payload = decompressor.decompress(stream, max_bytes + 1)  # never more than the cap
    except zlib.error:
        return None
    if len(payload) > max_bytes:
        raise EmbeddingError(f"{label}: the embedding data in the pixels inflates to more than "
                             f"the limit of {max_bytes} bytes (max_bytes)")
    return payload if decompressor.eof else None


def embed_pixel_payload(picture: Image, payload: bytes, pattern: np.ndarray) -> Image:
    """`picture` widened with the carrier blocks holding zlib(payload); returns a new image.

    `pattern`: uint8 values drawn into the upper nibbles (decorative; kept at least 0x10 so
    that no data pixel is black and the reader's border crop never cuts into the data).
    """
    from PIL import Image as PILImage

    compressed = np.frombuffer(zlib.compress(payload, 9), dtype=np.uint8)
    height = picture.height
    per_column = height * CHANNELS
    size = -(-compressed.size // per_column) * per_column  # round up to whole columns
    blocks = []
    for nibbles, motif in ((compressed & 0x0F, pattern), (compressed >> 4, pattern[::-1])):
        data = np.resize(nibbles, size).reshape(height, -1, CHANNELS)  # (h, w, 3), cyclic fill
        rows, cols = np.indices(data.shape[:2])
        upper = motif[(rows + cols) % motif.size][..., None] & 0xF0  # (h, w, 1) diagonal
        upper = np.maximum(upper, 0x10)
        low = data ^ lcg_nibbles(data.size).reshape(data.shape)
        blocks.append((upper | low).astype(np.uint8))
    block_width = blocks[0].shape[1]
    canvas = PILImage.new("RGB", (picture.width + 2 * block_width + 2, height), (0, 0, 0))
    canvas.paste(PILImage.fromarray(blocks[0], mode="RGB"), (0, 0))
    canvas.paste(picture.convert("RGB"), (block_width + 1, 0))
    canvas.paste(PILImage.fromarray(blocks[1], mode="RGB"), (block_width + 1 + picture.width + 1, 0))
    return canvas


def preview_from_vectors(vectors: torch.Tensor) -> Image:
    """A deterministic PREVIEW_SIZE square picture drawn from an (n, D) embedding."""
    from PIL import Image as PILImage

    values = torch.tanh(vectors.detach().float().flatten() * 4.0)  # (n*D,) in (-1, 1)
    shades = ((values + 1.0) * 127.5).clamp(1, 255).to(torch.uint8).numpy()
    index = np.arange(PREVIEW_SIZE * PREVIEW_SIZE * CHANNELS) % shades.size
    return PILImage.fromarray(shades[index].reshape(PREVIEW_SIZE, PREVIEW_SIZE, CHANNELS), "RGB")


CARD_BAND = 0.22  # share of the height darkened at the top and at the bottom of a card
CARD_SHADE = 0.75  # darkening at the picture's edge (0: none, 1: black), fading to none inside the band


def caption_card(picture: Image, title: str, footer_left: str = "", footer_mid: str = "",
                 footer_right: str = "") -> Image:
    """`picture` with `title` at the top and three footer fields at the bottom, on shaded bands (RGB copy)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    card = picture.convert("RGB")
    width, height = card.size
    rows = np.arange(height, dtype=np.float32)
    band = max(1.0, CARD_BAND * height)
    edge = np.minimum(rows, height - 1 - rows)  # (H,) distance to the nearest edge
    shade = CARD_SHADE * np.clip(1.0 - edge / band, 0.0, 1.0) ** 2  # (H,)
    pixels = np.asarray(card, dtype=np.float32) * (1.0 - shade)[:, None, None]  # (H, W, 3)
    card = PILImage.fromarray(pixels.round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(card)
    padding = max(2, width // 50)

    def fitted_size(text: str, room: float, largest: int) -> int:  # largest size <= `largest` that fits
        size = largest
        while size > 8 and draw.textlength(text, font=label_font(size)) > room:
            size -= 1
        return size

    white = (255, 255, 255)
    if title:
        size = fitted_size(title, width * 0.75 - 2 * padding, max(8, min(72, height // 6)))
        draw.text((padding, padding), title, font=label_font(size), fill=white, anchor="lt")
    fields = [text for text in (footer_left, footer_mid, footer_right) if text]
    if fields:
        size = min(fitted_size(text, width / 3 - padding, max(8, min(32, height // 12))) for text in fields)
        font, bottom = label_font(size), height - padding
        draw.text((padding, bottom), footer_left, font=font, fill=white, anchor="ls")
        draw.text((width / 2, bottom), footer_mid, font=font, fill=white, anchor="ms")
        draw.text((width - padding, bottom), footer_right, font=font, fill=white, anchor="rs")
    return card


def write_png(data: dict[str, Any], vectors: torch.Tensor, preview: Image | None) -> bytes:
    """PNG bytes with `data` in both carriers (text chunk and pixels) on `preview`.

    `vectors` (n, D) draw the generated preview when none is given; the first vector's first
    1024 values (absolute, scaled to 0..255) shape the decorative pattern, as in A1111.
    """
    from PIL import PngImagePlugin

    text = encode_json(data)
    magnitudes = vectors[0].detach().abs().float()[:1024]
    peak = float(magnitudes.max()) if magnitudes.numel() else 0.0
    scaled = (magnitudes / peak * 255.0) if peak > 0 else magnitudes
    pattern = scaled.to(torch.uint8).numpy()
    picture = preview if preview is not None else preview_from_vectors(vectors)
    image = embed_pixel_payload(picture, text.encode("utf-8"), pattern)
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_CHUNK_KEY, base64.b64encode(text.encode("utf-8")).decode("ascii"))
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()
