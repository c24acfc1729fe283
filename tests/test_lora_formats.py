"""LoRA / LyCORIS files -> per-layer updates: names, published formulas, bundled embeddings, describe, hash,
and every refusal.

Formula tests apply `weight + m * update.delta(weight)` and compare it with the published formula computed in
float64 from the tensors the builder wrote. Bound: fp32 rounding of that computation, eps * (|W| + |result| +
|m| * terms * M) elementwise, where M is the formula evaluated on the absolute values of its factors and
`terms` the number of products summed into one element (the standard a-priori bound for sums of products,
fl(x.y) - x.y <= n eps |x|.|y|); float64's own error is ~1e-16 and negligible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import struct
import sys
from pathlib import Path

import pytest
import torch
from hostile_builders import write_zip
from lora_builders import (
    bundle_keys,
    bundled_embedding,
    kohya_name,
    lora_layers,
    old_diffusers_name,
    save,
    write_kohya_lora,
    write_loha,
    write_lokr,
    write_old_diffusers_lora,
    write_peft_lora,
)
from model_builders import build_modules, tiny_model_config
from tiengine.weights_conv.readers import SafetensorsFile

from tiengine.errors import NetworkError, UnsafePickleError
from tiengine.models.unet import UNet2DConditionModel
from tiengine.networks.lora import describe_lora, load_lora, lora_file_hash

EPS = torch.finfo(torch.float32).eps
MULTIPLIER = 0.7
LAYER = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a tiny SD1 layer (32 x 32)
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # (32, 32, 3, 3)


@pytest.fixture(scope="module")
def models() -> dict[str, dict[str, torch.nn.Module]]:
    return {family: build_modules(tiny_model_config(family), seed=5) for family in ("sd1", "sd2", "sdxl")}


def weight_of(modules, update) -> torch.Tensor:
    return modules[update.component].get_submodule(update.module).weight.detach()


def assert_formula(modules, network, formula) -> None:
    """Every update applied with MULTIPLIER equals W + MULTIPLIER * formula(prefix, W) (module docstring).

    formula(prefix, weight, absolute) -> (update in float64 with its scale, number of summed terms)."""
    assert network.updates
    for update in network.updates:
        weight = weight_of(modules, update)
        got = (weight + MULTIPLIER * update.delta(weight)).double()
        expected, terms = formula(update.key, weight, False)
        magnitude, _ = formula(update.key, weight, True)
        reference = weight.double() + MULTIPLIER * expected
        bound = EPS * (weight.double().abs() + reference.abs() + MULTIPLIER * terms * magnitude) + 1e-30
        assert ((got - reference).abs() <= bound).all(), update.key
        assert expected.abs().max() > 1e-3 * weight.abs().max(), "the update must change the weight"


def factors(tensors, prefix, absolute):
    def get(name):
        value = tensors[f"{prefix}.{name}"].double()
        return value.abs() if absolute else value
    return get


def lora_formula(tensors):
    """W' = W + m * (alpha / rank) * up @ down (conv: up.flatten(1) @ down.flatten(1) reshaped; with lora_mid
    the Tucker product sum_{n,m} up[i,n] mid[n,m,k,l] down[m,j])."""
    def formula(prefix, weight, absolute):
        get = factors(tensors, prefix, absolute)
        up, down = get("lora_up.weight"), get("lora_down.weight")
        rank = down.shape[0]
        scale = tensors[f"{prefix}.alpha"].item() / rank if f"{prefix}.alpha" in tensors else 1.0
        if f"{prefix}.lora_mid.weight" in tensors:
            product = torch.einsum("in,nmkl,mj->ijkl", up.flatten(1), get("lora_mid.weight"), down.flatten(1))
            return scale * product, rank * rank
        return scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape), rank
    return formula


def loha_formula(tensors):
    """W' = W + m * (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b); Tucker factors t[n,m,k,l] a[n,i] b[m,j]."""
    def formula(prefix, weight, absolute):
        get = factors(tensors, prefix, absolute)
        rank = tensors[f"{prefix}.hada_w1_b"].shape[0]
        halves = []
        for half in ("1", "2"):
            if f"{prefix}.hada_t{half}" in tensors:
                halves.append(torch.einsum("nmkl,ni,mj->ijkl", get(f"hada_t{half}"), get(f"hada_w{half}_a"),
                                           get(f"hada_w{half}_b")))
            else:
                halves.append((get(f"hada_w{half}_a") @ get(f"hada_w{half}_b")).reshape(weight.shape))
        terms = 2 * rank * (rank if f"{prefix}.hada_t1" in tensors else 1)
        return tensors[f"{prefix}.alpha"].item() / rank * halves[0] * halves[1], terms
    return formula


def lokr_formula(tensors):
    """W' = W + m * scale * kron(w1, w2), w1 = lokr_w1 or w1_a @ w1_b, w2 = lokr_w2 or w2_a @ w2_b or the Tucker
    product with lokr_t2; scale = alpha / rank with a decomposed factor, else 1."""
    def formula(prefix, weight, absolute):
        get = factors(tensors, prefix, absolute)

        def has(name):
            return f"{prefix}.{name}" in tensors

        w1 = get("lokr_w1") if has("lokr_w1") else get("lokr_w1_a") @ get("lokr_w1_b")
        if has("lokr_t2"):
            w2 = torch.einsum("nmkl,ni,mj->ijkl", get("lokr_t2"), get("lokr_w2_a"), get("lokr_w2_b"))
            w1 = w1[:, :, None, None]
        elif has("lokr_w2"):
            w2 = get("lokr_w2")
            w1 = w1[:, :, None, None] if w2.ndim == 4 else w1
        else:
            w2 = get("lokr_w2_a") @ get("lokr_w2_b")
        rank = next((tensors[f"{prefix}.{n}"].shape[0] for n in ("lokr_w2_b", "lokr_w1_b") if has(n)), None)
        scale = tensors[f"{prefix}.alpha"].item() / rank if rank else 1.0
        return scale * torch.kron(w1.contiguous(), w2.contiguous()).reshape(weight.shape), 2 * (rank or 1) ** 2 + 1
    return formula


def expected_targets(modules, naming, **layers) -> dict[str, tuple[str, str]]:
    return {kohya_name(modules, component, path, naming): (component, path)
            for component, path, _ in lora_layers(modules, **layers)}


@pytest.mark.parametrize(("family", "naming", "fmt"), [
    ("sd1", "diffusers", "safetensors"), ("sd1", "diffusers", "pt"), ("sd1", "ldm", "safetensors"),
    ("sd2", "diffusers", "safetensors"), ("sdxl", "ldm", "safetensors"), ("sdxl", "diffusers", "pt"),
])
def test_kohya_locon_names_and_formula(tmp_path, models, family, naming, fmt):
    modules = models[family]
    tensors = write_kohya_lora(tmp_path / f"x.{fmt}", modules, family=family, naming=naming, conv=True, fmt=fmt,
                               rank=3, alpha=1.5)
    network = load_lora(tmp_path / f"x.{fmt}", modules, family=family)
    assert {u.key: (u.component, u.module) for u in network.updates} == expected_targets(modules, naming, conv=True)
    assert network.unmatched == () and network.family == family
    assert {u.algorithm for u in network.updates} == {"lora"}
    assert any(u.weight_shape[2:] == (3, 3) for u in network.updates)  # 3x3 LoCon layers are in
    assert_formula(modules, network, lora_formula(tensors))
    assert network.metadata == {}


def test_tucker_conv_no_alpha_and_half_precision(tmp_path, models):
    modules = models["sd1"]
    tensors = write_kohya_lora(tmp_path / "t.safetensors", modules, family="sd1", conv=True, tucker=True, alpha=None,
                               dtype=torch.float16, metadata={"ss_network_module": "lycoris.kohya"})
    network = load_lora(tmp_path / "t.safetensors", modules, family="sd1")
    assert any("lora_mid.weight" in u.tensors for u in network.updates)
    assert all(u.scale == 1.0 for u in network.updates)
    update = network.updates[0]
    assert update.delta(weight_of(modules, update)).dtype == torch.float32
    assert_formula(modules, network, lora_formula(tensors))
    assert network.metadata == {"ss_network_module": "lycoris.kohya"}


@pytest.mark.parametrize("tucker", [False, True])
def test_loha(tmp_path, models, tucker):
    modules = models["sdxl"]
    tensors = write_loha(tmp_path / "h.safetensors", modules, family="sdxl", conv=True, tucker=tucker, rank=3)
    network = load_lora(tmp_path / "h.safetensors", modules, family="sdxl")
    assert {u.algorithm for u in network.updates} == {"loha"}
    assert_formula(modules, network, loha_formula(tensors))


@pytest.mark.parametrize(("decompose_w1", "decompose_w2", "tucker"),
                         [(False, True, False), (True, False, False), (False, False, False), (True, True, True)])
def test_lokr(tmp_path, models, decompose_w1, decompose_w2, tucker):
    modules = models["sd1"]
    tensors = write_lokr(tmp_path / "k.safetensors", modules, family="sd1", conv=True, decompose_w1=decompose_w1,
                         decompose_w2=decompose_w2, tucker=tucker)
    network = load_lora(tmp_path / "k.safetensors", modules, family="sd1")
    assert {u.algorithm for u in network.updates} == {"lokr"}
    assert_formula(modules, network, lokr_formula(tensors))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize(("peft_prefix", "text_model_prefix"), [(False, True), (True, False)])
def test_peft_names_scale_one(tmp_path, models, family, peft_prefix, text_model_prefix):
    modules = models[family]
    tensors = write_peft_lora(tmp_path / "p.safetensors", modules, conv=True, peft_prefix=peft_prefix,
                              text_model_prefix=text_model_prefix)
    network = load_lora(tmp_path / "p.safetensors", modules, family=family)
    start = "base_model.model." if peft_prefix else ""
    expected = {f"{start}{c}.{p if text_model_prefix else p.removeprefix('text_model.')}": (c, p)
                for c, p, _ in lora_layers(modules, conv=True)}
    assert {u.key: (u.component, u.module) for u in network.updates} == expected
    renamed = {}
    for key, value in tensors.items():
        renamed[key.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")] = value
    assert_formula(modules, network, lora_formula(renamed))


def test_old_diffusers_processor_names(tmp_path, models):
    modules = models["sd1"]
    tensors = write_old_diffusers_lora(tmp_path / "o.safetensors", modules)
    network = load_lora(tmp_path / "o.safetensors", modules, family="sd1")
    expected = {old_diffusers_name(c, p)[0]: (c, p) for c, p, _ in lora_layers(modules)}
    assert {u.key: (u.component, u.module) for u in network.updates} == expected
    renamed = {}
    for component, path, _ in lora_layers(modules):
        name, stem = old_diffusers_name(component, path)
        for part in ("down", "up"):
            renamed[f"{name}.lora_{part}.weight"] = tensors[f"{name}{stem}.{part}.weight"]
    assert_formula(modules, network, lora_formula(renamed))


def test_dyn_dim_keeps_the_first_ranks_and_the_scale(tmp_path, models):
    modules = models["sd1"]
    tensors = write_kohya_lora(tmp_path / "d.safetensors", modules, family="sd1", rank=4, alpha=2.0, conv=True)
    network = load_lora(tmp_path / "d.safetensors", modules, family="sd1")
    for update in network.updates:
        weight = weight_of(modules, update)
        up, down = (tensors[f"{update.key}.lora_{n}.weight"].flatten(1) for n in ("up", "down"))
        expected = (2.0 / 4) * (up[:, :2].double() @ down[:2].double()).reshape(weight.shape)
        got = update.delta(weight, dyn_dim=2).double()
        assert (got - expected).abs().max() <= 4 * EPS * (up.abs()[:, :2] @ down.abs()[:2]).max()
        assert torch.equal(update.delta(weight, dyn_dim=4), update.delta(weight))
        assert torch.equal(update.delta(weight, dyn_dim=64), update.delta(weight))
    with pytest.raises(NetworkError, match="dyn_dim must be at least 1"):
        update.delta(weight, dyn_dim=0)
    with pytest.raises(NetworkError, match="shape"):
        update.delta(torch.zeros(3, 3))


def test_inpainting_conv_in_takes_a_padded_update(tmp_path, models):
    """A1111 zero-pads a 4-channel conv_in update for an inpainting UNet's 9 input channels."""
    config = tiny_model_config("sd1").unet
    inpainting = UNet2DConditionModel(dataclasses.replace(config, in_channels=9))
    tensors = write_kohya_lora(tmp_path / "c.safetensors", models["sd1"], family="sd1", conv=True)
    network = load_lora(tmp_path / "c.safetensors", {**models["sd1"], "unet": inpainting}, family="sd1")
    update = next(u for u in network.updates if u.module == "conv_in")
    delta = update.delta(inpainting.conv_in.weight)  # (32, 9, 3, 3)
    up, down = tensors["lora_unet_conv_in.lora_up.weight"], tensors["lora_unet_conv_in.lora_down.weight"]
    assert torch.equal(delta[:, 4:], torch.zeros_like(delta[:, 4:]))
    expected = (2.0 / 4) * (up.flatten(1).double() @ down.flatten(1).double()).reshape(up.shape[0], 4, 3, 3)
    assert (delta[:, :4].double() - expected).abs().max() <= 4 * EPS * expected.abs().max() * 4


def test_bundled_embeddings_in_both_layouts(tmp_path, models):
    for family, fmt in (("sd1", "pt"), ("sdxl", "safetensors")):
        modules = models[family]
        parts = {"heroine": bundled_embedding(modules, 3, seed=1), "style": bundled_embedding(modules, 1, seed=2)}
        write_kohya_lora(tmp_path / f"b.{fmt}", modules, family=family, embeddings=parts, fmt=fmt)
        network = load_lora(tmp_path / f"b.{fmt}", modules, family=family)
        assert sorted(network.bundled_embeddings) == ["heroine", "style"]
        for name, embedding in network.bundled_embeddings.items():
            assert embedding.name == name and embedding.path == tmp_path / f"b.{fmt}" and embedding.sha256 is None
            assert embedding.container == {"pt": "torch_zip", "safetensors": "safetensors"}[fmt]
            for part, tensor in parts[name].items():
                assert torch.equal(embedding.vectors["clip_l" if part == "string_to_param.*" else part], tensor)
        assert not any(key.startswith("bundle_emb") for key in network.unmatched)
    only = save(tmp_path / "only.safetensors", bundle_keys({"solo": bundled_embedding(models["sd1"], 2)}))
    network = load_lora(only, models["sd1"], family="sd1")  # A1111 loads such a file for its embeddings
    assert network.updates == () and list(network.bundled_embeddings) == ["solo"]


def test_unmatched_keys_are_reported_not_fatal(tmp_path, models):
    modules = models["sd1"]
    tensors = write_kohya_lora(tmp_path / "u.safetensors", modules, family="sd1")
    extra = {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.ones(2, 3),
             "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.ones(3, 2)}
    save(tmp_path / "u.safetensors", {**tensors, **extra})
    network = load_lora(tmp_path / "u.safetensors", modules, family="sd1")
    assert sorted(network.unmatched) == sorted(extra)
    assert len(network.updates) == len(expected_targets(modules, "diffusers"))


def test_a1111_te1_alias_and_unprefixed_peft_names(tmp_path, models):
    """lora_te1_ names the only text encoder of SD1 (A1111); unprefixed PEFT text names are the one encoder's
    on SD1 and ambiguous (unmatched) on SDXL, whose two encoders share them."""
    sd1 = write_kohya_lora(tmp_path / "k.safetensors", models["sd1"], family="sd1", unet=False)
    save(tmp_path / "te1.safetensors", {key.replace("lora_te_", "lora_te1_"): value for key, value in sd1.items()})
    network = load_lora(tmp_path / "te1.safetensors", models["sd1"], family="sd1")
    assert {u.module for u in network.updates} == {p for _, p, _ in lora_layers(models["sd1"], unet=False)}
    for family in ("sd1", "sdxl"):
        tensors = write_peft_lora(tmp_path / "p.safetensors", models[family], conv=False)
        bare = {key.split(".", 1)[1]: value for key, value in tensors.items()}  # no component prefix
        network = load_lora(save(tmp_path / "bare.safetensors", bare), models[family], family=family)
        text_keys = {key for key in bare if key.startswith("text_model.")}
        assert set(network.unmatched) == (text_keys if family == "sdxl" else set())
        assert {u.component for u in network.updates} == ({"unet"} if family == "sdxl" else {"unet", "text_encoder"})


def test_describe_reports_unsupported_layers_and_pickled_bundles(tmp_path, models):
    tensors = write_kohya_lora(tmp_path / "k.safetensors", models["sd1"], family="sd1")
    tensors[f"{LAYER}.dora_scale"] = torch.ones(32, 1)
    info = describe_lora(save(tmp_path / "dora.safetensors", tensors))
    assert info["unsupported_count"] == 1 and "dora_scale" in info["unsupported_layers"][LAYER]
    assert info["layers"] == len(expected_targets(models["sd1"], "diffusers")) - 1
    write_kohya_lora(tmp_path / "e.pt", models["sd1"], family="sd1", fmt="pt",
                     embeddings={"pal": bundled_embedding(models["sd1"], 3)})
    assert describe_lora(tmp_path / "e.pt")["bundled_embeddings"] == [{"name": "pal", "vectors": 3,
                                                                         "widths": {"clip_l": 48}}]


def addnet_hash_reference(path: Path) -> str:
    """sha256 of a safetensors file's bytes after the 8-byte length and the header (kohya / A1111 "addnet")."""
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + header_length:]).hexdigest()


def test_hash_is_a1111s_and_ignores_metadata(tmp_path, models):
    tensors = write_kohya_lora(tmp_path / "a.safetensors", models["sd1"], family="sd1")
    save(tmp_path / "b.safetensors", tensors, metadata={"ss_output_name": "renamed", "note": "x" * 999})
    assert lora_file_hash(tmp_path / "a.safetensors") == addnet_hash_reference(tmp_path / "a.safetensors")
    assert lora_file_hash(tmp_path / "a.safetensors") == lora_file_hash(tmp_path / "b.safetensors")
    assert hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest() != lora_file_hash(
        tmp_path / "a.safetensors")
    save(tmp_path / "c.pt", tensors, fmt="pt")
    assert lora_file_hash(tmp_path / "c.pt") == hashlib.sha256((tmp_path / "c.pt").read_bytes()).hexdigest()


def test_describe_reads_only_the_header_and_alphas(tmp_path, models, monkeypatch):
    modules = models["sdxl"]
    tag_frequency = {"10_hero": {"hero": 40, "red cape": 12}, "5_city": {"hero": 3, "night": 7}}
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                "ss_base_model_version": "sdxl_base_v1-0", "ss_output_name": "hero", "ss_training_comment": "hi",
                "ss_tag_frequency": json.dumps(tag_frequency), "ss_seed": "7"}
    parts = {"hero": bundled_embedding(modules, 2)}
    tensors = write_kohya_lora(tmp_path / "x.safetensors", modules, family="sdxl", conv=True, metadata=metadata,
                               embeddings=parts)
    reads = []
    original = SafetensorsFile.read
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, key: reads.append(key) or original(self, key))
    info = describe_lora(tmp_path / "x.safetensors")
    json.dumps(info)  # JSON-able
    assert reads and all(key.endswith(".alpha") for key in reads)
    layers = len(expected_targets(modules, "ldm", conv=True))
    assert info["algorithms"] == {"lora": layers} and info["layers"] == layers and info["keys"] == len(tensors)
    assert info["family"] == "sdxl" and "te1/te2 keys" in info["family_evidence"]
    assert info["rank"] == {"min": 4, "max": 4, "values": [4]} and info["alpha"]["values"] == [2.0]
    assert info["text_encoder"] and info["blocks"]["text_encoder"]["encoder_layers"] == [0, 1, 2]
    unet = info["blocks"]["unet"]
    assert set(unet) >= {"down", "mid", "up", "other"} and unet["conv_layers"] > 0 and "middle_block" in unet["mid"]
    assert info["bundled_embeddings"] == [{"name": "hero", "vectors": 2, "widths": {"clip_l": 768, "clip_g": 1280}}]
    assert info["hash"] == addnet_hash_reference(tmp_path / "x.safetensors") and info["short_hash"] == info["hash"][:12]
    shown = info["metadata"]
    assert shown["ss_output_name"] == "hero" and "ss_seed" not in shown and info["metadata_keys"] == len(metadata)
    assert shown["ss_tag_frequency"] == {"datasets": 2, "distinct_tags": 3,
                                         "top": [["hero", 43], ["red cape", 12], ["night", 7]]}


@pytest.mark.parametrize(("context", "text", "family"), [(768, 768, "sd1"), (1024, 1024, "sd2"), (2048, None, "sdxl")])
def test_describe_guesses_the_family_from_released_widths(tmp_path, context, text, family):
    tensors = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
               torch.zeros(1, context),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(8, 1)}
    if text:
        tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(1, text)
        tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(text, 1)
    save(tmp_path / "w.safetensors", tensors)
    assert describe_lora(tmp_path / "w.safetensors")["family"] == family


# Refusals ------------------------------------------------------------------------------------------


def refused(path, modules, family, *fragments):
    with pytest.raises(NetworkError) as caught:
        load_lora(path, modules, family=family)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_another_family_is_named(tmp_path, models):
    write_kohya_lora(tmp_path / "xl.safetensors", models["sdxl"], family="sdxl")
    refused(tmp_path / "xl.safetensors", models["sd1"], "sd1", "made for SDXL (te1/te2 keys", "64-wide context",
            "this model is SD1 (one text encoder, 48-wide context", "key 'lora_te2_")
    write_kohya_lora(tmp_path / "one.safetensors", models["sd1"], family="sd1")
    refused(tmp_path / "one.safetensors", models["sdxl"], "sdxl", "lora_te_ keys (one text encoder)", "48-wide",
            "this model is SDXL (two text encoders, 64-wide context")
    write_kohya_lora(tmp_path / "sd2.safetensors", models["sd2"], family="sd2", text_encoder=False)
    refused(tmp_path / "sd2.safetensors", models["sd1"], "sd1", "made for another model (64-wide context)",
            "attn2_to_k")


def corrupt(tmp_path, models, change) -> Path:
    tensors = write_kohya_lora(tmp_path / "ok.safetensors", models["sd1"], family="sd1", conv=True)
    change(tensors)
    return save(tmp_path / "bad.safetensors", tensors)


@pytest.mark.parametrize(("change", "fragments"), [
    (lambda t: t.update({f"{LAYER}.lora_up.weight": torch.ones(32, 3)}),
     ["rank mismatch", "lora_up.weight [32, 3] has rank 3", "lora_down.weight [4, 32] has rank 4", LAYER]),
    (lambda t: t.update({f"{LAYER}.lora_down.weight": torch.ones(4, 31)}), ["does not fit", "[32, 32]", LAYER]),
    (lambda t: t.update({f"{CONV}.lora_down.weight": torch.ones(4, 32, 1, 1)}), ["does not fit", "[32, 32, 3, 3]"]),
    (lambda t: t[f"{LAYER}.lora_up.weight"].view(-1).__setitem__(5, float("nan")),
     ["NaN or infinite", f"{LAYER}.lora_up.weight"]),
    (lambda t: t.update({f"{LAYER}.alpha": torch.tensor(float("inf"))}), ["NaN or infinite", f"{LAYER}.alpha"]),
    (lambda t: t.update({f"{LAYER}.dora_scale": torch.ones(32, 1)}), ["'dora_scale' (DoRA", LAYER]),
    (lambda t: t.update({f"{LAYER}.lora_extra": torch.ones(2)}), ["['lora_extra']", "a lora layer does not have"]),
    (lambda t: t.pop(f"{LAYER}.lora_up.weight"), ["lacks ['lora_up.weight']", LAYER]),
    (lambda t: t.update({f"{LAYER}.alpha": torch.ones(2)}), ["expected a scalar alpha"]),
    (lambda t: [t.pop(k) for k in list(t) if k.startswith(LAYER)] and t.update(
        {f"{LAYER}.oft_blocks": torch.ones(4, 8, 8)}), ["'oft_blocks' (LyCORIS OFT)"]),
    (lambda t: t.update({LAYER.replace("down_blocks_0_attentions_0", "input_blocks_1_1") + ".alpha":
                         torch.tensor(1.0)}),
     ["both name unet.down_blocks.0.attentions.0", "lora_unet_input_blocks_1_1_transformer"]),
])
def test_bad_layers_are_refused_by_name(tmp_path, models, change, fragments):
    refused(corrupt(tmp_path, models, change), models["sd1"], "sd1", *fragments)


def test_file_matching_nothing_is_refused(tmp_path, models):
    path = save(tmp_path / "n.safetensors", {"model.diffusion_model.x.weight": torch.ones(2, 2),
                                            "lora_unet_nowhere.lora_down.weight": torch.ones(1, 2)})
    refused(path, models["sd1"], "sd1", "no key names a layer of this sd1 model", "'lora_unet_nowhere")


def test_unreadable_files_are_network_errors(tmp_path, models):
    tensors = write_kohya_lora(tmp_path / "t.safetensors", models["sd1"], family="sd1")
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[: len(raw) // 2])
    refused(tmp_path / "t.safetensors", models["sd1"], "sd1", "truncated")
    with pytest.raises(NetworkError, match="no such file"):
        describe_lora(tmp_path / "missing.safetensors")
    assert tensors


class _Reduce:
    """Pickles as `func(*args)`: what an attacker writes with __reduce__."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_hostile_pickle_never_runs(tmp_path, models):
    marker = tmp_path / "ran"
    command = f'"{sys.executable}" -c "open(r\'{marker}\', \'w\').close()"'
    payload = {f"{LAYER}.lora_down.weight": _Reduce(os.system, command)}
    path = write_zip(tmp_path / "evil.pt", pickle.dumps(payload, protocol=2))
    for read in (lambda: load_lora(path, models["sd1"], family="sd1"), lambda: describe_lora(path)):
        with pytest.raises(UnsafePickleError) as caught:
            read()
        assert str(path) in str(caught.value) and "system" in str(caught.value)
    assert not marker.exists()
