"""The Stable Diffusion UNet (SD1.x, SD2.x, SDXL) in plain PyTorch with diffusers' parameter names.

`UNetConfig` uses the field names of diffusers' `UNet2DConditionModel` config.json, with one deliberate
change: heads are explicit. diffusers' `attention_head_dim` is, for these models, the number of HEADS per
level (a historical naming slip diffusers keeps for compatibility): SD1's `attention_head_dim: 8` means 8
heads at every level (head dim 40/80/160); SD2's `[5, 10, 20, 20]` and SDXL's `[5, 10, 20]` mean
channels/64 heads (head dim 64). `UNetConfig.num_attention_heads` holds the heads per level, and
`from_diffusers` / `to_diffusers` translate.

`UNet2DConditionModel.state_dict()` has exactly diffusers' keys for the same config, so a diffusers
`unet/diffusion_pytorch_model.safetensors` loads by identity. Published parameter counts: SD1.5
859,520,964; SD2.x 865,910,724; SDXL base 2,567,463,684.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tiengine.errors import TiengineError
from tiengine.models.attention import ATTENTION_BACKENDS, AttentionBackend
from tiengine.models.fusions import FUSED_BACKENDS, FusedBackend, group_norm
from tiengine.models.layers import (
    Attention,
    Conv2d,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    text_time_conditioning,
    timestep_embedding,
)

__all__ = ["UNetConfig", "UNet2DConditionModel", "text_time_conditioning"]

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)

# diffusers config keys that must hold these values for the architecture implemented here
_FIXED_DIFFUSERS_VALUES: dict[str, Any] = {
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "dual_cross_attention": False, "only_cross_attention": False, "num_class_embeds": None,
    "class_embed_type": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default", "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "conv_in_kernel": 3, "conv_out_kernel": 3, "reverse_transformer_layers_per_block": None,
    "mid_block_only_cross_attention": None, "class_embeddings_concat": False, "timestep_post_act": None,
    "time_embedding_dim": None, "time_embedding_act_fn": None, "cross_attention_norm": None,
}  # fmt: skip


def _per_level(value: Any, levels: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * levels
    values = tuple(int(v) for v in value)
    if len(values) != levels:
        raise TiengineError(f"UNet config: {name} has {len(values)} entries, expected {levels} (one per level)")
    return values


@dataclass(frozen=True)
class UNetConfig:
    """UNet architecture. Tuples are per resolution level, highest resolution first."""

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    num_attention_heads: tuple[int, ...]  # explicit heads per level (see module docstring)
    cross_attention_dim: int
    transformer_layers_per_block: tuple[int, ...] = ()  # empty means 1 at every level
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    in_channels: int = 4
    out_channels: int = 4
    layers_per_block: int = 2
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_embed_type: str | None = None  # "text_time" for SDXL
    addition_time_embed_dim: int | None = None  # 256 for SDXL
    projection_class_embeddings_input_dim: int | None = None  # 2816 SDXL base, 2560 refiner
    sample_size: int = 64  # latent side the model was trained at (image side / 8)

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        if not self.transformer_layers_per_block:
            object.__setattr__(self, "transformer_layers_per_block", (1,) * levels)
        for name in ("down_block_types", "up_block_types", "num_attention_heads", "transformer_layers_per_block"):
            if len(getattr(self, name)) != levels:
                raise TiengineError(
                    f"UNet config: {name} has {len(getattr(self, name))} entries, expected {levels} (one per level)"
                )
        for kind in self.down_block_types:
            if kind not in DOWN_BLOCK_TYPES:
                raise TiengineError(f"UNet config: down block type {kind!r} is not one of {DOWN_BLOCK_TYPES}")
        for kind in self.up_block_types:
            if kind not in UP_BLOCK_TYPES:
                raise TiengineError(f"UNet config: up block type {kind!r} is not one of {UP_BLOCK_TYPES}")
        if self.mid_block_type not in MID_BLOCK_TYPES + (None,):
            raise TiengineError(f"UNet config: mid_block_type {self.mid_block_type!r} is not one of {MID_BLOCK_TYPES}")
        for channels, heads in zip(self.block_out_channels, self.num_attention_heads):
            if channels % heads != 0:
                raise TiengineError(f"UNet config: {channels} channels do not split into {heads} heads")
        if self.addition_embed_type not in (None, "text_time"):
            raise TiengineError(f"UNet config: addition_embed_type {self.addition_embed_type!r} is not supported")
        if self.addition_embed_type == "text_time" and (
            self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None
        ):
            raise TiengineError(
                "UNet config: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )

    @property
    def attention_head_dims(self) -> tuple[int, ...]:
        """Per-level head width: channels / heads (40, 80, 160 for SD1; 64 for SD2 and SDXL)."""
        return tuple(c // h for c, h in zip(self.block_out_channels, self.num_attention_heads))

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    # ---- presets -----------------------------------------------------------------------------------
    @classmethod
    def sd15(cls) -> UNetConfig:
        """SD1.x (runwayml/stable-diffusion-v1-5 unet/config.json): 8 heads everywhere, CLIP-L context."""
        return cls(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            num_attention_heads=(8, 8, 8, 8),
            cross_attention_dim=768,
        )

    @classmethod
    def sd21(cls) -> UNetConfig:
        """SD2.x (512 base and 768-v share it): head dim 64, OpenCLIP-H context, linear projections.

        upcast_attention is True as in the 768-v config (the base config omits it; it only changes
        fp16/bf16 numerics, never the weights).
        """
        return dataclasses.replace(
            cls.sd15(),
            num_attention_heads=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
            upcast_attention=True,
            sample_size=96,
        )

    @classmethod
    def sdxl_base(cls) -> UNetConfig:
        """SDXL base 1.0: three levels, transformer depth (1, 2, 10), text_time vector conditioning."""
        return cls(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            num_attention_heads=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            sample_size=128,
        )

    @classmethod
    def sdxl_refiner(cls) -> UNetConfig:
        """SDXL refiner 1.0: OpenCLIP-bigG context only, 5 time ids (aesthetic score instead of target)."""
        return cls(
            block_out_channels=(384, 768, 1536, 1536),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            num_attention_heads=(6, 12, 24, 24),
            transformer_layers_per_block=(4, 4, 4, 4),
            cross_attention_dim=1280,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2560,
            sample_size=128,
        )

    @classmethod
    def tiny_sd1(cls) -> UNetConfig:
        """Small SD1-shaped UNet for tests: conv projections, fixed head count."""
        return cls(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            num_attention_heads=(4, 4),
            cross_attention_dim=48,
            norm_num_groups=8,
            sample_size=16,
        )

    @classmethod
    def tiny_sd2(cls) -> UNetConfig:
        """Small SD2-shaped UNet for tests: head dim 16 everywhere, linear projections, upcast attention."""
        return dataclasses.replace(
            cls.tiny_sd1(),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            num_attention_heads=(2, 4),
            cross_attention_dim=64,
            use_linear_projection=True,
            upcast_attention=True,
        )

    @classmethod
    def tiny_sdxl(cls) -> UNetConfig:
        """Small SDXL-shaped UNet for tests: depth 2 in the lower level, text_time conditioning."""
        return cls(
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            num_attention_heads=(2, 4),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=64,
            use_linear_projection=True,
            norm_num_groups=8,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            sample_size=16,
        )

    # ---- (de)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of this config's fields (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """Inverse of to_dict; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TiengineError(f"UNet config: unknown keys {unknown}; expected a subset of {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> UNetConfig:
        """From a diffusers UNet2DConditionModel config.json dict (resolving `attention_head_dim` as heads)."""
        for key, expected in _FIXED_DIFFUSERS_VALUES.items():
            if key in config and config[key] != expected:
                raise TiengineError(
                    f"UNet config.json: {key}={config[key]!r} is not supported (expected {expected!r})"
                )
        try:
            block_out_channels = tuple(int(c) for c in config["block_out_channels"])
            levels = len(block_out_channels)
            heads = config.get("num_attention_heads") or config["attention_head_dim"]
            return cls(
                block_out_channels=block_out_channels,
                down_block_types=tuple(config["down_block_types"]),
                up_block_types=tuple(config["up_block_types"]),
                num_attention_heads=_per_level(heads, levels, "attention_head_dim"),
                cross_attention_dim=int(config["cross_attention_dim"]),
                transformer_layers_per_block=_per_level(
                    config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block"
                ),
                mid_block_type=config.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
                in_channels=int(config.get("in_channels", 4)),
                out_channels=int(config.get("out_channels", 4)),
                layers_per_block=int(config.get("layers_per_block", 2)),
                use_linear_projection=bool(config.get("use_linear_projection", False)),
                upcast_attention=bool(config.get("upcast_attention") or False),
                norm_num_groups=int(config.get("norm_num_groups", 32)),
                norm_eps=float(config.get("norm_eps", 1e-5)),
                flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
                freq_shift=int(config.get("freq_shift", 0)),
                addition_embed_type=config.get("addition_embed_type"),
                addition_time_embed_dim=config.get("addition_time_embed_dim"),
                projection_class_embeddings_input_dim=config.get("projection_class_embeddings_input_dim"),
                sample_size=int(config.get("sample_size", 64)),
            )
        except KeyError as missing:
            raise TiengineError(f"UNet config.json: missing required key {missing}") from None

    def to_diffusers(self) -> dict[str, Any]:
        """A diffusers UNet2DConditionModel config dict for this architecture (heads as attention_head_dim)."""
        data = self.to_dict()
        data["attention_head_dim"] = data.pop("num_attention_heads")
        return data


class _DownLevel(nn.Module):
    """diffusers DownBlock2D / CrossAttnDownBlock2D: resnets (+ attentions) (+ downsamplers.0)."""

    def __init__(self, config: UNetConfig, level: int, in_channels: int, *, device, dtype) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        channels = config.block_out_channels[level]
        widths = [in_channels] + [channels] * (config.layers_per_block - 1)
        self.resnets = nn.ModuleList([_resnet(config, width, channels, **factory) for width in widths])
        if config.down_block_types[level] == "CrossAttnDownBlock2D":
            self.attentions: nn.ModuleList | None = nn.ModuleList(
                [_transformer(config, level, **factory) for _ in range(config.layers_per_block)]
            )
        else:
            self.attentions = None
        if level < len(config.block_out_channels) - 1:
            self.downsamplers: nn.ModuleList | None = nn.ModuleList([Downsample2D(channels, padding=1, **factory)])
        else:
            self.downsamplers = None

    def forward(
        self,
        x: torch.Tensor,
        temb_silu: torch.Tensor,
        context: torch.Tensor,
        *,
        backend: AttentionBackend,
        fused_backend: FusedBackend,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the output and the skip activations handed to the up path (one per layer + downsample)."""
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb_silu, fused_backend=fused_backend)
            if self.attentions is not None:
                x = self.attentions[j](x, context, backend=backend, fused_backend=fused_backend)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class _UpLevel(nn.Module):
    """diffusers UpBlock2D / CrossAttnUpBlock2D: resnets over [x, skip] concatenations (+ upsamplers.0)."""

    def __init__(self, config: UNetConfig, index: int, *, device, dtype) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        levels = len(config.block_out_channels)
        level = levels - 1 - index  # up block `index` works at resolution level `level`
        channels = config.block_out_channels[level]
        prev_channels = config.block_out_channels[min(level + 1, levels - 1)]  # input from the level below
        skip_in_channels = config.block_out_channels[max(level - 1, 0)]  # the level's own input width
        layers = config.layers_per_block + 1
        # resnet j reads [x, skip]: x from below (j = 0) or the previous resnet, the skip from the down path
        in_channels = [
            (prev_channels if j == 0 else channels) + (skip_in_channels if j == layers - 1 else channels)
            for j in range(layers)
        ]
        self.resnets = nn.ModuleList([_resnet(config, width, channels, **factory) for width in in_channels])
        if config.up_block_types[index] == "CrossAttnUpBlock2D":
            self.attentions: nn.ModuleList | None = nn.ModuleList(
                [_transformer(config, level, **factory) for _ in range(layers)]
            )
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample2D(channels, **factory)]) if level > 0 else None

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb_silu: torch.Tensor,
        context: torch.Tensor,
        *,
        backend: AttentionBackend,
        fused_backend: FusedBackend,
        upsample_size: tuple[int, int] | None,
    ) -> torch.Tensor:
        """skips: this level's skip activations in down-path order; consumed last first."""
        for j, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips[-1 - j]], dim=1)  # (B, C + C_skip, H, W)
            x = resnet(x, temb_silu, fused_backend=fused_backend)
            if self.attentions is not None:
                x = self.attentions[j](x, context, backend=backend, fused_backend=fused_backend)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class _MidBlock(nn.Module):
    """diffusers UNetMidBlock2DCrossAttn: resnets.0, attentions.0, resnets.1 at the lowest level."""

    def __init__(self, config: UNetConfig, *, device, dtype) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        channels = config.block_out_channels[-1]
        self.resnets = nn.ModuleList([_resnet(config, channels, channels, **factory) for _ in range(2)])
        self.attentions = nn.ModuleList([_transformer(config, len(config.block_out_channels) - 1, **factory)])

    def forward(
        self,
        x: torch.Tensor,
        temb_silu: torch.Tensor,
        context: torch.Tensor,
        *,
        backend: AttentionBackend,
        fused_backend: FusedBackend,
    ) -> torch.Tensor:
        x = self.resnets[0](x, temb_silu, fused_backend=fused_backend)
        x = self.attentions[0](x, context, backend=backend, fused_backend=fused_backend)
        return self.resnets[1](x, temb_silu, fused_backend=fused_backend)


def _resnet(config: UNetConfig, in_channels: int, out_channels: int, *, device, dtype) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels,
        out_channels,
        temb_channels=config.time_embed_dim,
        groups=config.norm_num_groups,
        eps=config.norm_eps,
        device=device,
        dtype=dtype,
    )


def _transformer(config: UNetConfig, level: int, *, device, dtype) -> Transformer2DModel:
    return Transformer2DModel(
        config.block_out_channels[level],
        heads=config.num_attention_heads[level],
        num_layers=config.transformer_layers_per_block[level],
        context_dim=config.cross_attention_dim,
        groups=config.norm_num_groups,
        use_linear_projection=config.use_linear_projection,
        upcast_attention=config.upcast_attention,
        device=device,
        dtype=dtype,
    )


class UNet2DConditionModel(nn.Module):
    """eps/v-predicting UNet: forward(sample, timestep, context, y) -> (B, out_channels, h, w).

    attention_backend (see tiengine.models.attention) and fused_backend (GroupNorm+SiLU and GEGLU, see
    tiengine.models.fusions) are the defaults for forward, which can override them.
    channels_last=True runs the convolutions and norms on NHWC-strided activations (the same
    computation, returned contiguous). On CPU it measured no faster, as PyTorch re-lays contiguous
    conv weights out for NHWC inputs on every call, so the default is NCHW (which the Triton GroupNorm
    kernel needs: with channels_last, fused_backend="auto" keeps PyTorch's GroupNorm on CUDA too).
    """

    def __init__(
        self,
        config: UNetConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        attention_backend: AttentionBackend = "auto",
        fused_backend: FusedBackend = "auto",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}")
        if fused_backend not in FUSED_BACKENDS:
            raise ValueError(f"fused_backend must be one of {FUSED_BACKENDS}, got {fused_backend!r}")
        factory = {"device": device, "dtype": dtype}
        self.config = config
        self.attention_backend: AttentionBackend = attention_backend
        self.fused_backend: FusedBackend = fused_backend
        self.channels_last = channels_last
        channels = config.block_out_channels
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1, **factory)
        self.time_embedding = TimestepEmbedding(channels[0], config.time_embed_dim, **factory)
        if config.addition_embed_type == "text_time":
            self.add_embedding: TimestepEmbedding | None = TimestepEmbedding(
                config.projection_class_embeddings_input_dim, config.time_embed_dim, **factory
            )
        else:
            self.add_embedding = None
        self.down_blocks = nn.ModuleList(
            [
                _DownLevel(config, level, channels[max(level - 1, 0)], **factory)
                for level in range(len(channels))
            ]
        )
        self.mid_block = _MidBlock(config, **factory) if config.mid_block_type is not None else None
        self.up_blocks = nn.ModuleList([_UpLevel(config, index, **factory) for index in range(len(channels))])
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps, **factory)
        self.conv_out = Conv2d(channels[0], config.out_channels, 3, padding=1, **factory)

    def text_time_conditioning(self, pooled_text: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """Build `y` for this config's addition embedding from pooled text (B, P) and time ids (B, K)."""
        if self.config.addition_embed_type != "text_time":
            raise TiengineError("this UNet has no text_time vector conditioning (addition_embed_type is None)")
        return text_time_conditioning(
            pooled_text,
            time_ids,
            time_embed_dim=self.config.addition_time_embed_dim,
            flip_sin_to_cos=self.config.flip_sin_to_cos,
            freq_shift=self.config.freq_shift,
        )

    def set_key_value_context(
        self, transform: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    ) -> None:
        """Set (None: remove) `Attention.key_value_context` on every attention of this UNet, self- and
        cross-attention alike: transform(source (B, M, C_src)) -> (to_k input, to_v input)."""
        if isinstance(transform, nn.Module):
            raise TypeError("key_value_context must be a plain callable, not an nn.Module (it would become "
                            "a submodule of every attention and change the UNet's state dict)")
        for module in self.modules():
            if isinstance(module, Attention):
                module.key_value_context = transform

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        attention_backend: AttentionBackend | None = None,
        fused_backend: FusedBackend | None = None,
    ) -> torch.Tensor:
        """sample (B, in_channels, h, w); timestep scalar or (B,); context (B, T, cross_attention_dim),
        cast to sample's dtype; y (B, projection_class_embeddings_input_dim) for SDXL, else None."""
        config = self.config
        backend = self.attention_backend if attention_backend is None else attention_backend
        fused = self.fused_backend if fused_backend is None else fused_backend
        batch, _, height, width = sample.shape
        device, dtype = sample.device, sample.dtype
        self._check_inputs(sample, context, y)

        timesteps = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)  # (B,)
        t_sinusoid = timestep_embedding(
            timesteps, config.block_out_channels[0], flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=config.freq_shift
        )  # (B, C0), fp32
        emb = self.time_embedding(t_sinusoid.to(dtype))  # (B, 4*C0)
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(y.to(dtype))
        temb_silu = F.silu(emb)  # every resnet's time_emb_proj reads silu(emb)
        context = context.to(dtype)

        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb_silu, context, backend=backend, fused_backend=fused)
            skips.extend(block_skips)
        if self.mid_block is not None:
            x = self.mid_block(x, temb_silu, context, backend=backend, fused_backend=fused)
        for block in self.up_blocks:
            level_skips = skips[-len(block.resnets) :]
            del skips[-len(block.resnets) :]
            upsample_size = tuple(skips[-1].shape[-2:]) if block.upsamplers is not None else None
            x = block(
                x, level_skips, temb_silu, context, backend=backend, fused_backend=fused, upsample_size=upsample_size
            )
        x = self.conv_out(group_norm(self.conv_norm_out, x, silu=True, backend=fused))
        return x.contiguous()  # (B, out_channels, h, w)

    def _check_inputs(self, sample: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None) -> None:
        config = self.config
        if sample.ndim != 4 or sample.shape[1] != config.in_channels:
            raise TiengineError(
                f"UNet sample must be (B, {config.in_channels}, h, w), got {tuple(sample.shape)}"
            )
        weight = self.conv_in.weight
        if sample.dtype != weight.dtype or sample.device != weight.device:
            raise TiengineError(
                f"UNet sample is {sample.dtype} on {sample.device} but the weights are {weight.dtype} on {weight.device}"
            )
        if context.ndim != 3 or context.shape[0] != sample.shape[0] or context.shape[2] != config.cross_attention_dim:
            raise TiengineError(
                f"UNet context must be (B={sample.shape[0]}, T, {config.cross_attention_dim}), "
                f"got {tuple(context.shape)}"
            )
        if self.add_embedding is None:
            if y is not None:
                raise TiengineError("UNet got y but this config has no vector conditioning (addition_embed_type None)")
        elif y is None or tuple(y.shape) != (sample.shape[0], config.projection_class_embeddings_input_dim):
            found = None if y is None else tuple(y.shape)
            raise TiengineError(
                f"UNet y must be (B={sample.shape[0]}, {config.projection_class_embeddings_input_dim}) "
                f"(see text_time_conditioning), got {found}"
            )

