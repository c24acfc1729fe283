"""EmbeddingLibrary against hostile folders: one bad file never spoils the folder, the walk is bounded.

Every hostile input is built here (no hostile binaries are committed): a safetensors `step` of "²" or
5,000 digits, an image over Pillow's decompression-bomb limit, a file named " .pt", a PNG whose stored
name is another file's path, links to "/" and out of the folder, deep folders, many files.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from embedding_builders import a1111_pt, safetensors_file, vectors
from PIL import Image

from tiengine.cli import main
from tiengine.embeddings.embedding import Embedding, save_embedding
from tiengine.embeddings.library import EmbeddingLibrary
from tiengine.io.folders import LINK_OUTSIDE
from tiengine.text.tokenizer import ClipTokenizer
from tiengine.text.vocabulary import EmbeddingVocabulary


def _good_files(root):
    a1111_pt(root / "good-one.pt", vectors(2, 768, 1))
    (root / "sub").mkdir(exist_ok=True)
    safetensors_file(root / "sub" / "good-two.safetensors", {"emb_params": vectors(1, 768, 2)})


def _bad_files(root):
    safetensors_file(root / "step-superscript.safetensors", {"emb_params": vectors(1, 768, 3)},
                     metadata={"step": "\u00b2", "name": "step-superscript"})
    safetensors_file(root / "step-5000-digits.safetensors", {"emb_params": vectors(1, 768, 4)},
                     metadata={"step": "9" * 5000})
    Image.new("1", (15_000, 15_000)).save(root / "bomb.png")  # 225 Mpixel, over twice Pillow's limit
    a1111_pt(root / " .pt", vectors(1, 768, 5))
    (root / "cut.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 64)


def test_each_bad_file_is_one_skipped_entry_and_the_good_ones_load(tmp_path):
    _good_files(tmp_path)
    _bad_files(tmp_path)
    library = EmbeddingLibrary(tmp_path, family="sd1")
    assert set(library.names()) >= {"good-one", "good-two"}
    skipped = library.skipped
    assert skipped[" .pt"] == "file name is empty or only whitespace before the extension"
    for name in ("bomb.png", "cut.pt"):
        assert skipped[name], name
    for name in ("step-superscript.safetensors", "step-5000-digits.safetensors"):
        # either read (the step ignored) or skipped with a reason; never an exception out of the scan
        assert name in skipped or name.removesuffix(".safetensors") in library.names(), name
    assert all(isinstance(reason, str) and 0 < len(reason) < 400 for reason in skipped.values()), skipped
    # the vocabulary built from it works
    vocabulary = EmbeddingVocabulary.from_library(ClipTokenizer.default(), library)
    assert {"good-one", "good-two"} <= set(vocabulary.embeddings)


@pytest.mark.parametrize(
    "error, reason",
    [
        (RecursionError("maximum recursion depth exceeded"), "could not be read (structure nested too deeply)"),
        (MemoryError(), "could not be read (out of memory)"),
        (OSError(5, "Input/output error"), "could not be read (Input/output error)"),
        (ValueError("Exceeds the limit (4300 digits) for integer string conversion"),
         "could not be read (ValueError: Exceeds the limit (4300 digits) for integer string conversion)"),
        (KeyError("k"), "could not be read (KeyError: 'k')"),
    ],
)
def test_any_exception_while_reading_becomes_a_reason(tmp_path, monkeypatch, error, reason):
    import tiengine.embeddings.library as library_module

    _good_files(tmp_path)
    a1111_pt(tmp_path / "explodes.pt", vectors(1, 768, 6))
    real_load = library_module.load_embedding

    def load(path, *args, **kwargs):
        if os.path.basename(path) == "explodes.pt":
            raise error
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(library_module, "load_embedding", load)
    library = EmbeddingLibrary(tmp_path)
    assert library.skipped == {"explodes.pt": reason}
    assert library.names() == ["good-one", "good-two"]


def test_a_stored_name_equal_to_another_files_path_is_resolved_and_reported(tmp_path):
    (tmp_path / "sub").mkdir()
    safetensors_file(tmp_path / "sub" / "cat.safetensors", {"emb_params": vectors(1, 768, 1)})
    save_embedding(Embedding("sub/cat", {"clip_l": vectors(2, 768, 2)}), tmp_path / "picture.png")
    library = EmbeddingLibrary(tmp_path)
    assert library.names() == ["cat", "sub/cat"]
    assert library.path_keys("cat") == []  # "sub/cat" is the PNG's name, which wins
    assert library.collisions["sub/cat"] == ["picture.png", "sub/cat.safetensors"]
    vocabulary = EmbeddingVocabulary.from_library(ClipTokenizer.default(), library)  # no clash error
    assert set(vocabulary.embeddings) == {"cat", "sub/cat"}
    assert library.lookup("sub/cat").n_vectors == 2


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links")
def test_a_link_to_the_root_is_skipped_fast_and_its_target_never_quoted(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    _good_files(folder)
    os.symlink("/", folder / "everything")
    secret = tmp_path / "secret-target-name"
    a1111_pt(secret, vectors(1, 768, 7))
    os.symlink(secret, folder / "outside.pt")
    os.symlink(folder / "sub", folder / "inside-link")  # inside the folder: followed once
    os.symlink(tmp_path / "missing", folder / "dangling.pt")
    start = time.perf_counter()
    library = EmbeddingLibrary(folder)
    assert time.perf_counter() - start < 5
    assert library.skipped["everything"] == LINK_OUTSIDE
    assert library.skipped["outside.pt"] == LINK_OUTSIDE
    assert library.skipped["dangling.pt"] in (LINK_OUTSIDE, "broken link")
    assert "secret-target-name" not in json.dumps(library.skipped)
    assert set(library.names()) == {"good-one", "good-two"}
    followed = EmbeddingLibrary(folder, follow_links=True, max_depth=1, max_files=50)
    assert "outside.pt" not in followed.skipped and len(followed.entries) <= 52


def test_depth_and_file_count_are_bounded_and_reported(tmp_path):
    deep = tmp_path
    for level in range(5):
        deep = deep / f"d{level}"
    deep.mkdir(parents=True)
    a1111_pt(deep / "buried.pt", vectors(1, 768, 1))
    _good_files(tmp_path)
    library = EmbeddingLibrary(tmp_path, max_depth=3)
    assert "buried" not in library.names() and {"good-one", "good-two"} <= set(library.names())
    assert "max_depth" in library.skipped["d0/d1/d2/d3/"]
    assert "buried" in EmbeddingLibrary(tmp_path).names()

    many = tmp_path / "many"
    many.mkdir()
    for index in range(30):
        (many / f"f{index:02d}.txt").write_text("x")
    library = EmbeddingLibrary(many, max_files=10)
    assert len(library.entries) == 11
    assert "max_files" in library.skipped["f10.txt"]


def test_cli_list_shows_good_and_skipped_with_status_0(tmp_path, capsys):
    _good_files(tmp_path)
    _bad_files(tmp_path)
    if hasattr(os, "symlink"):
        os.symlink("/", tmp_path / "root-link")
    status = main(["embeddings", "list", str(tmp_path), "--json"])
    out = capsys.readouterr().out
    assert status == 0
    listing = json.loads(out)
    text = json.dumps(listing)
    assert "good-one" in text and "good-two" in text
    skipped = {item["path"]: item["reason"] for item in listing["skipped"]}
    assert {" .pt", "bomb.png", "cut.pt"} <= set(skipped)
    if hasattr(os, "symlink"):
        assert skipped["root-link"] == LINK_OUTSIDE
