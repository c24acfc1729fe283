"""Training state under hostile conditions: a second run on the same output, stale locks, Ctrl-C, a kill
between the final output and the state that records it, damaged checkpoints, and the README's resume
recipe (a resume takes the checkpoint's settings unless one is changed on purpose)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from model_builders import tiny_model_folder
from PIL import Image

from tiengine.embeddings.embedding import load_embedding
from tiengine.engine import Engine
from tiengine.io.lock import LockHeldError
from tiengine.training.data import TrainingError
from tiengine.training.run import EmbeddingTrainer, train_embedding
from tiengine.training.state import STATE_METADATA_KEY, load_state, save_state
from tiengine.training.textual_inversion import TrainEmbeddingSettings, TrainingInterrupted

SETTINGS = TrainEmbeddingSettings(vectors=2, steps=4, batch_size=2, learning_rate="0.05:2, 0.02", init_text="a cat",
                                  template="object")  # save_every stays 500: no checkpoint before the end


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("model") / "sd15", "sd1")


@pytest.fixture(scope="module")
def engine(model):
    return Engine.load(model)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images") / "my-images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


@pytest.fixture(scope="module")
def whole(engine, images, tmp_path_factory):
    """The uninterrupted run every interrupted one must equal bit for bit."""
    return train_embedding(engine, images, "zorbly", SETTINGS, out=tmp_path_factory.mktemp("whole") / "z.safetensors")


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ---------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_saves_a_resumable_state_and_resume_is_bit_identical(engine, images, whole, tmp_path):
    out = tmp_path / "z.safetensors"

    def interrupt_at_three(progress):
        if progress.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as caught:
        train_embedding(engine, images, "zorbly", SETTINGS, out=out, callback=interrupt_at_three)
    assert caught.value.step == 3 and isinstance(caught.value, KeyboardInterrupt)
    work = tmp_path / ".z.training"
    assert load_state(work / "state.safetensors").step == 3 and not out.exists()
    assert not (work / "lock").exists()  # released on the way out
    # Python API: default settings on resume take the checkpoint's
    resumed = train_embedding(engine, images, "zorbly", TrainEmbeddingSettings(), out=out, resume=True)
    assert resumed.resumed_from == 3 and resumed.steps_done == 4
    assert torch.equal(resumed.vectors["clip_l"], whole.vectors["clip_l"])
    assert [r.loss for r in resumed.losses] == [r.loss for r in whole.losses]


@pytest.fixture
def python_ctrl_c_handler():
    """Python's own Ctrl-C handler (KeyboardInterrupt) for one test, whatever this process had installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_the_update_waits_for_it(engine, images, whole, tmp_path, monkeypatch, python_ctrl_c_handler):
    """A SIGINT arriving inside the optimizer update is held back until the step is whole."""
    original = EmbeddingTrainer._update
    sent = []

    def update_with_signal(self):
        if self.step == 1 and not sent:
            sent.append(1)
            signal.raise_signal(signal.SIGINT)  # to this thread, now (os.kill could reach another thread later)
        original(self)

    monkeypatch.setattr(EmbeddingTrainer, "_update", update_with_signal)
    out = tmp_path / "z.safetensors"
    with pytest.raises(TrainingInterrupted) as caught:
        train_embedding(engine, images, "zorbly", SETTINGS, out=out)
    assert caught.value.step == 2
    monkeypatch.setattr(EmbeddingTrainer, "_update", original)
    resumed = train_embedding(engine, images, "zorbly", SETTINGS, out=out, resume=True)
    assert torch.equal(resumed.vectors["clip_l"], whole.vectors["clip_l"])


# ------------------------------------------------------------------------------------------ locks


def test_a_second_run_on_the_same_output_refuses_before_touching_anything(engine, images, tmp_path):
    out = tmp_path / "z.safetensors"
    work = tmp_path / ".z.training"
    seen = {}

    def second_run(progress):
        if progress.step == 2:
            before = files_of(work)
            for kwargs in ({"resume": True}, {"overwrite": True}, {}):
                with pytest.raises(LockHeldError, match=rf"in use by process {os.getpid()} .*delete .*lock"):
                    train_embedding(engine, images, "zorbly", SETTINGS, out=out, **kwargs)
            seen["untouched"] = files_of(work) == before
            seen["lock"] = json.loads((work / "lock").read_text())

    first = train_embedding(engine, images, "zorbly", dataclasses.replace(SETTINGS, save_every=1), out=out,
                            callback=second_run)
    assert seen["untouched"] and seen["lock"]["pid"] == os.getpid() and seen["lock"]["host"] == socket.gethostname()
    assert first.steps_done == 4 and load_embedding(out).step == 4 and not (work / "lock").exists()


def test_stale_foreign_and_unreadable_locks(engine, images, tmp_path):
    out = tmp_path / "z.safetensors"
    work = tmp_path / ".z.training"
    work.mkdir()
    host = socket.gethostname()
    (work / "lock").write_text(json.dumps({"pid": dead_pid(), "host": host, "started": "yesterday"}))
    result = train_embedding(engine, images, "zorbly", dataclasses.replace(SETTINGS, steps=1), out=out)
    assert any("took over the stale lock" in warning for warning in result.warnings)
    assert not (work / "lock").exists()
    for content, match in [(json.dumps({"pid": 1, "host": host + "-elsewhere"}), "on host"),
                           (b"\x00garbage", "unreadable")]:
        (work / "lock").write_bytes(content.encode() if isinstance(content, str) else content)
        before = files_of(work)
        with pytest.raises(LockHeldError, match=match):
            train_embedding(engine, images, "zorbly", SETTINGS, out=out, overwrite=True)
        assert files_of(work) == before


def test_a_refused_run_leaves_no_work_folder(engine, images, tmp_path):
    out = tmp_path / "new" / "z.safetensors"
    with pytest.raises(TrainingError, match="slashes"):
        train_embedding(engine, images, "a/b", SETTINGS, out=out)
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------- a kill after the final output


def test_resume_recognises_its_own_output_written_before_the_state_recorded_it(engine, images, whole, tmp_path):
    out = tmp_path / "z.safetensors"
    train_embedding(engine, images, "zorbly", SETTINGS, out=out, also_save=("pt",))
    state_path = tmp_path / ".z.training" / "state.safetensors"
    state = load_state(state_path)
    save_state(state_path, dataclasses.replace(state, outputs={}))  # killed before the hashes were recorded
    resumed = train_embedding(engine, images, "zorbly", SETTINGS, out=out, resume=True)
    assert resumed.steps_done == 4 and [p.name for p in resumed.outputs] == ["z.safetensors", "z.pt"]
    assert torch.equal(load_embedding(out).vectors["clip_l"], whole.vectors["clip_l"])
    assert set(load_state(state_path).outputs) == {str(out), str(out.with_suffix(".pt"))}
    # someone else's file in its place is still refused
    save_state(state_path, dataclasses.replace(state, outputs={}))
    out.write_bytes(b"someone else's file")
    with pytest.raises(TrainingError, match="z.safetensors: already exists"):
        train_embedding(engine, images, "zorbly", SETTINGS, out=out, resume=True)
    assert out.read_bytes() == b"someone else's file"


# ---------------------------------------------------------------------------- damaged checkpoints


def damaged_states():
    good = {"format": "tiengine.ti_training_state", "version": 1, "step": 1, "keys": ["clip_l"], "fingerprint": {}}
    yield "not JSON", "{not json", "is not JSON"
    yield "a list", "[1, 2]", "expected a JSON object"
    yield "no step", json.dumps({k: v for k, v in good.items() if k != "step"}), "lacks 'step'"
    yield "step text", json.dumps({**good, "step": "3"}), "'step' is '3', expected an integer"
    yield "keys dict", json.dumps({**good, "keys": {"a": 1}}), "'keys' is"
    yield "fingerprint list", json.dumps({**good, "fingerprint": [1]}), "'fingerprint' is"
    yield "outputs", json.dumps({**good, "outputs": {"a": 5}}), "'outputs' is"
    yield "settings", json.dumps({**good, "settings": "x"}), "'settings' is"
    yield "no vectors", json.dumps({**good, "keys": ["clip_g"]}), "lacks tensors"


@pytest.mark.parametrize("label,header,match", list(damaged_states()), ids=[d[0] for d in damaged_states()])
def test_damaged_checkpoint_metadata_is_named_with_the_way_out(engine, images, tmp_path, label, header, match):
    from safetensors.torch import save_file

    out = tmp_path / "z.safetensors"
    work = tmp_path / ".z.training"
    work.mkdir()
    save_file({"vectors.clip_l": torch.zeros(2, 48)}, str(work / "state.safetensors"),
              metadata={STATE_METADATA_KEY: header})
    before = files_of(work)
    with pytest.raises(TrainingError) as caught:
        train_embedding(engine, images, "zorbly", SETTINGS, out=out, resume=True)
    message = str(caught.value)
    assert str(work / "state.safetensors") in message and match in message, message
    assert f"delete the work folder {work} or pass --overwrite" in message
    assert files_of(work) == before


def test_damaged_recorded_settings_and_truncated_file(engine, images, tmp_path):
    out = tmp_path / "z.safetensors"
    train_embedding(engine, images, "zorbly", dataclasses.replace(SETTINGS, steps=1), out=out)
    state_path = tmp_path / ".z.training" / "state.safetensors"
    state = load_state(state_path)
    save_state(state_path, dataclasses.replace(state, settings={**state.settings, "batch_size": "two"}))
    with pytest.raises(TrainingError, match=r"damaged training checkpoint \(its recorded settings.*delete the work"):
        train_embedding(engine, images, "zorbly", TrainEmbeddingSettings(), out=out, resume=True)
    state_path.write_bytes(state_path.read_bytes()[:40])
    with pytest.raises(TrainingError, match="not a readable training checkpoint.*pass --overwrite"):
        train_embedding(engine, images, "zorbly", SETTINGS, out=out, resume=True)


# ------------------------------------------------------------------------- resume takes the settings


def test_resume_settings_python_api(engine, images, whole, tmp_path):
    out = tmp_path / "z.safetensors"
    train_embedding(engine, images, "zorbly", dataclasses.replace(SETTINGS, steps=2), out=out)
    with pytest.raises(TrainingError, match=r"would change it: batch_size 3 \(the run's is 2\); learning_rate"):
        train_embedding(engine, images, "zorbly", TrainEmbeddingSettings(batch_size=3, learning_rate="0.1"), out=out,
                        resume=True)
    longer = train_embedding(engine, images, "zorbly", TrainEmbeddingSettings(steps=4), out=out, resume=True)
    assert longer.resumed_from == 2 and any("steps changed from the run's 2 to 4" in w for w in longer.warnings)
    assert torch.equal(longer.vectors["clip_l"], whole.vectors["clip_l"])
    with pytest.raises(TrainingError, match=r"steps 3 \(the checkpoint has trained 4 steps already\)"):
        train_embedding(engine, images, "zorbly", TrainEmbeddingSettings(steps=3), out=out, resume=True)


def test_the_readme_resume_recipe(model, images, tmp_path, capsys, monkeypatch):
    """README: `tiengine train-embedding ./my-images --name 0lg4kury --model ./sd15 --init-text "girl" --steps ...
    --batch-size 2 --lr "0.005:200, 0.001" --out 0lg4kury.safetensors --also pt`, interrupted, then the
    same command with only `--resume` (fewer steps here, the same shape)."""
    from tiengine.cli import main

    (tmp_path / "my-images").symlink_to(images, target_is_directory=True)
    (tmp_path / "sd15").symlink_to(model, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    original = EmbeddingTrainer._accumulate

    def interrupted_once(self, step):
        if step == 2 and not getattr(interrupted_once, "done", False):
            interrupted_once.done = True
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(EmbeddingTrainer, "_accumulate", interrupted_once)
    first = ["train-embedding", "./my-images", "--name", "0lg4kury", "--model", "./sd15", "--init-text", "girl",
             "--steps", "4", "--batch-size", "2", "--lr", "0.005:2, 0.001", "--out", "0lg4kury.safetensors",
             "--also", "pt"]
    assert main(first) == 130
    assert "interrupted at step 2; resume with --resume" in capsys.readouterr().err
    assert main(["train-embedding", "./my-images", "--name", "0lg4kury", "--model", "./sd15", "--resume"]) == 0
    output = capsys.readouterr().out
    assert "resumed at step 2" in output and "wrote 0lg4kury.safetensors (4 steps" in output
    assert "wrote 0lg4kury.pt" in output
    uninterrupted = train_embedding(Engine.load(model), images, "0lg4kury",
                                    TrainEmbeddingSettings(init_text="girl", steps=4, batch_size=2,
                                                           learning_rate="0.005:2, 0.001"))
    assert torch.equal(load_embedding("0lg4kury.safetensors").vectors["clip_l"], uninterrupted.vectors["clip_l"])
    # An option typed on purpose that changes the run is refused by name, even when it is the default value.
    assert main(["train-embedding", "./my-images", "--name", "0lg4kury", "--model", "./sd15", "--resume",
                 "--batch-size", "1"]) == 2
    assert "batch_size 1 (the run's is 2)" in capsys.readouterr().err
