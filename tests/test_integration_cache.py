"""tiengine.integrations.cache.EngineCache: one load per model path until its files change.

Loads are counted by the cache (`loads`) and, independently, by a wrapper around Engine.load.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from embedding_builders import vectors

from tiengine.embeddings.embedding import Embedding, save_embedding
from tiengine.engine import Engine
from tiengine.errors import EngineError
from tiengine.integrations.cache import EngineCache, files_signature

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def counted():
    calls = []

    def load(path, **fields):
        calls.append((path, fields))
        return Engine.load(path, **fields)

    return calls, load


def test_same_path_is_loaded_once(sd1_folder, counted):
    calls, load = counted
    cache = EngineCache(load=load)
    first = cache.engine(sd1_folder)
    assert cache.engine(sd1_folder) is first and cache.engine(str(sd1_folder) + "/.") is first  # resolved path
    assert cache.loads == len(calls) == 1
    assert calls[0][1] == {"embeddings": False, "device": "cpu", "dtype": torch.float32}
    cache.engine(sd1_folder, dtype=torch.bfloat16)  # another dtype is another engine
    assert cache.loads == len(calls) == 2


def test_a_changed_file_or_another_path_loads_again(sd1_folder, tmp_path, counted):
    calls, load = counted
    folder = shutil.copytree(sd1_folder, tmp_path / "model")
    cache = EngineCache(load=load)
    first = cache.engine(folder)
    weights = folder / "unet.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten one second later
    second = cache.engine(folder)
    assert second is not first and cache.loads == len(calls) == 2
    assert cache.engine(folder) is second and cache.loads == 2
    other = shutil.copytree(sd1_folder, tmp_path / "other")
    assert cache.engine(other) is not second and cache.loads == len(calls) == 3


def test_least_recently_used_engine_leaves_first(sd1_folder, tmp_path, counted):
    calls, load = counted
    paths = [shutil.copytree(sd1_folder, tmp_path / name) for name in ("a", "b")]
    cache = EngineCache(max_engines=1, load=load)
    cache.engine(paths[0])
    cache.engine(paths[1])
    cache.engine(paths[0])  # evicted by b: loaded again
    assert cache.loads == len(calls) == 3
    with pytest.raises(EngineError, match="at least one engine"):
        EngineCache(max_engines=0)


def test_embeddings_folder_is_part_of_the_key_and_rescanned(sd1_folder, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    cache = EngineCache()
    engine = cache.engine(sd1_folder, embeddings=folder)
    assert cache.engine(sd1_folder) is not engine and cache.loads == 2  # no folder: another engine
    save_embedding(Embedding("rick", {"clip_l": vectors(2, 48, seed=1)}), folder / "rick.safetensors")
    assert cache.engine(sd1_folder, embeddings=folder) is engine and cache.loads == 2
    assert [applied.name for applied in engine.encode("a rick").applied] == ["rick"]  # re-scanned on reuse
    library = cache.library(folder)
    assert cache.library(folder) is library and "rick" in engine.vocabulary.embeddings
    cache.clear()
    assert cache.engine(sd1_folder, embeddings=folder) is not engine


def test_files_signature_names_size_and_time(sd1_folder, tmp_path):
    signature = files_signature(sd1_folder)
    assert {name for name, _, _ in signature} == {path.name for path in sd1_folder.iterdir()}
    single = sd1_folder / "config.json"
    assert files_signature(single) == ((single.name, single.stat().st_size, single.stat().st_mtime_ns),)
    assert files_signature(tmp_path / "missing") == ()


def test_import_tiengine_and_its_engine_leave_the_integrations_out():
    probe = "import sys, tiengine, tiengine.engine; print(sorted(m for m in sys.modules if 'integrations' in m))"
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent)
    assert output.stdout.strip().splitlines()[-1] == "[]"
