"""UNet2DConditionModel against diffusers' UNet2DConditionModel on the same random weights.

Tolerance: fp32 outputs agree within 1e-4 * max|reference| (the two implementations differ only in
summation order; measured differences are ~1e-6 relative on the tiny configs and ~3e-6 on SD1.5).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tiengine.errors import TiengineError
from tiengine.models.layers import Conv2d, text_time_conditioning, timestep_embedding
from tiengine.models.unet import UNet2DConditionModel, UNetConfig

diffusers = pytest.importorskip("diffusers")

FP32_RELATIVE_TOLERANCE = 1e-4

WILD_UNETS = {
    "sd15_runwayml_mirror_HDRJ-One": (UNetConfig.sd15(), 859_520_964),
    "sd21_768v_flax_branch_mirror_Vikas-2025": (UNetConfig.sd21(), 865_910_724),
    "sd21_base_mirror_jack-op11": (
        dataclasses.replace(UNetConfig.sd21(), upcast_attention=False, sample_size=64),
        865_910_724,
    ),
    "sdxl_base_1.0_mirror_HDRJ-One": (UNetConfig.sdxl_base(), 2_567_463_684),
}


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter with seeded uniform values: fan-in scaled weights, norms near 1, small biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                bound = math.sqrt(3.0 / param[0].numel())  # unit variance after the layer
                param.uniform_(-bound, bound, generator=generator)
            elif name.endswith("weight"):  # GroupNorm / LayerNorm scale
                param.uniform_(0.8, 1.2, generator=generator)
            else:
                param.uniform_(-0.2, 0.2, generator=generator)


def reference_unet(config: UNetConfig, seed: int) -> torch.nn.Module:
    reference = diffusers.UNet2DConditionModel(**config.to_diffusers()).eval()
    randomize_(reference, seed)
    return reference


def ours_from(reference: torch.nn.Module, config: UNetConfig, **options) -> UNet2DConditionModel:
    ours = UNet2DConditionModel(config, device="meta", **options).eval()
    reference_state = reference.state_dict()
    assert set(ours.state_dict()) == set(reference_state)
    ours.load_state_dict(reference_state, assign=True)  # shares the reference's tensors
    return ours


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def inputs(config: UNetConfig, batch: int, height: int, width: int, seed: int, tokens: int = 11):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.in_channels, height, width, generator=generator)
    timestep = torch.tensor([999.0, 1.5, 421.0][:batch])
    context = torch.randn(batch, tokens, config.cross_attention_dim, generator=generator)
    return sample, timestep, context


def sdxl_extras(config: UNetConfig, batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    time_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    pooled = torch.randn(batch, time_width, generator=generator)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 32.0, 16.0, 832.0, 1216.0]])
    return pooled, time_ids[:batch]


@pytest.mark.parametrize("preset", ["tiny_sd1", "tiny_sd2", "tiny_sdxl"])
@pytest.mark.parametrize("size", [(16, 16), (9, 14)])  # 9x14 exercises the odd-size upsample path
def test_tiny_matches_diffusers(preset: str, size: tuple[int, int]) -> None:
    config = getattr(UNetConfig, preset)()
    reference = reference_unet(config, seed=1)
    ours = ours_from(reference, config)
    sample, timestep, context = inputs(config, 2, *size, seed=2)
    added, y = None, None
    if config.addition_embed_type == "text_time":
        pooled, time_ids = sdxl_extras(config, 2, seed=3)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        y = ours.text_time_conditioning(pooled, time_ids)
    with torch.no_grad():
        expected = reference(sample, timestep, context, added_cond_kwargs=added).sample
        got = ours(sample, timestep, context, y)
        nhwc = UNet2DConditionModel(config, channels_last=True).eval()
        nhwc.load_state_dict(reference.state_dict())
        got_nhwc = nhwc(sample, timestep, context, y)
    assert got.shape == expected.shape and got.is_contiguous()
    assert relative_error(got, expected) <= FP32_RELATIVE_TOLERANCE
    assert relative_error(got_nhwc, expected) <= FP32_RELATIVE_TOLERANCE


def force_gemm_convolutions_(model: torch.nn.Module) -> int:
    """Route every 3x3/1x1 convolution of model through Conv2d's im2col GEMM path; returns how many."""
    convolutions = [m for m in model.modules() if isinstance(m, Conv2d)]
    for convolution in convolutions:
        convolution.gemm_max_rows = 1 << 30
        convolution.gemm_min_weight = 0
    return len(convolutions)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gemm_convolution_matches_conv2d(channels_last: bool) -> None:
    generator = torch.Generator().manual_seed(20)
    for in_channels, out_channels, kernel, stride, padding, size in [
        (6, 5, 3, 1, 1, (7, 5)),
        (6, 6, 3, 2, 1, (7, 6)),  # UNet downsampler, odd input
        (6, 6, 3, 2, 0, (8, 9)),  # VAE downsampler after its own right/bottom pad
        (8, 3, 1, 1, 0, (4, 6)),
    ]:
        convolution = Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding)
        force_gemm_convolutions_(convolution)
        x = torch.randn(2, in_channels, *size, generator=generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        expected = F.conv2d(x, convolution.weight, convolution.bias, stride=stride, padding=padding)
        got = convolution(x)
        assert got.shape == expected.shape
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_tiny_with_gemm_convolutions_matches_diffusers() -> None:
    config = UNetConfig.tiny_sdxl()
    reference = reference_unet(config, seed=21)
    ours = ours_from(reference, config)
    assert force_gemm_convolutions_(ours) > 20
    sample, timestep, context = inputs(config, 2, 9, 12, seed=22)
    pooled, time_ids = sdxl_extras(config, 2, seed=23)
    with torch.no_grad():
        expected = reference(
            sample, timestep, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        got = ours(sample, timestep, context, ours.text_time_conditioning(pooled, time_ids))
    assert relative_error(got, expected) <= FP32_RELATIVE_TOLERANCE


def test_gradients_match_diffusers() -> None:
    """Textual-inversion training differentiates through the UNet to the context."""
    config = UNetConfig.tiny_sd1()
    reference = reference_unet(config, seed=24)
    ours = ours_from(reference, config)
    sample, timestep, context = inputs(config, 2, 8, 8, seed=25)
    context_ours = context.clone().requires_grad_()
    context_reference = context.clone().requires_grad_()
    reference(sample, timestep, context_reference).sample.square().sum().backward()
    ours(sample, timestep, context_ours).square().sum().backward()
    assert relative_error(context_ours.grad, context_reference.grad) <= FP32_RELATIVE_TOLERANCE


def test_scalar_timestep_broadcasts() -> None:
    config = UNetConfig.tiny_sd1()
    reference = reference_unet(config, seed=4)
    ours = ours_from(reference, config)
    sample, _, context = inputs(config, 2, 8, 8, seed=5)
    with torch.no_grad():
        expected = reference(sample, 321.25, context).sample
        got = ours(sample, 321.25, context)
        per_item = ours(sample, torch.tensor([321.25, 321.25]), context)
    assert relative_error(got, expected) <= FP32_RELATIVE_TOLERANCE
    assert torch.equal(got, per_item)


def test_heads_reach_attention_layers() -> None:
    """SD1's 8 heads mean head dim 40/80/160; SD2's and SDXL's heads mean head dim 64."""
    for config, dims in [(UNetConfig.sd15(), (40, 80, 160, 160)), (UNetConfig.sd21(), (64,) * 4)]:
        assert config.attention_head_dims == dims
        model = UNet2DConditionModel(config, device="meta")
        assert model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == config.num_attention_heads[0]
        assert model.up_blocks[1].attentions[0].transformer_blocks[0].attn2.heads == config.num_attention_heads[2]
    assert UNetConfig.sdxl_base().attention_head_dims == (64, 64, 64)


@pytest.mark.parametrize("preset", ["sd15", "sd21", "sdxl_base", "sdxl_refiner"])
def test_full_size_keys_and_shapes_match_diffusers(preset: str) -> None:
    config = getattr(UNetConfig, preset)()
    ours = UNet2DConditionModel(config, device="meta").state_dict()
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**config.to_diffusers()).state_dict()
    assert set(ours) == set(reference)
    assert all(ours[key].shape == reference[key].shape for key in ours)


def test_wild_configs_resolve_and_count(wild_dir) -> None:
    found = {p.parent.parent.name: p for p in wild_dir.glob("models/*/unet/config.json")}
    assert set(WILD_UNETS) <= set(found)
    for name, (expected_config, expected_parameters) in WILD_UNETS.items():
        config = UNetConfig.from_diffusers(json.loads(found[name].read_text()))
        assert config == expected_config, name
        model = UNet2DConditionModel(config, device="meta")
        assert sum(p.numel() for p in model.parameters()) == expected_parameters, name


def test_config_round_trips() -> None:
    for preset in ["sd15", "sd21", "sdxl_base", "sdxl_refiner", "tiny_sd1", "tiny_sd2", "tiny_sdxl"]:
        config = getattr(UNetConfig, preset)()
        assert UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
        assert UNetConfig.from_diffusers(config.to_diffusers()) == config
    with pytest.raises(TiengineError, match="unknown keys"):
        UNetConfig.from_dict({**UNetConfig.sd15().to_dict(), "heads": 3})
    with pytest.raises(TiengineError, match="class_embed_type"):
        UNetConfig.from_diffusers({**UNetConfig.sd15().to_diffusers(), "class_embed_type": "timestep"})
    with pytest.raises(TiengineError, match="cross_attention_dim"):
        UNetConfig.from_diffusers({k: v for k, v in UNetConfig.sd15().to_diffusers().items() if k != "cross_attention_dim"})


def test_sinusoids_match_diffusers() -> None:
    from diffusers.models.embeddings import get_timestep_embedding

    timesteps = torch.tensor([0.0, 1.0, 17.5, 999.0, 1024.0])
    for dim, flip, shift in [(320, True, 0), (256, True, 0), (33, False, 1)]:
        expected = get_timestep_embedding(timesteps, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        got = timestep_embedding(timesteps, dim, flip_sin_to_cos=flip, freq_shift=shift)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_text_time_conditioning_layout() -> None:
    """y = [pooled, sinusoid(time_id_0), ..., sinusoid(time_id_5)] with 256-wide flipped sinusoids."""
    pooled = torch.randn(2, 1280)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [512.0, 768.0, 8.0, 0.0, 1024.0, 896.0]])
    y = text_time_conditioning(pooled, time_ids)
    assert y.shape == (2, 2816)
    assert torch.equal(y[:, :1280], pooled)
    sixth = timestep_embedding(time_ids[:, 5], 256, flip_sin_to_cos=True, freq_shift=0)
    assert torch.equal(y[:, 1280 + 5 * 256 :], sixth)
    model = UNet2DConditionModel(UNetConfig.sdxl_base(), device="meta")
    assert torch.equal(model.text_time_conditioning(pooled, time_ids), y)


def test_bad_inputs_raise_clear_errors() -> None:
    config = UNetConfig.tiny_sdxl()
    model = UNet2DConditionModel(config).eval()
    sample, timestep, context = inputs(config, 2, 8, 8, seed=6)
    with pytest.raises(TiengineError, match=r"y must be \(B=2, 80\)"):
        model(sample, timestep, context)
    with pytest.raises(TiengineError, match="context must be"):
        model(sample, timestep, context[:, :, :10], torch.zeros(2, 80))
    with pytest.raises(TiengineError, match="sample must be"):
        model(sample[:, :3], timestep, context, torch.zeros(2, 80))
    with pytest.raises(TiengineError, match="bfloat16"):
        model(sample.bfloat16(), timestep, context, torch.zeros(2, 80))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_as_accurate_as_diffusers(dtype: torch.dtype) -> None:
    """Upcast norms keep our half-precision error at or below diffusers' own, against fp32."""
    config = UNetConfig.tiny_sd2()
    reference = reference_unet(config, seed=7)
    sample, timestep, context = inputs(config, 2, 16, 16, seed=8)
    with torch.no_grad():
        exact = reference(sample, timestep, context).sample
        ours = UNet2DConditionModel(config, dtype=dtype).eval()
        ours.load_state_dict(reference.state_dict())
        reference.to(dtype)
        reference_half = reference(sample.to(dtype), timestep, context.to(dtype)).sample
        ours_half = ours(sample.to(dtype), timestep, context)
    assert ours_half.dtype == dtype
    assert relative_error(ours_half, exact) <= 1.25 * relative_error(reference_half, exact) + 1e-3


@pytest.mark.slow
def test_sd15_full_size_matches_diffusers() -> None:
    """One SD1.5 step at a 16x16 latent (batch 2), fp32, weights shared between the two models."""
    config = UNetConfig.sd15()
    ours = UNet2DConditionModel(config).eval()
    randomize_(ours, seed=9)
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**config.to_diffusers()).eval()
    reference.load_state_dict(ours.state_dict(), assign=True)
    sample, timestep, context = inputs(config, 2, 16, 16, seed=10, tokens=77)
    with torch.no_grad():
        expected = reference(sample, timestep, context).sample
        del reference
        gc.collect()
        got = ours(sample, timestep, context)
    assert relative_error(got, expected) <= FP32_RELATIVE_TOLERANCE
