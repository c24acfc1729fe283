"""The AUTOMATIC1111 prompt language, as pure functions over strings.

Reproduces the behaviour of `modules/prompt_parser.py` in AUTOMATIC1111's stable-diffusion-webui (1.6 and
later), quirks included, with our own parser (no lark):

- `parse_prompt_attention`: emphasis `(x)` x1.1, `[x]` x(1/1.1), `(x:w)`, escapes, `BREAK` markers, merging
  of equal weights; float arithmetic in the reference's order, so weights are equal bit for bit.
  `parse_prompt_without_attention` is the "none" emphasis mode: one fragment, BREAK stays text.
- `prompt_schedule` / `prompt_schedules`: the `[from:to:N]`, `[to:N]`, `[from::N]` and `[a|b|c]` schedule
  grammar, giving (end_at_step, text) pairs like `get_learned_conditioning_prompt_schedules`, including the
  hires-fix offsets, the legacy "N < 1 is a fraction" option and the doubled step count of second-order
  samplers (A1111's `total_steps`). `schedule_index` picks the entry for a step like `reconstruct_cond_batch`.
- `split_and` / `composable_prompts`: the `AND` composition of `get_multicond_prompt_list`.

Where the reference grammar is ambiguous (a well-formed schedule followed by stray closing brackets, such as
`[a:1]]`), lark's choice depends on Python's string-hash seed, so the reference itself gives different
results from run to run; we always take the reading that keeps every well-formed group, which is one of
the reference's readings. Inputs on which the reference crashes (a weight such as `(x:1.2.3)`, a schedule
boundary too large for an int) raise `PromptError` here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Union

from tiengine.errors import TiengineError

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1  # multiplied, never divided: the reference's rounding
BREAK_WEIGHT = -1  # an int, as the reference stores it

# One token of the emphasis syntax: an escape or lone backslash, an opening bracket, a weighted close
# `:w)`, a closing bracket, a run of text, or a lone colon.
_ATTENTION_TOKEN = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\]?)
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+ | :)
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)

# The schedule boundary: lark's common.SIGNED_NUMBER (ASCII digits, optional exponent), with the optional
# whitespace the grammar allows on both sides.
_SCHEDULE_NUMBER = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*")
# Characters that end a run of plain schedule text; a backslash escapes any character but a newline.
_SCHEDULE_SPECIAL = frozenset("[]():|\\")

_AND = re.compile(r"\bAND\b")
# Lazy text (newlines included), then an optional `:w` weight and trailing whitespace.
_AND_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.DOTALL)


class PromptError(TiengineError):
    """A prompt the reference cannot evaluate either (it raises), or a bad step count."""


class Fragment(NamedTuple):
    """A run of prompt text and its attention weight; ("BREAK", -1) marks a chunk break."""

    text: str
    weight: float


class ScheduledText(NamedTuple):
    """The prompt text used for every sampling step up to and including `end_at_step`."""

    end_at_step: int
    text: str


class AndPart(NamedTuple):
    """One sub-prompt of an `AND` composition and its guidance weight."""

    text: str
    weight: float


@dataclass(frozen=True)
class ComposablePrompts:
    """Unique sub-prompt texts of a batch, and per prompt its (index into `texts`, weight) pairs."""

    texts: tuple[str, ...]
    parts: tuple[tuple[tuple[int, float], ...], ...]


# ---------------------------------------------------------------------------------------------- attention


def parse_prompt_attention(text: str) -> list[Fragment]:
    """Split `text` into (text, weight) fragments like A1111's `parse_prompt_attention`.

    `(x)` multiplies by 1.1, `[x]` by 1/1.1, `(x:w)` by w, nested brackets multiply (innermost first), unclosed
    brackets apply to the end (round ones first). `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters; a
    lone backslash is dropped. A whole-word `BREAK` becomes ("BREAK", -1) and takes the multipliers of any
    enclosing bracket (so inside brackets it is no longer -1). Adjacent equal weights merge; an empty result
    is [("", 1.0)].
    """
    fragments: list[list] = []  # [text, weight] pairs, mutable while brackets close
    round_opens: list[int] = []
    square_opens: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= multiplier

    for token in _ATTENTION_TOKEN.finditer(text):
        kind = token.lastgroup
        if kind == "escape":
            fragments.append([token.group()[1:], 1.0])
        elif kind == "open":
            (round_opens if token.group() == "(" else square_opens).append(len(fragments))
        elif kind == "weight" and round_opens:
            multiply_from(round_opens.pop(), _attention_weight(token.group("weight"), text))
        elif kind == "close" and token.group() == ")" and round_opens:
            multiply_from(round_opens.pop(), ROUND_BRACKET_MULTIPLIER)
        elif kind == "close" and token.group() == "]" and square_opens:
            multiply_from(square_opens.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            for index, part in enumerate(_BREAK.split(token.group())):
                if index:
                    fragments.append(["BREAK", BREAK_WEIGHT])
                fragments.append([part, 1.0])

    for start in round_opens:
        multiply_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in square_opens:
        multiply_from(start, SQUARE_BRACKET_MULTIPLIER)

    merged: list[list] = []
    for fragment in fragments:
        if merged and merged[-1][1] == fragment[1]:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return [Fragment(text, weight) for text, weight in merged] or [Fragment("", 1.0)]


def parse_prompt_without_attention(text: str) -> list[Fragment]:
    """The "none" emphasis mode: no parsing at all, one fragment of weight 1 (BREAK is plain text)."""
    return [Fragment(text, 1.0)]


def _attention_weight(number: str, prompt: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise PromptError(
            f"attention weight {number!r} is not a number (in prompt {_shorten(prompt)!r})"
        ) from None


# --------------------------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class _Scheduled:
    """`[before:after:boundary]`; `before` is empty for `[after:boundary]`."""

    before: tuple[_Node, ...]
    after: tuple[_Node, ...]
    boundary: str  # the number as written, without surrounding whitespace


@dataclass(frozen=True)
class _Alternate:
    """`[a|b|c]`: step s uses option (s - 1) mod len(options)."""

    options: tuple[tuple[_Node, ...], ...]


# A node is text, a schedule, an alternation, or a tuple of nodes (an emphasis group, kept verbatim).
_Node = Union[str, _Scheduled, _Alternate, tuple]


@dataclass(frozen=True)
class _StepRule:
    """How schedule boundaries turn into step numbers (A1111's int/float offsets and old scheduling)."""

    steps: int
    int_offset: int
    fraction_offset: float
    legacy_fractions: bool

    def boundary_step(self, boundary: str, prompt: str) -> int:
        value = float(boundary)
        if self.legacy_fractions:
            value = value * self.steps if value < 1 else value
        elif "." in boundary:
            value = (value - self.fraction_offset) * self.steps
        else:
            value = value - self.int_offset
        try:
            return min(self.steps, int(value))
        except OverflowError:
            raise PromptError(
                f"schedule boundary {boundary!r} is out of range (in prompt {_shorten(prompt)!r})"
            ) from None


def prompt_schedule(
    prompt: str,
    steps: int,
    *,
    second_order: bool = False,
    hires_steps: int | None = None,
    legacy_fractions: bool = False,
) -> list[ScheduledText]:
    """The texts of `prompt` over the sampling steps, as (end_at_step, text) pairs ending at the step count.

    A boundary N containing "." is a fraction of the steps (int(N * steps)), otherwise an absolute step; it is
    clamped to the step count and only boundaries >= 1 split the schedule. Any `[a|b]` splits every step.
    `second_order` doubles the step counts (samplers that call the model twice per step; A1111 schedules over
    model calls, so the index advances once per call: see `schedule_index`). With `hires_steps`
    (the hires-fix second pass) integers count from the end of the first pass and fractions from 1.0, over
    `hires_steps` steps. `legacy_fractions` is A1111's old scheduling: N < 1 is a fraction, anything else an
    absolute step, and `hires_steps` is ignored. A prompt that does not parse is used as is for every step.
    """
    rule = _step_rule(steps, second_order, hires_steps, legacy_fractions)
    if "[" not in prompt:  # without "[" there is neither a schedule nor an alternation
        return [ScheduledText(rule.steps, prompt)]
    tree = _parse_schedule(prompt)
    if tree is None:
        return [ScheduledText(rule.steps, prompt)]
    return [ScheduledText(step, _render(tree, step, rule, prompt)) for step in _boundaries(tree, rule, prompt)]


def prompt_schedules(
    prompts: Sequence[str],
    steps: int,
    *,
    second_order: bool = False,
    hires_steps: int | None = None,
    legacy_fractions: bool = False,
) -> list[list[ScheduledText]]:
    """`prompt_schedule` for a batch; each distinct prompt is parsed once."""
    if isinstance(prompts, str):
        raise TypeError("prompt_schedules takes a sequence of prompts; use prompt_schedule for one prompt")
    unique = {
        prompt: prompt_schedule(
            prompt, steps, second_order=second_order, hires_steps=hires_steps, legacy_fractions=legacy_fractions
        )
        for prompt in dict.fromkeys(prompts)
    }
    return [list(unique[prompt]) for prompt in prompts]


def schedule_index(schedule: Sequence[ScheduledText], step: int) -> int:
    """Index of the entry used at `step` (1-based): the first whose end_at_step >= step, else entry 0."""
    for index, entry in enumerate(schedule):
        if step <= entry.end_at_step:
            return index
    return 0


def _step_rule(steps: int, second_order: bool, hires_steps: int | None, legacy_fractions: bool) -> _StepRule:
    multiplier = 2 if second_order else 1
    for name, value in (("steps", steps), ("hires_steps", hires_steps)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise PromptError(f"{name} must be an integer >= 1, got {value!r}")
    if hires_steps is None or legacy_fractions:
        return _StepRule(steps * multiplier, 0, 0.0, legacy_fractions)
    return _StepRule(hires_steps * multiplier, steps * multiplier, 1.0, legacy_fractions)


def _boundaries(tree: tuple[_Node, ...], rule: _StepRule, prompt: str) -> list[int]:
    steps = {rule.steps}
    for node in _walk(tree):
        if isinstance(node, _Alternate):
            steps.update(range(1, rule.steps + 1))
        else:
            step = rule.boundary_step(node.boundary, prompt)
            if step >= 1:
                steps.add(step)
    return sorted(steps)


def _walk(tree: tuple[_Node, ...]) -> list[_Scheduled | _Alternate]:
    """Every schedule and alternation in the tree, nested ones included."""
    found: list[_Scheduled | _Alternate] = []
    pending = [tree]
    while pending:
        for node in pending.pop():
            if isinstance(node, tuple):
                pending.append(node)
            elif isinstance(node, _Scheduled):
                found.append(node)
                pending += [node.before, node.after]
            elif isinstance(node, _Alternate):
                found.append(node)
                pending += node.options
    return found


def _render(tree: tuple[_Node, ...], step: int, rule: _StepRule, prompt: str) -> str:
    pieces: list[str] = []
    pending = [iter(tree)]
    while pending:
        node = next(pending[-1], None)
        if node is None:
            pending.pop()
        elif isinstance(node, str):
            pieces.append(node)
        elif isinstance(node, tuple):
            pending.append(iter(node))
        elif isinstance(node, _Scheduled):
            pending.append(iter(node.before if step <= rule.boundary_step(node.boundary, prompt) else node.after))
        else:
            pending.append(iter(node.options[(step - 1) % len(node.options)]))
    return "".join(pieces)


class _Frame:
    """An open bracket group being parsed: its segments are split by top-level ':' or '|'."""

    def __init__(self, opener: str, start: int) -> None:
        self.opener = opener
        self.start = start
        self.segments: list[list[_Node]] = [[]]
        self.separators: list[str] = []


def _parse_schedule(prompt: str) -> tuple[_Node, ...] | None:
    """Parse the schedule grammar; None where the reference's parser fails (the prompt is then plain text).

    Groups are `(p)`, `(p:p)`, `[p]`, `[p|p...]` and `[[p:]p:N]`, where p is any sequence of text and
    groups. Outside groups, brackets and colons that close no group are kept as text; a `|` outside an
    alternation, or a backslash at the end or before a newline, fails the whole parse. A group that does not
    close validly makes its opening bracket plain text; parsing resumes after it. Iterative, so deep
    nesting cannot exhaust the stack; groups are cached by start position, so re-parsing is linear.
    """
    closed: dict[int, tuple[_Node, int]] = {}  # group start -> (node, end) for valid groups
    failed: set[int] = set()
    top: list[_Node] = []
    frames: list[_Frame] = []
    position = 0
    length = len(prompt)

    def fail_open_groups() -> int:
        failed.update(frame.start for frame in frames)
        restart = frames[0].start
        frames.clear()
        top.append(prompt[restart])
        return restart + 1

    while True:
        nodes = frames[-1].segments[-1] if frames else top
        if position == length:
            if not frames:
                return tuple(top)
            position = fail_open_groups()
            continue
        char = prompt[position]
        if char not in _SCHEDULE_SPECIAL:
            end = position + 1
            while end < length and prompt[end] not in _SCHEDULE_SPECIAL:
                end += 1
            nodes.append(prompt[position:end])
            position = end
        elif char == "\\":
            if position + 1 == length or prompt[position + 1] == "\n":
                return None
            nodes.append(prompt[position : position + 2])
            position += 2
        elif char in "([":
            if position in closed:
                group, position = closed[position]
                nodes.append(group)
            elif position in failed:
                if frames:
                    position = fail_open_groups()
                else:
                    top.append(char)
                    position += 1
            else:
                frames.append(_Frame(char, position))
                position += 1
        elif not frames:
            if char == "|":
                return None
            top.append(char)
            position += 1
        elif char in ":|":
            frames[-1].separators.append(char)
            frames[-1].segments.append([])
            position += 1
        else:
            group = _close_group(frames[-1], char)
            if group is None:
                position = fail_open_groups()
                continue
            frame = frames.pop()
            closed[frame.start] = (group, position + 1)
            (frames[-1].segments[-1] if frames else top).append(group)
            position += 1


def _close_group(frame: _Frame, closer: str) -> _Node | None:
    """The node of a group closed by `closer`, or None if the grammar has no such group."""
    separators, segments = frame.separators, frame.segments
    if frame.opener == "(":
        if closer != ")" or separators not in ([], [":"]):
            return None
        if separators:
            return ("(", *segments[0], ":", *segments[1], ")")
        return ("(", *segments[0], ")")
    if closer != "]":
        return None
    if not separators:
        return ("[", *segments[0], "]")
    if all(separator == "|" for separator in separators):
        return _Alternate(tuple(tuple(segment) for segment in segments))
    if separators not in ([":"], [":", ":"]):
        return None
    number = segments[-1]
    if not all(isinstance(node, str) for node in number):
        return None
    match = _SCHEDULE_NUMBER.fullmatch("".join(number))  # type: ignore[arg-type]
    if match is None:
        return None
    before = tuple(segments[0]) if len(segments) == 3 else ()
    return _Scheduled(before, tuple(segments[-2]), match.group(1))


# ---------------------------------------------------------------------------------------------------- AND


def split_and(prompt: str) -> list[AndPart]:
    """Split a positive prompt on the word `AND`; each part may end with `:w` (default 1.0).

    As `get_multicond_prompt_list`: the text keeps its leading whitespace and loses trailing whitespace and
    the weight; `AND` splits anywhere as a whole word, brackets included.
    """
    parts = []
    for subprompt in _AND.split(prompt):
        text, weight = _AND_WEIGHT.search(subprompt).groups()  # type: ignore[union-attr]  # always matches
        parts.append(AndPart(text, float(weight) if weight is not None else 1.0))
    return parts


def composable_prompts(prompts: Sequence[str]) -> ComposablePrompts:
    """`split_and` over a batch, with the sub-prompt texts deduplicated in order of first appearance."""
    index_of: dict[str, int] = {}
    parts = []
    for prompt in prompts:
        parts.append(
            tuple((index_of.setdefault(part.text, len(index_of)), part.weight) for part in split_and(prompt))
        )
    return ComposablePrompts(tuple(index_of), tuple(parts))


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
