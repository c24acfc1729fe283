"""Extra networks through the Engine: `<lora:...>` / `<hypernet:...>` tags applied, reported, removed exactly.

The LoRA files are written here in kohya-ss's format (`lora_te_*` / `lora_unet_*` with `lora_down`,
`lora_up`, `alpha`), and the expected model is built by the merge formula written out in the test:
W' = W + m * (alpha / rank) * up @ down (conv: up.flatten(1) @ down.flatten(1), reshaped). The engine's
results must equal the results of an engine loaded on those merged weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tiengine.embeddings.embedding import Embedding
from tiengine.engine import Engine
from tiengine.io.metadata import parse_parameters

RANK, ALPHA = 4, 2.0
TEXT_LAYERS = ("text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1")
UNET_LAYERS = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.1.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",  # LoCon: a 3x3 conv
)


def lora_tensors(modules, seed: int) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA over TEXT_LAYERS and UNET_LAYERS of `modules` with random factors."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, prefix, layers in (("text_encoder", "lora_te_", TEXT_LAYERS), ("unet", "lora_unet_", UNET_LAYERS)):
        for layer in layers:
            weight = modules[component].get_submodule(layer).weight
            kernel = tuple(weight.shape[2:])
            key = prefix + layer.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn((RANK, weight.shape[1], *kernel), generator=generator) * 0.3
            tensors[f"{key}.lora_up.weight"] = torch.randn((weight.shape[0], RANK, *(1,) * len(kernel)),
                                                           generator=generator) * 0.3
            tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    return tensors


def merged(modules, tensors, te_multiplier: float, unet_multiplier: float):
    """A copy of `modules` with the LoRA merged by the formula."""
    result = {name: copy.deepcopy(module) for name, module in modules.items()}
    for component, prefix, layers, multiplier in (("text_encoder", "lora_te_", TEXT_LAYERS, te_multiplier),
                                                  ("unet", "lora_unet_", UNET_LAYERS, unet_multiplier)):
        for layer in layers:
            key = prefix + layer.replace(".", "_")
            down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
            weight = result[component].get_submodule(layer).weight
            update = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (ALPHA / RANK)
            with torch.no_grad():
                weight += multiplier * update
    return result


def addnet_hash(path) -> str:
    """A1111's Lora hash of a .safetensors file: sha256 of everything after the header."""
    data = path.read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + header_length:]).hexdigest()


@pytest.fixture(scope="module")
def setup(sd1_folder, tmp_path_factory):
    loras = tmp_path_factory.mktemp("loras")
    engine = Engine.load(sd1_folder, embeddings=False, loras=loras)
    base_state = {name: {key: value.clone() for key, value in module.state_dict().items()}
                  for name, module in engine.modules.items()}
    tensors = lora_tensors(engine.modules, seed=1)
    save_file(tensors, str(loras / "ink.safetensors"), metadata={"ss_output_name": "ink_style_v2"})
    (loras / "styles").mkdir()
    other = lora_tensors(engine.modules, seed=2)
    torch.save(other, loras / "styles" / "paper.pt")
    engine.networks.loras.reload()
    return engine, base_state, tensors, other, loras


def assert_base_weights(engine, base_state) -> None:
    for name, module in engine.modules.items():
        for key, value in module.state_dict().items():
            assert torch.equal(value, base_state[name][key]), f"{name}.{key} differs from the base weight"


def engine_on(sd1_folder, modules) -> Engine:
    reference = Engine.load(sd1_folder, embeddings=False)
    for name, module in modules.items():
        reference.modules[name].load_state_dict(module.state_dict())
    return reference


def test_lora_in_the_prompt_equals_the_merged_model_and_removal_is_exact(setup, sd1_folder):
    engine, base_state, tensors, _, _ = setup
    result = engine.encode("a red circle <lora:ink:0.7:1.3>, large", "blurry", steps=4)
    (report,) = result.networks
    assert (report.kind, report.name, report.applied, report.te_multiplier, report.unet_multiplier) == \
        ("lora", "ink", True, 0.7, 1.3)
    assert report.layers == len(TEXT_LAYERS) + len(UNET_LAYERS) and report.file == "ink.safetensors"
    reference = engine_on(sd1_folder, merged(_base_modules(sd1_folder), tensors, 0.7, 1.3))
    expected = reference.encode("a red circle , large", "blurry", steps=4)
    # the patch adds m * scale * up @ down in one fused step (addmm): the weights agree with the formula to fp32
    # rounding (checked below), so the encoder outputs agree to a few fp32 ulps of their scale (~1)
    torch.testing.assert_close(result.positive[0][0].entries[0][1], expected.positive[0][0].entries[0][1],
                               rtol=0, atol=1e-5)
    assert not torch.equal(result.positive[0][0].entries[0][1], engine_on(sd1_folder, _base_modules(sd1_folder))
                           .encode("a red circle , large", "blurry", steps=4).positive[0][0].entries[0][1])
    for name, module in engine.modules.items():  # the patched weights are the formula's, to fp32 rounding
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, reference.modules[name].state_dict()[key], rtol=0, atol=1e-6)
    engine.encode("a red circle, large", "blurry", steps=4)  # no tag: the base model back
    assert_base_weights(engine, base_state)


def _base_modules(sd1_folder):
    return Engine.load(sd1_folder, embeddings=False).modules


def test_multiplier_zero_gives_the_base_image_bit_for_bit_and_one_changes_it(setup):
    engine, base_state, _, _, _ = setup
    settings = dict(steps=3, seed=11, sampler="Euler")
    base = np.asarray(engine.generate("a blue square", **settings).images[0])
    zero = engine.generate("a blue square <lora:ink:0>", **settings)
    assert np.array_equal(np.asarray(zero.images[0]), base)
    one = engine.generate("a blue square <lora:ink:1>", **settings)
    assert np.abs(np.asarray(one.images[0]).astype(int) - base.astype(int)).max() > 0
    fields = parse_parameters(one.parameters[0])
    assert fields["Prompt"] == "a blue square <lora:ink:1>"  # the infotext keeps the prompt as written
    assert fields["Lora hashes"] == f"ink: {addnet_hash(engine.networks.loras.lookup('ink').path)[:12]}"
    engine.generate("a blue square", **settings)
    assert_base_weights(engine, base_state)


def test_names_aliases_subfolders_and_pickled_files(setup):
    engine, base_state, _, _, _ = setup
    by_alias = engine.encode("x <lora:ink_style_v2:1>").networks[0]
    assert by_alias.applied and by_alias.file == "ink.safetensors"
    by_stem = engine.encode("x <lyco:paper:0.5>").networks[0]
    assert by_stem.applied and by_stem.file == "styles/paper.pt" and by_stem.kind == "lyco"
    by_path = engine.encode("x <lora:styles/paper:0.5>").networks[0]
    assert by_path.applied and by_path.file == "styles/paper.pt"
    engine.encode("x")
    assert_base_weights(engine, base_state)


def test_two_loras_stack_in_tag_order(setup, sd1_folder):
    engine, base_state, tensors, other, _ = setup
    result = engine.encode("a cat <lora:ink:0.5> <lora:paper:1:0.25>", steps=2)
    assert [report.applied for report in result.networks] == [True, True]
    expected = merged(merged(_base_modules(sd1_folder), tensors, 0.5, 0.5), other, 1.0, 0.25)
    for name, module in expected.items():
        for key, value in module.state_dict().items():
            torch.testing.assert_close(engine.modules[name].state_dict()[key], value, rtol=0, atol=1e-6)
    engine.apply_networks("")
    assert_base_weights(engine, base_state)


def test_unknown_missing_and_negative_tags_are_removed_and_reported(setup):
    engine, base_state, _, _, _ = setup
    plain = engine.encode("a green triangle, ", "ugly, <lora:ink:1>", steps=2)
    result = engine.encode("a green triangle, <lora:nowhere:0.8><foo:bar>", "ugly, <lora:ink:1>", steps=2)
    reasons = {(report.kind, report.where): (report.applied, report.reason) for report in result.networks}
    assert reasons[("lora", "positive")] == (False, f"no LoRA named 'nowhere' in {engine.networks.loras.folder}")
    assert "unknown extra network kind 'foo'" in reasons[("foo", "positive")][1]
    assert reasons[("lora", "negative")][0] is False and "negative prompt" in reasons[("lora", "negative")][1]
    assert torch.equal(result.positive[0][0].entries[0][1], plain.positive[0][0].entries[0][1])
    # A1111 leaves the negative prompt's text as written: the tag is read as words there
    assert torch.equal(result.negative.entries[0][1], plain.negative.entries[0][1])
    assert result.negative.token_counts != engine.encode("", "ugly, ", steps=2).negative.token_counts
    assert_base_weights(engine, base_state)


def test_bad_arguments_and_broken_files_are_skipped_not_fatal(setup, tmp_path):
    engine, base_state, tensors, _, loras = setup
    bad = dict(tensors)
    key = next(iter(bad))
    bad[key] = torch.full_like(bad[key], float("nan"))
    save_file(bad, str(loras / "broken.safetensors"))
    (loras / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    engine.networks.loras.reload()
    result = engine.encode("x <lora:broken:1> <lora:ink:heavy> <lora:truncated:1>")
    assert [report.applied for report in result.networks] == [False, False, False]
    assert all(report.reason for report in result.networks)
    assert "heavy" in result.networks[1].reason
    assert_base_weights(engine, base_state)
    (loras / "broken.safetensors").unlink()
    engine.networks.loras.reload()


def test_generate_batch_runs_each_network_set_as_its_own_run(setup):
    engine, base_state, _, _, _ = setup
    prompts = ["a red circle", "a red circle <lora:ink:1>", "a red circle <lora:paper:1>"]
    batch = engine.generate_batch(prompts, steps=2, seed=5, sampler="Euler", batch_size=3)
    for index, prompt in enumerate(prompts):
        alone = engine.generate(prompt, steps=2, seed=5 + index, sampler="Euler")
        assert np.array_equal(np.asarray(batch.images[index]), np.asarray(alone.images[0]))
    engine.apply_networks("")
    assert_base_weights(engine, base_state)


def test_bundled_embedding_is_usable_while_its_lora_is_in_the_prompt(setup):
    engine, _, tensors, _, loras = setup
    vectors = torch.randn(2, 48, generator=torch.Generator().manual_seed(3))
    # A1111's bundled layout: bundle_emb.NAME.string_to_param.* (an SD1 .pt embedding's dict, flattened)
    save_file({**tensors, "bundle_emb.inkchar.string_to_param.*": vectors}, str(loras / "withchar.safetensors"))
    engine.networks.loras.reload()
    without = engine.encode("a portrait of inkchar")
    assert [mention.name for mention in without.applied] == []
    with_lora = engine.encode("a portrait of inkchar <lora:withchar:0>")
    assert [(a.name, a.n_vectors) for a in with_lora.applied] == [("inkchar", 2)]
    assert [(a.name) for a in engine.encode("a portrait of inkchar").applied] == []  # gone with its LoRA


def test_hypernetwork_tag_changes_the_unet_and_removal_restores_it(setup, tmp_path, capsys):
    engine, _, _, _, _ = setup
    folder = tmp_path / "hypernetworks"
    folder.mkdir()
    generator = torch.Generator().manual_seed(4)
    width = engine.config.unet.cross_attention_dim

    def pair():
        return {"linear.0.weight": torch.randn(2 * width, width, generator=generator) * 0.1,
                "linear.0.bias": torch.zeros(2 * width),
                "linear.1.weight": torch.randn(width, 2 * width, generator=generator) * 0.1,
                "linear.1.bias": torch.zeros(width)}

    torch.save({width: [pair(), pair()], "layer_structure": [1, 2, 1], "activation_func": "linear",
                "is_layer_norm": False, "use_dropout": False, "name": "glow", "step": 10}, folder / "glow.pt")
    from tiengine.cli import main

    assert main(["hypernetworks", "list", str(folder), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["networks"]
    assert (row["name"], row["description"]["layer_structure"], row["description"]["sizes"]) == \
        ("glow", [1, 2, 1], [width])
    hyper_engine = engine.sharing_weights()
    hyper_engine.networks.hypernetworks = type(engine.networks.loras)(folder, "hypernetwork")
    settings = dict(steps=2, seed=9, sampler="Euler")
    base = np.asarray(hyper_engine.generate("a dog", **settings).images[0])
    with_hyper = hyper_engine.generate("a dog <hypernet:glow:1>", **settings)
    assert with_hyper.conditioning.networks[0].applied
    assert np.abs(np.asarray(with_hyper.images[0]).astype(int) - base.astype(int)).max() > 0
    assert np.array_equal(np.asarray(hyper_engine.generate("a dog <hypernet:glow:0>", **settings).images[0]), base)
    assert np.array_equal(np.asarray(hyper_engine.generate("a dog", **settings).images[0]), base)


def test_cli_lists_inspects_and_generates_with_loras(setup, sd1_folder, tmp_path, capsys):
    from tiengine.cli import main

    _, _, _, _, loras = setup
    folder = tmp_path / "loras"
    shutil.copytree(loras, folder)
    assert main(["loras", "list", str(folder), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {row["file"] for row in listing["networks"]} >= {"ink.safetensors", "styles/paper.pt"}
    assert main(["loras", "inspect", str(folder / "ink.safetensors"), "--json"]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description  # the description's fields are tested with describe_lora
    out = tmp_path / "out.png"
    assert main(["generate", "a cat <lora:ink:0.6> <lora:missing:1>", "--model", str(sd1_folder), "--loras",
                 str(folder), "--steps", "2", "--seed", "1", "--out", str(out), "--json", "--embeddings",
                 str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [(n["name"], n["applied"]) for n in summary["extra_networks"]] == [("ink", True), ("missing", False)]
    assert "Lora hashes: \"ink: " in summary["images"][0]["parameters"] or \
        "Lora hashes: ink: " in summary["images"][0]["parameters"]


def test_embedding_in_vocabulary_is_not_replaced_by_a_bundled_one(setup, tmp_path):
    engine, _, tensors, _, loras = setup
    save_file({**tensors, "bundle_emb.inkchar.string_to_param.*": torch.zeros(2, 48)},
              str(loras / "withchar.safetensors"))
    engine.networks.loras.reload()
    own = Embedding("inkchar", {"clip_l": torch.ones(1, 48)})
    other = engine.sharing_weights()
    other.networks.loras = engine.networks.loras
    other.add_embedding(own)
    result = other.encode("inkchar <lora:withchar:0>")
    assert [(a.name, a.n_vectors) for a in result.applied] == [("inkchar", 1)]


def test_switching_sets_gives_the_same_weights_as_applying_the_new_set_alone(setup):
    engine, base_state, _, _, _ = setup
    engine.apply_networks("<lora:paper:0.5>")
    direct = {name: {key: value.clone() for key, value in module.state_dict().items()}
              for name, module in engine.modules.items()}
    engine.apply_networks("<lora:ink:1> <lora:paper:2>")
    engine.apply_networks("<lora:paper:0.5>")  # from a set touching more layers, with other multipliers
    for name, module in engine.modules.items():
        for key, value in module.state_dict().items():
            assert torch.equal(value, direct[name][key]), f"{name}.{key}"
    engine.patcher.release()
    assert_base_weights(engine, base_state)
    assert not engine.patcher._backups
