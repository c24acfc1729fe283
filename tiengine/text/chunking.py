"""Prompt text -> 77-token windows with per-token weights and embedding slots (A1111 semantics).

This is AUTOMATIC1111's `tokenize_line`, restated (see the conditioning spec, "Chunking into 77-token
windows"):
- the prompt is split into weighted fragments by the attention parser (or taken whole when the
  emphasis mode is "none"), each fragment tokenized without BOS/EOS;
- tokens fill chunks of 75; a `BREAK` fragment closes the current chunk;
- comma backtrack (default 20, 0 disables): when a chunk is full and its last comma is within that
  many tokens of the end, the tokens after the comma move to the next chunk;
- an embedding's vectors are never split: if they do not fit, the chunk is closed first; its slots
  carry the enclosing fragment's weight;
- A1111 quirk, kept by default: backtracking moves only token ids and weights, not embedding
  positions. An embedding in the moved tail keeps its vectors at its old slots, which now lie in the
  closed chunk's EOS padding (the chunk's ids there stay EOS; the chunk lists the embedding, and the
  encoder overlays its ids after the padding rule), and its moved slots become placeholder id 0 (the
  token "!"), so the embedding is silently misplaced. `keep_embeddings_on_backtrack=True` moves it with its slots
  instead (documented opt-in fix); either way the result lists a warning;
- each chunk becomes `[BOS] + 75 tokens (EOS-padded) + [EOS]`, weight 1.0 on BOS/EOS/padding; a prompt
  with no tokens still yields one chunk. The token count is 75 per closed chunk plus the tokens of
  the last one.
Embedding slots hold the embedding's pseudo-token ids (>= 49408), which the text encoder maps to its
vectors; A1111 writes id 0 there and patches the vectors in afterwards, which encodes identically.
OpenCLIP's zero padding after the first EOS is applied per encoder at encode time (`chunk_frame`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tiengine.text.prompt import DEFAULT_LIMITS, PromptLimits, parse_prompt_attention
from tiengine.text.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, ClipTokenizer, TokenizedText

CHUNK_TOKENS = 75
WINDOW_TOKENS = CHUNK_TOKENS + 2
DEFAULT_COMMA_BACKTRACK = 20
EMPHASIS_MODES = ("original", "no_norm", "ignore", "none", "lerp")


@dataclass(frozen=True)
class ChunkEmbedding:
    """An embedding placed in a chunk: its pseudo-token ids go to slots [slot, slot + n_vectors),
    counted from the chunk start (BOS is 0)."""

    slot: int
    name: str
    token_ids: tuple[int, ...]

    @property
    def n_vectors(self) -> int:
        return len(self.token_ids)


@dataclass
class PromptChunk:
    """One 77-token window: ids, per-token weights and the embeddings placed in it."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    embeddings: list[ChunkEmbedding] = field(default_factory=list)


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt as chunks, with A1111's token count and the embedding references found in it."""

    text: str
    chunks: list[PromptChunk]
    token_count: int
    # `embedding:NAME` references naming no registered embedding (kept as words in either syntax).
    unresolved: list[str]
    # Things a user should know, e.g. an embedding displaced by comma backtracking, or an `embedding:NAME`
    # read as words because the explicit syntax is off.
    warnings: list[str] = field(default_factory=list)


def empty_chunk() -> PromptChunk:
    """The chunk that pads shorter prompts in a batch: `[BOS] + [EOS] * 76`, all weights 1."""
    return PromptChunk([BOS_TOKEN_ID] + [EOS_TOKEN_ID] * (WINDOW_TOKENS - 1), [1.0] * WINDOW_TOKENS, [])


def tokenize_prompt(
    text: str,
    tokenizer: ClipTokenizer,
    *,
    emphasis: str = "original",
    comma_backtrack: int = DEFAULT_COMMA_BACKTRACK,
    bare_names: bool = True,
    explicit_embedding_syntax: bool = False,
    keep_embeddings_on_backtrack: bool = False,
    parse_attention: Callable[[str], list[tuple[str, float]]] | None = None,
    limits: PromptLimits = DEFAULT_LIMITS,
) -> TokenizedPrompt:
    """Split one prompt into 77-token chunks with weights and embedding slots, as A1111 does.

    `explicit_embedding_syntax=True` reads `embedding:NAME` as a reference to NAME's embedding (A1111, the
    default, reads it as words; tiengine.text.tokenizer); `bare_names=False` binds embeddings only through
    `embedding:NAME` (and so implies the explicit syntax);
    `keep_embeddings_on_backtrack=True` fixes A1111's comma-backtrack quirk (module docstring).
    `limits` bounds the attention parse (tiengine.text.prompt.PromptLimits).
    """
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis must be one of {EMPHASIS_MODES}, got {emphasis!r}")
    if comma_backtrack < 0:
        raise ValueError(f"comma_backtrack must be >= 0, got {comma_backtrack}")
    if emphasis == "none":
        fragments = [(text, 1.0)]
    else:
        fragments = parse_attention(text) if parse_attention else parse_prompt_attention(text, limits=limits)
    builder = _ChunkBuilder(tokenizer.comma_token_id, comma_backtrack, keep_embeddings_on_backtrack)
    unresolved: list[str] = []
    read_as_words: dict[str, None] = {}  # `embedding:NAME` references tokenized as text, in order, once each
    for fragment_text, weight in fragments:
        if fragment_text == "BREAK" and weight == -1:
            builder.close_chunk()
            continue
        tokenized = tokenizer.tokenize(fragment_text, bare_names=bare_names, explicit_syntax=explicit_embedding_syntax)
        unresolved.extend(tokenized.unresolved)
        read_as_words.update(dict.fromkeys(tokenized.text_references))
        builder.add_fragment(tokenized, weight)
    chunks, token_count = builder.finish()
    warnings = [
        f"embedding:{name} is text, as in A1111: the words 'embedding' and ':' are encoded and only a bare "
        f"embedding name in it binds (explicit_embedding_syntax=True makes it a reference to {name!r})"
        for name in read_as_words
    ]
    return TokenizedPrompt(text, chunks, token_count, unresolved, warnings + builder.warnings)


def pad_chunk_batch(prompts: Sequence[TokenizedPrompt]) -> list[list[PromptChunk]]:
    """Chunk i of every prompt, for each i: shorter prompts get `empty_chunk()`s. Shape (chunks, batch)."""
    chunk_count = max(len(prompt.chunks) for prompt in prompts)
    return [
        [prompt.chunks[i] if i < len(prompt.chunks) else empty_chunk() for prompt in prompts]
        for i in range(chunk_count)
    ]


class _ChunkBuilder:
    """The A1111 chunk-filling state machine over (token, weight, embedding) items."""

    def __init__(self, comma_token_id: int, comma_backtrack: int, keep_embeddings_on_backtrack: bool) -> None:
        self.comma_token_id = comma_token_id
        self.comma_backtrack = comma_backtrack
        self.keep_embeddings_on_backtrack = keep_embeddings_on_backtrack
        self.warnings: list[str] = []
        self.chunks: list[PromptChunk] = []
        self.current = PromptChunk()
        self.token_count = 0
        self.last_comma = -1

    def close_chunk(self, *, is_last: bool = False) -> None:
        chunk = self.current
        self.token_count += len(chunk.tokens) if is_last else CHUNK_TOKENS
        padding = CHUNK_TOKENS - len(chunk.tokens)
        chunk.tokens = [BOS_TOKEN_ID, *chunk.tokens, *[EOS_TOKEN_ID] * padding, EOS_TOKEN_ID]
        chunk.weights = [1.0, *chunk.weights, *[1.0] * padding, 1.0]
        chunk.embeddings = [ChunkEmbedding(e.slot + 1, e.name, e.token_ids) for e in chunk.embeddings]
        self.chunks.append(chunk)
        self.current = PromptChunk()
        self.last_comma = -1

    def add_fragment(self, tokenized: TokenizedText, weight: float) -> None:
        span_at = {span.start: span for span in tokenized.embeddings}
        ids = tokenized.ids
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == self.comma_token_id:
                self.last_comma = len(self.current.tokens)
            elif self._should_backtrack():
                self._move_tail_after_last_comma()
            if len(self.current.tokens) == CHUNK_TOKENS:
                self.close_chunk()
            span = span_at.get(position)
            if span is None:
                self.current.tokens.append(token)
                self.current.weights.append(weight)
                position += 1
                continue
            if len(self.current.tokens) + span.length > CHUNK_TOKENS:
                self.close_chunk()
            span_ids = tuple(ids[position : position + span.length])
            self.current.embeddings.append(ChunkEmbedding(len(self.current.tokens), span.name, span_ids))
            self.current.tokens.extend(span_ids)
            self.current.weights.extend([weight] * span.length)
            position += span.length

    def finish(self) -> tuple[list[PromptChunk], int]:
        if self.current.tokens or not self.chunks:
            self.close_chunk(is_last=True)
        return self.chunks, self.token_count

    def _should_backtrack(self) -> bool:
        chunk_length = len(self.current.tokens)
        return (
            self.comma_backtrack != 0
            and chunk_length == CHUNK_TOKENS
            and self.last_comma != -1
            and chunk_length - self.last_comma <= self.comma_backtrack
        )

    def _move_tail_after_last_comma(self) -> None:
        """Close the chunk after its last comma; the tokens behind it start the next chunk."""
        cut = self.last_comma + 1
        chunk = self.current
        moved_tokens, moved_weights = chunk.tokens[cut:], chunk.weights[cut:]
        chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
        kept = [e for e in chunk.embeddings if e.slot < cut]
        moved_embeddings: list[ChunkEmbedding] = []
        for embedding in (e for e in chunk.embeddings if e.slot >= cut):
            start = embedding.slot - cut
            if self.keep_embeddings_on_backtrack:
                moved_embeddings.append(ChunkEmbedding(start, embedding.name, embedding.token_ids))
                self.warnings.append(f"embedding {embedding.name!r} moved to the next chunk by comma backtracking")
                continue
            moved_tokens[start : start + embedding.n_vectors] = [0] * embedding.n_vectors
            kept.append(embedding)
            self.warnings.append(
                f"embedding {embedding.name!r} was moved to the next chunk by comma backtracking; as in "
                "A1111 its vectors stay at its old slots (now padding) and the moved slots encode as '!' "
                "(keep_embeddings_on_backtrack=True fixes this)"
            )
        chunk.embeddings = kept
        self.close_chunk()
        self.current = PromptChunk(moved_tokens, moved_weights, moved_embeddings)
