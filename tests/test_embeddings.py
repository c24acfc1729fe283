"""tiengine.embeddings.embedding: every layout read from files built like the originals, bad input
refused with clear messages, every writer round-trips."""

from __future__ import annotations

import os
import pickle
import sys
import zipfile

import pytest
import torch
from embedding_builders import a1111_pt, one_key_pickle, safetensors_file, ti_parameterdict_pt, vectors
from safetensors.torch import load_file

from tiengine.embeddings.embedding import (
    Embedding,
    list_bundled_embeddings,
    load_bundled_embeddings,
    load_embedding,
    save_embedding,
)
from tiengine.errors import EmbeddingError, TiengineError, UnsafePickleError


def assert_vectors(embedding: Embedding, expected: dict[str, torch.Tensor]) -> None:
    assert set(embedding.vectors) == set(expected)
    for encoder, tensor in expected.items():
        got = embedding.vectors[encoder]
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, tensor.float().reshape(-1, tensor.shape[-1]))


# -- readers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a1111_native_pt(tmp_path, legacy):
    tensor = vectors(3, 768)
    path = a1111_pt(tmp_path / "bad-artist.pt", tensor, name="bad-artist-2", step=1850,
                    sd_checkpoint_name="blossom-extract", legacy=legacy)
    embedding = load_embedding(path)
    assert_vectors(embedding, {"clip_l": tensor})
    assert embedding.name == "bad-artist"  # A1111: the file stem, not the stored name
    assert embedding.stored_name == "bad-artist-2"
    assert (embedding.step, embedding.sd_checkpoint, embedding.sd_checkpoint_name) == (
        1850, "a9263745", "blossom-extract")
    assert embedding.format == "a1111" and embedding.family == "sd1" and embedding.n_vectors == 3
    assert embedding.container == ("torch_legacy" if legacy else "torch_zip")
    import hashlib

    assert embedding.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert embedding.short_hash == embedding.sha256[:12]
    assert load_embedding(path, name="custom").name == "custom"


def test_original_ti_repo_parameterdict(tmp_path):
    tensor = vectors(2, 768, seed=1)
    embedding = load_embedding(ti_parameterdict_pt(tmp_path / "ti.pt", tensor))
    assert_vectors(embedding, {"clip_l": tensor})
    assert embedding.format == "ti_parameterdict" and embedding.step is None


def test_diffusers_one_key_1d_and_2d(tmp_path):
    one_d = vectors(1, 768, seed=2)[0]
    embedding = load_embedding(one_key_pickle(tmp_path / "learned_embeds.bin", "<birb-style>", one_d))
    assert_vectors(embedding, {"clip_l": one_d[None]})
    assert (embedding.name, embedding.stored_name, embedding.format) == (
        "learned_embeds", "<birb-style>", "diffusers")
    two_d = vectors(4, 1024, seed=3)
    path = safetensors_file(tmp_path / "sd2 style.safetensors", {"<sd2-style>": two_d})
    embedding = load_embedding(path)
    assert_vectors(embedding, {"clip_h": two_d})
    assert embedding.family == "sd2" and embedding.name == "sd2 style"


def test_kohya_emb_params_in_safetensors_and_pickle(tmp_path):
    tensor = vectors(8, 768, seed=4)
    for path in (safetensors_file(tmp_path / "EasyNegative.safetensors", {"emb_params": tensor}),
                 one_key_pickle(tmp_path / "EasyNegative.pt", "emb_params", tensor)):
        embedding = load_embedding(path)
        assert_vectors(embedding, {"clip_l": tensor})
        assert embedding.format == "kohya" and embedding.name == "EasyNegative"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sdxl_clip_l_clip_g(tmp_path, dtype):
    clip_l, clip_g = vectors(5, 768, 5, dtype), vectors(5, 1280, 6, dtype)
    path = safetensors_file(tmp_path / "xl.safetensors", {"clip_l": clip_l, "clip_g": clip_g})
    embedding = load_embedding(path)
    assert_vectors(embedding, {"clip_l": clip_l, "clip_g": clip_g})
    assert embedding.family == "sdxl" and embedding.format == "sdxl"
    assert embedding.widths == {"clip_l": 768, "clip_g": 1280}


def test_older_sdxl_text_encoders_keys(tmp_path):
    clip_l, clip_g = vectors(2, 768, 7), vectors(2, 1280, 8)
    path = safetensors_file(tmp_path / "old.safetensors",
                            {"text_encoders_0": clip_l, "text_encoders_1": clip_g})
    embedding = load_embedding(path)
    assert_vectors(embedding, {"clip_l": clip_l, "clip_g": clip_g})
    assert embedding.format == "text_encoders"


def test_emb_emb2_dict_and_history_list(tmp_path):
    """oss-roettger/XL-Textual-Inversion: bf16 {emb, emb2}; "all*" files: a list of them."""
    history = [{"emb": vectors(1, 768, s, torch.bfloat16)[0],
                "emb2": vectors(1, 1280, s + 100, torch.bfloat16)[0]} for s in range(4)]
    torch.save(history[0], tmp_path / "myPuppet768.pt")
    torch.save(history, tmp_path / "allmyPuppet768.pt")
    single = load_embedding(tmp_path / "myPuppet768.pt")
    assert_vectors(single, {"clip_l": history[0]["emb"][None], "clip_g": history[0]["emb2"][None]})
    assert single.format == "emb_emb2"
    final = load_embedding(tmp_path / "allmyPuppet768.pt")  # the last entry: end of training
    assert_vectors(final, {"clip_l": history[-1]["emb"][None], "clip_g": history[-1]["emb2"][None]})
    assert final.format == "emb_emb2_list"


def test_diffusers_sdxl_two_file_pair(tmp_path):
    clip_l, clip_g = vectors(2, 768, 9), vectors(2, 1280, 10)
    first = safetensors_file(tmp_path / "learned_embeds.safetensors", {"<s0><s1>": clip_l})
    second = safetensors_file(tmp_path / "learned_embeds_2.safetensors", {"<s0><s1>": clip_g})
    for path in (first, second):
        embedding = load_embedding(path)
        assert_vectors(embedding, {"clip_l": clip_l, "clip_g": clip_g})
        assert embedding.format == "diffusers_sdxl_pair" and embedding.path == first
        assert embedding.name == "learned_embeds"
    first.unlink()
    with pytest.raises(EmbeddingError, match="clip_g half of an SDXL embedding alone"):
        load_embedding(second)


def test_lora_bundled_embeddings(tmp_path):
    sd1, clip_l, clip_g = vectors(3, 768, 11), vectors(2, 768, 12), vectors(2, 1280, 13)
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "bundle_emb.sd1emb.string_to_param.*": sd1,
            "bundle_emb.xlemb.clip_l": clip_l, "bundle_emb.xlemb.clip_g": clip_g}
    path = safetensors_file(tmp_path / "pivotal.safetensors", lora)
    assert list_bundled_embeddings(path) == ["sd1emb", "xlemb"]
    bundled = load_bundled_embeddings(path)
    assert_vectors(bundled["sd1emb"], {"clip_l": sd1})
    assert_vectors(bundled["xlemb"], {"clip_l": clip_l, "clip_g": clip_g})
    assert bundled["xlemb"].name == "xlemb" and bundled["xlemb"].format == "lora_bundle"
    with pytest.raises(EmbeddingError, match="2 bundled embeddings .*sd1emb, xlemb"):
        load_embedding(path)
    single = safetensors_file(tmp_path / "one.safetensors",
                              {"lora_te_x.lora_up.weight": torch.zeros(2, 2),
                               "bundle_emb.only.string_to_param.*": sd1})
    assert load_embedding(single).name == "only"
    plain = safetensors_file(tmp_path / "lora.safetensors", {"lora_te_x.lora_up.weight": torch.zeros(2, 2)})
    with pytest.raises(EmbeddingError, match="no bundled embeddings"):
        load_bundled_embeddings(plain)


def test_safetensors_metadata_round_trips_a1111_fields(tmp_path):
    tensor = vectors(2, 768, 14)
    path = safetensors_file(tmp_path / "m.safetensors", {"emb_params": tensor},
                            metadata={"name": "stored", "step": "42", "sd_checkpoint_name": "x"})
    embedding = load_embedding(path)
    assert (embedding.stored_name, embedding.step, embedding.sd_checkpoint_name) == ("stored", 42, "x")


# -- family checks ----------------------------------------------------------------------------
def test_family_mismatch_messages(tmp_path):
    sd2 = load_embedding(safetensors_file(tmp_path / "sd2.safetensors", {"emb_params": vectors(1, 1024)}))
    sd2.check_family("sd2")
    with pytest.raises(EmbeddingError) as caught:
        sd2.check_family("sd1")
    assert str(caught.value) == f"{tmp_path / 'sd2.safetensors'}: made for SD2 (1024), this model is SD1 (768)"
    sd1 = load_embedding(safetensors_file(tmp_path / "sd1.safetensors", {"emb_params": vectors(1, 768)}))
    assert sd1.mismatch("sdxl") == "made for SD1 (768), this model is SDXL (768+1280)"
    xl = Embedding("xl", {"clip_l": vectors(1, 768), "clip_g": vectors(1, 1280)})
    assert xl.mismatch("sd1") == "made for SDXL (768+1280), this model is SD1 (768)"
    assert xl.mismatch("sdxl") is None
    with pytest.raises(EmbeddingError, match="unknown model family"):
        xl.mismatch("sd3")


# -- bad input --------------------------------------------------------------------------------
class _Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_malicious_embedding_is_refused_without_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Reduce(os.system, f'"{sys.executable}" -c "open(r\'{marker}\', \'w\').close()"')
    path = tmp_path / "EasyNegative.pt"
    torch.save({"string_to_param": {"*": vectors(1, 768)}, "x": payload}, path)
    with pytest.raises(UnsafePickleError, match=r"'(os|posix)\.system'") as caught:
        load_embedding(path)
    assert str(path) in str(caught.value)
    bin_path = tmp_path / "learned_embeds.bin"
    bin_path.write_bytes(pickle.dumps(_Reduce(eval, f"open(r'{marker}', 'w')"), protocol=2))
    with pytest.raises(TiengineError):
        load_embedding(bin_path)
    assert not marker.exists()


def test_truncated_and_corrupt_files(tmp_path):
    source = a1111_pt(tmp_path / "good.pt", vectors(8, 768))
    data = source.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(EmbeddingError, match="cut.pt: corrupt or truncated PyTorch zip"):
        load_embedding(tmp_path / "cut.pt")
    st = safetensors_file(tmp_path / "good.safetensors", {"emb_params": vectors(8, 768)})
    (tmp_path / "cut.safetensors").write_bytes(st.read_bytes()[:-100])
    with pytest.raises(EmbeddingError, match="cut.safetensors: corrupt or truncated safetensors"):
        load_embedding(tmp_path / "cut.safetensors")
    (tmp_path / "zero.pt").write_bytes(b"")
    with pytest.raises(EmbeddingError, match=r"zero.pt: file is empty \(0 bytes\)"):
        load_embedding(tmp_path / "zero.pt")
    (tmp_path / "notes.pt").write_text("just some text")
    with pytest.raises(EmbeddingError, match="not an embedding file"):
        load_embedding(tmp_path / "notes.pt")
    with pytest.raises(EmbeddingError, match="cannot read"):
        load_embedding(tmp_path / "absent.pt")


@pytest.mark.parametrize("tensors, message", [
    ({"emb_params": vectors(2, 4)}, r"'emb_params' has width 4 .*expected 768 \(SD1\), 1024"),
    ({"emb_params": vectors(2, 1280)}, "clip_g half of an SDXL embedding alone"),
    ({"t5xxl": vectors(88, 4096)}, r"not a CLIP embedding: t5xxl 4096 \(key 't5xxl', shape \(88, 4096\)\)"),
    ({"emb_params": vectors(0, 768)}, r"clip_l holds no vectors \(shape \(0, 768\)\)"),
    ({"emb_params": vectors(76, 768)}, "76 vectors; at most 75 fit in one prompt chunk"),
    ({"emb_params": torch.zeros(2, 3, 768)}, r"shape \(2, 3, 768\), expected \(n, D\) or \(D,\)"),
    ({"emb_params": torch.zeros(2, 768, dtype=torch.int32)}, "torch.int32, expected floating point"),
    ({"clip_l": vectors(2, 768)}, "SDXL embedding needs both halves: found 'clip_l', missing 'clip_g'"),
    ({"clip_l": vectors(2, 768), "clip_g": vectors(3, 1280)}, "halves differ in length"),
    ({"clip_l": vectors(2, 1280), "clip_g": vectors(2, 768)}, "'clip_l' should be the clip_l half"),
    ({"a": vectors(1, 768), "b": vectors(1, 768)}, "unknown embedding layout \\(keys found: 'a', 'b'\\)"),
])
def test_bad_tensors_are_refused(tmp_path, tensors, message):
    path = safetensors_file(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(EmbeddingError, match=message) as caught:
        load_embedding(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_custom_width_embedding_is_a_custom_family(tmp_path):
    """A small model's embedding (here 64 wide) loads, and never passes for a standard family."""
    path = safetensors_file(tmp_path / "toy.safetensors", {"emb_params": vectors(3, 64)})
    embedding = load_embedding(path)
    assert embedding.family == "custom" and embedding.widths == {"clip_l": 64} and embedding.n_vectors == 3
    assert embedding.mismatch("sd1") == "made for a custom model (clip_l 64), this model is SD1 (768)"
    saved = save_embedding(embedding, tmp_path / "copy.safetensors")
    assert torch.equal(load_embedding(saved).vectors["clip_l"], embedding.vectors["clip_l"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_vectors_are_refused(tmp_path, bad):
    tensor = vectors(4, 768)
    tensor[2, 100] = bad
    path = a1111_pt(tmp_path / "nan.pt", tensor)
    with pytest.raises(EmbeddingError, match=r"clip_l vector\(s\) \[2\] contain NaN or infinite"):
        load_embedding(path)


def test_a1111_dict_with_two_params_or_no_tensor(tmp_path):
    torch.save({"string_to_param": {"*": vectors(1, 768), "x": vectors(1, 768)}}, tmp_path / "two.pt")
    with pytest.raises(EmbeddingError, match="holds 2 tensors .*expected exactly one"):
        load_embedding(tmp_path / "two.pt")
    torch.save({"string_to_param": {"*": [1.0, 2.0]}}, tmp_path / "list.pt")
    with pytest.raises(EmbeddingError, match=r"'string_to_param.\*' is a list, expected a tensor"):
        load_embedding(tmp_path / "list.pt")
    torch.save([1, 2, 3], tmp_path / "ints.pt")
    with pytest.raises(EmbeddingError, match="list of 3 int"):
        load_embedding(tmp_path / "ints.pt")


# -- writers ----------------------------------------------------------------------------------
def sample(family: str) -> Embedding:
    widths = {"sd1": {"clip_l": 768}, "sd2": {"clip_h": 1024}, "sdxl": {"clip_l": 768, "clip_g": 1280}}
    tensors = {e: vectors(3, w, seed=w) for e, w in widths[family].items()}
    return Embedding("my-emb", tensors, step=120, sd_checkpoint="abc123", sd_checkpoint_name="base")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".png"])
def test_every_writer_round_trips(tmp_path, family, suffix):
    original = sample(family)
    path = save_embedding(original, tmp_path / f"out{suffix}")
    loaded = load_embedding(path)
    assert_vectors(loaded, original.vectors)
    assert loaded.family == family and loaded.n_vectors == 3
    assert (loaded.step, loaded.sd_checkpoint, loaded.sd_checkpoint_name) == (120, "abc123", "base")
    expected_name = "my-emb" if suffix == ".png" else "out"  # images keep their stored name
    assert loaded.name == expected_name and loaded.stored_name == "my-emb"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_pt_writer_is_the_exact_a1111_dict(tmp_path):
    original = sample("sd1")
    path = save_embedding(original, tmp_path / "a.pt")
    data = torch.load(path, weights_only=True)
    assert list(data) == ["string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                          "sd_checkpoint_name"]
    assert data["string_to_token"] == {"*": 265} and list(data["string_to_param"]) == ["*"]
    assert torch.equal(data["string_to_param"]["*"], original.vectors["clip_l"])
    assert (data["name"], data["step"], data["sd_checkpoint"], data["sd_checkpoint_name"]) == (
        "my-emb", 120, "abc123", "base")
    assert zipfile.is_zipfile(path)


def test_safetensors_writer_keys(tmp_path):
    assert set(load_file(save_embedding(sample("sd2"), tmp_path / "a.safetensors"))) == {"emb_params"}
    xl = load_file(save_embedding(sample("sdxl"), tmp_path / "b.safetensors"))
    assert set(xl) == {"clip_l", "clip_g"} and xl["clip_g"].shape == (3, 1280)


def test_writer_refuses_overwrite_and_unknown_format(tmp_path):
    path = tmp_path / "x.safetensors"
    save_embedding(sample("sd1"), path)
    before = path.read_bytes()
    with pytest.raises(EmbeddingError, match="already exists"):
        save_embedding(sample("sd2"), path)
    assert path.read_bytes() == before
    save_embedding(sample("sd2"), path, overwrite=True)
    assert load_embedding(path).family == "sd2"
    with pytest.raises(EmbeddingError, match="unknown output format '.txt'"):
        save_embedding(sample("sd1"), tmp_path / "x.txt")
    save_embedding(sample("sd1"), tmp_path / "x.bin", format="pt")
    assert load_embedding(tmp_path / "x.bin").format == "a1111"


def test_embedding_constructor_validates():
    with pytest.raises(EmbeddingError, match="do not form an SD1"):
        Embedding("e", {"clip_g": vectors(1, 1280)})
    with pytest.raises(EmbeddingError, match=r"clip_h vectors must be \(n, 1024\), found \(1, 768\)"):
        Embedding("e", {"clip_h": vectors(1, 768)})
    embedding = Embedding("e", {"clip_l": vectors(2, 768, dtype=torch.float16)})
    assert embedding.vectors["clip_l"].dtype == torch.float32 and embedding.short_hash is None
    norms = embedding.vector_norms()["clip_l"]
    assert norms == pytest.approx(embedding.vectors["clip_l"].norm(dim=1).tolist())
