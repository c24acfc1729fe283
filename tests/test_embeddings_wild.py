"""Every real file in wild/embeddings loads, or is refused for the right reason.

Expected shapes, dtypes, names and steps are copied from wild/EMBEDDINGS.md (the two
MooreThreads files, listed only in wild/README.md as "75-vector" A1111 files, carry the count
in their names); hashes come from wild/MANIFEST.tsv; vector values are compared with
torch.load(weights_only=True) and safetensors' own loader.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tiengine.embeddings.embedding import load_embedding
from tiengine.embeddings.library import EmbeddingLibrary
from tiengine.errors import EmbeddingError

K = "Kaleidia_Embeddings-for-AI-Imagery/"
M = "mayaru-ai_stable-diffusion-bestconfig/"
F = "fgjd4j23423f_sd/"
XL = {f"{K}{stem}.safetensors": n for stem, n in [
    ("Pony-RealisticStyleNeg", 21), ("Pony-ScoresNeg", 11), ("Pony-ScoresPos", 15),
    ("Pony-SkinDetail", 18), ("SDXL-Detail", 2), ("SDXL-EyeDetail", 20),
    ("SDXL-FemaleFaceDetail", 13), ("SDXL-FemaleHandDetail", 14), ("SDXL-HairDetail", 8),
    ("SDXL-HandsNeg", 48), ("SDXL-SkinDetail", 14), ("SDXL-SkinHairDetail", 24)]}
KALEIDIA_SD1 = {f"{K}SD1.5-{stem}.pt": n for stem, n in [
    ("EyeDetail", 8), ("HairDetail", 3), ("HandNeg", 38), ("OverallDetail", 5), ("SkinDetail", 14),
    ("SkinDetailNeg", 8), ("SkinHairDetail", 22), ("femaleFaceDetail", 17), ("femaleHandDetail", 15)]}

# relative path -> (shapes per encoder, source dtype, stored name, step)
EXPECTED = {
    **{path: ({"clip_l": (n, 768), "clip_g": (n, 1280)}, torch.float32, None, None)
       for path, n in XL.items()},
    **{path: ({"clip_l": (n, 768)}, torch.float32, "_EmbeddingMerge_temp", 0)
       for path, n in KALEIDIA_SD1.items()},
    f"{M}EasyNegative.safetensors": ({"clip_l": (8, 768)}, torch.float32, None, None),
    f"{M}bad-artist-anime.pt": ({"clip_l": (2, 768)}, torch.float32, "bad-artist-2", 1850),
    f"{M}bad-artist.pt": ({"clip_l": (2, 768)}, torch.float32, "bad-artist", 1875),
    f"{M}bad-hands-5.pt": ({"clip_l": (2, 768)}, torch.float32, "bad-hands-5", 1419),
    f"{M}bad-prompt.pt": ({"clip_l": (16, 768)}, torch.float32, "bad_prompt", 8000),
    f"{M}bad_prompt_version2.pt": ({"clip_l": (8, 768)}, torch.float32, "bad_prompt_version2", 12000),
    f"{M}eyeliner2.pt": ({"clip_l": (3, 768)}, torch.float32, "eyeliner2", 3727),
    f"{F}EasyNegative.pt": ({"clip_l": (8, 768)}, torch.float32, None, None),
    f"{F}EasyNegative.safetensors": ({"clip_l": (16, 768)}, torch.float32, None, None),
    f"{F}EasyNegativeV2.safetensors": ({"clip_l": (16, 768)}, torch.float32, None, None),
    f"{F}bad-artist.pt": ({"clip_l": (2, 768)}, torch.float32, "bad-artist", 1875),
    f"{F}bad-hands-5.pt": ({"clip_l": (2, 768)}, torch.float32, "bad-hands-5", 1364),
    f"{F}badhandv4.pt": ({"clip_l": (6, 768)}, torch.float32, "badhandv3", 15001),
    f"{F}charturnerv2.pt": ({"clip_l": (15, 768)}, torch.float32, "testTurner", 660),
    f"{F}negative_hand-neg.pt": ({"clip_l": (8, 768)}, torch.float32, "negative_hand", 8000),
    "ttekcor_Embedding_stable_diffusion/learned_embeds.safetensors":
        ({"clip_l": (1, 768)}, torch.float32, "<detail-schemas>", None),
    "WaymonX_AI-learning/learned_embeds.bin":
        ({"clip_l": (1, 768)}, torch.float32, "<Le Petit Prince-moon >", None),
    "rummd_Textual_Inversion_with_Stable_Diffusion_v1-5/learned_embeds.bin":
        ({"clip_l": (1, 768)}, torch.float32, "<styled-image>", None),
    "soejrd_aiTests/learned_embeds.bin": ({"clip_l": (1, 768)}, torch.float32, "<sjoerd>", None),
    "fastai_diffusion-nbs/learned_embeds.bin":
        ({"clip_l": (1, 768)}, torch.float32, "<birb-style>", None),
    "oss-roettger_XL-Textual-Inversion/myPuppet768.pt":
        ({"clip_l": (1, 768), "clip_g": (1, 1280)}, torch.bfloat16, None, None),
    "oss-roettger_XL-Textual-Inversion/allmyPuppet768.pt":  # last of 11 training snapshots
        ({"clip_l": (1, 768), "clip_g": (1, 1280)}, torch.bfloat16, None, None),
    "a1111_test_embedding_png/test_embedding.png": ({"clip_l": (8, 768)}, torch.float64, "rick", 60),
    "MooreThreads_MobiMaliangSDK/bad-picture-chill-75v.pt":
        ({"clip_l": (75, 768)}, torch.float32, None, None),
    "MooreThreads_MobiMaliangSDK/ng_deepnegative_v1_75t.pt":
        ({"clip_l": (75, 768)}, torch.float32, None, None),
}
REFUSED = {
    f"{K}T5-CharDetail_a1111_weighted.safetensors": "not a CLIP embedding: t5xxl 4096",
    f"{F}EasyNegative_alt_7620f06.pt": "corrupt or truncated PyTorch zip archive",
}
NOT_EMBEDDINGS = {"LFS_POINTERS_thatmayy_clone.txt", "a1111_test_embedding_png/decoded_summary.json",
                  "oss-roettger_XL-Textual-Inversion/info.txt"}


def manifest_hashes(wild_dir) -> dict[str, str]:
    hashes = {}
    for line in (wild_dir / "MANIFEST.tsv").read_text().splitlines():
        fields = line.split("\t")
        if fields[0].startswith("embeddings/"):
            hashes[fields[0].removeprefix("embeddings/")] = fields[5]
    return hashes


def reference_tensors(path) -> dict[str, torch.Tensor]:
    """Encoder -> stored tensor, read by the reference loaders (for .pt/.bin/.safetensors)."""
    if path.suffix == ".safetensors":
        data = load_file(str(path))
    else:
        data = torch.load(path, weights_only=True, map_location="cpu")
    if isinstance(data, list):
        data = data[-1]
    if "string_to_param" in data:
        data = data["string_to_param"]
    pairs = {"clip_l": "clip_l", "clip_g": "clip_g", "emb": "clip_l", "emb2": "clip_g"}
    if any(k in data for k in pairs):
        return {pairs[k]: v for k, v in data.items() if k in pairs}
    (tensor,) = data.values()
    return {"clip_l": tensor}


def test_every_wild_file_is_covered(wild_dir):
    files = {p.relative_to(wild_dir / "embeddings").as_posix()
             for p in (wild_dir / "embeddings").rglob("*") if p.is_file()}
    assert files == set(EXPECTED) | set(REFUSED) | NOT_EMBEDDINGS


@pytest.mark.parametrize("relative", sorted(EXPECTED))
def test_wild_file_loads(wild_dir, relative):
    shapes, dtype, stored_name, step = EXPECTED[relative]
    path = wild_dir / "embeddings" / relative
    embedding = load_embedding(path)
    assert {e: tuple(t.shape) for e, t in embedding.vectors.items()} == shapes
    assert all(t.dtype == torch.float32 for t in embedding.vectors.values())
    assert embedding.sha256 == manifest_hashes(wild_dir)[relative]
    assert embedding.short_hash == embedding.sha256[:12]
    if stored_name is not None:
        assert embedding.stored_name == stored_name
    if step is not None:
        assert embedding.step == step
    expected_name = stored_name if path.suffix == ".png" else path.stem
    assert embedding.name == expected_name
    if path.suffix != ".png":
        for encoder, tensor in reference_tensors(path).items():
            assert tensor.dtype == dtype
            assert torch.equal(embedding.vectors[encoder], tensor.float().reshape(shapes[encoder]))


@pytest.mark.parametrize("relative", sorted(REFUSED))
def test_wild_file_refused(wild_dir, relative):
    with pytest.raises(EmbeddingError, match=REFUSED[relative]):
        load_embedding(wild_dir / "embeddings" / relative)


def test_wild_folder_as_sd1_library(wild_dir):
    library = EmbeddingLibrary(wild_dir / "embeddings", family="sd1")
    sd1 = {p for p, (shapes, *_) in EXPECTED.items() if set(shapes) == {"clip_l"}}
    loaded_paths = {e.relative_path for e in library.entries if e.embedding is not None}
    assert loaded_paths == sd1
    for path in set(EXPECTED) - sd1:
        assert library.skipped[path] == "made for SDXL (768+1280), this model is SD1 (768)"
    for path, reason in REFUSED.items():
        assert reason in library.skipped[path]
    assert library.collisions["bad-artist"][0] == f"{F}bad-artist.pt"  # same depth: alphabetical
