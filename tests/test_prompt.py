"""tiengine.text.prompt beyond the case table: types, errors, batches, deep nesting, random and real prompts."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

import tiengine.text.prompt as prompt_module
from tiengine.errors import TiengineError
from tiengine.text.prompt import (
    AndPart,
    ComposablePrompts,
    Fragment,
    PromptError,
    PromptLimits,
    ScheduledText,
    composable_prompts,
    parse_prompt_attention,
    parse_prompt_without_attention,
    prompt_schedule,
    prompt_schedules,
    schedule_index,
    split_and,
)

R = 1.1
S = 1 / 1.1


# ------------------------------------------------------------------------------------------ attention


def test_break_marker_is_the_int_minus_one_and_text_weights_are_floats() -> None:
    fragments = parse_prompt_attention("a BREAK (b)")
    assert fragments[1] == Fragment("BREAK", -1)
    assert type(fragments[1].weight) is int  # the reference appends ["BREAK", -1]
    assert all(type(fragment.weight) is float for index, fragment in enumerate(fragments) if index != 1)
    assert type(parse_prompt_attention("(BREAK)")[1].weight) is float  # -1 * 1.1


def test_none_emphasis_mode_is_one_unparsed_fragment() -> None:
    text = "a (b:1.3) [c] BREAK d \\( [e:f:2]"
    assert parse_prompt_without_attention(text) == [Fragment(text, 1.0)]
    assert parse_prompt_without_attention("") == [Fragment("", 1.0)]


@pytest.mark.parametrize(
    "prompt, weight", [("(x:1.2.3)", "1.2.3"), ("(x:.)", "."), ("(x:+..)", "+.."), ("(a (x:1..5))", "1..5")]
)
def test_weight_that_is_not_a_number_raises(prompt: str, weight: str) -> None:
    # the reference calls float() on it and raises ValueError
    with pytest.raises(PromptError, match=re.escape(repr(weight))):
        parse_prompt_attention(prompt)
    assert issubclass(PromptError, TiengineError)


def test_weight_close_without_open_bracket_is_never_converted() -> None:
    assert parse_prompt_attention("x:1.2.3)") == [("x:1.2.3)", 1.0)]


def test_deep_nesting_does_not_exhaust_the_stack() -> None:
    depth = 3000
    deep = PromptLimits(max_nesting_depth=depth)
    closed = 1.0
    for _ in range(depth // 2):
        closed = closed * S * R  # "])" closes the inner "[" first
    assert parse_prompt_attention("([" * (depth // 2) + "x" + "])" * (depth // 2), limits=deep) == [("x", closed)]
    unclosed = 1.0
    for multiplier in [R] * (depth // 2) + [S] * (depth // 2):  # unclosed: round ones first
        unclosed *= multiplier
    assert parse_prompt_attention("([" * (depth // 2) + "x", limits=deep) == [("x", unclosed)]


# ------------------------------------------------------------------------------------------ schedules


def test_schedule_entries_are_named_tuples() -> None:
    schedule = prompt_schedule("a [b:c:2]", 4)
    assert schedule == [ScheduledText(2, "a b"), ScheduledText(4, "a c")]
    assert schedule[0].end_at_step == 2 and schedule[1].text == "a c"


@pytest.mark.parametrize("prompt", ["[a:b:1e999]", "[a:b:1.0e308]", "[a:b:-1e400]"])
def test_boundary_out_of_int_range_raises(prompt: str) -> None:
    # the reference raises OverflowError from int(inf)
    with pytest.raises(PromptError, match="out of range"):
        prompt_schedule(prompt, 10)


def test_unparsed_prompt_never_evaluates_its_boundaries() -> None:
    assert prompt_schedule("a|b [c:d:1e999]", 10) == [(10, "a|b [c:d:1e999]")]


@pytest.mark.parametrize("steps, hires_steps", [(0, None), (-3, None), (10, 0), (2.5, None)])
def test_bad_step_counts_raise(steps, hires_steps) -> None:
    with pytest.raises(PromptError, match="steps"):
        prompt_schedule("a [b:c:2]", steps, hires_steps=hires_steps)


def test_batch_equals_single_prompts_and_parses_each_distinct_prompt_once(monkeypatch) -> None:
    prompts = ["a [b:c:0.5]", "x [y|z]", "a [b:c:0.5]", "plain", "x [y|z]"]
    expected = [prompt_schedule(prompt, 4, second_order=True) for prompt in prompts]
    calls: list[str] = []
    real_parse = prompt_module._parse_schedule

    def counting_parse(prompt: str):
        calls.append(prompt)
        return real_parse(prompt)

    monkeypatch.setattr(prompt_module, "_parse_schedule", counting_parse)
    schedules = prompt_schedules(prompts, 4, second_order=True)
    assert schedules == expected
    assert sorted(calls) == ["a [b:c:0.5]", "x [y|z]"]  # "plain" has no "[" and needs no parse
    assert schedules[0] is not schedules[2]  # duplicates share results, not mutable lists
    schedules[0].clear()
    assert schedules[2] == expected[2]


def test_batch_rejects_a_single_string() -> None:
    with pytest.raises(TypeError, match="prompt_schedule"):
        prompt_schedules("a [b:c:2]", 10)  # type: ignore[arg-type]


def test_schedule_index_follows_reconstruct_cond_batch() -> None:
    schedule = prompt_schedule("[a:b:3]", 10)
    assert [schedule_index(schedule, step) for step in (1, 3, 4, 10)] == [0, 0, 1, 1]
    assert schedule_index(schedule, 11) == 0  # past the end the reference falls back to entry 0


def test_second_order_schedule_advances_once_per_model_call() -> None:
    schedule = prompt_schedule("[a|b|c]", 3, second_order=True)
    texts = [schedule[schedule_index(schedule, call)].text for call in range(1, 7)]
    assert texts == ["a", "b", "c", "a", "b", "c"]


def test_deeply_nested_schedules_and_brackets() -> None:
    deep = PromptLimits(max_nesting_depth=20000)
    nested = "x"
    for _ in range(2000):
        nested = f"[{nested}:y:1]"
    assert prompt_schedule(nested, 10, limits=deep) == [(1, "x"), (10, "y")]
    unclosed = "[" * 20000 + "a:b:2"
    assert prompt_schedule(unclosed, 10, limits=deep) == [(10, unclosed)]
    balanced = "[" * 5000 + "a:b:2" + "]" * 5000
    assert prompt_schedule(balanced, 10, limits=deep) == [
        (2, "[" * 4999 + "a" + "]" * 4999),
        (10, "[" * 4999 + "b" + "]" * 4999),
    ]


def test_long_alternation_covers_every_step() -> None:
    schedule = prompt_schedule("[" + "|".join(f"w{index}" for index in range(7)) + "]", 30)
    assert [entry.end_at_step for entry in schedule] == list(range(1, 31))
    assert [entry.text for entry in schedule] == [f"w{(step - 1) % 7}" for step in range(1, 31)]


_ALPHABET = ["a", "b", " ", "[", "]", "(", ")", ":", "|", "\\", "1", "0.5", "2", "BREAK", " AND ", "\n", "e", "."]


def test_random_prompts_keep_the_schedule_invariants() -> None:
    generator = random.Random(1234)
    for _ in range(3000):
        prompt = "".join(generator.choice(_ALPHABET) for _ in range(generator.randint(0, 25)))
        steps = generator.randint(1, 12)
        schedule = prompt_schedule(prompt, steps)
        ends = [entry.end_at_step for entry in schedule]
        assert ends == sorted(set(ends)) and ends[0] >= 1 and ends[-1] == steps, prompt
        if "|" in prompt and len(schedule) == 1 and steps > 1:
            # a prompt with "|" either alternates (one entry per step) or did not parse at all
            assert schedule[0].text == prompt
        try:
            parse_prompt_attention(prompt)
        except PromptError:
            assert re.search(r":\s*[+-]?[.\d]+\s*\)", prompt)


# ------------------------------------------------------------------------------------------------ AND


def test_and_parts_and_composable_batch() -> None:
    assert split_and("a AND b:2") == [AndPart("a", 1.0), AndPart(" b", 2.0)]
    batch = composable_prompts(["a AND b", "b AND c:2", "a"])
    assert batch == ComposablePrompts(
        texts=("a", " b", "b", " c"),
        parts=(((0, 1.0), (1, 1.0)), ((2, 1.0), (3, 2.0)), ((0, 1.0),)),
    )


# ---------------------------------------------------------------------------------- real-world prompts

_SPECIAL = re.compile(r"[()\[\]\\:]|BREAK")
_EXPLICIT_NON_POSITIVE = re.compile(r":\s*(?:-|[0.]+\s*\))")
_IGNORED_BY_TEXT_CHECK = re.compile(r"BREAK|[\s()\[\]\\:0-9.+-]")


def _wild_prompts(wild_dir: Path) -> list[str]:
    path = wild_dir / "prompts.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_wild_prompts_parse_with_invariants(wild_dir: Path) -> None:
    prompts = _wild_prompts(wild_dir)
    assert len(prompts) > 1000
    steps = 20
    seen = {"schedule": 0, "BREAK": 0, "AND": 0}
    for prompt in prompts:
        fragments = parse_prompt_attention(prompt)
        text = "".join(fragment.text for fragment in fragments if fragment != ("BREAK", -1))
        # the same characters in the same order, once brackets, escapes, weights, BREAK and spaces are set aside
        assert _IGNORED_BY_TEXT_CHECK.sub("", text) == _IGNORED_BY_TEXT_CHECK.sub("", prompt), prompt
        if not _EXPLICIT_NON_POSITIVE.search(prompt):
            assert all(weight > 0 for text_, weight in fragments if text_ != "BREAK"), prompt
            assert all(text_ == "BREAK" for text_, weight in fragments if weight == -1), prompt
        if not _SPECIAL.search(prompt):
            assert fragments == [(prompt, 1.0)]
        seen["BREAK"] += ("BREAK", -1) in fragments
        parts = split_and(prompt)
        seen["AND"] += len(parts) > 1
        for part in parts:
            schedule = prompt_schedule(part.text, steps)
            ends = [entry.end_at_step for entry in schedule]
            assert ends == sorted(set(ends)) and ends[0] >= 1 and ends[-1] == steps, prompt
            if "[" not in part.text:
                assert [tuple(entry) for entry in schedule] == [(steps, part.text)]
            else:
                doubled = prompt_schedule(part.text, steps, second_order=True)
                assert doubled[-1].end_at_step == 2 * steps
                assert {entry.text for entry in doubled} >= {entry.text for entry in schedule}, prompt
            seen["schedule"] += len(schedule) > 1
            for entry in schedule:
                parse_prompt_attention(entry.text)
    # the file holds the syntax these checks are about
    assert seen["schedule"] >= 10 and seen["BREAK"] >= 10 and seen["AND"] >= 1, seen
