"""Bulk encode benchmark: rows per second of `tiengine batch encode` on the wild prompts.

Rows: the first N positive prompts of ../shared/wild/prompts.jsonl (real civitai / GitHub prompts: weights,
BREAK, long multi-chunk ones), one JOBS row each with the negative "blurry, lowres", on the built-in model
(CLIP 32 wide, 2 layers: per-row overheads dominate, which is what a bulk path is about). Columns:

- local executor: `tiengine.batch.run` end to end (read + check rows, encode, shards, journal, manifest),
  after the model is loaded (its load is timed apart);
- loop of Engine.encode: one `Engine.encode` + `conditioning_file` per row in a Python loop (a shell loop would
  also pay the model load and interpreter start per row: given as "per-call process");
- transformers: CLIPTextModel with the same weights, ids truncated / padded to 77, batches of 32, the usual
  way (no weights, schedules, AND or chunks beyond 77 tokens, no negative: a lower bound on work, not the same
  output);
- Ray with 1 and 2 actors (a local instance, 2 CPUs, 1 thread per actor), run wall time after ray.init.

Then a scaling model fitted on these numbers: per-row compute time c (the rows' own `seconds`), driver cost
per row d (local wall / rows - c: reading, hashing, shard writing, journal) and Ray's per-run start-up s;
throughput of A actors predicted as min(A / c, 1 / d) rows/s after s seconds (the "steady" Ray columns
subtract s, measured as a one-row Ray run). The 100-node figure is a
prediction from this model, not a measurement.

Usage: python benchmarks/batch.py [--rows 400] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tiengine.batch import run
from tiengine.engine import Engine
from tiengine.reports import (
    conditioning_file,
    conditioning_metadata,
    conditioning_tensors,
)
from tiengine.text.conditioning import EncodeOptions

WILD_PROMPTS = Path(__file__).resolve().parent.parent.parent / "shared" / "wild" / "prompts.jsonl"
NEGATIVE = "blurry, lowres"


def wild_rows(count: int) -> list[dict]:
    rows = []
    for line in WILD_PROMPTS.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("kind") == "positive":
            rows.append({"id": f"wild-{record['line']}", "prompt": record["prompt"], "negative": NEGATIVE})
        if len(rows) == count:
            break
    return rows


def time_local(rows: list[dict], folder: Path) -> tuple[float, list[float]]:
    start = time.perf_counter()
    manifest = run(rows, folder, threads=1)
    wall = time.perf_counter() - start
    return wall, [record["seconds"] for record in manifest.records]


def time_loop(engine: Engine, rows: list[dict]) -> float:
    options = EncodeOptions()
    start = time.perf_counter()
    for row in rows:
        conditioning = engine.encode(row["prompt"], row["negative"])
        metadata = conditioning_metadata(engine, conditioning, row["prompt"], row["negative"], steps=20,
                                         second_order=False, options=options)
        conditioning_file(conditioning_tensors(conditioning), metadata)
    return time.perf_counter() - start


def time_transformers(engine: Engine, rows: list[dict]) -> float:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = engine.modules["text_encoder"].config
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=49407, pad_token_id=49407)).eval()
    model.load_state_dict(engine.modules["text_encoder"].state_dict(), strict=False)
    start = time.perf_counter()
    ids = [[49406, *engine.tokenizer.encode(row["prompt"])[:75], 49407] for row in rows]
    with torch.no_grad():
        for first in range(0, len(ids), 32):
            batch = [row + [49407] * (77 - len(row)) for row in ids[first : first + 32]]
            model(input_ids=torch.tensor(batch)).last_hidden_state.contiguous()
    return time.perf_counter() - start


def time_ray(rows: list[dict], folder: Path, actors: int) -> float:
    start = time.perf_counter()
    run(rows, folder, executor="ray", actors=actors, batch_size=32)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = wild_rows(args.rows)
    start = time.perf_counter()
    engine = Engine.load(embeddings=False)
    load_s = time.perf_counter() - start
    results: dict[str, float] = {"rows": len(rows), "model_load_s": load_s}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        one_row_wall, _ = time_local(rows[:1], scratch / "local-one")  # the run's own model load and start
        local_wall, seconds = time_local(rows, scratch / "local")
        results["local_rows_per_s"] = (len(rows) - 1) / (local_wall - one_row_wall)
        results["row_compute_s"] = statistics.fmean(seconds)
        results["loop_rows_per_s"] = len(rows) / time_loop(engine, rows)
        results["per_call_process_rows_per_s"] = 1 / (load_s + 1.0)  # + ~1 s interpreter and import start
        results["transformers_rows_per_s"] = len(rows) / time_transformers(engine, rows)
        import ray

        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
        results["ray_startup_s"] = time_ray(rows[:1], scratch / "ray-start", 1)  # actor start + model load
        for actors in (1, 2):
            wall = time_ray(rows, scratch / f"ray{actors}", actors)
            results[f"ray{actors}_rows_per_s"] = len(rows) / wall
            results[f"ray{actors}_steady_rows_per_s"] = len(rows) / max(wall - results["ray_startup_s"], 1e-6)
        ray.shutdown()
    driver_per_row = 1 / results["local_rows_per_s"] - results["row_compute_s"]
    results["driver_per_row_s"] = driver_per_row
    for actors in (1, 2, 100 * 8):
        results[f"predicted_{actors}_actors_rows_per_s"] = min(actors / results["row_compute_s"], 1 / driver_per_row)
    header = (f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}, 1 thread per worker")
    print(header)
    print("| measure | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value:.4g} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
