"""Generation settings as the `parameters` text that Stable Diffusion tools write into PNG files.

The layout is the de-facto standard of the AUTOMATIC1111 web UI ("infotext"), which image browsers,
model sites and other front ends read back:

    <prompt, possibly several lines>
    Negative prompt: <negative prompt, possibly several lines>
    Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

The last line is `key: value` pairs joined by ", "; a value containing a comma, a colon or a newline is
written as a JSON string (`TI hashes: "EasyNegative: 1a2b3c4d5e6f, rick: 0f9e8d7c6b5a"`). The negative
line is left out when the negative prompt is empty.

Text that is not valid Unicode is written with U+FFFD in its place: a lone surrogate (what Python makes of
bytes that are not UTF-8 in command-line arguments and file names, `os.fsdecode(b"\xff")`) cannot be
encoded in a PNG text chunk, so `format_parameters` and `png_info` replace each one with U+FFFD
(`valid_text`), as a UTF-8 decoder with errors="replace" would. Every other character is kept; the text
always reads back.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from tiengine.errors import TiengineError
from tiengine.io.atomic import atomic_write

if TYPE_CHECKING:
    from PIL import Image

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
# One `key: value` pair of the settings line (the value quoted or up to the next comma).
_PAIR = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT_CHARACTER = "\ufffd"


class MetadataError(TiengineError):
    """An image carries no generation parameters, or they cannot be read."""


def valid_text(text: str) -> str:
    """`text` with each lone surrogate (undecodable bytes from argv or file names) replaced by U+FFFD."""
    return _LONE_SURROGATE.sub(REPLACEMENT_CHARACTER, text)


def quote_value(value: object) -> str:
    """A settings value as written: plain, or a JSON string when it holds ',', ':' or a newline."""
    text = str(value)
    if not any(character in text for character in ",:\n"):
        return text
    return json.dumps(text, ensure_ascii=False)


def format_parameters(prompt: str, negative_prompt: str, settings: Mapping[str, object]) -> str:
    """The `parameters` text: prompt, the negative line when non-empty, then the settings line.

    `settings` keeps its order; None values are left out. Lone surrogates become U+FFFD (`valid_text`).
    """
    line = ", ".join(f"{key}: {quote_value(value)}" for key, value in settings.items() if value is not None)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    lines.append(line)
    return valid_text("\n".join(lines))


def format_name_hashes(hashes: Mapping[str, str | None]) -> str | None:
    """`name: shorthash, ...` (A1111's `TI hashes` and `Lora hashes`; names without ':' or ','), or None if none."""
    parts = [
        f"{name.replace(':', '').replace(',', '')}: {short}" for name, short in hashes.items() if short
    ]
    return ", ".join(parts) or None


def parse_parameters(text: str) -> dict[str, str]:
    """Read `parameters` text back: {"Prompt": ..., "Negative prompt": ..., key: value, ...}.

    Quoted values are unquoted. A last line that is not a settings line (fewer than three pairs)
    belongs to the prompt, as other readers of this format treat it.
    """
    lines = text.strip("\n").split("\n")
    settings: dict[str, str] = {}
    if lines:
        pairs = _PAIR.findall(lines[-1])
        if len(pairs) >= 3:
            lines = lines[:-1]
            for key, value in pairs:
                value = value.strip()
                if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                    try:
                        value = json.loads(value)
                    except json.JSONDecodeError:
                        pass
                settings[key.strip()] = value
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX) and target is prompt_lines:
            target = negative_lines
            line = line[len(NEGATIVE_PREFIX) :].lstrip(" ")
        target.append(line)
    return {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines), **settings}


def parse_ti_hashes(value: str) -> dict[str, str]:
    """`TI hashes` value -> {name: short hash}."""
    result = {}
    for part in value.split(","):
        name, _, short = part.strip().rpartition(":")
        if name:
            result[name.strip()] = short.strip()
    return result


def png_info(parameters: str):  # -> PIL.PngImagePlugin.PngInfo
    """A PngInfo holding the `parameters` tEXt chunk (iTXt when the text is not Latin-1); lone surrogates
    become U+FFFD (`valid_text`)."""
    from PIL.PngImagePlugin import PngInfo

    parameters = valid_text(parameters)
    info = PngInfo()
    try:
        parameters.encode("latin-1")
        info.add_text(PARAMETERS_KEY, parameters)
    except UnicodeEncodeError:
        info.add_itxt(PARAMETERS_KEY, parameters)
    return info


def save_png(image: Image.Image, path: str | os.PathLike[str], parameters: str | None, *, overwrite: bool = False) -> Path:
    """Write `image` as PNG with its `parameters` chunk, atomically; never replaces a file unless told."""
    info = png_info(parameters) if parameters is not None else None
    return atomic_write(path, lambda temporary: image.save(temporary, format="PNG", pnginfo=info), overwrite=overwrite)


def read_image_parameters(path: str | os.PathLike[str]) -> str:
    """The `parameters` text of an image file (PNG text chunk, or JPEG/WebP EXIF user comment)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            text = image.info.get(PARAMETERS_KEY)
            if text is None:
                text = _exif_user_comment(image)
    except (OSError, UnidentifiedImageError) as error:
        raise MetadataError(f"{path}: cannot read the image: {error}") from error
    if not text:
        raise MetadataError(f"{path}: no generation parameters (no '{PARAMETERS_KEY}' text chunk or EXIF comment)")
    return text


def _exif_user_comment(image: Image.Image) -> str | None:
    exif = image.getexif().get_ifd(0x8769)  # Exif IFD
    comment = exif.get(0x9286)  # UserComment
    if isinstance(comment, bytes):
        if comment.startswith(b"UNICODE\x00"):
            return comment[8:].decode("utf-16-be", errors="replace")
        return comment[8:].decode("utf-8", errors="replace")
    return comment
