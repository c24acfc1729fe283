"""Hostile safetensors, images and metadata get a named error in bounded time and memory: deep
JSON headers, sparse files that declare a gigabyte, steps that only look like numbers, image
payloads that inflate past max_bytes, images too large to decode; the CLIs exit with status 2."""

from __future__ import annotations

import base64
import io
import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from embedding_builders import safetensors_file, vectors
from hostile_builders import (
    MEMORY_BOUND_MB,
    load_in_child,
    png_with_size,
    safetensors_embedding_header,
    write_safetensors_header,
)
from tiengine.cli import main as tiengine_main
from tiengine.embeddings import image as image_carrier
from tiengine.embeddings.embedding import MAX_EMBEDDING_BYTES, load_embedding
from tiengine.embeddings.library import EmbeddingLibrary
from tiengine.errors import CheckpointError, EmbeddingError
from tiengine.io.limits import MAX_NESTING_DEPTH, json_nesting_depth
from tiengine.weights_conv.cli import main as weights_conv_main
from tiengine.weights_conv.readers import open_tensor_file


# -- JSON nesting ---------------------------------------------------------------------------------
def test_json_nesting_depth_skips_strings_and_stops_early():
    assert json_nesting_depth(b'{"a": [1, [2]], "b": "[[[[[[[[[[[["}', 5) == 3
    assert json_nesting_depth('{"\\"[[[[[": [[["x"]]]}', 2) > 2
    assert json_nesting_depth(b"[" * 10_000_000, 100) > 100
    assert json_nesting_depth(b"[]" * 1000, 100) == 1


def test_deep_safetensors_header_is_refused_by_weights_conv(tmp_path, capsys):
    path = write_safetensors_header(tmp_path / "deep.safetensors",
                                    '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match=rf"nests deeper than {MAX_NESTING_DEPTH} levels") as caught:
        open_tensor_file(path)
    assert str(path) in str(caught.value)
    assert weights_conv_main(["inspect", str(path)]) == 2
    assert "nests deeper" in capsys.readouterr().err


def test_deep_safetensors_header_is_refused_as_an_embedding(tmp_path, capsys):
    path = write_safetensors_header(tmp_path / "deep.safetensors",
                                    '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(EmbeddingError, match=str(path)):
        load_embedding(path)
    assert tiengine_main(["embeddings", "inspect", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


# -- declared sizes -------------------------------------------------------------------------------
def test_sparse_gigabyte_safetensors_is_not_an_embedding(tmp_path, capsys):
    path = write_safetensors_header(tmp_path / "sparse.safetensors",
                                    safetensors_embedding_header([2**18, 1024]), data_bytes=2**30)
    with pytest.raises(EmbeddingError, match=r"declares 1073741824 bytes .*max_bytes\)") as caught:
        load_embedding(path)
    assert str(path) in str(caught.value)
    assert tiengine_main(["embeddings", "inspect", str(path)]) == 2
    assert "max_bytes" in capsys.readouterr().err
    outcome = load_in_child("embedding", path)
    assert outcome["error"] == "EmbeddingError" and outcome["extra_mb"] < MEMORY_BOUND_MB
    assert outcome["seconds"] < 10


def test_max_bytes_is_an_option(tmp_path):
    path = safetensors_file(tmp_path / "e.safetensors", {"emb_params": vectors(8, 768)})
    assert load_embedding(path).n_vectors == 8
    with pytest.raises(EmbeddingError, match=r"declares 24576 bytes .*\(24000 bytes, max_bytes\)"):
        load_embedding(path, max_bytes=24_000)
    pt = tmp_path / "e.pt"
    torch.save({"string_to_param": {"*": vectors(8, 768)}}, pt)
    with pytest.raises(EmbeddingError, match=r"\(max_bytes\)"):
        load_embedding(pt, max_bytes=24_000)
    assert MAX_EMBEDDING_BYTES >= 16 * 2**20


# -- metadata -------------------------------------------------------------------------------------
@pytest.mark.parametrize("step", ["\u00b2", "\u0663\u0664", "9" * 5000])
def test_step_that_only_looks_like_a_number_is_a_named_error(tmp_path, step):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    path = safetensors_file(folder / "odd.safetensors", {"emb_params": vectors(2, 768)},
                            metadata={"step": step})
    safetensors_file(folder / "fine.safetensors", {"emb_params": vectors(2, 768)},
                     metadata={"step": "120"})
    with pytest.raises(EmbeddingError, match=r"metadata 'step' is not a training step") as caught:
        load_embedding(path)
    assert str(path) in str(caught.value)
    library = EmbeddingLibrary(folder)
    assert library.get("fine").step == 120
    (reason,) = library.skipped.values()
    assert "'step'" in reason
    assert load_embedding(folder / "fine.safetensors").step == 120


def test_huge_pickled_step_is_a_named_error(tmp_path):
    path = tmp_path / "step.pt"
    torch.save({"string_to_param": {"*": vectors(2, 768)}, "step": 10**5000}, path)
    with pytest.raises(EmbeddingError, match="'step' is not a training step"):
        load_embedding(path)


# -- images ---------------------------------------------------------------------------------------
def _png(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def test_deep_json_in_the_text_chunk_is_refused(tmp_path):
    payload = base64.b64encode(b"[" * 200_000 + b"]" * 200_000).decode()
    path = tmp_path / "deep.png"
    path.write_bytes(_png(Image.new("RGB", (8, 8), (9, 9, 9)), {image_carrier.TEXT_CHUNK_KEY: payload}))
    with pytest.raises(EmbeddingError, match=rf"nests deeper than {MAX_NESTING_DEPTH} levels \(max_depth\)"):
        load_embedding(path)


def test_pixel_payload_that_inflates_past_max_bytes_is_refused(tmp_path, monkeypatch):
    inflated = 300 * 2**20  # zeros: ~300 KB compressed
    compressor = zlib.compressobj(9)
    chunks = [compressor.compress(bytes(2**20)) for _ in range(inflated // 2**20)]
    stream = b"".join(chunks) + compressor.flush()
    picture = Image.new("RGB", (64, 256), (90, 90, 90))
    with monkeypatch.context() as patch:  # carrier layout as A1111 writes it, with this zlib stream
        patch.setattr(image_carrier.zlib, "compress", lambda data, level=9: stream)
        carrier = image_carrier.embed_pixel_payload(picture, b"", np.full(16, 0x80, np.uint8))
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(carrier))
    assert path.stat().st_size < 2 * 2**20
    with pytest.raises(EmbeddingError, match=r"inflates to more than the limit of \d+ bytes \(max_bytes\)"):
        load_embedding(path)
    outcome = load_in_child("embedding", path)
    assert outcome["error"] == "EmbeddingError" and outcome["extra_mb"] < MEMORY_BOUND_MB


@pytest.mark.parametrize("size", [(5000, 5000), (30000, 30000)])
def test_image_too_large_to_decode_is_refused_before_decoding(tmp_path, size):
    path = tmp_path / "wide.png"
    path.write_bytes(png_with_size(*size))
    with pytest.raises(EmbeddingError, match=str(path)) as caught:
        load_embedding(path)
    assert "max_pixels" in str(caught.value) or "DecompressionBomb" in str(caught.value)
    small = tmp_path / "small.png"
    small.write_bytes(png_with_size(8, 8))
    with pytest.raises(EmbeddingError, match=r"8x8 pixels is larger than the limit of 10 pixels \(max_pixels\)"):
        load_embedding(small, max_pixels=10)
    outcome = load_in_child("embedding", path)
    assert outcome["error"] == "EmbeddingError" and outcome["extra_mb"] < MEMORY_BOUND_MB


def test_real_image_embeddings_still_load(tmp_path):
    from tiengine.embeddings.embedding import Embedding, save_embedding

    embedding = Embedding("card", {"clip_l": vectors(75, 768)}, step=10)
    path = save_embedding(embedding, tmp_path / "card.png")
    loaded = load_embedding(path)
    assert torch.allclose(loaded.vectors["clip_l"], embedding.vectors["clip_l"])
    stripped = tmp_path / "pixels.png"
    with Image.open(path) as image:
        stripped.write_bytes(_png(image.convert("RGB")))
    assert torch.allclose(load_embedding(stripped).vectors["clip_l"], embedding.vectors["clip_l"])
    assert json.loads(json.dumps({"ok": True}))["ok"]
