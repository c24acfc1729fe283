"""Embedding files built the way their original tools write them (torch.save of the exact
dicts, safetensors of the exact keys), for the reader tests. Vectors are seeded random."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def vectors(n: int, width: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, width, generator=generator) * 0.02).to(dtype)


def a1111_pt(path: Path, tensor: torch.Tensor, *, name: str = "stored", step: int | None = 500,
             sd_checkpoint: str | None = "a9263745", sd_checkpoint_name: str | None = "sd-1.5",
             legacy: bool = False) -> Path:
    """modules/textual_inversion/textual_inversion.py Embedding.save: this dict, torch.save."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": tensor}, "name": name,
            "step": step, "sd_checkpoint": sd_checkpoint, "sd_checkpoint_name": sd_checkpoint_name}
    torch.save(data, path, _use_new_zipfile_serialization=not legacy)
    return path


def ti_parameterdict_pt(path: Path, tensor: torch.Tensor) -> Path:
    """Original textual_inversion repo (EmbeddingManager.save): a real nn.ParameterDict."""
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(tensor.clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, path)
    return path


def one_key_pickle(path: Path, token: str, tensor: torch.Tensor) -> Path:
    """diffusers textual_inversion.py (older): {placeholder_token: learned_embeds}."""
    torch.save({token: tensor}, path)
    return path


def safetensors_file(path: Path, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path
