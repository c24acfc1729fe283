"""EmbeddingLibrary: recursive scan, skip reasons, family filter, reload, name collisions,
lookup by name and by relative path."""

from __future__ import annotations

import os
import time

import pytest
import torch
from embedding_builders import a1111_pt, safetensors_file, vectors

import tiengine.embeddings.library as library_module
from tiengine.embeddings.library import EmbeddingLibrary
from tiengine.errors import EmbeddingError
from tiengine.text.tokenizer import ClipTokenizer
from tiengine.text.vocabulary import EmbeddingVocabulary


def make_folder(root):
    (root / "negatives").mkdir()
    (root / "negatives" / "deep").mkdir()
    (root / "xl").mkdir()
    a1111_pt(root / "bad-artist.pt", vectors(2, 768, 1))
    a1111_pt(root / "negatives" / "bad-artist.pt", vectors(2, 768, 2))  # collides, deeper
    safetensors_file(root / "negatives" / "EasyNegative.safetensors", {"emb_params": vectors(8, 768, 3)})
    safetensors_file(root / "negatives" / "deep" / "Style.safetensors", {"emb_params": vectors(1, 768, 4)})
    safetensors_file(root / "negatives" / "deep" / "style.safetensors", {"emb_params": vectors(1, 768, 5)})
    safetensors_file(root / "sd2thing.safetensors", {"emb_params": vectors(2, 1024, 6)})
    safetensors_file(root / "xl" / "pony.safetensors",
                     {"clip_l": vectors(2, 768, 7), "clip_g": vectors(2, 1280, 8)})
    safetensors_file(root / "xl" / "learned_embeds.safetensors", {"<tok>": vectors(1, 768, 9)})
    safetensors_file(root / "xl" / "learned_embeds_2.safetensors", {"<tok>": vectors(1, 1280, 10)})
    (root / "empty.pt").write_bytes(b"")
    (root / "readme.txt").write_text("not an embedding")
    (root / "bad-artist.preview.png").write_bytes(b"\x89PNG not really")
    (root / "broken.pt").write_bytes(b"PK\x03\x04 truncated")
    (root / "t5.safetensors").write_bytes(
        safetensors_file(root / "tmp.safetensors", {"t5xxl": vectors(3, 4096)}).read_bytes())
    (root / "tmp.safetensors").unlink()
    (root / ".hidden").mkdir()
    a1111_pt(root / ".hidden" / "secret.pt", vectors(1, 768))
    return root


def test_scan_loads_and_skips_with_reasons(tmp_path):
    library = EmbeddingLibrary(make_folder(tmp_path))
    assert library.names() == ["EasyNegative", "Style", "bad-artist", "learned_embeds", "pony",
                               "sd2thing", "style"]
    assert library.skipped == {
        "bad-artist.preview.png": "preview image",
        "broken.pt": "corrupt or truncated PyTorch zip archive (File is not a zip file)",
        "empty.pt": "empty file (0 bytes)",
        "readme.txt": "not an embedding file type (.txt)",
        "t5.safetensors": "not a CLIP embedding: t5xxl 4096 (key 't5xxl', shape (3, 4096))",
        "xl/learned_embeds_2.safetensors": "second half of the SDXL pair xl/learned_embeds.safetensors",
    }
    pair = library["learned_embeds"]
    assert pair.family == "sdxl" and pair.format == "diffusers_sdxl_pair"
    assert library.get("secret") is None  # hidden folders are not scanned


def test_family_filter_skips_with_width_message(tmp_path):
    library = EmbeddingLibrary(make_folder(tmp_path), family="sd1")
    assert library.names() == ["EasyNegative", "Style", "bad-artist", "style"]
    assert library.skipped["sd2thing.safetensors"] == "made for SD2 (1024), this model is SD1 (768)"
    assert library.skipped["xl/pony.safetensors"] == "made for SDXL (768+1280), this model is SD1 (768)"
    xl = EmbeddingLibrary(tmp_path, family="sdxl")
    assert xl.names() == ["learned_embeds", "pony"]
    assert xl.skipped["bad-artist.pt"] == "made for SD1 (768), this model is SDXL (768+1280)"
    with pytest.raises(EmbeddingError, match="unknown model family"):
        EmbeddingLibrary(tmp_path, family="flux")


def test_collisions_shallowest_then_alphabetical(tmp_path):
    make_folder(tmp_path)
    a1111_pt(tmp_path / "negatives" / "EasyNegative.pt", vectors(8, 768, 11))
    library = EmbeddingLibrary(tmp_path)
    assert library.collisions == {
        "bad-artist": ["bad-artist.pt", "negatives/bad-artist.pt"],
        "EasyNegative": ["negatives/EasyNegative.pt", "negatives/EasyNegative.safetensors"],
    }
    assert torch.equal(library["bad-artist"].vectors["clip_l"], vectors(2, 768, 1))
    assert torch.equal(library["EasyNegative"].vectors["clip_l"], vectors(8, 768, 11))
    # the shadowed file stays reachable by its path; names are case-sensitive
    assert torch.equal(library.by_path("negatives/bad-artist").vectors["clip_l"], vectors(2, 768, 2))
    assert torch.equal(library["Style"].vectors["clip_l"], vectors(1, 768, 4))
    assert torch.equal(library["style"].vectors["clip_l"], vectors(1, 768, 5))
    assert "STYLE" not in library and library.get("easynegative") is None
    assert library.lookup("negatives/deep/Style") is library["Style"]
    assert library.lookup("bad-artist") is library["bad-artist"]
    assert library.by_path("negatives/EasyNegative") is library["EasyNegative"]  # .pt < .safetensors
    assert library.path_keys("pony") == ["xl/pony"]


def shadowed_folder(root):
    """cat.pt (the winner of the name "cat") and sub/cat.pt (shadowed), with different vectors; sub/cat.safetensors
    has the same path key as sub/cat.pt and loses it (first by relative path)."""
    (root / "sub").mkdir()
    a1111_pt(root / "cat.pt", vectors(1, 768, 1))
    a1111_pt(root / "sub" / "cat.pt", vectors(2, 768, 2))
    safetensors_file(root / "sub" / "cat.safetensors", {"emb_params": vectors(3, 768, 3)})
    return root


def test_shadowed_files_are_found_by_path(tmp_path):
    library = EmbeddingLibrary(shadowed_folder(tmp_path))
    assert library.names() == ["cat"]
    assert library.collisions == {"cat": ["cat.pt", "sub/cat.pt", "sub/cat.safetensors"]}
    assert torch.equal(library["cat"].vectors["clip_l"], vectors(1, 768, 1))
    assert torch.equal(library.by_path("sub/cat").vectors["clip_l"], vectors(2, 768, 2))
    assert list(library.shadowed) == ["sub/cat"]  # sub/cat.safetensors: its path key reaches sub/cat.pt
    assert library.shadowed["sub/cat"] is library.by_path("sub/cat")


def test_a_shadowed_file_binds_only_by_its_path(tmp_path):
    library = EmbeddingLibrary(shadowed_folder(tmp_path))
    tokenizer = ClipTokenizer.default()
    vocabulary = EmbeddingVocabulary.from_library(tokenizer, library)
    assert set(vocabulary.embeddings) == {"cat", "sub/cat"} and vocabulary.explicit_only == {"sub/cat"}
    rows = vocabulary.extra_rows("clip_l")  # (1 + 2, 768) in id order: cat, then sub/cat
    assert torch.equal(rows, torch.cat([vectors(1, 768, 1), vectors(2, 768, 2)]))

    def bound(text):
        return [(span.name, span.explicit) for span in tokenizer.tokenize(text, explicit_syntax=True).embeddings]

    assert bound("a cat") == [("cat", False)]  # bare: the winner
    assert bound("embedding:sub/cat") == [("sub/cat", True)]  # by path: the shadowed file
    assert bound("embedding:cat") == [("cat", True)]  # by name: the winner
    assert bound("sub/cat") == [("cat", False)]  # "sub/cat" typed bare is words; only "cat" binds (A1111)
    missing = tokenizer.tokenize("embedding:other/cat", explicit_syntax=True)  # never falls back to the bare "cat"
    assert missing.embeddings == [] and missing.unresolved == ["other/cat"]
    assert vocabulary.near_misses("sub_cat2") == []  # an explicit-only path is never suggested


def test_reload_rereads_only_changed_files(tmp_path, monkeypatch):
    make_folder(tmp_path)
    library = EmbeddingLibrary(tmp_path)
    reads = []
    original = library_module.load_embedding
    monkeypatch.setattr(library_module, "load_embedding", lambda p: reads.append(p) or original(p))
    assert library.reload().added == [] and reads == []
    target = tmp_path / "negatives" / "EasyNegative.safetensors"
    safetensors_file(target, {"emb_params": vectors(3, 768, 12)})
    stamp = time.time() + 5
    os.utime(target, (stamp, stamp))
    (tmp_path / "sd2thing.safetensors").unlink()
    a1111_pt(tmp_path / "new.pt", vectors(1, 768, 13))
    report = library.reload()
    assert report.changed == ["negatives/EasyNegative.safetensors"]
    assert report.removed == ["sd2thing.safetensors"] and report.added == ["new.pt"]
    assert sorted(p.name for p in reads) == ["EasyNegative.safetensors", "new.pt"]
    assert library["EasyNegative"].n_vectors == 3 and "sd2thing" not in library and "new" in library
    # removing the first file of the diffusers pair: the second is now read on its own
    (tmp_path / "xl" / "learned_embeds.safetensors").unlink()
    report = library.reload()
    assert "xl/learned_embeds_2.safetensors" in report.changed
    assert "clip_g half of an SDXL embedding alone" in library.skipped["xl/learned_embeds_2.safetensors"]


def test_library_needs_a_folder(tmp_path):
    with pytest.raises(EmbeddingError, match="not a folder"):
        EmbeddingLibrary(tmp_path / "absent")
    empty = EmbeddingLibrary(tmp_path)
    assert len(empty) == 0 and empty.loaded == {} and empty.skipped == {}


def test_a_reading_thread_sees_one_whole_scan_while_a_reload_indexes(tmp_path):
    """The HTTP service lists a library on request threads while its worker thread reloads it: a listing
    taken in the middle of a reload's indexing must be the previous scan, whole (not a half-filled table)."""
    make_folder(tmp_path)
    library = EmbeddingLibrary(tmp_path)

    def listing() -> tuple:
        return (library.loaded, library.skipped, library.shadowed, library.names(), dict(library.collisions),
                library.by_path("negatives/deep/style"))

    before = listing()
    a1111_pt(tmp_path / "new.pt", vectors(1, 768, 13))
    (tmp_path / "sd2thing.safetensors").unlink()
    seen_mid_index = []
    usable = library._usable

    def usable_and_list(entry):
        library._usable = usable  # the listing itself calls _usable: record one listing per indexed file
        seen_mid_index.append(listing())
        library._usable = usable_and_list
        return usable(entry)

    library._usable = usable_and_list  # called once per file while the tables are rebuilt
    library.reload()
    del library._usable
    assert seen_mid_index and all(seen == before for seen in seen_mid_index)
    assert "new" in library.loaded and "new" not in before[0]
