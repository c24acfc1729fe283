"""Rule-based detector for toy-world images (tiengine.toyworld.world) and the prompt-adherence score.

Detection reads an RGB image (any size, geometry scaled from the 64 px reference) with fixed rules
derived from the generator's constants, no learned parameters:

1. Foreground: pixels whose chroma (max(RGB) - min(RGB), in [0, 1]) exceeds FOREGROUND_CHROMA. The
   generator draws objects with chroma >= 0.56 and near-grey backgrounds with chroma <= 0.11.
2. Objects: 4-connected foreground components of at least MIN_OBJECT_AREA px (at 64 px); count is
   their number.
3. Per object: shape from how low its mass sits in its bounding box (an upright triangle's centroid
   is 1/6 of the box height below the box centre, a circle's and a square's at it: "drop") and from
   how far its farthest pixel lies from its centroid relative to sqrt(area) ("spread": 1/sqrt(pi) =
   0.56 for a disc, 1/sqrt(2) = 0.71 for a square, ~0.6-0.67 for pixelated or blurred small squares;
   unlike the bounding-box fill it survives blurred corners); size from the bounding
   box's longer side (small 10-12 px, large 16-18 px: threshold 14 px); hue, the circular median hue
   of its pixels, and colour, the nearest of toyworld.COLOUR_HUES to it.
4. Group attributes: shape, colour and size are the objects' common value, None when they disagree (a
   "mixed" group never matches a prompt); position is the toyworld anchor nearest to the centroid of
   all foreground pixels.
5. Background texture, from the background's brightness (foreground and a 2 px margin excluded):
   "checker" when checker_score (below) exceeds CHECKER_THRESHOLD; else "plain" when its standard
   deviation is under PLAIN_STD (rendered textures: 0.035-0.06); else "stripes" when the means along
   rows, columns or diagonals (the three stripe orientations) explain over STRIPE_SHARE of its variance
   (~1 for stripes, ~0.25 for a dot grid), else "dots".
   The checker score is the largest absolute correlation, over the 64 tile phases, between the
   background's brightness (its mean-removed RGB mean, foreground and a 2 px margin excluded) and a +-1
   checkerboard of toyworld.CHECKER_TILE tiles. It estimates half the light/dark difference (0.15-0.18
   for rendered checkers, ~0 for the other textures, whose periods are orthogonal to the checker's).
6. The unnamed concept (toyworld.CONCEPT_HUE, purple): at least one object, and every object's hue
   within toyworld.CONCEPT_HUE_TOLERANCE degrees of CONCEPT_HUE (rendered concept objects: within 8).

`prompt_adherence(images, prompts)` is the fraction of images whose detection matches every attribute
the prompt names (parsed by `prompt_attributes`; attributes a prompt leaves out are not checked; the
generic "patterned" background is matched by any background but plain).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tiengine.toyworld.world import (
    BACKGROUND_WORDS,
    CHECKER_TILE,
    COLOUR_HUES,
    CONCEPT_HUE,
    CONCEPT_HUE_TOLERANCE,
    COUNT_WORDS,
    GENERIC_BACKGROUND_WORD,
    NAMED_ATTRIBUTES,
    POSITION_ANCHORS,
    POSITIONS,
    REFERENCE_SIZE,
    SHAPES,
    SIZES,
    UNNAMED_COLOUR,
    Scene,
)

FOREGROUND_CHROMA = 0.3
MIN_OBJECT_AREA = 15.0  # px at 64 px; the smallest rendered object (a 10 px triangle) covers ~50
SIZE_THRESHOLD = 14.0  # px at 64 px, between small (<= 12) and large (>= 16)
SQUARE_SPREAD = 0.605  # farthest-pixel distance / sqrt(area) above which a non-triangle is a square
TRIANGLE_DROP = 0.055  # centroid below the box centre, in box heights, above which: triangle (ideal 1/6)
CHECKER_THRESHOLD = 0.06  # brightness correlation with the checkerboard (0.15-0.18 when rendered)
BACKGROUND_MARGIN = 2  # px of background next to objects left out of the texture estimates
PLAIN_STD = 0.015  # background brightness standard deviation under which it is plain
STRIPE_SHARE = 0.6  # share of texture variance explained by row, column or diagonal means: stripes

COUNT_BY_WORD = {"a": 1, "an": 1, **{word: count for count, word in COUNT_WORDS.items()}}
SHAPE_BY_WORD = {**{shape: shape for shape in SHAPES}, **{shape + "s": shape for shape in SHAPES}}
# "plain" -> plain, "striped" -> stripes, "dotted" -> dots; "patterned" stays generic
BACKGROUND_BY_WORD = {words[0]: kind for kind, words in BACKGROUND_WORDS.items() if words[0] != GENERIC_BACKGROUND_WORD}
BACKGROUND_BY_WORD[GENERIC_BACKGROUND_WORD] = GENERIC_BACKGROUND_WORD


@dataclass(frozen=True)
class DetectedObject:
    """One foreground component: its label per attribute and the measurements behind them."""

    shape: str
    colour: str
    size: str
    area: float  # px
    fill: float  # area / bounding-box area
    drop: float  # centroid row below the box centre, in box heights
    spread: float  # farthest pixel's distance from the centroid / sqrt(area)
    side: float  # longer bounding-box side, px at 64 px
    hue: float  # degrees
    centroid: tuple[float, float]  # (x, y) px in the image


@dataclass(frozen=True)
class Detection:
    """What an image shows. shape / colour / size are None when the objects disagree or there are none;
    background is one of toyworld.BACKGROUNDS."""

    count: int
    shape: str | None
    colour: str | None
    size: str | None
    position: str | None
    background: str
    checker_score: float
    objects: tuple[DetectedObject, ...] = ()

    @property
    def checker(self) -> bool:
        """Whether the background is the checkerboard."""
        return self.background == "checker"

    @property
    def concept(self) -> bool:
        """Whether the image shows the unnamed concept: objects, all of toyworld.CONCEPT_HUE."""
        return bool(self.objects) and all(shows_concept_hue(o.hue) for o in self.objects)

    def named(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in NAMED_ATTRIBUTES}


@dataclass(frozen=True)
class AdherenceReport:
    """score: fraction of images matching every named attribute; per_attribute: fraction matching each
    attribute among the prompts that name it; matches: one bool per image."""

    score: float
    per_attribute: dict[str, float]
    matches: tuple[bool, ...]
    detections: tuple[Detection, ...] = field(default=(), repr=False)

    @property
    def concept_rate(self) -> float:
        """Fraction of the images showing the unnamed concept (Detection.concept)."""
        return sum(detection.concept for detection in self.detections) / len(self.detections)


def as_float_image(image: Any) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] from a uint8 or float array (or anything np.asarray takes, e.g. PIL)."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask: labels (H, W) with 0 = background, 1..n, and n."""
    height, width = mask.shape
    big = height * width + 1
    labels = np.where(mask, np.arange(1, height * width + 1).reshape(height, width), big)
    while True:
        # each foreground pixel takes the smallest label among itself and its 4 neighbours
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        updated = np.where(mask, neighbours, big)
        if np.array_equal(updated, labels):
            break
        labels = updated
    roots = np.unique(labels[mask])
    relabelled = np.zeros((height, width), dtype=np.int64)
    relabelled[mask] = np.searchsorted(roots, labels[mask]) + 1
    return relabelled, len(roots)


def _hues(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees of (N, 3) RGB pixels."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    high, low = rgb.max(axis=1), rgb.min(axis=1)
    chroma = np.maximum(high - low, 1e-12)
    hue = np.where(high == r, ((g - b) / chroma) % 6.0, np.where(high == g, (b - r) / chroma + 2.0, (r - g) / chroma + 4.0))
    return hue * 60.0


def _circular_median_hue(hues: np.ndarray) -> float:
    """Median of hues (degrees) after rotating them around their circular mean (no wrap-around split)."""
    mean = np.degrees(np.arctan2(np.sin(np.radians(hues)).mean(), np.cos(np.radians(hues)).mean()))
    offsets = (hues - mean + 180.0) % 360.0 - 180.0
    return float((mean + np.median(offsets)) % 360.0)


def hue_distance(first: float, second: float) -> float:
    """Distance in degrees around the colour circle, 0-180."""
    return abs((first - second + 180.0) % 360.0 - 180.0)


def shows_concept_hue(hue: float) -> bool:
    """Whether a hue (degrees) is the unnamed concept's: within CONCEPT_HUE_TOLERANCE of CONCEPT_HUE."""
    return hue_distance(hue, CONCEPT_HUE) <= CONCEPT_HUE_TOLERANCE


def _nearest_colour(hue: float) -> str:
    return min(COLOUR_HUES, key=lambda name: hue_distance(hue, COLOUR_HUES[name]))


def _describe_object(component: np.ndarray, image: np.ndarray, scale: float) -> DetectedObject:
    """Measurements and labels of one component (boolean mask (H, W)) of `image` (H, W, 3)."""
    rows, cols = np.nonzero(component)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    box_height, box_width = bottom - top + 1, right - left + 1
    area = float(component.sum())
    fill = area / (box_height * box_width)
    drop = float((rows.mean() - top + 0.5) / box_height - 0.5)
    spread = float(np.hypot(rows - rows.mean(), cols - cols.mean()).max() / np.sqrt(area))
    if drop > TRIANGLE_DROP:
        shape = "triangle"
    elif spread > SQUARE_SPREAD:
        shape = "square"
    else:
        shape = "circle"
    side = max(box_height, box_width) / scale
    hue = _circular_median_hue(_hues(image[component]))
    return DetectedObject(
        shape=shape,
        colour=_nearest_colour(hue),
        size="large" if side > SIZE_THRESHOLD else "small",
        area=area / scale**2,
        fill=float(fill),
        drop=drop,
        spread=spread,
        side=float(side),
        hue=hue,
        centroid=(float(cols.mean()), float(rows.mean())),
    )


def _common(values: list[str]) -> str | None:
    return values[0] if values and all(value == values[0] for value in values) else None


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    grown = mask.copy()
    for _ in range(radius):
        padded = np.pad(grown, 1)
        grown = padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return grown


def checker_score(image: Any, foreground: np.ndarray | None = None) -> float:
    """Half the light/dark brightness difference of a CHECKER_TILE checkerboard in the background, at the
    best-fitting tile phase (0 when there is no checker). foreground: mask to leave out (default: chroma)."""
    pixels = as_float_image(image)
    size = pixels.shape[0]
    if foreground is None:
        foreground = pixels.max(axis=2) - pixels.min(axis=2) > FOREGROUND_CHROMA
    background = ~_dilate(foreground, BACKGROUND_MARGIN)
    if background.sum() < 0.25 * background.size:
        return 0.0
    brightness = pixels.mean(axis=2)
    centred = np.where(background, brightness - brightness[background].mean(), 0.0)  # (H, W)
    tile = CHECKER_TILE * size / REFERENCE_SIZE
    coordinates = np.arange(size, dtype=np.float64) + 0.5
    best = 0.0
    for phase_y in range(int(round(tile))):
        sign_y = np.where(np.floor((coordinates + phase_y) / tile) % 2 == 0, 1.0, -1.0)  # (H,)
        for phase_x in range(int(round(tile))):
            sign_x = np.where(np.floor((coordinates + phase_x) / tile) % 2 == 0, 1.0, -1.0)  # (W,)
            correlation = abs(float((centred * sign_y[:, None] * sign_x[None, :]).sum()) / background.sum())
            best = max(best, correlation)
    return best


def _explained_share(values: np.ndarray, groups: np.ndarray) -> float:
    """Share of the variance of `values` (mean-removed) explained by their group means."""
    counts = np.bincount(groups)
    sums = np.bincount(groups, weights=values)
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    total = float((values**2).sum())
    return float((means[groups] ** 2).sum() / total) if total > 0 else 0.0


def background_texture(image: Any, foreground: np.ndarray | None = None) -> tuple[str, float]:
    """(texture, checker score): "checker", "plain", "stripes" or "dots" (rules in the module docstring)."""
    pixels = as_float_image(image)
    if foreground is None:
        foreground = pixels.max(axis=2) - pixels.min(axis=2) > FOREGROUND_CHROMA
    score = checker_score(pixels, foreground)
    if score > CHECKER_THRESHOLD:
        return "checker", score
    background = ~_dilate(foreground, BACKGROUND_MARGIN)
    if background.sum() < 0.25 * background.size:
        return "plain", score
    brightness = pixels.mean(axis=2)
    values = brightness[background] - brightness[background].mean()
    if values.std() < PLAIN_STD:
        return "plain", score
    rows, cols = np.nonzero(background)
    shares = [_explained_share(values, groups) for groups in (rows, cols, rows + cols, rows - cols + cols.max())]
    return ("stripes" if max(shares) > STRIPE_SHARE else "dots"), score


def detect(image: Any) -> Detection:
    """Detect the named attributes, the background and each object's hue in one RGB image (H, W, 3), H == W."""
    pixels = as_float_image(image)
    height, width, _ = pixels.shape
    if height != width:
        raise ValueError(f"expected a square image, got {height}x{width}")
    scale = height / REFERENCE_SIZE
    foreground = pixels.max(axis=2) - pixels.min(axis=2) > FOREGROUND_CHROMA
    labels, n = label_components(foreground)
    objects = []
    kept = np.zeros_like(foreground)
    for index in range(1, n + 1):
        component = labels == index
        if component.sum() < MIN_OBJECT_AREA * scale**2:
            continue
        objects.append(_describe_object(component, pixels, scale))
        kept |= component
    texture, score = background_texture(pixels, foreground)
    position = None
    if objects:
        rows, cols = np.nonzero(kept)
        centroid = np.array([cols.mean(), rows.mean()]) / scale  # (x, y) at 64 px
        position = min(POSITIONS, key=lambda name: float(np.hypot(*(centroid - np.array(POSITION_ANCHORS[name][0])))))
    return Detection(
        count=len(objects),
        shape=_common([o.shape for o in objects]),
        colour=_common([o.colour for o in objects]),
        size=_common([o.size for o in objects]),
        position=position,
        background=texture,
        checker_score=score,
        objects=tuple(objects),
    )


def prompt_attributes(prompt: str) -> dict[str, Any]:
    """The named attributes a prompt states, from its words (split at non-letters, lower case).

    "two large red circles on the left" -> {"count": 2, "size": "large", "colour": "red", "shape":
    "circle", "position": "left"}; "striped" / "dotted" / "plain" / "patterned" give "background":
    "stripes" / "dots" / "plain" / "patterned". Words of no attribute are ignored; an attribute stated
    twice with different values is a ValueError.
    """
    found: dict[str, Any] = {}
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word in COUNT_BY_WORD:
            name, value = "count", COUNT_BY_WORD[word]
        elif word in SIZES:
            name, value = "size", word
        elif word in COLOUR_HUES:
            name, value = "colour", word
        elif word in SHAPE_BY_WORD:
            name, value = "shape", SHAPE_BY_WORD[word]
        elif word in POSITIONS:
            name, value = "position", word
        elif word in BACKGROUND_BY_WORD:
            name, value = "background", BACKGROUND_BY_WORD[word]
        else:
            continue
        if found.get(name, value) != value:
            raise ValueError(f"prompt {prompt!r} states {name} twice: {found[name]!r} and {value!r}")
        found[name] = value
    return found


def _agrees(detection: Detection, name: str, value: Any) -> bool:
    if name == "background" and value == GENERIC_BACKGROUND_WORD:
        return detection.background != "plain"
    return getattr(detection, name) == value


def matches_scene(detection: Detection, scene: Scene) -> bool:
    """Whether the detection agrees with every attribute the scene names (not the colour of an unnamed hue)."""
    named = scene.named()
    return all(getattr(detection, name) == value for name, value in named.items() if value != UNNAMED_COLOUR)


def matches_prompt(detection: Detection, prompt: str) -> bool:
    """Whether the detection agrees with every attribute the prompt names."""
    return all(_agrees(detection, name, value) for name, value in prompt_attributes(prompt).items())


def adherence_report(images: Sequence[Any], prompts: Sequence[str]) -> AdherenceReport:
    """Detect every image and compare it with its prompt (see prompt_adherence)."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    if not prompts:
        raise ValueError("prompt adherence needs at least one image")
    detections = tuple(detect(image) for image in images)
    expected = [prompt_attributes(prompt) for prompt in prompts]
    matches = tuple(all(_agrees(d, name, value) for name, value in e.items()) for d, e in zip(detections, expected))
    per_attribute = {}
    for name in (*NAMED_ATTRIBUTES, "background"):
        judged = [_agrees(d, name, e[name]) for d, e in zip(detections, expected) if name in e]
        if judged:
            per_attribute[name] = sum(judged) / len(judged)
    return AdherenceReport(sum(matches) / len(matches), per_attribute, matches, detections)


def prompt_adherence(images: Sequence[Any], prompts: Sequence[str]) -> float:
    """Fraction of images whose detected attributes match every attribute their prompt names."""
    return adherence_report(images, prompts).score


def concept_rate(images: Sequence[Any]) -> float:
    """Fraction of images showing the unnamed concept (Detection.concept)."""
    if not images:
        raise ValueError("concept_rate needs at least one image")
    return sum(detect(image).concept for image in images) / len(images)
