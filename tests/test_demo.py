"""`tiengine demo`: textual inversion on the built-in model finds the concept the captions never named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tiengine.cli import main
from tiengine.embeddings.embedding import load_embedding
from tiengine.io.metadata import parse_parameters, read_image_parameters
from tiengine.toyworld.demo import (
    CONCEPT_IMAGES,
    CONCEPT_NAME,
    LORA_NAME,
    LORA_TARGET_GAIN,
    STAGES,
    TARGET_WITH,
    TARGET_WITHOUT,
    TRAIN_STEPS,
    DemoError,
    evaluation_prompts,
    run_demo,
)
from tiengine.toyworld.detector import prompt_attributes
from tiengine.toyworld.world import COLOURS, concept_examples


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The whole demonstration at its default settings, as `tiengine demo` runs it."""
    out = tmp_path_factory.mktemp("demo") / "out"
    calls: list[tuple[str, int, int]] = []
    report = run_demo(out, progress=lambda stage, done, total: calls.append((stage, done, total)))
    report.progress_calls = calls  # for test_progress_reports_every_stage_in_order
    return out, report


def test_progress_reports_every_stage_in_order(demo_run):
    calls = demo_run[1].progress_calls
    stages = list(dict.fromkeys(stage for stage, _, _ in calls))
    assert tuple(stages) == STAGES
    for stage in STAGES:
        mine = [(done, total) for name, done, total in calls if name == stage]
        assert mine[0][0] == 0 and mine[-1][0] == mine[-1][1]  # announced at 0, finished at total


def test_scores_the_three_arms_on_the_held_out_prompts(demo_run):
    _, report = demo_run
    assert [arm.label for arm in report.arms] == ["prompt alone", "nearest word", "with the embedding"]
    assert [arm.colour_word for arm in report.arms] == ["", "purple", CONCEPT_NAME]
    assert report.images_per_arm == 36 and report.train_steps == TRAIN_STEPS
    # every image was scored: rates are multiples of 1/36
    for arm in report.arms:
        assert round(arm.concept_rate * 36, 6) == round(arm.concept_rate * 36)
    # the demonstration's claim: the model draws the concept rarely on its own, the English word does not
    # reach it, the learned embedding does
    assert report.arm("prompt alone").concept_rate < TARGET_WITHOUT, report.summary_lines()
    assert report.arm("nearest word").concept_rate < TARGET_WITHOUT, report.summary_lines()
    assert report.arm("with the embedding").concept_rate >= TARGET_WITH, report.summary_lines()
    assert report.summary_lines()[4].endswith(": met")


def test_evaluation_prompts_put_the_word_where_a_colour_word_stands():
    plain = evaluation_prompts()
    named = evaluation_prompts(CONCEPT_NAME)
    assert len(plain) == len(named) == 36
    for without, with_name in zip(plain, named):
        assert not set(without.split()) & {*COLOURS, CONCEPT_NAME}
        words = with_name.split()
        attributes = prompt_attributes(without)
        assert words[words.index(CONCEPT_NAME) + 1].rstrip("s") == attributes["shape"]
        assert with_name.replace(f" {CONCEPT_NAME}", "") == without


def test_outputs_are_the_training_set_embedding_grid_and_scores(demo_run):
    out, report = demo_run
    images, captions = concept_examples(0, CONCEPT_IMAGES, colour_word="[name]")
    for index in range(CONCEPT_IMAGES):
        written = np.asarray(Image.open(out / "concept_images" / f"{index + 1:02d}.png"))
        assert written.tobytes() == images[index].tobytes()
        caption = (out / "concept_images" / f"{index + 1:02d}.txt").read_text(encoding="utf-8")
        assert caption == captions[index] and caption.count("[name]") == 1
    assert (out / "template.txt").read_text(encoding="utf-8") == "[filewords]\n"
    embedding = load_embedding(out / f"{CONCEPT_NAME}.safetensors")
    assert embedding.name == CONCEPT_NAME
    assert embedding.vectors["clip_l"].shape == (1, 32)
    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    assert [arm["label"] for arm in scores["arms"]] == [arm.label for arm in report.arms]
    assert scores["train_steps"] == report.train_steps
    grid = Image.open(out / "demo_grid.png")
    assert grid.width > 4 * 128 and grid.height > 8 * 128
    parameters = parse_parameters(read_image_parameters(out / "demo_grid.png"))
    assert "held-out prompt" in parameters["Prompt"] and parameters["Seed"] == "0"
    assert parameters["TI hashes"] == f"{CONCEPT_NAME}: {embedding.short_hash}"


def test_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(DemoError, match="not empty"):
        run_demo(tmp_path)
    assert (tmp_path / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_the_packaged_lora_stripes_backgrounds_and_multiplier_zero_is_the_base_image(demo_run):
    _, report = demo_run
    lora = report.lora
    assert lora is not None and lora.name == LORA_NAME and len(lora.short_hash) == 12
    # <lora:striped:0> restores the base weights exactly: every image equals the prompt-alone image
    assert lora.zero_is_base
    # the LoRA was trained on striped scenes captioned without a background word (MODEL_CARD.md, "LoRA")
    assert lora.striped_with >= lora.striped_without + LORA_TARGET_GAIN, report.summary_lines()


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


def test_cli_prints_a_header_before_each_stage(monkeypatch, tmp_path, capsys):
    import tiengine.toyworld.demo as demo

    def fake_run_demo(out, *, model, seed, train_steps, overwrite, progress):
        assert train_steps == TRAIN_STEPS
        for stage in STAGES:
            progress(stage, 0, 2)
            progress(stage, 2, 2)
        raise DemoError("stopped after the stages")

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    headers = [line for line in err.splitlines() if line.startswith("[")]
    assert headers == [f"[{number}/{len(STAGES)}] {stage}" for number, stage in enumerate(STAGES, start=1)]
    assert main(["demo", "--out", str(tmp_path / "o"), "--json"]) == 2
    assert "[1/4]" not in capsys.readouterr().err  # --json: no headers, no bars


def test_demo_help_names_the_recipe_steps_without_loading_torch(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert f"training steps (default {TRAIN_STEPS})" in " ".join(capsys.readouterr().out.split())
