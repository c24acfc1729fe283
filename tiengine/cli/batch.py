"""`tiengine batch encode|generate|train JOBS --out DIR`: bulk jobs, locally or on a Ray cluster.

One sub-command per kind of row; all three run tiengine.batch.run. JOBS rows and outputs are documented in
tiengine.batch.jobs and tiengine.batch.outputs, the manifest in tiengine.batch.manifest. The progress bar
(rows/s, time left) goes to stderr unless `--json`; the last line says how many rows ran, were kept from an
earlier run and failed. Exit status 0 when every row is done, 1 when any row failed (each failure is in the
manifest with its message), 2 when the run itself could not start.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tiengine.cli import (
    CliError,
    apply_threads,
    embeddings_folder,
    model_config,
    resolve_device,
)

JOBS_HELP = {
    "encode": "JSONL (or Parquet) rows {\"id\", \"prompt\", \"negative\", \"settings\": {\"steps\", \"sampler\", "
              "\"clip_skip\", \"emphasis\", ...}}; output: safetensors shards of --shard-rows rows, tensors named "
              "<id>/<name> as `tiengine encode` names them",
    "generate": "JSONL (or Parquet) rows {\"id\", \"prompt\", \"negative\", \"seed\", \"settings\": {\"steps\", "
                "\"sampler\", \"cfg_scale\", \"width\", \"height\", ...}} (no seed: one derived from the id); output: "
                "images/<id>-<hash>.png with the infotext",
    "train": "JSONL (or Parquet) rows {\"id\", \"images\" (a folder, relative to the JOBS file), \"name\", \"seed\", "
             "\"settings\": {\"steps\", \"vectors\", \"learning_rate\", ...}}; output: embeddings/<id>-<hash>.safetensors",
}
EPILOG = ("A re-run with the same --out skips rows whose outputs are complete and verified (sha256) and runs the "
          "rest, failed rows included. Exit status: 0 every row done, 1 some row failed (see manifest.jsonl), "
          "2 the run could not start. Ray: `pip install -e \".[ray]\"`; `ray start --head` on the head node "
          "(`ray start --address HEAD:6379` on the others), then the same command with --ray HEAD:6379 (or --ray "
          "alone on a cluster node).")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch", help="bulk jobs from a JOBS file (encode, generate, train), resumable, locally or on Ray",
        description="Run many encode, generate or train rows with the model loaded once per worker. Outputs go "
                    "to --out as shards / files plus manifest.jsonl (id -> output, status, sha256, report).",
        epilog=EPILOG,
    )
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, jobs_help in JOBS_HELP.items():
        sub = kinds.add_parser(kind, help=f"{kind} rows", description=f"tiengine batch {kind}: {jobs_help}.",
                               epilog=EPILOG)
        sub.add_argument("jobs", type=Path, metavar="JOBS", help="the JOBS file (.jsonl, or .parquet with pyarrow)")
        sub.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created if missing)")
        sub.add_argument("--model", type=Path, help="model folder or checkpoint (default: the built-in model)")
        sub.add_argument("--embeddings", type=Path, metavar="DIR",
                         help="folder of textual-inversion embeddings (default: $TIENGINE_EMBEDDINGS, if set)")
        sub.add_argument("--loras", type=Path, metavar="DIR", help="folder the prompts' <lora:NAME:W> tags name")
        sub.add_argument("--hypernetworks", type=Path, metavar="DIR",
                         help="folder the prompts' <hypernet:NAME:S> tags name")
        sub.add_argument("--batch-size", type=int, default=16, metavar="N",
                         help="rows per call of the row function and per Ray batch (default 16); rows are "
                              "computed one by one, so it never changes a result")
        sub.add_argument("--shard-rows", type=int, default=256, metavar="N",
                         help="encode: rows per safetensors shard (default 256)")
        sub.add_argument("--format", dest="manifest_format", choices=("jsonl", "parquet"), default="jsonl",
                         help="manifest format: jsonl (default) or parquet (manifest.parquet beside the journal "
                              "manifest.jsonl; needs pyarrow)")
        sub.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                         help="run on Ray Data: ADDRESS of a cluster (e.g. 10.0.0.1:6379, ray://...), or no value "
                              "for a running local cluster (`ray start --head`) or else a new local instance")
        sub.add_argument("--actors", type=int, default=1, metavar="N",
                         help="Ray: actors in the pool, each loading the model once (default 1)")
        sub.add_argument("--cpus-per-actor", type=float, default=1.0, metavar="C",
                         help="Ray: CPUs reserved per actor, also its torch threads (default 1)")
        sub.add_argument("--gpus-per-actor", type=float, default=0.0, metavar="G",
                         help="Ray: GPUs per actor (default 0; give 1 on GPU nodes with --device cuda)")
        sub.add_argument("--device", default="auto",
                         help="torch device of each worker (default auto: cuda if this machine sees one, else cpu)")
        sub.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="model dtype (default fp32)")
        sub.add_argument("--threads", type=int, metavar="N",
                         help="local: torch CPU threads (default: $OMP_NUM_THREADS if set, else 1 for small models "
                              "such as the built-in one and every CPU for full-size ones; see tiengine.threads)")
        sub.add_argument("--json", action="store_true",
                         help="no progress bar; print {ran, kept, failed, manifest} as JSON")
        sub.set_defaults(func=run_batch)


def run_batch(args: argparse.Namespace) -> int:
    from tiengine.batch import run

    if args.ray is None and (args.actors != 1 or args.cpus_per_actor != 1.0 or args.gpus_per_actor != 0.0):
        raise CliError("--actors, --cpus-per-actor and --gpus-per-actor need --ray")
    if args.ray is None:  # the local worker runs in this process: the command line's thread policy
        apply_threads(args.threads, model_config(args.model))
    manifest = run(
        args.jobs, args.out, kind=args.kind, executor="local" if args.ray is None else "ray",
        model=args.model, embeddings=embeddings_folder(args.embeddings), loras=args.loras,
        hypernetworks=args.hypernetworks, device=resolve_device(args.device), dtype=args.dtype, threads=args.threads,
        batch_size=args.batch_size, shard_rows=args.shard_rows, manifest_format=args.manifest_format,
        ray_address=args.ray or None, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor, progress=not args.json,
    )
    summary = {"ran": manifest.ran, "kept": manifest.kept, "failed": manifest.failed, "manifest": str(manifest.path),
               "warnings": manifest.warnings}
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        for warning in manifest.warnings:
            print(f"warning: {warning}")
        for record in manifest.records:
            if record["status"] == "failed":
                print(f"failed: {record['error'].splitlines()[0]}")
        print(f"{manifest.ran} rows run, {manifest.kept} kept from an earlier run, {manifest.failed} failed; "
              f"manifest: {manifest.path}")
    return 1 if manifest.failed else 0
