"""Conditioning cases where A1111's algorithm, run on random weights, once disagreed with tiengine.

1. SD2, an embedding over a chunk's only EOS. In `"a, " + "cat " * N + ", emb3 dog ... ant"` with N = 60..69
   and a 3-vector embedding `emb3`, comma backtracking moves the tail (emb3's id-0 placeholders and the
   words after it) to the next chunk, but A1111 keeps emb3's fix in the closed chunk, whose first EOS
   now sits at emb3's old offset. SD2 zero-pads after that EOS, and the fix writes emb3's vectors over
   it, so the chunk holds no EOS vector at all. A1111's SD2 encoder never pools, so this encodes; SDXL's
   OpenCLIP-bigG pools at `text.argmax(dim=-1)` of the ids A1111 passes (placeholders 0, EOS still in
   the ids), so its pooled output comes from the embedding's vector there. tiengine used to pool
   whenever every layer ran (diffusers' 23-layer SD2 layout), then failed for want of an EOS. N = 53
   and 55 keep emb3 in place (no backtracking) and are the control.
2. `embedding:NAME`. A1111 has no such syntax: "embedding" and ":" are tokens before the embedding's
   slots, `embedding:sub/cat` binds whatever `cat` names, and a name that is not loaded is plain words.
   That is tiengine's default; `explicit_embedding_syntax=True` (or `bare_names=False`) is the opt-in
   explicit reference.

References: tests/a1111_reference.py (A1111's tokenize_line, EmbeddingsWithFixes and OpenCLIP's pooling,
restated on transformers' CLIP models with the same weights). Families: test_conditioning.Family, plus
"sd2_23" (diffusers' SD2 folder: OpenCLIP-H without its unused last layer, read at its last layer, so
every layer runs). Tolerance: test_conditioning's (fp32 kernel differences, 2e-5 absolute).
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from a1111_reference import ref_tokenize_line
from prompt_corpus import generated_prompts
from test_conditioning import (
    EMBEDDING_SIZES,
    TOLERANCE,
    Family,
    all_prompts,
    assert_close,
)

from tiengine.cli import add_encode_options, encode_options
from tiengine.models.text_encoder import (
    ClipTextEncoder,
    TextEncoderConfig,
    TokenIdError,
)
from tiengine.text.chunking import tokenize_prompt
from tiengine.text.conditioning import EncodeOptions, encoder_token_ids, pool_positions
from tiengine.text.tokenizer import EOS_TOKEN_ID, ClipTokenizer

FAMILIES = ("sd1", "sd2", "sd2_23", "sdxl")
CASE_SIZES = {**EMBEDDING_SIZES, "emb3": 3}
CAT_COUNTS = (53, 55, 60, 69)
WILD_PROMPTS_PER_FAMILY = 240
CORPUS_PROMPTS_PER_FAMILY = 80
BATCH = 4  # texts per A1111 forward call (schedule variants share one call and one emphasis mean)


def backtrack_prompt(cats: int) -> str:
    return "a, " + "cat " * cats + ", emb3 dog bird fish horse cow pig hen owl bee ant"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def families() -> dict[str, Family]:
    return {name: Family(name, CASE_SIZES) for name in FAMILIES}


# ------------------------------------------------------------------- 1. an embedding over the only EOS


@pytest.mark.parametrize("cats", CAT_COUNTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_backtracked_embedding_over_the_eos_encodes_as_a1111(families, name, cats):
    family = families[name]
    prompt = backtrack_prompt(cats)
    ours, ours_pooled = family.ours([prompt])
    ref, ref_pooled = family.reference([prompt])
    assert_close(ours, ref)
    assert (ours_pooled is None) == (ref_pooled is None) == (name != "sdxl")
    if ref_pooled is not None:
        assert_close(ours_pooled, ref_pooled)


def test_the_cases_are_the_ones_that_cover_the_eos():
    """N = 60..69 puts emb3 over chunk 0's first EOS (SD2 ids then hold no EOS); 53 and 55 do not."""
    tokenizer = ClipTokenizer.default()
    tokenizer.add_embedding("emb3", 3)
    for cats in (53, 55, *range(60, 70)):
        result = tokenize_prompt(backtrack_prompt(cats), tokenizer)
        first = result.chunks[0]
        sd2_ids = encoder_token_ids([first], 0, torch.device("cpu"))[0].tolist()
        covers = [e.slot for e in first.embeddings] == [first.tokens.index(EOS_TOKEN_ID)]
        assert covers == (cats >= 60) == (EOS_TOKEN_ID not in sd2_ids) == bool(result.warnings), cats


def test_pool_positions_are_openclip_argmax_of_a1111_ids():
    """OpenCLIP pools at the first highest id A1111 passes (embedding slots hold 0): on every prompt of
    test_conditioning, the backtracking cases and literal special-token text."""
    tokenizer = ClipTokenizer.default()
    plain = ClipTokenizer.default()
    for name, n in CASE_SIZES.items():
        tokenizer.add_embedding(name, n)
    names = {name: {"clip_l": torch.zeros(n, 1)} for name, n in CASE_SIZES.items()}
    prompts = [*all_prompts(), *(backtrack_prompt(cats) for cats in range(50, 75)),
               "a <|endoftext|> b", "<|startoftext|> rick <|endoftext|>", "x " * 74 + "<|endoftext|> y"]
    for prompt in prompts:
        ours = tokenize_prompt(prompt, tokenizer).chunks
        ref, _ = ref_tokenize_line(prompt, plain.encode, names)
        assert pool_positions(ours) == [int(torch.tensor(chunk.tokens).argmax()) for chunk in ref], prompt
    literal = tokenize_prompt("a <|endoftext|> b", tokenizer).chunks
    assert pool_positions(literal) == [2]  # the literal EOS comes first, as in A1111


def test_encoder_pools_only_when_asked():
    config = TextEncoderConfig.tiny(num_hidden_layers=2, pad_token_id=0, output_layer=-1)
    torch.manual_seed(0)
    encoder = ClipTextEncoder(config).eval()
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0.0, 0.1)
        no_eos = torch.tensor([[49406, 320, 2368, 49408, 49409, 49410] + [0] * 71])  # (1, 77)
        rows = torch.randn(3, 32)
        context, pooled = encoder.encode(no_eos, rows)
        assert pooled is None and context.shape == (1, 77, 32)
        assert encoder(no_eos, rows, pool=False).pooled_output is None
        with pytest.raises(TokenIdError, match=r"row 0 has no EOS \(49407\); pooling needs one"):
            encoder.encode(no_eos, rows, pooled=True)
        _, at_slot = encoder.encode(no_eos, rows, pooled=True, pool_positions=torch.tensor([3]))
        everything = encoder(no_eos, rows, pool=False).hidden_states[-1]
        torch.testing.assert_close(at_slot, encoder.final_layer_norm(everything)[:, 3], rtol=0, atol=0)


# --------------------------------------------------------------------------- corpus and wild prompts


def _compare_in_batches(family: Family, prompts: list[str]) -> int:
    compared = 0
    for start in range(0, len(prompts), BATCH):
        texts = prompts[start : start + BATCH]
        ours, ours_pooled = family.ours(texts)
        ref, ref_pooled = family.reference(texts)
        assert ours.shape == ref.shape, texts

        def with_texts(message: str, texts: list[str] = texts) -> str:
            return f"{texts!r}: {message}"

        torch.testing.assert_close(ours, ref, rtol=0, atol=TOLERANCE, msg=with_texts)
        if ref_pooled is not None:
            torch.testing.assert_close(ours_pooled, ref_pooled, rtol=0, atol=TOLERANCE, msg=with_texts)
        compared += len(texts)
    return compared


@pytest.mark.parametrize("name", FAMILIES)
def test_generated_corpus_matches_a1111(families, name):
    offset = FAMILIES.index(name)
    prompts = generated_prompts()[offset :: len(generated_prompts()) // CORPUS_PROMPTS_PER_FAMILY]
    assert _compare_in_batches(families[name], prompts) >= CORPUS_PROMPTS_PER_FAMILY


@pytest.fixture(scope="module")
def wild_families(wild_dir) -> tuple[dict[str, Family], list[str]]:
    """Families bound to the real embedding names (and vector counts) of ../shared/wild, and its prompts."""
    from tiengine.embeddings.library import EmbeddingLibrary

    library = EmbeddingLibrary(wild_dir / "embeddings", "sd1")
    sizes = {name: embedding.n_vectors for name, embedding in library.loaded.items()}
    records = (wild_dir / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    prompts = [json.loads(line)["prompt"] for line in records]
    return {name: Family(name, sizes) for name in FAMILIES}, prompts


@pytest.mark.parametrize("name", FAMILIES)
def test_wild_prompts_match_a1111(wild_families, name):
    families, prompts = wild_families
    step = len(prompts) // WILD_PROMPTS_PER_FAMILY
    chosen = prompts[FAMILIES.index(name) :: step][:WILD_PROMPTS_PER_FAMILY]
    family = families[name]
    assert sum(family.tokenizer.tokenize(prompt).embeddings != [] for prompt in chosen) > 40  # real names bind
    assert _compare_in_batches(family, chosen) == WILD_PROMPTS_PER_FAMILY


# ------------------------------------------------------------------------------- 2. embedding:NAME

EMBEDDING_SYNTAX_PROMPTS = [
    "embedding:EasyNegative, a cat",
    "(embedding:rick:1.2) in a forest",
    "a embedding:sub/cat",
    "embedding:negatives/EasyNegative, lowres",
    "embedding:missing cat",
    "embedding:my style and embedding:EasyNegativeV2",
    "[embedding:rick|embedding:cat] BREAK embedding:bad-artist",
    "x " * 70 + ", embedding:rick a b c",
]
SYNTAX_SIZES = {"EasyNegative": 8, "rick": 3, "cat": 1, "my style": 2, "bad-artist": 2}


def syntax_tokenizer() -> ClipTokenizer:
    """The names above, with a path alias and a shadowed file (`sub/cat`, explicit only) as a library
    binds them; A1111 registers only the names."""
    tokenizer = ClipTokenizer.default()
    for name, n in SYNTAX_SIZES.items():
        tokenizer.add_embedding(name, n, aliases=["negatives/EasyNegative"] if name == "EasyNegative" else ())
    tokenizer.add_embedding("sub/cat", 2, explicit_only=True)
    return tokenizer


@pytest.mark.parametrize("prompt", EMBEDDING_SYNTAX_PROMPTS)
def test_embedding_syntax_gives_a1111_tokens_by_default(prompt):
    ours = tokenize_prompt(prompt, syntax_tokenizer())
    names = {name: {"clip_l": torch.zeros(n, 1)} for name, n in SYNTAX_SIZES.items()}
    ref, ref_count = ref_tokenize_line(prompt, ClipTokenizer.default().encode, names)
    assert ours.token_count == ref_count
    assert [[0 if t > EOS_TOKEN_ID else t for t in chunk.tokens] for chunk in ours.chunks] == [c.tokens for c in ref]
    assert [chunk.weights for chunk in ours.chunks] == [c.multipliers for c in ref]
    assert [[(e.slot - 1, e.name) for e in chunk.embeddings] for chunk in ours.chunks] == [c.fixes for c in ref]


def test_explicit_embedding_syntax_is_the_opt_in():
    plain = ClipTokenizer.default()
    tokenizer = syntax_tokenizer()
    easy, rick, cat, sub_cat = range(49408, 49416), range(49416, 49419), [49419], [49424, 49425]

    def ids(prompt, **options):
        return [t for chunk in tokenize_prompt(prompt, tokenizer, **options).chunks for t in chunk.tokens[1:-1]]

    def padded(*parts):
        tokens = [t for part in parts for t in part]
        return tokens + [EOS_TOKEN_ID] * (75 - len(tokens))

    explicit = ids("embedding:EasyNegative, a cat", explicit_embedding_syntax=True)
    assert explicit == padded(easy, plain.encode(", a"), cat)
    assert ids("a embedding:sub/cat", explicit_embedding_syntax=True) == padded(plain.encode("a"), sub_cat)
    assert ids("a embedding:sub/cat") == padded(plain.encode("a embedding:sub/"), cat)  # A1111: the bare "cat"
    # bare_names=False: the explicit syntax only
    assert ids("embedding:rick, rick", bare_names=False) == padded(rick, plain.encode(", rick"))
    unresolved = tokenize_prompt("embedding:missing cat", tokenizer, explicit_embedding_syntax=True)
    assert unresolved.unresolved == ["missing"] and unresolved.chunks[0].tokens[5] == 49419  # "cat" after it binds
    assert ids("embedding:other/cat", explicit_embedding_syntax=True) == padded(plain.encode("embedding:other/cat"))


def test_embedding_syntax_read_as_text_is_reported():
    result = tokenize_prompt("embedding:rick, embedding:rick, embedding:negatives/EasyNegative, embedding:nope",
                             syntax_tokenizer())
    assert result.unresolved == ["nope"]
    assert [warning.split(" is text")[0] for warning in result.warnings] == [
        "embedding:rick", "embedding:negatives/EasyNegative"
    ]
    assert "explicit_embedding_syntax=True makes it a reference to 'rick'" in result.warnings[0]
    explicit = tokenize_prompt("embedding:rick", syntax_tokenizer(), explicit_embedding_syntax=True)
    assert explicit.warnings == []


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_embedding_syntax_encodes_as_a1111_and_the_option_drops_the_prefix(families, name):
    family = families[name]
    prompts = ["embedding:EasyNegative, a cat", "(embedding:rick:1.2), embedding:missing"]
    for prompt in prompts:
        ours, ours_pooled = family.ours([prompt])
        ref, ref_pooled = family.reference([prompt])
        assert_close(ours, ref)
        if ref_pooled is not None:
            assert_close(ours_pooled, ref_pooled)
    explicit, _ = family.ours(["embedding:EasyNegative, a cat"], explicit_embedding_syntax=True)
    bare, _ = family.ours(["EasyNegative, a cat"])
    torch.testing.assert_close(explicit, bare, rtol=0, atol=0)
    default, _ = family.ours(["embedding:EasyNegative, a cat"])
    assert not torch.allclose(default, bare, atol=1e-3)


def test_encode_options_and_cli_flags():
    assert EncodeOptions().explicit_embedding_syntax is False
    assert EncodeOptions(bare_names=False) == EncodeOptions(bare_names=False, explicit_embedding_syntax=True)
    parser = argparse.ArgumentParser()
    add_encode_options(parser)
    flags = {
        (): (True, False),
        ("--explicit-embedding-syntax",): (True, True),
        ("--explicit-only",): (False, True),
    }
    for argv, (bare_names, explicit) in flags.items():
        options = encode_options(parser.parse_args(list(argv)))
        assert (options.bare_names, options.explicit_embedding_syntax) == (bare_names, explicit), argv
