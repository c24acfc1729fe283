"""A bounded load test of `tiengine serve` on the loopback address: many clients, a small queue, real sockets.

8 client threads send 200 requests in all (txt2img on the built-in model at 2 steps, and tokenize) to a
uvicorn server in this process whose queue holds 2 jobs, so some requests are answered 503 with Retry-After
and sent again. Checked: every request gets exactly one final answer, and it is its own (each prompt carries
the request's number, which comes back in the image's infotext / the tokenize report); the engine ran exactly
one generation per answered txt2img (no job lost or run twice); resident memory after the run is within a
bound of what it was after a warm-up; a client that disconnects mid-job and an interrupt mid-job leave the
server serving. Time bounds here are hang guards (a request that never completes), not speed assertions.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from PIL import Image

import tiengine
from tiengine.serve.app import create_app
from tiengine.serve.config import ServeConfig, ServeLimits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIENTS = 8
REQUESTS = 200
QUEUE_SIZE = 2
REQUEST_TIMEOUT_S = 120  # hang guard per request
RSS_GROWTH_BOUND = 64 * 2**20  # bytes: a leak of one image or tensor per request would pass this within the run


def resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * 4096


class CountingEngine:
    """Wraps the engine's generate so the test can count the generations the worker really ran."""

    def __init__(self, engine: tiengine.Engine) -> None:
        self.prompts: Counter[str] = Counter()
        original = engine.generate

        def counted(prompt: str, *args, **kwargs):
            self.prompts[prompt] += 1
            return original(prompt, *args, **kwargs)

        engine.generate = counted


@pytest.fixture(scope="module")
def server():
    engine = tiengine.Engine.load(None, embeddings=False)
    counter = CountingEngine(engine)
    app = create_app(ServeConfig(limits=ServeLimits(queue_size=QUEUE_SIZE)), engine)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", counter, app
    uv.should_exit = True
    thread.join(30)


def txt2img_body(number: int, steps: int = 2) -> dict:
    return {"prompt": f"a red circle, request{number}", "steps": steps, "width": 64, "height": 64,
            "seed": number, "sampler_name": "Euler", "cfg_scale": 3}


def send(client: httpx.Client, base: str, number: int) -> tuple[int, str, int]:
    """(request number, what answered it, 503s seen): txt2img for even numbers, tokenize for odd ones."""
    busy = 0
    while True:
        if number % 2 == 0:
            response = client.post(f"{base}/sdapi/v1/txt2img", json=txt2img_body(number))
        else:
            response = client.post(f"{base}/tiengine/v1/tokenize", json={"prompt": f"a cat, request{number}"})
        if response.status_code == 503:
            busy += 1
            assert int(response.headers["Retry-After"]) >= 1
            time.sleep(0.05)  # the test's clients retry sooner than Retry-After to keep the queue full
            continue
        assert response.status_code == 200, response.text
        body = response.json()
        if number % 2 == 0:
            infotexts = json.loads(body["info"])["infotexts"]
            assert len(body["images"]) == 1 and len(infotexts) == 1
            image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
            return number, image.text["parameters"].splitlines()[0], busy
        return number, body["prompt"], busy


def test_many_clients_each_request_answered_once(server):
    base, counter, _ = server
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        send(client, base, 0)  # warm-up: first-call allocations are not a leak
    counter.prompts.clear()
    before = resident_bytes()
    with ThreadPoolExecutor(CLIENTS) as pool, httpx.Client(timeout=REQUEST_TIMEOUT_S,
                                                           limits=httpx.Limits(max_connections=CLIENTS)) as client:
        answers = list(pool.map(lambda number: send(client, base, number), range(REQUESTS)))
    after = resident_bytes()
    assert [number for number, _, _ in answers] == list(range(REQUESTS))
    for number, echoed, _ in answers:
        assert echoed.endswith(f"request{number}"), (number, echoed)
    generated = {f"a red circle, request{number}": 1 for number in range(0, REQUESTS, 2)}
    assert dict(counter.prompts) == generated  # each accepted txt2img ran once; refused ones never ran
    assert sum(busy for _, _, busy in answers) > 0, "the queue never filled: the 503 path was not exercised"
    assert after - before < RSS_GROWTH_BOUND, f"resident memory grew by {(after - before) / 2**20:.1f} MiB"


def test_disconnect_and_interrupt_mid_job_leave_the_server_serving(server):
    base, _, app = server
    worker = app.state.serve.worker
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps(txt2img_body(9000, steps=150)).encode()
    with socket.create_connection((host, int(port))) as raw:  # a client that goes away mid-job
        raw.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while worker.current() is None:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.01)
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        assert client.post(f"{base}/sdapi/v1/interrupt").status_code == 200  # ends the orphaned job early
        assert send(client, base, 9002)[1].endswith("request9002")
        interrupted = {}

        def long_job() -> None:
            interrupted["response"] = client.post(f"{base}/sdapi/v1/txt2img", json=txt2img_body(9004, steps=150))

        runner = threading.Thread(target=long_job)
        runner.start()
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while worker.current() is None or worker.current().progress().step < 1:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.01)
        assert client.post(f"{base}/sdapi/v1/interrupt").status_code == 200
        runner.join(REQUEST_TIMEOUT_S)
        response = interrupted["response"]
        assert response.status_code == 200 and len(response.json()["images"]) == 1  # the image so far
        assert client.get(f"{base}/sdapi/v1/progress").status_code == 200
        assert send(client, base, 9006)[1].endswith("request9006")
