"""`tiengine serve`: the model behind an HTTP API that A1111 clients drive unchanged (tiengine.serve).

Needs the `serve` extra (`pip install -e ".[serve]"`). Binds to 127.0.0.1 unless --host says otherwise; any
other host needs --api-auth user:pass (HTTP basic, as A1111's flag), else the command exits 2 with one line.
The --max-* flags are the request caps (tiengine.serve.config.ServeLimits); a request over one is answered
422 naming the flag.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tiengine.cli import (
    CliError,
    add_network_options,
    add_threads_option,
    check_threads,
    embeddings_folder,
    resolve_device,
)

MEBIBYTE = 2**20


def register(subparsers: argparse._SubParsersAction) -> None:
    from tiengine.serve.config import DEFAULT_HOST, DEFAULT_PORT, ServeLimits

    defaults = ServeLimits()
    parser = subparsers.add_parser(
        "serve", help="serve the model over HTTP (A1111's /sdapi/v1 API and tiengine's /tiengine/v1)",
        description="Serve a model over HTTP: A1111-compatible endpoints (/sdapi/v1/txt2img, img2img, png-info, "
                    "...) and tiengine's own (/tiengine/v1). Needs pip install -e \".[serve]\".")
    parser.add_argument("--model", type=Path, help="model: converted folder, diffusers folder or .safetensors/.ckpt "
                                                   "(default: the built-in model)")
    parser.add_argument("--embeddings", type=Path, metavar="DIR",
                        help="folder of textual-inversion embeddings (default: $TIENGINE_EMBEDDINGS, if set)")
    add_network_options(parser)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}; any other needs --api-auth)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}, A1111's)")
    parser.add_argument("--api-auth", metavar="USER:PASS[,USER2:PASS2]",
                        help="HTTP basic auth on every request (A1111's --api-auth)")
    parser.add_argument("--device", default="auto", help="torch device (default auto: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="weights dtype (default fp32)")
    add_threads_option(parser)
    parser.add_argument("--queue-size", type=int, default=defaults.queue_size,
                        help=f"jobs that may wait for the model; one more is answered 503 (default {defaults.queue_size})")
    parser.add_argument("--max-request-mb", type=float, default=defaults.max_request_bytes / MEBIBYTE,
                        help=f"largest request body in MiB (default {defaults.max_request_bytes // MEBIBYTE})")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help=f"largest width x height of an image, hires target included (default {defaults.max_pixels})")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps,
                        help=f"most sampling steps per image, hires steps included (default {defaults.max_steps})")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                        help=f"most images per sampling run (default {defaults.max_batch_size})")
    parser.add_argument("--max-n-iter", type=int, default=defaults.max_n_iter,
                        help=f"most sampling runs per request (default {defaults.max_n_iter})")
    parser.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars,
                        help=f"longest prompt or negative prompt (default {defaults.max_prompt_chars})")
    parser.set_defaults(func=run_serve)


def serve_config(args: argparse.Namespace):  # -> tiengine.serve.config.ServeConfig
    """The ServeConfig of the parsed flags; ServeError (one line, exit 2) for a choice that cannot be used."""
    from tiengine.serve.config import ServeConfig, ServeLimits

    if args.max_request_mb <= 0:
        raise CliError(f"--max-request-mb must be > 0, got {args.max_request_mb:g}")
    limits = ServeLimits(max_request_bytes=int(args.max_request_mb * MEBIBYTE), max_pixels=args.max_pixels,
                         max_steps=args.max_steps, max_batch_size=args.max_batch_size, max_n_iter=args.max_n_iter,
                         max_prompt_chars=args.max_prompt_chars, queue_size=args.queue_size)
    return ServeConfig(model=args.model, embeddings=embeddings_folder(args.embeddings), loras=args.loras,
                       hypernetworks=args.hypernetworks, device=resolve_device(args.device), dtype=args.dtype,
                       host=args.host, port=args.port, api_auth=args.api_auth, limits=limits)


def run_serve(args: argparse.Namespace) -> int:
    try:
        from tiengine.serve.run import serve
    except ImportError as error:
        raise CliError(f"the serve extra is not installed ({error.name} is missing): pip install -e \".[serve]\"") \
            from None
    config = serve_config(args)  # checked before the model loads
    check_threads(args.threads)
    serve(config, threads=args.threads)
    return 0
