"""Binding a set of embeddings into a tokenizer and the text encoders' extra token rows.

An `EmbeddingVocabulary` registers every embedding name (and its `sub/folder/name` alias) with the
tokenizer, builds the (added ids, D) row table per encoder key (`clip_l`, `clip_h`, `clip_g`) in id
order, and reports prompts' mentions of embeddings that could not be used (e.g. made for another model
family), so users can tell what happened to each name they typed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import torch

from tiengine.embeddings.embedding import Embedding
from tiengine.text.tokenizer import ClipTokenizer

_EXPLICIT_REFERENCE = re.compile(r"(?<![\w])embedding:([^\s,()\[\]:|]+)")


@dataclass(frozen=True)
class SkippedMention:
    """A name typed in a prompt that refers to an embedding file which could not be used."""

    name: str
    reason: str


@dataclass
class EmbeddingVocabulary:
    """Embeddings bound into one tokenizer. `skipped` maps unusable names to the reason."""

    tokenizer: ClipTokenizer
    embeddings: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        tokenizer: ClipTokenizer,
        embeddings: Mapping[str, Embedding],
        *,
        aliases: Mapping[str, Sequence[str]] | None = None,
        skipped: Mapping[str, str] | None = None,
    ) -> EmbeddingVocabulary:
        """Register `embeddings` (name -> Embedding) with `tokenizer`, which must have none yet."""
        for name in list(tokenizer.embedding_names()):
            tokenizer.remove_embedding(name)
        for name, embedding in embeddings.items():
            tokenizer.add_embedding(name, embedding.n_vectors, aliases=(aliases or {}).get(name, ()))
        return cls(tokenizer, dict(embeddings), dict(skipped or {}))

    @classmethod
    def from_library(cls, tokenizer: ClipTokenizer, library) -> EmbeddingVocabulary:  # EmbeddingLibrary
        """Bind the usable embeddings of an `EmbeddingLibrary`; its skipped files become skipped names."""
        loaded = library.loaded
        aliases = {name: library.path_keys(name) for name in loaded}
        skipped = {}
        for relative_path, reason in library.skipped.items():
            stem = PurePosixPath(relative_path).stem
            if stem not in loaded:
                skipped[stem] = reason
        return cls.build(tokenizer, loaded, aliases=aliases, skipped=skipped)

    def extra_rows(self, encoder_key: str, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """(added ids, D) vectors of `encoder_key` for the tokenizer's added ids, or None if none."""
        names = self.tokenizer.embedding_names()
        if not names:
            return None
        rows = [self.embeddings[name].vectors[encoder_key] for name in names]
        return torch.cat(rows).to(device=device, dtype=dtype)  # (added ids, D)

    def short_hashes(self, names: Iterable[str]) -> dict[str, str | None]:
        """Name -> 12-hex short hash of its file (None for embeddings made in memory)."""
        return {name: self.embeddings[name].short_hash for name in names}

    def skipped_mentions(self, text: str) -> list[SkippedMention]:
        """Skipped embedding names that `text` mentions, bare (on token ids) or as `embedding:NAME`."""
        if not self.skipped:
            return []
        explicit = set(_EXPLICIT_REFERENCE.findall(text))
        ids = self.tokenizer.tokenize(text, bare_names=False).ids
        found = []
        for name, reason in sorted(self.skipped.items()):
            name_ids = self.tokenizer.tokenize(name, bare_names=False).ids
            if name in explicit or (name_ids and _contains(ids, name_ids)):
                found.append(SkippedMention(name, reason))
        return found


def _contains(sequence: list[int], part: list[int]) -> bool:
    width = len(part)
    return any(sequence[i : i + width] == part for i in range(len(sequence) - width + 1))
