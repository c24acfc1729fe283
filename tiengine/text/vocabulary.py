"""Binding a set of embeddings into a tokenizer and the text encoders' extra token rows.

An `EmbeddingVocabulary` registers every embedding name (and its `sub/folder/name` alias) with the
tokenizer (a file whose name another file of the folder took is registered under its path, `sub/cat`, for
the explicit syntax's `embedding:sub/cat` only: it never binds by bare name, so the default (A1111)
reading never reaches it), builds the (added ids, D) row table per encoder key (`clip_l`, `clip_h`,
`clip_g`) in id order, and reports prompts' mentions of embeddings that could not be used (e.g. made for
another model family), so users can tell what happened to each name they typed. A typed word that names no embedding
but looks like a misspelt or mis-versioned name of a loaded one (`EasyNegativeV2` when `EasyNegative` is
loaded) is reported the same way, with a "did you mean" note (`near_misses`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import torch

from tiengine.embeddings.embedding import Embedding
from tiengine.text.tokenizer import ClipTokenizer

_EXPLICIT_REFERENCE = re.compile(r"(?<![\w])embedding:([^\s,()\[\]:|]+)")
# A typed word: a run without whitespace or prompt syntax (weights, brackets, alternation, schedules).
_WORD = re.compile(r"[^\s,\uff0c\u3001()\[\]{}<>:|\\]+")
_SEPARATORS = re.compile(r"[\s_\-.]+")
_VERSION_SUFFIX = re.compile(r"(?:v(?:er(?:sion)?)?)?\d+$")  # "v2", "version2", "75": a trailing version
# Near misses (`near_misses`): words shorter than this are never suggested for; a fuzzy match needs this
# difflib ratio between the normalised word and name (lower case, no separators).
NEAR_MISS_MIN_LENGTH = 5
NEAR_MISS_RATIO = 0.85


@dataclass(frozen=True)
class SkippedMention:
    """A name typed in a prompt that refers to an embedding file which could not be used."""

    name: str
    reason: str
    suggestion: str | None = None  # near misses: the loaded embedding the word probably meant


@dataclass
class EmbeddingVocabulary:
    """Embeddings bound into one tokenizer. `skipped` maps unusable names to the reason; `aliases` holds the
    extra names of `embedding:NAME` (paths); `explicit_only` the names that never bind bare."""

    tokenizer: ClipTokenizer
    embeddings: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    explicit_only: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        tokenizer: ClipTokenizer,
        embeddings: Mapping[str, Embedding],
        *,
        aliases: Mapping[str, Sequence[str]] | None = None,
        skipped: Mapping[str, str] | None = None,
        explicit_only: Iterable[str] = (),
    ) -> EmbeddingVocabulary:
        """Register `embeddings` (name -> Embedding) with `tokenizer`, replacing the ones it has.

        `aliases`: name -> extra names for `embedding:NAME` (paths below the folder); `explicit_only`: names
        that bind only through `embedding:NAME`."""
        for name in list(tokenizer.embedding_names()):
            tokenizer.remove_embedding(name)
        aliases = {name: tuple(names) for name, names in (aliases or {}).items() if name in embeddings}
        explicit_only = frozenset(name for name in explicit_only if name in embeddings)
        for name, embedding in embeddings.items():
            tokenizer.add_embedding(name, embedding.n_vectors, aliases=aliases.get(name, ()),
                                    explicit_only=name in explicit_only)
        return cls(tokenizer, dict(embeddings), dict(skipped or {}), aliases, explicit_only)

    @classmethod
    def from_library(
        cls,
        tokenizer: ClipTokenizer,
        library,  # EmbeddingLibrary
        *,
        check: Callable[[Embedding], str | None] | None = None,
    ) -> EmbeddingVocabulary:
        """Bind the usable embeddings of an `EmbeddingLibrary`; its skipped files become skipped names.

        Each name's winning file binds by name (and by its path, `embedding:sub/name`); each file whose name
        another file took (`library.shadowed`) binds under its path only, explicitly. `check(embedding)`
        returns why an embedding cannot be used with the model (a skipped name), or None."""
        usable: dict[str, Embedding] = {}
        aliases: dict[str, list[str]] = {}
        skipped: dict[str, str] = {}
        for relative_path, reason in library.skipped.items():
            skipped.setdefault(PurePosixPath(relative_path).stem, reason)
        shadowed = library.shadowed
        for name, embedding in [*library.loaded.items(), *shadowed.items()]:
            reason = check(embedding) if check is not None else None
            if reason is not None:
                skipped[name] = reason
                continue
            usable[name] = embedding
            if name not in shadowed:
                aliases[name] = library.path_keys(name)
        skipped = {name: reason for name, reason in skipped.items() if name not in usable}
        return cls.build(tokenizer, usable, aliases=aliases, skipped=skipped, explicit_only=shadowed)

    def with_embedding(self, embedding: Embedding) -> EmbeddingVocabulary:
        """This vocabulary plus (or with a new version of) one in-memory embedding, bound by its name;
        the other names keep their aliases and explicit-only flags."""
        embeddings = {**self.embeddings, embedding.name: embedding}
        explicit_only = self.explicit_only - {embedding.name}
        aliases = {name: names for name, names in self.aliases.items() if name != embedding.name}
        return EmbeddingVocabulary.build(self.tokenizer, embeddings, aliases=aliases, skipped=self.skipped,
                                         explicit_only=explicit_only)

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
        """Skipped embedding names that `text` mentions, bare (on token ids) or as `embedding:NAME`, then
        its near misses of loaded names (see `near_misses`)."""
        return self._skipped_files(text) + self.near_misses(text)

    def near_misses(self, text: str) -> list[SkippedMention]:
        """Words of `text` that name no embedding but look like a loaded embedding's name gone wrong.

        A word qualifies when it is at least NEAR_MISS_MIN_LENGTH characters, looks like a name rather
        than an English word (it has a digit, an upper-case letter after the first, "_" or "-"), binds to
        nothing (the tokenizer lower-cases, so case alone never misses) and, compared in lower case without
        separators, equals a loaded name but for a trailing version ("V2", "75"), or reaches a difflib ratio
        of NEAR_MISS_RATIO with one. One mention per word, in order of appearance.
        """
        if not self.embeddings:
            return []
        known = {name.lower() for name in [*self.embeddings, *self.skipped, *self.tokenizer.embedding_names()]}
        keys = {name: _name_key(name) for name in sorted(self.embeddings) if name not in self.explicit_only}
        found: dict[str, SkippedMention] = {}
        for word in _WORD.findall(text):
            word = word.removeprefix("embedding:").strip(".!?;'\"")
            if len(word) < NEAR_MISS_MIN_LENGTH or word in found or word.lower() in known or not _looks_like_name(word):
                continue
            suggestion = _closest_name(_name_key(word), keys)
            if suggestion is not None:
                found[word] = SkippedMention(
                    word, f"not a loaded embedding; did you mean '{suggestion}'?", suggestion
                )
        return list(found.values())

    def _skipped_files(self, text: str) -> list[SkippedMention]:
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


def _name_key(name: str) -> str:
    """A name compared loosely: lower case, without spaces, "_", "-" and "."."""
    return _SEPARATORS.sub("", name.lower())


def _looks_like_name(word: str) -> bool:
    """A word typed as a name, not as English: a digit, an inner capital, "_" or "-"."""
    return any(c.isdigit() for c in word) or any(c.isupper() for c in word[1:]) or "_" in word or "-" in word


def _closest_name(key: str, keys: Mapping[str, str]) -> str | None:
    """The loaded name with the same key, else one whose key matches but for a version suffix, else the
    closest by difflib (at least NEAR_MISS_RATIO)."""
    for name, name_key in keys.items():
        if name_key == key:
            return name
    unversioned = _VERSION_SUFFIX.sub("", key)
    for name, name_key in keys.items():
        if _VERSION_SUFFIX.sub("", name_key) == unversioned and len(unversioned) >= 3:
            return name
    best, best_ratio = None, NEAR_MISS_RATIO
    for name, name_key in keys.items():
        matcher = difflib.SequenceMatcher(None, key, name_key)
        if matcher.real_quick_ratio() >= best_ratio and matcher.quick_ratio() >= best_ratio:
            ratio = matcher.ratio()
            if ratio >= best_ratio and (best is None or ratio > best_ratio):
                best, best_ratio = name, ratio
    return best


def _contains(sequence: list[int], part: list[int]) -> bool:
    width = len(part)
    return any(sequence[i : i + width] == part for i in range(len(sequence) - width + 1))
