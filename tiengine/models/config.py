"""ModelConfig: everything tiengine needs to know about one Stable Diffusion model, and its loader API.

A model is its family ("sd1" / "sd2" / "sdxl"), its prediction type ("epsilon" / "v"), its text
encoders in conditioning order ("text_encoder", then "text_encoder_2" for SDXL; the SDXL refiner has
only "text_encoder_2", as in diffusers), its UNet and VAE configs, and the discrete training noise
schedule (diffusers scheduler_config.json names; every SD release uses 1000 steps of "scaled_linear"
betas from 0.00085 to 0.012, ldm `linear_start` / `linear_end`).

Family differences the pipeline acts on are named fields, derived from the family when a config.json does
not give them (so every older config.json still loads): `embedding_keys` (which embedding vectors each
text encoder reads: SD1 `clip_l`, SD2 `clip_h`, SDXL `clip_l` + `clip_g`) and `zero_empty_negative`
(SDXL conditions on all zeros for an empty negative prompt). `size_time_ids` builds SDXL's size / crop /
aesthetic-score conditioning ("micro-conditioning", the reference implementation's `add_time_ids`).

`to_json` / `from_json` are the `config.json` of a converted model folder (format "tiengine.model",
version 1), written by `weights-conv convert` beside `unet.safetensors`, `vae.safetensors`,
`text_encoder.safetensors` (and `text_encoder_2.safetensors`), whose tensor names are the diffusers /
transformers names of tiengine's modules.

Loading lives on the other side of the conversion boundary: `tiengine.weights_conv.convert.load_models`
(and `load_model_weights`) accept a converted folder, a diffusers folder or a single-file checkpoint
(.safetensors / .ckpt / .pt) and return this config with the modules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tiengine.errors import CheckpointError
from tiengine.models.text_encoder import TextEncoderConfig
from tiengine.models.unet import UNetConfig
from tiengine.models.vae import VaeConfig

FORMAT_NAME = "tiengine.model"
FORMAT_VERSION = 1
FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTIONS = ("epsilon", "v")
VARIANTS = ("base", "refiner")
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
COMPONENT_NAMES = ("unet", "vae", *TEXT_ENCODER_NAMES)
# Embedding-vector key each text encoder reads, per family (the keys of tiengine.embeddings.embedding).
FAMILY_EMBEDDING_KEYS: Mapping[str, Mapping[str, str]] = MappingProxyType({
    "sd1": MappingProxyType({"text_encoder": "clip_l"}),
    "sd2": MappingProxyType({"text_encoder": "clip_h"}),
    "sdxl": MappingProxyType({"text_encoder": "clip_l", "text_encoder_2": "clip_g"}),
})
ZERO_EMPTY_NEGATIVE_FAMILIES = ("sdxl",)  # an empty negative prompt conditions on zeros (SDXL's reference code)
# The SDXL refiner's aesthetic-score time id (the reference implementation's defaults).
REFINER_AESTHETIC_SCORE = 6.0
REFINER_NEGATIVE_AESTHETIC_SCORE = 2.5


@dataclass(frozen=True)
class ScheduleConfig:
    """The discrete DDPM training schedule (diffusers scheduler_config.json names)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    def __post_init__(self) -> None:
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise CheckpointError(f"beta_schedule {self.beta_schedule!r} is not 'scaled_linear' or 'linear'")
        if not 0 < self.beta_start < self.beta_end < 1 or self.num_train_timesteps < 2:
            raise CheckpointError(
                f"noise schedule {self.num_train_timesteps} steps, betas {self.beta_start}..{self.beta_end} "
                "is not a valid DDPM schedule"
            )


@dataclass(frozen=True)
class ModelConfig:
    family: str
    prediction: str
    text_encoders: Mapping[str, TextEncoderConfig]
    unet: UNetConfig
    vae: VaeConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    variant: str = "base"
    # text encoder component -> embedding-vector key it reads; None: the family's (FAMILY_EMBEDDING_KEYS)
    embedding_keys: Mapping[str, str] | None = None
    # an empty negative prompt's context and pooled output are zeros; None: the family's rule
    zero_empty_negative: bool | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise CheckpointError(f"model family {self.family!r} is not one of {FAMILIES}")
        if self.prediction not in PREDICTIONS:
            raise CheckpointError(f"prediction type {self.prediction!r} is not one of {PREDICTIONS}")
        if self.variant not in VARIANTS:
            raise CheckpointError(f"variant {self.variant!r} is not one of {VARIANTS}")
        unknown = [name for name in self.text_encoders if name not in TEXT_ENCODER_NAMES]
        if unknown or not self.text_encoders:
            raise CheckpointError(f"text encoders {list(self.text_encoders)}: expected some of {TEXT_ENCODER_NAMES}")
        ordered = {name: self.text_encoders[name] for name in TEXT_ENCODER_NAMES if name in self.text_encoders}
        object.__setattr__(self, "text_encoders", MappingProxyType(ordered))
        context = sum(config.hidden_size for config in ordered.values())
        if context != self.unet.cross_attention_dim:
            raise CheckpointError(
                f"the text encoders' widths {[c.hidden_size for c in ordered.values()]} sum to {context}, but the "
                f"UNet's cross_attention_dim is {self.unet.cross_attention_dim}"
            )
        if self.zero_empty_negative is None:
            object.__setattr__(self, "zero_empty_negative", self.family in ZERO_EMPTY_NEGATIVE_FAMILIES)
        keys = dict(FAMILY_EMBEDDING_KEYS[self.family] if self.embedding_keys is None else self.embedding_keys)
        missing = [name for name in ordered if name not in keys]
        if missing:
            raise CheckpointError(f"embedding_keys {keys} name no embedding key for the text encoders {missing}")
        object.__setattr__(self, "embedding_keys", MappingProxyType({name: keys[name] for name in ordered}))

    @property
    def components(self) -> tuple[str, ...]:
        """Component names in load order: unet, vae, then the text encoders."""
        return ("unet", "vae", *self.text_encoders)

    # Presets --------------------------------------------------------------------------------------

    @classmethod
    def sd15(cls) -> ModelConfig:
        return cls(
            "sd1", "epsilon", {"text_encoder": TextEncoderConfig.sd1_clip_l()}, UNetConfig.sd15(), VaeConfig.sd()
        )

    @classmethod
    def sd21_v(cls) -> ModelConfig:
        """SD 2.x 768-v as a single file holds it (24 text layers, read at the penultimate)."""
        return cls(
            "sd2", "v", {"text_encoder": TextEncoderConfig.sd2_openclip_h(24)}, UNetConfig.sd21(), VaeConfig.sd()
        )

    @classmethod
    def sdxl_base(cls) -> ModelConfig:
        encoders = {
            "text_encoder": TextEncoderConfig.sdxl_clip_l(),
            "text_encoder_2": TextEncoderConfig.sdxl_openclip_bigg(),
        }
        return cls("sdxl", "epsilon", encoders, UNetConfig.sdxl_base(), VaeConfig.sdxl())

    # Serialisation --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "variant": self.variant,
            "prediction": self.prediction,
            "schedule": {
                "num_train_timesteps": self.schedule.num_train_timesteps,
                "beta_start": self.schedule.beta_start,
                "beta_end": self.schedule.beta_end,
                "beta_schedule": self.schedule.beta_schedule,
            },
            "text_encoders": {name: config.to_dict() for name, config in self.text_encoders.items()},
            "unet": self.unet.to_dict(),
            "vae": self.vae.to_dict(),
            # the derived fields are written only where they differ from the family's
            **({"embedding_keys": dict(self.embedding_keys)}
               if dict(self.embedding_keys) != self._family_embedding_keys() else {}),
            **({"zero_empty_negative": self.zero_empty_negative}
               if self.zero_empty_negative != (self.family in ZERO_EMPTY_NEGATIVE_FAMILIES) else {}),
        }

    def _family_embedding_keys(self) -> dict[str, str]:
        family = FAMILY_EMBEDDING_KEYS[self.family]
        return {name: family[name] for name in self.embedding_keys if name in family}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "model config") -> ModelConfig:
        if data.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{where}: 'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: format_version {data.get('format_version')!r} is not supported (this tiengine reads "
                f"{FORMAT_VERSION})"
            )
        known = {
            "format",
            "format_version",
            "family",
            "variant",
            "prediction",
            "schedule",
            "text_encoders",
            "unet",
            "vae",
            "embedding_keys",
            "zero_empty_negative",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{where}: unknown keys {unknown}")
        try:
            return cls(
                family=data["family"],
                prediction=data["prediction"],
                variant=data.get("variant", "base"),
                schedule=ScheduleConfig(**data.get("schedule", {})),
                text_encoders={name: TextEncoderConfig.from_dict(c) for name, c in data["text_encoders"].items()},
                unet=UNetConfig.from_dict(dict(data["unet"])),
                vae=VaeConfig.from_dict(dict(data["vae"])),
                embedding_keys=data.get("embedding_keys"),
                zero_empty_negative=data.get("zero_empty_negative"),
            )
        except KeyError as missing:
            raise CheckpointError(f"{where}: missing key {missing}") from None
        except TypeError as error:
            raise CheckpointError(f"{where}: {error}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str = "config.json") -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{where}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: expected a JSON object")
        return cls.from_dict(data, where=where)


def size_time_ids(config: ModelConfig, width: int, height: int, *, negative: bool = False) -> list[float]:
    """SDXL's size conditioning for an image of width x height: [original h, w, crop top, left, target h, w].

    Original and target size are the output size, crop (0, 0); the refiner replaces the target size by
    an aesthetic score (6.0, 2.5 for the negative prompt: the reference implementation's defaults)."""
    if config.variant == "refiner":
        score = REFINER_NEGATIVE_AESTHETIC_SCORE if negative else REFINER_AESTHETIC_SCORE
        return [float(height), float(width), 0.0, 0.0, score]
    return [float(height), float(width), 0.0, 0.0, float(height), float(width)]


def read_model_config(folder: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig of a converted folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a converted tiengine model folder)")
    return ModelConfig.from_json(path.read_text(encoding="utf-8"), where=str(path))
