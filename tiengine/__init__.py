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
    "ClipTokenizer": "tiengine.text.tokenizer",
    "Embedding": "tiengine.embeddings.embedding",
    "TiengineError": "tiengine.errors",
    "EmbeddingError": "tiengine.errors",
    "EmbeddingLibrary": "tiengine.embeddings.library",
    "load_embedding": "tiengine.embeddings.embedding",
    "save_embedding": "tiengine.embeddings.embedding",
    "Engine": "tiengine.engine",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from tiengine.embeddings.embedding import Embedding, load_embedding, save_embedding
    from tiengine.embeddings.library import EmbeddingLibrary
    from tiengine.engine import Engine
    from tiengine.errors import EmbeddingError, TiengineError
    from tiengine.text.tokenizer import ClipTokenizer


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'tiengine' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
