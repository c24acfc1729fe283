"""weights_conv refuses bad input with a CheckpointError / UnsafePickleError naming the file and the key:
truncated files, lying headers, malicious pickles (proven to have no side effect), missing components,
a contradicting family override, unknown keys, and tensors that do not fit the model."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_weights_conv import ldm_state_dict, states_for
from tiengine.weights_conv import open_model
from tiengine.weights_conv.cli import main as cli_main
from tiengine.weights_conv.readers import SafetensorsFile

from tiengine.errors import CheckpointError, UnsafePickleError


@pytest.fixture
def sd1_file(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    ldm, _ = ldm_state_dict(states_for("sd1"), "sd1")
    path = tmp_path / "sd1.safetensors"
    save_file(ldm, str(path))
    return path, ldm


def rewrite_header(path: Path, edit) -> Path:
    """Apply `edit(header dict)` to a safetensors file's header, keeping the data bytes."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    new = json.dumps(header).encode()
    out = path.with_name("edited.safetensors")
    out.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + length :])
    return out


# Truncated files and lying headers ----------------------------------------------------------------


def test_truncated_safetensors_names_the_tensor(sd1_file, tmp_path):
    path, _ = sd1_file
    raw = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: tensor '.+' ends at byte \d+ .* \(truncated file\)"):
        open_model(cut)
    cut.write_bytes(raw[:5])
    with pytest.raises(CheckpointError, match="truncated safetensors file: 5 bytes"):
        open_model(cut)
    cut.write_bytes(raw[:100])
    with pytest.raises(CheckpointError, match="header length says .* bytes but the file has only 92"):
        open_model(cut)


def test_header_lies_are_refused(sd1_file):
    path, ldm = sd1_file
    key = "model.diffusion_model.input_blocks.0.0.weight"

    def bigger_shape(header):
        header[key]["shape"][0] += 1

    with pytest.raises(CheckpointError, match=rf"header lies about tensor '{key}': F32 \[33, 4, 3, 3\] needs 4752"):
        SafetensorsFile(rewrite_header(path, bigger_shape))

    def overlap(header):
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [begin - 4, end - 4] if begin else [begin + 4, end + 4]

    with pytest.raises(CheckpointError, match=r"header lies about tensor .*(overlaps|hole)"):
        SafetensorsFile(rewrite_header(path, overlap))

    def unknown_dtype(header):
        header[key]["dtype"] = "Q4"

    with pytest.raises(CheckpointError, match=rf"tensor '{key}' has dtype 'Q4'"):
        SafetensorsFile(rewrite_header(path, unknown_dtype))

    def not_an_entry(header):
        header[key] = [1, 2]

    with pytest.raises(CheckpointError, match=rf"header entry '{key}' must hold dtype, shape and data_offsets"):
        SafetensorsFile(rewrite_header(path, not_an_entry))


def test_reader_agrees_with_safe_open_for_every_dtype(tmp_path):
    from safetensors import safe_open

    tensors = {
        f"t_{dtype}".replace("torch.", ""): torch.arange(24).reshape(2, 3, 4).to(dtype)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool)
    } | {"empty": torch.zeros(0, 5), "scalar": torch.tensor(3.5)}
    save_file(tensors, str(tmp_path / "all.safetensors"))
    ours = SafetensorsFile(tmp_path / "all.safetensors")
    with safe_open(str(tmp_path / "all.safetensors"), "pt") as theirs:
        assert sorted(ours.keys()) == sorted(theirs.keys())
        for key in theirs.keys():
            expected = theirs.get_tensor(key)
            got = ours.read(key)
            assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected), key
    ours.close()


def test_truncated_and_non_model_files(tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.ckpt"):
        open_model(empty)
    pointer = tmp_path / "v1-5-pruned-emaonly.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:6ce0\nsize 4265146304\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer file, not the weights"):
        open_model(pointer)
    torch.save(
        {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}}, tmp_path / "t.ckpt"
    )
    raw = (tmp_path / "t.ckpt").read_bytes()
    (tmp_path / "t.ckpt").write_bytes(raw[: len(raw) - 200])
    with pytest.raises(CheckpointError, match=r"t\.ckpt"):
        open_model(tmp_path / "t.ckpt")


# Malicious pickles ---------------------------------------------------------------------------------


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["zip", "legacy", "plain pickle"])
def test_malicious_pickle_is_refused_without_side_effect(tmp_path, container):
    marker = tmp_path / "pwned"
    ldm, _ = ldm_state_dict(states_for("sd1"), "sd1")
    checkpoint = {"state_dict": dict(list(ldm.items())[:3]), "callbacks": RunsCode(marker)}
    path = tmp_path / "evil.ckpt"
    if container == "plain pickle":  # no tensors: plain pickle would store them through torch.storage
        path.write_bytes(pickle.dumps({"global_step": 1, "callbacks": RunsCode(marker)}, protocol=2))
    else:
        torch.save(checkpoint, path, _use_new_zipfile_serialization=container == "zip")
    with pytest.raises(UnsafePickleError, match=r"evil\.ckpt.*refused to load global '(posix|os)\.system'"):
        open_model(path)
    assert cli_main(["inspect", str(path)]) == 2
    assert not marker.exists()


# Missing components, families, unknown keys, tensors that do not fit -------------------------------


def test_missing_components_are_named(sd1_file, tmp_path):
    _, ldm = sd1_file
    for prefix, component in (("cond_stage_model.", "text_encoder"), ("first_stage_model.", "vae"),
                              ("model.diffusion_model.", "unet")):  # fmt: skip
        path = tmp_path / f"no_{component}.safetensors"
        save_file({k: v for k, v in ldm.items() if not k.startswith(prefix)}, str(path))
        with pytest.raises(CheckpointError, match=f"missing component {component}"):
            open_model(path)

    xl, _ = ldm_state_dict(states_for("sdxl"), "sdxl")
    path = tmp_path / "xl_no_bigg.safetensors"
    save_file({k: v for k, v in xl.items() if not k.startswith("conditioner.embedders.1.")}, str(path))
    with pytest.raises(CheckpointError, match="missing component text_encoder_2 of this sdxl checkpoint"):
        open_model(path)

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(CheckpointError, match="missing component unet, text_encoder in model_index.json"):
        open_model(folder)


def test_wrong_family_override(sd1_file):
    path, _ = sd1_file
    with pytest.raises(CheckpointError, match="family override 'sdxl' contradicts the checkpoint, which is sd1"):
        open_model(path, family="sdxl")
    assert cli_main(["inspect", str(path), "--family", "sd2"]) == 2


def test_unknown_keys_are_listed_or_ignored_on_request(sd1_file, tmp_path):
    _, ldm = sd1_file
    extra = {"embedding_manager.embedder.weight": torch.zeros(2), "lora_unet_down.alpha": torch.zeros(())}
    path = tmp_path / "extra.safetensors"
    save_file(ldm | extra, str(path))
    with pytest.raises(
        CheckpointError, match=r"2 unknown keys .*: embedding_manager\.embedder\.weight, lora_unet_down\.alpha"
    ):
        open_model(path)
    with open_model(path, ignore_unknown=True) as model:
        assert model.inspect()["keys"]["ignored"]["unknown"] == 2


def test_strict_load_names_every_missing_unexpected_and_misshapen_key(sd1_file, tmp_path):
    _, ldm = sd1_file
    broken = dict(ldm)
    del broken["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"]
    broken["model.diffusion_model.input_blocks.1.0.surprise.weight"] = torch.zeros(3)
    broken["model.diffusion_model.middle_block.1.proj_out.bias"] = torch.zeros(7)
    broken["first_stage_model.decoder.up.0.block.0.norm9.weight"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(broken, str(path))
    with open_model(path) as model:
        with pytest.raises(CheckpointError) as error:
            dict(model.iter_component("unet"))
        message = str(error.value)
        assert "missing down_blocks.0.resnets.0.norm1.weight [32]" in message
        assert "unexpected model.diffusion_model.input_blocks.1.0.surprise.weight (no rename rule)" in message
        assert "wrong shape mid_block.attentions.0.proj_out.bias: file [7]" in message and "model [64]" in message
        with pytest.raises(CheckpointError) as error:
            model.write_folder(tmp_path / "out")
        message = str(error.value)
        assert "unet: missing down_blocks.0.resnets.0.norm1.weight [32]" in message
        assert ("vae: unexpected decoder.up_blocks.1.resnets.0.norm9.weight "
                "(from first_stage_model.decoder.up.0.block.0.norm9.weight)") in message  # fmt: skip
        assert not (tmp_path / "out").exists()  # nothing written before every component is checked
        report = model.inspect()
    assert len(report["problems"]) == 4
    assert cli_main(["inspect", str(path)]) == 1


def test_non_models_get_a_hint(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    with pytest.raises(CheckpointError, match="looks like a LoRA"):
        open_model(lora)
    ldm, _ = ldm_state_dict(states_for("sd1"), "sd1")
    vae = tmp_path / "only.vae.safetensors"
    save_file(
        {k.removeprefix("first_stage_model."): v for k, v in ldm.items() if k.startswith("first_stage_model.")},
        str(vae),
    )
    with pytest.raises(CheckpointError, match="looks like a standalone VAE"):
        open_model(vae)


def test_existing_output_is_refused_before_the_checkpoint_is_read(tmp_path, capsys):
    outdir = tmp_path / "converted"
    outdir.mkdir()
    (outdir / "config.json").write_text("{}")
    # the checkpoint does not exist: the refusal comes before any reading
    assert cli_main(["convert", str(tmp_path / "absent.safetensors"), str(outdir)]) == 2
    err = capsys.readouterr().err
    assert "would replace" in err and "pass --overwrite (overwrite=True in Python)" in err
    assert "absent" not in err and (outdir / "config.json").read_text() == "{}"


def test_convert_reports_its_stages_and_every_tensor_written(sd1_file, tmp_path, capsys):
    path, _ = sd1_file
    outdir = tmp_path / "sd1"
    assert cli_main(["convert", str(path), str(outdir)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"wrote {outdir}\n"  # stdout keeps the result; stages and the bar go to stderr
    lines = captured.err.replace("\r", "\n").splitlines()
    assert lines[0].startswith(f"reading {path}")
    (writing,) = [line for line in lines if line.startswith("writing ")]
    total = int(writing.split()[1])
    assert f"{total}/{total}" in captured.err

    calls = []
    from tiengine.weights_conv.convert import load_models

    open_model(path).write_folder(tmp_path / "again", progress=lambda *call: calls.append(call))
    assert [done for _, done, _ in calls] == list(range(1, total + 1)) and {t for _, _, t in calls} == {total}
    assert [name for name, _, _ in calls][0] == open_model(path).config.components[0]
    loaded = []
    load_models(path, progress=lambda *call: loaded.append(call))
    components = open_model(path).config.components
    assert loaded == [(name, number, len(components)) for number, name in enumerate(components, start=1)]
