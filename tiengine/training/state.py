"""Resumable textual-inversion training state: one safetensors file, plus the loss log as CSV.

`state.safetensors` (written atomically after every checkpoint, never a pickle) holds:
- tensors `vectors.<key>` (n, D) float32: the trainable vectors per encoder key (`clip_l`, `clip_g`, ...);
- tensors `optimizer.<index>.<name>`: the optimizer's per-parameter state (AdamW: `step`, `exp_avg`,
  `exp_avg_sq`), index = position of the encoder key in `keys`;
- metadata `tiengine.training.state` (JSON): format version, completed `step`, the run's `fingerprint`
  (everything that shapes the trajectory: seed, settings, image hashes, templates, model), the encoder
  `keys` in parameter order, the fp16 gradient scaler's state, elapsed seconds, samples seen, and the
  sha256 of the final outputs written by the run (so `--resume` may replace those, and only those).
Randomness needs no saved generator state: every draw of step s comes from generators seeded by
(seed, stream, s, micro-batch) (tiengine.training.textual_inversion), so the restored step number restores it.

`loss.csv` columns: step (1-based, completed optimizer steps), loss (mean over the step's
micro-batches), learning_rate, samples (images seen so far), seconds (training wall time so far).
"""

from __future__ import annotations

import csv
import io
import json
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
    }
    payload = save(tensors, metadata={STATE_METADATA_KEY: json.dumps(header, sort_keys=True)})
    atomic_write_bytes(path, payload, overwrite=True)


def load_state(path: Path) -> TrainingState:
    """Read a checkpoint written by `save_state`; a TrainingError names what is wrong with it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for bad files
        raise TrainingError(f"{path}: not a readable training checkpoint ({error})") from None
    try:
        header = json.loads(metadata[STATE_METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        raise TrainingError(f"{path}: no '{STATE_METADATA_KEY}' metadata; not a tiengine training checkpoint") from None
    if header.get("format") != STATE_FORMAT or header.get("version") != STATE_VERSION:
        raise TrainingError(f"{path}: checkpoint format {header.get('format')!r} version {header.get('version')!r}, "
                            f"expected {STATE_FORMAT!r} version {STATE_VERSION}")
    keys = header["keys"]
    missing = [f"vectors.{key}" for key in keys if f"vectors.{key}" not in tensors]
    if missing:
        raise TrainingError(f"{path}: checkpoint lacks tensors {missing}")
    optimizer_state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, entry = name.split(".", 2)
            optimizer_state.setdefault(int(index), {})[entry] = tensor
    for index, entries in header.get("optimizer_scalars", {}).items():
        optimizer_state.setdefault(int(index), {}).update(entries)
    return TrainingState(
        step=int(header["step"]), fingerprint=header["fingerprint"],
        vectors={key: tensors[f"vectors.{key}"] for key in keys}, optimizer_state=optimizer_state,
        scaler_state=header.get("scaler"), seconds=float(header.get("seconds", 0.0)),
        samples=int(header.get("samples", 0)), outputs=dict(header.get("outputs") or {}),
    )


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
    with open(path, encoding="utf-8", newline="") as handle:
        for record in csv.DictReader(handle):
            try:
                row = LossRow(int(record["step"]), float(record["loss"]), float(record["learning_rate"]),
                              int(record["samples"]), float(record["seconds"]))
            except (KeyError, TypeError, ValueError):
                raise TrainingError(f"{path}: malformed loss log row {record} (columns {LOG_COLUMNS})") from None
            if row.step <= up_to_step:
                rows.append(row)
    return rows
