"""Extra-network tags in prompts (`<lora:name:0.8>`, `<lyco:...>`, `<hypernet:...>`): found and removed.

Restates AUTOMATIC1111's `modules/extra_networks.py` (`re_extra_net`, `parse_prompt`, `ExtraNetworkParams`)
and the argument rules of its two built-in networks, as pure string functions:

- `strip_extra_networks`: every match of A1111's pattern `<(\\w+):([^>]+)>` (Python `re`, so `\\w` is
  Unicode-aware) is replaced by "" and reported as an `ExtraNetworkTag`. The text is exactly
  `re.sub(r"<(\\w+):([^>]+)>", "", prompt)`, but computed by a scan that is linear in the prompt's length:
  the regex itself is quadratic on text such as 20,000 `<a:` without a closing `>` (each `<` scans to the
  end of the prompt before failing; about 9 s for 65,536 characters), ours stops at the first `<kind:`
  that has no `>` after it, since no later one can have one.
  A1111 strips every `\\w+` kind, known or not, and keeps each tag's arguments as the ":"-split `items`;
  an item that `split("=", 2)` cuts into exactly two parts is named (`dyn=8`), the others positional
  (`a=b=c` is positional). A repeated key keeps its first position and its last value (a dict's update).
- `lora_arguments` (A1111 `extensions-builtin/Lora/extra_networks_lora.py`, `activate`): text-encoder
  multiplier = positional[1], else 1.0, then named `te`; UNet multiplier = positional[2], else the
  text-encoder one, then named `unet`; dynamic rank = positional[3], else None, then named `dyn`. Every
  given value is read, even one a named value replaces (A1111 calls `float` on each).
- `hypernet_arguments` (A1111 `modules/extra_networks_hypernet.py`): name = items[0] (not positional[0]),
  multiplier = items[1], else 1.0.

Where A1111 differs or fails: a value `float`/`int` cannot read raises a bare ValueError there (and the
whole kind is skipped with a console message); here it is a `NetworkError` naming the tag, the argument
and what was expected. Multipliers that are not finite in float32 (`inf`, `nan`, `1e39`) and a dynamic
rank below 1 are refused the same way (A1111 would produce NaN weights, or an empty or cut update).
A tag without a positional name (`<lora:te=1>`) has `name == ""` (A1111 fails with an IndexError); the
consumer reports it. In A1111 only the positive prompts go through `parse_prompt`
(`StableDiffusionProcessing.parse_extra_network_prompts`): tags in a negative prompt stay in its text and
are encoded as words. For a batch, A1111 applies the networks of the first prompt only (`parse_prompts`).
Newer A1111 versions drop comment lines (`prompt_parser.remove_comment_lines`) in the same call, before
the tags; that is not part of this step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

from tiengine.errors import NetworkError
from tiengine.text.prompt import DEFAULT_LIMITS, FLOAT32_MAX, PromptError, PromptLimits

LORA_KINDS = ("lora", "lyco")  # A1111 registers "lyco" as an alias of its Lora network
HYPERNET_KINDS = ("hypernet",)
PROMPT_SIDES = ("positive", "negative")

_KIND = re.compile(r"\w+")  # A1111's `(\w+)`, matched at a position; Unicode-aware as in A1111


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One `<kind:arguments>` tag as written at `prompt[start:end]` (`text`), in the `where` prompt."""

    kind: str
    items: tuple[str, ...]  # the arguments split on ":", as A1111's ExtraNetworkParams.items
    text: str
    start: int
    end: int
    where: str = "positive"

    @property
    def positional(self) -> tuple[str, ...]:
        """The items that are not `key=value` (exactly one "=" after `split("=", 2)`), in order."""
        return tuple(item for item in self.items if len(item.split("=", 2)) != 2)

    @property
    def named(self) -> tuple[tuple[str, str], ...]:
        """The `key=value` items as (key, value) pairs; a repeated key keeps its first place, its last value."""
        values: dict[str, str] = {}
        for item in self.items:
            parts = item.split("=", 2)
            if len(parts) == 2:
                values[parts[0]] = parts[1]
        return tuple(values.items())

    @property
    def name(self) -> str:
        """The network's name: the first positional item, or "" when there is none."""
        positional = self.positional
        return positional[0] if positional else ""


@dataclass(frozen=True)
class StrippedPrompt:
    """A prompt with its extra-network tags removed (`text`) and the tags, in prompt order."""

    text: str
    tags: tuple[ExtraNetworkTag, ...]


@dataclass(frozen=True)
class LoraArguments:
    """What a `<lora:...>` / `<lyco:...>` tag asks for: the network and its strengths."""

    name: str
    te_multiplier: float  # scales the update of the text encoder(s)
    unet_multiplier: float  # scales the update of the UNet
    dyn_dim: int | None  # DyLoRA: the rank to use (None: the file's full rank)


class HypernetArguments(NamedTuple):
    """What a `<hypernet:...>` tag asks for."""

    name: str
    multiplier: float


def strip_extra_networks(
    prompt: str, where: str = "positive", *, limits: PromptLimits = DEFAULT_LIMITS
) -> StrippedPrompt:
    """Remove every `<kind:arguments>` tag from `prompt` as A1111 does; the tags are returned with `where` set.

    The text equals `re.sub(r"<(\\w+):([^>]+)>", "", prompt)`; the work is linear in `len(prompt)`. A prompt
    longer than `limits.max_chars` raises `PromptError` (tiengine.text.prompt.PromptLimits).
    """
    if not isinstance(prompt, str):
        raise PromptError(f"a prompt must be a string, got {type(prompt).__name__}")
    if where not in PROMPT_SIDES:
        raise ValueError(f"where must be one of {PROMPT_SIDES}, got {where!r}")
    if len(prompt) > limits.max_chars:
        raise PromptError(
            f"prompt is {len(prompt)} characters long, over the limit of {limits.max_chars} "
            "(PromptLimits.max_chars)"
        )
    tags: list[ExtraNetworkTag] = []
    kept: list[str] = []
    kept_from = 0  # start of the text not yet copied to `kept`
    position = prompt.find("<")
    while position >= 0:
        kind = _KIND.match(prompt, position + 1)  # word runs after different "<" never overlap
        colon = kind.end() if kind else -1
        if kind is not None and colon < len(prompt) and prompt[colon] == ":":
            # Each search for ">" is followed by a tag that ends there, or found it right after the ":"
            # (one character read), or found none: then no later "<" can start a tag and the scan ends.
            closing = prompt.find(">", colon + 1)
            if closing == -1:
                break
            if closing > colon + 1:  # `[^>]+`: at least one character
                tags.append(
                    ExtraNetworkTag(
                        kind=kind.group(),
                        items=tuple(prompt[colon + 1 : closing].split(":")),
                        text=prompt[position : closing + 1],
                        start=position,
                        end=closing + 1,
                        where=where,
                    )
                )
                kept.append(prompt[kept_from:position])
                kept_from = closing + 1
                position = prompt.find("<", kept_from)
                continue
        position = prompt.find("<", position + 1)
    if not tags:
        return StrippedPrompt(prompt, ())
    kept.append(prompt[kept_from:])
    return StrippedPrompt("".join(kept), tuple(tags))


def lora_arguments(tag: ExtraNetworkTag) -> LoraArguments:
    """The name, multipliers and dynamic rank of a `lora` / `lyco` tag, by A1111's rules (module docstring).

    A value that is not a number (or not finite in float32, or a rank below 1) raises `NetworkError`.
    """
    if tag.kind not in LORA_KINDS:
        raise ValueError(f"lora_arguments takes a tag of kind {' or '.join(LORA_KINDS)}, got {tag.kind!r}")
    positional = tag.positional
    named = dict(tag.named)
    te_multiplier = _multiplier(tag, positional[1], "text-encoder multiplier (2nd argument)") if len(positional) > 1 else 1.0
    if "te" in named:
        te_multiplier = _multiplier(tag, named["te"], "text-encoder multiplier te=")
    unet_multiplier = te_multiplier
    if len(positional) > 2:
        unet_multiplier = _multiplier(
            tag, positional[2], "UNet multiplier (3rd argument)",
            hint="; block-weight presets of the lora-block-weight extension are not supported",
        )
    if "unet" in named:
        unet_multiplier = _multiplier(tag, named["unet"], "UNet multiplier unet=")
    dyn_dim = _rank(tag, positional[3], "dynamic rank (4th argument)") if len(positional) > 3 else None
    if "dyn" in named:
        dyn_dim = _rank(tag, named["dyn"], "dynamic rank dyn=")
    return LoraArguments(tag.name, te_multiplier, unet_multiplier, dyn_dim)


def hypernet_arguments(tag: ExtraNetworkTag) -> HypernetArguments:
    """The name and multiplier of a `hypernet` tag: items[0] and float(items[1]) (default 1.0), as A1111."""
    if tag.kind not in HYPERNET_KINDS:
        raise ValueError(f"hypernet_arguments takes a tag of kind {' or '.join(HYPERNET_KINDS)}, got {tag.kind!r}")
    multiplier = _multiplier(tag, tag.items[1], "multiplier (2nd argument)") if len(tag.items) > 1 else 1.0
    return HypernetArguments(tag.items[0], multiplier)


def _describe(tag: ExtraNetworkTag) -> str:
    return f"extra network tag {_shorten(tag.text)} in the {tag.where} prompt (characters {tag.start}-{tag.end})"


def _multiplier(tag: ExtraNetworkTag, value: str, argument: str, *, hint: str = "") -> float:
    """`float(value)` as A1111 reads it, refused with a message when it is not a finite float32 number."""
    try:
        number = float(value)
    except ValueError:
        raise NetworkError(
            f"{_describe(tag)}: the {argument} is {_shorten(value)}, not a number (expected a decimal such as "
            f"0.8{hint})"
        ) from None
    if not (math.isfinite(number) and abs(number) <= FLOAT32_MAX):
        raise NetworkError(
            f"{_describe(tag)}: the {argument} {_shorten(value)} is not finite in float32 (expected a decimal such "
            f"as 0.8; the largest float32 is {FLOAT32_MAX:.4g})"
        )
    return number


def _rank(tag: ExtraNetworkTag, value: str, argument: str) -> int:
    """`int(value)` as A1111 reads it, refused with a message when it is not a whole number >= 1."""
    try:
        rank = int(value)
    except ValueError:
        raise NetworkError(
            f"{_describe(tag)}: the {argument} is {_shorten(value)}, not a whole number (expected a rank such as 8)"
        ) from None
    if rank < 1:
        raise NetworkError(f"{_describe(tag)}: the {argument} is {rank} (expected a rank of at least 1, such as 8)")
    return rank


def _shorten(text: str, limit: int = 80) -> str:
    """`repr(text)`, with the middle of a long text left out."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[: limit // 2]) + "..." + repr(text[-(limit // 2) :])
