"""Open, check, convert and load a model: the public entry points of tiengine.weights_conv.

`open_model(path, ...)` detects the input (sources / folders) and returns an `OpenModel`. For each
component it builds a plan (rules.plan_conversions over the component's module table) and checks it
strictly against tiengine's module for the detected config, built on the meta device: every source key
without a rule, every target the module lacks, every module tensor nothing produces and every shape that
differs is named in one CheckpointError, before any tensor data is read. Then tensors are read one at
a time, transformed, cast and either yielded (`iter_component`), assigned into a module
(`build_module`), or streamed into safetensors files (`write_folder`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tiengine.errors import CheckpointError
from tiengine.io.atomic import OVERWRITE_HINT, FileExistsRefusal, atomic_write_bytes, ensure_folder
from tiengine.models.config import FORMAT_NAME, ModelConfig
from tiengine.models.text_encoder import ClipTextEncoder
from tiengine.models.unet import UNet2DConditionModel
from tiengine.models.vae import AutoencoderKL

from .folders import open_converted_folder, open_diffusers_folder, replace_vae
from .layouts import CATEGORY_NAMES, ComponentSource, Detection
from .readers import TensorInfo, dtype_name
from .rules import TRANSFORMS, Conversion, plan_conversions
from .source import SOURCE_FILE, model_source, write_source
from .sources import open_single_file, read_json
from .writer import write_safetensors

DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODULE_NAMES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}  # text encoders: ClipTextEncoder


def open_model(
    path: str | os.PathLike[str],
    *,
    family: str | None = None,
    prediction: str | None = None,
    vae: str | os.PathLike[str] | None = None,
    ema: bool = True,
    ignore_unknown: bool = False,
) -> OpenModel:
    """Detect a converted folder, a diffusers folder or a single-file checkpoint.

    family / prediction: overrides (a family the weights contradict is an error). vae: a replacement VAE
    file or diffusers `vae/` folder. ema: take the UNet from `model_ema.*` when the file has a complete
    EMA copy (the default, as most tools do; False keeps `model.diffusion_model.*`, e.g. to fine-tune).
    ignore_unknown: list keys of no known component as ignored instead of refusing the file.
    """
    path = Path(path)
    if path.is_dir():
        config_json = path / "config.json"
        if config_json.is_file() and read_json(config_json).get("format") == FORMAT_NAME:
            detection = open_converted_folder(path, family=family, prediction=prediction)
        elif (path / "model_index.json").is_file():
            detection = open_diffusers_folder(
                path, family=family, prediction=prediction, has_vae_override=vae is not None
            )
        else:
            raise CheckpointError(
                f"{path}: a folder without model_index.json (diffusers) or a tiengine config.json (converted model)"
            )
    else:
        detection = open_single_file(path, family=family, prediction=prediction, ema=ema,
                                     ignore_unknown=ignore_unknown, has_vae_override=vae is not None)  # fmt: skip
    if vae is not None:
        try:
            replace_vae(detection, Path(vae))
        except BaseException:
            detection.close()
            raise
    return OpenModel(detection)


def empty_module(
    name: str, config: ModelConfig, *, device: torch.device | str | None, dtype: torch.dtype | None
) -> nn.Module:
    """tiengine's module for component `name` (uninitialised when device is "meta")."""
    if name == "unet":
        return UNet2DConditionModel(config.unet, device=device, dtype=dtype)
    if name == "vae":
        return AutoencoderKL(config.vae, device=device, dtype=dtype)
    return ClipTextEncoder(config.text_encoders[name], device=device, dtype=dtype)


@dataclass
class ComponentPlan:
    component: ComponentSource
    conversions: list[Conversion]
    targets: dict[str, TensorInfo]  # target name -> dtype in the source, shape after the transform
    problems: list[str]


class OpenModel:
    """A detected model whose components can be checked, read, loaded and written (module docstring)."""

    def __init__(self, detection: Detection):
        self.detection = detection
        self._plans: dict[str, ComponentPlan] = {}

    @property
    def config(self) -> ModelConfig:
        return self.detection.config

    def __enter__(self) -> OpenModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.detection.close()

    # Planning ---------------------------------------------------------------------------------------

    def plan(self, name: str, *, strict: bool = True) -> ComponentPlan:
        """The checked conversion plan of one component (see the module docstring)."""
        if name not in self._plans:
            self._plans[name] = self._make_plan(name)
        plan = self._plans[name]
        if strict and plan.problems:
            raise CheckpointError(
                f"{self.detection.path}: component {name} does not match tiengine's "
                f"{MODULE_NAMES.get(name, 'ClipTextEncoder')} for the detected config:\n  " + "\n  ".join(plan.problems)
            )
        return plan

    def check(self) -> None:
        """Check every component; one CheckpointError names every problem of all of them."""
        problems = [
            f"{name}: {problem}"
            for name in self.config.components
            for problem in self.plan(name, strict=False).problems
        ]
        if problems:
            raise CheckpointError(
                f"{self.detection.path}: does not match tiengine's modules for the detected {self.config.family} "
                f"config:\n  " + "\n  ".join(problems)
            )

    def _make_plan(self, name: str) -> ComponentPlan:
        if name not in self.detection.components:
            raise CheckpointError(f"{self.detection.path}: missing component {name}")
        component = self.detection.components[name]
        conversions, unmatched = plan_conversions(component.keys, component.table)
        targets: dict[str, TensorInfo] = {}
        origin: dict[str, str] = {}
        problems = [f"unexpected {component.full_key(key)} (no rename rule)" for key in unmatched]
        for conversion in conversions:
            info = component.info(conversion.source)
            try:
                shapes = TRANSFORMS[conversion.transform].shapes(info.shape)
            except ValueError as error:
                problems.append(f"{component.full_key(conversion.source)}: {conversion.transform}: {error}")
                continue
            for target, shape in zip(conversion.targets, shapes):
                targets[target] = TensorInfo(info.dtype, tuple(shape))
                origin[target] = component.full_key(conversion.source)
        module = empty_module(name, self.config, device="meta", dtype=None)
        expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
        for key in sorted(set(expected) - set(targets)):
            problems.append(f"missing {key} {list(expected[key])}")
        for key in sorted(set(targets) - set(expected)):
            problems.append(f"unexpected {key} (from {origin[key]})")
        for key in sorted(set(targets) & set(expected)):
            if targets[key].shape != expected[key]:
                file_shape, model_shape = list(targets[key].shape), list(expected[key])
                problems.append(f"wrong shape {key}: file {file_shape} (from {origin[key]}), model {model_shape}")
        return ComponentPlan(component, conversions, targets, problems)

    # Reading ----------------------------------------------------------------------------------------

    def iter_component(
        self, name: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(tiengine name, tensor) one at a time, on `device`, floating tensors cast to `dtype`.

        The plan is checked when this is called, before the first tensor is read."""
        plan = self.plan(name)
        return self._iterate(plan, device, dtype)

    def _iterate(
        self, plan: ComponentPlan, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        component = plan.component
        for conversion in plan.conversions:
            key = component.full_key(conversion.source)
            tensor = component.source.read(key)
            for target, value in zip(conversion.targets, TRANSFORMS[conversion.transform].apply(tensor)):
                cast = dtype if (dtype is not None and value.is_floating_point()) else None
                yield target, value.to(device=device, dtype=cast)

    def build_module(
        self, name: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        """tiengine's module for `name`, built without initialisation and filled by a strict load."""
        tensors = self.iter_component(name, device=device, dtype=dtype)
        module = empty_module(name, self.config, device="meta", dtype=dtype)
        state = dict(tensors)
        module.load_state_dict(state, strict=True, assign=True)
        return module.to(device) if device is not None else module

    # Writing ----------------------------------------------------------------------------------------

    def write_folder(
        self,
        outdir: str | os.PathLike[str],
        *,
        dtype: torch.dtype | None = None,
        overwrite: bool = False,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> Path:
        """Write config.json and one `<component>.safetensors` per component (tiengine names), streaming,
        and source.json: the A1111 name and hashes of the checkpoint file converted (tiengine.weights_conv.
        source; one extra read of a single file; carried over from a converted folder; none for diffusers).

        Every component is checked before anything is written; config.json is written last, so a folder
        with a config.json is complete. Existing files are replaced only with `overwrite` (a stale
        source.json is then removed when the input has no source file).
        progress(component, tensors written, total tensors) is called after each tensor (totals over all
        components).
        """
        outdir = Path(outdir)
        names = self.config.components
        files = [outdir / f"{name}.safetensors" for name in names] + [outdir / SOURCE_FILE, outdir / "config.json"]
        existing = [str(file) for file in files if file.exists()]
        if existing and not overwrite:
            raise FileExistsRefusal(
                f"{outdir}: would replace {', '.join(existing)} ({OVERWRITE_HINT})"
            )
        self.check()
        source = model_source(self.detection.path)
        plans = {name: self.plan(name) for name in names}
        total = sum(len(conversion.targets) for plan in plans.values() for conversion in plan.conversions)
        written = 0

        def counted(name: str, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal written
            for item in tensors:
                yield item
                written += 1
                if progress is not None:
                    progress(name, written, total)

        ensure_folder(outdir)
        for name, plan in plans.items():
            entries = []  # in the order _iterate produces them
            for conversion in plan.conversions:
                for target in conversion.targets:
                    info = plan.targets[target]
                    stored = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
                    entries.append((target, TensorInfo(stored, info.shape)))
            metadata = {"format": "pt", "tiengine.component": name}
            write_safetensors(outdir / f"{name}.safetensors", entries, counted(name, self._iterate(plan, None, dtype)),
                              metadata=metadata, overwrite=overwrite)  # fmt: skip
        if source is not None:
            write_source(outdir, source, overwrite=overwrite)
        else:
            (outdir / SOURCE_FILE).unlink(missing_ok=True)  # a record left by an earlier conversion would lie
        atomic_write_bytes(outdir / "config.json", self.config.to_json().encode("utf-8"), overwrite=overwrite)
        return outdir

    # Inspecting -------------------------------------------------------------------------------------

    def inspect(self) -> dict[str, Any]:
        """What was detected and how, per-component parameter counts and dtypes, and the key accounting.

        Never raises for a mismatch: problems are listed under "problems"."""
        detection = self.detection
        components: dict[str, Any] = {}
        problems: list[str] = []
        converted = 0
        all_dtypes: Counter[str] = Counter()
        for name in self.config.components:
            plan = self.plan(name, strict=False)
            problems.extend(f"{name}: {problem}" for problem in plan.problems)
            dtypes: Counter[str] = Counter()
            for key in plan.component.keys:
                info = plan.component.info(key)
                dtypes[dtype_name(info.dtype)] += info.numel
            all_dtypes.update(dtypes)
            converted += len(plan.conversions)
            components[name] = {
                "params": sum(info.numel for info in plan.targets.values()),
                "dtype": _dtype_summary(dtypes),
                "tensors": len(plan.targets),
                "source": plan.component.origin,
            }
        return {
            "path": str(detection.path),
            "layout": detection.layout,
            "family": self.config.family,
            "variant": self.config.variant,
            "prediction": self.config.prediction,
            "prediction_source": detection.prediction_source,
            "dtype": _dtype_summary(all_dtypes),
            "components": components,
            "ema": detection.ema,
            "keys": {
                "total": detection.total_keys,
                "converted": converted,
                "ignored": {category: len(keys) for category, keys in sorted(detection.ignored.items())},
            },
            "ignored_meaning": {category: CATEGORY_NAMES.get(category, category) for category in detection.ignored},
            "extras": detection.extras,
            "detection": detection.evidence,
            "problems": problems,
            "config": self.config.to_dict(),
        }


def _dtype_summary(counts: Counter[str]) -> str:
    """The dtype name, or "mixed: float16 98.1%, float32 1.9%" (shares of elements)."""
    if not counts:
        return "none"
    if len(counts) == 1:
        return next(iter(counts))
    total = sum(counts.values())
    return "mixed: " + ", ".join(f"{name} {100 * count / total:.1f}%" for name, count in counts.most_common())


def load_model_weights(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    prediction: str | None = None,
    family: str | None = None,
    vae: str | os.PathLike[str] | None = None,
    ema: bool = True,
) -> tuple[ModelConfig, dict[str, Iterator[tuple[str, torch.Tensor]]]]:
    """Detect and open a model; return its config and, per component, its tensors in tiengine names.

    path: a converted folder (config.json + <component>.safetensors), a diffusers folder
    (model_index.json) or a single-file checkpoint. prediction / family override detection (a family
    that contradicts the weights is an error). vae: a standalone VAE file or diffusers `vae/` folder
    that replaces the checkpoint's own. ema: use `model_ema.*` UNet weights when the file has them.

    Each iterator yields (name, tensor) one tensor at a time, moved to `device` and, for floating-point
    tensors, cast to `dtype`; its key set has already been checked against tiengine's module for the
    config (missing and unexpected keys are a CheckpointError before any tensor is read). The files stay
    open while any of the iterators is alive.
    """
    model = open_model(path, prediction=prediction, family=family, vae=vae, ema=ema)
    return model.config, {
        name: model.iter_component(name, device=device, dtype=dtype) for name in model.config.components
    }


def load_models(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    prediction: str | None = None,
    family: str | None = None,
    vae: str | os.PathLike[str] | None = None,
    ema: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[ModelConfig, dict[str, nn.Module]]:
    """`load_model_weights`, then build tiengine's modules (UNet2DConditionModel, AutoencoderKL,
    ClipTextEncoder) on `device` in `dtype` and fill them tensor by tensor with a strict load.

    progress(component, components loaded, total components) is called after each component."""
    model = open_model(path, prediction=prediction, family=family, vae=vae, ema=ema)
    try:
        modules = {}
        names = model.config.components
        for number, name in enumerate(names, start=1):
            modules[name] = model.build_module(name, device=device, dtype=dtype)
            if progress is not None:
                progress(name, number, len(names))
        return model.config, modules
    finally:
        model.close()
