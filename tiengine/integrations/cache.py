"""EngineCache: engines and embedding libraries kept for repeated calls in one process.

Programs that call tiengine again and again (a ComfyUI node on every queue run, a script that builds pipeline
keyword arguments per prompt) should not reload a model each time. An `EngineCache` keeps up to `max_engines`
engines keyed by (resolved model path, device, dtype, resolved embeddings folder), least recently used first
out. An entry is reused only while the model's files are unchanged: each call compares the files' signature
(every file under the path, with its size and modification time in ns) and loads again when it differs. A
cached engine's embeddings folder is re-scanned on reuse (changed files only, EmbeddingLibrary.reload), as A1111
re-scans its folder before each generation. `library(folder)` does the same for embedding libraries alone.

`PROCESS_CACHE` is the one instance the integrations share (the ComfyUI node, PipelineEncoder.from_model); code
that wants its own lifetime builds an EngineCache.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from tiengine.embeddings.library import EmbeddingLibrary
from tiengine.engine import Engine
from tiengine.errors import EngineError

# (relative path, size in bytes, modification time in ns) of every file of a model path
FilesSignature = tuple[tuple[str, int, int], ...]
EngineKey = tuple[str, str, torch.dtype, str | None]


class EngineCache:
    """Engines by model path (see the module docstring); `loads` counts the models loaded so far."""

    def __init__(self, max_engines: int = 2, *, load: Callable[..., Engine] = Engine.load) -> None:
        if max_engines < 1:
            raise EngineError(f"EngineCache keeps at least one engine, got max_engines={max_engines}")
        self.max_engines = max_engines
        self.loads = 0
        self._load = load
        self._engines: OrderedDict[EngineKey, tuple[FilesSignature, Engine]] = OrderedDict()
        self._libraries: dict[Path, EmbeddingLibrary] = {}
        self._lock = threading.Lock()

    def engine(
        self,
        model_path: str | os.PathLike[str],
        *,
        embeddings: str | os.PathLike[str] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Engine:
        """The engine of `model_path` (a converted, diffusers or single-file model; Engine.load), loaded on the
        first call and again only when its files change. `embeddings`: a folder, or None for none (the
        environment's TIENGINE_EMBEDDINGS is not read here: a cache key names everything the engine holds)."""
        path = Path(model_path).resolve()
        folder = None if embeddings is None else Path(embeddings).resolve()
        key = (str(path), str(torch.device(device)), dtype, None if folder is None else str(folder))
        signature = files_signature(path)
        with self._lock:
            cached = self._engines.get(key)
            if cached is not None and cached[0] == signature:
                self._engines.move_to_end(key)
                cached[1].reload_embeddings()
                return cached[1]
            engine = self._load(path, embeddings=folder if folder is not None else False, device=device, dtype=dtype)
            self.loads += 1
            self._engines[key] = (signature, engine)
            self._engines.move_to_end(key)
            while len(self._engines) > self.max_engines:
                self._engines.popitem(last=False)
            return engine

    def library(self, folder: str | os.PathLike[str]) -> EmbeddingLibrary:
        """The embedding library of `folder`, read once and re-scanned (changed files only) on each call."""
        path = Path(folder).resolve()
        with self._lock:
            library = self._libraries.get(path)
            if library is None:
                library = self._libraries[path] = EmbeddingLibrary(path)
            else:
                library.reload()
            return library

    def clear(self) -> None:
        """Forget every engine and library (the next calls load again)."""
        with self._lock:
            self._engines.clear()
            self._libraries.clear()


def files_signature(path: Path) -> FilesSignature:
    """(relative name, size, mtime in ns) of `path` (a file) or of every file under it (a folder), sorted; empty
    when nothing is there."""
    if path.is_file():
        stat = path.stat()
        return ((path.name, stat.st_size, stat.st_mtime_ns),)
    if not path.is_dir():
        return ()
    entries = []
    for file in sorted(item for item in path.rglob("*") if item.is_file()):
        stat = file.stat()
        entries.append((file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


PROCESS_CACHE = EngineCache()
