"""Shared fixtures: the optional folder of real-world files, deterministic seeds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from model_builders import tiny_model_folder

REPO_ROOT = Path(__file__).resolve().parent.parent

# `python -m pytest` puts the working directory first on sys.path. The checkout's top-level `kernels/`
# folder (installed as `tiengine.kernels`) would then shadow the PyPI package `kernels` that transformers
# probes for at import time. tiengine itself is imported from the installation, not from the checkout root.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != REPO_ROOT]


def _wild_dir() -> Path:
    """Real files from public repositories (embeddings, tokenizers, prompts), when present.

    Looked for at $TIENGINE_WILD, else ../shared/wild beside the checkout.
    """
    override = os.environ.get("TIENGINE_WILD")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "wild"


@pytest.fixture(scope="session")
def wild_dir() -> Path:
    path = _wild_dir()
    if not path.is_dir():
        pytest.skip(f"real-world files not present at {path} (set TIENGINE_WILD to use them)")
    return path


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory) -> Path:
    """A converted tiny SD1 model folder (tests.model_builders.tiny_model_folder), shared read-only: tests
    that change a model copy it first."""
    return tiny_model_folder(tmp_path_factory.mktemp("sd1") / "model", "sd1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests: on a shared CPU a second, waiting thread spins and
    makes these runs about 10x slower. Used with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
