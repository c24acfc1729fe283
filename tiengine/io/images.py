"""Image conversions and grids: decoded tensors in [-1, 1] <-> PIL images, labelled comparison grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


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


def labelled_grid(columns: Sequence[tuple[str, Sequence[Image.Image]]], *, margin: int = 4) -> Image.Image:
    """One image per cell, one labelled column per entry (e.g. one column per sampler), rows aligned."""
    if not columns:
        raise ValueError("a grid needs at least one column")
    cell_width = max(image.width for _, images in columns for image in images)
    cell_height = max(image.height for _, images in columns for image in images)
    rows = max(len(images) for _, images in columns)
    font = ImageFont.load_default()
    label_height = 16
    grid = Image.new(
        "RGB",
        (len(columns) * (cell_width + margin) + margin, label_height + rows * (cell_height + margin) + margin),
        "white",
    )
    draw = ImageDraw.Draw(grid)
    for column, (label, images) in enumerate(columns):
        left = margin + column * (cell_width + margin)
        text = _fit_label(draw, label, font, cell_width)
        draw.text((left, 2), text, fill="black", font=font)
        for row, image in enumerate(images):
            grid.paste(image, (left, label_height + margin + row * (cell_height + margin)))
    return grid


def _fit_label(draw: ImageDraw.ImageDraw, label: str, font, width: int) -> str:
    text = label
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text if text == label else text[:-1] + "…"
