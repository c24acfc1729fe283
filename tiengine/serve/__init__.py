"""`tiengine serve`: an HTTP service that A1111 clients drive unchanged, plus tiengine's own endpoints.

Needs the `serve` extra (`pip install -e ".[serve]"`: FastAPI, uvicorn, pydantic). config: ServeConfig and
ServeLimits; worker: the model worker thread and its bounded FIFO queue; app: the ASGI application (auth,
body caps, error answers); a1111: `/sdapi/v1/...`; native: `/tiengine/v1/...` (its bodies in native_models,
training jobs in training_jobs); run: loading the model and starting uvicorn. Importing `tiengine` never imports this package.
"""
