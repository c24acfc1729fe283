"""Textual-inversion training inputs: image folders with captions, prompt templates, learning-rate schedules.

Images (tiengine.training.textual_inversion reads them once and caches their latents):
- A folder is scanned non-recursively, files sorted by name. Files whose extension Pillow registers as
  an image format are training images; everything else (captions, notes) is left alone. A file with an
  image extension that Pillow cannot decode is an error naming it, never silently dropped.
- Each image is converted to RGB, scaled so that its shorter side equals the training resolution
  (Lanczos) and centre-cropped to a square. With `keep_alpha`, an RGBA image's alpha channel is kept,
  cropped the same way, as a loss weight map.
- Captions (`[filewords]`): the UTF-8 text of `<stem>.txt` beside the image; without one, the file stem
  with leading digits and dashes removed (AUTOMATIC1111's dataset rule, so `03-red-fox.png` gives
  "red-fox").

Templates: one prompt per line, `[name]` replaced by the embedding name and `[filewords]` by the
caption (AUTOMATIC1111's placeholders). Built-in sets `object`, `style`, `object-filewords` and
`style-filewords` are short lists in the spirit of A1111's `subject.txt` / `style.txt` (which come from
the original textual-inversion paper's prompt lists); a file gives one template per non-blank line.
Every line must contain `[name]` or `[filewords]`: a prompt without the name gives the embedding no
gradient. `[filewords]` is filled first, so a caption may carry the `[name]` itself ("three small [name]
triangles on the left" puts the embedding where a word would stand); a template line without `[name]`
then needs that in every caption (tiengine.training.run checks it per image).

Learning-rate schedules use A1111's syntax `"0.005:100, 1e-3:1000, 1e-5"`: rate 0.005 for steps 0..99
(0-based), 1e-3 up to step 999, then 1e-5 to the end; `rate:-1` also means "to the end". As in A1111,
a schedule whose last entry has a step bound ends training at that step.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tiengine.errors import TiengineError

NAME_PLACEHOLDER = "[name]"
FILEWORDS_PLACEHOLDER = "[filewords]"
CAPTION_SUFFIX = ".txt"
# A1111 dataset.py: leading digits and dashes of a file stem are an ordering prefix, not words.
_ORDERING_PREFIX = re.compile(r"^[-\d]+\s*")

BUILTIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": (
        "a photo of a [name]",
        "a picture of the [name]",
        "a close-up photo of a [name]",
        "a cropped photo of the [name]",
        "a bright photo of a [name]",
        "a dark photo of the [name]",
        "a good photo of a [name]",
        "an image of one [name]",
        "a rendering of a [name]",
        "a photo of a small [name]",
        "a photo of a large [name]",
        "a clean photo of the [name]",
    ),
    "style": (
        "a painting in the style of [name]",
        "an image, art by [name]",
        "a picture in the style of [name]",
        "a rendering, art by [name]",
        "a close-up painting in the style of [name]",
        "a bright painting, art by [name]",
        "a dark painting in the style of [name]",
        "a small picture, art by [name]",
        "a large picture in the style of [name]",
        "artwork in the style of [name]",
    ),
    "object-filewords": (
        "a photo of a [name], [filewords]",
        "a picture of the [name], [filewords]",
        "a close-up photo of a [name], [filewords]",
        "a cropped photo of the [name], [filewords]",
        "a good photo of a [name], [filewords]",
        "a rendering of a [name], [filewords]",
    ),
    "style-filewords": (
        "a painting of [filewords], art by [name]",
        "a picture of [filewords] in the style of [name]",
        "a rendering of [filewords], art by [name]",
        "an image of [filewords], art by [name]",
        "a close-up painting of [filewords] in the style of [name]",
    ),
}


class TrainingError(TiengineError):
    """Bad training input (images, name, template, schedule, settings) or a run that cannot continue."""


@dataclass(frozen=True)
class TrainingImage:
    """One training image, ready for the VAE: pixels (3, S, S) in [-1, 1], optional alpha (S, S) in [0, 1]."""

    path: Path
    pixels: torch.Tensor
    alpha: torch.Tensor | None
    caption: str
    caption_from_file: bool
    sha256: str


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions Pillow can open (".png", ".jpg", ".webp", ...)."""
    from PIL import Image

    return frozenset(ext.lower() for ext in Image.registered_extensions())


def find_images(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The training image files of a folder (sorted, non-recursive), or the given list of files."""
    extensions = image_extensions()
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise TrainingError(f"{folder}: not a folder of training images")
        paths = sorted(
            path for path in folder.iterdir()
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in extensions
        )
        if not paths:
            found = sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))
            shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "")
            raise TrainingError(
                f"{folder}: no training images (expected image files such as .png/.jpg/.webp; found "
                f"{shown or 'nothing'})"
            )
        return paths
    paths = [Path(path) for path in source]
    if not paths:
        raise TrainingError("no training images given")
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise TrainingError(f"training image(s) not found: {', '.join(missing)}")
    return paths


def caption_for(path: Path) -> tuple[str, bool]:
    """(caption, read from a .txt file) for an image: `<stem>.txt` beside it, else the cleaned stem."""
    caption_path = path.with_suffix(CAPTION_SUFFIX)
    if caption_path.is_file():
        try:
            return caption_path.read_text(encoding="utf-8").strip(), True
        except (OSError, UnicodeDecodeError) as error:
            raise TrainingError(f"{caption_path}: cannot read the caption as UTF-8 text ({error})") from None
    return _ORDERING_PREFIX.sub("", path.stem), False


def load_image(path: Path, resolution: int, *, keep_alpha: bool) -> TrainingImage:
    """Read, square-crop and resize one image (see the module docstring)."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
    except OSError as error:
        raise TrainingError(f"{path}: cannot read the image ({error.strerror})") from None
    try:
        import io

        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            has_alpha = "A" in opened.getbands() or "transparency" in opened.info
            image = opened.convert("RGBA" if keep_alpha and has_alpha else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise TrainingError(f"{path}: not a readable image ({error})") from None
    width, height = image.size
    scale = resolution / min(width, height)
    scaled = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if scaled != image.size:
        image = image.resize(scaled, Image.LANCZOS)
    left, top = (scaled[0] - resolution) // 2, (scaled[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32)  # (S, S, 3 or 4)
    pixels = torch.from_numpy(array[..., :3] / 127.5 - 1.0).permute(2, 0, 1).contiguous()  # (3, S, S)
    alpha = torch.from_numpy(array[..., 3] / 255.0).contiguous() if array.shape[-1] == 4 else None  # (S, S)
    caption, from_file = caption_for(path)
    return TrainingImage(path, pixels, alpha, caption, from_file, hashlib.sha256(data).hexdigest())


def load_templates(template: str | os.PathLike[str]) -> tuple[str, ...]:
    """Prompt templates: a built-in set name or a text file with one template per line."""
    if isinstance(template, str) and template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template]
    path = Path(template)
    if not path.is_file():
        raise TrainingError(
            f"template {str(template)!r}: neither a built-in set ({', '.join(BUILTIN_TEMPLATES)}) nor a file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TrainingError(f"{path}: cannot read the template file as UTF-8 text ({error})") from None
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if NAME_PLACEHOLDER not in line and FILEWORDS_PLACEHOLDER not in line:
            raise TrainingError(
                f"{path}:{number}: template {line!r} has neither {NAME_PLACEHOLDER} nor {FILEWORDS_PLACEHOLDER} "
                "(the embedding would get no gradient from it)"
            )
        lines.append(line)
    if not lines:
        raise TrainingError(f"{path}: the template file holds no templates (one per line, each with "
                            f"{NAME_PLACEHOLDER} or {FILEWORDS_PLACEHOLDER})")
    return tuple(lines)


def fill_template(template: str, name: str, filewords: str) -> str:
    """A training prompt: `[filewords]` -> the caption, `[name]` -> the embedding name (A1111's order)."""
    return template.replace(FILEWORDS_PLACEHOLDER, filewords).replace(NAME_PLACEHOLDER, name)


@dataclass(frozen=True)
class LearningRateSchedule:
    """Piecewise-constant rates: entries (rate, end step or None for "to the end"), A1111 syntax."""

    entries: tuple[tuple[float, int | None], ...]
    text: str

    @classmethod
    def parse(cls, text: str | float) -> LearningRateSchedule:
        """Parse `"0.005:100, 1e-3:1000, 1e-5"` (or a single number)."""
        source = str(text)
        entries: list[tuple[float, int | None]] = []
        parts = [part.strip() for part in source.split(",")]
        for index, part in enumerate(parts):
            rate_text, _, end_text = part.partition(":")
            try:
                rate = float(rate_text)
            except ValueError:
                raise TrainingError(
                    f"learning rate {source!r}: {rate_text.strip()!r} is not a number (expected e.g. "
                    "'0.005:100, 1e-3:1000, 1e-5')"
                ) from None
            if not math.isfinite(rate) or rate <= 0:
                raise TrainingError(f"learning rate {source!r}: rates must be positive, found {rate_text.strip()}")
            end: int | None = None
            if end_text.strip():
                try:
                    end = int(end_text)
                except ValueError:
                    raise TrainingError(
                        f"learning rate {source!r}: {end_text.strip()!r} is not a step number"
                    ) from None
                if end == -1:
                    end = None
                elif end < 1:
                    raise TrainingError(f"learning rate {source!r}: step bounds must be >= 1 (or -1), found {end}")
            if entries and entries[-1][1] is None:
                raise TrainingError(f"learning rate {source!r}: nothing may follow an entry without a step bound")
            if end is not None and entries and end <= entries[-1][1]:
                raise TrainingError(f"learning rate {source!r}: step bounds must increase, found {end} after "
                                    f"{entries[-1][1]}")
            entries.append((rate, end))
        return cls(tuple(entries), source)

    def rate_at(self, step: int) -> float | None:
        """The rate of 0-based step `step`, or None once the schedule has ended."""
        for rate, end in self.entries:
            if end is None or step < end:
                return rate
        return None

    def last_step(self, steps: int) -> int:
        """How many steps a run of `steps` trains: `steps`, or fewer when the schedule ends earlier."""
        end = self.entries[-1][1]
        return steps if end is None else min(steps, end)
