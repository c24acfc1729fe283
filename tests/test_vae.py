"""AutoencoderKL against diffusers' AutoencoderKL on the same random weights, plus scaling, sampling,
attention chunking and tiled decoding.

Tolerance: fp32 outputs agree within 1e-4 * max|reference| (summation order only; measured ~1e-6).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tiengine.errors import TiengineError
from tiengine.models.vae import AutoencoderKL, LatentDistribution, VaeConfig, blend_tiles

diffusers = pytest.importorskip("diffusers")

FP32_RELATIVE_TOLERANCE = 1e-4


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter with seeded uniform values: fan-in scaled weights, norms near 1, small biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                bound = math.sqrt(3.0 / param[0].numel())  # unit variance after the layer
                param.uniform_(-bound, bound, generator=generator)
            elif name.endswith("weight"):  # GroupNorm scale
                param.uniform_(0.8, 1.2, generator=generator)
            else:
                param.uniform_(-0.2, 0.2, generator=generator)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, AutoencoderKL]:
    config = VaeConfig.tiny()
    reference = diffusers.AutoencoderKL(**config.to_diffusers()).eval()
    randomize_(reference, seed=1)
    ours = AutoencoderKL(config).eval()
    assert set(ours.state_dict()) == set(reference.state_dict())
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


@pytest.mark.parametrize("channels_last", [True, False])
def test_encode_matches_diffusers(pair, channels_last: bool) -> None:
    reference, ours = pair
    ours.channels_last = channels_last
    x = images(2, 32, 24, seed=2)
    with torch.no_grad():
        expected = reference.encode(x).latent_dist
        got = ours.encode(x)
    assert got.mean.shape == (2, 4, 8, 6)
    assert relative_error(got.mean, expected.mean) <= FP32_RELATIVE_TOLERANCE
    assert relative_error(got.logvar, expected.logvar) <= FP32_RELATIVE_TOLERANCE
    assert relative_error(got.std, expected.std) <= FP32_RELATIVE_TOLERANCE
    drawn = got.sample(torch.Generator().manual_seed(3))
    expected_drawn = expected.sample(torch.Generator().manual_seed(3))
    assert relative_error(drawn, expected_drawn) <= FP32_RELATIVE_TOLERANCE
    ours.channels_last = True


@pytest.mark.parametrize("channels_last", [True, False])
def test_decode_matches_diffusers(pair, channels_last: bool) -> None:
    reference, ours = pair
    ours.channels_last = channels_last
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference.decode(z).sample
        got = ours.decode(z)
    assert got.shape == (2, 3, 32, 24) and got.is_contiguous()
    assert relative_error(got, expected) <= FP32_RELATIVE_TOLERANCE
    ours.channels_last = True


def test_logvar_is_clamped_like_ldm() -> None:
    moments = torch.tensor([0.5, -100.0, 100.0]).view(1, 1, 1, 3).repeat(1, 2, 1, 1)  # (1, 2, 1, 3)
    distribution = LatentDistribution.from_moments(moments)
    assert distribution.logvar.flatten().tolist() == [0.5, -30.0, 20.0]
    assert torch.equal(distribution.mean, moments[:, :1])


def test_scaling_helpers_are_explicit(pair) -> None:
    _, ours = pair
    x = images(1, 16, 16, seed=5)
    with torch.no_grad():
        distribution = ours.encode(x)
        assert torch.equal(ours.latents_from_images(x, generator=None), distribution.mean * 0.18215)
        sampled = ours.latents_from_images(x, generator=torch.Generator().manual_seed(6))
        assert torch.equal(sampled, distribution.sample(torch.Generator().manual_seed(6)) * 0.18215)
        z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7))
        assert torch.equal(ours.images_from_latents(z), ours.decode(z / 0.18215))


def test_attention_chunking_does_not_change_results(pair) -> None:
    _, ours = pair
    z = torch.randn(1, 4, 9, 7, generator=torch.Generator().manual_seed(8))
    x = images(1, 36, 28, seed=9)
    with torch.no_grad():
        whole, whole_mean = ours.decode(z), ours.encode(x).mean
        ours.attention_chunk_size = 10  # 63 latent tokens -> 7 chunks, the last one short
        chunked, chunked_mean = ours.decode(z), ours.encode(x).mean
        ours.attention_chunk_size = None
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6 * whole.abs().max().item())
    torch.testing.assert_close(chunked_mean, whole_mean, rtol=0, atol=1e-6 * whole_mean.abs().max().item())


def test_blend_tiles_is_exact_for_pointwise_functions() -> None:
    """Tile placement, ramps and normalisation: blending a pixelwise map reproduces it exactly."""
    mixing = torch.randn(3, 4, generator=torch.Generator().manual_seed(10))

    def pixelwise(tile: torch.Tensor) -> torch.Tensor:  # (B, 4, h, w) -> (B, 3, 8h, 8w)
        up = F.interpolate(tile, scale_factor=8, mode="nearest")
        return torch.tanh(torch.einsum("oc,bchw->bohw", mixing, up))

    x = torch.randn(2, 4, 23, 37, generator=torch.Generator().manual_seed(11))
    for tile_size, overlap in [(8, 3), (10, 0), (16, 15)]:
        got = blend_tiles(pixelwise, x, tile_size=tile_size, overlap=overlap, scale=8)
        torch.testing.assert_close(got, pixelwise(x), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="overlap"):
        blend_tiles(pixelwise, x, tile_size=8, overlap=8, scale=8)


def test_tiled_decode_is_close_to_whole_decode(pair) -> None:
    """Per-tile GroupNorm statistics and attention make tiling approximate. On stationary (iid) latents
    the tiles' statistics approach the image's: measured mean deviation ~0.11 of the mean |output|,
    where decoding latents shifted by one pixel deviates by ~1.2."""
    _, ours = pair
    z = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        whole = ours.decode(z)
        single_tile = ours.decode_tiled(z, tile_size=40, overlap=8)
        tiled = ours.decode_tiled(z, tile_size=24, overlap=8)
    assert torch.equal(single_tile, whole)
    assert tiled.shape == whole.shape
    assert ((tiled - whole).abs().mean() / whole.abs().mean()).item() <= 0.2


def test_full_size_keys_match_diffusers() -> None:
    config = VaeConfig.sd()
    ours = AutoencoderKL(config, device="meta").state_dict()
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(**config.to_diffusers()).state_dict()
    assert set(ours) == set(reference)
    assert all(ours[key].shape == reference[key].shape for key in ours)
    assert sum(t.numel() for t in ours.values()) == 83_653_863


def test_wild_configs(wild_dir) -> None:
    expected = {
        "sd15_runwayml_mirror_HDRJ-One": VaeConfig.sd(),
        "sd21_base_mirror_jack-op11": dataclasses.replace(VaeConfig.sd(), sample_size=768),
        "sdxl_base_1.0_mirror_HDRJ-One": VaeConfig.sdxl(),
    }
    for name, config in expected.items():
        path = wild_dir / "models" / name / "vae" / "config.json"
        assert VaeConfig.from_diffusers(json.loads(path.read_text())) == config, name


def test_config_round_trips_and_errors() -> None:
    for config in [VaeConfig.sd(), VaeConfig.sdxl(), VaeConfig.tiny()]:
        assert VaeConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
        assert VaeConfig.from_diffusers(config.to_diffusers()) == config
    with pytest.raises(TiengineError, match="shift_factor"):
        VaeConfig.from_diffusers({**VaeConfig.sd().to_diffusers(), "shift_factor": 0.1159})
    with pytest.raises(TiengineError, match="up_block_types"):
        VaeConfig.from_diffusers({**VaeConfig.sd().to_diffusers(), "up_block_types": ["UpDecoderBlock2D"]})


def test_bad_inputs_raise_clear_errors(pair) -> None:
    _, ours = pair
    with pytest.raises(TiengineError, match=r"latents must be \(B, 4, H, W\)"):
        ours.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(TiengineError, match="bfloat16"):
        ours.encode(torch.zeros(1, 3, 16, 16, dtype=torch.bfloat16))
