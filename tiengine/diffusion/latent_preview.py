"""Live previews of sampling: a linear map from a latent pixel's channels to an RGB colour, fitted to the
model's own VAE.

A1111's "Approx cheap" live preview multiplies each latent pixel's channels by a fixed matrix found by hand
for SD1's VAE, so a preview costs next to nothing while the UNet runs. tiengine finds that matrix (plus an
offset) for whichever VAE the model has, SD1/SD2, SDXL or the built-in model's: `fit_latent_preview`
encodes a test card of flat colour tiles (`colour_card`) and solves least squares between the latent pixels
well inside each tile (away from the encoder's view of the tile's edges) and the tile's colour.
The fit runs once per model, on the thread that owns the VAE; a preview is then one small matmul.

Shapes: latents (B, C, h, w) in the UNet's scale (the VAE's scaling_factor applied, as the sampler sees
them); colours in [-1, 1]; a preview is h x w pixels (one per latent pixel, 64 x 64 for 512 x 512).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from tiengine.io.images import tensor_to_pil

CARD_TILES = 6  # tiles per side of the test card: 36 colours
TILE_LATENT_PIXELS = 4  # latent pixels per tile side; the inner 2 x 2 of each tile are fitted
CARD_SEED = 0  # the tile colours: uniform in [-1, 1]^3 from a generator with this seed


@dataclass(frozen=True)
class LatentPreview:
    """rgb = [channels, 1] @ weight, clamped to [-1, 1]. weight: (C + 1, 3) float32 on the CPU.
    rms_error: the fit's root-mean-square error on the test card, in [-1, 1] units."""

    weight: torch.Tensor
    rms_error: float

    @property
    def channels(self) -> int:
        return self.weight.shape[0] - 1

    def colours(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, h, w) -> colours (B, 3, h, w) in [-1, 1] (float32, CPU)."""
        if latents.ndim != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"expected latents (B, {self.channels}, h, w), got {tuple(latents.shape)}")
        x = latents.detach().to("cpu", torch.float32)
        rgb = torch.einsum("bchw,cr->brhw", x, self.weight[:-1]) + self.weight[-1].view(1, 3, 1, 1)
        return rgb.clamp(-1.0, 1.0)

    def image(self, latents: torch.Tensor) -> Image.Image:
        """The first latent of the batch as an h x w RGB preview."""
        return tensor_to_pil(self.colours(latents[:1]))[0]


def colour_card(downscale_factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The card (1, 3, S, S) in [-1, 1], S = CARD_TILES * TILE_LATENT_PIXELS * factor, and its tile colours
    (CARD_TILES, CARD_TILES, 3), row-major."""
    generator = torch.Generator().manual_seed(CARD_SEED)
    colours = torch.rand(CARD_TILES, CARD_TILES, 3, generator=generator) * 2 - 1
    tile = TILE_LATENT_PIXELS * downscale_factor
    card = colours.permute(2, 0, 1).repeat_interleave(tile, dim=1).repeat_interleave(tile, dim=2)
    return card.unsqueeze(0), colours


def fit_latent_preview(encode: Callable[[torch.Tensor], torch.Tensor], downscale_factor: int) -> LatentPreview:
    """Fit the map to `encode`: images (1, 3, S, S) in [-1, 1] -> UNet-scale latents (1, C, S/f, S/f), f the
    VAE's downscale factor (the caller moves the card to the VAE's device and dtype)."""
    card, colours = colour_card(downscale_factor)
    latents = encode(card).detach().to("cpu", torch.float64)  # (1, C, h, w)
    side = CARD_TILES * TILE_LATENT_PIXELS
    if latents.ndim != 4 or latents.shape[0] != 1 or tuple(latents.shape[2:]) != (side, side):
        raise ValueError(f"the VAE encoded the {tuple(card.shape)} test card to {tuple(latents.shape)}; expected "
                         f"(1, C, {side}, {side})")
    inner = slice(1, TILE_LATENT_PIXELS - 1)  # the latent pixels of a tile that see only its colour
    by_tile = latents[0].unflatten(1, (CARD_TILES, TILE_LATENT_PIXELS)).unflatten(3, (CARD_TILES, TILE_LATENT_PIXELS))
    samples = by_tile[:, :, inner, :, inner].permute(1, 3, 2, 4, 0).reshape(-1, latents.shape[1])  # (N, C)
    per_tile = samples.shape[0] // CARD_TILES**2
    targets = colours.to(torch.float64).reshape(-1, 1, 3).expand(-1, per_tile, -1).reshape(-1, 3)  # (N, 3)
    design = torch.cat([samples, torch.ones(samples.shape[0], 1, dtype=torch.float64)], dim=1)  # (N, C + 1)
    if not torch.isfinite(samples).all():
        raise ValueError("the VAE encoded the live-preview test card to NaN or inf latents")
    weight = torch.linalg.lstsq(design, targets).solution  # (C + 1, 3)
    rms_error = (design @ weight - targets).pow(2).mean().sqrt().item()
    return LatentPreview(weight.to(torch.float32), rms_error)
