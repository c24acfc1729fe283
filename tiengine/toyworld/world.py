"""Toy world: a deterministic procedural generator of small captioned RGB scenes.

A scene is a group of 1-3 identical objects on a textured background. Captions name five attributes
of the group (`NAMED_ATTRIBUTES`) and, in training, sometimes the background texture:

- shape: circle, square, triangle (upright, isosceles);
- colour: red, green, blue, yellow (saturated), or no word at all for an unnamed hue (below);
- size: small (10-12 px across at 64 px) or large (16-18 px);
- position: left / right (a vertical column at x = 14 / 50), top / bottom (a horizontal row at
  y = 14 / 50), center (a horizontal row through the middle);
- count: one, two or three objects.

Unnamed colours: in UNNAMED_COLOUR_PROBABILITY (20%) of scenes the objects take any hue (uniform over
the colour circle), their `colour` is UNNAMED_COLOUR ("") and captions have no colour word for them.
So the model learns to draw every hue but has words for four: with no colour word, the hue is its own
choice. (`colour_blend` gives the two colour words around a hue and their weights; tiengine.toyworld.train_base
uses it to put a blended token row, never a word, in some of these captions.)

Training captions may also name the background texture (`caption(..., background_probability=p)`):
"plain", "striped" or "dotted", or only the generic "patterned" (`BACKGROUND_WORDS`); an 8 px
checkerboard (3% of scenes) is only ever called "patterned". Everything else is unnamed and random: the
exact hue (+-8 degrees around the colour word's), saturation and value of the objects, their exact
size, the spacing and placement jitter of the group, the background's grey level and faint tint, and
the texture's period, orientation and contrast.

The unnamed concept for textual inversion (`CONCEPT_HUE`): purple, hue 290 degrees, halfway between
blue (225) and red (360). The model has drawn it (among the unnamed colours) and has no word for it;
`concept_scenes` renders objects of that hue (+-8 degrees) and tiengine.toyworld.detector counts an image
as showing the concept when every object's hue lies within CONCEPT_HUE_TOLERANCE of it. A model that
picked hues uniformly when no colour word is given would land in that window 2 * 12 / 360 = 7% of the time.

Geometry is given for 64 px images and scales with `size`. Rendering is numpy only (3x3 supersampling
for anti-aliased edges), so a scene renders to the same bytes everywhere. Objects are saturated
(chroma >= 0.5) and backgrounds are near-grey (chroma <= 0.11), which tiengine.toyworld.detector uses to
separate them.

Held-out prompts: `HELD_OUT_COMBINATIONS` is a fixed 10% of the 360 combinations of the named
attributes (drawn once from `HELD_OUT_SEED`); `sample_scene(..., split="train")` never produces them,
so a model trained on the "train" split is evaluated on combinations it never saw.
"""

from __future__ import annotations

import colorsys
from dataclasses import asdict, dataclass
from itertools import product
from typing import Literal

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
COUNTS = (1, 2, 3)
NAMED_ATTRIBUTES = ("count", "size", "colour", "shape", "position")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

COLOUR_HUES = {"red": 0.0, "yellow": 55.0, "green": 120.0, "blue": 225.0}  # degrees (HSV hue)
HUE_JITTER = 8.0  # degrees either side
UNNAMED_COLOUR = ""  # Scene.colour of objects whose hue no colour word names
UNNAMED_COLOUR_PROBABILITY = 0.2  # share of scenes whose objects take any hue (uniform) and no colour word
CONCEPT_HUE = 290.0  # degrees: purple, between blue (225) and red (360), the unnamed concept
CONCEPT_HUE_TOLERANCE = 12.0  # degrees either side that detection counts as the concept
SIZE_RANGES = {"small": (10.0, 12.0), "large": (16.0, 18.0)}  # object side / diameter, px at 64 px
# group centre (x, y) at 64 px and the axis along which its objects line up
POSITION_ANCHORS = {
    "left": ((14.0, 32.0), "vertical"),
    "right": ((50.0, 32.0), "vertical"),
    "top": ((32.0, 14.0), "horizontal"),
    "bottom": ((32.0, 50.0), "horizontal"),
    "center": ((32.0, 32.0), "horizontal"),
}
PLACEMENT_JITTER = 3.0  # px either side, both axes
GAP_RANGE = (4.0, 6.0)  # px between neighbouring objects
BORDER = 1.0  # px an object group keeps from the image edge
REFERENCE_SIZE = 64  # px: every length above is for this image side

BACKGROUNDS = ("plain", "stripes", "dots", "checker")
BACKGROUND_WEIGHTS = {"plain": 0.42, "stripes": 0.275, "dots": 0.275, "checker": 0.03}
# caption words per background; the first is the specific word, "patterned" is the generic one
BACKGROUND_WORDS = {"plain": ("plain",), "stripes": ("striped", "patterned"), "dots": ("dotted", "patterned"),
                    "checker": ("patterned",)}
GENERIC_BACKGROUND_WORD = "patterned"
GENERIC_WORD_PROBABILITY = 0.3  # a striped / dotted background mentioned is called "patterned"
CHECKER_TILE = 8.0  # px at 64 px; tile (0, 0) at the top-left corner is the light one
CHECKER_DARKENING = (0.30, 0.36)  # value subtracted on dark tiles
STRIPE_ORIENTATIONS = ("horizontal", "vertical", "diagonal")

CAPTION_TEMPLATES = 3  # number of phrasings `caption` knows; 0 is the canonical one
HELD_OUT_SEED = 20240611
HELD_OUT_FRACTION = 0.1
SUPERSAMPLING = 3

Split = Literal["train", "held_out", "all"]


@dataclass(frozen=True)
class Scene:
    """One scene: the named attributes first, then the unnamed ones (lengths in px at 64 px)."""

    shape: str
    colour: str
    size: str
    position: str
    count: int
    hue: float  # degrees
    saturation: float
    value: float
    object_size: float
    gap: float
    offset_x: float
    offset_y: float
    background: str
    background_value: float
    background_hue: float  # degrees
    background_saturation: float
    texture_period: float  # stripes period / dot spacing (px at 64 px); 0 for plain and checker
    texture_contrast: float  # value added (stripes) or subtracted (dots, checker dark tiles)
    stripe_orientation: str  # one of STRIPE_ORIENTATIONS for stripes, "" otherwise

    def named(self) -> dict[str, str | int]:
        """The attributes captions name: count, size, colour, shape, position."""
        return {name: getattr(self, name) for name in NAMED_ATTRIBUTES}

    def combination(self) -> tuple[str, str, str, str, int]:
        """(shape, colour, size, position, count), the key of HELD_OUT_COMBINATIONS."""
        return (self.shape, self.colour, self.size, self.position, self.count)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def all_combinations() -> list[tuple[str, str, str, str, int]]:
    """Every (shape, colour, size, position, count): 3 * 4 * 2 * 5 * 3 = 360."""
    return list(product(SHAPES, COLOURS, SIZES, POSITIONS, COUNTS))


def held_out_combinations() -> frozenset[tuple[str, str, str, str, int]]:
    """The fixed 10% of combinations kept out of training (drawn from HELD_OUT_SEED)."""
    combinations = all_combinations()
    rng = np.random.default_rng(HELD_OUT_SEED)
    chosen = rng.choice(len(combinations), size=round(HELD_OUT_FRACTION * len(combinations)), replace=False)
    return frozenset(combinations[int(i)] for i in sorted(chosen))


def _pick(rng: np.random.Generator, options: tuple) -> object:
    return options[int(rng.integers(len(options)))]


def sample_scene(
    rng: np.random.Generator,
    *,
    split: Split = "train",
    background: str | None = None,
    held_out: frozenset[tuple[str, str, str, str, int]] | None = None,
    unnamed_hue: float | None = None,
) -> Scene:
    """Draw one scene. split "train" excludes HELD_OUT_COMBINATIONS, "held_out" draws only from them,
    "all" from every combination. background forces a texture; unnamed_hue forces an unnamed colour
    at that hue (+- HUE_JITTER degrees), e.g. CONCEPT_HUE."""
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    if background is not None and background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    held_out = held_out_combinations() if held_out is None and split != "all" else held_out
    if split == "held_out":
        pool = sorted(held_out)
    elif split == "train":
        pool = [c for c in all_combinations() if c not in held_out]
    else:
        pool = all_combinations()
    shape, colour, size, position, count = pool[int(rng.integers(len(pool)))]
    unnamed = rng.random() < UNNAMED_COLOUR_PROBABILITY
    if unnamed_hue is not None:
        hue = unnamed_hue + rng.uniform(-HUE_JITTER, HUE_JITTER)
    elif unnamed:
        hue = rng.uniform(0.0, 360.0)
    else:
        hue = COLOUR_HUES[colour] + rng.uniform(-HUE_JITTER, HUE_JITTER)
    if unnamed or unnamed_hue is not None:
        colour = UNNAMED_COLOUR
    low, high = SIZE_RANGES[size]
    kinds = list(BACKGROUND_WEIGHTS)
    drawn_background = kinds[int(rng.choice(len(kinds), p=list(BACKGROUND_WEIGHTS.values())))]
    background = drawn_background if background is None else background
    period = contrast = 0.0
    orientation = ""
    if background == "stripes":
        period, contrast = rng.uniform(5.0, 9.0), rng.uniform(0.08, 0.12)
        orientation = str(_pick(rng, STRIPE_ORIENTATIONS))
    elif background == "dots":
        period, contrast = rng.uniform(6.0, 9.0), rng.uniform(0.12, 0.18)
    elif background == "checker":
        contrast = rng.uniform(*CHECKER_DARKENING)
    return Scene(
        shape=shape,
        colour=colour,
        size=size,
        position=position,
        count=int(count),
        hue=hue % 360.0,
        saturation=rng.uniform(0.7, 0.95),
        value=rng.uniform(0.8, 0.95),
        object_size=rng.uniform(low, high),
        gap=rng.uniform(*GAP_RANGE),
        offset_x=rng.uniform(-PLACEMENT_JITTER, PLACEMENT_JITTER),
        offset_y=rng.uniform(-PLACEMENT_JITTER, PLACEMENT_JITTER),
        background=background,
        background_value=rng.uniform(0.6, 0.88),
        background_hue=rng.uniform(0.0, 360.0),
        background_saturation=rng.uniform(0.0, 0.12),
        texture_period=float(period),
        texture_contrast=float(contrast),
        stripe_orientation=orientation,
    )


def sample_scenes(
    seed: int, n: int, *, split: Split = "train", background: str | None = None, unnamed_hue: float | None = None
) -> list[Scene]:
    """n scenes from np.random.default_rng(seed): the same list for the same arguments, everywhere."""
    rng = np.random.default_rng(seed)
    held_out = held_out_combinations()
    return [
        sample_scene(rng, split=split, background=background, held_out=held_out, unnamed_hue=unnamed_hue)
        for _ in range(n)
    ]


def concept_scenes(seed: int, n: int = 5) -> list[Scene]:
    """n training-split scenes whose objects have the unnamed concept's colour (CONCEPT_HUE)."""
    return sample_scenes(seed, n, split="train", unnamed_hue=CONCEPT_HUE)


def concept_examples(
    seed: int, n: int = 5, size: int = REFERENCE_SIZE, *, colour_word: str = UNNAMED_COLOUR
) -> tuple[np.ndarray, list[str]]:
    """Textual-inversion material: n renders of the unnamed concept, (n, size, size, 3) uint8, and their
    canonical captions with `colour_word` where a colour word stands (by default none: no caption names
    the concept; "[name]" puts a textual-inversion placeholder there)."""
    scenes = concept_scenes(seed, n)
    captions = [canonical_caption({**scene.named(), "colour": colour_word}) for scene in scenes]
    return np.stack([render(scene, size) for scene in scenes]), captions


def colour_blend(hue: float) -> tuple[tuple[str, float], tuple[str, float]]:
    """The two named colours on either side of `hue` around the circle and their linear weights:
    290 degrees -> (("blue", 0.52), ("red", 0.48)). Weights sum to 1; a named hue gets weight 1."""
    ordered = sorted(COLOUR_HUES.items(), key=lambda item: item[1])  # red 0, yellow 55, green 120, blue 225
    first_name, first_hue = ordered[0]
    hue = (hue - first_hue) % 360.0 + first_hue
    for (low_name, low), (high_name, high) in zip(ordered, [*ordered[1:], (first_name, first_hue + 360.0)]):
        if low <= hue < high:
            weight_high = (hue - low) / (high - low)
            return (low_name, 1.0 - weight_high), (high_name, weight_high)
    raise AssertionError(f"hue {hue} falls between no two named colours")


# Captions --------------------------------------------------------------------------------------------


def noun_phrase(scene_or_attributes: Scene | dict[str, str | int], *, count_word: str | None = None,
                with_size: bool = True) -> str:
    """"two large red circles" (count, size, colour, shape; plural shape for counts above one)."""
    attributes = scene_or_attributes.named() if isinstance(scene_or_attributes, Scene) else scene_or_attributes
    count = int(attributes["count"])
    word = count_word if count_word is not None else COUNT_WORDS[count]
    shape = str(attributes["shape"]) + ("s" if count > 1 else "")
    parts = [word, str(attributes["size"]) if with_size else "", str(attributes["colour"]), shape]
    return " ".join(part for part in parts if part)


def canonical_caption(attributes: Scene | dict[str, str | int]) -> str:
    """Template 0 with every attribute: "two large red circles on the left"."""
    named = attributes.named() if isinstance(attributes, Scene) else attributes
    return f"{noun_phrase(named)} {POSITION_PHRASES[str(named['position'])]}"


def background_phrase(scene: Scene, rng: np.random.Generator) -> str:
    """"striped background": the specific word, or "patterned" (GENERIC_WORD_PROBABILITY; always for
    the checkerboard, which has no specific word)."""
    words = BACKGROUND_WORDS[scene.background]
    generic = len(words) == 1 or rng.random() < GENERIC_WORD_PROBABILITY
    return f"{words[-1] if generic else words[0]} background"


def caption(
    scene: Scene, rng: np.random.Generator | None = None, *, omit_probability: float = 0.0,
    background_probability: float = 0.0,
) -> str:
    """A caption naming only the scene's named attributes.

    rng None gives the canonical caption. With an rng the phrasing is one of CAPTION_TEMPLATES, count one
    is "a" or "one", size and position are each left out with probability omit_probability, and
    ", <word> background" is appended with probability background_probability (the same for every
    background, see background_phrase).
    """
    if rng is None:
        return canonical_caption(scene)
    template = int(rng.integers(CAPTION_TEMPLATES))
    count_word = ("a" if rng.random() < 0.5 else "one") if scene.count == 1 else None
    with_size = not rng.random() < omit_probability
    with_position = not rng.random() < omit_probability
    where = POSITION_PHRASES[scene.position] if with_position else ""
    if template == 0:
        text = f"{noun_phrase(scene, count_word=count_word, with_size=with_size)} {where}"
    elif template == 1:
        text = noun_phrase(scene, count_word=count_word, with_size=False)
        text += f", {scene.size}" if with_size else ""
        text += f", {where}" if where else ""
    else:
        text = f"{where}, " if where else ""
        text += noun_phrase(scene, count_word=count_word, with_size=with_size)
    text = text.strip()
    if rng.random() < background_probability:
        text += f", {background_phrase(scene, rng)}"
    return text


# Rendering -------------------------------------------------------------------------------------------


def object_centres(scene: Scene, size: int = REFERENCE_SIZE) -> list[tuple[float, float]]:
    """(x, y) centre of each object's bounding box, in px of a `size` image (y grows downwards)."""
    scale = size / REFERENCE_SIZE
    (anchor_x, anchor_y), axis = POSITION_ANCHORS[scene.position]
    side = scene.object_size
    gap = scene.gap
    extent = scene.count * side + (scene.count - 1) * gap
    limit = REFERENCE_SIZE - 2 * BORDER
    if extent > limit:  # shrink the gaps so three large objects fit across the image
        gap = max((limit - scene.count * side) / max(scene.count - 1, 1), 0.0)
        extent = scene.count * side + (scene.count - 1) * gap
    centre_x, centre_y = anchor_x + scene.offset_x, anchor_y + scene.offset_y
    half_along, half_across = extent / 2, side / 2
    half_x, half_y = (half_across, half_along) if axis == "vertical" else (half_along, half_across)
    centre_x = float(np.clip(centre_x, BORDER + half_x, REFERENCE_SIZE - BORDER - half_x))
    centre_y = float(np.clip(centre_y, BORDER + half_y, REFERENCE_SIZE - BORDER - half_y))
    centres = []
    for k in range(scene.count):
        along = -extent / 2 + side / 2 + k * (side + gap)
        x, y = (centre_x, centre_y + along) if axis == "vertical" else (centre_x + along, centre_y)
        centres.append((x * scale, y * scale))
    return centres


def _shape_mask(shape: str, cx: float, cy: float, side: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of one object on sample points xs, ys (px, broadcastable)."""
    half = side / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    # upright isosceles triangle: apex at the top centre, base along the bottom of the box
    depth = ys - (cy - half)  # 0 at the apex, side at the base
    return (depth >= 0) & (ys <= cy + half) & (np.abs(xs - cx) <= depth / 2)


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue % 360.0) / 360.0, saturation, value), dtype=np.float64)


def _background(scene: Scene, size: int) -> np.ndarray:
    """(size, size, 3) float background in [0, 1]: a faintly tinted grey with the scene's texture."""
    scale = size / REFERENCE_SIZE
    centres = (np.arange(size, dtype=np.float64) + 0.5) / scale  # pixel centres in 64 px units
    ys, xs = np.meshgrid(centres, centres, indexing="ij")  # (size, size) each
    value = np.full((size, size), scene.background_value)
    if scene.background == "stripes":
        coordinate = {"horizontal": ys, "vertical": xs, "diagonal": (xs + ys) / np.sqrt(2.0)}[scene.stripe_orientation]
        value += np.where((coordinate / scene.texture_period) % 1.0 < 0.5, scene.texture_contrast, 0.0)
    elif scene.background == "dots":
        period = scene.texture_period
        dx = (xs % period) - period / 2
        dy = (ys % period) - period / 2
        value -= np.where(dx**2 + dy**2 <= 1.5**2, scene.texture_contrast, 0.0)
    elif scene.background == "checker":
        dark = (np.floor(xs / CHECKER_TILE) + np.floor(ys / CHECKER_TILE)) % 2 == 1
        value -= np.where(dark, scene.texture_contrast, 0.0)
    tint = _hsv_to_rgb(scene.background_hue, scene.background_saturation, 1.0)  # (3,)
    return np.clip(value[..., None] * tint, 0.0, 1.0)  # (size, size, 3)


def render_float(scene: Scene, size: int = REFERENCE_SIZE) -> np.ndarray:
    """The scene as a (size, size, 3) float64 image in [0, 1]."""
    if size < 16:
        raise ValueError(f"image size must be at least 16 px, got {size}")
    scale = size / REFERENCE_SIZE
    image = _background(scene, size)
    # coverage of each pixel by the objects, from SUPERSAMPLING^2 samples per pixel
    fine = size * SUPERSAMPLING
    points = (np.arange(fine, dtype=np.float64) + 0.5) / SUPERSAMPLING  # sample positions, px
    ys, xs = points[:, None], points[None, :]
    mask = np.zeros((fine, fine), dtype=bool)
    for cx, cy in object_centres(scene, size):
        mask |= _shape_mask(scene.shape, cx, cy, scene.object_size * scale, xs, ys)
    coverage = mask.reshape(size, SUPERSAMPLING, size, SUPERSAMPLING).mean(axis=(1, 3))  # (size, size)
    colour = _hsv_to_rgb(scene.hue, scene.saturation, scene.value)  # (3,)
    return image * (1.0 - coverage[..., None]) + colour * coverage[..., None]


def render(scene: Scene, size: int = REFERENCE_SIZE) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 RGB image (PIL.Image.fromarray takes it as is)."""
    return np.round(render_float(scene, size) * 255.0).astype(np.uint8)


def render_batch(scenes: list[Scene], size: int = REFERENCE_SIZE) -> np.ndarray:
    """(N, size, size, 3) uint8 images of `scenes`."""
    return np.stack([render(scene, size) for scene in scenes])
