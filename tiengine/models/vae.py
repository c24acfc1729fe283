"""The Stable Diffusion VAE (AutoencoderKL, identical for SD1.x, SD2.x and SDXL up to weights and scaling).

Names mirror diffusers' `AutoencoderKL` (encoder.*, decoder.*, quant_conv, post_quant_conv; the mid-block
attention as attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}), so a diffusers `vae/` folder loads by
identity. `VaeConfig` uses diffusers' config.json names.

Latent scaling is explicit: `encode`/`decode` work on unscaled latents; `latents_from_images` and
`images_from_latents` multiply/divide by `scaling_factor` (0.18215 for SD1/SD2, 0.13025 for SDXL, both from
the published configs). Images are (B, 3, H, W) in [-1, 1]; latents are (B, 4, H/8, W/8).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from tiengine.errors import TiengineError
from tiengine.models.attention import ATTENTION_BACKENDS, AttentionBackend
from tiengine.models.fusions import FUSED_BACKENDS, FusedBackend, group_norm
from tiengine.models.layers import Attention, Conv2d, Downsample2D, ResnetBlock2D, Upsample2D

__all__ = ["VaeConfig", "AutoencoderKL", "LatentDistribution", "blend_tiles"]

RESNET_EPS = 1e-6  # every VAE norm (diffusers Encoder/Decoder hard-code it)

# diffusers config keys that must hold these values for the architecture implemented here
_FIXED_DIFFUSERS_VALUES: dict[str, Any] = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


@dataclass(frozen=True)
class VaeConfig:
    """AutoencoderKL architecture and latent scaling (diffusers config.json names)."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 512  # image side the model was trained at
    force_upcast: bool = True  # the published SD VAEs overflow in fp16; run them in fp32 or bf16

    @classmethod
    def sd(cls) -> VaeConfig:
        """SD1.x / SD2.x VAE (runwayml/stable-diffusion-v1-5 vae/config.json)."""
        return cls()

    @classmethod
    def sdxl(cls) -> VaeConfig:
        """SDXL VAE: same architecture, scaling_factor 0.13025."""
        return cls(scaling_factor=0.13025, sample_size=1024)

    @classmethod
    def tiny(cls) -> VaeConfig:
        """Small VAE for tests: three levels (x4 downsampling), 8 norm groups."""
        return cls(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of this config's fields (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VaeConfig:
        """Inverse of to_dict; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TiengineError(f"VAE config: unknown keys {unknown}; expected a subset of {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> VaeConfig:
        """From a diffusers AutoencoderKL config.json dict."""
        for key, expected in _FIXED_DIFFUSERS_VALUES.items():
            if key in config and config[key] != expected:
                raise TiengineError(f"VAE config.json: {key}={config[key]!r} is not supported (expected {expected!r})")
        levels = len(config.get("block_out_channels", ()))
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if key in config and tuple(config[key]) != (kind,) * levels:
                raise TiengineError(f"VAE config.json: {key} must be {levels} x {kind!r}, got {config[key]}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        if "block_out_channels" not in values:
            raise TiengineError("VAE config.json: missing required key 'block_out_channels'")
        return cls.from_dict(values)

    def to_diffusers(self) -> dict[str, Any]:
        """A diffusers AutoencoderKL config dict for this architecture."""
        levels = len(self.block_out_channels)
        data = self.to_dict()
        data["down_block_types"] = ["DownEncoderBlock2D"] * levels
        data["up_block_types"] = ["UpDecoderBlock2D"] * levels
        return data


@dataclass(frozen=True)
class LatentDistribution:
    """Diagonal Gaussian over unscaled latents: mean and logvar (B, latent_channels, h, w).

    logvar is clamped to [-30, 20] as in the original LDM code.
    """

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> LatentDistribution:
        """moments (B, 2*latent_channels, h, w): mean channels first, then logvar."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean=mean, logvar=logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None) -> torch.Tensor:
        """mean + std * noise, the noise drawn from `generator` (None: torch's default generator)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise


class _MidAttention(Attention):
    """Single-head self-attention over all pixels, with its own GroupNorm and a residual."""

    def __init__(self, channels: int, *, groups: int, device=None, dtype=None) -> None:
        super().__init__(channels, heads=1, qkv_bias=True, device=device, dtype=dtype)
        self.group_norm = nn.GroupNorm(groups, channels, eps=RESNET_EPS, device=device, dtype=dtype)

    def forward_spatial(
        self, x: torch.Tensor, *, backend: AttentionBackend, fused_backend: FusedBackend, chunk_size: int | None
    ) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        batch, channels, height, width = x.shape
        h = group_norm(self.group_norm, x, backend=fused_backend)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, H*W, C)
        h = super().forward(h, backend=backend, chunk_size=chunk_size)  # (B, H*W, C)
        return x + h.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W)


class _MidBlock(nn.Module):
    """diffusers UNetMidBlock2D: resnets.0, attentions.0, resnets.1."""

    def __init__(self, channels: int, *, groups: int, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=RESNET_EPS, **factory)
                for _ in range(2)
            ]
        )
        self.attentions = nn.ModuleList([_MidAttention(channels, groups=groups, **factory)])

    def forward(
        self, x: torch.Tensor, *, backend: AttentionBackend, fused_backend: FusedBackend, chunk_size: int | None
    ) -> torch.Tensor:
        x = self.resnets[0](x, fused_backend=fused_backend)
        x = self.attentions[0].forward_spatial(x, backend=backend, fused_backend=fused_backend, chunk_size=chunk_size)
        return self.resnets[1](x, fused_backend=fused_backend)


class _EncoderLevel(nn.Module):
    """diffusers DownEncoderBlock2D: resnets (+ downsamplers.0, pad-then-stride-2 conv)."""

    def __init__(self, in_channels: int, channels: int, *, config: VaeConfig, last: bool, device, dtype) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    in_channels if j == 0 else channels,
                    channels,
                    temb_channels=None,
                    groups=config.norm_num_groups,
                    eps=RESNET_EPS,
                    **factory,
                )
                for j in range(config.layers_per_block)
            ]
        )
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(channels, padding=0, **factory)])

    def forward(self, x: torch.Tensor, *, fused_backend: FusedBackend) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, fused_backend=fused_backend)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class _DecoderLevel(nn.Module):
    """diffusers UpDecoderBlock2D: layers_per_block + 1 resnets (+ upsamplers.0)."""

    def __init__(self, in_channels: int, channels: int, *, config: VaeConfig, last: bool, device, dtype) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    in_channels if j == 0 else channels,
                    channels,
                    temb_channels=None,
                    groups=config.norm_num_groups,
                    eps=RESNET_EPS,
                    **factory,
                )
                for j in range(config.layers_per_block + 1)
            ]
        )
        self.upsamplers = None if last else nn.ModuleList([Upsample2D(channels, **factory)])

    def forward(self, x: torch.Tensor, *, fused_backend: FusedBackend) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, fused_backend=fused_backend)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*latent_channels, H/f, W/f), f = 2**(levels-1)."""

    def __init__(self, config: VaeConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        channels = config.block_out_channels
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1, **factory)
        self.down_blocks = nn.ModuleList(
            [
                _EncoderLevel(
                    channels[max(i - 1, 0)], channels[i], config=config, last=i == len(channels) - 1, **factory
                )
                for i in range(len(channels))
            ]
        )
        self.mid_block = _MidBlock(channels[-1], groups=config.norm_num_groups, **factory)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[-1], eps=RESNET_EPS, **factory)
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1, **factory)

    def forward(
        self, x: torch.Tensor, *, backend: AttentionBackend, fused_backend: FusedBackend, chunk_size: int | None
    ) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x, fused_backend=fused_backend)
        x = self.mid_block(x, backend=backend, fused_backend=fused_backend, chunk_size=chunk_size)
        return self.conv_out(group_norm(self.conv_norm_out, x, silu=True, backend=fused_backend))


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f)."""

    def __init__(self, config: VaeConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        channels = tuple(reversed(config.block_out_channels))  # lowest resolution first
        self.conv_in = Conv2d(config.latent_channels, channels[0], 3, padding=1, **factory)
        self.mid_block = _MidBlock(channels[0], groups=config.norm_num_groups, **factory)
        self.up_blocks = nn.ModuleList(
            [
                _DecoderLevel(
                    channels[max(i - 1, 0)], channels[i], config=config, last=i == len(channels) - 1, **factory
                )
                for i in range(len(channels))
            ]
        )
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[-1], eps=RESNET_EPS, **factory)
        self.conv_out = Conv2d(channels[-1], config.out_channels, 3, padding=1, **factory)

    def forward(
        self, z: torch.Tensor, *, backend: AttentionBackend, fused_backend: FusedBackend, chunk_size: int | None
    ) -> torch.Tensor:
        x = self.conv_in(z)
        x = self.mid_block(x, backend=backend, fused_backend=fused_backend, chunk_size=chunk_size)
        for block in self.up_blocks:
            x = block(x, fused_backend=fused_backend)
        return self.conv_out(group_norm(self.conv_norm_out, x, silu=True, backend=fused_backend))


class AutoencoderKL(nn.Module):
    """The SD VAE. attention_backend and fused_backend (GroupNorm+SiLU, see tiengine.models.fusions) are
    the defaults for encode/decode, which can override them; attention_chunk_size (queries per chunk,
    None = all) bounds the mid-block attention's memory for large images without changing its result.
    channels_last=True (the default) runs on NHWC-strided activations and returns contiguous outputs;
    at the VAE's large images the per-call NHWC copy of each conv weight is small beside the conv, and
    bf16 decoding measured faster that way (benchmarks/vae.py). The Triton GroupNorm kernel takes
    contiguous NCHW only, so on CUDA fused_backend="auto" runs it with channels_last=False and keeps
    PyTorch's GroupNorm for channels_last activations."""

    def __init__(
        self,
        config: VaeConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        attention_backend: AttentionBackend = "auto",
        fused_backend: FusedBackend = "auto",
        attention_chunk_size: int | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}")
        if fused_backend not in FUSED_BACKENDS:
            raise ValueError(f"fused_backend must be one of {FUSED_BACKENDS}, got {fused_backend!r}")
        if attention_chunk_size is not None and attention_chunk_size < 1:
            raise ValueError(f"attention_chunk_size must be a positive token count or None, got {attention_chunk_size}")
        factory = {"device": device, "dtype": dtype}
        self.config = config
        self.attention_backend: AttentionBackend = attention_backend
        self.fused_backend: FusedBackend = fused_backend
        self.attention_chunk_size = attention_chunk_size
        self.channels_last = channels_last
        latent = config.latent_channels
        self.encoder = Encoder(config, **factory)
        self.decoder = Decoder(config, **factory)
        self.quant_conv = Conv2d(2 * latent, 2 * latent, 1, **factory)
        self.post_quant_conv = Conv2d(latent, latent, 1, **factory)

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def _prepare(self, x: torch.Tensor, channels: int, what: str) -> torch.Tensor:
        weight = self.post_quant_conv.weight
        if x.ndim != 4 or x.shape[1] != channels:
            raise TiengineError(f"VAE {what} must be (B, {channels}, H, W), got {tuple(x.shape)}")
        if x.dtype != weight.dtype or x.device != weight.device:
            raise TiengineError(
                f"VAE {what} are {x.dtype} on {x.device} but the weights are {weight.dtype} on {weight.device}"
            )
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def encode(
        self,
        images: torch.Tensor,
        *,
        attention_backend: AttentionBackend | None = None,
        fused_backend: FusedBackend | None = None,
    ) -> LatentDistribution:
        """images (B, in_channels, H, W) in [-1, 1] -> distribution over unscaled latents (B, 4, H/8, W/8)."""
        backend = self.attention_backend if attention_backend is None else attention_backend
        fused = self.fused_backend if fused_backend is None else fused_backend
        x = self._prepare(images, self.config.in_channels, "images")
        moments = self.quant_conv(
            self.encoder(x, backend=backend, fused_backend=fused, chunk_size=self.attention_chunk_size)
        )
        return LatentDistribution.from_moments(moments.contiguous())

    def decode(
        self,
        latents: torch.Tensor,
        *,
        attention_backend: AttentionBackend | None = None,
        fused_backend: FusedBackend | None = None,
    ) -> torch.Tensor:
        """Unscaled latents (B, 4, h, w) -> images (B, out_channels, 8h, 8w), nominally in [-1, 1]."""
        backend = self.attention_backend if attention_backend is None else attention_backend
        fused = self.fused_backend if fused_backend is None else fused_backend
        z = self.post_quant_conv(self._prepare(latents, self.config.latent_channels, "latents"))
        return self.decoder(z, backend=backend, fused_backend=fused, chunk_size=self.attention_chunk_size).contiguous()

    def decode_tiled(
        self,
        latents: torch.Tensor,
        *,
        tile_size: int = 64,
        overlap: int = 16,
        attention_backend: AttentionBackend | None = None,
        fused_backend: FusedBackend | None = None,
    ) -> torch.Tensor:
        """decode() in overlapping latent tiles of tile_size (blended over overlap latents), for images too
        large to decode at once. GroupNorm statistics and the mid-block attention then see one tile, not the
        whole image, so the result is close to decode() but not equal; with one tile it is decode()."""
        return blend_tiles(
            lambda tile: self.decode(tile, attention_backend=attention_backend, fused_backend=fused_backend),
            latents,
            tile_size=tile_size,
            overlap=overlap,
            scale=self.downscale_factor,
        )

    def latents_from_images(self, images: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        """Scaled latents for the UNet: a sample drawn with `generator`, or the mean when generator is None."""
        distribution = self.encode(images)
        latents = distribution.mean if generator is None else distribution.sample(generator)
        return latents * self.config.scaling_factor

    def images_from_latents(self, latents: torch.Tensor, *, tiled: bool = False) -> torch.Tensor:
        """Images in [-1, 1] from scaled (UNet) latents: decode(latents / scaling_factor)."""
        unscaled = latents / self.config.scaling_factor
        return self.decode_tiled(unscaled) if tiled else self.decode(unscaled)


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile`, `stride` apart, the last flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(length: int, ramp: int, rise: bool, fall: bool, device: torch.device) -> torch.Tensor:
    """1D blend weight: ramps of `ramp` samples up at the start (rise) and down at the end (fall)."""
    position = torch.arange(length, device=device, dtype=torch.float32) + 0.5
    weight = torch.ones(length, device=device, dtype=torch.float32)
    if rise:
        weight = torch.minimum(weight, position / ramp)
    if fall:
        weight = torch.minimum(weight, (length - position) / ramp)
    return weight


def blend_tiles(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, tile_size: int, overlap: int, scale: int
) -> torch.Tensor:
    """Apply fn (B, C, h, w) -> (B, C', h*scale, w*scale) to overlapping tiles of x and blend the outputs.

    Tiles are tile_size wide, overlap apart from their neighbours; in overlaps each tile's output is
    weighted by a linear ramp that falls towards its inner edges, and the weights are normalised. For a
    pointwise fn the result equals fn(x) exactly.
    """
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size={tile_size}), got {overlap}")
    batch, _, height, width = x.shape
    stride = tile_size - overlap
    rows, cols = _tile_starts(height, tile_size, stride), _tile_starts(width, tile_size, stride)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)
    ramp = max(overlap * scale, 1)
    output: torch.Tensor | None = None
    total_weight = torch.zeros(height * scale, width * scale, device=x.device, dtype=torch.float32)
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            tile = x[:, :, top : top + tile_size, left : left + tile_size]
            result = fn(tile).float()  # (B, C', th*scale, tw*scale)
            th, tw = result.shape[-2:]
            weight = _ramp(th, ramp, i > 0, i < len(rows) - 1, x.device)[:, None] * _ramp(
                tw, ramp, j > 0, j < len(cols) - 1, x.device
            )[None, :]  # (th, tw)
            if output is None:
                output = torch.zeros(batch, result.shape[1], height * scale, width * scale, device=x.device)
            y, x0 = top * scale, left * scale
            output[:, :, y : y + th, x0 : x0 + tw] += result * weight
            total_weight[y : y + th, x0 : x0 + tw] += weight
    return (output / total_weight).to(x.dtype)
