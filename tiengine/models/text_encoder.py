"""CLIP text encoders (OpenAI CLIP-L, OpenCLIP-H, OpenCLIP-bigG) in plain PyTorch.

Architecture: the pre-norm causal transformer of Radford et al. 2021 ("Learning Transferable Visual
Models From Natural Language Supervision") as used by Stable Diffusion 1.x (CLIP ViT-L/14 text tower),
2.x (OpenCLIP ViT-H/14) and XL (CLIP-L plus OpenCLIP ViT-bigG/14 with its text projection).

Names: modules and parameters mirror transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`
state-dict keys (`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.{i}.self_attn.
q_proj.weight`, ..., `text_model.final_layer_norm.*`, `text_projection.weight`), so a diffusers
`text_encoder/` folder loads as the identity. Config field names follow transformers' `CLIPTextConfig`.
Constants: vocabulary 49408 and EOS 49407 are those of the CLIP BPE vocabulary (tiengine.text.tokenizer);
quick_gelu's 1.702 is OpenAI CLIP's sigmoid approximation of GELU.

How Stable Diffusion reads each encoder is configuration, not code: `output_layer` (which entry of
`hidden_states` is the cross-attention context), `output_final_norm` (whether `final_layer_norm` is applied
to it), `clip_skip_enabled` (whether the user's clip-skip setting moves that layer), `pad_token_id` and
`eos_token_id`. `ClipTextEncoder.encode` is that read; `forward` returns every hidden state.

Textual-inversion vocabulary extension: ids >= vocab_size index the rows of `extra_token_embeddings`
(id 49408 -> row 0); position embeddings are added afterwards, as for words. Gradients reach those rows
and nothing else of the lookup.

Linear layers: `linear_backend="onednn"` calls PyTorch's oneDNN inner product
(`torch.ops.mkldnn._linear_pointwise`) on the unchanged nn.Linear parameters, with the bias and the
residual add fused into it; "torch" calls F.linear (MKL sgemm for fp32 on CPU). Same math in fewer
passes: in fp32 oneDNN's small-M kernels beat MKL's at 77 tokens, in bf16 both run oneDNN and only the
fused passes differ (benchmarks/encode.py times both). The op has no autograd formula, so "auto" picks
it for CPU fp32, and bf16 where the CPU has oneDNN's bf16 kernels (AVX-512 or AMX), only when no
gradient is needed, and F.linear otherwise; and only from hidden size
256 on, since on narrow models its per-call overhead outweighs the gain (measured on a 2-core AVX-512
CPU, one thread, 4 layers: 1.6x slower at 32, even at 128-256, 8% faster at 512).

Numerics: in fp32 this matches transformers to fp32 rounding. In fp16/bf16 the residual stream and the
linear layers stay in the model dtype (as transformers does); every layer norm computes in fp32 and
casts back (`_layer_norm_fp32`), and the softmax accumulates in fp32 inside the attention dispatcher
(tiengine.models.attention).

Pooling runs only when asked for (`forward(pool=True)`, `encode(pooled=True)`): a read that needs only
the context never pools, so ids without an EOS (an embedding written over a chunk's only EOS, as A1111's
SD2 chunks can have) encode. By default it takes each row's first EOS, found by comparing ids with
`eos_token_id`, never by argmax over ids; a caller whose ids are not the reference's (embedding
pseudo-tokens) names the positions instead (`pool_positions`; tiengine.text.conditioning passes A1111's).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tiengine.errors import CheckpointError, TiengineError
from tiengine.models import cpu_precision
from tiengine.models.attention import AttentionBackend, attention

CLIP_VOCAB_SIZE = 49408  # 256 bytes + 256 `</w>` forms + 48 894 merges + BOS + EOS
CLIP_EOS_TOKEN_ID = 49407  # <|endoftext|>
CLIP_CONTEXT_LENGTH = 77  # BOS + 75 tokens + EOS
QUICK_GELU_SCALE = 1.702  # OpenAI CLIP: x * sigmoid(1.702 x) approximates GELU
HIDDEN_ACTS = ("quick_gelu", "gelu")

LinearBackend = Literal["auto", "torch", "onednn"]
LINEAR_BACKENDS: tuple[str, ...] = ("auto", "torch", "onednn")
ONEDNN_AUTO_MIN_HIDDEN = 256  # "auto" uses oneDNN only for encoders at least this wide


class TokenIdError(TiengineError):
    """Token ids given to a text encoder are outside its vocabulary (plus extra embedding rows)."""


@dataclass(frozen=True)
class TextEncoderConfig:
    """Architecture of one CLIP text encoder and how Stable Diffusion reads it.

    Architecture fields carry transformers' `CLIPTextConfig` names. `projection_dim` is None when the
    model has no `text_projection` (transformers' `CLIPTextModel`; its config.json still lists a
    projection_dim, which that class ignores).

    Reading fields:
    - `pad_token_id`: id filling a chunk after EOS (49407 for OpenAI CLIP-L, 0 for OpenCLIP-H/bigG).
    - `eos_token_id`: pooling takes the first position whose id equals it.
    - `output_layer`: index into `hidden_states` (embedding output + one entry per layer) giving the
      context by default: -1 is the last layer, -2 the penultimate.
    - `output_final_norm`: apply `final_layer_norm` to that hidden state (SD1/SD2 yes, SDXL no).
    - `clip_skip_enabled`: whether the user's clip skip N (1 = none) replaces `output_layer` by
      `-N`, i.e. `hidden_states[-N]` (A1111's rule for SD1, and for SDXL's CLIP-L under its opt-in
      "clip skip for SDXL" option, where skip 1 then means the last layer). When False, clip skip is
      ignored (SD2, OpenCLIP-bigG, SDXL CLIP-L by default).
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    projection_dim: int | None = None
    vocab_size: int = CLIP_VOCAB_SIZE
    max_position_embeddings: int = CLIP_CONTEXT_LENGTH
    layer_norm_eps: float = 1e-5
    pad_token_id: int = CLIP_EOS_TOKEN_ID
    eos_token_id: int = CLIP_EOS_TOKEN_ID
    output_layer: int = -1
    output_final_norm: bool = True
    clip_skip_enabled: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}")
        for name in ("pad_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} {getattr(self, name)} is outside the vocabulary 0..{self.vocab_size - 1}")
        self.hidden_state_index(self.output_layer)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def hidden_state_index(self, output_layer: int) -> int:
        """Non-negative index into `hidden_states` (0 = embedding output, L = last layer) for a possibly
        negative `output_layer`; it is also the number of layers that must run to produce it."""
        count = self.num_hidden_layers + 1
        if not -count <= output_layer < count:
            raise ValueError(
                f"output_layer {output_layer} is outside hidden_states of a {self.num_hidden_layers}-layer "
                f"encoder (valid: {-count}..{count - 1})"
            )
        return output_layer % count

    def output_layer_for_clip_skip(self, clip_skip: int) -> int:
        """The `hidden_states` index to read under the user's clip skip N (1 = no skip)."""
        if not 1 <= clip_skip <= self.num_hidden_layers:
            raise ValueError(f"clip skip must be in 1..{self.num_hidden_layers}, got {clip_skip}")
        return -clip_skip if self.clip_skip_enabled else self.output_layer

    # Presets ----------------------------------------------------------------------------------------

    @classmethod
    def sd1_clip_l(cls) -> TextEncoderConfig:
        """SD 1.x: OpenAI CLIP ViT-L/14 text tower, final layer through final_layer_norm, clip skip on."""
        return cls()

    @classmethod
    def sd2_openclip_h(cls, num_hidden_layers: int = 24) -> TextEncoderConfig:
        """SD 2.x: OpenCLIP ViT-H/14, read at layer 23 through final_layer_norm; clip skip ignored.

        The single-file checkpoint holds all 24 layers (layer 23 is the penultimate, index -2);
        diffusers folders drop the unused last one (23 layers, index -1).
        """
        if num_hidden_layers not in (23, 24):
            raise ValueError(f"SD2's OpenCLIP-H text encoder has 23 or 24 layers, got {num_hidden_layers}")
        return cls(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=num_hidden_layers, num_attention_heads=16,
            hidden_act="gelu", pad_token_id=0, output_layer=23 - (num_hidden_layers + 1), output_final_norm=True,
            clip_skip_enabled=False,
        )  # fmt: skip

    @classmethod
    def sdxl_clip_l(cls, clip_skip_enabled: bool = False) -> TextEncoderConfig:
        """SDXL encoder 1: CLIP-L read at the penultimate layer without final_layer_norm.

        `clip_skip_enabled=True` is A1111's opt-in option: clip skip N then reads hidden_states[-N].
        """
        return cls(output_layer=-2, output_final_norm=False, clip_skip_enabled=clip_skip_enabled)

    @classmethod
    def sdxl_openclip_bigg(cls) -> TextEncoderConfig:
        """SDXL encoder 2: OpenCLIP ViT-bigG/14, penultimate layer without final_layer_norm; its pooled
        output (through text_projection) conditions the UNet's added embedding."""
        return cls(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
            projection_dim=1280, pad_token_id=0, output_layer=-2, output_final_norm=False, clip_skip_enabled=False,
        )  # fmt: skip

    @classmethod
    def tiny(
        cls, hidden_act: str = "quick_gelu", num_hidden_layers: int = 4, projection_dim: int | None = None,
        **sd_fields: Any,
    ) -> TextEncoderConfig:
        """Hidden width 32 for tests; the real 49408-word vocabulary, so real token ids work."""
        return cls(
            hidden_size=32, intermediate_size=64, num_hidden_layers=num_hidden_layers, num_attention_heads=2,
            hidden_act=hidden_act, projection_dim=projection_dim, **sd_fields,
        )  # fmt: skip

    # Serialisation ----------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, config_dict: dict[str, Any], **sd_fields: Any) -> TextEncoderConfig:
        """Architecture from a transformers CLIPTextConfig config.json dict (or a CLIPConfig's
        `text_config`); the Stable Diffusion reading fields come from `sd_fields` (their defaults are
        SD1's). transformers' own bos/eos/pad ids are ignored: old configs carry placeholder values.
        `projection_dim` is taken only when the architecture is CLIPTextModelWithProjection, unless
        given in `sd_fields`.
        """
        if "text_config" in config_dict:
            config_dict = config_dict["text_config"]
        model_type = config_dict.get("model_type", "clip_text_model")
        if model_type not in ("clip_text_model", "clip"):
            raise CheckpointError(f"config.json: model_type is {model_type!r}, expected 'clip_text_model'")
        fields: dict[str, Any] = {}
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act"):
            if name not in config_dict:
                raise CheckpointError(f"config.json: missing key {name!r} of a CLIPTextConfig")
            fields[name] = config_dict[name]
        for name in ("vocab_size", "max_position_embeddings", "layer_norm_eps"):
            if name in config_dict:
                fields[name] = config_dict[name]
        if "CLIPTextModelWithProjection" in (config_dict.get("architectures") or ()):
            fields["projection_dim"] = config_dict.get("projection_dim", 512)
        return cls._checked(fields | sd_fields, "config.json")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextEncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"text encoder config: unknown keys {unknown} (known: {sorted(known)})")
        return cls._checked(data, "text encoder config")

    @classmethod
    def _checked(cls, fields: dict[str, Any], source: str) -> TextEncoderConfig:
        try:
            return cls(**fields)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: {error}") from error


@dataclass(frozen=True)
class ClipTextOutput:
    """What `ClipTextEncoder.forward` computed.

    hidden_states: embedding output, then the output of each layer that ran; each (B, T, hidden).
    pooled_output: (B, hidden) final_layer_norm(last layer) at the first EOS (or the positions given);
    None when not asked for or stopped early.
    text_embeds: (B, projection_dim) pooled_output @ text_projection.T; None without a projection or
    without pooled_output.
    """

    hidden_states: tuple[torch.Tensor, ...]
    pooled_output: torch.Tensor | None
    text_embeds: torch.Tensor | None


def _layer_norm_fp32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm computed in fp32 and cast back to x's dtype (a no-op cast in fp32)."""
    if x.dtype == torch.float32:
        return norm(x)
    y = F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    return y.to(x.dtype)


def _onednn_linear_unsupported(x: torch.Tensor, needs_grad: bool) -> str | None:
    """Why the oneDNN linear path cannot run on x, or None when it can."""
    if needs_grad:
        return "gradients are needed and the oneDNN op has no autograd formula"
    if x.device.type != "cpu":
        return f"tensors are on {x.device}, not the CPU"
    if x.dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {x.dtype} is not float32 or bfloat16"
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return "torch.backends.mkldnn is disabled or unavailable"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this PyTorch build has no mkldnn::_linear_pointwise"
    if x.dtype == torch.bfloat16 and not cpu_precision.onednn_bf16_supported():
        return "this CPU has no oneDNN bfloat16 kernels (they need AVX-512 or AMX; an AVX2 CPU has none)"
    return None


def _linear(layer: nn.Linear, x: torch.Tensor, onednn: bool, residual: torch.Tensor | None = None) -> torch.Tensor:
    """layer(x), plus residual when given; the oneDNN path fuses bias and residual into the matmul."""
    if onednn:
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, layer.weight, layer.bias, "add")
    y = F.linear(x, layer.weight, layer.bias)
    return y if residual is None else residual + y


def _embedding(rows: int, width: int, device: torch.device | str | None, dtype: torch.dtype | None) -> nn.Embedding:
    """nn.Embedding(rows, width); on the meta device (a model about to be loaded) without its normal_ init,
    which torch runs there through its Python reference ops and the first time imports torch._dynamo (about
    3 s of every model load)."""
    if device is not None and torch.device(device).type == "meta":
        return nn.Embedding(rows, width, _weight=torch.empty(rows, width, device="meta", dtype=dtype))
    return nn.Embedding(rows, width, device=device, dtype=dtype)


class ClipTextEmbeddings(nn.Module):
    def __init__(self, config: TextEncoderConfig, device: torch.device | str | None, dtype: torch.dtype | None):
        super().__init__()
        self.token_embedding = _embedding(config.vocab_size, config.hidden_size, device, dtype)
        self.position_embedding = _embedding(config.max_position_embeddings, config.hidden_size, device, dtype)

    def forward(self, input_ids: torch.Tensor, extra_token_embeddings: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids -> (B, T, hidden): token rows (base table or extra rows) plus position rows."""
        table = self.token_embedding.weight  # (vocab, hidden)
        if extra_token_embeddings is None:
            words = F.embedding(input_ids, table)
        else:
            # Two gathers and a select, so neither table is copied and the extra rows get gradients
            # only at their own positions; the clamped indices of the unselected branch are never used.
            vocab_size = table.shape[0]
            extra = extra_token_embeddings.to(table)
            is_extra = (input_ids >= vocab_size).unsqueeze(-1)  # (B, T, 1)
            base_rows = F.embedding(input_ids.clamp(max=vocab_size - 1), table)
            extra_rows = F.embedding((input_ids - vocab_size).clamp(min=0), extra)
            words = torch.where(is_extra, extra_rows, base_rows)
        positions = self.position_embedding.weight[: input_ids.shape[1]]  # (T, hidden)
        return words + positions


class ClipAttention(nn.Module):
    def __init__(self, config: TextEncoderConfig, device: torch.device | str | None, dtype: torch.dtype | None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(width, width, **factory)
        self.k_proj = nn.Linear(width, width, **factory)
        self.v_proj = nn.Linear(width, width, **factory)
        self.out_proj = nn.Linear(width, width, **factory)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor, backend: AttentionBackend, onednn: bool
    ) -> torch.Tensor:
        """residual + out_proj(causal self-attention of x); x and residual (B, T, hidden)."""
        batch, tokens, width = x.shape
        heads = (batch, tokens, self.num_heads, self.head_dim)
        q = _linear(self.q_proj, x, onednn).view(heads).transpose(1, 2)  # (B, H, T, d)
        k = _linear(self.k_proj, x, onednn).view(heads).transpose(1, 2)  # (B, H, T, d)
        v = _linear(self.v_proj, x, onednn).view(heads).transpose(1, 2)  # (B, H, T, d)
        out = attention(q, k, v, causal=True, backend=backend)  # (B, H, T, d)
        out = out.transpose(1, 2).reshape(batch, tokens, width)  # (B, T, hidden)
        return _linear(self.out_proj, out, onednn, residual)


class ClipMLP(nn.Module):
    def __init__(self, config: TextEncoderConfig, device: torch.device | str | None, dtype: torch.dtype | None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.hidden_act = config.hidden_act
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, **factory)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, **factory)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, onednn: bool) -> torch.Tensor:
        """residual + fc2(act(fc1(x))); x and residual (B, T, hidden)."""
        h = _linear(self.fc1, x, onednn)  # (B, T, intermediate)
        if self.hidden_act == "quick_gelu":
            h = h * torch.sigmoid(QUICK_GELU_SCALE * h)
        else:
            h = F.gelu(h)  # exact (erf) GELU, as OpenCLIP and transformers' "gelu"
        return _linear(self.fc2, h, onednn, residual)


class ClipEncoderLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig, device: torch.device | str | None, dtype: torch.dtype | None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **factory)
        self.self_attn = ClipAttention(config, device, dtype)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **factory)
        self.mlp = ClipMLP(config, device, dtype)

    def forward(self, x: torch.Tensor, backend: AttentionBackend, onednn: bool) -> torch.Tensor:
        x = self.self_attn(_layer_norm_fp32(self.layer_norm1, x), x, backend, onednn)
        return self.mlp(_layer_norm_fp32(self.layer_norm2, x), x, onednn)


class ClipEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig, device: torch.device | str | None, dtype: torch.dtype | None):
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(config, device, dtype) for _ in range(config.num_hidden_layers))


class ClipTextTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig, device: torch.device | str | None, dtype: torch.dtype | None):
        super().__init__()
        self.embeddings = ClipTextEmbeddings(config, device, dtype)
        self.encoder = ClipEncoder(config, device, dtype)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device, dtype=dtype)


class ClipTextEncoder(nn.Module):
    """A CLIP text encoder with transformers-compatible parameter names (see the module docstring)."""

    def __init__(
        self,
        config: TextEncoderConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.config = config
        self.text_model = ClipTextTransformer(config, device, dtype)
        self.text_projection = None
        if config.projection_dim is not None:
            width, projection = config.hidden_size, config.projection_dim
            self.text_projection = nn.Linear(width, projection, bias=False, device=device, dtype=dtype)

    def final_layer_norm(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """The encoder's final LayerNorm (fp32 compute) applied to any hidden state (B, T, hidden)."""
        return _layer_norm_fp32(self.text_model.final_layer_norm, hidden_state)

    def forward(
        self,
        input_ids: torch.Tensor,
        extra_token_embeddings: torch.Tensor | None = None,
        *,
        num_layers: int | None = None,
        pool: bool = True,
        pool_positions: torch.Tensor | None = None,
        attention_backend: AttentionBackend = "auto",
        linear_backend: LinearBackend = "auto",
    ) -> ClipTextOutput:
        """Encode (B, T) token ids, T <= max_position_embeddings.

        extra_token_embeddings: (E, hidden) rows for ids vocab_size .. vocab_size + E - 1.
        num_layers: run only the first `num_layers` layers (default all); pooling needs all of them.
        pool: compute pooled_output / text_embeds when every layer ran (False: never pool).
        pool_positions: (B,) position to pool in each row, default the first EOS (a caller that wrote an
        embedding's ids over the EOS slot, as A1111 can, names the slot it pools at).
        attention_backend: see tiengine.models.attention; linear_backend: see the module docstring.
        """
        config = self.config
        self._check_ids(input_ids, extra_token_embeddings)
        run = config.num_hidden_layers if num_layers is None else num_layers
        if not 0 <= run <= config.num_hidden_layers:
            raise ValueError(f"num_layers must be in 0..{config.num_hidden_layers}, got {num_layers}")

        x = self.text_model.embeddings(input_ids, extra_token_embeddings)  # (B, T, hidden)
        onednn = self._use_onednn(x, linear_backend)
        hidden_states = [x]
        for layer in self.text_model.encoder.layers[:run]:
            x = layer(x, attention_backend, onednn)
            hidden_states.append(x)

        pooled = text_embeds = None
        if pool and run == config.num_hidden_layers:
            pooled = self._pool(x, input_ids, pool_positions)
            if self.text_projection is not None:
                text_embeds = self.text_projection(pooled)
        return ClipTextOutput(tuple(hidden_states), pooled, text_embeds)

    def encode(
        self,
        input_ids: torch.Tensor,
        extra_token_embeddings: torch.Tensor | None = None,
        *,
        output_layer: int | None = None,
        final_norm: bool | None = None,
        pooled: bool = False,
        pool_positions: torch.Tensor | None = None,
        attention_backend: AttentionBackend = "auto",
        linear_backend: LinearBackend = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stable Diffusion's read of this encoder: (context (B, T, hidden), pooled or None).

        output_layer / final_norm default to the config's (`config.output_layer_for_clip_skip(n)` gives
        the layer for a clip skip). Only the layers up to `output_layer` run unless `pooled` is asked
        for, and only then does it pool; pooled is `text_embeds` when the encoder has a projection, else
        `pooled_output`.
        """
        config = self.config
        layer = config.output_layer if output_layer is None else output_layer
        index = config.hidden_state_index(layer)
        out = self(
            input_ids,
            extra_token_embeddings,
            num_layers=config.num_hidden_layers if pooled else index,
            pool=pooled,
            pool_positions=pool_positions,
            attention_backend=attention_backend,
            linear_backend=linear_backend,
        )
        context = out.hidden_states[index]
        if config.output_final_norm if final_norm is None else final_norm:
            context = self.final_layer_norm(context)
        if not pooled:
            return context, None
        return context, out.text_embeds if out.text_embeds is not None else out.pooled_output

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Strict load that also accepts transformers' layouts: keys without the `text_model.` prefix
        (transformers 5's CLIPTextModel) and the `position_ids` buffer of older checkpoints."""
        keys = dict(state_dict)
        keys.pop("text_model.embeddings.position_ids", None)
        keys.pop("embeddings.position_ids", None)
        if not any(key.startswith("text_model.") for key in keys):
            keys = {
                key if key == "text_projection.weight" else f"text_model.{key}": value for key, value in keys.items()
            }
        return super().load_state_dict(keys, strict=strict, assign=assign)

    def _use_onednn(self, x: torch.Tensor, linear_backend: LinearBackend) -> bool:
        """Resolve the linear backend for embeddings x (B, T, hidden) (see the module docstring)."""
        if linear_backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend must be one of {LINEAR_BACKENDS}, got {linear_backend!r}")
        if linear_backend == "torch":
            return False
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(param.requires_grad for param in self.text_model.encoder.parameters())
        )
        reason = _onednn_linear_unsupported(x, needs_grad)
        if linear_backend == "onednn":
            if reason is not None:
                raise ValueError(f"linear_backend 'onednn' cannot run: {reason}")
            return True
        return reason is None and self.config.hidden_size >= ONEDNN_AUTO_MIN_HIDDEN

    def _check_ids(self, input_ids: torch.Tensor, extra_token_embeddings: torch.Tensor | None) -> None:
        config = self.config
        shape = tuple(input_ids.shape)
        if len(shape) != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TokenIdError(f"token ids must be integers of shape (batch, tokens), got {input_ids.dtype} {shape}")
        if shape[1] > config.max_position_embeddings:
            raise TokenIdError(f"{shape[1]} tokens exceed the encoder's {config.max_position_embeddings} positions")
        extra_rows = 0
        if extra_token_embeddings is not None:
            extra_shape = tuple(extra_token_embeddings.shape)
            if len(extra_shape) != 2 or extra_shape[1] != config.hidden_size:
                raise TokenIdError(f"extra_token_embeddings must be (rows, {config.hidden_size}), got {extra_shape}")
            extra_rows = extra_shape[0]
        limit = config.vocab_size + extra_rows
        bad = (input_ids < 0) | (input_ids >= limit)
        if bad.any():
            position = tuple(int(i) for i in bad.nonzero()[0])
            raise TokenIdError(
                f"token id {int(input_ids[position])} at (row, position) {position} is outside 0..{limit - 1} "
                f"(vocabulary {config.vocab_size} + {extra_rows} extra embedding rows)"
            )

    def _pool(
        self, last_hidden: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """final_layer_norm(last layer) at `positions`, default each row's first EOS: (B, T, hidden) -> (B, hidden)."""
        if positions is None:
            is_eos = input_ids == self.config.eos_token_id  # (B, T)
            if not bool(is_eos.any(dim=1).all()):
                row = int((~is_eos.any(dim=1)).nonzero()[0, 0])
                raise TokenIdError(f"token ids row {row} has no EOS ({self.config.eos_token_id}); pooling needs one")
            positions = is_eos.int().argmax(dim=1)  # (B,): argmax returns the first maximal position
        rows = last_hidden[torch.arange(last_hidden.shape[0], device=last_hidden.device), positions]  # (B, hidden)
        return self.final_layer_norm(rows)
