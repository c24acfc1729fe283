"""The CPU thread policy (tiengine.threads) and where it is applied: which count is chosen for which model
and size, `--threads` and $OMP_NUM_THREADS winning over it, the command lines applying it, the library
never touching a program's own thread count. No timing here: the speed it buys is benchmarks/contention.py's.
"""

from __future__ import annotations

import os

import pytest
import torch
from model_builders import tiny_model_config

from tiengine.cli import main, model_config
from tiengine.default_model import default_model_path
from tiengine.engine import Engine
from tiengine.errors import TiengineError
from tiengine.models.config import ModelConfig, read_model_config
from tiengine.threads import (
    SMALL_WORK_MACS,
    ThreadChoice,
    apply_cpu_threads,
    choose_threads,
    widest_conv_macs,
)


@pytest.fixture(autouse=True)
def restore_torch_threads(monkeypatch):
    """Each test starts at a known count (3: neither 1 nor a policy result on a 2-core machine) with no
    thread variables in the environment, and torch's count is put back afterwards."""
    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_widest_convolution_work_of_real_and_builtin_models():
    # SD1.5 at 512x512: 320 channels in and out, 3x3, on a 64x64 latent
    assert widest_conv_macs(ModelConfig.sd15()) == 320 * 320 * 9 * 64 * 64
    assert widest_conv_macs(ModelConfig.sd15(), 256, 384) == 320 * 320 * 9 * 32 * 48
    # the built-in model: 32 channels, a VAE of 3 blocks (4x down), native 16x16 latent = 64x64 pixels
    builtin = read_model_config(default_model_path())
    assert widest_conv_macs(builtin) == 32 * 32 * 9 * 16 * 16
    assert widest_conv_macs(builtin, 64, 64) == widest_conv_macs(builtin)
    assert widest_conv_macs(builtin, 512, 512) == 32 * 32 * 9 * 128 * 128


def test_policy_one_thread_for_small_work_every_cpu_for_large():
    builtin = read_model_config(default_model_path())
    assert choose_threads(builtin, cpus=2) == ThreadChoice(1, "small work")
    assert choose_threads(builtin, cpus=16) == ThreadChoice(1, "small work")
    assert choose_threads(tiny_model_config("sdxl"), cpus=8) == ThreadChoice(1, "small work")
    assert choose_threads(ModelConfig.sd15(), cpus=2) == ThreadChoice(2, "large work")
    assert choose_threads(ModelConfig.sdxl_base(), cpus=16) == ThreadChoice(16, "large work")
    # the size decides too: SD1.5 on a 32x32 image and the built-in model at 128x128 are below the bound,
    # SD1.5 at 64x64 and the built-in model at 256x256 above
    assert widest_conv_macs(ModelConfig.sd15(), 32, 32) < SMALL_WORK_MACS
    assert choose_threads(ModelConfig.sd15(), 32, 32, cpus=2).threads == 1
    assert choose_threads(ModelConfig.sd15(), 64, 64, cpus=2).threads == 2
    assert widest_conv_macs(builtin, 128, 128) < SMALL_WORK_MACS <= widest_conv_macs(builtin, 256, 256)
    assert choose_threads(builtin, 128, 128, cpus=2).threads == 1
    assert choose_threads(builtin, 256, 256, cpus=2).threads == 2


def test_apply_requested_wins_then_environment_then_policy():
    builtin = read_model_config(default_model_path())
    assert apply_cpu_threads(2, builtin, environ={"OMP_NUM_THREADS": "4"}) == ThreadChoice(2, "--threads")
    assert torch.get_num_threads() == 2
    torch.set_num_threads(3)
    assert apply_cpu_threads(None, builtin, environ={"OMP_NUM_THREADS": "3"}) == ThreadChoice(3, "$OMP_NUM_THREADS")
    assert apply_cpu_threads(None, builtin, environ={"MKL_NUM_THREADS": "3"}) == ThreadChoice(3, "$MKL_NUM_THREADS")
    assert torch.get_num_threads() == 3  # the environment's choice is kept
    assert apply_cpu_threads(None, builtin, environ={"OMP_NUM_THREADS": " "}) == ThreadChoice(1, "small work")
    assert torch.get_num_threads() == 1
    torch.set_num_threads(3)
    assert apply_cpu_threads(None, None, environ={}) is None  # no model known: torch keeps its count
    assert torch.get_num_threads() == 3
    with pytest.raises(TiengineError, match="--threads must be >= 1, got 0"):
        apply_cpu_threads(0, builtin, environ={})
    assert torch.get_num_threads() == 3


def test_the_command_line_asks_openmp_for_passive_waiting(monkeypatch, capsys):
    # OpenMP reads the variable when torch loads: main sets it first, and keeps a value the user set
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main([]) == 2  # no command: the help, and no torch import
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main([]) == 2
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    capsys.readouterr()


def test_model_config_reads_converted_folders_only(sd1_folder, tmp_path):
    assert model_config(None) == read_model_config(default_model_path())
    assert model_config(sd1_folder) == read_model_config(sd1_folder)
    assert model_config(tmp_path / "missing") is None
    assert model_config(tmp_path) is None  # a folder without config.json: the loader names the problem


def _generate(sd1_folder, tmp_path, *extra: str) -> int:
    return main(["generate", "a toy castle", "--model", str(sd1_folder), "--steps", "1", "--size", "32x32",
                 "--seed", "1", "--embeddings", str(tmp_path), "--out", str(tmp_path / "out.png"), "--overwrite",
                 "--json", *extra])


def test_generate_applies_the_policy_and_threads_wins(sd1_folder, tmp_path, monkeypatch, capsys):
    assert _generate(sd1_folder, tmp_path) == 0
    assert torch.get_num_threads() == 1  # a tiny model: one thread
    torch.set_num_threads(3)
    assert _generate(sd1_folder, tmp_path, "--threads", "2") == 0
    assert torch.get_num_threads() == 2
    torch.set_num_threads(3)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _generate(sd1_folder, tmp_path) == 0
    assert torch.get_num_threads() == 3
    capsys.readouterr()
    assert _generate(sd1_folder, tmp_path, "--threads", "0") == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err


def test_encode_and_train_take_threads(sd1_folder, tmp_path):
    out = tmp_path / "cond.safetensors"
    assert main(["encode", "a toy castle", "--model", str(sd1_folder), "--embeddings", str(tmp_path),
                 "--out", str(out), "--threads", "2", "--json"]) == 0
    assert torch.get_num_threads() == 2
    assert main(["encode", "a toy castle", "--model", str(sd1_folder), "--embeddings", str(tmp_path),
                 "--out", str(out), "--overwrite", "--json"]) == 0
    assert torch.get_num_threads() == 1


def test_the_library_never_changes_a_programs_thread_count(sd1_folder):
    torch.set_num_threads(3)
    engine = Engine.load(sd1_folder, embeddings=False)
    engine.generate("a toy castle", steps=1, width=32, height=32, seed=1)
    assert torch.get_num_threads() == 3


def test_serve_applies_the_policy_after_loading(sd1_folder, monkeypatch):
    run = pytest.importorskip("tiengine.serve.run")
    from tiengine.serve.config import ServeConfig

    served = []
    monkeypatch.setattr(run.uvicorn, "run", lambda app, **options: served.append(torch.get_num_threads()))
    run.serve(ServeConfig(model=sd1_folder), threads=None)
    run.serve(ServeConfig(model=sd1_folder), threads=2)
    assert served == [1, 2]
