"""The tokenize, encode, generate and info commands, run through tiengine.cli.main on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from model_builders import tiny_model_folder
from safetensors import safe_open

from tiengine.cli import main
from tiengine.embeddings.embedding import Embedding, save_embedding


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("cli") / "model", "sd1")


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-embeddings")
    save_embedding(Embedding("EasyNegative", {"clip_l": torch.randn(8, 768)}), folder / "EasyNegative.safetensors")
    save_embedding(Embedding("toy", {"clip_l": torch.randn(2, 48)}), folder / "toy.safetensors")
    save_embedding(Embedding("sd2thing", {"clip_h": torch.randn(1, 1024)}), folder / "sd2thing.safetensors")
    return folder


def test_tokenize_json_layout(capsys, embeddings):
    assert main(["tokenize", "a girl, (EasyNegative:1.2) BREAK sd2thing", "--embeddings", str(embeddings),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompt"] == "a girl, (EasyNegative:1.2) BREAK sd2thing"
    first, second = report["chunks"]
    assert len(first["tokens"]) == 77 and len(first["weights"]) == 77
    assert first["tokens"][:4] == [49406, 320, 1611, 267]
    assert first["embeddings"] == [[4, "EasyNegative", 8]]
    assert first["tokens"][4:12] == list(range(49408, 49416))
    assert first["weights"][4:12] == [1.2] * 8
    assert first["tokens"][12:] == [49407] * 65
    assert report["token_count"] == 75 + len(second["tokens"][1 : second["tokens"].index(49407)])
    assert report["skipped"] == [["sd2thing", "made for SD2 (1024), this model is SD1 (768)"]]


def test_tokenize_sdxl_second_encoder_ids_and_file_input(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n(a dog:1.5)\n", encoding="utf-8")
    assert main(["tokenize", "--file", str(prompts), "--family", "sdxl", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["a cat", "(a dog:1.5)"]
    chunk = lines[0]["chunks"][0]
    assert chunk["tokens"][:4] == [49406, 320, 2368, 49407] and chunk["tokens"][4] == 49407
    assert chunk["tokens_2"][:4] == [49406, 320, 2368, 49407] and set(chunk["tokens_2"][4:]) == {0}
    assert lines[1]["chunks"][0]["weights"][1:3] == [1.5, 1.5]


def test_tokenize_readable_output_and_missing_file(capsys, tmp_path):
    assert main(["tokenize", "(cat:1.3) embedding:nothing"]) == 0
    out = capsys.readouterr().out
    assert "cat</w>" in out and "1.3" in out and "unresolved: embedding:nothing" in out
    assert main(["tokenize", "--file", str(tmp_path / "absent.txt")]) == 2
    assert "cannot read prompts" in capsys.readouterr().err


def test_encode_writes_tensors_and_metadata(capsys, tmp_path, model, embeddings):
    out = tmp_path / "cond.safetensors"
    args = ["encode", "a [cat:dog:0.5], toy AND castle:0.5", "--negative", "EasyNegative", "--model", str(model),
            "--embeddings", str(embeddings), "--steps", "10", "--out", str(out)]
    assert main(args) == 0
    with safe_open(str(out), "pt") as handle:
        names = sorted(handle.keys())
        metadata = json.loads(handle.metadata()["tiengine"])
        assert handle.get_tensor("positive.0.0.context").shape == (1, 77, 48)
    assert names == ["negative.0.context", "positive.0.0.context", "positive.0.1.context", "positive.1.0.context"]
    assert [p["weight"] for p in metadata["parts"]] == [1.0, 0.5]
    assert [entry[:2] for entry in metadata["parts"][0]["schedule"]] == [[5, "a cat, toy"], [10, "a dog, toy"]]
    applied = {(a["name"], a["prompt"]) for a in metadata["applied_embeddings"]}
    assert applied == {("toy", "positive")}
    assert metadata["skipped_embeddings"] == [
        {"name": "EasyNegative", "reason": "made for SD1 (clip_l 768), this model is SD1 (clip_l 48)"}
    ]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_generate_and_info_round_trip(capsys, tmp_path, model, embeddings):
    out = tmp_path / "image.png"
    assert main(["generate", "a toy castle", "--negative", "blurry", "--model", str(model), "--embeddings",
                 str(embeddings), "--steps", "3", "--seed", "5", "--size", "32x32", "--sampler", "DPM++ 2M",
                 "--scheduler", "karras", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"][0]["path"] == str(out) and summary["images"][0]["seed"] == 5
    assert [a["name"] for a in summary["applied_embeddings"]] == ["toy"]
    assert main(["info", str(out), "--json"]) == 0
    fields = json.loads(capsys.readouterr().out)
    assert fields["Prompt"] == "a toy castle" and fields["Negative prompt"] == "blurry"
    assert fields["Sampler"] == "DPM++ 2M" and fields["Seed"] == "5" and "toy: " in fields["TI hashes"]
    assert fields["CFG scale"] == "7"  # A1111's default for a model of one's own
    assert main(["generate", "a toy castle", "--model", str(model), "--steps", "2", "--size", "32x32",
                 "--out", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err


def test_compare_samplers_writes_one_grid(capsys, tmp_path, model):
    out = tmp_path / "grid.png"
    assert main(["generate", "a castle", "--model", str(model), "--steps", "2", "--seed", "1", "--size", "32x32",
                 "--compare-samplers", "Euler,DPM++ 2M,Heun", "--out", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as grid:
        assert grid.width > 3 * 32 and grid.height > 32
        assert "Samplers: " in grid.info["parameters"]
    assert main(["generate", "x", "--model", str(model), "--compare-samplers", "Euler,Nope", "--out",
                 str(tmp_path / "g2.png")]) == 2
    assert "unknown sampler 'Nope'" in capsys.readouterr().err


def test_info_on_image_without_parameters(capsys, tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert main(["info", str(tmp_path / "plain.png")]) == 2
    assert "no generation parameters" in capsys.readouterr().err
