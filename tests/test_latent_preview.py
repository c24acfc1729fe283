"""Live previews (tiengine.diffusion.latent_preview): the least-squares fit of latent pixels to colours, the
engine's fitted-once map, and /progress's current_image built from it."""

from __future__ import annotations

import base64
import io

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tiengine.diffusion.latent_preview import CARD_TILES, TILE_LATENT_PIXELS, fit_latent_preview, colour_card
from tiengine.engine import Engine

FACTOR = 8
# an invertible affine "VAE": latent = A @ pooled colour + b, 4 channels from 3 colours (full column rank)
MIXING = torch.tensor([[0.9, -0.2, 0.4], [0.1, 0.8, -0.5], [-0.3, 0.3, 0.7], [0.5, 0.5, 0.5]], dtype=torch.float64)
OFFSET = torch.tensor([0.2, -0.1, 0.05, 0.3], dtype=torch.float64)


def affine_encode(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 4, H/8, W/8): each latent pixel an affine function of its 8x8 block's mean colour."""
    pooled = F.avg_pool2d(images.double(), FACTOR)
    return torch.einsum("cr,brhw->bchw", MIXING, pooled) + OFFSET.view(1, 4, 1, 1)


def test_the_test_card_is_flat_tiles_of_its_colours():
    card, colours = colour_card(FACTOR)
    side = CARD_TILES * TILE_LATENT_PIXELS * FACTOR
    assert card.shape == (1, 3, side, side) and colours.shape == (CARD_TILES, CARD_TILES, 3)
    assert card.min() >= -1 and card.max() <= 1
    tile = TILE_LATENT_PIXELS * FACTOR
    assert torch.equal(card[0, :, 2 * tile + 5, 3 * tile + 7], colours[2, 3])  # row 2, column 3


def test_an_affine_vae_is_recovered_exactly_and_previews_any_image():
    preview = fit_latent_preview(affine_encode, FACTOR)
    assert preview.weight.shape == (5, 3) and preview.rms_error < 1e-6
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 64, 96, generator=generator) * 1.6 - 0.8  # not the card: a fresh image
    colours = preview.colours(affine_encode(image).float())
    assert colours.shape == (1, 3, 8, 12)
    assert (colours.double() - F.avg_pool2d(image.double(), FACTOR)).abs().max() < 1e-5
    shown = preview.image(affine_encode(image).float().repeat(2, 1, 1, 1))  # the batch's first image
    assert shown.size == (12, 8) and shown.mode == "RGB"
    with pytest.raises(ValueError, match=r"expected latents \(B, 4, h, w\), got \(1, 3, 8, 12\)"):
        preview.colours(torch.zeros(1, 3, 8, 12))


def test_a_vae_that_answers_nan_or_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="NaN or inf latents"):
        fit_latent_preview(lambda images: affine_encode(images) * float("nan"), FACTOR)
    with pytest.raises(ValueError, match=r"expected \(1, C, 24, 24\)"):
        fit_latent_preview(lambda images: affine_encode(images)[..., :-1], FACTOR)


def test_the_engine_fits_its_vae_once(sd1_folder):
    engine = Engine.load(sd1_folder, embeddings=False)
    assert engine.latent_preview(fit=False) is None  # not fitted before it is asked for
    preview = engine.latent_preview()
    assert preview is engine.latent_preview() and preview is engine.latent_preview(fit=False)
    vae = engine.modules["vae"]
    assert preview.channels == vae.config.latent_channels and torch.isfinite(preview.weight).all()
    card, _ = colour_card(vae.downscale_factor)
    with torch.no_grad():
        latents = vae.latents_from_images(card, generator=None)
    refit = fit_latent_preview(lambda images: latents, vae.downscale_factor)
    assert torch.equal(refit.weight, preview.weight)  # the engine fits the VAE's own mean latents of the card


def test_progress_shows_the_running_jobs_latest_prediction():
    from tiengine.serve.a1111 import progress_response
    from tiengine.serve.worker import Job

    preview = fit_latent_preview(affine_encode, FACTOR)
    job = Job("txt2img", lambda control: None)
    assert progress_response(job, preview).current_image is None  # no step yet
    denoised = affine_encode(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))).float()
    job.control.step(0, 10, torch.zeros_like(denoised), denoised)
    answer = progress_response(job, preview)
    png = base64.b64decode(answer.current_image)
    assert Image.open(io.BytesIO(png)).tobytes() == preview.image(denoised).tobytes()
    assert progress_response(job, None).current_image is None  # skip_current_image / previews off
