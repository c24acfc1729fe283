"""Exception types shared by every stage.

Every error a user can cause (a bad file, a bad prompt option, a model that does not fit)
derives from TiengineError, so callers and the CLI can catch one type. Messages name the
file, the key, what was expected and what was found.
"""

from __future__ import annotations


class TiengineError(Exception):
    """Base class of all user-facing tiengine errors."""


class UnsafePickleError(TiengineError):
    """A pickled file asked for a Python global outside the allowed tensor/container set."""


class EmbeddingError(TiengineError):
    """An embedding file is unreadable, malformed, or does not fit the model."""


class CheckpointError(TiengineError):
    """A model checkpoint or folder is unreadable, malformed, or of an unknown layout."""


class EngineError(TiengineError):
    """Bad generation settings, or a request the loaded model cannot serve."""


class NonFiniteError(EngineError):
    """Sampling or decoding produced NaN or inf values (A1111: "A tensor with all NaNs was produced");
    the message names the stage (UNet or VAE) and what to try instead."""


class NetworkError(TiengineError):
    """An extra-network file (LoRA, LyCORIS, hypernetwork) is unreadable, malformed, or does not fit the
    model; or an extra-network tag in a prompt has arguments that cannot be read."""


class TiengineWarning(UserWarning):
    """Base class of tiengine's warnings: something will work, but not as the user likely expects (the CLI
    prints them as one line)."""
