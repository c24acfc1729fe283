"""tiengine.weights_conv: load and convert Stable Diffusion checkpoints, safely and lazily.

Inputs: single-file checkpoints (.safetensors, and .ckpt / .pt through tiengine.io.safe_pickle, which never
executes code) of SD1.x, SD2.x, SDXL base and refiner; diffusers folders; folders written by
`weights-conv convert`; standalone VAE files to swap in. Outputs: tensors in tiengine's names (those of
diffusers' UNet2DConditionModel / AutoencoderKL and transformers' CLIP text models), streamed one at a
time into modules or safetensors files, with a `tiengine.models.config.ModelConfig`.

Modules, in data-flow order: readers (lazy tensor sources), detect (architecture from shapes), rules
(declarative renames + named transforms), layouts / sources / folders (what an input is), writer
(streaming safetensors), source (the A1111 name and hash of the checkpoint file a folder came from,
source.json), convert (checked plans, loading, writing, inspect), cli (`weights-conv`).

Public API (resolved lazily so importing this package reads nothing and imports no torch):
`open_model(path, family=, prediction=, vae=, ema=, ignore_unknown=) -> OpenModel` with `.config`,
`.inspect()`, `.iter_component(name, device=, dtype=)`, `.build_module(name, ...)`,
`.write_folder(outdir, dtype=, overwrite=)`; `convert_checkpoint(path, outdir, ...)`;
`load_models(path, device=, dtype=, ...) -> (ModelConfig, modules)`, the engine's loader, and
`load_model_weights` (the same, as per-component tensor iterators).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "open_model": "tiengine.weights_conv.convert",
    "OpenModel": "tiengine.weights_conv.convert",
    "load_models": "tiengine.weights_conv.convert",
    "load_model_weights": "tiengine.weights_conv.convert",
    "convert_checkpoint": "tiengine.weights_conv.cli",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from tiengine.weights_conv.cli import convert_checkpoint
    from tiengine.weights_conv.convert import OpenModel, load_model_weights, load_models, open_model


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'tiengine.weights_conv' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)
