"""The service's overhead: requests per second of `tokenize` / `encode` over HTTP against the same work in
process, and the latency `txt2img` adds over the in-process API, on the built-in default model.

The server is `tiengine serve` in its own process on 127.0.0.1 (as users run it), with --threads T and a
queue large enough that nothing is refused; the client is httpx in this process. The peer is the same
work through the Python API in this process, with the same thread count:
- tokenize: `tiengine.reports.tokenize_report` (what the route runs on the worker);
- encode: `Engine.encode` + `conditioning_metadata` + `conditioning_file` (the route's bytes answer,
  `Accept: application/octet-stream`);
- txt2img: `Engine.generate` + `png_bytes` (the image bytes the route base64-encodes), 20 steps of Euler a
  at the model's 64x64, one image, the same seed.
Every tokenize / encode request has its own prompt (more distinct prompts than the engine's conditioning
cache holds), so neither side measures cache hits. HTTP rows are sequential (1 client) and concurrent
(--clients clients, which the single model worker serves in order). The outputs are compared: the HTTP
answers equal the in-process results byte for byte (tokenize: the JSON object).

    python benchmarks/serve.py [--threads 1] [--requests 200] [--clients 4] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

import tiengine
from tiengine.io.atomic import atomic_write_bytes
from tiengine.io.metadata import png_bytes
from tiengine.reports import (
    conditioning_file,
    conditioning_metadata,
    conditioning_tensors,
    tokenize_report,
)
from tiengine.text.conditioning import EncodeOptions

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
TXT2IMG = {"steps": 20, "sampler_name": "Euler a", "seed": 1234, "width": 64, "height": 64, "cfg_scale": 3.0}


def processor_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    return models[0] if models else platform.processor() or platform.machine()


def prompts(count: int) -> list[str]:
    """`count` distinct prompts of the toy world's vocabulary."""
    return [f"{index % 5 + 1} {COLOURS[index % 8]} {SHAPES[index // 8 % 6]}s, (bright:1.{index % 9}), photo {index}"
            for index in range(count)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(threads: int, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "tiengine", "serve", "--port", str(port), "--threads", str(threads),
               "--queue-size", "1024", "--device", "cpu"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"tiengine serve exited with {server.returncode}: {server.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/sd-models", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("tiengine serve did not answer within 120 s")


def rate(seconds: float, count: int) -> float:
    return count / seconds


def timed(call, items: list) -> float:
    started = time.perf_counter()
    for item in items:
        call(item)
    return time.perf_counter() - started


def concurrent_timed(call, items: list, clients: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(call, items))
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and the peer")
    parser.add_argument("--requests", type=int, default=200, help="tokenize / encode requests per row")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients of the concurrent rows")
    parser.add_argument("--repeat", type=int, default=5, help="txt2img runs per side (median)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    engine = tiengine.Engine.load(None, embeddings=False)
    options = EncodeOptions()
    port = free_port()
    server = start_server(args.threads, port)
    base = f"http://127.0.0.1:{port}"
    rows: list[dict] = []
    try:
        with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=args.clients)) as client:
            def tokenize_local(prompt: str) -> dict:
                return tokenize_report(prompt, engine.tokenizer, engine.vocabulary, family=engine.config.family,
                                       options=options, limits=engine.prompt_limits)

            def tokenize_http(prompt: str) -> dict:
                response = client.post(f"{base}/tiengine/v1/tokenize", json={"prompt": prompt})
                response.raise_for_status()
                return response.json()

            def encode_local(prompt: str) -> bytes:
                conditioning = engine.encode(prompt, "", steps=20, options=options, dtype=engine.dtype)
                metadata = conditioning_metadata(engine, conditioning, prompt, "", steps=20, second_order=False,
                                                 options=options)
                return conditioning_file(conditioning_tensors(conditioning), metadata)

            def encode_http(prompt: str) -> bytes:
                response = client.post(f"{base}/tiengine/v1/encode", json={"prompt": prompt},
                                       headers={"Accept": "application/octet-stream"})
                response.raise_for_status()
                return response.content

            texts = prompts(args.requests)
            for name, local, remote in (("tokenize", tokenize_local, tokenize_http),
                                        ("encode", encode_local, encode_http)):
                for probe in texts[:3]:  # warm-up, and the outputs compared
                    if local(probe) != remote(probe):
                        raise SystemExit(f"{name}: the HTTP answer differs from the in-process result for {probe!r}")
                fresh = prompts(args.requests * 3)[args.requests:]  # never seen by either side's cache
                in_process = rate(timed(local, fresh[: args.requests]), args.requests)
                sequential = rate(timed(remote, fresh[args.requests:]), args.requests)
                parallel = rate(concurrent_timed(remote, texts, args.clients), args.requests)
                rows.append({"operation": name, "in_process_per_s": in_process, "http_1_client_per_s": sequential,
                             f"http_{args.clients}_clients_per_s": parallel,
                             "http_1_client_over_in_process": sequential / in_process})

            def txt2img_local() -> bytes:
                result = engine.generate("a red circle", settings=None, steps=20, sampler="Euler a", seed=1234,
                                         width=64, height=64, cfg_scale=3.0)
                return png_bytes(result.images[0], result.parameters[0])

            def txt2img_http() -> bytes:
                response = client.post(f"{base}/sdapi/v1/txt2img", json={"prompt": "a red circle", **TXT2IMG})
                response.raise_for_status()
                return base64.b64decode(response.json()["images"][0])

            if txt2img_local() != txt2img_http():
                raise SystemExit("txt2img: the HTTP image differs from the in-process image")
            local_times, http_times = [], []
            for _ in range(args.repeat):  # interleaved, so slow phases of a shared machine hit both sides
                local_times.append(timed(lambda _: txt2img_local(), [None]))
                http_times.append(timed(lambda _: txt2img_http(), [None]))
            local_median, http_median = statistics.median(local_times), statistics.median(http_times)
            rows.append({"operation": "txt2img", "in_process_s": local_median, "http_s": http_median,
                         "added_ms": (http_median - local_median) * 1000, "http_over_in_process": http_median / local_median})
    finally:
        server.terminate()
        server.wait(30)

    load = os.getloadavg()[0]
    print(f"# tiengine serve overhead | {processor_name()} | {os.cpu_count()} cores | load {load:.2f} | "
          f"torch {torch.__version__} | threads {args.threads} | httpx {httpx.__version__}")
    print(f"| operation | in process /s | HTTP, 1 client /s | HTTP, {args.clients} clients /s | HTTP 1 client / in process |")
    print("|---|---|---|---|---|")
    for row in rows[:2]:
        print(f"| {row['operation']} | {row['in_process_per_s']:.0f} | {row['http_1_client_per_s']:.0f} | "
              f"{row[f'http_{args.clients}_clients_per_s']:.0f} | {row['http_1_client_over_in_process']:.2f}x |")
    txt2img = rows[2]
    print(f"\n| txt2img, 20 steps, 64x64 | in process {txt2img['in_process_s'] * 1000:.0f} ms | HTTP "
          f"{txt2img['http_s'] * 1000:.0f} ms | added {txt2img['added_ms']:.0f} ms | "
          f"{txt2img['http_over_in_process']:.3f}x |")
    if args.json:
        atomic_write_bytes(args.json, json.dumps({"load": load, "threads": args.threads, "rows": rows},
                                                 indent=2).encode("utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
