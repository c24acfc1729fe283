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

Limits (`PromptLimits`, checked by every public function before any work, so the cost of a prompt is
bounded): length in characters, bracket nesting depth, `AND` parts and schedule entries. A weight that is
not finite in float32 (a 400-digit `(x:999...)`, or a product over nesting that overflows) is refused with
`PromptError` naming the fragment, where A1111 would produce NaN conditioning. Lone surrogates (from
command-line bytes that are not UTF-8) are refused with their position. Parsing is linear in the prompt
length for a bounded nesting depth: bracket closes multiply runs of equal-weight text, not characters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Union

from tiengine.errors import TiengineError

# Default limits. The longest of 3,233 real prompts has 13,084 characters, nests brackets 6 deep, has 5
# AND parts and at most 150 schedule entries (150 steps with an alternation); the defaults leave a margin
# of 5x or more. Raise them with `PromptLimits(...)` passed as `limits=`.
MAX_PROMPT_CHARS = 65_536
MAX_NESTING_DEPTH = 64
MAX_AND_PARTS = 32
MAX_SCHEDULE_ENTRIES = 1_000
FLOAT32_MAX = 3.4028234663852886e38  # conditioning is computed in float32 (or narrower)

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
    """A prompt the reference cannot evaluate either (it raises), one over a limit, or a bad step count."""


@dataclass(frozen=True)
class PromptLimits:
    """Bounds on the work one prompt may ask for; each field names itself in the error it causes."""

    max_chars: int = MAX_PROMPT_CHARS
    max_nesting_depth: int = MAX_NESTING_DEPTH
    max_and_parts: int = MAX_AND_PARTS
    max_schedule_entries: int = MAX_SCHEDULE_ENTRIES


DEFAULT_LIMITS = PromptLimits()
_BRACKET_TOKEN = re.compile(r"\\[()\[\]\\]?|[()\[\]]")
_SURROGATE = re.compile("[\ud800-\udfff]")


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


def check_prompt(text: str, limits: PromptLimits = DEFAULT_LIMITS) -> None:
    """Raise `PromptError` if `text` is over a limit (length, bracket nesting) or holds a lone surrogate.

    Nesting is counted as the attention parser counts it: open `(` plus open `[`, escapes excluded, a
    closing bracket with no open one of its kind ignored. Linear in the length of `text`.
    """
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be a string, got {type(text).__name__}")
    if len(text) > limits.max_chars:
        raise PromptError(
            f"prompt is {len(text)} characters long, over the limit of {limits.max_chars} "
            "(PromptLimits.max_chars)"
        )
    surrogate = _SURROGATE.search(text)
    if surrogate is not None:
        raise PromptError(
            f"prompt has an invalid character U+{ord(surrogate.group()):04X} (a lone surrogate, from bytes "
            f"that are not UTF-8) at position {surrogate.start()}"
        )
    if "(" not in text and "[" not in text:
        return
    rounds = squares = 0
    for token in _BRACKET_TOKEN.finditer(text):
        bracket = token.group()
        if bracket == "(":
            rounds += 1
        elif bracket == "[":
            squares += 1
        elif bracket == ")" and rounds:
            rounds -= 1
        elif bracket == "]" and squares:
            squares -= 1
        else:
            continue
        if rounds + squares > limits.max_nesting_depth:
            raise PromptError(
                f"brackets nest more than {limits.max_nesting_depth} deep at position {token.start()} "
                "(PromptLimits.max_nesting_depth)"
            )


class _Runs:
    """Pieces of text and their weights while brackets close: the state of `parse_prompt_attention`.

    Each piece points to a weight cell. Open brackets split the pieces into buckets at the piece count
    where they opened; every later bracket close covers whole buckets, so pieces of one bucket receive
    the same multipliers from then on. Pieces of one bucket with equal weights therefore share one cell,
    and a close multiplies each distinct weight once (in the reference's order, so results are equal
    bit for bit): the cost of a close is the number of distinct weights inside it, not its length.
    """

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.cells: list[int] = []  # piece -> its weight cell
        self.values: list[float] = []  # cell -> weight
        self.parent: list[int] = []  # cell -> the cell it was merged into (itself if none)
        self.rounds: list[int] = []  # piece count when each open "(" was seen, innermost last
        self.squares: list[int] = []
        # (first piece, (weight, weight is an int) -> cell) per bucket; the int BREAK marker keeps its type
        self.buckets: list[tuple[int, dict[tuple[float, bool], int]]] = [(0, {})]

    def append(self, text: str, weight: float) -> None:
        key = (weight, type(weight) is int)
        index = self.buckets[-1][1]
        cell = index.get(key)
        if cell is None:
            cell = index[key] = len(self.values)
            self.values.append(weight)
            self.parent.append(cell)
        self.pieces.append(text)
        self.cells.append(cell)

    def open(self, opens: list[int]) -> None:
        count = len(self.pieces)
        opens.append(count)
        if self.buckets[-1][0] != count:
            self.buckets.append((count, {}))

    def close(self, opens: list[int], position: int, multiplier: float) -> None:
        """Multiply every piece from the bracket `opens[position]` on by `multiplier`."""
        start = opens.pop(position)
        first = len(self.buckets) - 1
        while self.buckets[first][0] > start:
            first -= 1
        for bucket in range(first, len(self.buckets)):
            bucket_start, index = self.buckets[bucket]
            multiplied: dict[tuple[float, bool], int] = {}
            for cell in index.values():
                value = self.values[cell] * multiplier
                self.values[cell] = value
                self._add(multiplied, (value, type(value) is int), cell)
            self.buckets[bucket] = (bucket_start, multiplied)
        if first and start not in self.rounds and start not in self.squares:
            # no open bracket separates this bucket from the previous one any more
            _, index = self.buckets.pop(first)
            for key, cell in index.items():
                self._add(self.buckets[first - 1][1], key, cell)

    def _add(self, index: dict[tuple[float, bool], int], key: tuple[float, bool], cell: int) -> None:
        other = index.setdefault(key, cell)
        if other != cell:
            self.parent[cell] = other

    def _find(self, cell: int) -> int:
        root = cell
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[cell] != root:
            self.parent[cell], cell = root, self.parent[cell]
        return root

    def fragments(self) -> list[tuple[str, float]]:
        """Adjacent pieces of equal weight merged (the first piece's weight is kept, as the reference does)."""
        merged: list[tuple[list[str], float]] = []
        for text, cell in zip(self.pieces, self.cells):
            weight = self.values[self._find(cell)]
            if merged and merged[-1][1] == weight:
                merged[-1][0].append(text)
            else:
                merged.append(([text], weight))
        return [("".join(texts), weight) for texts, weight in merged]


def parse_prompt_attention(text: str, *, limits: PromptLimits = DEFAULT_LIMITS) -> list[Fragment]:
    """Split `text` into (text, weight) fragments like A1111's `parse_prompt_attention`.

    `(x)` multiplies by 1.1, `[x]` by 1/1.1, `(x:w)` by w, nested brackets multiply (innermost first), unclosed
    brackets apply to the end (round ones first). `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters; a
    lone backslash is dropped. A whole-word `BREAK` becomes ("BREAK", -1) and takes the multipliers of any
    enclosing bracket (so inside brackets it is no longer -1). Adjacent equal weights merge; an empty result
    is [("", 1.0)]. Over a limit, or with a weight that is not finite in float32, raises `PromptError`.
    """
    check_prompt(text, limits)
    runs = _Runs()
    for token in _ATTENTION_TOKEN.finditer(text):
        kind = token.lastgroup
        if kind == "escape":
            runs.append(token.group()[1:], 1.0)
        elif kind == "open":
            runs.open(runs.rounds if token.group() == "(" else runs.squares)
        elif kind == "weight" and runs.rounds:
            runs.close(runs.rounds, -1, _attention_weight(token.group("weight"), text, token.start()))
        elif kind == "close" and token.group() == ")" and runs.rounds:
            runs.close(runs.rounds, -1, ROUND_BRACKET_MULTIPLIER)
        elif kind == "close" and token.group() == "]" and runs.squares:
            runs.close(runs.squares, -1, SQUARE_BRACKET_MULTIPLIER)
        else:
            for index, part in enumerate(_BREAK.split(token.group())):
                if index:
                    runs.append("BREAK", BREAK_WEIGHT)
                runs.append(part, 1.0)

    # unclosed brackets apply to the end: round ones from the outermost in, then square ones
    while runs.rounds:
        runs.close(runs.rounds, 0, ROUND_BRACKET_MULTIPLIER)
    while runs.squares:
        runs.close(runs.squares, 0, SQUARE_BRACKET_MULTIPLIER)

    merged = runs.fragments()
    for fragment_text, weight in merged:
        if not abs(weight) <= FLOAT32_MAX:  # inf, or NaN (inf * 0)
            raise PromptError(
                f"attention weight {weight!r} of fragment {_shorten(fragment_text, 40)!r} is not finite in "
                f"float32 (nested weights overflow; the largest float32 is {FLOAT32_MAX:.4g})"
            )
    return [Fragment(text, weight) for text, weight in merged] or [Fragment("", 1.0)]


def parse_prompt_without_attention(text: str) -> list[Fragment]:
    """The "none" emphasis mode: no parsing at all, one fragment of weight 1 (BREAK is plain text)."""
    return [Fragment(text, 1.0)]


def _attention_weight(number: str, prompt: str, position: int) -> float:
    try:
        weight = float(number)
    except ValueError:
        raise PromptError(
            f"attention weight {number!r} is not a number (in prompt {_shorten(prompt)!r})"
        ) from None
    if not abs(weight) <= FLOAT32_MAX:
        raise PromptError(
            f"attention weight {_shorten(number, 24)!r} at position {position} is not finite in float32 "
            f"(the largest float32 is {FLOAT32_MAX:.4g}; in prompt {_shorten(prompt)!r})"
        )
    return weight


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
    limits: PromptLimits = DEFAULT_LIMITS,
) -> list[ScheduledText]:
    """The texts of `prompt` over the sampling steps, as (end_at_step, text) pairs ending at the step count.

    A boundary N containing "." is a fraction of the steps (int(N * steps)), otherwise an absolute step; it is
    clamped to the step count and only boundaries >= 1 split the schedule. Any `[a|b]` splits every step.
    `second_order` doubles the step counts (samplers that call the model twice per step; A1111 schedules over
    model calls, so the index advances once per call: see `schedule_index`). With `hires_steps`
    (the hires-fix second pass) integers count from the end of the first pass and fractions from 1.0, over
    `hires_steps` steps. `legacy_fractions` is A1111's old scheduling: N < 1 is a fraction, anything else an
    absolute step, and `hires_steps` is ignored. A prompt that does not parse is used as is for every step.
    More entries than `limits.max_schedule_entries` (or a prompt over another limit) raise `PromptError`.
    """
    rule = _step_rule(steps, second_order, hires_steps, legacy_fractions)
    check_prompt(prompt, limits)
    if "[" not in prompt:  # without "[" there is neither a schedule nor an alternation
        return [ScheduledText(rule.steps, prompt)]
    tree = _parse_schedule(prompt)
    if tree is None:
        return [ScheduledText(rule.steps, prompt)]
    compiled, dynamic = _compile(tree, rule, prompt)
    return [ScheduledText(step, _render(compiled, step)) for step in _boundaries(dynamic, rule, limits)]


def prompt_schedules(
    prompts: Sequence[str],
    steps: int,
    *,
    second_order: bool = False,
    hires_steps: int | None = None,
    legacy_fractions: bool = False,
    limits: PromptLimits = DEFAULT_LIMITS,
) -> list[list[ScheduledText]]:
    """`prompt_schedule` for a batch; each distinct prompt is parsed once."""
    if isinstance(prompts, str):
        raise TypeError("prompt_schedules takes a sequence of prompts; use prompt_schedule for one prompt")
    unique = {
        prompt: prompt_schedule(
            prompt,
            steps,
            second_order=second_order,
            hires_steps=hires_steps,
            legacy_fractions=legacy_fractions,
            limits=limits,
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


@dataclass
class _CompiledSchedule:
    """A schedule with its boundary already turned into a step: `before` up to `step`, then `after`."""

    step: int
    before: list
    after: list


@dataclass
class _CompiledAlternate:
    options: list[list]


def _compile(
    tree: tuple[_Node, ...], rule: _StepRule, prompt: str
) -> tuple[list, list[_CompiledSchedule | _CompiledAlternate]]:
    """The tree with emphasis groups flattened, adjacent text joined and boundaries evaluated once, and
    every schedule and alternation in it (nested ones included). Iterative, so depth costs no stack."""
    root: list = []
    lists = [root]
    dynamic: list[_CompiledSchedule | _CompiledAlternate] = []
    pending: list[tuple[tuple, list]] = [(tree, root)]
    while pending:
        nodes, out = pending.pop()
        # a frame's nodes are consumed in order; nested groups are expanded in place
        stack = [iter(nodes)]
        while stack:
            node = next(stack[-1], None)
            if node is None:
                stack.pop()
            elif isinstance(node, str):
                out.append(node)
            elif isinstance(node, tuple):
                stack.append(iter(node))
            elif isinstance(node, _Scheduled):
                compiled = _CompiledSchedule(rule.boundary_step(node.boundary, prompt), [], [])
                out.append(compiled)
                dynamic.append(compiled)
                lists += [compiled.before, compiled.after]
                pending += [(node.before, compiled.before), (node.after, compiled.after)]
            else:
                alternate = _CompiledAlternate([[] for _ in node.options])
                out.append(alternate)
                dynamic.append(alternate)
                lists += alternate.options
                pending += list(zip(node.options, alternate.options))
    for items in lists:
        joined: list = []
        text: list[str] = []
        for item in items:
            if isinstance(item, str):
                text.append(item)
                continue
            if text:
                joined.append("".join(text))
                text = []
            joined.append(item)
        if text:
            joined.append("".join(text))
        items[:] = joined
    return root, dynamic


def _boundaries(
    dynamic: list[_CompiledSchedule | _CompiledAlternate], rule: _StepRule, limits: PromptLimits
) -> list[int]:
    if any(isinstance(node, _CompiledAlternate) for node in dynamic):
        count = rule.steps  # an alternation changes the text at every step
        steps = range(1, rule.steps + 1) if count <= limits.max_schedule_entries else ()
    else:
        steps = sorted({rule.steps, *(node.step for node in dynamic if node.step >= 1)})  # type: ignore[union-attr]
        count = len(steps)
    if count > limits.max_schedule_entries:
        raise PromptError(
            f"the prompt's schedule has {count} entries (distinct per-step texts), over the limit of "
            f"{limits.max_schedule_entries} (PromptLimits.max_schedule_entries)"
        )
    return list(steps)


def _render(compiled: list, step: int) -> str:
    pieces: list[str] = []
    pending = [iter(compiled)]
    while pending:
        node = next(pending[-1], None)
        if node is None:
            pending.pop()
        elif isinstance(node, str):
            pieces.append(node)
        elif isinstance(node, _CompiledSchedule):
            pending.append(iter(node.before if step <= node.step else node.after))
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


def split_and(prompt: str, *, limits: PromptLimits = DEFAULT_LIMITS) -> list[AndPart]:
    """Split a positive prompt on the word `AND`; each part may end with `:w` (default 1.0).

    As `get_multicond_prompt_list`: the text keeps its leading whitespace and loses trailing whitespace and
    the weight; `AND` splits anywhere as a whole word, brackets included. More parts than
    `limits.max_and_parts`, a part weight that is not finite in float32, or a prompt over another limit
    raise `PromptError`.
    """
    check_prompt(prompt, limits)
    subprompts = _AND.split(prompt, maxsplit=limits.max_and_parts)
    if len(subprompts) > limits.max_and_parts:
        raise PromptError(
            f"the prompt has more than {limits.max_and_parts} AND parts, over the limit "
            "(PromptLimits.max_and_parts)"
        )
    parts = []
    for subprompt in subprompts:
        text, weight = _AND_WEIGHT.search(subprompt).groups()  # type: ignore[union-attr]  # always matches
        value = float(weight) if weight is not None else 1.0
        if not abs(value) <= FLOAT32_MAX:
            raise PromptError(
                f"AND weight {_shorten(weight, 24)!r} of part {_shorten(text.strip(), 40)!r} is not finite "
                f"in float32 (the largest float32 is {FLOAT32_MAX:.4g})"
            )
        parts.append(AndPart(text, value))
    return parts


def composable_prompts(prompts: Sequence[str], *, limits: PromptLimits = DEFAULT_LIMITS) -> ComposablePrompts:
    """`split_and` over a batch, with the sub-prompt texts deduplicated in order of first appearance."""
    index_of: dict[str, int] = {}
    parts = []
    for prompt in prompts:
        parts.append(
            tuple((index_of.setdefault(part.text, len(index_of)), part.weight) for part in split_and(prompt, limits=limits))
        )
    return ComposablePrompts(tuple(index_of), tuple(parts))


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
