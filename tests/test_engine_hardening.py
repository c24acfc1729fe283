"""Engine hardening: non-finite latents and images stop with NonFiniteError, prompt limits reach every prompt the
engine parses (negative prompt included), infotext with text that is not valid Unicode, loading progress,
engines of the demo and the evaluator that never read $TIENGINE_EMBEDDINGS, and `embedding:sub/cat` reaching a
file whose name another file took."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from model_builders import build_modules, tiny_model_config, write_model_folder

import tiengine
from tiengine.cli import main
from tiengine.embeddings.embedding import Embedding, save_embedding
from tiengine.embeddings.library import EmbeddingLibrary
from tiengine.engine import Engine
from tiengine.errors import EngineError, NonFiniteError
from tiengine.io.metadata import parse_parameters, read_image_parameters, save_png, valid_text
from tiengine.text.prompt import PromptError, PromptLimits
from tiengine.toyworld import demo, evaluation

BAD_BYTE = os.fsdecode(b"\xff")  # how Python hands over a command-line byte that is not UTF-8: "\udcff"


@pytest.fixture(scope="module")
def engine(sd1_folder):
    return Engine.load(sd1_folder, embeddings=False)


@pytest.fixture
def user_embeddings(tmp_path, monkeypatch):
    """$TIENGINE_EMBEDDINGS set to a folder holding one usable embedding."""
    folder = tmp_path / "user-embeddings"
    folder.mkdir()
    save_embedding(Embedding("rick", {"clip_l": torch.randn(2, 48)}), folder / "rick.safetensors")
    monkeypatch.setenv("TIENGINE_EMBEDDINGS", str(folder))
    return folder


def _poisoned(engine: Engine, component: str, parameter: str, value: float) -> Engine:
    """An engine like `engine` whose `component` has `parameter` filled with `value` (NaN or inf)."""
    module = copy.deepcopy(engine.modules[component])
    with torch.no_grad():
        module.get_parameter(parameter).fill_(value)
    return Engine(engine.config, {**engine.modules, component: module}, model_path=engine.model_path)


# ------------------------------------------------------------------------------------ non-finite

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_unet_output_stops_generate(engine, value):
    poisoned = _poisoned(engine, "unet", "conv_out.weight", value)
    with pytest.raises(NonFiniteError, match=r"produced by the UNet \(the sampled latents\).*fp32.*lower CFG scale"):
        poisoned.generate("a cat", steps=2, seed=1, sampler="Euler")
    assert issubclass(NonFiniteError, EngineError) and tiengine.NonFiniteError is NonFiniteError


def test_non_finite_vae_decode_stops_generate(engine):
    poisoned = _poisoned(engine, "vae", "decoder.conv_out.weight", float("nan"))
    with pytest.raises(NonFiniteError, match=r"all NaN.*produced by the VAE decode.*different VAE"):
        poisoned.generate("a cat", steps=2, seed=1, sampler="Euler")
    engine.generate("a cat", steps=2, seed=1, sampler="Euler")  # the healthy engine is unaffected


def test_cli_generate_with_a_nan_unet_exits_2_without_a_file(tmp_path, capsys):
    config = tiny_model_config("sd1")
    modules = build_modules(config)
    with torch.no_grad():
        modules["unet"].conv_out.weight.fill_(float("nan"))
    folder = write_model_folder(tmp_path / "nan-model", config, modules)
    out = tmp_path / "out.png"
    assert main(["generate", "a cat", "--model", str(folder), "--steps", "2", "--seed", "1", "--out", str(out),
                 "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tiengine generate: a tensor with non-finite values") and "--dtype fp32" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


# --------------------------------------------------------------------------------- prompt limits

def test_engine_prompt_limits_reach_encode(engine, sd1_folder):
    many_parts = " AND ".join(f"part {index}" for index in range(40))  # over the default 32 AND parts
    with pytest.raises(PromptError, match="max_and_parts"):
        engine.encode(many_parts)
    raised = Engine.load(sd1_folder, embeddings=False, prompt_limits=PromptLimits(max_and_parts=64))
    assert raised.prompt_limits == PromptLimits(max_and_parts=64)
    assert len(raised.encode(many_parts, steps=4).positive) == 40
    assert raised.sharing_weights().prompt_limits is raised.prompt_limits
    # nesting is checked by the schedule parser and again by the attention parser of each scheduled text
    deep = "(" * 80 + "cat" + ")" * 80
    with pytest.raises(PromptError, match="max_nesting_depth"):
        engine.encode(deep)
    deep_engine = Engine(engine.config, engine.modules, prompt_limits=PromptLimits(max_nesting_depth=100))
    assert deep_engine.encode(deep, steps=4).positive[0][0].texts == [deep]


def test_negative_prompt_goes_through_the_same_limits(engine):
    strict = Engine(engine.config, engine.modules, prompt_limits=PromptLimits(max_chars=40))
    strict.encode("a cat", "blurry", steps=4)
    with pytest.raises(PromptError, match="max_chars"):
        strict.encode("a cat", "blurry, " * 10, steps=4)
    with pytest.raises(PromptError, match="max_schedule_entries"):
        Engine(engine.config, engine.modules, prompt_limits=PromptLimits(max_schedule_entries=5)).encode(
            "a cat", "[red|blue] dog", steps=10)
    with pytest.raises(PromptError, match="max_chars"):  # generate parses with the same limits
        strict.generate("a cat " * 10, steps=2, seed=1)


# ------------------------------------------------------------------------------- invalid infotext

def test_infotext_replaces_lone_surrogates_and_reads_back(tmp_path):
    text = f"a cat\nNegative prompt: bad{BAD_BYTE}\nSteps: 2, Model: m{BAD_BYTE}, Seed: 1"
    assert valid_text(text) == text.replace(BAD_BYTE, "\ufffd")
    from PIL import Image

    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", text)
    read = read_image_parameters(path)
    assert read == valid_text(text)
    assert parse_parameters(read)["Negative prompt"] == "bad\ufffd"


def test_model_folder_named_with_invalid_bytes_generates_and_saves(sd1_folder, tmp_path):
    folder = tmp_path / os.fsdecode(b"model\xfe")
    shutil.copytree(sd1_folder, folder)
    result = Engine.load(folder, embeddings=False).generate("a cat", steps=2, seed=1, sampler="Euler")
    assert "Model: model\ufffd" in result.parameters[0]
    (path,) = result.save(tmp_path / "out.png")
    assert read_image_parameters(path) == result.parameters[0]


def test_cli_generate_with_an_invalid_byte_in_the_negative_prompt(sd1_folder, tmp_path, capsys):
    out = tmp_path / "neg.png"
    assert main(["generate", "a cat", "--negative", BAD_BYTE, "--model", str(sd1_folder), "--steps", "2",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lone surrogate" in err and "Traceback" not in err and not out.exists()


def test_cli_generate_with_an_invalid_byte_in_the_model_and_output_names(sd1_folder, tmp_path, capsys):
    folder = tmp_path / os.fsdecode(b"m\xfe")
    shutil.copytree(sd1_folder, folder)
    out = tmp_path / os.fsdecode(b"out\xff.png")
    assert main(["generate", "a cat", "--model", str(folder), "--steps", "2", "--seed", "1", "--out", str(out)]) == 0
    assert f"wrote {tmp_path}/out\ufffd.png (seed 1)" in capsys.readouterr().out
    assert parse_parameters(read_image_parameters(out))["Model"] == "m\ufffd"


# ------------------------------------------------------------------------------ loading progress

def test_load_reports_each_component(sd1_folder):
    calls = []
    engine = Engine.load(sd1_folder, embeddings=False, progress=lambda *call: calls.append(call))
    components = engine.config.components
    assert calls == [(name, number, len(components)) for number, name in enumerate(components, start=1)]


def test_cli_shows_a_loading_bar_unless_json(sd1_folder, tmp_path, capsys):
    assert main(["encode", "a cat", "--model", str(sd1_folder), "--out", str(tmp_path / "a.safetensors")]) == 0
    assert "loading model" in capsys.readouterr().err
    assert main(["encode", "a cat", "--model", str(sd1_folder), "--out", str(tmp_path / "b.safetensors"),
                 "--json"]) == 0
    assert "loading model" not in capsys.readouterr().err
    assert main(["generate", "a cat", "--model", str(sd1_folder), "--steps", "1", "--out", str(tmp_path / "c.png")]) == 0
    assert "loading model" in capsys.readouterr().err


# ------------------------------------------------------------------------- shadowed embedding files

def test_engine_binds_a_shadowed_file_by_its_path(sd1_folder, tmp_path):
    (tmp_path / "sub").mkdir()
    winner, shadowed = torch.randn(1, 48), torch.randn(2, 48)
    save_embedding(Embedding("cat", {"clip_l": winner}), tmp_path / "cat.pt")
    save_embedding(Embedding("cat", {"clip_l": shadowed}), tmp_path / "sub" / "cat.pt")
    engine = Engine.load(sd1_folder, embeddings=tmp_path)

    def applied(prompt):
        return [(a.name, a.n_vectors) for a in engine.encode(prompt, steps=4, explicit_embedding_syntax=True).applied]

    assert applied("a cat") == [("cat", 1)]
    # A1111 reads `embedding:sub/cat` as words: only the bare "cat" binds, to the winner
    assert [(a.name, a.slot) for a in engine.encode("a embedding:sub/cat", steps=4).applied] == [("cat", 7)]
    assert applied("a embedding:sub/cat") == [("sub/cat", 2)]
    assert applied("a embedding:cat") == [("cat", 1)]
    result = engine.encode("a embedding:other/cat", steps=4, explicit_embedding_syntax=True)
    assert result.applied == [] and result.warnings == ["embedding:other/cat names no loaded embedding"]
    # the shadowed vectors are the ones encoded: the same conditioning as a model with only that file
    alone = tmp_path / "alone"
    alone.mkdir()
    save_embedding(Embedding("cat", {"clip_l": shadowed}), alone / "cat.pt")
    expected = Engine(engine.config, engine.modules, embeddings=EmbeddingLibrary(alone)).encode("a cat", steps=4)
    got = engine.encode("a embedding:sub/cat", steps=4, explicit_embedding_syntax=True)
    assert torch.equal(got.positive[0][0].entries[0][1], expected.positive[0][0].entries[0][1])
    # an embedding added in memory keeps the path aliases and the explicit-only entries
    engine.add_embedding(Embedding("dog", {"clip_l": torch.randn(1, 48)}))
    assert applied("embedding:sub/cat dog") == [("sub/cat", 2), ("dog", 1)]
    assert applied("sub cat") == [("cat", 1)]


# ------------------------------------------------------------------------------ hermetic engines

def test_embeddings_false_ignores_the_environment(sd1_folder, user_embeddings):
    assert "rick" in Engine.load(sd1_folder).vocabulary.embeddings  # the variable is read by default
    engine = Engine.load(sd1_folder, embeddings=False)
    assert engine.library is None and engine.vocabulary.embeddings == {}


def test_evaluator_engine_has_no_embeddings_folder(user_embeddings):
    engine = evaluation.load_engine()
    assert engine.library is None and engine.vocabulary.embeddings == {}


def test_demo_engine_has_no_embeddings_folder(user_embeddings, monkeypatch, tmp_path):
    loaded = []

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        loaded.append(evaluation.load_engine(*args, **kwargs))
        raise Stop  # the engine is what this test is about; skip the training

    monkeypatch.setattr(demo, "load_engine", spy)
    with pytest.raises(Stop):
        demo.run_demo(tmp_path / "demo")
    (engine,) = loaded
    assert engine.library is None and engine.vocabulary.embeddings == {}
