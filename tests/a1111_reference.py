"""AUTOMATIC1111's prompt conditioning, restated plainly for tests, on transformers CLIP models.

Follows the web UI's `sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase` step by step: embeddings are
found on token-id sequences while the chunk is filled and placed as id-0 placeholders plus "fixes"; the
vectors are patched into the token-embedding output (A1111's `EmbeddingsWithFixes`) at offset + 1,
whatever ids lie there (a fix that comma backtracking left behind covers the old chunk's EOS and
padding); SD2/SDXL-G ids after the first EOS become 0; emphasis runs per chunk batch. A1111 has no
`embedding:` syntax: such text is tokenized like any other and names match on its ids.
Pooling: SD2 (stablediffusion's `FrozenOpenCLIPEmbedder`) never pools; SDXL's OpenCLIP-bigG
(generative-models' `FrozenOpenCLIPEmbedder2.pool`) pools the final-norm last layer at
`text.argmax(dim=-1)` of the ids as passed (placeholders 0, so the first EOS), through the projection.
Only the tokenizer's plain BPE ids (tested separately against OpenAI's tokenizer) and the attention
parser come from tiengine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tiengine.text.prompt import parse_prompt_attention

BOS, EOS, COMMA = 49406, 49407, 267


@dataclass
class RefChunk:
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[tuple[int, torch.Tensor]] = field(default_factory=list)


@dataclass
class RefEncoder:
    """A transformers CLIP text model and how SD reads it."""

    model: torch.nn.Module
    layer: str  # "last" (SD1), "penultimate_norm" (SD2 24 layers), "hidden" (SDXL)
    pad_id: int
    embedding_key: str
    clip_skip_applies: bool = True


def ref_tokenize_line(line, encode, embeddings, emphasis="original", backtrack=20):
    """A1111 tokenize_line: embeddings maps name -> {key: (n, D)} and is matched on ids."""
    lookup: dict[int, list[tuple[list[int], str]]] = {}
    for name in embeddings:
        ids = encode(name)
        lookup.setdefault(ids[0], []).append((ids, name))
    for candidates in lookup.values():
        candidates.sort(key=lambda c: len(c[0]), reverse=True)

    parsed = parse_prompt_attention(line) if emphasis != "none" else [[line, 1.0]]
    chunks: list[RefChunk] = []
    chunk = RefChunk()
    last_comma = -1
    token_count = 0

    def next_chunk(is_last=False):
        nonlocal chunk, last_comma, token_count
        token_count += len(chunk.tokens) if is_last else 75
        to_add = 75 - len(chunk.tokens)
        if to_add > 0:
            chunk.tokens += [EOS] * to_add
            chunk.multipliers += [1.0] * to_add
        chunk.tokens = [BOS] + chunk.tokens + [EOS]
        chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
        last_comma = -1
        chunks.append(chunk)
        chunk = RefChunk()

    for text, weight in parsed:
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        tokens = encode(text)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == COMMA:
                last_comma = len(chunk.tokens)
            elif backtrack != 0 and len(chunk.tokens) == 75 and last_comma != -1 and len(chunk.tokens) - last_comma <= backtrack:
                split = last_comma + 1
                moved_tokens, moved_mults = chunk.tokens[split:], chunk.multipliers[split:]
                chunk.tokens, chunk.multipliers = chunk.tokens[:split], chunk.multipliers[:split]
                next_chunk()
                chunk.tokens, chunk.multipliers = moved_tokens, moved_mults
            if len(chunk.tokens) == 75:
                next_chunk()
            found = None
            for ids, name in lookup.get(token, []):
                if tokens[position : position + len(ids)] == ids:
                    found = (ids, name)
                    break
            if found is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue
            ids, name = found
            n = next(iter(embeddings[name].values())).shape[0]
            if len(chunk.tokens) + n > 75:
                next_chunk()
            chunk.fixes.append((len(chunk.tokens), name))
            chunk.tokens += [0] * n
            chunk.multipliers += [weight] * n
            position += len(ids)
    if chunk.tokens or not chunks:
        next_chunk(is_last=True)
    return chunks, token_count


class _EmbeddingsWithFixes(torch.nn.Module):
    def __init__(self, wrapped, fixes, vectors, key):
        super().__init__()
        self.wrapped, self.fixes, self.vectors, self.key = wrapped, fixes, vectors, key

    def forward(self, input_ids):
        out = self.wrapped(input_ids)
        rows = []
        for row, fixes in zip(out, self.fixes):
            for offset, name in fixes:
                emb = self.vectors[name][self.key].to(row)
                n = min(row.shape[0] - offset - 1, emb.shape[0])
                row = torch.cat([row[: offset + 1], emb[:n], row[offset + 1 + n :]])
            rows.append(row)
        return torch.stack(rows)


def ref_encode_chunk(encoder: RefEncoder, batch: list[RefChunk], vectors, clip_skip, emphasis):
    tokens = torch.tensor([c.tokens for c in batch])
    if encoder.pad_id != EOS:
        for i, c in enumerate(batch):
            first = c.tokens.index(EOS)
            tokens[i, first + 1 :] = encoder.pad_id
    model = encoder.model
    text_model = getattr(model, "text_model", model)
    original = text_model.embeddings.token_embedding
    text_model.embeddings.token_embedding = _EmbeddingsWithFixes(
        original, [c.fixes for c in batch], vectors, encoder.embedding_key
    )
    try:
        out = model(input_ids=tokens, output_hidden_states=True)
    finally:
        text_model.embeddings.token_embedding = original
    if encoder.layer == "last":
        if clip_skip > 1:
            z = text_model.final_layer_norm(out.hidden_states[-clip_skip])
        else:
            z = out.last_hidden_state
    elif encoder.layer == "penultimate_norm":
        z = text_model.final_layer_norm(out.hidden_states[-2])
    else:  # SDXL: hidden_states[-2], or -clip_skip when A1111's sdxl_clip_l_skip option is on
        z = out.hidden_states[-clip_skip] if encoder.clip_skip_applies else out.hidden_states[-2]
    pooled = None
    if hasattr(model, "text_projection"):  # OpenCLIP-bigG: x[arange, text.argmax(dim=-1)] @ projection
        pooled = model.text_projection(out.last_hidden_state[torch.arange(len(batch)), tokens.argmax(dim=-1)])
    multipliers = torch.tensor([c.multipliers for c in batch], dtype=z.dtype)
    if emphasis == "original":
        m0 = z.mean()
        z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
        z = z * (m0 / z.mean())
    elif emphasis == "no_norm":
        z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    elif emphasis == "lerp":
        empty = RefChunk([BOS] + [EOS] * 76, [1.0] * 77)
        z_empty, _ = ref_encode_chunk(encoder, [empty], vectors, clip_skip, "ignore")
        z = z_empty + (z - z_empty) * multipliers.unsqueeze(-1)
    return z, pooled


def ref_forward(texts, encode, encoders: list[RefEncoder], vectors, *, clip_skip=1, emphasis="original",
                backtrack=20, zero_if_empty=False):
    """A1111 forward(texts) for one or two encoders: (context, pooled)."""
    batch_chunks = [ref_tokenize_line(t, encode, vectors, emphasis, backtrack)[0] for t in texts]
    count = max(len(c) for c in batch_chunks)
    outputs = []
    pooled = None
    with torch.no_grad():
        for encoder in encoders:
            zs = []
            for i in range(count):
                batch = [
                    c[i] if i < len(c) else RefChunk([BOS] + [EOS] * 76, [1.0] * 77) for c in batch_chunks
                ]
                z, p = ref_encode_chunk(encoder, batch, vectors, clip_skip, emphasis)
                if i == 0 and p is not None:
                    pooled = p
                zs.append(z)
            outputs.append(torch.hstack(zs))
    context = torch.cat(outputs, dim=2)
    if zero_if_empty and all(t == "" for t in texts):
        context = torch.zeros_like(context)
        pooled = None if pooled is None else torch.zeros_like(pooled)
    return context, pooled
