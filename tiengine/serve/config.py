"""What `tiengine serve` is started with: the model and folders, where it listens, and its request limits.

`ServeConfig` holds the start-up choices (`tiengine serve --model ... --host ... --api-auth user:pass`) and
`ServeLimits` the caps every request is checked against (A1111 has no such caps; a service reachable by others
needs them). Both are frozen and validated once. The default host is the loopback address; any other host
needs `api_auth` (HTTP basic, A1111's `--api-auth user:pass[,user2:pass2]`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from tiengine.errors import TiengineError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # A1111's port


class ServeError(TiengineError):
    """A start-up choice of the service that cannot be used (a public host without auth, a bad credential)."""


class RequestRefused(TiengineError):
    """A request the service will not run: over one of its caps, with a field it cannot honour or content it
    cannot use (answered 422; the message names the field or cap, the value and why)."""


@dataclass(frozen=True)
class ServeLimits:
    """Caps on what one request may ask for; a request over a cap is answered 422 (413 for the body size)
    naming the cap and the option that raises it."""

    max_request_bytes: int = 64 * 2**20  # a request body (base64 init images included)
    max_pixels: int = 2048 * 2048  # width x height of one image, hires fix target included
    max_steps: int = 150  # A1111's UI slider maximum
    max_batch_size: int = 8  # images per sampling run
    max_n_iter: int = 16  # sampling runs per request
    max_prompt_chars: int = 32_768  # each of prompt and negative prompt
    queue_size: int = 16  # jobs waiting for the model; one more is answered 503 with Retry-After
    max_training_images: int = 64  # images of one textual-inversion training job
    max_training_steps: int = 10_000  # optimizer steps of one training job
    max_training_results: int = 8  # finished training jobs whose files are kept; the oldest is dropped first

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_pixels", "max_steps", "max_batch_size", "max_n_iter",
                     "max_prompt_chars", "queue_size", "max_training_images", "max_training_steps",
                     "max_training_results"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServeError(f"serve limit {name}: expected an integer >= 1, found {value!r}")


@dataclass(frozen=True)
class ServeConfig:
    """The service's model, folders and address. `model` None: the built-in default model (with its
    LoRA folder unless `loras` is given). `api_auth`: "user:pass[,user2:pass2]" (None: no auth, which is
    allowed on loopback hosts only)."""

    model: Path | None = None
    embeddings: Path | None = None
    loras: Path | None = None
    hypernetworks: Path | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_auth: str | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ServeError(f"port: expected an integer in [0, 65535], found {self.port!r}")
        self.credentials()  # validates the format
        if self.api_auth is None and not is_loopback(self.host):
            raise ServeError(f"host {self.host!r} is reachable from other machines: give --api-auth user:pass "
                             "(HTTP basic auth, as A1111's flag), or serve on 127.0.0.1")

    def credentials(self) -> dict[str, str]:
        """user -> password from `api_auth` ({} without auth)."""
        if self.api_auth is None:
            return {}
        pairs = {}
        for entry in self.api_auth.split(","):
            user, colon, password = entry.strip().partition(":")
            if not colon or not user or not password:
                raise ServeError(f"--api-auth: expected user:pass[,user2:pass2], found an entry {entry.strip()!r}")
            pairs[user] = password
        return pairs


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only ("localhost", 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to anything
        return False
