"""Labelled comparison grids (tiengine.io.images.labelled_grid) and the demo grid's labels and infotext."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tiengine.io.images import labelled_grid
from tiengine.io.metadata import parse_parameters
from tiengine.toyworld.demo import CONCEPT_NAME, GRID_ROWS, _grid, evaluation_prompts, grid_parameters


def _cells(count: int, side: int = 32) -> list[Image.Image]:
    return [Image.new("RGB", (side, side), (200, 40 * index % 255, 90)) for index in range(count)]


def _ink_runs(band: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) column ranges holding dark pixels in an (h, w, 3) strip of white background."""
    ink = (band.min(axis=2) < 128).any(axis=0)  # (w,)
    runs, start = [], None
    for x, dark in enumerate(ink):
        if dark and start is None:
            start = x
        elif not dark and start is not None:
            runs.append((start, x))
            start = None
    if start is not None:
        runs.append((start, len(ink)))
    return runs


def test_a_label_keeps_its_space():
    # "prompt alone" must not read "promptalone": the gap between the words is clearly the widest
    grid = np.asarray(labelled_grid([("prompt alone", _cells(1, 160))]))
    runs = _ink_runs(grid[:16, 4:164])
    gaps = sorted(right[0] - left[1] for left, right in zip(runs, runs[1:]))
    assert len(gaps) >= 9, runs  # the glyphs of both words (touching pairs may merge)
    assert gaps[-1] >= 4 and gaps[-1] >= 2 * gaps[-2], gaps


def test_columns_unchanged_without_row_labels_and_row_labels_on_the_left():
    columns = [("left", _cells(2)), ("right", _cells(2))]
    plain = labelled_grid(columns)
    labelled = labelled_grid(columns, row_labels=["first row", "second row"])
    assert labelled.height == plain.height and labelled.width > plain.width
    extra = labelled.width - plain.width
    # the cells move right by the label column; the label column holds ink on each row
    assert np.array_equal(np.asarray(labelled)[:, extra:], np.asarray(plain))
    pixels = np.asarray(labelled)
    top = plain.height - 2 * (32 + 4) - 4
    for row in range(2):
        band = pixels[top + 4 + row * 36 : top + 4 + row * 36 + 32, :extra]
        assert (band.min(axis=2) < 128).any()
    with pytest.raises(ValueError, match="3 row labels for a grid of 2 rows"):
        labelled_grid(columns, row_labels=["a", "b", "c"])


def test_demo_grid_rows_are_labelled_with_the_held_out_prompts():
    prompts = evaluation_prompts()
    columns = [("training images", _cells(5, 64)), ("prompt alone", _cells(36, 64))]
    grid = _grid(columns, prompts)
    unlabelled = labelled_grid([(label, [i.resize((128, 128)) for i in images[:GRID_ROWS]]) for label, images in columns])
    assert grid.height == unlabelled.height and grid.width > unlabelled.width + 128


def test_demo_grid_parameters_say_what_the_grid_shows():
    text = grid_parameters(["training images", "prompt alone", "purple", CONCEPT_NAME], 36, 8, 0, (64, 64),
                           "0123456789ab")
    fields = parse_parameters(text)
    assert "held-out prompt" in fields["Prompt"] and "training images" in fields["Prompt"]
    assert fields["Seed"] == "0" and fields["Size"] == "64x64" and fields["Steps"] == "20"
    assert fields["TI hashes"] == f"{CONCEPT_NAME}: 0123456789ab"
