"""tiengine: Stable Diffusion prompt encoding, textual-inversion embeddings and generation.

Public names are resolved lazily (PEP 562) so that `import tiengine` reads no file, imports
no torch, triton, transformers or diffusers, and touches no GPU.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # the engine and its inputs
    "ClipTokenizer": "tiengine.text.tokenizer",
    "Embedding": "tiengine.embeddings.embedding",
    "EmbeddingLibrary": "tiengine.embeddings.library",
    "load_embedding": "tiengine.embeddings.embedding",
    "save_embedding": "tiengine.embeddings.embedding",
    "Engine": "tiengine.engine",
    "NetworkLibrary": "tiengine.networks.library",
    # settings
    "GenerateSettings": "tiengine.settings",
    "EncodeOptions": "tiengine.text.conditioning",
    "TrainEmbeddingSettings": "tiengine.training.textual_inversion",
    "PromptLimits": "tiengine.text.prompt",
    # results
    "Conditioning": "tiengine.results",
    "ScheduledConditioning": "tiengine.results",
    "GenerationResult": "tiengine.results",
    "AppliedEmbedding": "tiengine.results",
    "NetworkReport": "tiengine.networks.active",
    "TrainResult": "tiengine.training.textual_inversion",
    # errors: every one is a TiengineError
    "TiengineError": "tiengine.errors",
    "UnsafePickleError": "tiengine.errors",
    "EmbeddingError": "tiengine.errors",
    "CheckpointError": "tiengine.errors",
    "EngineError": "tiengine.errors",
    "NonFiniteError": "tiengine.errors",
    "NetworkError": "tiengine.errors",
    "TokenizerError": "tiengine.text.tokenizer",
    "PromptError": "tiengine.text.prompt",
    "ConditioningError": "tiengine.text.conditioning",
    "SamplingError": "tiengine.diffusion.schedules",
    "TrainingError": "tiengine.training.data",
    "TokenIdError": "tiengine.models.text_encoder",
    "MetadataError": "tiengine.io.metadata",
    "FileExistsRefusal": "tiengine.io.atomic",
    "WriteError": "tiengine.io.atomic",
    "LockHeldError": "tiengine.io.lock",
    "TrainingInterrupted": "tiengine.training.textual_inversion",
    "KernelInputError": "tiengine.kernels.common",
    "DemoError": "tiengine.toyworld.demo",
    "IntegrationError": "tiengine.integrations.shared_encoders",
    "ServeError": "tiengine.serve.config",
    "BatchJobError": "tiengine.batch.jobs",
    "BatchRayError": "tiengine.batch.ray_executor",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from tiengine.batch.jobs import BatchJobError
    from tiengine.batch.ray_executor import BatchRayError
    from tiengine.diffusion.schedules import SamplingError
    from tiengine.embeddings.embedding import Embedding, load_embedding, save_embedding
    from tiengine.embeddings.library import EmbeddingLibrary
    from tiengine.engine import Engine
    from tiengine.errors import (
        CheckpointError,
        EmbeddingError,
        EngineError,
        NetworkError,
        NonFiniteError,
        TiengineError,
        UnsafePickleError,
    )
    from tiengine.integrations.shared_encoders import IntegrationError
    from tiengine.io.atomic import FileExistsRefusal, WriteError
    from tiengine.io.lock import LockHeldError
    from tiengine.io.metadata import MetadataError
    from tiengine.kernels.common import KernelInputError
    from tiengine.models.text_encoder import TokenIdError
    from tiengine.networks.active import NetworkReport
    from tiengine.networks.library import NetworkLibrary
    from tiengine.results import AppliedEmbedding, Conditioning, GenerationResult, ScheduledConditioning
    from tiengine.serve.config import ServeError
    from tiengine.settings import GenerateSettings
    from tiengine.text.conditioning import ConditioningError, EncodeOptions
    from tiengine.text.prompt import PromptError, PromptLimits
    from tiengine.text.tokenizer import ClipTokenizer, TokenizerError
    from tiengine.toyworld.demo import DemoError
    from tiengine.training.data import TrainingError
    from tiengine.training.textual_inversion import TrainEmbeddingSettings, TrainingInterrupted, TrainResult


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'tiengine' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
