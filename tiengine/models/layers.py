"""Building blocks shared by the UNet and the VAE: timestep embeddings, ResnetBlock2D, attention,
Transformer2D, up/downsampling, and the upcasting norms.

Module and parameter names mirror diffusers (`diffusers.models.resnet.ResnetBlock2D`,
`diffusers.models.attention.BasicTransformerBlock`, `diffusers.models.transformers.Transformer2DModel`,
`diffusers.models.embeddings.Timesteps/TimestepEmbedding`), so state dicts load by identity.

Numerics:
- GroupNorm and LayerNorm run in fp32 for fp16/bf16 inputs (`layer_norm` here casts up and back;
  `group_norm` and `geglu` come from tiengine.models.fusions, the dispatcher that runs the fused Triton
  GroupNorm+SiLU and GEGLU kernels on CUDA and these PyTorch ops otherwise; `fused_backend` picks).
- Timestep sinusoids are always computed in fp32 (`timestep_embedding`).
- Softmax belongs to `tiengine.models.attention.attention` (SDPA and the Triton kernel accumulate in fp32);
  `Attention(upcast_attention=True)` additionally runs q k^T in fp32 for fp16/bf16 (SD2's overflow guard).

Layout: activations may be NCHW or channels_last; every reshape below works for both, and channels_last
makes the (B, C, H, W) <-> (B, H*W, C) moves of Transformer2DModel free views.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tiengine.models.attention import AttentionBackend, attention
from tiengine.models.fusions import HALF_DTYPES, FusedBackend, geglu, group_norm


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding (DDPM / diffusers `Timesteps`), always fp32: (N,) -> (N, dim).

    Frequency k of dim/2 is exp(-ln(max_period) * k / (dim/2 - freq_shift)); the halves are
    [sin, cos], or [cos, sin] with flip_sin_to_cos. Odd dims get one zero column.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(-math.log(max_period) * exponent / (half - freq_shift))  # (half,)
    angles = timesteps.to(torch.float32)[:, None] * frequencies[None, :]  # (N, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    embedding = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (N, 2*half)
    if dim % 2 == 1:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def text_time_conditioning(
    pooled_text: torch.Tensor,
    time_ids: torch.Tensor,
    *,
    time_embed_dim: int = 256,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
) -> torch.Tensor:
    """SDXL's vector conditioning `y` (diffusers addition_embed_type "text_time").

    pooled_text (B, P) and time_ids (B, K) -> (B, P + K * time_embed_dim) in pooled_text's dtype.
    SDXL base: P = 1280, K = 6 (original h, w, crop top, left, target h, w) -> 2816.
    SDXL refiner: K = 5 (original h, w, crop top, left, aesthetic score) -> 2560.
    """
    batch = pooled_text.shape[0]
    if time_ids.ndim != 2 or time_ids.shape[0] != batch:
        raise ValueError(f"time_ids must be (batch={batch}, K), got {tuple(time_ids.shape)}")
    sinusoids = timestep_embedding(
        time_ids.reshape(-1), time_embed_dim, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift
    )  # (B*K, time_embed_dim), fp32
    sinusoids = sinusoids.reshape(batch, -1)  # (B, K*time_embed_dim)
    return torch.cat([pooled_text.to(torch.float32), sinusoids], dim=-1).to(pooled_text.dtype)


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim, computed in fp32 for fp16/bf16 inputs."""
    if x.dtype in HALF_DTYPES:
        weight = None if norm.weight is None else norm.weight.float()
        bias = None if norm.bias is None else norm.bias.float()
        return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def pointwise(layer: nn.Linear | nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """A Linear, or a 1x1 Conv2d applied per pixel, on tokens (B, N, C_in) -> (B, N, C_out).

    A 1x1 convolution on (B, C, H, W) equals this on the (B, H*W, C) tokens, so Transformer2DModel's
    conv and linear projections (SD1 vs SD2/SDXL checkpoints) share one path without layout changes.
    """
    weight = layer.weight.reshape(layer.weight.shape[0], -1)  # (C_out, C_in), a view for contiguous weights
    return F.linear(tokens, weight, layer.bias)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and names) that runs weight-bound CPU shapes as one matrix product.

    On CPU, when a large kernel (>= gemm_min_weight elements, more than the caches hold) meets few
    output pixels (B*H_out*W_out <= gemm_max_rows: the UNet's low-resolution levels), the convolution is
    computed as im2col (the k*k shifted views of the small input, stacked) times the weight viewed as
    (out, in*k*k): the same sums of the same products, through a GEMM that streams the stored weight
    once instead of re-laying it out for oneDNN on every call. Other shapes use F.conv2d.
    """

    gemm_max_rows = 128
    gemm_min_weight = 1 << 22

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel_h, kernel_w = self.kernel_size
        stride_h, stride_w = self.stride
        pad_h, pad_w = self.padding
        batch, channels, height, width = x.shape
        out_h = (height + 2 * pad_h - kernel_h) // stride_h + 1
        out_w = (width + 2 * pad_w - kernel_w) // stride_w + 1
        rows = batch * out_h * out_w
        if (
            x.device.type != "cpu"
            or rows > self.gemm_max_rows
            or self.weight.numel() < self.gemm_min_weight
            or self.groups != 1
            or self.dilation != (1, 1)
            or self.padding_mode != "zeros"
        ):
            return super().forward(x)
        pixels = F.pad(x, (pad_w, pad_w, pad_h, pad_h)).permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C) view
        taps = [
            pixels[:, i : i + stride_h * (out_h - 1) + 1 : stride_h, j : j + stride_w * (out_w - 1) + 1 : stride_w]
            for i in range(kernel_h)
            for j in range(kernel_w)
        ]  # k*k views (B, H_out, W_out, C)
        # (B, H_out, W_out, C, k*k) -> (rows, C*k*k), the order of the weight's (out, in, kh, kw) layout
        columns = torch.stack(taps, dim=-1).reshape(rows, channels * kernel_h * kernel_w)
        out = F.linear(columns, self.weight.reshape(self.out_channels, -1), self.bias)  # (rows, out)
        out = out.view(batch, out_h, out_w, self.out_channels).permute(0, 3, 1, 2)  # (B, out, H_out, W_out)
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


class TimestepEmbedding(nn.Module):
    """diffusers TimestepEmbedding: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_features: int, out_features: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features, device=device, dtype=dtype)
        self.linear_2 = nn.Linear(out_features, out_features, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=1 (UNet), or padding=0 after a right/bottom zero pad (VAE encoder)."""

    def __init__(self, channels: int, *, padding: int, device=None, dtype=None) -> None:
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling (or to an explicit size, for odd skip shapes), then a 3x3 conv."""

    def __init__(self, channels: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        # nearest interpolation copies values, so it runs in any dtype without rounding
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D ("default" time-embedding norm, output scale 1).

    norm1 -> SiLU -> conv1 (+ time_emb_proj(silu(temb))) -> norm2 -> SiLU -> conv2, plus the
    (1x1 conv_shortcut when channels change) residual. temb_channels=None drops time_emb_proj (VAE).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, **factory)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, **factory)
        self.time_emb_proj = None if temb_channels is None else nn.Linear(temb_channels, out_channels, **factory)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, **factory)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, **factory)
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, **factory) if in_channels != out_channels else None
        )

    def forward(
        self, x: torch.Tensor, temb_silu: torch.Tensor | None = None, *, fused_backend: FusedBackend = "auto"
    ) -> torch.Tensor:
        """x (B, C_in, H, W); temb_silu (B, temb_channels), already passed through SiLU.
        fused_backend: GroupNorm+SiLU's (see tiengine.models.fusions)."""
        h = self.conv1(group_norm(self.norm1, x, silu=True, backend=fused_backend))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(temb_silu)[:, :, None, None]  # (B, C_out, 1, 1)
        h = self.conv2(group_norm(self.norm2, h, silu=True, backend=fused_backend))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Attention(nn.Module):
    """diffusers Attention (to_q, to_k, to_v, to_out.0) over token sequences (B, N, C).

    context=None is self-attention; otherwise keys/values come from context (B, M, context_dim).
    `key_value_context` (a plain attribute, default None) is an optional callable that maps that key/value
    source (B, M, C_src) to two tensors of the same shape, the inputs of to_k and to_v; extra networks
    that change the attention context (A1111 hypernetworks) set it. It must not be an nn.Module (that
    would register it as a submodule and change the state dict).
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        upcast_attention: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        context_dim = query_dim if context_dim is None else context_dim
        if query_dim % heads != 0:
            raise ValueError(f"attention width {query_dim} is not divisible by {heads} heads")
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.to_q = nn.Linear(query_dim, query_dim, bias=qkv_bias, **factory)
        self.to_k = nn.Linear(context_dim, query_dim, bias=qkv_bias, **factory)
        self.to_v = nn.Linear(context_dim, query_dim, bias=qkv_bias, **factory)
        # index 1 of diffusers' to_out is a parameterless Dropout; inference has none
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim, **factory)])
        self.key_value_context: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        backend: AttentionBackend = "auto",
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C). chunk_size splits the queries to bound the score memory."""
        batch, tokens, width = x.shape
        source = x if context is None else context  # (B, M, C_src)
        if self.key_value_context is None:
            key_source = value_source = source
        else:
            key_source, value_source = self.key_value_context(source)  # each (B, M, C_src)
        head_dim = width // self.heads
        # (B, N, C) -> (B, N, heads, d) -> (B, heads, N, d)
        q = self.to_q(x).view(batch, tokens, self.heads, head_dim).transpose(1, 2)
        k = self.to_k(key_source).view(batch, -1, self.heads, head_dim).transpose(1, 2)  # (B, heads, M, d)
        v = self.to_v(value_source).view(batch, -1, self.heads, head_dim).transpose(1, 2)  # (B, heads, M, d)
        dtype = q.dtype
        if self.upcast_attention and dtype in HALF_DTYPES:
            q, k, v = q.float(), k.float(), v.float()
        if chunk_size is None or chunk_size >= tokens:
            out = attention(q, k, v, backend=backend)  # (B, heads, N, d)
        else:
            out = torch.cat(
                [attention(q_part, k, v, backend=backend) for q_part in q.split(chunk_size, dim=2)], dim=2
            )  # (B, heads, N, d)
        out = out.to(dtype).transpose(1, 2).reshape(batch, tokens, width)  # (B, N, C)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """diffusers GEGLU: proj to 2*inner, then hidden * gelu(gate) (exact erf GELU)."""

    def __init__(self, dim: int, inner_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, *, fused_backend: FusedBackend = "auto") -> torch.Tensor:
        """x (..., dim) -> (..., inner); the fused Triton kernel on CUDA (see tiengine.models.fusions)."""
        return geglu(self.proj, x, backend=fused_backend)


class FeedForward(nn.Module):
    """diffusers FeedForward with GEGLU: net.0 (GEGLU), net.1 (Dropout: identity), net.2 (Linear)."""

    def __init__(self, dim: int, *, mult: int = 4, device=None, dtype=None) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList(
            [
                GEGLU(dim, inner, device=device, dtype=dtype),
                nn.Identity(),
                nn.Linear(inner, dim, device=device, dtype=dtype),
            ]
        )

    def forward(self, x: torch.Tensor, *, fused_backend: FusedBackend = "auto") -> torch.Tensor:
        return self.net[2](self.net[0](x, fused_backend=fused_backend))


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention on the text context, GEGLU feed-forward."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        context_dim: int,
        upcast_attention: bool,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, **factory)
        self.attn1 = Attention(dim, heads=heads, upcast_attention=upcast_attention, **factory)
        self.norm2 = nn.LayerNorm(dim, **factory)
        self.attn2 = Attention(
            dim, heads=heads, context_dim=context_dim, upcast_attention=upcast_attention, **factory
        )
        self.norm3 = nn.LayerNorm(dim, **factory)
        self.ff = FeedForward(dim, **factory)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, *, backend: AttentionBackend, fused_backend: FusedBackend
    ) -> torch.Tensor:
        """x (B, N, C), context (B, M, context_dim) -> (B, N, C)."""
        x = x + self.attn1(layer_norm(self.norm1, x), backend=backend)
        x = x + self.attn2(layer_norm(self.norm2, x), context, backend=backend)
        return x + self.ff(layer_norm(self.norm3, x), fused_backend=fused_backend)


class Transformer2DModel(nn.Module):
    """diffusers Transformer2DModel (continuous input): GroupNorm (eps 1e-6), proj_in, blocks, proj_out,
    residual. use_linear_projection picks Linear projections over tokens (SD2, SDXL) or 1x1 convs (SD1).
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        num_layers: int,
        context_dim: int,
        groups: int,
        use_linear_projection: bool,
        upcast_attention: bool,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, **factory)
        if use_linear_projection:
            self.proj_in: nn.Module = nn.Linear(channels, channels, **factory)
            self.proj_out: nn.Module = nn.Linear(channels, channels, **factory)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1, **factory)  # (C, C, 1, 1) weights
            self.proj_out = nn.Conv2d(channels, channels, 1, **factory)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    channels, heads=heads, context_dim=context_dim, upcast_attention=upcast_attention, **factory
                )
                for _ in range(num_layers)
            ]
        )

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, *, backend: AttentionBackend, fused_backend: FusedBackend
    ) -> torch.Tensor:
        """x (B, C, H, W), context (B, M, context_dim) -> (B, C, H, W)."""
        batch, channels, height, width = x.shape
        h = group_norm(self.norm, x, backend=fused_backend)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, H*W, C)
        h = pointwise(self.proj_in, h)
        for block in self.transformer_blocks:
            h = block(h, context, backend=backend, fused_backend=fused_backend)
        h = pointwise(self.proj_out, h)
        return x + h.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W)
