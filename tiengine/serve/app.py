"""The ASGI application of `tiengine serve`: FastAPI routes over one ModelWorker, with auth, body-size caps
and errors turned into clear HTTP answers.

`create_app(config, engine)` builds it; `tiengine.serve.state.ServeState` is what every route sees (the
config, the engine, its worker). The A1111-compatible routes live in tiengine.serve.a1111 (`/sdapi/v1/...`), tiengine's own in
tiengine.serve.native (`/tiengine/v1/...`). Answers to errors:
- TiengineError raised by a request (a bad setting, an unknown sampler, a prompt over a limit): 422 with
  `{"detail": message, "error": type name}`; FastAPI's own validation errors (wrong types, malformed JSON)
  keep its 422 shape, `{"detail": [{"loc", "msg", "type"}, ...]}`, as A1111's do.
- QueueFull: 503 with Retry-After; a body over `max_request_bytes`: 413; missing or wrong credentials when
  `api_auth` is set: 401 with `WWW-Authenticate: Basic` (checked on every route, docs included).
- Anything else: 500 naming the error type; the worker and the server keep serving.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import TYPE_CHECKING

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from tiengine import __version__
from tiengine.errors import TiengineError
from tiengine.serve import a1111, native
from tiengine.serve.config import ServeConfig
from tiengine.serve.state import ServeState
from tiengine.serve.worker import ModelWorker, QueueFull, WorkerClosed

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from tiengine.engine import Engine


def create_app(config: ServeConfig, engine: Engine) -> FastAPI:
    """The service over `engine` (already loaded): routes, auth, limits; `app.state.serve` is its ServeState.
    The worker thread stops when the app shuts down."""
    worker = ModelWorker(engine, queue_size=config.limits.queue_size)
    state = ServeState(config, engine, worker)
    app = FastAPI(title="tiengine", version=__version__,
                  description="A1111-compatible Stable Diffusion API (/sdapi/v1) and tiengine's own (/tiengine/v1)",
                  on_shutdown=[worker.close])
    app.state.serve = state
    app.include_router(a1111.router(state))
    app.include_router(native.router(state))
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.limits.max_request_bytes)
    credentials = config.credentials()
    if credentials:
        app.add_middleware(BasicAuth, credentials=credentials)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, error: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(error), "error": "QueueFull"}, status_code=503,
                            headers={"Retry-After": str(error.retry_after)})

    @app.exception_handler(WorkerClosed)
    async def worker_closed(_: Request, error: WorkerClosed) -> JSONResponse:
        return JSONResponse({"detail": str(error), "error": "WorkerClosed"}, status_code=503)

    @app.exception_handler(TiengineError)
    async def bad_request(_: Request, error: TiengineError) -> JSONResponse:
        return JSONResponse({"detail": str(error), "error": type(error).__name__}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(_: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"{type(error).__name__}: {error}", "error": type(error).__name__},
                            status_code=500)


class BasicAuth:
    """HTTP basic auth on every request (A1111's --api-auth); constant-time comparison of the password."""

    def __init__(self, app: ASGIApp, credentials: dict[str, str]) -> None:
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._allowed(dict(scope["headers"]).get(b"authorization", b"")):
            await self.app(scope, receive, send)
            return
        response = JSONResponse({"detail": "missing or wrong credentials (HTTP basic auth, user:pass)"},
                                status_code=401, headers={"WWW-Authenticate": 'Basic realm="tiengine"'})
        await response(scope, receive, send)

    def _allowed(self, header: bytes) -> bool:
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, colon, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = self.credentials.get(user)
        return bool(colon) and expected is not None and secrets.compare_digest(password.encode(), expected.encode())


class BodyLimit:
    """413 for a request body over `max_bytes`: by its Content-Length before reading, or while it streams."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = BodyTooLarge(self.max_bytes)
        await JSONResponse({"detail": error.detail}, status_code=error.status_code)(scope, receive, send)


class BodyTooLarge(HTTPException):
    """A request body over the service's cap (413); raised while the body streams in, which FastAPI passes on
    as the HTTP error it is."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body over the service's limit of {max_bytes} bytes "
                              "(tiengine serve --max-request-mb)")
