"""Prompt texts -> cross-attention context (and SDXL pooled output), exactly as A1111 computes it.

One call of `encode_texts` is one A1111 `FrozenCLIPEmbedderWithCustomWords.forward(texts)`: every text is
chunked (tiengine.text.chunking), shorter texts are padded with empty chunks, chunk i of every text is encoded
in one batch per text encoder, emphasis is applied to that batch, and the chunks are concatenated along
the token axis: (B, 77 * chunks, C). SD2's and SDXL-G's zero padding after the first EOS is applied per
encoder. SDXL concatenates its two encoders' outputs on channels (768 + 1280 = 2048); its pooled output
comes from encoder 2's chunk 0, pooled where OpenCLIP pools (`pool_positions`). No other encoder call
pools: SD2's OpenCLIP-H reads its context only, so a chunk whose only EOS an embedding's vectors cover
(comma backtracking, see tiengine.text.chunking) encodes as in A1111.

Emphasis modes (the conditioning spec, applied to each chunk batch z of shape (B, 77, C)):
- "original": `m0 = z.mean(); z = z * w; z = z * (m0 / z.mean())` (one scalar mean over the batch);
- "no_norm": `z * w`; "ignore": weights parsed, none applied; "none": no parsing at all;
- "lerp" (extra, opt-in): `z_empty + (z - z_empty) * w` with z_empty the encoding of an empty chunk.
Clip skip: each encoder's config says which hidden state it reads and whether clip skip moves it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tiengine.errors import TiengineError
from tiengine.text.chunking import (
    DEFAULT_COMMA_BACKTRACK,
    EMPHASIS_MODES,
    PromptChunk,
    TokenizedPrompt,
    empty_chunk,
    pad_chunk_batch,
    tokenize_prompt,
)
from tiengine.text.prompt import DEFAULT_LIMITS, PromptLimits
from tiengine.text.tokenizer import CLIP_VOCAB_SIZE, EOS_TOKEN_ID, ClipTokenizer

if TYPE_CHECKING:
    from tiengine.models.text_encoder import ClipTextEncoder  # called, never built, here


class ConditioningError(TiengineError):
    """Bad conditioning options (emphasis mode, clip skip) or encoders that do not fit together."""


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder as the model uses it: its component name, the embedding-vector key it reads
    (`clip_l`, `clip_h` or `clip_g`) and the module."""

    component: str
    embedding_key: str
    encoder: ClipTextEncoder


@dataclass(frozen=True)
class EncodeOptions:
    """How prompts become conditioning; the defaults are A1111's."""

    clip_skip: int = 1
    emphasis: str = "original"
    comma_backtrack: int = DEFAULT_COMMA_BACKTRACK
    # False: embeddings bind only through `embedding:NAME` (so the explicit syntax is set on).
    bare_names: bool = True
    # True: `embedding:NAME` is tiengine's explicit reference (the words "embedding:" are not encoded).
    # False (A1111): it is ordinary text; only a bare name in it binds (tiengine.text.tokenizer).
    explicit_embedding_syntax: bool = False
    # True: fixes A1111's comma-backtrack quirk that misplaces an embedding (see tiengine.text.chunking).
    keep_embeddings_on_backtrack: bool = False

    def __post_init__(self) -> None:
        if self.emphasis not in EMPHASIS_MODES:
            raise ConditioningError(f"emphasis must be one of {', '.join(EMPHASIS_MODES)}, got {self.emphasis!r}")
        if not isinstance(self.clip_skip, int) or self.clip_skip < 1:
            raise ConditioningError(f"clip skip must be an integer >= 1, got {self.clip_skip!r}")
        if self.comma_backtrack < 0:
            raise ConditioningError(f"comma backtrack must be >= 0, got {self.comma_backtrack}")
        if not self.bare_names:  # implied: one spelling (and one cache key) per behaviour
            object.__setattr__(self, "explicit_embedding_syntax", True)


@dataclass
class EncodedTexts:
    """The result of one batch: context (B, 77 * chunks, C), pooled (B, P) or None, the tokenized texts."""

    context: torch.Tensor
    pooled: torch.Tensor | None
    prompts: list[TokenizedPrompt] = field(default_factory=list)


def encode_texts(
    texts: Sequence[str],
    tokenizer: ClipTokenizer,
    encoders: Sequence[TextEncoderSlot],
    extra_rows: Mapping[str, torch.Tensor] | None = None,
    options: EncodeOptions = EncodeOptions(),
    *,
    zero_if_empty: bool = False,
    limits: PromptLimits = DEFAULT_LIMITS,
) -> EncodedTexts:
    """Encode a batch of prompt texts as one A1111 forward pass.

    extra_rows: embedding key -> (added ids, hidden) rows for the tokenizer's added ids, in id order.
    zero_if_empty: SDXL's rule for the negative prompt: when every text is empty the context and the
    pooled output are zeros. limits: the bounds of the attention parser (tiengine.text.prompt).
    """
    if not texts:
        raise ConditioningError("encode_texts needs at least one text")
    return encode_tokenized(
        tokenize_texts(texts, tokenizer, options, limits=limits), encoders, extra_rows, options,
        zero_if_empty=zero_if_empty,
    )


def tokenize_texts(
    texts: Sequence[str], tokenizer: ClipTokenizer, options: EncodeOptions = EncodeOptions(), *,
    limits: PromptLimits = DEFAULT_LIMITS,
) -> list[TokenizedPrompt]:
    """The chunks of each text under `options` (the token half of `encode_texts`, reusable across calls)."""
    return [
        tokenize_prompt(
            text,
            tokenizer,
            emphasis=options.emphasis,
            comma_backtrack=options.comma_backtrack,
            bare_names=options.bare_names,
            explicit_embedding_syntax=options.explicit_embedding_syntax,
            keep_embeddings_on_backtrack=options.keep_embeddings_on_backtrack,
            limits=limits,
        )
        for text in texts
    ]


def encode_tokenized(
    prompts: Sequence[TokenizedPrompt],
    encoders: Sequence[TextEncoderSlot],
    extra_rows: Mapping[str, torch.Tensor] | None = None,
    options: EncodeOptions = EncodeOptions(),
    *,
    zero_if_empty: bool = False,
) -> EncodedTexts:
    """The encoder half of `encode_texts`, for prompts chunked by `tokenize_texts` with the same options."""
    if not prompts:
        raise ConditioningError("encode_tokenized needs at least one prompt")
    if not encoders:
        raise ConditioningError("encoding needs at least one text encoder")
    chunk_batches = pad_chunk_batch(prompts)  # (chunks, B)
    contexts: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for slot in encoders:
        rows = None if extra_rows is None else extra_rows.get(slot.embedding_key)
        per_chunk = []
        for index, batch in enumerate(chunk_batches):
            z, chunk_pooled = _encode_chunk_batch(slot, batch, rows, options, want_pooled=index == 0)
            per_chunk.append(z)
            if chunk_pooled is not None:
                pooled = chunk_pooled
        contexts.append(torch.cat(per_chunk, dim=1))  # (B, 77 * chunks, C_encoder)
    context = torch.cat(contexts, dim=2) if len(contexts) > 1 else contexts[0]
    if zero_if_empty and all(prompt.text == "" for prompt in prompts):
        context = torch.zeros_like(context)
        pooled = None if pooled is None else torch.zeros_like(pooled)
    return EncodedTexts(context, pooled, list(prompts))


def encoder_token_ids(chunks: Sequence[PromptChunk], pad_token_id: int, device: torch.device) -> torch.Tensor:
    """(B, 77) ids of one chunk batch for an encoder.

    With a pad id other than EOS, every id after the first EOS becomes the pad id (A1111's SD2 rule);
    then every embedding listed in a chunk writes its ids at its slots (a no-op except for embeddings
    that comma backtracking left in the padding, whose vectors A1111 also writes there).
    """
    return torch.tensor([_framed_ids(chunk, pad_token_id) for chunk in chunks], dtype=torch.long, device=device)


def pool_positions(chunks: Sequence[PromptChunk]) -> list[int]:
    """Per chunk, where A1111 pools SDXL's OpenCLIP-bigG output: `text.argmax(dim=-1)` (generative-models'
    `FrozenOpenCLIPEmbedder2.pool`) over the ids A1111 passes, in which every embedding slot holds the
    placeholder 0 (its vectors are written over the token embeddings afterwards). The first highest id
    wins, as in torch.argmax. Every chunk ends with EOS (49407, the highest id of the vocabulary), so this
    is the chunk's first EOS, even where a displaced embedding's vectors cover it."""
    positions = []
    for chunk in chunks:
        a1111_ids = [0 if token >= CLIP_VOCAB_SIZE else token for token in chunk.tokens]  # 77 ids
        positions.append(a1111_ids.index(max(a1111_ids)))
    return positions


def _framed_ids(chunk: PromptChunk, pad_token_id: int) -> list[int]:
    ids = list(chunk.tokens)
    if pad_token_id != EOS_TOKEN_ID and EOS_TOKEN_ID in ids:
        first_eos = ids.index(EOS_TOKEN_ID)
        ids[first_eos + 1 :] = [pad_token_id] * (len(ids) - first_eos - 1)
    for embedding in chunk.embeddings:
        end = min(embedding.slot + embedding.n_vectors, len(ids))
        ids[embedding.slot : end] = embedding.token_ids[: end - embedding.slot]
    return ids  # 77 ids


def _encode_chunk_batch(
    slot: TextEncoderSlot,
    chunks: Sequence[PromptChunk],
    rows: torch.Tensor | None,
    options: EncodeOptions,
    *,
    want_pooled: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode one chunk batch with one encoder and apply emphasis: (B, 77, C) and pooled (B, P) or None."""
    encoder = slot.encoder
    config = encoder.config
    if options.clip_skip > config.num_hidden_layers:
        raise ConditioningError(
            f"clip skip {options.clip_skip} is more than the {config.num_hidden_layers} layers of {slot.component}"
        )
    device = next(encoder.parameters()).device
    layer = config.output_layer_for_clip_skip(options.clip_skip)
    want_pooled = want_pooled and config.projection_dim is not None
    ids = encoder_token_ids(chunks, config.pad_token_id, device)
    positions = torch.tensor(pool_positions(chunks), device=device) if want_pooled else None
    z, pooled = encoder.encode(ids, rows, output_layer=layer, pooled=want_pooled, pool_positions=positions)
    weights = torch.tensor([chunk.weights for chunk in chunks], device=device, dtype=z.dtype)  # (B, 77)
    z = _apply_emphasis(z, weights, options, slot, rows, layer)
    if not bool(torch.isfinite(z).all()):
        largest = max(abs(weight) for chunk in chunks for weight in chunk.weights)
        raise ConditioningError(
            f"the {slot.component} conditioning is not finite (inf or NaN) in {z.dtype}; the largest prompt "
            f"weight is {largest:.6g} (weights or embedding vectors too large for this dtype)"
        )
    return z, pooled


def _apply_emphasis(
    z: torch.Tensor,
    weights: torch.Tensor,
    options: EncodeOptions,
    slot: TextEncoderSlot,
    rows: torch.Tensor | None,
    layer: int,
) -> torch.Tensor:
    """Apply per-token weights (B, 77) to z (B, 77, C) according to the emphasis mode."""
    if options.emphasis in ("ignore", "none"):
        return z
    w = weights.unsqueeze(-1)  # (B, 77, 1)
    if options.emphasis == "original":
        original_mean = z.mean()
        z = z * w
        return z * (original_mean / z.mean())
    if options.emphasis == "no_norm":
        return z * w
    # "lerp": move each token's vector from the empty-prompt encoding towards its own by its weight.
    config = slot.encoder.config
    empty_ids = encoder_token_ids([empty_chunk()], config.pad_token_id, z.device)
    z_empty, _ = slot.encoder.encode(empty_ids, rows, output_layer=layer)  # (1, 77, C)
    return z_empty + (z - z_empty) * w
