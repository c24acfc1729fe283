"""The one place that names tiengine's default model: the packaged toy-world model folder.

`tiengine/data/default_model/` is a converted model folder (config.json + unet / vae / text_encoder
.safetensors, see tiengine.models.config) written by `python -m tiengine.toyworld.train_base`; its MODEL_CARD.md
says how it was made and how well it follows prompts. Every command uses it when no model is given.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tiengine.errors import CheckpointError

DEFAULT_MODEL_PACKAGE = "tiengine"
DEFAULT_MODEL_FOLDER = ("data", "default_model")
DEFAULT_MODEL_FILES = ("config.json", "unet.safetensors", "vae.safetensors", "text_encoder.safetensors")
# classifier-free guidance scale the default model is scored and run at: a model this small follows its
# prompts best at low guidance (MODEL_CARD.md gives its adherence per scale)
DEFAULT_MODEL_CFG_SCALE = 3.0
A1111_CFG_SCALE = 7.0  # the guidance scale for every other model (A1111's default)
DEFAULT_MODEL_LORAS = "loras"  # LoRA files trained on the default model (tiengine.toyworld.train_lora)
DEFAULT_MODEL_SEED = 1  # `python -m tiengine.toyworld.train_base --seed` that made the packaged weights


def default_model_path() -> Path:
    """Path of the packaged default model folder; a CheckpointError naming what is missing if incomplete."""
    folder = resources.files(DEFAULT_MODEL_PACKAGE).joinpath(*DEFAULT_MODEL_FOLDER)
    path = Path(str(folder))
    missing = [name for name in DEFAULT_MODEL_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{path}: the packaged default model is incomplete (missing {', '.join(missing)}); reinstall tiengine "
            f"or rebuild it with `python -m tiengine.toyworld.train_base --out <that folder> --seed {DEFAULT_MODEL_SEED}`"
        )
    return path


def default_model_loras_path() -> Path | None:
    """The LoRA files made for the default model (`loras/` beside it: `<lora:striped:1>`), if packaged."""
    folder = default_model_path() / DEFAULT_MODEL_LORAS
    return folder if folder.is_dir() else None


def default_model_card_path() -> Path:
    """Path of the default model's MODEL_CARD.md."""
    return default_model_path() / "MODEL_CARD.md"
