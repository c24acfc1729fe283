"""Starting `tiengine serve`: load the model (a progress bar on stderr), build the app, run it with uvicorn.

`serve(config)` blocks until the server stops (Ctrl+C). uvicorn is the ASGI server FastAPI documents; one
process, one event loop, and the model worker thread (tiengine.serve.worker) behind it.
"""

from __future__ import annotations

import sys

import torch
import uvicorn
from tqdm import tqdm

from tiengine.engine import Engine
from tiengine.serve.app import create_app
from tiengine.serve.config import ServeConfig, ServeError
from tiengine.threads import apply_cpu_threads

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_engine(config: ServeConfig, *, show_progress: bool = True) -> Engine:
    """The Engine of `config` (model, folders, device, dtype), with a "loading model" bar on stderr."""
    if config.dtype not in DTYPES:
        raise ServeError(f"dtype: expected one of {', '.join(DTYPES)}, found {config.dtype!r}")
    with tqdm(desc="loading model", unit="part", file=sys.stderr, disable=not show_progress) as bar:
        def advance(component: str, loaded: int, total: int) -> None:
            bar.total = total
            bar.set_postfix_str(component, refresh=False)
            bar.update(loaded - bar.n)

        return Engine.load(config.model, embeddings=config.embeddings if config.embeddings is not None else False,
                           device=config.device, dtype=DTYPES[config.dtype], progress=advance, loras=config.loras,
                           hypernetworks=config.hypernetworks)


def serve(config: ServeConfig, *, log_level: str = "info", threads: int | None = None) -> None:
    """Load the model and serve it on config.host:config.port until stopped. torch's CPU threads are then set
    as the command line sets them (tiengine.threads.apply_cpu_threads: `threads`, else the environment's,
    else the policy's choice for the model at its native size)."""
    engine = load_engine(config)
    apply_cpu_threads(threads, engine.config)
    app = create_app(config, engine)
    print(f"tiengine serve: http://{config.host}:{config.port}/sdapi/v1 (A1111 API), /tiengine/v1, /docs",
          file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level)
