"""Toy-world generator and detector: determinism, captions, held-out split, rendering against the
generator's own geometry formulas, and the detector against generator ground truth."""

from __future__ import annotations

import colorsys
import re
from dataclasses import replace

import numpy as np
import pytest

from tiengine.toyworld import world as tw
from tiengine.toyworld import detector as ev

CAPTION_WORDS = (
    {"a", "one", "two", "three"}
    | set(tw.SIZES)
    | set(tw.COLOURS)
    | set(tw.SHAPES)
    | {shape + "s" for shape in tw.SHAPES}
    | {word for phrase in tw.POSITION_PHRASES.values() for word in phrase.split()}
    | {word for words in tw.BACKGROUND_WORDS.values() for word in words}
    | {"background"}
)


def test_same_seed_same_scenes_and_bytes():
    first = tw.sample_scenes(7, 40)
    second = tw.sample_scenes(7, 40)
    assert first == second
    assert tw.render_batch(first).tobytes() == tw.render_batch(second).tobytes()
    other = tw.sample_scenes(8, 40)
    assert other != first
    assert tw.render_batch(other).tobytes() != tw.render_batch(first).tobytes()


def test_render_shape_dtype_and_sizes():
    scene = tw.sample_scenes(0, 1)[0]
    for size in (32, 64, 96):
        image = tw.render(scene, size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
    with pytest.raises(ValueError):
        tw.render(scene, 8)


def test_captions_name_only_named_attributes():
    rng = np.random.default_rng(3)
    scenes = tw.sample_scenes(11, 400, split="all")
    for scene in scenes:
        for text in (tw.caption(scene), tw.caption(scene, rng, omit_probability=0.3, background_probability=0.5)):
            words = re.findall(r"[a-z]+", text)
            assert set(words) <= CAPTION_WORDS, text
            stated = ev.prompt_attributes(text)
            assert {"count", "shape"} <= set(stated), text
            assert ("colour" in stated) == (scene.colour != tw.UNNAMED_COLOUR), text
            named = {**scene.named(), "background": scene.background}
            for name, value in stated.items():
                if value == tw.GENERIC_BACKGROUND_WORD:
                    assert scene.background != "plain", text
                else:
                    assert named[name] == value, (text, scene)
            assert "checker" not in text and "hue" not in text
        expected = {name: value for name, value in scene.named().items() if value != tw.UNNAMED_COLOUR}
        assert ev.prompt_attributes(tw.caption(scene)) == expected


def test_background_mentions_carry_no_evidence_for_the_checkerboard():
    """Every background is mentioned equally often, and the checkerboard only ever by the generic word."""
    rng = np.random.default_rng(5)
    mentioned: dict[str, list[bool]] = {kind: [] for kind in tw.BACKGROUNDS}
    for background in tw.BACKGROUNDS:
        for scene in tw.sample_scenes(17, 400, background=background):
            text = tw.caption(scene, rng, background_probability=0.5)
            mentioned[background].append("background" in text)
            if background == "checker" and "background" in text:
                assert text.endswith(", patterned background")
    for kind, flags in mentioned.items():
        assert abs(sum(flags) / len(flags) - 0.5) < 0.08, kind


def test_canonical_caption_wording():
    attributes = {"count": 2, "size": "large", "colour": "red", "shape": "circle", "position": "left"}
    assert tw.canonical_caption(attributes) == "two large red circles on the left"
    attributes.update(count=1, position="center", shape="triangle")
    assert tw.canonical_caption(attributes) == "one large red triangle in the center"
    attributes.update(colour=tw.UNNAMED_COLOUR)
    assert tw.canonical_caption(attributes) == "one large triangle in the center"


def test_held_out_split():
    held_out = tw.held_out_combinations()
    assert len(held_out) == 36 and held_out <= set(tw.all_combinations())
    assert len(tw.all_combinations()) == 360
    train = tw.sample_scenes(5, 2000, split="train")
    assert not any(scene.combination() in held_out for scene in train)
    held = tw.sample_scenes(5, 200, split="held_out")
    assert all(scene.combination() in held_out for scene in held if scene.colour != tw.UNNAMED_COLOUR)
    # every value of every attribute still occurs in training
    for index, values in enumerate((tw.SHAPES, (*tw.COLOURS, tw.UNNAMED_COLOUR), tw.SIZES, tw.POSITIONS, tw.COUNTS)):
        assert {scene.combination()[index] for scene in train} == set(values)


def test_frequencies_unnamed_hues_and_concept_scenes():
    scenes = tw.sample_scenes(9, 5000, split="all")
    for background, weight in tw.BACKGROUND_WEIGHTS.items():
        share = sum(scene.background == background for scene in scenes) / len(scenes)
        assert abs(share - weight) < 0.02, background
    unnamed = [scene for scene in scenes if scene.colour == tw.UNNAMED_COLOUR]
    assert abs(len(unnamed) / len(scenes) - tw.UNNAMED_COLOUR_PROBABILITY) < 0.02
    # unnamed hues cover the circle evenly: the concept's window gets its share of them
    in_window = sum(ev.shows_concept_hue(scene.hue) for scene in unnamed) / len(unnamed)
    assert abs(in_window - 2 * tw.CONCEPT_HUE_TOLERANCE / 360) < 0.02
    # named colours stay within HUE_JITTER of their hue, far from the concept's
    for scene in scenes:
        if scene.colour != tw.UNNAMED_COLOUR:
            assert ev.hue_distance(scene.hue, tw.COLOUR_HUES[scene.colour]) <= tw.HUE_JITTER
            assert not ev.shows_concept_hue(scene.hue)
    concept = tw.concept_scenes(0, 5)
    assert len(concept) == 5 and all(scene.colour == tw.UNNAMED_COLOUR for scene in concept)
    assert all(ev.hue_distance(scene.hue, tw.CONCEPT_HUE) <= tw.HUE_JITTER for scene in concept)
    assert all(scene.combination() not in tw.held_out_combinations() for scene in concept)
    images, captions = tw.concept_examples(0, 5)
    assert images.shape == (5, 64, 64, 3)
    assert captions == [tw.canonical_caption(scene) for scene in concept]
    assert images.tobytes() == tw.render_batch(concept).tobytes()


def test_render_matches_geometry():
    """Object centres carry the object's HSV colour; background pixels follow the texture formulas."""
    scene = replace(tw.sample_scenes(1, 1)[0], shape="square", count=2, size="large", object_size=17.0,
                    position="left", background="checker", texture_contrast=0.33,
                    background_saturation=0.0, background_value=0.8, offset_x=0.0, offset_y=0.0)
    image = tw.render_float(scene)
    colour = colorsys.hsv_to_rgb(scene.hue / 360.0, scene.saturation, scene.value)
    centres = tw.object_centres(scene)
    assert len(centres) == 2
    for x, y in centres:
        assert x == pytest.approx(14.0)
        np.testing.assert_allclose(image[int(y), int(x)], colour, atol=1e-12)
    # vertical column: same x, separated by side + gap
    assert abs(centres[1][1] - centres[0][1]) == pytest.approx(17.0 + scene.gap)
    # checker: tile (0, 0) light, tile (0, 1) dark (background far from the objects, right half)
    np.testing.assert_allclose(image[4, 36], [0.8] * 3, atol=1e-12)
    np.testing.assert_allclose(image[4, 44], [0.8 - 0.33] * 3, atol=1e-12)
    np.testing.assert_allclose(image[12, 44], [0.8] * 3, atol=1e-12)


def test_groups_stay_inside_the_image():
    for scene in tw.sample_scenes(13, 500, split="all"):
        half = scene.object_size / 2
        for x, y in tw.object_centres(scene):
            assert tw.BORDER - 1e-9 <= x - half and x + half <= 64 - tw.BORDER + 1e-9
            assert tw.BORDER - 1e-9 <= y - half and y + half <= 64 - tw.BORDER + 1e-9


def test_label_components_against_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.6):
        mask = rng.random((40, 37)) < density
        labels, count = ev.label_components(mask)
        expected, expected_count = ndimage.label(mask)  # 4-connectivity by default
        assert count == expected_count
        # same partition: a one-to-one map between label sets
        pairs = set(zip(labels[mask].tolist(), expected[mask].tolist()))
        assert len(pairs) == count
        assert (labels == 0).tolist() == (~mask).tolist()


@pytest.mark.parametrize(("size", "n"), [(64, 300), (128, 60)])
def test_detector_accuracy_on_clean_renders(size, n):
    scenes = tw.sample_scenes(2024, n, split="all")
    correct_all = 0
    correct = dict.fromkeys(tw.NAMED_ATTRIBUTES, 0)
    checker_correct = 0
    for scene in scenes:
        detection = ev.detect(tw.render(scene, size))
        assert detection.background == scene.background
        ok = True
        for name in tw.NAMED_ATTRIBUTES:
            hit = getattr(detection, name) == getattr(scene, name) or getattr(scene, name) == tw.UNNAMED_COLOUR
            correct[name] += hit
            ok &= hit
        correct_all += ok
        assert ok == ev.matches_scene(detection, scene)
        checker_correct += detection.checker == (scene.background == "checker")
        # measured hue: within 2 degrees of the rendered one (anti-aliased edges mix in the background)
        assert all(ev.hue_distance(found.hue, scene.hue) < 2.0 for found in detection.objects), scene
    assert correct_all / len(scenes) >= 0.98, correct
    assert checker_correct == len(scenes)


def test_concept_detection_on_concept_and_other_colours():
    concept = [tw.render(scene) for scene in tw.concept_scenes(4, 20)]
    assert ev.concept_rate(concept) == 1.0
    named = [tw.render(scene) for scene in tw.sample_scenes(4, 200) if scene.colour != tw.UNNAMED_COLOUR]
    assert ev.concept_rate(named) == 0.0
    mixed = concept[:5] + named[:15]
    assert ev.adherence_report(mixed, [""] * 20).concept_rate == ev.concept_rate(mixed) == 0.25
    # no objects: no concept, whatever the background
    assert ev.concept_rate([np.full((64, 64, 3), 128, np.uint8)]) == 0.0
    # one purple object beside a blue one is not the concept: every object must have its hue
    scene = replace(tw.concept_scenes(4, 1)[0], count=2, position="top")
    (first_x, _), (second_x, _) = tw.object_centres(scene)
    left = np.arange(64) < (first_x + second_x) / 2
    pixels = tw.render(scene).copy()
    pixels[:, left] = tw.render(replace(scene, hue=tw.COLOUR_HUES["blue"]))[:, left]
    detection = ev.detect(pixels)
    assert len(detection.objects) == 2 and not detection.concept
    assert sorted(ev.shows_concept_hue(found.hue) for found in detection.objects) == [False, True]


def test_checker_detection():
    checkers = [tw.render(scene) for scene in tw.sample_scenes(4, 20, background="checker")]
    assert all(ev.detect(image).checker for image in checkers)
    others = [tw.render(scene) for scene in tw.sample_scenes(4, 200) if scene.background != "checker"]
    assert not any(ev.detect(image).checker for image in others)
    assert ev.checker_score(np.full((64, 64, 3), 128, np.uint8)) == 0.0


def test_prompt_attributes():
    assert ev.prompt_attributes("two large red circles on the left") == {
        "count": 2, "size": "large", "colour": "red", "shape": "circle", "position": "left"
    }
    assert ev.prompt_attributes("a blue square") == {"count": 1, "colour": "blue", "shape": "square"}
    assert ev.prompt_attributes("at the top, three small yellow triangles, my-style") == {
        "count": 3, "size": "small", "colour": "yellow", "shape": "triangle", "position": "top"
    }
    assert ev.prompt_attributes("") == {}
    assert ev.prompt_attributes("a red circle, striped background") == {
        "count": 1, "colour": "red", "shape": "circle", "background": "stripes"
    }
    assert ev.prompt_attributes("dotted")["background"] == "dots"
    assert ev.prompt_attributes("patterned background")["background"] == "patterned"
    with pytest.raises(ValueError, match="colour"):
        ev.prompt_attributes("a red blue circle")


def test_prompt_adherence_of_renders():
    scenes = [scene for scene in tw.sample_scenes(21, 40, split="held_out") if scene.colour != tw.UNNAMED_COLOUR]
    images = [tw.render(scene) for scene in scenes]
    prompts = [tw.caption(scene) for scene in scenes]
    assert ev.prompt_adherence(images, prompts) == 1.0
    report = ev.adherence_report(images, prompts)
    assert report.per_attribute == dict.fromkeys(tw.NAMED_ATTRIBUTES, 1.0)
    # the same images against prompts with another colour never match
    recoloured = [
        tw.canonical_caption({**scene.named(), "colour": tw.COLOURS[(tw.COLOURS.index(scene.colour) + 1) % 4]})
        for scene in scenes
    ]
    report = ev.adherence_report(images, recoloured)
    assert report.score == 0.0 and report.per_attribute["colour"] == 0.0
    assert report.per_attribute["shape"] == 1.0
    # backgrounds: the specific word must match, "patterned" matches anything but plain
    with_background = [f"{prompt}, {tw.BACKGROUND_WORDS[scene.background][0]} background"
                       for prompt, scene in zip(prompts, scenes)]
    assert ev.prompt_adherence(images, with_background) == 1.0
    patterned = [f"{prompt}, patterned background" for prompt in prompts]
    expected = sum(scene.background != "plain" for scene in scenes) / len(scenes)
    assert ev.prompt_adherence(images, patterned) == pytest.approx(expected)
    # a prompt naming nothing is matched by anything
    assert ev.prompt_adherence(images[:2], ["", "something else"]) == 1.0
    with pytest.raises(ValueError):
        ev.prompt_adherence(images[:2], prompts[:1])
