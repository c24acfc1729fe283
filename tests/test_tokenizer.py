"""ClipTokenizer against OpenAI CLIP's reference tokenizer, exact ids.

References:
- `ReferenceClipTokenizer` below: OpenAI CLIP's `simple_tokenizer.py` algorithm restated independently
  (its cleaning, its regex split, its byte map, lowest-rank-first BPE over the same merges file).
- transformers' `CLIPTokenizer` on pre-cleaned text (it skips ftfy), from vocab/merges files.
- OpenAI's own `simple_tokenizer.py` and the SD tokenizer files, when ../shared/wild is present.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
from pathlib import Path

import ftfy
import pytest
import regex
from prompt_corpus import generated_prompts

from tiengine.text.tokenizer import (
    BOS_TOKEN_ID,
    CLIP_VOCAB_SIZE,
    DEFAULT_BPE_FILE,
    EOS_TOKEN_ID,
    ClipTokenizer,
    TokenizerError,
    chunk_frame,
    clean_text,
)

BPE_PATH = Path(__file__).resolve().parent.parent / "tiengine" / "data" / DEFAULT_BPE_FILE


class ReferenceClipTokenizer:
    """OpenAI CLIP's tokenizer, restated from its published algorithm for comparison."""

    def __init__(self, bpe_path: Path) -> None:
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        self.merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        self.byte_map = {b: chr(b) for b in printable}
        extra = 256
        for b in range(256):
            if b not in self.byte_map:
                self.byte_map[b] = chr(extra)
                extra += 1
        symbols = [self.byte_map[b] for b in [*printable, *(b for b in range(256) if b not in printable)]]
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in self.merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.vocab = {token: i for i, token in enumerate(vocab)}
        self.pattern = regex.compile(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
            regex.IGNORECASE,
        )

    @staticmethod
    def clean(text: str) -> str:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()

    def word_to_symbols(self, word: str) -> list[str]:
        if word in ("<|startoftext|>", "<|endoftext|>"):
            return [word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.pattern.findall(self.clean(text)):
            mapped = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
            ids.extend(self.vocab[symbol] for symbol in self.word_to_symbols(mapped))
        return ids

    def write_hf_files(self, folder: Path) -> tuple[Path, Path]:
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        vocab_path.write_text(json.dumps(self.vocab), encoding="utf-8")
        merges_path.write_text(
            "#version: 0.2\n" + "\n".join(" ".join(m) for m in self.merges) + "\n", encoding="utf-8"
        )
        return vocab_path, merges_path


@pytest.fixture(scope="module")
def reference() -> ReferenceClipTokenizer:
    return ReferenceClipTokenizer(BPE_PATH)


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer.default()


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    prompts = generated_prompts(600)
    assert len(prompts) >= 500
    return prompts


def test_default_vocabulary_matches_reference_construction(tokenizer, reference):
    assert tokenizer.base_vocab_size == CLIP_VOCAB_SIZE == len(reference.vocab)
    assert reference.vocab["<|startoftext|>"] == BOS_TOKEN_ID == 49406
    assert reference.vocab["<|endoftext|>"] == EOS_TOKEN_ID == 49407
    assert tokenizer.comma_token_id == reference.vocab[",</w>"] == 267
    assert tokenizer.token_text(265) == "*</w>"
    assert tokenizer.token_text(0) == "!"


def test_ids_equal_reference_on_generated_corpus(tokenizer, reference, corpus):
    mismatches = [(text, tokenizer.encode(text), reference.encode(text)) for text in corpus]
    mismatches = [m for m in mismatches if m[1] != m[2]]
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[0]!r}"


def test_batch_encoding_equals_single(tokenizer, corpus):
    assert tokenizer.encode_batch(corpus) == [tokenizer.encode(text) for text in corpus]


def test_cleaning_fast_path_equals_full_cleaning(reference, corpus):
    ascii_texts = [text for text in corpus if text.isascii()]
    ascii_texts += ["Tab\tand\nnew  lines\r\n", "  spaced  ", "form\x0cfeed", "x" * 500, "A,B;C:D", ""]
    assert len(ascii_texts) > 50
    for text in ascii_texts:
        assert clean_text(text) == reference.clean(text), repr(text)


@pytest.mark.parametrize(
    "text",
    ["&amp;amp;", "caf&eacute;", "ﬁne “quotes”", "Ｆｕｌｌ", "cafÃ©", "esc\x1b[31mred", "vt\x0bx", "nul\x00x", "\x1cfs"],
)
def test_cleaning_matches_reference_on_repairs(text, reference):
    assert clean_text(text) == reference.clean(text)


def test_transformers_clip_tokenizer_agrees_on_precleaned_text(tokenizer, reference, corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    reference.write_hf_files(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    import unicodedata

    # transformers' CLIP normalizer applies NFC after cleaning; compare on texts where that is a no-op.
    texts = [t for t in corpus if unicodedata.is_normalized("NFC", clean_text(t)) and "<|" not in t]
    assert len(texts) > 400
    for text in texts:
        assert tokenizer.encode(text) == hf(clean_text(text), add_special_tokens=False)["input_ids"], text


def test_special_token_strings_follow_reference_split(tokenizer, reference):
    for text in ["a <|endoftext|> b", "x<|endoftext|>y", "<<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>z"]:
        assert tokenizer.encode(text) == reference.encode(text), text
    assert EOS_TOKEN_ID in tokenizer.encode("a <|endoftext|> b")
    assert EOS_TOKEN_ID not in tokenizer.encode("<<|endoftext|>")


def test_decode_roundtrip(tokenizer):
    assert tokenizer.decode(tokenizer.encode("A photo of a Cat, 日本語 🎉")) == "a photo of a cat , 日本語 🎉 "


def test_wild_tokenizer_files_give_identical_ids(wild_dir, tokenizer, corpus):
    folders = ["clip-vit-large-patch14_from_sd15", "sd21_tokenizer", "sdxl_tokenizer_2"]
    for name in folders:
        loaded = ClipTokenizer.from_dir(wild_dir / "tokenizer" / name)
        for text in corpus[:200]:
            assert loaded.encode(text) == tokenizer.encode(text), (name, text)
    loaded = ClipTokenizer.from_dir(wild_dir / "models" / "sd15_runwayml_mirror_HDRJ-One")
    assert loaded.encode("EasyNegative") == tokenizer.encode("EasyNegative")


def test_openai_simple_tokenizer_agrees_on_wild_prompts(wild_dir, tokenizer):
    source = wild_dir / "tokenizer" / "openai_CLIP" / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    openai = module.SimpleTokenizer(str(wild_dir / "tokenizer" / "openai_CLIP" / "bpe_simple_vocab_16e6.txt.gz"))
    prompts = [json.loads(line)["prompt"] for line in (wild_dir / "prompts.jsonl").open(encoding="utf-8")]
    assert len(prompts) > 3000
    for text in prompts + generated_prompts(300, seed=99):
        assert tokenizer.encode(text) == openai.encode(text), text


# ------------------------------------------------------------------------------------ loading errors


def test_bpe_file_with_wrong_hash_is_refused(tmp_path):
    damaged = tmp_path / "bpe.txt.gz"
    damaged.write_bytes(BPE_PATH.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(TokenizerError, match=r"bpe\.txt\.gz: sha256 is [0-9a-f]{64}, expected 924691ac"):
        ClipTokenizer.from_bpe_file(damaged, expected_sha256="924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a")


def test_from_dir_errors_name_the_file(tmp_path, reference):
    with pytest.raises(TokenizerError, match="no vocab.json"):
        ClipTokenizer.from_dir(tmp_path)
    vocab_path, merges_path = reference.write_hf_files(tmp_path)
    vocab = json.loads(vocab_path.read_text())
    del vocab["<|endoftext|>"]
    vocab_path.write_text(json.dumps(vocab))
    with pytest.raises(TokenizerError, match="expected a CLIP vocabulary of 49408 entries, found 49407"):
        ClipTokenizer.from_dir(tmp_path)
    vocab_path.write_text("{not json")
    with pytest.raises(TokenizerError, match="vocab.json: cannot read the vocabulary"):
        ClipTokenizer.from_dir(tmp_path)


def test_from_dir_accepts_model_folder(tmp_path, reference, tokenizer):
    (tmp_path / "tokenizer").mkdir()
    reference.write_hf_files(tmp_path / "tokenizer")
    assert ClipTokenizer.from_dir(tmp_path).encode("a cat, 日本") == tokenizer.encode("a cat, 日本")


# ----------------------------------------------------------------------------- vocabulary extension


def fresh() -> ClipTokenizer:
    return ClipTokenizer.default()


def test_add_embedding_gives_consecutive_ids_after_base_vocabulary():
    tok = fresh()
    assert tok.add_embedding("EasyNegative", 8) == list(range(49408, 49416))
    assert tok.add_embedding("bad-artist", 2) == [49416, 49417]
    assert tok.vocab_size == 49418
    assert tok.embedding_names() == ["EasyNegative", "bad-artist"]


def test_remove_restores_exactly(corpus):
    tok = fresh()
    before_json = tok.to_tokenizer_json()
    before = [tok.encode(t) for t in corpus[:100]]
    tok.add_embedding("EasyNegative", 8)
    tok.add_embedding("photo", 3)
    assert [tok.encode(t) for t in corpus[:100]] != before
    tok.remove_embedding("photo")
    tok.remove_embedding("EasyNegative")
    assert tok.vocab_size == CLIP_VOCAB_SIZE
    assert [tok.encode(t) for t in corpus[:100]] == before
    assert tok.to_tokenizer_json() == before_json


def test_remove_renumbers_later_embeddings():
    tok = fresh()
    tok.add_embedding("one", 2)
    tok.add_embedding("two", 3)
    tok.remove_embedding("one")
    assert tok.embedding_ids("two") == [49408, 49409, 49410]
    with pytest.raises(TokenizerError, match="no embedding named 'one'"):
        tok.remove_embedding("one")


def test_bare_name_binding_matches_token_id_sequence_longest_first():
    tok = fresh()
    plain = fresh()
    tok.add_embedding("bad", 1)
    tok.add_embedding("bad-artist", 2)
    tok.add_embedding("EasyNegative", 8)
    result = tok.tokenize("a bad-artist, bad hands, easynegative")
    words = plain.encode("a")
    expected = words + [49409, 49410] + plain.encode(",") + [49408] + plain.encode("hands ,")
    expected += list(range(49411, 49419))
    assert result.ids == expected
    assert [(s.start, s.length, s.name) for s in result.embeddings] == [
        (1, 2, "bad-artist"),
        (4, 1, "bad"),
        (7, 8, "EasyNegative"),
    ]


def test_bare_name_quirk_matches_inside_hyphenated_word_but_not_inside_bpe_word():
    tok = fresh()
    tok.add_embedding("artist", 1)
    assert tok.tokenize("very-artist").ids[-1] == 49408  # A1111 matches on ids: '-' splits words
    assert 49408 not in tok.tokenize("artists").ids  # 'artists</w>' is another id


def test_explicit_binding_with_spaces_and_subfolders():
    tok = fresh()
    plain = fresh()
    tok.add_embedding("my style", 2, aliases=["styles/my style"])
    tok.add_embedding("EasyNegative", 1, aliases=["negatives/EasyNegative"])
    result = tok.tokenize("art, embedding:my style and embedding:negatives/EasyNegative!", bare_names=False)
    assert result.ids == plain.encode("art,") + [49408, 49409] + plain.encode("and") + [49410] + plain.encode("!")
    assert [(s.name, s.explicit) for s in result.embeddings] == [("my style", True), ("EasyNegative", True)]


def test_explicit_binding_never_inside_a_longer_word():
    tok = fresh()
    plain = fresh()
    tok.add_embedding("cat", 1)
    for text in ["embedding:cats", "myembedding:cat", "embedding:cat_2", "embedding:cat-ear"]:
        result = tok.tokenize(text, bare_names=False)
        assert result.ids == plain.encode(text), text
        assert not result.embeddings
    assert tok.tokenize("embedding:cats", bare_names=False).unresolved == ["cats"]


@pytest.mark.parametrize("explicit_syntax", [False, True])
def test_unknown_explicit_name_is_kept_as_text_and_reported(explicit_syntax):
    tok = fresh()
    result = tok.tokenize("a embedding:missing, b", explicit_syntax=explicit_syntax)
    assert result.ids == fresh().encode("a embedding:missing, b")
    assert result.unresolved == ["missing"] and result.text_references == []


def test_embedding_reference_is_text_by_default_as_in_a1111():
    """A1111 has no `embedding:` syntax: "embedding" and ":" stay tokens, names bind on the ids after them."""
    tok = fresh()
    plain = fresh()
    tok.add_embedding("EasyNegative", 2, aliases=["negatives/EasyNegative"])
    tok.add_embedding("cat", 1)
    tok.add_embedding("sub/cat", 3, explicit_only=True)
    result = tok.tokenize("embedding:EasyNegative, embedding:negatives/EasyNegative embedding:sub/cat")
    prefix = plain.encode("embedding:")
    assert prefix == [19703, 796, 281]  # "embed", "ding", ":"
    assert result.ids == [
        *prefix, 49408, 49409, *plain.encode(","), *prefix, *plain.encode("negatives/"), 49408, 49409,
        *prefix, *plain.encode("sub/"), 49410,
    ]
    assert [(s.name, s.explicit) for s in result.embeddings] == [("EasyNegative", False)] * 2 + [("cat", False)]
    assert result.text_references == ["EasyNegative", "negatives/EasyNegative", "sub/cat"]
    assert result.unresolved == []
    # a name that is not loaded: words, and a loaded bare name inside still binds (A1111 matches on ids)
    missing = tok.tokenize("embedding:other/cat")
    assert missing.ids == plain.encode("embedding:other/") + [49410] and missing.unresolved == ["other/cat"]
    # the explicit syntax is the opt-in; bare_names=False implies it
    explicit = tok.tokenize("embedding:EasyNegative, embedding:sub/cat", explicit_syntax=True)
    assert explicit.ids == [49408, 49409, *plain.encode(","), 49411, 49412, 49413]
    assert tok.tokenize("embedding:EasyNegative, cat", bare_names=False).ids == [49408, 49409, *plain.encode(", cat")]


def test_add_embedding_validation():
    tok = fresh()
    with pytest.raises(TokenizerError, match="n_vectors must be an int in 1..75"):
        tok.add_embedding("x", 76)
    with pytest.raises(TokenizerError, match="non-empty"):
        tok.add_embedding(" ", 1)
    tok.add_embedding("x", 1, aliases=["sub/x"])
    with pytest.raises(TokenizerError, match="already registered"):
        tok.add_embedding("x", 1)
    with pytest.raises(TokenizerError, match="already used by another"):
        tok.add_embedding("y", 1, aliases=["sub/x"])


def test_exported_tokenizer_json_loads_in_tokenizers_and_transformers(tmp_path, corpus):
    torch = pytest.importorskip("torch")
    tok = fresh()
    tok.add_embedding("EasyNegative", 3)
    tok.add_embedding("rick", 2)
    vectors = {"EasyNegative": {"clip_l": torch.randn(3, 768)}, "rick": {"clip_l": torch.randn(2, 768)}}
    written = tok.export(tmp_path, vectors)
    assert [p.name for p in written] == ["tokenizer.json", "added_token_embeddings.safetensors"]

    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    table = load_file(tmp_path / "added_token_embeddings.safetensors")["clip_l"]
    assert torch.equal(table, torch.cat([vectors["EasyNegative"]["clip_l"], vectors["rick"]["clip_l"]]))

    exported = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "a photo, <EasyNegative> <EasyNegative>_1 <EasyNegative>_2 <rick> <rick>_1"
    expected = [BOS_TOKEN_ID, *fresh().encode("a photo,"), *range(49408, 49413), EOS_TOKEN_ID]
    assert exported.encode(text).ids == expected
    # Texts that ftfy leaves alone (no entities, no control characters): there the standard
    # normalizer and the reference cleaning agree.
    plain_texts = [
        t for t in corpus[:300]
        if t.isascii() and "&" not in t and "<|" not in t and t.replace("\t", " ").replace("\n", " ").isprintable()
    ]
    assert len(plain_texts) > 20
    for t in plain_texts:
        assert exported.encode(t, add_special_tokens=False).ids == fresh().encode(t), t

    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert hf(text)["input_ids"] == expected


def test_export_refuses_to_overwrite(tmp_path):
    tok = fresh()
    tok.export(tmp_path)
    with pytest.raises(Exception, match="already exists"):
        tok.export(tmp_path)
    tok.export(tmp_path, overwrite=True)


# ------------------------------------------------------------------------------------------ framing


def test_chunk_frame_sd1_pads_with_eos():
    framed = chunk_frame([320, 1125], pad_token_id=EOS_TOKEN_ID)
    assert framed == [BOS_TOKEN_ID, 320, 1125] + [EOS_TOKEN_ID] * 74
    assert len(framed) == 77


def test_chunk_frame_openclip_zeroes_after_first_eos():
    framed = chunk_frame([320, 1125], pad_token_id=0)
    assert framed == [BOS_TOKEN_ID, 320, 1125, EOS_TOKEN_ID] + [0] * 73
    full = chunk_frame(list(range(1, 76)), pad_token_id=0)
    assert full == [BOS_TOKEN_ID, *range(1, 76), EOS_TOKEN_ID]
    with pytest.raises(ValueError, match="at most 75 tokens"):
        chunk_frame(list(range(76)), pad_token_id=0)


def test_an_unresolved_explicit_reference_never_binds_its_tail_by_bare_name():
    tokenizer = ClipTokenizer.default()
    tokenizer.add_embedding("cat", 2)
    plain = ClipTokenizer.default()
    result = tokenizer.tokenize("a embedding:sub/cat, and a cat", explicit_syntax=True)
    assert result.unresolved == ["sub/cat"]
    assert [span.start for span in result.embeddings] == [len(result.ids) - 2]  # only the bare "cat" at the end
    assert result.ids[: -2] == plain.encode("a embedding:sub/cat, and a")
    # a resolved reference still binds, and bare names elsewhere still bind
    tokenizer.add_embedding("dog", 1, aliases=("sub/dog",))
    bound = tokenizer.tokenize("embedding:sub/dog cat", explicit_syntax=True)
    assert [span.name for span in bound.embeddings] == ["dog", "cat"] and bound.unresolved == []


def test_explicit_only_embeddings_never_bind_by_bare_name():
    tokenizer = ClipTokenizer.default()
    tokenizer.add_embedding("first", 1)
    tokenizer.add_embedding("sub/cat", 2, explicit_only=True)
    tokenizer.add_embedding("cat", 1)
    assert [span.name for span in tokenizer.tokenize("a sub/cat").embeddings] == ["cat"]
    assert tokenizer.tokenize("embedding:sub/cat, cat", explicit_syntax=True).embeddings[0].name == "sub/cat"
    tokenizer.remove_embedding("first")  # renumbering keeps the flag
    assert tokenizer.embedding_ids("sub/cat") == [49408, 49409]
    assert [span.name for span in tokenizer.tokenize("a sub/cat").embeddings] == ["cat"]
    copied = tokenizer.copy().tokenize("embedding:sub/cat", explicit_syntax=True)
    assert [span.name for span in copied.embeddings] == ["sub/cat"]
