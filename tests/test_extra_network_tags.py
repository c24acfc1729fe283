"""Extra-network tags (`<lora:name:0.8>`) leave prompts exactly as AUTOMATIC1111 removes them.

The reference is A1111's own statement (`modules/extra_networks.py`): `re.sub(r"<(\\w+):([^>]+)>", "", prompt)`
with each match's group 2 split on ":" (`A1111_TAG`, `reference_strip` below), and the argument rules of
`extra_networks_lora.py` / `extra_networks_hypernet.py`. The wild corpus (../shared/wild/prompts.txt, 3,233
real prompts) is checked prompt by prompt, and through the whole prompt pipeline (AND parts, schedules,
attention fragments, chunks with real SD1 embeddings bound).
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter

import pytest
import torch

from tiengine.cli import main
from tiengine.embeddings.embedding import Embedding, save_embedding
from tiengine.embeddings.library import EmbeddingLibrary
from tiengine.errors import NetworkError
from tiengine.text.chunking import tokenize_prompt
from tiengine.text.extra_networks import (
    HYPERNET_KINDS,
    LORA_KINDS,
    ExtraNetworkTag,
    HypernetArguments,
    LoraArguments,
    hypernet_arguments,
    lora_arguments,
    strip_extra_networks,
)
from tiengine.text.prompt import (
    MAX_PROMPT_CHARS,
    PromptError,
    PromptLimits,
    parse_prompt_attention,
    prompt_schedule,
    split_and,
)
from tiengine.text.tokenizer import ClipTokenizer
from tiengine.text.vocabulary import EmbeddingVocabulary

A1111_TAG = re.compile(r"<(\w+):([^>]+)>")  # modules/extra_networks.py, re_extra_net


def reference_strip(prompt: str) -> tuple[str, list[tuple[str, tuple[str, ...], int, int]]]:
    """A1111's parse_prompt: the text left by re.sub and each match's (kind, items, start, end)."""
    found = []

    def remove(match: re.Match) -> str:
        found.append((match.group(1), tuple(match.group(2).split(":")), match.start(), match.end()))
        return ""

    return A1111_TAG.sub(remove, prompt), found


def assert_like_a1111(prompt: str, where: str = "positive") -> None:
    stripped = strip_extra_networks(prompt, where)
    text, found = reference_strip(prompt)
    assert stripped.text == text
    assert [(tag.kind, tag.items, tag.start, tag.end) for tag in stripped.tags] == found
    assert all(tag.text == prompt[tag.start : tag.end] and tag.where == where for tag in stripped.tags)


def tag(prompt: str) -> ExtraNetworkTag:
    (only,) = strip_extra_networks(prompt).tags
    return only


# ------------------------------------------------------------------------------------------- stripping


def test_a1111_docstring_example():
    # ExtraNetwork.activate's docstring: the hypernet network receives items ["agm", "1.1"] and ["ray"]
    stripped = strip_extra_networks("1girl, <hypernet:agm:1.1> <extrasupernet:master:12:13:14> <hypernet:ray>")
    assert stripped.text == "1girl,   "
    assert [(t.kind, t.items) for t in stripped.tags] == [
        ("hypernet", ("agm", "1.1")), ("extrasupernet", ("master", "12", "13", "14")), ("hypernet", ("ray",)),
    ]
    first, other, last = stripped.tags
    assert (first.start, first.end, first.text) == (7, 25, "<hypernet:agm:1.1>")
    assert hypernet_arguments(first) == HypernetArguments("agm", 1.1) and hypernet_arguments(last) == ("ray", 1.0)
    assert other.kind not in LORA_KINDS + HYPERNET_KINDS and other.name == "master"
    assert_like_a1111("1girl, <hypernet:agm:1.1> <extrasupernet:master:12:13:14> <hypernet:ray>")


@pytest.mark.parametrize(
    "prompt, text, items",
    [
        ("(<lora:x:1>:1.2) cat", "(:1.2) cat", [("x", "1")]),  # inside a weight
        ("[<lora:x:1>] ((<lyco:y:0.5>))", "[] (())", [("x", "1"), ("y", "0.5")]),  # inside brackets
        ("[<lora:a:1>:<lora:b:1>:5]", "[::5]", [("a", "1"), ("b", "1")]),  # both sides of a schedule
        ("a <lora:x", "a <lora:x", []),  # unterminated
        ("<:x> <lora:> <lora::> <lo-ra:x>", "<:x> <lora:>  <lo-ra:x>", [("", "")]),  # no kind / no argument
        ("<<lora:a:1>>", "<>", [("a", "1")]),  # nested angle brackets
        ("<lora:a:<lora:b:1>", "", [("a", "<lora", "b", "1")]),  # `[^>]+` takes the inner "<"
        ("<лора:имя:1> <lora:名前:0.5> <٣:x>", "  ", [("имя", "1"), ("名前", "0.5"), ("x",)]),  # Unicode \w
        ("<lore\u0301:x> <x\u00b2:y>", "<lore\u0301:x> ", [("y",)]),  # U+0301 is no \w; U+00B2 is (numeric)
        ("a\n<lora:x:\n0.5>\nb <lora\n:y:1>", "a\n\nb <lora\n:y:1>", [("x", "\n0.5")]),  # newlines
        ("<lora:Amy Adams:1.0>, <lora:x:0.2:face>", ", ", [("Amy Adams", "1.0"), ("x", "0.2", "face")]),
        ("<lora:x:1> AND <lora:y:1>:0.5", " AND :0.5", [("x", "1"), ("y", "1")]),
        ("no tags (at:1.2) [a|b] <> <a> a:b>", "no tags (at:1.2) [a|b] <> <a> a:b>", []),
    ],
)
def test_tags_are_removed_as_a1111_removes_them(prompt, text, items):
    stripped = strip_extra_networks(prompt)
    assert stripped.text == text
    assert [t.items for t in stripped.tags] == items
    assert_like_a1111(prompt)


def test_tags_go_before_schedules_and_alternation():
    # From the wild corpus: a tag's ":" inside [a|b] would break the alternation if it were still there;
    # A1111 strips first, so the LoRA applies at every step and the alternation survives
    prompt = "([a giant rengar|a little JinxLol, smiling <lora:Jinx:1>]:1.3)"
    text = strip_extra_networks(prompt).text
    assert [entry.text for entry in prompt_schedule(text, 2)] == [
        "(a giant rengar:1.3)", "(a little JinxLol, smiling :1.3)",
    ]
    assert prompt_schedule(prompt, 2) == [(2, prompt)]  # with the tag it does not parse: used as is


def test_random_text_is_stripped_like_a1111():
    # seeded short texts over the characters that matter: "<", ">", ":", "=", word and non-word characters
    pieces = ["<", ">", ":", "=", "a", "_", "1", " ", "\n", "\u00e9", "\u0663", "\u0301", "-", "<a:", ">>"]
    generator = random.Random(20240607)
    for _ in range(20_000):
        assert_like_a1111("".join(generator.choice(pieces) for _ in range(generator.randint(0, 24))))


def test_where_and_tag_values():
    stripped = strip_extra_networks("x <lora:n:0.5>", "negative")
    assert stripped.tags[0].where == "negative"
    with pytest.raises(ValueError, match="where must be one of"):
        strip_extra_networks("x", "both")
    with pytest.raises(PromptError, match="must be a string"):
        strip_extra_networks(b"<lora:x:1>")  # type: ignore[arg-type]
    # frozen and hashable: tags can key dicts and sets
    assert len({tag("<lora:n:1>"), tag("<lora:n:1>"), tag("<lora:n:2>")}) == 2
    assert strip_extra_networks("plain").tags == ()


def test_positional_and_named_arguments():
    # ExtraNetworkParams: an item that split('=', 2) cuts into exactly 2 parts is named
    item = tag("<lora:n:0.5:dyn=8:a=b=c:=x:te=1:te=2>")
    assert item.positional == ("n", "0.5", "a=b=c")
    assert item.named == (("dyn", "8"), ("", "x"), ("te", "2"))  # a repeated key: first place, last value
    assert tag("<lora:te=1>").name == "" and tag("<lora:te=1>").positional == ()


def test_prompt_over_the_length_limit_is_refused():
    with pytest.raises(PromptError, match="over the limit of 10"):
        strip_extra_networks("<lora:x:1> long", limits=PromptLimits(max_chars=10))


# ------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("<lora:n>", LoraArguments("n", 1.0, 1.0, None)),
        ("<lora:n:0.5>", LoraArguments("n", 0.5, 0.5, None)),  # unet follows te
        ("<lora:n:0.5:0.25>", LoraArguments("n", 0.5, 0.25, None)),
        ("<lora:n:1:dyn=8>", LoraArguments("n", 1.0, 1.0, 8)),
        ("<lora:n:unet=0.5>", LoraArguments("n", 1.0, 0.5, None)),
        ("<lora:n:te=0.5>", LoraArguments("n", 0.5, 0.5, None)),  # the named te is the unet default too
        ("<lyco:n:0.3:0.4:16:te=0.1:unet=0.2:dyn=4>", LoraArguments("n", 0.1, 0.2, 4)),  # named wins
        ("<lora:n:-1: 2 :+3>", LoraArguments("n", -1.0, 2.0, 3)),  # float()/int() accept signs and spaces
        ("<lora:n:\n0.5>", LoraArguments("n", 0.5, 0.5, None)),
    ],
)
def test_lora_arguments(prompt, expected):
    assert lora_arguments(tag(prompt)) == expected


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("<lora:n:a=b=c>", "the text-encoder multiplier (2nd argument) is 'a=b=c', not a number"),
        ("<lora:n:1:LyCOPALETTE>",
         "UNet multiplier (3rd argument) is 'LyCOPALETTE', not a number (expected a decimal such as 0.8; block"),
        ("<lora:n:2,5>", "text-encoder multiplier (2nd argument) is '2,5', not a number"),
        ("<lora:n:>", "text-encoder multiplier (2nd argument) is '', not a number"),
        ("<lora:n:abc:te=1>", "(2nd argument) is 'abc'"),  # read even though te= replaces it, as A1111
        ("<lora:n:unet=x>", "the UNet multiplier unet= is 'x', not a number"),
        ("<lora:n:1:1:8.0>", "the dynamic rank (4th argument) is '8.0', not a whole number (expected a rank"),
        ("<lora:n:dyn=0>", "the dynamic rank dyn= is 0 (expected a rank of at least 1"),
        ("<lora:n:inf>", "the text-encoder multiplier (2nd argument) 'inf' is not finite in float32"),
        ("<lora:n:1:nan>", "UNet multiplier (3rd argument) 'nan' is not finite"),
        ("<lora:n:1e39>", "'1e39' is not finite in float32"),
        ("<lora:n:1:1:" + "9" * 5000 + ">", "not a whole number"),  # int() refuses > 4300 digits
    ],
)
def test_lora_arguments_that_are_not_numbers(prompt, message):
    with pytest.raises(NetworkError) as error:
        lora_arguments(tag("a " + prompt))
    text = str(error.value)
    assert message in text
    assert text.startswith("extra network tag ") and "in the positive prompt (characters 2-" in text
    assert len(text) < 400  # a 5,000-digit value is shortened, not echoed


def test_hypernet_arguments():
    assert hypernet_arguments(tag("<hypernet:h:0.8>")) == ("h", 0.8)
    assert hypernet_arguments(tag("<hypernet:a=b>")) == ("a=b", 1.0)  # items[0], "=" or not
    with pytest.raises(NetworkError, match=r"'<hypernet:h:x>' in the positive prompt .*multiplier \(2nd argument\)"):
        hypernet_arguments(tag("<hypernet:h:x>"))


def test_arguments_of_the_wrong_kind_are_a_caller_error():
    with pytest.raises(ValueError, match="lora_arguments takes a tag of kind lora or lyco, got 'hypernet'"):
        lora_arguments(tag("<hypernet:h>"))
    with pytest.raises(ValueError, match="got 'lora'"):
        hypernet_arguments(tag("<lora:h>"))


# ---------------------------------------------------------------------------------------- hostile input

HOSTILE = {
    "unclosed": "<a:" * (MAX_PROMPT_CHARS // 3),
    "unclosed then closed": "<a:" * (MAX_PROMPT_CHARS // 3 - 1) + "x>",
    "empty arguments": "<a:>" * (MAX_PROMPT_CHARS // 4),
    "open brackets": "<" * MAX_PROMPT_CHARS,
    "long kind": "<" + "a" * (MAX_PROMPT_CHARS - 2) + ":",
    "colons": "<a" + ":" * (MAX_PROMPT_CHARS - 2),
}


class _CountingPrompt(str):
    """A prompt that adds up the characters `find` reads: the scan's look-ahead work."""

    read = 0

    def find(self, sub: str, start: int = 0) -> int:
        found = str.find(self, sub, start)
        self.read += (len(self) if found < 0 else found + 1) - start
        return found


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_prompts_take_linear_work(name):
    # A1111's regex is quadratic on "unclosed" (each "<" scans to the end: about 9 s at this length);
    # the scan reads each character a bounded number of times
    prompt = _CountingPrompt(HOSTILE[name])
    strip_extra_networks(prompt)
    assert 0 < prompt.read <= 2 * len(prompt)


def test_hostile_prompts_finish_and_agree_with_a1111():
    started = time.perf_counter()
    for prompt in HOSTILE.values():
        strip_extra_networks(prompt)
    # a complexity guard, not a benchmark: measured ~0.1 s in all; the regex needs ~9 s for "unclosed" alone
    assert time.perf_counter() - started < 3.0
    for prompt in HOSTILE.values():
        assert_like_a1111(prompt[:3000])  # short enough for the quadratic reference


# ------------------------------------------------------------------------------------------ wild corpus

# Tags in ../shared/wild/prompts.txt, by kind: matches, and prompts with at least one
WILD_TAGS = {"lora": 1035, "lyco": 14, "hypernet": 7, "EasyNegative": 3, "bad_prompt_version2": 3, "bad_prompt": 1,
             "feetPoseAnime_v11": 1, "badhandv4": 1, "easynegative": 1, "ng_deepnegative_v1_75t": 1}
WILD_PROMPTS_WITH = {"lora": 801, "lyco": 13, "hypernet": 7, "EasyNegative": 3, "bad_prompt_version2": 3,
                     "bad_prompt": 1, "feetPoseAnime_v11": 1, "badhandv4": 1, "easynegative": 1,
                     "ng_deepnegative_v1_75t": 1}
# LoRA tags whose values float()/int() cannot read (A1111 raises and skips all of the prompt's LoRAs):
# block-weight presets of the lora-block-weight extension, and a decimal comma
WILD_BAD_LORA_TAGS = [
    "<lora:LoHA-HED-000010:1:LyCOPALETTE>", "<lora:Sakura_BK:0.1:Background>",
    "<lora:beautifulDetailedEyes_v10:0.2:face>", "<lora:hipoly3DModelLora_v10:0.2:NCNF>",
    "<lora:hipoly3DModelLora_v10:0.2:NCNF>", "<lora:Moxin_Shukezouma11:0.6:diminished overfit>",
    "<lora:Moxin_10:0.4:diminished overfit>", "<lora:02nukunukuNigirimeshiArt_v10:0.75:FACE>",
    "<lora:epiNoiseoffset_v2Pynoise:2,5>", "<lora:lowra_v10:0.5:PALETTE>", "<lora:film:0.4:PALETTE>",
]


@pytest.fixture(scope="module")
def wild_prompts(wild_dir) -> list[tuple[str, str]]:
    """(prompt, where) for every line of prompts.txt; where from prompts.jsonl's kind (same line order)."""
    lines = (wild_dir / "prompts.txt").read_text(encoding="utf-8").split("\n")
    assert lines.pop() == ""
    records = [json.loads(line) for line in (wild_dir / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == len(records) == 3233
    return [(line, "negative" if record["kind"] == "negative" else "positive") for line, record in zip(lines, records)]


def test_wild_prompts_are_stripped_like_a1111(wild_prompts, wild_dir):
    kinds: Counter = Counter()
    prompts_with: Counter = Counter()
    for prompt, where in wild_prompts:
        assert_like_a1111(prompt, where)
        found = [t.kind for t in strip_extra_networks(prompt).tags]
        kinds.update(found)
        prompts_with.update(set(found))
    assert kinds == WILD_TAGS and prompts_with == WILD_PROMPTS_WITH
    assert sum(1 for prompt, _ in wild_prompts if A1111_TAG.search(prompt)) == 828
    # prompts.jsonl keeps the prompts' newlines (prompts.txt has spaces): the same tags, the same removal
    for line in (wild_dir / "prompts.jsonl").read_text(encoding="utf-8").splitlines():
        assert_like_a1111(json.loads(line)["prompt"])


def test_wild_tag_arguments(wild_prompts):
    tags = [t for prompt, where in wild_prompts for t in strip_extra_networks(prompt, where).tags]
    bad = []
    read = {}
    for item in tags:
        if item.kind in LORA_KINDS:
            try:
                read[item.text] = lora_arguments(item)
            except NetworkError as error:
                assert item.text in str(error)
                bad.append(item.text)
        elif item.kind in HYPERNET_KINDS:
            read[item.text] = hypernet_arguments(item)
    assert bad == WILD_BAD_LORA_TAGS
    assert read["<lyco:Amy Adams:1.0>"] == LoraArguments("Amy Adams", 1.0, 1.0, None)
    assert read["<lora:xiyoujibeauties>"] == LoraArguments("xiyoujibeauties", 1.0, 1.0, None)
    assert read["<hypernet:cornflower_v7_phantom:0.8>"] == ("cornflower_v7_phantom", 0.8)
    assert sum(1 for item in tags if item.where == "negative") == 24  # 16 prompts; A1111 would leave these as text


def _pipeline(text: str, tokenizer: ClipTokenizer, cache: dict) -> list:
    """What the encoder receives for `text`: per AND part its weight and per schedule entry the step,
    the attention fragments and the chunks (ids, weights, embedding slots)."""
    if text not in cache:
        parts = []
        for part in split_and(text):
            entries = []
            for entry in prompt_schedule(part.text, 20):
                chunks = tokenize_prompt(entry.text, tokenizer).chunks
                entries.append((entry.end_at_step, parse_prompt_attention(entry.text),
                                [(c.tokens, c.weights, c.embeddings) for c in chunks]))
            parts.append((part.weight, entries))
        cache[text] = parts
    return cache[text]


def test_wild_prompts_encode_as_their_tag_free_text(wild_prompts, wild_dir):
    # The acceptance test: a raw prompt that goes through the stripping step gives the fragments, schedules
    # and token ids (real SD1 embeddings bound) of A1111's tag-free text; without the step, the tags are
    # read as words and every prompt with a tag encodes differently
    tokenizer = ClipTokenizer.default()
    vocabulary = EmbeddingVocabulary.from_library(tokenizer, EmbeddingLibrary(wild_dir / "embeddings", "sd1"))
    assert {"EasyNegative", "bad_prompt_version2", "badhandv4"} <= set(vocabulary.embeddings)
    cache: dict = {}
    changed = 0
    for prompt, _ in wild_prompts:
        stripped = strip_extra_networks(prompt)
        tag_free, _ = reference_strip(prompt)
        assert _pipeline(stripped.text, tokenizer, cache) == _pipeline(tag_free, tokenizer, cache)
        if stripped.tags:
            changed += _pipeline(prompt, tokenizer, cache) != _pipeline(stripped.text, tokenizer, cache)
    assert changed == 828
    # a tag named like an embedding: A1111 removes `<EasyNegative:0.8>`, so the embedding is not bound
    line = "masterpiece, <EasyNegative:0.8>"
    (entry,) = _pipeline(line, tokenizer, cache)[0][1]
    assert [e.name for e in entry[2][0][2]] == ["EasyNegative"]
    assert _pipeline(strip_extra_networks(line).text, tokenizer, cache)[0][1][0][2][0][2] == []


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_parse_lists_tags_and_parses_the_rest(capsys):
    prompt = "a <lora:x:0.5:unet=0.25> cat AND <hypernet:h> dog:0.5 <EasyNegative:0.8> <lora:te=1>"
    assert main(["parse", prompt, "--steps", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompt"] == prompt and report["text"] == "a  cat AND  dog:0.5  "
    assert report["extra_networks"] == [
        {"kind": "lora", "name": "x", "where": "positive", "text": "<lora:x:0.5:unet=0.25>", "start": 2, "end": 24,
         "te_multiplier": 0.5, "unet_multiplier": 0.25, "dyn_dim": None},
        {"kind": "hypernet", "name": "h", "where": "positive", "text": "<hypernet:h>", "start": 33, "end": 45,
         "multiplier": 1.0},
        {"kind": "EasyNegative", "name": "0.8", "where": "positive", "text": "<EasyNegative:0.8>", "start": 54,
         "end": 72, "items": ["0.8"],
         "note": "unknown extra network kind 'EasyNegative' (known: lora, lyco, hypernet): removed, not applied"},
        {"kind": "lora", "name": "", "where": "positive", "text": "<lora:te=1>", "start": 73, "end": 84,
         "te_multiplier": 1.0, "unet_multiplier": 1.0, "dyn_dim": None,
         "note": "names no network (the first argument that is not key=value is the name): not applied"},
    ]
    assert [(part["text"], part["weight"]) for part in report["parts"]] == [("a  cat", 1.0), ("  dog", 0.5)]
    assert main(["parse", "a <lyco:y:1:0.5:8> b"]) == 0
    out = capsys.readouterr().out
    assert "extra network (positive): lyco 'y', te 1.0, unet 0.5, dyn 8, from '<lyco:y:1:0.5:8>'\n" in out
    assert "without tags: 'a  b'\n" in out and "lyco" not in out.split("without tags")[1]


def test_cli_reports_a_bad_tag_value(capsys):
    assert main(["parse", "cat <lora:x:1:PALETTE>"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tiengine parse: extra network tag '<lora:x:1:PALETTE>' in the positive prompt")
    assert "'PALETTE', not a number" in err
    assert main(["tokenize", "cat <lora:x:1:PALETTE>"]) == 2
    assert "tiengine tokenize: extra network tag '<lora:x:1:PALETTE>'" in capsys.readouterr().err


def test_cli_tokenize_never_tokenizes_tags(capsys, tmp_path):
    save_embedding(Embedding("EasyNegative", {"clip_l": torch.randn(2, 768)}), tmp_path / "EasyNegative.safetensors")
    prompt = "cat <lora:x:0.8>, <EasyNegative:0.8>"
    assert main(["tokenize", prompt, "--embeddings", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompt"] == prompt and report["text"] == "cat , "
    tokens = report["chunks"][0]["tokens"]
    assert tokens[:4] == [49406, 2368, 267, 49407] and report["token_count"] == 2  # "cat", ","
    assert [(r["kind"], r["name"]) for r in report["extra_networks"]] == [("lora", "x"), ("EasyNegative", "0.8")]
    assert report["extra_networks"][0]["te_multiplier"] == 0.8
    assert report["extra_networks"][1]["note"].endswith(
        "EasyNegative is an embedding: write it without <...> to use it")
    assert main(["tokenize", prompt]) == 0
    out = capsys.readouterr().out
    assert "extra network (positive): lora 'x', te 0.8, unet 0.8, from '<lora:x:0.8>'" in out
    assert "without tags: cat , \n" in out and "lora" not in out.split("without tags")[1]
