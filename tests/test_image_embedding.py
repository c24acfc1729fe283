"""A1111 image carriers: our reader against images built by an independent, literal
implementation of the spec, our writer against an independent reader, and the real A1111
test image."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from embedding_builders import vectors
from PIL import Image, PngImagePlugin

from tiengine.embeddings.embedding import Embedding, load_embedding, save_embedding
from tiengine.embeddings.image import lcg_nibbles, read_image_embedding
from tiengine.errors import EmbeddingError


# -- independent reference implementation of the spec ------------------------------------
def spec_lcg(count: int) -> np.ndarray:
    seed, out = 0, []
    for _ in range(count):
        seed = (1664525 * seed + 1013904223) % 2**32
        out.append(seed % 255)
    return np.array(out, dtype=np.uint8)


def spec_json(data: dict) -> str:
    def encode(value):
        return {"TORCHTENSOR": value.tolist()}

    return json.dumps(data, default=encode)


def spec_embed(picture: Image.Image, data: dict) -> Image.Image:
    """Pixel carrier exactly as the spec describes A1111 writing it."""
    payload = np.frombuffer(zlib.compress(spec_json(data).encode(), level=9), np.uint8)
    h = picture.height
    size = payload.size + (h - payload.size % h)  # A1111's two-step rounding
    size = size + (h * 3 - size % (h * 3))
    blocks = []
    for nibbles in (payload & 0x0F, payload >> 4):
        block = np.resize(nibbles, size).reshape(h, -1, 3)
        decoration = (np.arange(block.size, dtype=np.uint32) * 37 % 256).astype(np.uint8)
        block = block ^ (decoration.reshape(block.shape) & 0xF0)  # pattern in the upper nibble
        block = block ^ (spec_lcg(block.size).reshape(block.shape) & 0x0F)
        blocks.append(block.astype(np.uint8))
    width = blocks[0].shape[1]
    canvas = Image.new("RGB", (picture.width + 2 * width + 2, h), (0, 0, 0))
    canvas.paste(Image.fromarray(blocks[0], "RGB"), (0, 0))
    canvas.paste(picture, (width + 1, 0))
    canvas.paste(Image.fromarray(blocks[1], "RGB"), (width + 1 + picture.width + 1, 0))
    return canvas


def spec_extract(image: Image.Image) -> dict:
    """Pixel carrier read exactly as the spec describes."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    mask = (pixels > 0).all(axis=2)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    nibbles = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] & 0x0F
    black = np.flatnonzero(nibbles.sum(axis=(0, 2)) == 0)
    assert black.size >= 2
    low, high = nibbles[:, : black.min()], nibbles[:, black.max() + 1 :]
    low = low ^ (spec_lcg(low.size).reshape(low.shape) & 0x0F)
    high = high ^ (spec_lcg(high.size).reshape(high.shape) & 0x0F)
    return json.loads(zlib.decompress(((high << 4) | low).astype(np.uint8).tobytes()))


def a1111_data(tensor: torch.Tensor, name: str = "stored-name") -> dict:
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": tensor}, "name": name,
            "step": 60, "sd_checkpoint": None, "sd_checkpoint_name": None}


def png_bytes(image: Image.Image, text: dict[str, str] | None = None, format: str = "PNG") -> bytes:
    out = io.BytesIO()
    if format == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in (text or {}).items():
            info.add_text(key, value)
        image.save(out, format="PNG", pnginfo=info)
    else:
        image.save(out, format=format, lossless=True)
    return out.getvalue()


def picture(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# -- tests ----------------------------------------------------------------------------------
def test_lcg_matches_the_literal_recurrence():
    assert np.array_equal(lcg_nibbles(10_000), spec_lcg(10_000) & 0x0F)
    assert np.array_equal(lcg_nibbles(1), spec_lcg(1) & 0x0F)


@pytest.mark.parametrize("height", [48, 77])
def test_reader_decodes_spec_built_pixel_carrier(tmp_path, height):
    tensor = vectors(4, 768, seed=height).double()
    image = spec_embed(picture(height=height), a1111_data(tensor))
    path = tmp_path / "preview.png"
    path.write_bytes(png_bytes(image))  # pixels only, no text chunk
    embedding = load_embedding(path)
    assert embedding.format == "a1111_image_pixels" and embedding.container == "png"
    assert embedding.name == "stored-name" and embedding.step == 60  # the stored name wins
    assert torch.equal(embedding.vectors["clip_l"], tensor.float())


def test_reader_decodes_text_chunk_and_prefers_it(tmp_path):
    in_text, in_pixels = vectors(2, 768, 1).double(), vectors(2, 768, 2).double()
    chunk = base64.b64encode(spec_json(a1111_data(in_text, "from-text")).encode()).decode()
    image = spec_embed(picture(), a1111_data(in_pixels, "from-pixels"))
    path = tmp_path / "both.png"
    path.write_bytes(png_bytes(image, {"sd-ti-embedding": chunk}))
    embedding = load_embedding(path)
    assert embedding.format == "a1111_image_text" and embedding.name == "from-text"
    assert torch.equal(embedding.vectors["clip_l"], in_text.float())


def test_webp_pixel_carrier(tmp_path):
    tensor = vectors(3, 1024, 3).double()
    path = tmp_path / "sd2.webp"
    path.write_bytes(png_bytes(spec_embed(picture(), a1111_data(tensor, "webp-emb")), format="WEBP"))
    embedding = load_embedding(path)
    assert embedding.container == "webp" and embedding.family == "sd2"
    assert torch.equal(embedding.vectors["clip_h"], tensor.float())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_writer_output_read_by_spec_reader(tmp_path, family):
    tensors = {"clip_l": vectors(3, 768, 4)}
    if family == "sdxl":
        tensors["clip_g"] = vectors(3, 1280, 5)
    embedding = Embedding("written", tensors, step=7)
    given = picture(80, 60, seed=9)
    path = save_embedding(embedding, tmp_path / "out.png", preview=given)
    with Image.open(path) as image:
        image.load()
        from_pixels = spec_extract(image)
        from_text = json.loads(base64.b64decode(image.text["sd-ti-embedding"]))
        pixels = np.asarray(image.convert("RGB"))
    assert from_pixels == from_text
    assert from_text["name"] == "written" and from_text["step"] == 7
    key_tensors = from_text["string_to_param"]["*"] if family == "sd1" else from_text["clip_l"]
    assert torch.equal(torch.tensor(key_tensors["TORCHTENSOR"]).float(), tensors["clip_l"])
    if family == "sdxl":
        assert torch.equal(torch.tensor(from_text["clip_g"]["TORCHTENSOR"]).float(), tensors["clip_g"])
    # [low block | black | given picture | black | high block]
    block = (pixels.shape[1] - given.width - 2) // 2
    assert pixels.shape[0] == given.height
    assert np.array_equal(pixels[:, block + 1 : block + 1 + given.width], np.asarray(given))
    assert not pixels[:, block].any() and not pixels[:, block + 1 + given.width].any()


def test_generated_preview_round_trips_through_pixels_only(tmp_path):
    embedding = Embedding("gen", {"clip_l": vectors(8, 768, 6)})
    path = save_embedding(embedding, tmp_path / "gen.png")
    with Image.open(path) as image:  # drop the text chunk: only the pixels carry it now
        stripped = png_bytes(image.convert("RGB"))
    found = read_image_embedding(stripped, "stripped.png")
    assert found is not None and found[1] == "pixels"
    assert torch.equal(found[0]["string_to_param"]["*"].float(), embedding.vectors["clip_l"])


def test_images_without_embedding_and_broken_carriers(tmp_path):
    plain = tmp_path / "photo.png"
    plain.write_bytes(png_bytes(picture()))
    with pytest.raises(EmbeddingError, match="photo.png: image holds no embedding"):
        load_embedding(plain)
    striped = np.asarray(picture()).copy()
    striped[:, 10] = 0  # two black columns, but no payload between them
    striped[:, 40] = 0
    assert read_image_embedding(png_bytes(Image.fromarray(striped)), "s.png") is None
    assert read_image_embedding(png_bytes(Image.new("RGB", (8, 8))), "black.png") is None
    bad_text = tmp_path / "bad_text.png"
    bad_text.write_bytes(png_bytes(picture(), {"sd-ti-embedding": base64.b64encode(b"{nope").decode()}))
    with pytest.raises(EmbeddingError, match="bad_text.png: embedding data in the image is not valid JSON"):
        load_embedding(bad_text)
    ragged = {"string_to_param": {"*": {"TORCHTENSOR": [[1.0, 2.0], [3.0]]}}}
    ragged_path = tmp_path / "ragged.png"
    ragged_path.write_bytes(png_bytes(picture(), {
        "sd-ti-embedding": base64.b64encode(json.dumps(ragged).encode()).decode()}))
    with pytest.raises(EmbeddingError, match="malformed tensor in embedding JSON"):
        load_embedding(ragged_path)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes(picture())[:200])
    with pytest.raises(EmbeddingError, match="truncated.png: unreadable image"):
        load_embedding(truncated)


def test_real_a1111_test_image(wild_dir):
    folder = wild_dir / "embeddings/a1111_test_embedding_png"
    summary = json.loads((folder / "decoded_summary.json").read_text())
    data = (folder / "test_embedding.png").read_bytes()
    from_text = read_image_embedding(data, "test_embedding.png")
    with Image.open(io.BytesIO(data)) as image:
        assert list(image.size) == summary["image_size"]
        pixels_only = png_bytes(image.convert("RGB"))
    from_pixels = read_image_embedding(pixels_only, "pixels.png")
    assert from_text is not None and from_text[1] == "text"
    assert from_pixels is not None and from_pixels[1] == "pixels"
    for decoded, key in ((from_text[0], "decoded_from_text_chunk"),
                         (from_pixels[0], "decoded_from_pixels")):
        expected = summary[key]
        assert decoded["name"] == expected["name"] and decoded["step"] == expected["step"]
        assert list(decoded["string_to_param"]["*"].shape) == expected["string_to_param"]["*"]["shape"]
    assert torch.equal(from_text[0]["string_to_param"]["*"], from_pixels[0]["string_to_param"]["*"])
    embedding = load_embedding(folder / "test_embedding.png")
    assert (embedding.name, embedding.n_vectors, embedding.family, embedding.step) == ("rick", 8, "sd1", 60)


def test_importing_embeddings_does_not_import_pillow():
    code = "import sys, tiengine.embeddings.embedding, tiengine.embeddings.library; print('PIL' in sys.modules)"
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env=env)
    assert result.stdout.strip() == "False"
