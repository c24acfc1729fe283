"""The typed Engine surface: GenerateSettings validation, EncodeOptions on encode (device / dtype),
TrainEmbeddingSettings on train_embedding, multi-prompt batches, GenerationResult.save, the default
embeddings folder ($TIENGINE_EMBEDDINGS), CLI flags reaching the engine, and the package's exports."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tiengine
from tiengine.cli import main, resolve_device
from tiengine.diffusion.names import SAMPLER_NAMES, SCHEDULE_TYPES
from tiengine.diffusion.samplers import SAMPLERS
from tiengine.embeddings.embedding import Embedding, save_embedding
from tiengine.engine import Engine
from tiengine.errors import EmbeddingError, EngineError, TiengineError
from tiengine.io.metadata import parse_parameters, read_image_parameters
from tiengine.models.config import ModelConfig, size_time_ids
from tiengine.settings import GenerateSettings, settings_with
from tiengine.text.chunking import EMPHASIS_MODES
from tiengine.text.conditioning import ConditioningError, EncodeOptions
from tiengine.training.textual_inversion import TrainEmbeddingSettings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def embeddings_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    generator = torch.Generator().manual_seed(5)
    save_embedding(Embedding("rick", {"clip_l": torch.randn(3, 48, generator=generator)}), folder / "rick.safetensors")
    return folder


@pytest.fixture(scope="module")
def sd1_embeddings(tmp_path_factory):
    """An embedding of SD1's real width (768), for the commands that bind without a model (tokenize)."""
    folder = tmp_path_factory.mktemp("sd1-embeddings")
    save_embedding(Embedding("zorbly", {"clip_l": torch.randn(3, 768, generator=torch.Generator().manual_seed(1))}),
                   folder / "zorbly.safetensors")
    return folder


@pytest.fixture(scope="module")
def engine(sd1_folder):
    return Engine.load(sd1_folder, embeddings=None)


# ------------------------------------------------------------------------------------------ settings

@pytest.mark.parametrize(("fields", "message"), [
    ({"steps": 0}, "steps must be >= 1"),
    ({"steps": 2.5}, "steps must be >= 1"),
    ({"sampler": "Euler b"}, "unknown sampler 'Euler b'; expected one of DPM\\+\\+ 2M, DPM\\+\\+ SDE, "),
    ({"scheduler": "cosine"}, "unknown schedule type 'cosine'; expected one of Automatic, Uniform, Karras, "),
    ({"width": 0}, "width must be a positive integer"),
    ({"height": -64}, "height must be a positive integer"),
    ({"batch_size": 0}, "batch size must be an integer >= 1"),
    ({"seed": -2}, "seed must be an integer >= 0"),
    ({"strength": 1.5}, "denoising strength must be between 0 and 1"),
    ({"cfg_scale": "7"}, "cfg_scale must be a number"),
])
def test_settings_are_validated_once_with_clear_messages(fields, message):
    with pytest.raises(EngineError, match=message.replace("(", r"\(")):
        GenerateSettings(**fields)


def test_encode_options_are_validated_by_their_own_class():
    with pytest.raises(ConditioningError, match="emphasis must be one of original, no_norm"):
        GenerateSettings(encode=EncodeOptions(emphasis="loud"))
    with pytest.raises(ConditioningError, match="clip skip"):
        settings_with(clip_skip=0)


def test_settings_with_routes_encode_fields_and_refuses_unknown_names():
    settings = settings_with(GenerateSettings(steps=7), seed=3, clip_skip=2, bare_names=False)
    assert (settings.steps, settings.seed, settings.encode) == (7, 3, EncodeOptions(clip_skip=2, bare_names=False))
    with pytest.raises(EngineError, match="unknown generation setting.*cfg.*expected some of: steps"):
        settings_with(cfg=7)


def test_option_names_have_one_source():
    assert tuple(SAMPLERS) == SAMPLER_NAMES
    from tiengine.cli import build_parser
    from tiengine.cli.generate import SAMPLER_HELP

    assert SAMPLER_HELP == ", ".join(SAMPLERS)
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    choices = {action.dest: action.choices for action in generate._actions}
    assert tuple(choices["emphasis"]) == EMPHASIS_MODES
    helps = {action.dest: action.help for action in generate._actions}
    assert all(kind.label in helps["scheduler"] for kind in SCHEDULE_TYPES)  # any A1111 label or name, any case


# -------------------------------------------------------------------------------------------- engine

def test_generate_accepts_settings_and_keywords_alike(engine):
    settings = GenerateSettings(steps=3, sampler="Euler", seed=4, width=32, height=32)
    by_settings = engine.generate("a cat", "blurry", settings=settings)
    by_keywords = engine.generate("a cat", "blurry", steps=3, sampler="Euler", seed=4, width=32, height=32)
    assert by_settings.parameters == by_keywords.parameters
    assert np.array_equal(np.asarray(by_settings.images[0]), np.asarray(by_keywords.images[0]))


def test_generate_batch_equals_one_prompt_at_a_time(engine):
    prompts = ["a cat", "a red dog", "a [cat:dog:0.5] on a hill", "a castle"]
    settings = GenerateSettings(steps=4, sampler="Euler a", seed=10, width=32, height=32, batch_size=4)
    batch = engine.generate_batch(prompts, "blurry", settings=settings)
    assert batch.seeds == [10, 11, 12, 13]
    for index, prompt in enumerate(prompts):
        single = engine.generate(prompt, "blurry", settings=dataclasses.replace(settings, seed=10 + index, batch_size=1))
        assert batch.parameters[index] == single.parameters[0]
        difference = np.abs(np.asarray(batch.images[index], dtype=int) - np.asarray(single.images[0], dtype=int))
        assert difference.max() <= 1, (prompt, difference.max())  # one UNet batch vs four: float rounding at most
    assert [c.positive[0][0].texts for c in batch.conditionings][2] == ["a cat on a hill", "a dog on a hill"]


def test_generate_batch_runs_unstackable_prompts_alone_and_takes_explicit_seeds(engine):
    prompts = ["a cat AND a dog:0.5", "a cat"]  # different AND parts: cannot share one UNet batch
    settings = GenerateSettings(steps=2, sampler="Euler", width=32, height=32, batch_size=2)
    batch = engine.generate_batch(prompts, settings=settings, seeds=[5, 9])
    assert batch.seeds == [5, 9]
    single = engine.generate(prompts[0], settings=dataclasses.replace(settings, seed=5, batch_size=1))
    assert np.array_equal(np.asarray(batch.images[0]), np.asarray(single.images[0]))
    with pytest.raises(EngineError, match="2 prompts but 1 seeds"):
        engine.generate_batch(prompts, settings=settings, seeds=[1])


def test_encode_takes_encode_options_device_and_dtype(engine):
    options = EncodeOptions(clip_skip=2, emphasis="no_norm")
    by_options = engine.encode("a (cat:1.3)", steps=4, options=options)
    by_keywords = engine.encode("a (cat:1.3)", steps=4, clip_skip=2, emphasis="no_norm")
    assert by_options is by_keywords  # one cache entry: one code path
    half = engine.encode("a (cat:1.3)", steps=4, options=options, dtype=torch.float16, device="cpu")
    context = half.positive[0][0].entries[0][1]
    assert context.dtype == torch.float16 and by_options.positive[0][0].entries[0][1].dtype == torch.float32
    assert torch.equal(context, by_options.positive[0][0].entries[0][1].half())
    with pytest.raises(EngineError, match="unknown encode option.*clipskip"):
        engine.encode("a", clipskip=2)


def test_train_embedding_takes_its_settings(engine, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("tiengine.engine.train_embedding", lambda *args, **kwargs: calls.append(args[3]))
    settings = TrainEmbeddingSettings(steps=5, learning_rate="0.01")
    engine.train_embedding(tmp_path, "zorbly", settings)
    engine.train_embedding(tmp_path, "zorbly", steps=5, learning_rate="0.01")
    engine.train_embedding(tmp_path, "zorbly", TrainEmbeddingSettings(steps=9), steps=5, learning_rate="0.01")
    assert calls == [settings, settings, settings]


def test_result_save_writes_infotext(engine, tmp_path):
    result = engine.generate("a cat", "blurry", steps=2, sampler="Euler", seed=3, width=32, height=32, batch_size=2)
    paths = result.save(tmp_path / "cat.png")
    assert paths == [tmp_path / "cat-0.png", tmp_path / "cat-1.png"]
    for path, parameters, seed in zip(paths, result.parameters, (3, 4)):
        assert read_image_parameters(path) == parameters
        assert parse_parameters(read_image_parameters(path))["Seed"] == str(seed)
    with pytest.raises(EngineError, match="already exist.*overwrite=True"):
        result.save(tmp_path / "cat.png")
    assert result.save(tmp_path / "cat.png", overwrite=True) == paths
    single = engine.generate("a cat", steps=2, sampler="Euler", seed=3, width=32, height=32)
    assert single.save(tmp_path / "one.png") == [tmp_path / "one.png"]
    assert single.save(tmp_path / "folder") == [tmp_path / "folder" / "00000-3.png"]


def test_size_time_ids_are_built_in_one_place():
    base = ModelConfig.sdxl_base()
    assert size_time_ids(base, 1024, 768) == [768.0, 1024.0, 0.0, 0.0, 768.0, 1024.0]
    refiner = dataclasses.replace(base, variant="refiner")
    assert size_time_ids(refiner, 1024, 768) == [768.0, 1024.0, 0.0, 0.0, 6.0]
    assert size_time_ids(refiner, 1024, 768, negative=True)[-1] == 2.5


def test_family_differences_are_config_fields_and_old_config_json_loads():
    sdxl, sd1 = ModelConfig.sdxl_base(), ModelConfig.sd15()
    assert sdxl.zero_empty_negative and not sd1.zero_empty_negative
    assert dict(sdxl.embedding_keys) == {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    assert dict(ModelConfig.sd21_v().embedding_keys) == {"text_encoder": "clip_h"}
    data = sd1.to_dict()
    assert "zero_empty_negative" not in data and "embedding_keys" not in data  # the format is unchanged
    assert ModelConfig.from_dict(data) == sd1
    changed = dataclasses.replace(sd1, zero_empty_negative=True)
    assert ModelConfig.from_dict(changed.to_dict()).zero_empty_negative is True


# ---------------------------------------------------------------------------------- default folders

def test_env_var_names_the_default_embeddings_folder(sd1_folder, embeddings_folder, monkeypatch, tmp_path):
    monkeypatch.setenv("TIENGINE_EMBEDDINGS", str(embeddings_folder))
    engine = Engine.load(sd1_folder)
    assert "rick" in engine.vocabulary.embeddings
    assert Engine.load(sd1_folder, embeddings=tmp_path).vocabulary.embeddings == {}  # an explicit folder wins
    monkeypatch.setenv("TIENGINE_EMBEDDINGS", str(tmp_path / "missing"))
    with pytest.raises(EmbeddingError, match="TIENGINE_EMBEDDINGS=.*missing: not a folder"):
        Engine.load(sd1_folder)
    monkeypatch.delenv("TIENGINE_EMBEDDINGS")
    assert Engine.load(sd1_folder).library is None


def test_cli_commands_read_the_env_var(capsys, sd1_embeddings, sd1_folder, embeddings_folder, monkeypatch, tmp_path):
    monkeypatch.setenv("TIENGINE_EMBEDDINGS", str(sd1_embeddings))
    assert main(["tokenize", "a zorbly", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chunks"][0]["embeddings"] == [[2, "zorbly", 3]]
    monkeypatch.setenv("TIENGINE_EMBEDDINGS", str(embeddings_folder))
    assert main(["encode", "a rick", "--model", str(sd1_folder), "--out", str(tmp_path / "c.safetensors"), "--json"]) == 0
    assert [a["name"] for a in json.loads(capsys.readouterr().out)["applied_embeddings"]] == ["rick"]
    assert main(["encode", "a rick", "--model", str(sd1_folder), "--out", str(tmp_path / "d.safetensors"), "--json",
                 "--embeddings", str(tmp_path)]) == 0  # --embeddings DIR overrides it
    assert json.loads(capsys.readouterr().out)["applied_embeddings"] == []


# ------------------------------------------------------------------------------------ CLI -> engine

def test_resolve_device():
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cli_encode_options_reach_the_engine(capsys, tmp_path, sd1_folder, monkeypatch):
    seen = []
    original = Engine.encode

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "encode", spy)
    assert main(["encode", "a, b", "--model", str(sd1_folder), "--out", str(tmp_path / "c.safetensors"),
                 "--explicit-only", "--keep-embeddings-on-backtrack", "--comma-backtrack", "5", "--clip-skip", "2",
                 "--device", "auto", "--dtype", "fp32", "--json"]) == 0
    assert seen[-1]["options"] == EncodeOptions(clip_skip=2, comma_backtrack=5, bare_names=False,
                                                keep_embeddings_on_backtrack=True)
    metadata = json.loads(capsys.readouterr().out)
    assert (metadata["comma_backtrack"], metadata["bare_names"], metadata["keep_embeddings_on_backtrack"]) == (
        5, False, True)


def test_cli_generate_flags_reach_the_engine(capsys, tmp_path, sd1_folder, monkeypatch):
    seen = []
    original = Engine._sample

    def spy(self, settings, *args):
        seen.append(settings)
        return original(self, settings, *args)

    monkeypatch.setattr(Engine, "_sample", spy)
    assert main(["generate", "a cat", "--model", str(sd1_folder), "--steps", "2", "--sampler", "Euler",
                 "--scheduler", "karras", "--seed", "3", "--size", "32x32", "--explicit-only", "--comma-backtrack", "0",
                 "--keep-embeddings-on-backtrack", "--emphasis", "lerp", "--clip-skip", "2",
                 "--out", str(tmp_path / "a.png"), "--json"]) == 0
    assert seen[-1] == GenerateSettings(
        steps=2, sampler="Euler", scheduler="karras", cfg_scale=7.0, seed=3, width=32, height=32,
        encode=EncodeOptions(clip_skip=2, emphasis="lerp", comma_backtrack=0, bare_names=False,
                             keep_embeddings_on_backtrack=True),
    )
    assert main(["generate", "a cat", "--model", str(sd1_folder), "--sampler", "Nope", "--out", str(tmp_path / "b.png")]
                ) == 2
    assert "unknown sampler 'Nope'" in capsys.readouterr().err


def test_cli_tokenize_keeps_embeddings_on_backtrack(capsys, sd1_embeddings):
    prompt = "word " * 68 + ", zorbly a b c d e"  # the chunk fills inside "a b c": backtracking moves zorbly
    assert main(["tokenize", prompt, "--embeddings", str(sd1_embeddings), "--json"]) == 0
    quirk = json.loads(capsys.readouterr().out)
    assert main(["tokenize", prompt, "--embeddings", str(sd1_embeddings), "--json",
                 "--keep-embeddings-on-backtrack"]) == 0
    fixed = json.loads(capsys.readouterr().out)
    assert [c["embeddings"] for c in quirk["chunks"]] == [[[70, "zorbly", 3]], []]  # A1111: left in the padding
    assert [c["embeddings"] for c in fixed["chunks"]] == [[], [[1, "zorbly", 3]]]


# ---------------------------------------------------------------------------------------- exports

ERROR_CLASSES = ("TiengineError", "EngineError", "EmbeddingError", "CheckpointError", "TrainingError",
                 "ConditioningError", "SamplingError", "PromptError", "TokenizerError", "UnsafePickleError",
                 "MetadataError", "FileExistsRefusal", "TokenIdError", "KernelInputError", "DemoError",
                 "NetworkError")


@pytest.mark.parametrize("name", [
    "Engine", "Conditioning", "GenerationResult", "AppliedEmbedding", "TrainResult", "GenerateSettings",
    "EncodeOptions", "TrainEmbeddingSettings", *ERROR_CLASSES,
])
def test_exported_names_resolve(name):
    assert name in tiengine.__all__
    value = getattr(tiengine, name)
    assert value.__name__ == name
    if name.endswith("Error") or name == "FileExistsRefusal":
        assert issubclass(value, TiengineError)


def test_every_error_class_is_exported():
    found = set()
    for folder in ("tiengine", "weights_conv", "kernels"):
        for path in (REPO / folder).rglob("*.py"):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.startswith("class ") and "Error" in line.split("(")[0] and path.parts[-2] != "cli" \
                        and not line.startswith("class _"):  # private: raised and caught inside one module
                    found.add(line[len("class "):].split("(")[0])
    assert found - set(tiengine.__all__) == set()


def test_import_tiengine_does_not_import_torch():
    code = "import sys, tiengine; tiengine.__all__; print('torch' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert output.stdout.strip() == "False"
