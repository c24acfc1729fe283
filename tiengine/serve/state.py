"""ServeState: what every route of `tiengine serve` shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tiengine.engine import Engine
    from tiengine.serve.config import ServeConfig
    from tiengine.serve.worker import ModelWorker


@dataclass
class ServeState:
    """The start-up config, the engine (used on the worker thread only, except for read-only listings) and
    the worker that runs every job using it."""

    config: ServeConfig
    engine: Engine
    worker: ModelWorker
