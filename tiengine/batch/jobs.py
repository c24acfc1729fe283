"""Reading and checking the rows of a JOBS file (`tiengine batch encode|generate|train JOBS`).

A JOBS file is JSON Lines (one object per line; blank lines are skipped) or, where pyarrow imports, Parquet
(one row per job; a `settings` column holds objects or JSON text). The fields of a row, per kind:

- encode:   id, prompt, negative (default ""), settings (steps, sampler, and the EncodeOptions fields:
            clip_skip, emphasis, comma_backtrack, bare_names, explicit_embedding_syntax,
            keep_embeddings_on_backtrack)
- generate: id, prompt, negative, seed (default: derived from the id), settings (GenerateSettings fields,
            tiengine.settings, and the EncodeOptions fields; one image per row, so no batch_size)
- train:    id, images (a folder, relative to the JOBS file's folder), name (default: the id), seed,
            settings (TrainEmbeddingSettings fields, tiengine.training.textual_inversion)

Ids are strings; a later row with an id already seen fails. Every problem of a row (malformed JSON, a
missing or mistyped field, an unknown or bad setting, a missing images folder, a duplicate id) becomes that
row's `RowFailure` with a message naming the file, the line and the field; the other rows are not touched.
Settings are checked here by building the very objects the worker builds (`job_settings`), so a bad setting
fails before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiengine.diffusion.samplers import get_sampler
from tiengine.errors import TiengineError
from tiengine.io.text_files import read_utf8_text
from tiengine.settings import settings_with
from tiengine.text.conditioning import EncodeOptions
from tiengine.training.textual_inversion import (
    TrainEmbeddingSettings,
    settings_from_options,
)

KINDS = ("encode", "generate", "train")
ROW_FIELDS = {  # kind -> the fields a row may have (id is required in every kind)
    "encode": ("id", "prompt", "negative", "settings"),
    "generate": ("id", "prompt", "negative", "seed", "settings"),
    "train": ("id", "images", "name", "seed", "settings"),
}
ENCODE_SETTING_NAMES = ("steps", "sampler") + tuple(EncodeOptions.__dataclass_fields__)
TUPLE_SETTINGS = ("seed_resize_from", "hires_resize")  # GenerateSettings fields that are (width, height)
MAX_SEED = 2**32 - 1


class BatchJobError(TiengineError):
    """A JOBS file that cannot be read at all (missing, unknown format, Parquet without pyarrow)."""


@dataclass(frozen=True)
class Job:
    """One valid row: its id, its position (`line`: the JSONL line, or the Parquet row counted from 1), its
    index among all rows (`position`, from 0) and its fields, checked and JSON-serialisable (train's images
    as an absolute path)."""

    id: str
    line: int
    position: int
    kind: str
    fields: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "line": self.line, "position": self.position, "kind": self.kind,
                           "fields": self.fields}, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Job:
        data = json.loads(text)
        return cls(data["id"], data["line"], data["position"], data["kind"], data["fields"])


@dataclass(frozen=True)
class RowFailure:
    """A row refused before it ran: its id when one could be read (else None), position and the message."""

    id: str | None
    line: int
    position: int
    error: str


@dataclass(frozen=True)
class JobList:
    """A JOBS file's rows in file order: Jobs and RowFailures."""

    source: str
    kind: str
    rows: list[Job | RowFailure]

    @property
    def jobs(self) -> list[Job]:
        return [row for row in self.rows if isinstance(row, Job)]


@dataclass(frozen=True)
class Unreadable:
    """A line that is not JSON at all: why."""

    reason: str


def read_jobs(jobs: str | os.PathLike[str] | Sequence[Mapping[str, Any]], kind: str) -> JobList:
    """The rows of a JOBS file (.jsonl / .json lines, or .parquet), or of a list of row objects (train's images
    then relative to the working folder), checked for `kind`."""
    if kind not in KINDS:
        raise BatchJobError(f"unknown job kind {kind!r}; expected one of: {', '.join(KINDS)}")
    if isinstance(jobs, (str, os.PathLike)):
        path = Path(jobs)
        raw = _parquet_rows(path) if path.suffix.lower() == ".parquet" else _jsonl_rows(path)
        source, base = str(path), path.resolve().parent
    else:
        raw = [(index + 1, row) for index, row in enumerate(jobs)]
        source, base = "jobs", Path.cwd()
    rows: list[Job | RowFailure] = []
    first_line: dict[str, int] = {}
    for position, (line, value) in enumerate(raw):
        where = f"{source}:{line}"
        row_id = value.get("id") if isinstance(value, dict) and isinstance(value.get("id"), str) else None
        try:
            if isinstance(value, Unreadable):
                raise BatchJobError(f"{where}: {value.reason}")
            fields = check_row(value, kind, where, base)
            row_id = fields.pop("id")
            if row_id in first_line:
                raise BatchJobError(f"{where}: duplicate id {row_id!r} (first on line {first_line[row_id]}); "
                               f"ids must be unique")
            first_line[row_id] = line
            rows.append(Job(row_id, line, position, kind, fields))
        except TiengineError as error:
            message = str(error) if str(error).startswith(where) else f"{where}: {error}"
            rows.append(RowFailure(row_id, line, position, message))
    return JobList(source, kind, rows)


def check_row(value: object, kind: str, where: str, base: Path) -> dict[str, Any]:
    """A row's fields, checked for `kind` (defaults filled in, images resolved against `base`)."""
    if not isinstance(value, dict):
        raise BatchJobError(f"{where}: a row must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(ROW_FIELDS[kind]))
    if unknown:
        raise BatchJobError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))} for {kind} rows; expected some "
                       f"of: {', '.join(ROW_FIELDS[kind])}")
    row_id = value.get("id")
    if not isinstance(row_id, str) or not row_id:
        raise BatchJobError(f"{where}: field 'id' must be a non-empty string, got {row_id!r}")
    settings = value.get("settings", {})
    if isinstance(settings, str):  # a Parquet column of JSON text
        try:
            settings = json.loads(settings)
        except json.JSONDecodeError as error:
            raise BatchJobError(f"{where}: field 'settings' is not valid JSON ({error})") from None
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise BatchJobError(f"{where}: field 'settings' must be an object, got {type(settings).__name__}")
    fields: dict[str, Any] = {"id": row_id, "settings": settings}
    if kind in ("encode", "generate"):
        fields["prompt"] = _text(value, "prompt", where, required=True)
        fields["negative"] = _text(value, "negative", where, required=False)
    if kind == "generate":
        fields["seed"] = _seed(value, where, row_id)
    if kind == "train":
        fields["images"] = str(_images_folder(value, where, base))
        fields["name"] = _text(value, "name", where, required=False) or row_id
        if value.get("seed") is not None:
            fields["seed"] = _seed(value, where, row_id)
    job_settings(kind, fields)  # a bad setting fails here, before any model loads
    return fields


def job_settings(kind: str, fields: Mapping[str, Any]) -> Any:
    """The settings object a row's fields make: (steps, second_order, EncodeOptions) for encode,
    GenerateSettings for generate, TrainEmbeddingSettings for train. Raises a TiengineError naming the
    setting."""
    settings = dict(fields["settings"])
    if kind == "encode":
        unknown = sorted(set(settings) - set(ENCODE_SETTING_NAMES))
        if unknown:
            raise BatchJobError(f"unknown encode setting(s) {', '.join(unknown)}; expected some of: "
                           f"{', '.join(ENCODE_SETTING_NAMES)}")
        steps = settings.pop("steps", 20)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise BatchJobError(f"setting 'steps' must be an integer >= 1, got {steps!r}")
        second_order = get_sampler(str(settings.pop("sampler", "Euler a"))).second_order
        try:
            return steps, second_order, EncodeOptions(**settings)
        except TypeError as error:  # a mistyped value the dataclass compares against a number
            raise BatchJobError(f"bad encode setting: {error}") from None
    if kind == "generate":
        if "batch_size" in settings:
            raise BatchJobError("setting 'batch_size' is not a row setting: each row makes one image")
        if "seed" in settings:
            raise BatchJobError("the seed is the row's own field 'seed', not a setting")
        for name in TUPLE_SETTINGS:
            if isinstance(settings.get(name), list):
                settings[name] = tuple(settings[name])
        return settings_with(seed=fields["seed"], **settings)
    if "seed" in fields:
        settings["seed"] = fields["seed"]
    try:
        result: TrainEmbeddingSettings = settings_from_options(**settings)
    except TypeError as error:
        raise BatchJobError(f"bad training setting: {error}") from None
    return result


def row_seed(row_id: str) -> int:
    """The seed of a generate row without one: the first 4 bytes of sha256(id), so it follows the row."""
    return int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:4], "big")


def _text(value: dict, name: str, where: str, *, required: bool) -> str:
    text = value.get(name)
    if text is None and not required:
        return ""
    if not isinstance(text, str):
        expected = "a string" if required else "a string (or absent)"
        raise BatchJobError(f"{where}: field {name!r} must be {expected}, got {text!r}")
    return text


def _seed(value: dict, where: str, row_id: str) -> int:
    seed = value.get("seed")
    if seed is None:
        return row_seed(row_id)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise BatchJobError(f"{where}: field 'seed' must be an integer in 0..{MAX_SEED} (absent: derived from the id), "
                       f"got {seed!r}")
    return seed


def _images_folder(value: dict, where: str, base: Path) -> Path:
    images = value.get("images")
    if not isinstance(images, str) or not images:
        raise BatchJobError(f"{where}: field 'images' must be a folder path (a string), got {images!r}")
    folder = (base / images).resolve()
    if not folder.is_dir():
        found = "a file" if folder.exists() else "nothing"
        raise BatchJobError(f"{where}: field 'images': {folder} must be a folder of training images, found {found}")
    return folder


def _jsonl_rows(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed value, or Unreadable with the reason) per non-blank line."""
    text = read_utf8_text(path, "a JOBS file: one JSON object per line", BatchJobError)
    rows: list[tuple[int, object]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            rows.append((number, Unreadable(f"malformed JSON ({error.msg} at column {error.colno})")))
    return rows


def _parquet_rows(path: Path) -> list[tuple[int, object]]:
    try:
        import pyarrow.parquet
    except ImportError:
        raise BatchJobError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow, or the [ray] extra)") from None
    try:
        table = pyarrow.parquet.read_table(path)
    except (OSError, pyarrow.ArrowException) as error:
        raise BatchJobError(f"{path}: cannot read the Parquet file ({error})") from None
    return [(index + 1, {key: item for key, item in row.items() if item is not None})
            for index, row in enumerate(table.to_pylist())]
