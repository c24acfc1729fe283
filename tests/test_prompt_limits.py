"""Hostile prompts: each gets a named PromptError, or is parsed in bounded (linear) time.

The inputs are built here: overflowing weights, deep nesting, many AND parts, long alternations, lone
surrogates from command-line bytes that are not UTF-8, and 60 KB of brackets.
"""

from __future__ import annotations

import os
import random
import re
import time

import pytest

from tiengine.text.prompt import (
    FLOAT32_MAX,
    MAX_AND_PARTS,
    MAX_NESTING_DEPTH,
    MAX_PROMPT_CHARS,
    MAX_SCHEDULE_ENTRIES,
    PromptError,
    PromptLimits,
    check_prompt,
    composable_prompts,
    parse_prompt_attention,
    prompt_schedule,
    prompt_schedules,
    split_and,
)

# Pieces of real syntax, balanced, so a long prompt built from them stays within the nesting limit.
_PIECES = (
    "word ", "(a:1.2) ", "[b] ", "((c)) ", "[d:e:3] ", "[x|y|z] ", "(f [g:0.5] h) ", "\\(lit\\) ", ", ",
    "BREAK ", "(i:0.8) ", "[[j]] ", "(k:1.05)(l:1.05) ", "[m::4] ", "(n", ") ", "o) ", ": ", "(p:1.3) ",
)


def _bracket_heavy_prompt(length: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    pieces: list[str] = []
    size = 0
    while size < length:
        piece = rng.choice(_PIECES)
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------- time bounds


def test_a_60_kb_bracket_heavy_prompt_parses_in_bounded_time() -> None:
    prompt = _bracket_heavy_prompt(60_000)
    assert 60_000 <= len(prompt) <= MAX_PROMPT_CHARS
    # generous bounds for a loaded 2-core machine; the quadratic parser took 13 s here
    assert _timed(lambda: parse_prompt_attention(prompt)) < 2.0
    assert _timed(lambda: prompt_schedule(prompt, 20)) < 2.0
    assert _timed(lambda: split_and(prompt)) < 2.0


@pytest.mark.parametrize(
    "prompt",
    [
        "(" * 60 + "(a)b" * 14_900 + ")" * 60,  # distinct weights alternating inside deep nesting
        "(" * 30 + "[" * 30 + "".join(f"(a:1.{i:04d})" for i in range(5_000)) + ")" * 30,  # many weights
        "(a" * 60 + "b(a)" * 14_000,  # unclosed brackets applied to the end
        "[" * 60 + "a:b:2 " * 10_000,  # schedules that never close
    ],
    ids=["nested-alternating", "distinct-weights", "unclosed", "unclosed-schedule"],
)
def test_adversarial_bracket_patterns_parse_in_bounded_time(prompt: str) -> None:
    assert _timed(lambda: parse_prompt_attention(prompt)) < 2.0
    assert _timed(lambda: prompt_schedule(prompt, 20)) < 2.0


def test_parse_time_grows_linearly_with_length() -> None:
    small, large = _bracket_heavy_prompt(6_000, seed=2), _bracket_heavy_prompt(60_000, seed=2)
    best = {len(p): min(_timed(lambda p=p: parse_prompt_attention(p)) for _ in range(3)) for p in (small, large)}
    # 10x the text; a quadratic parser would take ~100x. Allow 30x for timer noise on small inputs.
    assert best[len(large)] < 30 * best[len(small)] + 0.05, best


# ------------------------------------------------------------------------------------------ limits


def test_prompt_length_limit_names_the_limit_and_the_length() -> None:
    prompt = "a" * (MAX_PROMPT_CHARS + 1)
    for call in (parse_prompt_attention, split_and, lambda p: prompt_schedule(p, 20)):
        with pytest.raises(PromptError, match=rf"{MAX_PROMPT_CHARS + 1} characters.*max_chars"):
            call(prompt)
    parse_prompt_attention("a" * MAX_PROMPT_CHARS)  # at the limit is fine
    assert parse_prompt_attention(prompt, limits=PromptLimits(max_chars=MAX_PROMPT_CHARS + 1))


@pytest.mark.parametrize("opener, closer", [("(", ")"), ("[", "]"), ("([", "])")])
def test_nesting_limit_counts_open_brackets(opener: str, closer: str) -> None:
    levels = MAX_NESTING_DEPTH // len(opener)
    parse_prompt_attention(opener * levels + "x" + closer * levels)
    too_deep = opener * (levels + 1) + "x" + closer * (levels + 1)
    for call in (parse_prompt_attention, split_and, lambda p: prompt_schedule(p, 20)):
        with pytest.raises(PromptError, match=rf"more than {MAX_NESTING_DEPTH} deep.*max_nesting_depth"):
            call(too_deep)
    assert parse_prompt_attention(too_deep, limits=PromptLimits(max_nesting_depth=MAX_NESTING_DEPTH + 2))


def test_five_thousand_nested_brackets_are_refused_not_nan() -> None:
    # the finding: 5,000 nested "(" gave 1.1**5000 = inf in float32 and a black image
    with pytest.raises(PromptError, match="max_nesting_depth"):
        parse_prompt_attention("(" * 5000 + "cat")
    # with the limit raised, the weight overflow itself is refused, naming the fragment
    with pytest.raises(PromptError, match=r"'cat'.*not finite in float32"):
        parse_prompt_attention("(" * 5000 + "cat", limits=PromptLimits(max_nesting_depth=5000))


def test_escaped_and_unmatched_brackets_do_not_count_as_nesting() -> None:
    parse_prompt_attention("\\(" * 500 + ")" * 500 + "]" * 500 + "x")


def test_and_parts_limit() -> None:
    assert len(split_and(" AND ".join(["a"] * MAX_AND_PARTS))) == MAX_AND_PARTS
    too_many = " AND ".join(["a"] * 2000)
    with pytest.raises(PromptError, match=rf"more than {MAX_AND_PARTS} AND parts.*max_and_parts"):
        split_and(too_many)
    with pytest.raises(PromptError, match="max_and_parts"):
        composable_prompts(["x", too_many])
    assert len(split_and(too_many, limits=PromptLimits(max_and_parts=2000))) == 2000


def test_schedule_entries_limit_is_checked_before_the_steps_are_listed() -> None:
    assert len(prompt_schedule("[a|b]", MAX_SCHEDULE_ENTRIES)) == MAX_SCHEDULE_ENTRIES
    with pytest.raises(PromptError, match=rf"{MAX_SCHEDULE_ENTRIES + 1} entries.*max_schedule_entries"):
        prompt_schedule("[a|b]", MAX_SCHEDULE_ENTRIES + 1)
    with pytest.raises(PromptError, match="max_schedule_entries"):
        prompt_schedule("[a|b]", MAX_SCHEDULE_ENTRIES // 2 + 1, second_order=True)  # model calls count
    # a billion steps would list a billion entries: refused at once
    assert _timed(lambda: pytest.raises(PromptError, prompt_schedule, "[a|b]", 10**9)) < 0.5
    many = " ".join(f"[w{i}:v{i}:{i}]" for i in range(1, 11))
    with pytest.raises(PromptError, match="11 entries"):
        prompt_schedule(many, 20, limits=PromptLimits(max_schedule_entries=10))
    with pytest.raises(PromptError, match="max_schedule_entries"):
        prompt_schedules(["a", "[a|b]"], 20, limits=PromptLimits(max_schedule_entries=5))
    assert len(prompt_schedule("[a|b]", 2000, limits=PromptLimits(max_schedule_entries=2000))) == 2000


# ----------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    "prompt",
    [
        "(cat:" + "9" * 400 + ")",  # float() gives inf
        "a (cat:" + "9" * 39 + ") b",  # 1e39: finite in float64, inf in float32
        "(cat:-" + "9" * 400 + ")",
    ],
)
def test_a_weight_that_is_not_finite_in_float32_is_refused(prompt: str) -> None:
    with pytest.raises(PromptError, match=r"attention weight .* not finite in float32") as error:
        parse_prompt_attention(prompt)
    assert len(str(error.value)) < 400  # the 400 digits are shortened, not quoted whole


def test_a_product_of_finite_weights_that_overflows_is_refused_naming_the_fragment() -> None:
    with pytest.raises(PromptError, match=r"fragment 'cat' is not finite in float32"):
        parse_prompt_attention("dog ((cat:1e20):1e20) bird".replace("1e20", "1" + "0" * 20))
    finite = parse_prompt_attention("(cat:" + "3" + "0" * 38 + ")")  # 3e38 <= float32 max
    assert finite[0].weight <= FLOAT32_MAX


def test_and_weight_that_is_not_finite_is_refused() -> None:
    with pytest.raises(PromptError, match=r"AND weight .* of part 'b' is not finite in float32"):
        split_and("a AND b:" + "9" * 400)


# -------------------------------------------------------------------------------------- characters


def test_lone_surrogates_from_non_utf8_argv_are_refused_with_their_position() -> None:
    prompt = os.fsdecode(b"a cat \xff\xfe dog")  # how Python decodes bad bytes in argv (surrogateescape)
    assert "\udcff" in prompt
    for call in (parse_prompt_attention, split_and, lambda p: prompt_schedule(p, 20), check_prompt):
        with pytest.raises(PromptError, match=re.escape("U+DCFF (a lone surrogate") + ".*position 6"):
            call(prompt)
    check_prompt("emoji 🎉 and 日本語 are fine")
