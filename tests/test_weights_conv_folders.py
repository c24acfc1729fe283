"""weights_conv: diffusers folders, converted folders (CLI), VAE replacement and the prediction-type rules.

Reference tensors come from random-weight diffusers / transformers models (test_weights_conv); converted
folders are read back with safetensors' own loader, not ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_weights_conv import (
    assert_bit_equal,
    cast_states,
    diffusers,
    ldm_state_dict,
    ldm_vae_name,
    states_for,
    text_models,
    unet_kwargs,
    vae_kwargs,
)
from tiengine.weights_conv import open_model
from tiengine.weights_conv.cli import main as cli_main

from tiengine.errors import CheckpointError

SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}  # fmt: skip


def write_diffusers_folder(root: Path, family: str, variant: str = "base", *, prediction: str = "epsilon") -> dict:
    """A diffusers folder of the reference models; SD2's text encoder drops its last layer, as diffusers'
    published SD2 folders do (23 of 24). Returns the expected tensors per component."""
    states = states_for(family, variant)
    generator_models = {
        "unet": diffusers.UNet2DConditionModel(**unet_kwargs(family, variant)),
        "vae": diffusers.AutoencoderKL(**vae_kwargs()),
        **text_models(family, variant),
    }
    expected = {}
    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    for name, model in generator_models.items():
        state = states[name]
        if name.startswith("text"):
            model_state = {k.removeprefix("text_model.") if not hasattr(model, "text_projection") else k: v
                           for k, v in state.items()}  # fmt: skip
            if family == "sd2":
                last = f"encoder.layers.{model.config.num_hidden_layers - 1}."
                model_state = {k: v for k, v in model_state.items() if not k.startswith(last)}
                model.config.num_hidden_layers -= 1
                model = type(model)(model.config)
            model.load_state_dict(model_state, strict=True)
            expected[name] = (
                {k: v for k, v in state.items() if not k.startswith("text_model." + last)} if family == "sd2" else state
            )
        else:
            model.load_state_dict(state, strict=True)
            expected[name] = state
        model.save_pretrained(root / name)
        index[name] = ["diffusers" if name in ("unet", "vae") else "transformers", type(model).__name__]
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "scheduler").mkdir()
    scheduler = SCHEDULER | {"prediction_type": "v_prediction" if prediction == "v" else "epsilon"}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return expected


@pytest.mark.parametrize("family,variant", [("sd1", "base"), ("sd2", "base"), ("sdxl", "base"), ("sdxl", "refiner")])
def test_diffusers_folder_loads_by_identity(tmp_path, family, variant):
    prediction = "v" if family == "sd2" else "epsilon"
    expected = write_diffusers_folder(tmp_path, family, variant, prediction=prediction)
    with open_model(tmp_path) as model:
        config = model.config
        assert (config.family, config.variant, config.prediction) == (family, variant, prediction)
        for name, state in expected.items():
            assert_bit_equal(dict(model.iter_component(name)), state, f"{family} folder {name}")
        report = model.inspect()
    assert report["layout"] == "diffusers folder" and report["problems"] == []
    assert "scheduler_config.json" in report["prediction_source"]
    if family == "sd2":  # 2 of the 3 layers kept: the context is the last layer, through the final norm
        assert config.text_encoders["text_encoder"].num_hidden_layers == 2
        assert config.text_encoders["text_encoder"].output_layer == -1
    assert cli_main(["convert", str(tmp_path), str(tmp_path / "out")]) == 0
    for name, state in expected.items():
        assert_bit_equal(load_file(tmp_path / "out" / f"{name}.safetensors"), state, f"converted {name}")
    with open_model(tmp_path / "out") as model:
        assert model.config == config


def test_sharded_diffusers_weights(tmp_path):
    expected = write_diffusers_folder(tmp_path, "sd1")
    unet = tmp_path / "unet"
    state = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}  # fmt: skip
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, str(unet / shard))
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_model(tmp_path) as model:
        assert_bit_equal(dict(model.iter_component("unet")), expected["unet"], "sharded unet")


def test_diffusers_folder_variants_legacy_names_and_bin_weights(tmp_path):
    expected = write_diffusers_folder(tmp_path, "sd1")
    # unet only as an fp16 variant
    unet = tmp_path / "unet"
    state = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    save_file({k: v.half() for k, v in state.items()}, str(unet / "diffusion_pytorch_model.fp16.safetensors"))
    # VAE with pre-0.14 attention names, as a pickled .bin
    vae = tmp_path / "vae"
    state = load_file(vae / "diffusion_pytorch_model.safetensors")
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state.items():
        for new, old in legacy.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[key] = value
    assert any(".query." in key for key in renamed)
    torch.save(renamed, vae / "diffusion_pytorch_model.bin")
    # text encoder in the transformers < 5 layout: text_model. prefix and the position_ids buffer
    text = tmp_path / "text_encoder"
    state = load_file(text / "model.safetensors")
    old = {f"text_model.{k}": v for k, v in state.items()} | {
        "text_model.embeddings.position_ids": torch.arange(77)[None]
    }
    save_file(old, str(text / "model.safetensors"))
    with open_model(tmp_path) as model:
        assert_bit_equal(
            dict(model.iter_component("unet")), cast_states({"u": expected["unet"]}, torch.float16)["u"], "fp16 unet"
        )
        assert_bit_equal(dict(model.iter_component("vae")), expected["vae"], "legacy vae")
        assert_bit_equal(dict(model.iter_component("text_encoder")), expected["text_encoder"], "old text encoder")


# --------------------------------------------------------------------------------------------------
# convert: the CLI writes a folder in tiengine names that loads by identity


def test_cli_convert_writes_a_loadable_folder_in_diffusers_names(tmp_path, capsys):
    states = states_for("sdxl")
    ldm, _ = ldm_state_dict(states, "sdxl", extras=True)
    save_file(ldm, str(tmp_path / "xl.safetensors"))
    out = tmp_path / "converted"
    assert cli_main(["convert", str(tmp_path / "xl.safetensors"), str(out), "--dtype", "fp16"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "source.json", "text_encoder.safetensors", "text_encoder_2.safetensors", "unet.safetensors",
        "vae.safetensors",
    ]  # fmt: skip
    for name, state in states.items():
        written = load_file(out / f"{name}.safetensors")  # safetensors' own reader
        assert_bit_equal(written, {k: v.half() for k, v in state.items()}, f"written {name}")
    config = json.loads((out / "config.json").read_text())
    assert (config["format"], config["format_version"], config["family"]) == ("tiengine.model", 1, "sdxl")

    # refuses to overwrite, then reads its own output back by identity
    assert cli_main(["convert", str(tmp_path / "xl.safetensors"), str(out)]) == 2
    assert "overwrite" in capsys.readouterr().err
    from tiengine.weights_conv.convert import load_model_weights, load_models

    loaded_config, iterators = load_model_weights(out, dtype=torch.float32)
    assert loaded_config.to_dict() == config
    assert_bit_equal(dict(iterators["unet"]), {k: v.half().float() for k, v in states["unet"].items()}, "reloaded")
    _, modules = load_models(out)
    for name, module in modules.items():
        assert_bit_equal(dict(module.state_dict()), {k: v.half() for k, v in states[name].items()}, f"module {name}")


def test_inspect_json_contract(tmp_path, capsys):
    states = cast_states(states_for("sd1"), torch.float16)
    ldm, _ = ldm_state_dict(states, "sd1", ema=True, extras=True)
    save_file(ldm, str(tmp_path / "sd1.safetensors"), metadata={"modelspec.architecture": "stable-diffusion-v1"})
    assert cli_main(["inspect", str(tmp_path / "sd1.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["extras"] == {"metadata.modelspec.architecture": "stable-diffusion-v1"}
    assert (report["family"], report["prediction"]) == ("sd1", "epsilon")
    assert set(report["components"]) == {"unet", "vae", "text_encoder"}
    for name, state in states.items():
        assert report["components"][name] == report["components"][name] | {
            "params": sum(v.numel() for v in state.values()),
            "dtype": "float16",
        }
    assert report["ema"]["present"] is True
    assert report["keys"]["total"] == len(ldm)
    assert sum(report["keys"]["ignored"].values()) + report["keys"]["converted"] == len(ldm)
    assert cli_main(["inspect", str(tmp_path / "sd1.safetensors")]) == 0
    assert "model_ema.* (EMA weights)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Prediction type and family rules


def _write_sd2(tmp_path: Path, name: str = "model", extra: dict | None = None) -> Path:
    ldm, _ = ldm_state_dict(states_for("sd2"), "sd2")
    path = tmp_path / f"{name}.safetensors"
    save_file(ldm | (extra or {}), str(path))
    return path


def test_prediction_type_from_yaml_marker_default_and_override(tmp_path):
    path = _write_sd2(tmp_path)
    with open_model(path) as model:
        assert model.config.prediction == "v"  # SD2 single files are mostly 768-v
        assert model.detection.prediction_source.startswith("default for sd2")
        assert model.config.unet.sample_size == 96
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "eps"\n    scale_factor: 0.18215\n')
    with open_model(path) as model:
        assert model.config.prediction == "epsilon" and "model.yaml" in model.detection.prediction_source
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: v # 768-v\n")
    with open_model(path) as model:
        assert model.config.prediction == "v"
    with open_model(path, prediction="epsilon") as model:
        assert model.config.prediction == "epsilon" and model.detection.prediction_source == "override"

    ldm, _ = ldm_state_dict(states_for("sdxl"), "sdxl")
    save_file(ldm | {"v_pred": torch.tensor([])}, str(tmp_path / "xl.safetensors"))
    with open_model(tmp_path / "xl.safetensors") as model:
        assert model.config.prediction == "v" and model.inspect()["keys"]["ignored"]["markers"] == 1


def test_family_override_must_agree(tmp_path):
    path = _write_sd2(tmp_path)
    with open_model(path, family="sd2") as model:
        assert model.config.family == "sd2"
    with pytest.raises(CheckpointError, match="family override 'sd1' contradicts the checkpoint, which is sd2"):
        open_model(path, family="sd1")


# --------------------------------------------------------------------------------------------------
# VAE replacement


def vae_files(tmp_path: Path, seed: int = 7) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """A different random VAE as: LDM names without prefix (.vae.safetensors), a Lightning .vae.pt with
    loss weights, diffusers names in one file, and a diffusers vae/ folder."""
    generator = torch.Generator().manual_seed(seed)
    model = diffusers.AutoencoderKL(**vae_kwargs())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    state = dict(model.state_dict())
    ldm = {}
    for key, value in state.items():
        name, as_conv = ldm_vae_name(key, 2)
        ldm[name] = value[:, :, None, None] if as_conv else value
    paths = {
        "ldm": tmp_path / "new.vae.safetensors",
        "pt": tmp_path / "new.vae.pt",
        "diffusers_file": tmp_path / "d.safetensors",
    }
    save_file(ldm, str(paths["ldm"]))
    loss = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4)}
    torch.save({"state_dict": ldm | loss, "global_step": 840001}, paths["pt"])
    save_file(state, str(paths["diffusers_file"]))
    model.save_pretrained(tmp_path / "vae_folder")
    paths["folder"] = tmp_path / "vae_folder"
    return state, paths


@pytest.mark.parametrize("kind", ["ldm", "pt", "diffusers_file", "folder"])
def test_vae_replacement(tmp_path, kind):
    state, paths = vae_files(tmp_path)
    ldm, _ = ldm_state_dict(states_for("sd1"), "sd1")
    save_file(ldm, str(tmp_path / "m.safetensors"))
    with open_model(tmp_path / "m.safetensors", vae=paths[kind]) as model:
        assert_bit_equal(dict(model.iter_component("vae")), state, f"replacement VAE ({kind})")
        report = model.inspect()
    assert report["components"]["vae"]["source"] == str(paths[kind])
    assert report["keys"]["ignored"]["replaced_vae"] == len(states_for("sd1")["vae"])
    if kind == "pt":
        assert report["keys"]["ignored"]["vae_loss"] == 2

    # a checkpoint without a VAE needs one
    without = {k: v for k, v in ldm.items() if not k.startswith("first_stage_model.")}
    save_file(without, str(tmp_path / "novae.safetensors"))
    with pytest.raises(CheckpointError, match="missing component vae"):
        open_model(tmp_path / "novae.safetensors")
    with open_model(tmp_path / "novae.safetensors", vae=paths[kind]) as model:
        assert_bit_equal(dict(model.iter_component("vae")), state, "VAE supplied")
