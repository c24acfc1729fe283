"""Resumable textual-inversion training state: one safetensors file, plus the loss log as CSV.

`state.safetensors` (written atomically after every checkpoint, never a pickle) holds:
- tensors `vectors.<key>` (n, D) float32: the trainable vectors per encoder key (`clip_l`, `clip_g`, ...);
- tensors `optimizer.<index>.<name>`: the optimizer's per-parameter state (AdamW: `step`, `exp_avg`,
  `exp_avg_sq`), index = position of the encoder key in `keys`;
- metadata `tiengine.training.state` (JSON): format version, completed `step`, the run's `fingerprint`
  (everything that shapes the trajectory: seed, settings, image hashes, templates, model), the encoder
  `keys` in parameter order, the fp16 gradient scaler's state, elapsed seconds, samples seen, and the
  sha256 of the final outputs written by the run (so `--resume` may replace those, and only those), the
  run's `settings` (every TrainEmbeddingSettings field, the seed resolved) and `also_save` formats, from
  which `--resume` takes whatever the caller does not change on purpose.
A damaged header (not JSON, a missing key, a wrong type) is a TrainingError naming the file, what is wrong
and the way out: delete the work folder or pass --overwrite to start over.
Randomness needs no saved generator state: every draw of step s comes from generators seeded by
(seed, stream, s, micro-batch) (tiengine.training.textual_inversion), so the restored step number restores it.

`loss.csv` columns: step (1-based, completed optimizer steps), loss (mean over the step's
micro-batches), learning_rate, samples (images seen so far), seconds (training wall time so far).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tiengine.io.atomic import atomic_write_bytes
from tiengine.training.data import TrainingError

STATE_FORMAT = "tiengine.ti_training_state"
STATE_VERSION = 1
STATE_METADATA_KEY = "tiengine.training.state"
LOG_COLUMNS = ("step", "loss", "learning_rate", "samples", "seconds")


@dataclass(frozen=True)
class LossRow:
    """One optimizer step of the loss log."""

    step: int
    loss: float
    learning_rate: float
    samples: int
    seconds: float


@dataclass
class TrainingState:
    """What a checkpoint restores (see the module docstring)."""

    step: int
    fingerprint: dict[str, Any]
    vectors: dict[str, torch.Tensor]
    optimizer_state: dict[int, dict[str, Any]]
    scaler_state: dict[str, Any] | None = None
    seconds: float = 0.0
    samples: int = 0
    outputs: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] | None = None  # None: a checkpoint written before settings were recorded
    also_save: list[str] = field(default_factory=list)


def save_state(path: Path, state: TrainingState) -> None:
    """Write `state` to `path` atomically (replacing the previous checkpoint of this run)."""
    from safetensors.torch import save

    keys = list(state.vectors)
    tensors = {f"vectors.{key}": tensor.detach().to("cpu", torch.float32).contiguous()
               for key, tensor in state.vectors.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state.optimizer_state.items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    header = {
        "format": STATE_FORMAT, "version": STATE_VERSION, "step": state.step, "keys": keys,
        "fingerprint": state.fingerprint, "optimizer_scalars": scalars, "scaler": state.scaler_state,
        "seconds": state.seconds, "samples": state.samples, "outputs": state.outputs,
        "settings": state.settings, "also_save": state.also_save,
    }
    payload = save(tensors, metadata={STATE_METADATA_KEY: json.dumps(header, sort_keys=True)})
    atomic_write_bytes(path, payload, overwrite=True)


def recovery_hint(path: Path) -> str:
    """How to get past a damaged checkpoint of the work folder holding `path`."""
    return f"delete the work folder {path.parent} or pass --overwrite (overwrite=True) to start over"


def load_state(path: Path) -> TrainingState:
    """Read a checkpoint written by `save_state`; a TrainingError names what is wrong with it."""
    from safetensors import safe_open

    def damaged(what: str) -> TrainingError:
        return TrainingError(f"{path}: damaged training checkpoint ({what}); {recovery_hint(path)}")

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for bad files
        raise TrainingError(f"{path}: not a readable training checkpoint ({error}); {recovery_hint(path)}") from None
    try:
        header = json.loads(metadata[STATE_METADATA_KEY])
    except KeyError:
        raise TrainingError(f"{path}: no '{STATE_METADATA_KEY}' metadata; not a tiengine training checkpoint "
                            f"({recovery_hint(path)})") from None
    except (json.JSONDecodeError, TypeError, RecursionError):
        raise damaged(f"metadata '{STATE_METADATA_KEY}' is not JSON") from None
    if not isinstance(header, dict):
        raise damaged(f"metadata '{STATE_METADATA_KEY}' is a {type(header).__name__}, expected a JSON object")
    if header.get("format") != STATE_FORMAT or header.get("version") != STATE_VERSION:
        raise TrainingError(f"{path}: checkpoint format {_short(header.get('format'))} version "
                            f"{_short(header.get('version'))}, expected {STATE_FORMAT!r} version {STATE_VERSION} "
                            f"({recovery_hint(path)})")
    _check_header(header, damaged)
    keys = header["keys"]
    missing = [f"vectors.{key}" for key in keys if f"vectors.{key}" not in tensors]
    if missing:
        raise damaged(f"lacks tensors {missing}")
    for key in keys:
        vectors = tensors[f"vectors.{key}"]
        if vectors.ndim != 2 or not vectors.dtype.is_floating_point:
            raise damaged(f"tensor 'vectors.{key}' is {vectors.dtype} {list(vectors.shape)}, expected (n, D) float")
    optimizer_state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, entry = (name.split(".", 2) + ["", ""])[:3]
            if not index.isdigit() or int(index) >= len(keys) or not entry:
                raise damaged(f"tensor {name!r} names no parameter (expected optimizer.<0..{len(keys) - 1}>.<name>)")
            optimizer_state.setdefault(int(index), {})[entry] = tensor
        elif not name.startswith("vectors."):
            raise damaged(f"unexpected tensor {name!r}")
    for index, entries in header["optimizer_scalars"].items():
        if not index.isdigit() or int(index) >= len(keys):
            raise damaged(f"optimizer_scalars key {index!r} names no parameter")
        optimizer_state.setdefault(int(index), {}).update(entries)
    return TrainingState(
        step=header["step"], fingerprint=header["fingerprint"],
        vectors={key: tensors[f"vectors.{key}"] for key in keys}, optimizer_state=optimizer_state,
        scaler_state=header["scaler"], seconds=float(header["seconds"]), samples=header["samples"],
        outputs=dict(header["outputs"]), settings=header["settings"], also_save=list(header["also_save"]),
    )


def _check_header(header: dict[str, Any], damaged) -> None:
    """Check the keys and JSON types of a checkpoint header; fill the optional keys' defaults in place."""
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value: Any) -> bool:
        return (is_int(value) or isinstance(value, float)) and math.isfinite(value)

    required = {
        "step": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
        "keys": (lambda v: isinstance(v, list) and v and all(isinstance(k, str) and k for k in v)
                 and len(set(v)) == len(v), "a non-empty list of distinct encoder keys"),
        "fingerprint": (lambda v: isinstance(v, dict), "a JSON object"),
    }
    optional = {  # key: (default, check, expected)
        "optimizer_scalars": ({}, lambda v: isinstance(v, dict) and all(isinstance(e, dict) for e in v.values()),
                              "an object of objects"),
        "scaler": (None, lambda v: v is None or isinstance(v, dict), "an object or null"),
        "seconds": (0.0, lambda v: is_number(v) and v >= 0, "a number >= 0"),
        "samples": (0, lambda v: is_int(v) and v >= 0, "an integer >= 0"),
        "outputs": ({}, lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                    "an object of file hashes"),
        "settings": (None, lambda v: v is None or isinstance(v, dict), "an object or null"),
        "also_save": ([], lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of formats"),
    }
    for key, (check, expected) in required.items():
        if key not in header:
            raise damaged(f"header lacks {key!r}")
        if not check(header[key]):
            raise damaged(f"header {key!r} is {_short(header[key])}, expected {expected}")
    for key, (default, check, expected) in optional.items():
        header.setdefault(key, default)
        if not check(header[key]):
            raise damaged(f"header {key!r} is {_short(header[key])}, expected {expected}")


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable `key: checkpoint X, now Y` lines for every field that differs."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            lines.append(f"{key}: checkpoint {_short(saved.get(key))}, now {_short(current.get(key))}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def write_loss_log(path: Path, rows: list[LossRow]) -> None:
    """Write the whole loss log atomically (it is rewritten at every checkpoint and at the end)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LOG_COLUMNS)
    for row in rows:
        # repr: the shortest text that reads back as the same float, so a resumed log equals an uninterrupted one
        writer.writerow([row.step, repr(row.loss), repr(row.learning_rate), row.samples, f"{row.seconds:.3f}"])
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"), overwrite=True)


def read_loss_log(path: Path, up_to_step: int) -> list[LossRow]:
    """Rows of an existing log with step <= up_to_step (a resumed run redoes the later ones)."""
    if not path.is_file():
        return []
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            records = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise TrainingError(f"{path}: unreadable loss log ({error}); {recovery_hint(path)}") from None
    for record in records:
        try:
            row = LossRow(int(record["step"]), float(record["loss"]), float(record["learning_rate"]),
                          int(record["samples"]), float(record["seconds"]))
        except (KeyError, TypeError, ValueError):
            raise TrainingError(f"{path}: malformed loss log row {_short(str(record))} (columns {LOG_COLUMNS}); "
                                f"{recovery_hint(path)}") from None
        if row.step <= up_to_step:
            rows.append(row)
    return rows
