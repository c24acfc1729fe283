"""CLIP byte-level BPE tokenizer with a vocabulary extension for textual-inversion embeddings.

Ids equal OpenAI CLIP's reference tokenizer (`clip/simple_tokenizer.py`, openai-clip 1.0.1), which
SD1, SD2 and both SDXL encoders share:
- text cleaning: `ftfy.fix_text`, `html.unescape` twice, strip, whitespace runs -> one space, strip,
  lower case (the reference's order; whitespace is the `regex` module's `\\s`, listed below);
- pre-tokenization: the reference's regex (special tokens, English contractions, letter runs, single
  digits, runs of other symbols), each piece mapped byte-wise to printable characters (GPT-2 byte map);
- BPE with the 48,894 merges of `bpe_simple_vocab_16e6.txt.gz`, `</w>` marking the end of each word.
  Vocabulary: 256 byte symbols, their `</w>` forms, the merges, then `<|startoftext|>` = 49406 and
  `<|endoftext|>` = 49407: 49,408 ids.

The BPE runs in the `tokenizers` library; the cleaning runs here so that it is exactly the reference's
(a `tokenizer.json` normalizer cannot express ftfy).

Vocabulary extension: `add_embedding(name, n_vectors)` gives an embedding n consecutive ids from
49408 on; the text encoder maps ids >= 49408 to rows appended after its token-embedding table.
Embeddings bind to prompt text in two ways:
- A1111 style (bare names, the default): the name is tokenized like any text, and wherever that id
  sequence occurs in a tokenized fragment it is replaced by the embedding's ids, longest name first at
  each position (AUTOMATIC1111 `EmbeddingDatabase.find_embedding_at_position` semantics, quirks
  included: the match is on ids, so it is case-insensitive and can start inside a hyphenated word).
  A1111 has no `embedding:` syntax: in `embedding:EasyNegative` the words "embedding" and ":" stay
  tokens before the embedding's slots, and `embedding:sub/cat` is the words "embedding : sub /" and then
  whatever `cat` binds by name. Such references are only reported (`TokenizedText.text_references`,
  `unresolved`).
- Explicit (`explicit_syntax=True`, opt-in): `embedding:NAME`, where NAME is the longest registered name
  or alias at that point (names may hold spaces or sub-folders, `embedding:negatives/EasyNegative`), is
  replaced by the embedding's ids. It must start and end at a word boundary, so it never matches inside
  a longer word. An unknown name stays text, is reported and never binds by bare name. An embedding
  added with `explicit_only=True` (a file whose name another file took, registered under its path)
  binds only this way, never by bare name.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from tiengine.errors import TiengineError
from tiengine.io.atomic import atomic_write_bytes

if TYPE_CHECKING:
    import torch

BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
CLIP_VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# The merges file shipped as package data (MIT, see data/LICENSE-openai-clip.txt).
DEFAULT_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# The reference keeps lines [1, 48895) of the merges file: 49152 - 256 - 2 merges.
CLIP_MERGE_COUNT = 49152 - 256 - 2

# The reference's pre-tokenizer pattern (applied to lower-cased text; IGNORECASE is then moot).
CLIP_SPLIT_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
# `\s` of the `regex` module that the reference uses (Python's `re` also counts U+001C-U+001F).
_REFERENCE_WHITESPACE = re.compile(
    "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+"
)
# ASCII text without these characters is left unchanged by ftfy.fix_text and html.unescape; any other
# text takes the full cleaning. ('&' starts HTML entities; ftfy deletes these control characters.)
_NEEDS_FULL_CLEANING = re.compile(r"[&\x00-\x08\x0b\x0e-\x1f\x7f]")
_SPECIAL_TOKEN_TEXT = re.compile(r"<\|(?:startoftext|endoftext)\|>")
_EXPLICIT_PREFIX = re.compile(r"(?<![\w])embedding:")
_WORD_CHAR = re.compile(r"[\w\-./]")
_REFERENCE_WORD = re.compile(r"[^\s,()\[\]:|]*")  # what an `embedding:` naming nothing is reported as


class TokenizerError(TiengineError):
    """A tokenizer file is missing or malformed, or an embedding name cannot be registered."""


def clean_text(text: str) -> str:
    """OpenAI CLIP's text cleaning: ftfy, HTML unescape (twice), whitespace collapse, lower case."""
    if not text.isascii() or _NEEDS_FULL_CLEANING.search(text):
        import ftfy

        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    text = text.strip()
    text = _REFERENCE_WHITESPACE.sub(" ", text).strip()
    return text.lower()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte map: printable bytes map to themselves, the others to code points from 256 on."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code_points = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return {byte: chr(point) for byte, point in zip(printable, code_points)}


@dataclass(frozen=True)
class EmbeddingSpan:
    """An embedding bound in a token sequence: ids[start : start + length] are its pseudo-token ids."""

    start: int
    length: int
    name: str
    explicit: bool


@dataclass(frozen=True)
class TokenizedText:
    """Token ids of one text (no BOS/EOS), the embeddings bound in it, and the `embedding:NAME` references
    found in it."""

    ids: list[int]
    embeddings: list[EmbeddingSpan] = field(default_factory=list)
    # `embedding:NAME` references that named no registered embedding (the text was kept as words).
    unresolved: list[str] = field(default_factory=list)
    # Without the explicit syntax: `embedding:NAME` references naming a registered embedding (name or
    # alias, as written) that were tokenized as words, as A1111 does.
    text_references: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _AddedEmbedding:
    name: str
    ids: tuple[int, ...]
    aliases: tuple[str, ...]
    explicit_only: bool = False  # binds only through `embedding:NAME`, never by bare name


@dataclass(frozen=True)
class _Reference:
    """An `embedding:NAME` in a text: text[start:end], `name` as written (the registered name or alias, or
    the word after the prefix when it names nothing) and the embedding it names (None: nothing)."""

    start: int
    end: int
    name: str
    added: _AddedEmbedding | None


class ClipTokenizer:
    """CLIP BPE tokenizer: `encode(text) -> ids` (no BOS/EOS, no truncation), extensible vocabulary."""

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *, source: str) -> None:
        _check_vocabulary(vocab, merges, source)
        self.source = source
        self._vocab = dict(vocab)
        self._merges = list(merges)
        self._id_to_token = {token_id: token for token, token_id in self._vocab.items()}
        self._byte_decoder = {char: byte for byte, char in bytes_to_unicode().items()}
        self._bpe = _build_tokenizer(self._vocab, self._merges)
        self._split_only = pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True)
        self._embeddings: dict[str, _AddedEmbedding] = {}
        self._name_ids_cache: dict[str, tuple[int, ...]] = {}
        self._first_id_index: dict[int, list[tuple[tuple[int, ...], str]]] | None = None
        self.comma_token_id = self._vocab[",</w>"]

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def default(cls) -> ClipTokenizer:
        """The OpenAI CLIP vocabulary shipped with tiengine (no download); its sha256 is verified."""
        with resources.as_file(resources.files("tiengine") / "data" / DEFAULT_BPE_FILE) as path:
            return cls.from_bpe_file(path, expected_sha256=DEFAULT_BPE_SHA256)

    @classmethod
    def from_bpe_file(
        cls, path: str | os.PathLike[str], *, expected_sha256: str | None = None
    ) -> ClipTokenizer:
        """Load OpenAI's gzipped merges file (`bpe_simple_vocab_16e6.txt.gz`) and build the vocabulary
        the way the reference does: bytes, bytes + `</w>`, the merges, then BOS and EOS."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise TokenizerError(f"{path}: cannot read the BPE merges file: {error}") from error
        if expected_sha256 is not None:
            digest = hashlib.sha256(data).hexdigest()
            if digest != expected_sha256:
                raise TokenizerError(
                    f"{path}: sha256 is {digest}, expected {expected_sha256} (the file is damaged or not "
                    "the CLIP merges file)"
                )
        try:
            lines = gzip.decompress(data).decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as error:
            raise TokenizerError(f"{path}: not a gzipped UTF-8 merges file: {error}") from error
        merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGE_COUNT + 1]]
        if any(len(merge) != 2 for merge in merges):
            raise TokenizerError(f"{path}: expected two symbols per merge line")
        byte_symbols = list(bytes_to_unicode().values())
        tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
        tokens += ["".join(merge) for merge in merges]
        tokens += [BOS_TOKEN, EOS_TOKEN]
        vocab = {token: index for index, token in enumerate(tokens)}
        return cls(vocab, merges, source=str(path))  # type: ignore[arg-type]

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> ClipTokenizer:
        """Load `vocab.json` + `merges.txt` from a tokenizer folder or a model folder's `tokenizer/`."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: not a folder (expected a folder with vocab.json and merges.txt)")
        for candidate in (folder, folder / "tokenizer"):
            if (candidate / "vocab.json").is_file() and (candidate / "merges.txt").is_file():
                return cls.from_files(candidate / "vocab.json", candidate / "merges.txt")
        raise TokenizerError(
            f"{folder}: no vocab.json + merges.txt here or in {folder / 'tokenizer'} "
            f"(found: {', '.join(sorted(p.name for p in folder.iterdir())) or 'nothing'})"
        )

    @classmethod
    def from_files(cls, vocab_path: str | os.PathLike[str], merges_path: str | os.PathLike[str]) -> ClipTokenizer:
        """Load a Hugging Face style `vocab.json` + `merges.txt` pair."""
        vocab_path, merges_path = Path(vocab_path), Path(merges_path)
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TokenizerError(f"{vocab_path}: cannot read the vocabulary: {error}") from error
        if not isinstance(vocab, dict):
            raise TokenizerError(f"{vocab_path}: expected a JSON object of token -> id, found {type(vocab).__name__}")
        try:
            lines = merges_path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as error:
            raise TokenizerError(f"{merges_path}: cannot read the merges: {error}") from error
        merges = []
        for number, line in enumerate(lines, start=1):
            if not line or line.startswith("#version"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerError(f"{merges_path}:{number}: expected two symbols per merge, found {line!r}")
            merges.append((parts[0], parts[1]))
        return cls(vocab, merges, source=str(vocab_path.parent))

    def copy(self) -> ClipTokenizer:
        """An independent tokenizer with the same vocabulary and added embeddings, without reloading files."""
        clone = object.__new__(ClipTokenizer)
        clone.__dict__.update(self.__dict__)  # the BPE pipeline and base vocabulary are never mutated
        clone._embeddings = dict(self._embeddings)
        clone._name_ids_cache = dict(self._name_ids_cache)
        clone._first_id_index = None
        return clone

    # ---------------------------------------------------------------------------------------- encoding

    @property
    def bos_token_id(self) -> int:
        return BOS_TOKEN_ID

    @property
    def eos_token_id(self) -> int:
        return EOS_TOKEN_ID

    @property
    def base_vocab_size(self) -> int:
        return CLIP_VOCAB_SIZE

    @property
    def vocab_size(self) -> int:
        """49408 plus one id per added embedding vector."""
        return CLIP_VOCAB_SIZE + sum(len(added.ids) for added in self._embeddings.values())

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS and without truncation; added embeddings are bound."""
        if not self._embeddings:
            return self._encode_plain(text)
        return self.tokenize(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts; plain texts run through the BPE in one parallel batch."""
        if self._embeddings:
            return [self.tokenize(text).ids for text in texts]
        cleaned = [clean_text(text) for text in texts]
        if any(_SPECIAL_TOKEN_TEXT.search(text) for text in cleaned):
            return [self._bpe_ids(text) for text in cleaned]
        return [encoding.ids for encoding in self._bpe.encode_batch(cleaned, add_special_tokens=False)]

    def tokenize(self, text: str, *, bare_names: bool = True, explicit_syntax: bool = False) -> TokenizedText:
        """Ids of `text` with embeddings bound (module docstring).

        Default (A1111): the whole text is tokenized as words and bare names bind on its ids; an
        `embedding:NAME` in it is words too, reported in `unresolved` (NAME names nothing) or
        `text_references`. `explicit_syntax=True` binds `embedding:NAME` references in place;
        `bare_names=False` turns bare-name binding off and implies the explicit syntax.
        """
        references = self._explicit_references(text)
        unresolved = [reference.name for reference in references if reference.added is None]
        if bare_names and not explicit_syntax:
            ids, spans = self._bind_bare_names(self._encode_plain(text), offset=0)
            named = [reference.name for reference in references if reference.added is not None]
            return TokenizedText(ids, spans, unresolved, named)
        ids: list[int] = []
        spans: list[EmbeddingSpan] = []
        position = 0
        for reference in references:
            self._extend_with_words(ids, spans, text[position : reference.start], bare_names)
            if reference.added is None:  # words, never bound by bare name: `embedding:sub/cat` is not "cat"
                ids.extend(self._encode_plain(text[reference.start : reference.end]))
            else:
                spans.append(EmbeddingSpan(len(ids), len(reference.added.ids), reference.added.name, explicit=True))
                ids.extend(reference.added.ids)
            position = reference.end
        self._extend_with_words(ids, spans, text[position:], bare_names)
        return TokenizedText(ids, spans, unresolved)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids as the reference decodes it (`</w>` becomes a space); an embedding's ids
        decode to its name once."""
        owner = self._id_owner()
        pieces: list[str] = []
        for token_id in ids:
            if token_id in owner:
                added, index = owner[token_id]
                if index == 0:
                    pieces.append(added.name + "</w>")
                continue
            token = self._id_to_token.get(token_id)
            if token is None:
                raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
            pieces.append(token)
        text = "".join(pieces)
        data = bytearray()
        for char in text:
            byte = self._byte_decoder.get(char)
            data.extend(char.encode("utf-8") if byte is None else bytes([byte]))
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of one id (`'cat</w>'`), or `'<name:i>'` for an embedding's i-th vector."""
        owner = self._id_owner()
        if token_id in owner:
            added, index = owner[token_id]
            return f"<{added.name}:{index}>"
        token = self._id_to_token.get(token_id)
        if token is None:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return token

    # -------------------------------------------------------------------------- vocabulary extension

    def add_embedding(
        self, name: str, n_vectors: int, *, aliases: Iterable[str] = (), explicit_only: bool = False
    ) -> list[int]:
        """Register an embedding: returns its `n_vectors` new ids (>= 49408, consecutive).

        `aliases` are extra names for the explicit syntax only (e.g. the path below the embeddings
        folder, `negatives/EasyNegative`); bare-name binding uses `name`, unless `explicit_only` (then the
        embedding binds only through `embedding:NAME` / `embedding:ALIAS`).
        """
        if not isinstance(name, str) or not name.strip():
            raise TokenizerError(f"embedding name must be a non-empty string, got {name!r}")
        if name in self._embeddings:
            raise TokenizerError(f"embedding {name!r} is already registered; remove it first")
        if not isinstance(n_vectors, int) or not 1 <= n_vectors <= 75:
            raise TokenizerError(f"embedding {name!r}: n_vectors must be an int in 1..75, got {n_vectors!r}")
        aliases = tuple(alias for alias in aliases if alias != name)
        taken = {alias for added in self._embeddings.values() for alias in (added.name, *added.aliases)}
        for alias in (name, *aliases):
            if alias in taken:
                raise TokenizerError(f"embedding name {alias!r} is already used by another embedding")
        start = self.vocab_size
        added = _AddedEmbedding(name, tuple(range(start, start + n_vectors)), aliases, bool(explicit_only))
        self._embeddings[name] = added
        self._first_id_index = None
        return list(added.ids)

    def remove_embedding(self, name: str) -> None:
        """Unregister an embedding; the ids of embeddings added after it move down to stay consecutive."""
        if name not in self._embeddings:
            raise TokenizerError(f"no embedding named {name!r} is registered (registered: {self.embedding_names()})")
        del self._embeddings[name]
        next_id = CLIP_VOCAB_SIZE
        renumbered: dict[str, _AddedEmbedding] = {}
        for added in self._embeddings.values():
            ids = tuple(range(next_id, next_id + len(added.ids)))
            renumbered[added.name] = _AddedEmbedding(added.name, ids, added.aliases, added.explicit_only)
            next_id += len(ids)
        self._embeddings = renumbered
        self._first_id_index = None

    def embedding_names(self) -> list[str]:
        """Registered embedding names, in id order."""
        return list(self._embeddings)

    def embedding_ids(self, name: str) -> list[int]:
        """The ids of a registered embedding."""
        added = self._embeddings.get(name)
        if added is None:
            raise TokenizerError(f"no embedding named {name!r} is registered")
        return list(added.ids)

    # ------------------------------------------------------------------------------------------ export

    def to_tokenizer_json(self) -> str:
        """A standard Hugging Face `tokenizer.json` of this vocabulary, embeddings as added tokens.

        Each embedding's ids appear as added tokens `<NAME>`, `<NAME>_1`, ..., `<NAME>_{n-1}` (angle
        brackets keep short names such as `rick` apart from vocabulary entries; names already written
        `<like-this>` keep theirs). diffusers' textual-inversion loader expands a prompt's `<NAME>`
        into exactly these n tokens. The normalizer is the
        standard CLIP one (NFC, whitespace, lower case): runtimes without ftfy differ from the reference
        only on text that ftfy would repair.
        """
        names = [
            (token_id, _exported_token(added.name) + (f"_{index}" if index else ""))
            for added in self._embeddings.values()
            for index, token_id in enumerate(added.ids)
        ]
        tokenizer = _build_tokenizer(self._vocab, self._merges)
        tokenizer.add_special_tokens(
            [AddedToken(BOS_TOKEN, normalized=False, special=True), AddedToken(EOS_TOKEN, normalized=False, special=True)]
        )
        tokenizer.add_tokens([AddedToken(name, normalized=False, special=False) for _, name in names])
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
            pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B {EOS_TOKEN}",
            special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID), (EOS_TOKEN, EOS_TOKEN_ID)],
        )
        for token_id, token in names:
            if tokenizer.token_to_id(token) != token_id:
                raise TokenizerError(
                    f"cannot export embedding token {token!r}: it would get id {tokenizer.token_to_id(token)}, "
                    f"expected {token_id} (does the name collide with a vocabulary entry?)"
                )
        return tokenizer.to_str(pretty=True)

    def export(
        self,
        folder: str | os.PathLike[str],
        vectors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        *,
        overwrite: bool = False,
    ) -> list[Path]:
        """Write `tokenizer.json` and, given `vectors` (embedding name -> {encoder key: (n, D)}),
        `added_token_embeddings.safetensors` holding one (added ids, D) table per encoder key, rows in
        id order (row 0 is id 49408). Returns the written paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = [folder / "tokenizer.json"]
        payloads = [self.to_tokenizer_json().encode("utf-8")]
        if vectors is not None and self._embeddings:
            written.append(folder / "added_token_embeddings.safetensors")
            payloads.append(self._vector_table_bytes(vectors))
        for path, payload in zip(written, payloads):
            atomic_write_bytes(path, payload, overwrite=overwrite)
        return written

    # --------------------------------------------------------------------------------------- internals

    def _encode_plain(self, text: str) -> list[int]:
        return self._bpe_ids(clean_text(text))

    def _bpe_ids(self, cleaned: str) -> list[int]:
        """BPE ids of cleaned text. A `<|startoftext|>`/`<|endoftext|>` piece of the reference's split
        maps to its special id, as in the reference; everything else goes through the BPE."""
        if not _SPECIAL_TOKEN_TEXT.search(cleaned):
            return self._bpe.encode(cleaned, add_special_tokens=False).ids
        ids: list[int] = []
        words: list[str] = []
        for piece, _ in self._split_only.pre_tokenize_str(cleaned):
            if piece in (BOS_TOKEN, EOS_TOKEN):
                if words:
                    ids.extend(self._bpe.encode(words, is_pretokenized=True, add_special_tokens=False).ids)
                    words = []
                ids.append(self._vocab[piece])
            else:
                words.append(piece)
        if words:
            ids.extend(self._bpe.encode(words, is_pretokenized=True, add_special_tokens=False).ids)
        return ids

    def _extend_with_words(self, ids: list[int], spans: list[EmbeddingSpan], text: str, bare_names: bool) -> None:
        """Append the ids of plain `text` (bare names bound unless `bare_names` is False)."""
        if not text:
            return
        piece_ids = self._encode_plain(text)
        if bare_names:
            piece_ids, piece_spans = self._bind_bare_names(piece_ids, offset=len(ids))
            spans.extend(piece_spans)
        ids.extend(piece_ids)

    def _explicit_references(self, text: str) -> list[_Reference]:
        """The `embedding:NAME` references of `text`, in order. NAME is the longest registered name or alias
        that starts right after the prefix and ends at a word boundary; else the reference names nothing
        and runs to the next space or prompt syntax character."""
        if "embedding:" not in text:
            return []
        by_alias = {alias: added for added in self._embeddings.values() for alias in (added.name, *added.aliases)}
        aliases = sorted(by_alias, key=len, reverse=True)
        references: list[_Reference] = []
        position = 0
        for match in _EXPLICIT_PREFIX.finditer(text):
            if match.start() < position:
                continue
            name_start = match.end()
            found = next(
                (
                    alias
                    for alias in aliases
                    if text.startswith(alias, name_start) and not _WORD_CHAR.match(text, name_start + len(alias))
                ),
                None,
            )
            if found is None:
                word = _REFERENCE_WORD.match(text, name_start).group(0)  # matches the empty string too
                references.append(_Reference(match.start(), name_start + len(word), word, None))
            else:
                references.append(_Reference(match.start(), name_start + len(found), found, by_alias[found]))
            position = references[-1].end
        return references

    def _bind_bare_names(self, ids: list[int], offset: int) -> tuple[list[int], list[EmbeddingSpan]]:
        """Replace every bare-name id sequence by the embedding's ids, longest name first."""
        if not self._embeddings:
            return ids, []
        index = self._bare_name_index()
        bound: list[int] = []
        spans: list[EmbeddingSpan] = []
        position = 0
        while position < len(ids):
            match = None
            for name_ids, name in index.get(ids[position], ()):
                if tuple(ids[position : position + len(name_ids)]) == name_ids:
                    match = (name_ids, name)
                    break
            if match is None:
                bound.append(ids[position])
                position += 1
                continue
            name_ids, name = match
            added = self._embeddings[name]
            spans.append(EmbeddingSpan(offset + len(bound), len(added.ids), name, explicit=False))
            bound.extend(added.ids)
            position += len(name_ids)
        return bound, spans

    def _bare_name_index(self) -> dict[int, list[tuple[tuple[int, ...], str]]]:
        """First id -> [(name ids, name)], longest first; names that tokenize to nothing and explicit-only
        embeddings are left out."""
        if self._first_id_index is None:
            index: dict[int, list[tuple[tuple[int, ...], str]]] = {}
            for name, added in self._embeddings.items():
                if added.explicit_only:
                    continue
                name_ids = self._name_ids_cache.get(name)
                if name_ids is None:
                    name_ids = tuple(self._encode_plain(name))
                    self._name_ids_cache[name] = name_ids
                if name_ids:
                    index.setdefault(name_ids[0], []).append((name_ids, name))
            for candidates in index.values():
                candidates.sort(key=lambda candidate: len(candidate[0]), reverse=True)
            self._first_id_index = index
        return self._first_id_index

    def _id_owner(self) -> dict[int, tuple[_AddedEmbedding, int]]:
        return {token_id: (added, i) for added in self._embeddings.values() for i, token_id in enumerate(added.ids)}

    def _vector_table_bytes(self, vectors: Mapping[str, Mapping[str, torch.Tensor]]) -> bytes:
        import torch
        from safetensors.torch import save

        encoder_keys = sorted({key for per_encoder in vectors.values() for key in per_encoder})
        tables: dict[str, torch.Tensor] = {}
        for key in encoder_keys:
            rows = []
            for added in self._embeddings.values():
                per_encoder = vectors.get(added.name)
                if per_encoder is None or key not in per_encoder:
                    raise TokenizerError(f"export: no {key} vectors given for embedding {added.name!r}")
                table = per_encoder[key]
                if table.ndim != 2 or table.shape[0] != len(added.ids):
                    raise TokenizerError(
                        f"export: embedding {added.name!r} has {len(added.ids)} ids, but its {key} vectors "
                        f"have shape {tuple(table.shape)}"
                    )
                rows.append(table.detach().to("cpu", torch.float32))
            tables[key] = torch.cat(rows).contiguous()  # (added ids, D)
        metadata = {"first_id": str(CLIP_VOCAB_SIZE), "names": json.dumps(self.embedding_names())}
        return save(tables, metadata=metadata)


def _exported_token(name: str) -> str:
    return name if name.startswith("<") and name.endswith(">") else f"<{name}>"


def _check_vocabulary(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], source: str) -> None:
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise TokenizerError(f"{source}: expected a CLIP vocabulary of {CLIP_VOCAB_SIZE} entries, found {len(vocab)}")
    for token, expected in ((BOS_TOKEN, BOS_TOKEN_ID), (EOS_TOKEN, EOS_TOKEN_ID), (",</w>", None)):
        found = vocab.get(token)
        if found is None or (expected is not None and found != expected):
            raise TokenizerError(f"{source}: expected {token!r} with id {expected}, found {found}")
    if len(merges) != CLIP_MERGE_COUNT:
        raise TokenizerError(f"{source}: expected {CLIP_MERGE_COUNT} BPE merges, found {len(merges)}")


def _build_tokenizer(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]]) -> Tokenizer:
    """A `tokenizers` BPE pipeline for cleaned text: CLIP split, byte map, BPE with `</w>`."""
    model = models.BPE(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=EOS_TOKEN,
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        fuse_unk=False,
    )
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
    return tokenizer


def chunk_frame(tokens: Sequence[int], *, pad_token_id: int, length: int = 77) -> list[int]:
    """One encoder window as A1111 builds it: `[BOS] + tokens + [EOS] * rest`, `length` ids in all.

    With a pad id other than EOS (OpenCLIP-H / bigG pad with 0), every position after the first EOS
    becomes the pad id, as A1111 does for SD2 and SDXL's second encoder.
    """
    if len(tokens) > length - 2:
        raise ValueError(f"a window holds at most {length - 2} tokens, got {len(tokens)}")
    framed = [BOS_TOKEN_ID, *tokens] + [EOS_TOKEN_ID] * (length - 1 - len(tokens))
    if pad_token_id != EOS_TOKEN_ID:
        first_eos = framed.index(EOS_TOKEN_ID)
        framed[first_eos + 1 :] = [pad_token_id] * (length - first_eos - 1)
    return framed
