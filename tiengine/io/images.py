"""Image conversions and grids: decoded tensors in [-1, 1] <-> PIL images, labelled comparison grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from tiengine.io.fonts import label_font


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B RGB images (rounded to the nearest of 256 levels)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected decoded images (B, 3, H, W), got {tuple(images.shape)}")
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(frame, mode="RGB") for frame in array]


def pil_to_tensor(image: Image.Image, *, width: int | None = None, height: int | None = None) -> torch.Tensor:
    """An image -> (1, 3, H, W) float32 in [-1, 1], converted to RGB and resized (Lanczos) if asked."""
    image = image.convert("RGB")
    if width is not None and height is not None and image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def labelled_grid(
    columns: Sequence[tuple[str, Sequence[Image.Image]]],
    *,
    margin: int = 4,
    row_labels: Sequence[str] | None = None,
    font_size: int = 13,
) -> Image.Image:
    """One image per cell, one labelled column per entry (e.g. one column per sampler), rows aligned.

    `row_labels`: a label per row, drawn left of the row (wrapped at word boundaries into a column about
    two cells wide). Labels use the scalable default font (`tiengine.io.fonts`), so spaces stay visible.
    """
    if not columns:
        raise ValueError("a grid needs at least one column")
    cell_width = max(image.width for _, images in columns for image in images)
    cell_height = max(image.height for _, images in columns for image in images)
    rows = max(len(images) for _, images in columns)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for a grid of {rows} rows")
    font = label_font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = _line_height(measure, font)
    label_height = line_height + 4
    label_width = 0
    wrapped: list[list[str]] = []
    if row_labels:
        room = max(2 * cell_width, 8 * font_size)
        wrapped = [_wrap(measure, label, font, room) for label in row_labels]
        label_width = int(max(measure.textlength(line, font=font) for lines in wrapped for line in lines)) + 2 * margin
    grid = Image.new(
        "RGB",
        (label_width + len(columns) * (cell_width + margin) + margin,
         label_height + rows * (cell_height + margin) + margin),
        "white",
    )
    draw = ImageDraw.Draw(grid)
    for column, (label, images) in enumerate(columns):
        left = label_width + margin + column * (cell_width + margin)
        text = _fit_label(draw, label, font, cell_width)
        draw.text((left, 2), text, fill="black", font=font)
        for row, image in enumerate(images):
            grid.paste(image, (left, label_height + margin + row * (cell_height + margin)))
    for row, lines in enumerate(wrapped):
        top = label_height + margin + row * (cell_height + margin) + (cell_height - len(lines) * line_height) // 2
        for number, line in enumerate(lines):
            draw.text((margin, top + number * line_height), line, fill="black", font=font)
    return grid


def _line_height(draw: ImageDraw.ImageDraw, font) -> int:
    left, top, right, bottom = draw.textbbox((0, 0), "Ag", font=font)
    return bottom + 2


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """`text` split at spaces into lines no wider than `width` (a longer word is cut with "…")."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
        else:
            lines.append(_fit_label(draw, word, font, width))
    return lines or [""]


def _fit_label(draw: ImageDraw.ImageDraw, label: str, font, width: int) -> str:
    text = label
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text if text == label else text[:-1] + "…"
