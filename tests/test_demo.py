"""`tiengine demo`: textual inversion on the built-in model finds the concept the captions never named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tiengine.cli import main
from tiengine.demo import CONCEPT_IMAGES, CONCEPT_NAME, TARGET_WITHOUT, TRAIN_STEPS, DemoError, run_demo
from tiengine.embeddings import load_embedding
from tiengine.toyworld import concept_examples


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The whole demonstration at its default settings, as `tiengine demo` runs it."""
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, run_demo(out)


def test_scores_the_three_arms_on_the_held_out_prompts(demo_run):
    _, report = demo_run
    assert [arm.label for arm in report.arms] == ["prompt alone", "nearest words", "with the embedding"]
    assert report.images_per_arm == 36 and report.train_steps == TRAIN_STEPS
    # the model draws the concept rarely on its own: what the embedding has to change
    assert report.arm("prompt alone").concept_rate < TARGET_WITHOUT, report.summary_lines()
    # every image was scored: rates are multiples of 1/36
    for arm in report.arms:
        assert round(arm.concept_rate * 36, 6) == round(arm.concept_rate * 36)


def test_outputs_are_the_training_set_embedding_grid_and_scores(demo_run):
    out, report = demo_run
    images, captions = concept_examples(0, CONCEPT_IMAGES)
    for index in range(CONCEPT_IMAGES):
        written = np.asarray(Image.open(out / "concept_images" / f"{index + 1:02d}.png"))
        assert written.tobytes() == images[index].tobytes()
        assert (out / "concept_images" / f"{index + 1:02d}.txt").read_text(encoding="utf-8") == captions[index]
    embedding = load_embedding(out / f"{CONCEPT_NAME}.safetensors")
    assert embedding.name == CONCEPT_NAME
    assert embedding.vectors["clip_l"].shape == (1, 32)
    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    assert [arm["label"] for arm in scores["arms"]] == [arm.label for arm in report.arms]
    assert scores["train_steps"] == report.train_steps
    grid = Image.open(out / "demo_grid.png")
    assert grid.width > 4 * 128 and grid.height > 8 * 128


def test_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(DemoError, match="not empty"):
        run_demo(tmp_path)
    assert (tmp_path / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_cli_error_and_help(capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("mine", encoding="utf-8")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "new"), "--threads", "0"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--overwrite" in capsys.readouterr().out
