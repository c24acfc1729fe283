"""`tiengine encode`: prompt and negative prompt -> conditioning tensors in a safetensors file.

A "loading model" bar goes to stderr unless `--json`. Tensor names: `positive.<part>.<entry>.context` (1, 77*k, C) for AND part <part> and schedule entry <entry>
(and `.pooled` (1, P) for SDXL), `negative.<entry>.context` / `.pooled`. The safetensors metadata key
`tiengine` holds JSON: the prompts, steps, per part its weight and schedule ([last_step, text, token
count] per entry), the embeddings applied (name, short hash, prompt, chunk, slot, vectors, weight), the
names skipped with the reason, and the model. Built by tiengine.reports, which the service's
/tiengine/v1/encode shares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tiengine.cli import (
    CliError,
    add_encode_options,
    add_network_options,
    add_threads_option,
    encode_options,
    network_report_lines,
)
from tiengine.diffusion.names import SAMPLER_NAMES

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "encode",
        help="compute a prompt's conditioning tensors and save them (safetensors + JSON metadata)",
        description="Encode a prompt and negative prompt exactly as A1111 does (weights, BREAK, schedules, "
        "AND, embeddings, clip skip) and write the per-step conditioning to a safetensors file.",
    )
    parser.add_argument("prompt")
    parser.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    parser.add_argument("--model", type=Path, help="model folder or checkpoint (default: the built-in model)")
    parser.add_argument("--embeddings", type=Path, metavar="DIR",
                        help="folder of textual-inversion embeddings (default: $TIENGINE_EMBEDDINGS, if set)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps the schedules are built for")
    parser.add_argument("--sampler", default="Euler a",
                        help="sampler the schedules are built for (second-order samplers count model calls): "
                             f"{', '.join(SAMPLER_NAMES)}")
    parser.add_argument("--clip-skip", type=int, default=1)
    add_encode_options(parser)
    add_network_options(parser)
    add_threads_option(parser)
    parser.add_argument("--device", default="auto",
                        help="torch device of the model and the tensors, e.g. cpu or cuda (default auto: cuda if "
                             "available, else cpu); the file holds CPU tensors")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="dtype of the model and of the saved tensors (default fp32)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--json", action="store_true", help="print the metadata as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out.suffix != ".safetensors":
        raise CliError(f"--out must end in .safetensors, got {args.out}")
    from tiengine.io.atomic import check_file_path

    check_file_path(args.out)
    if args.out.exists() and not args.overwrite:
        raise CliError(f"{args.out} already exists; pass --overwrite to replace it")
    import torch

    from tiengine.cli.generate import load_engine
    from tiengine.diffusion.samplers import get_sampler
    from tiengine.io.atomic import atomic_write_bytes
    from tiengine.io.metadata import valid_text
    from tiengine.reports import (
        conditioning_file,
        conditioning_metadata,
        conditioning_tensors,
    )

    options = encode_options(args)
    second_order = get_sampler(args.sampler).second_order
    dtype = getattr(torch, DTYPES[args.dtype])
    engine = load_engine(args, dtype)
    conditioning = engine.encode(args.prompt, args.negative, steps=args.steps, second_order=second_order,
                                 options=options, dtype=dtype)
    tensors = conditioning_tensors(conditioning)
    metadata = conditioning_metadata(engine, conditioning, args.prompt, args.negative, steps=args.steps,
                                     second_order=second_order, options=options)
    payload = conditioning_file(tensors, metadata)
    atomic_write_bytes(args.out, payload, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(metadata, ensure_ascii=False))
    else:
        shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())
        print(valid_text(f"wrote {args.out}: {shapes}"))
        for applied in metadata["applied_embeddings"]:
            print(f"embedding {applied['name']} [{applied['short_hash']}] in the {applied['prompt']} prompt, "
                  f"chunk {applied['chunk']} slot {applied['slot']}, weight {applied['weight']:.4g}")
        for skipped in metadata["skipped_embeddings"]:
            print(f"embedding {skipped['name']} skipped: {skipped['reason']}")
        for line in network_report_lines(conditioning.networks):
            print(valid_text(line))
    return 0

