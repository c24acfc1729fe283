"""Shared fixtures: the optional folder of real-world files, deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


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
