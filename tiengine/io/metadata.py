"""Generation settings as the `parameters` text that Stable Diffusion tools write into PNG files.

The layout is the de-facto standard of the AUTOMATIC1111 web UI ("infotext"), which image browsers,
model sites and other front ends read back:

    <prompt, possibly several lines>
    Negative prompt: <negative prompt, possibly several lines>
    Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

The last line is `key: value` pairs joined by ", "; a value containing a comma, a colon or a newline is
written as a JSON string (`TI hashes: "EasyNegative: 1a2b3c4d5e6f, rick: 0f9e8d7c6b5a"`), as A1111's
`infotext_utils.quote` does. The negative line is left out when the negative prompt is empty.

Reading follows A1111's `parse_generation_parameters` (modules/infotext_utils.py): the text is stripped
and split on "\n"; the last line is the settings line only when its pair pattern (A1111's `re_param`:
a key of word characters, spaces, '-' and '/', then ':', then a quoted JSON string or anything up to the
next comma) matches at least 3 times, else it belongs to the prompt; every other line is stripped, and
from the first line starting with "Negative prompt:" on (that prefix cut off each time) lines belong to
the negative prompt, joined with "\n". A value that starts and ends with '"' is decoded as JSON (kept as
is when that fails); an empty value is dropped (A1111 fails on it and skips the pair); a repeated key
keeps its last value. Values are not stripped. So that every value reads back exactly, `quote_value`
also quotes the values A1111's parser would change: empty ones, ones with leading or trailing whitespace
and ones starting with '"'. Prompt lines are stripped by that reader, whoever wrote them.

`generation_parameters` goes on as A1111's parse_generation_parameters does (v1.10) with those pairs:
every value of the form WxH becomes two fields "KEY-1" / "KEY-2" (the key itself is not kept); a missing
"Clip skip" is "1"; a "Hypernet" field appends `<hypernet:NAME:STRENGTH>` ("Hypernet strength", default
"1.0") to the prompt; A1111's defaults fill what is missing (`A1111_DEFAULTS`, then `A1111_LATER_DEFAULTS`,
"Cache FP16 weight for LoRA" only with an FP8 weight); an old "First pass size" moves to Size and
"Hires resize" (`restore_old_hires_fix_params`, the first pass computed by
`old_hires_fix_first_pass_dimensions` when it is 0x0; its use_old_hires_fix_width_height option off); and
a "Version" below a release adds A1111's compatibility flags (infotext_versions.py, `backcompat`, its
auto_backcompat option on), versions ordered as the `packaging` library orders them (`version_key`).
A1111's style extraction needs its styles file and is not done; no key is skipped (its
infotext_skip_pasting option empty).

Text that is not valid Unicode is written with U+FFFD in its place: a lone surrogate (what Python makes of
bytes that are not UTF-8 in command-line arguments and file names, `os.fsdecode(b"\xff")`) cannot be
encoded in a PNG text chunk, so `format_parameters` and `png_info` replace each one with U+FFFD
(`valid_text`), as a UTF-8 decoder with errors="replace" would. Every other character is kept; the text
always reads back.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiengine.errors import TiengineError
from tiengine.io.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from PIL import Image

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
# One `key: value` pair of the settings line (the value quoted or up to the next comma): A1111's `re_param`.
SETTINGS_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
MIN_SETTINGS_PAIRS = 3  # a last line with fewer pairs is part of the prompt (A1111)
A1111_DEFAULTS = {"Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
                  "Hires checkpoint": "Use same checkpoint", "Hires prompt": "", "Hires negative prompt": "",
                  "Mask mode": "Inpaint masked", "Masked content": "original", "Inpaint area": "Whole picture",
                  "Masked area padding": 32}
A1111_LATER_DEFAULTS = {"RNG": "GPU", "Schedule type": "Automatic", "Schedule max sigma": 0, "Schedule min sigma": 0,
                        "Schedule rho": 0, "VAE Encoder": "Full", "VAE Decoder": "Full", "FP8 weight": "Disable"}
OLD_HIRES_PIXELS = 512 * 512  # old_hires_fix_first_pass_dimensions: first pass of about 512x512, sides of 64
# infotext_versions.py's versions (release, post number), below which a compatibility flag is set
BACKCOMPAT_VERSIONS = {"v160": ((1, 6), -1), "v170_tsnr": ((1, 7), 225), "v180": ((1, 8), -1)}
_WIDTH_X_HEIGHT = re.compile(r"^(\d+)x(\d+)$")  # A1111's re_imagesize
_VERSION_CUT = re.compile(r"([^-]+-[^-]+)-.*")  # infotext_versions.parse_version keeps "v1.7.0-225" of "...-g1a2b"
# PEP 440 as `packaging` reads it: release, pre-release, post-release ("-225" is post 225); nothing else.
_VERSION = re.compile(r"v?(\d+(?:\.\d+)*)([-_.]?(?:a|b|c|rc|alpha|beta|pre|preview)[-_.]?\d*)?"
                      r"(?:-(\d+)|[-_.]?(?:post|rev|r)[-_.]?(\d*))?", re.IGNORECASE)
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG (WebP: "RIFF" size "WEBP")
MAX_TEXT_FILE_BYTES = 1 << 20  # a parameters text file; real ones are a few KiB
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT_CHARACTER = "\ufffd"


class MetadataError(TiengineError):
    """An image carries no generation parameters, or they cannot be read."""


def valid_text(text: str) -> str:
    """`text` with each lone surrogate (undecodable bytes from argv or file names) replaced by U+FFFD."""
    return _LONE_SURROGATE.sub(REPLACEMENT_CHARACTER, text)


def quote_value(value: object) -> str:
    """A settings value as written: a JSON string when it holds ',', ':' or a newline (A1111's rule), or when
    A1111's reader would change it unquoted (empty, leading or trailing whitespace, a leading '"'); else
    plain."""
    text = str(value)
    if any(character in text for character in ",:\n") or not text or text != text.strip() or text[0] == '"':
        return json.dumps(text, ensure_ascii=False)
    return text


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
    """Read `parameters` text back as A1111 does (module docstring): {"Prompt": ..., "Negative prompt": ...,
    key: value, ...}, values unquoted and unsplit ("Size": "512x512"), in the order written."""
    *lines, last_line = text.strip().split("\n")
    pairs = SETTINGS_PAIR.findall(last_line)
    if len(pairs) < MIN_SETTINGS_PAIRS:
        lines.append(last_line)
        pairs = []
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    result = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in pairs:
        if not value:  # A1111 fails on an empty value and skips the pair
            continue
        result[key] = unquote_value(value)
    return result


def unquote_value(value: str) -> str:
    """A1111's `unquote`: a value starting and ending with '"' decoded as a JSON string, else as it is."""
    if not value or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return json.loads(value)  # a JSON text between two '"' is a string
    except json.JSONDecodeError:
        return value


def generation_parameters(parameters: Mapping[str, str]) -> dict[str, Any]:
    """A1111's parse_generation_parameters result (module docstring) from `parse_parameters`' pairs: "Prompt",
    "Negative prompt", the fields with WxH split, defaults and compatibility flags (strings as read; A1111's
    defaults and computed sizes are ints, its flags True)."""
    fields: dict[str, Any] = {}
    for key, value in parameters.items():
        size = _WIDTH_X_HEIGHT.match(value)
        if size is None:
            fields[key] = value
        else:
            fields[f"{key}-1"], fields[f"{key}-2"] = size.group(1), size.group(2)
    fields.setdefault("Clip skip", "1")
    if "Hypernet" in fields:
        fields["Prompt"] += f"<hypernet:{fields['Hypernet']}:{fields.get('Hypernet strength', '1.0')}>"
    for key, value in A1111_DEFAULTS.items():
        fields.setdefault(key, value)
    _restore_old_hires_fields(fields)
    for key, value in A1111_LATER_DEFAULTS.items():
        fields.setdefault(key, value)
    if fields["FP8 weight"] != "Disable":
        fields.setdefault("Cache FP16 weight for LoRA", False)
    _add_backcompat_flags(fields)
    return fields


def _restore_old_hires_fields(fields: dict[str, Any]) -> None:
    """A1111's restore_old_hires_fix_params (its use_old_hires_fix_width_height option off)."""
    if "First pass size-1" not in fields or "First pass size-2" not in fields:
        return
    first_width, first_height = int(fields["First pass size-1"]), int(fields["First pass size-2"])
    width, height = int(fields.get("Size-1", 512)), int(fields.get("Size-2", 512))
    if first_width == 0 or first_height == 0:
        scale = math.sqrt(OLD_HIRES_PIXELS / (width * height))
        first_width, first_height = math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64
    fields["Size-1"], fields["Size-2"] = first_width, first_height
    fields["Hires resize-1"], fields["Hires resize-2"] = width, height


def version_key(text: object) -> tuple[tuple[int, ...], int, int] | None:
    """An A1111 "Version" as (release without trailing zeros, 0 for a pre-release / 1, post number or -1),
    ordered as `packaging.version` orders these versions; None where A1111's parse_version gives None."""
    if not isinstance(text, str):
        return None
    cut = _VERSION_CUT.match(text)
    match = _VERSION.fullmatch((cut.group(1) if cut else text).strip())
    if match is None:
        return None
    release_text, pre, dash_post, named_post = match.groups()
    release = [int(part) for part in release_text.split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    post = int(dash_post) if dash_post else (int(named_post or 0) if named_post is not None else -1)
    return tuple(release), 0 if pre else 1, post


def _add_backcompat_flags(fields: dict[str, Any]) -> None:
    """A1111's infotext_versions.backcompat (its auto_backcompat option on)."""
    version = version_key(fields.get("Version"))
    if version is None:
        return

    def below(name: str) -> bool:
        release, post = BACKCOMPAT_VERSIONS[name]
        return version < (release, 1, post)

    if below("v160") and "[" in fields.get("Prompt", ""):
        fields["Old prompt editing timelines"] = True
    if below("v160") and fields.get("Sampler", "") in ("DDIM", "PLMS"):
        fields["Pad conds v0"] = True
    if below("v170_tsnr"):
        fields["Downcast alphas_cumprod"] = True
    if below("v180") and fields.get("Refiner"):
        fields["Refiner switch by sampling steps"] = True


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


def png_bytes(image: Image.Image, parameters: str | None) -> bytes:
    """`image` encoded as PNG with its `parameters` chunk: the bytes `save_png` writes and `tiengine serve`
    sends (base64) for the same image, so a picture from the service equals the CLI's file byte for byte."""
    info = png_info(parameters) if parameters is not None else None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike[str], parameters: str | None, *, overwrite: bool = False) -> Path:
    """Write `image` as PNG with its `parameters` chunk (`png_bytes`), atomically; never replaces a file unless
    told."""
    return atomic_write_bytes(path, png_bytes(image, parameters), overwrite=overwrite)


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


def read_parameters_file(path: str | os.PathLike[str]) -> str:
    """The `parameters` text of an image (PNG, JPEG or WebP, by its first bytes: `read_image_parameters`) or
    of a UTF-8 text file holding it (at most MAX_TEXT_FILE_BYTES)."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            head = file.read(MAX_TEXT_FILE_BYTES + 1)
    except OSError as error:
        raise MetadataError(f"{path}: cannot read the file ({error.strerror or error})") from None
    if head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return read_image_parameters(path)
    if len(head) > MAX_TEXT_FILE_BYTES:
        raise MetadataError(f"{path}: neither an image (PNG, JPEG, WebP) nor a parameters text file of at most "
                            f"{MAX_TEXT_FILE_BYTES} bytes")
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise MetadataError(f"{path}: neither an image (PNG, JPEG, WebP) nor UTF-8 text (byte {error.start} is "
                            f"not UTF-8)") from None
    if not text.strip():
        raise MetadataError(f"{path}: empty; expected an image or the parameters text")
    return text


def _exif_user_comment(image: Image.Image) -> str | None:
    exif = image.getexif().get_ifd(0x8769)  # Exif IFD
    comment = exif.get(0x9286)  # UserComment
    if isinstance(comment, bytes):
        if comment.startswith(b"UNICODE\x00"):
            return comment[8:].decode("utf-16-be", errors="replace")
        return comment[8:].decode("utf-8", errors="replace")
    return comment
