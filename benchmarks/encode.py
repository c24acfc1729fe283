"""Text-encode benchmark: tiengine's ClipTextEncoder against transformers' CLIPTextModel.

Full-size SD1 CLIP-L (123 M parameters, random weights shared by both models), 77-token chunks at
several batch sizes, fp32 and bf16, on the CPU, in one process with one thread count. Both sides produce
the same output: final_layer_norm(last layer) for every token plus the pooled EOS state
(`ClipTextEncoder.encode(ids, pooled=True)` against `CLIPTextModel(input_ids=ids)`); the outputs are
compared before timing. Calls are interleaved (peer, tiengine, peer, ...) after a warm-up, so load from
other processes hits both alike; the median is reported. `--clock wall` (default) times latency;
`--clock cpu` times this process's CPU time, which other processes on a shared machine barely disturb
(with one thread it is the compute time; with more it also counts time threads spend waiting).

Floor: the FLOPs the read needs (2 per multiply-add of every linear layer and attention matmul: 13.3 GFLOP
per 77-token sequence through CLIP-L's 12 layers, 11/12 of that for the penultimate read) divided by the
matmul ceiling measured here with a large torch.mm in the same dtype and on the same clock. Each time is
also given as a multiple of that floor.

Rows: one per (dtype, batch); the "penultimate" rows time the SD2/SDXL-style read (hidden_states[-2]),
where transformers must run every layer and tiengine stops after the one it needs. Columns are listed in
COLUMNS: tiengine is the default ("auto") linear backend, then each backend forced ("n/a" where it cannot
run, as oneDNN bf16 on a CPU without AVX-512/AMX); the speedup
(transformers / tiengine) comes last.

Adding a measurement (for example the prompt-processing share: parsing, chunking and weights as a
percentage of encode time) is one (key, header, format) entry in COLUMNS, placed before the speedup, and
its value set on each row in `_measure`.

Prompt case (second table): a real prompt of about 150 tokens (two chunks) with weights and two
embeddings, through tiengine's whole A1111 conditioning (`encode_texts`: parse, chunk, weights, embedding
rows, encoder, emphasis) against transformers encoding the same two 77-token chunks (model only, ids with
A1111's placeholder 0 in the embedding slots). The "processing" column is tiengine's parse + chunk +
weights alone (`tokenize_texts`) and its share of the whole conditioning time.

Usage: python benchmarks/encode.py [--threads 2] [--batches 1 2 8] [--dtypes fp32 bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tiengine.io.atomic import atomic_write_bytes
from tiengine.models.text_encoder import ClipTextEncoder, TextEncoderConfig, _onednn_linear_unsupported

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EOS = 49407
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
COLUMNS = (
    # (key, header, format)
    ("read", "read", "{}"),
    ("dtype", "dtype", "{}"),
    ("batch", "batch", "{}"),
    ("transformers_ms", "transformers ms", "{:.1f}"),
    ("tiengine_ms", "tiengine ms", "{:.1f}"),
    ("tiengine_onednn_ms", "tiengine[onednn] ms", "{:.1f}"),
    ("tiengine_torch_ms", "tiengine[F.linear] ms", "{:.1f}"),
    ("floor_ms", "floor ms", "{:.1f}"),
    ("transformers_x_floor", "transformers x floor", "{:.2f}"),
    ("tiengine_x_floor", "tiengine x floor", "{:.2f}"),
    ("max_abs_diff", "max |diff|", "{:.1e}"),
    ("speedup", "speedup (transformers / tiengine)", "{:.2f}x"),
)


@dataclass(frozen=True)
class Timing:
    median_s: float
    samples: int


def encode_flops(config: TextEncoderConfig, tokens: int, layers: int) -> float:
    """FLOPs of one sequence through `layers` layers: linear layers plus the two attention matmuls
    (full T x T, as computed)."""
    width, inner = config.hidden_size, config.intermediate_size
    linear = 2 * tokens * (4 * width * width + 2 * width * inner)
    attention_core = 2 * 2 * tokens * tokens * width
    return layers * (linear + attention_core)


def time_interleaved(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int, clock: Callable[[], float]
) -> dict[str, Timing]:
    """Median time of each function on `clock`, calls interleaved round-robin after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return {name: Timing(statistics.median(values), len(values)) for name, values in samples.items()}


def matmul_ceiling(dtype: torch.dtype, size: int, repeats: int, clock: Callable[[], float]) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) torch.mm in `dtype`, timed on `clock`."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        torch.mm(a, b)
        best = min(best, clock() - start)
    return 2 * size**3 / best


def build_models(seed: int):
    """transformers CLIPTextModel (CLIP-L, sdpa attention) and tiengine's encoder on the same weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = TextEncoderConfig.sd1_clip_l()
    torch.manual_seed(seed)
    reference = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            max_position_embeddings=config.max_position_embeddings,
            hidden_act=config.hidden_act,
            layer_norm_eps=config.layer_norm_eps,
            eos_token_id=EOS,
            attn_implementation="sdpa",
        )
    ).eval()
    model = ClipTextEncoder(config).eval()
    model.load_state_dict(reference.state_dict())
    return config, reference, model


def random_chunks(batch: int, seed: int) -> torch.Tensor:
    """(batch, 77) ids: BOS, random words, EOS at varied positions, EOS padding (SD1)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49406, (batch, 77), generator=generator)
    ids[:, 0] = 49406
    for row in range(batch):
        end = 5 + (row * 23) % 72
        ids[row, end:] = EOS
    return ids


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    config, reference, model = build_models(args.seed)
    flops_per_sequence = encode_flops(config, 77, config.num_hidden_layers)
    layers_needed = {"last": config.num_hidden_layers, "penultimate": config.num_hidden_layers - 1}
    ceilings: dict[str, float] = {}
    rows: list[dict] = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        ceilings[dtype_name] = matmul_ceiling(dtype, args.mm_size, repeats=5, clock=CLOCKS[args.clock])
        reference.to(dtype)
        model.to(dtype)
        for read in args.reads:
            for batch in args.batches:
                ids = random_chunks(batch, seed=batch)
                rows.append(_measure(read, dtype_name, batch, ids, reference, model, config, args))
                row = rows[-1]
                flops = encode_flops(config, 77, layers_needed[read]) * batch
                row["floor_ms"] = 1e3 * flops / ceilings[dtype_name]
                row["transformers_x_floor"] = row["transformers_ms"] / row["floor_ms"]
                row["tiengine_x_floor"] = row["tiengine_ms"] / row["floor_ms"]
                print(_format_row(row), flush=True)
    prompt_rows = []
    print("# prompt case: ~150 tokens, weights, 2 embeddings; tiengine = whole A1111 conditioning, "
          "transformers = model only on the same chunks")
    print("dtype | tokens | chunks | processing ms | share of tiengine | tiengine ms | transformers ms | speedup")
    for dtype_name in args.dtypes:
        reference.to(DTYPES[dtype_name])
        model.to(DTYPES[dtype_name])
        case = prompt_case(args, reference, model, dtype_name)
        prompt_rows.append(case)
        print(f"{case['dtype']} | {case['tokens']} | {case['chunks']} | {case['processing_ms']:.2f} | "
              f"{100 * case['processing_share']:.1f}% | {case['tiengine_ms']:.1f} | "
              f"{case['transformers_model_only_ms']:.1f} | {case['speedup']:.2f}x", flush=True)
    return {
        "benchmark": "text encode, SD1 CLIP-L, 77-token chunks",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "clock": args.clock,
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
        "transformers": _transformers_version(),
        "flops_per_sequence": flops_per_sequence,
        "matmul_ceiling_flops": ceilings,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "rows": rows,
        "prompt_case": prompt_rows,
    }


def _measure(read, dtype_name, batch, ids, reference, model, config, args) -> dict:
    if read == "last":

        def peer():
            return reference(input_ids=ids)

        def ours(linear_backend="auto"):
            return model.encode(ids, output_layer=-1, final_norm=True, pooled=True, linear_backend=linear_backend)

        def outputs_diff():
            out = peer()
            context, pooled = ours()
            return max(_diff(context, out.last_hidden_state), _diff(pooled, out.pooler_output))

    else:  # "penultimate": hidden_states[-2] through final_layer_norm (SD2's read)

        def peer():
            hidden = reference(input_ids=ids, output_hidden_states=True).hidden_states[-2]
            return reference.final_layer_norm(hidden)

        def ours(linear_backend="auto"):
            return model.encode(ids, output_layer=-2, final_norm=True, linear_backend=linear_backend)

        def outputs_diff():
            return _diff(ours()[0], peer())

    functions = {"transformers": peer, "tiengine": ours, "tiengine_onednn": lambda: ours("onednn"),
                 "tiengine_torch": lambda: ours("torch")}  # fmt: skip
    probe = torch.empty(1, 1, config.hidden_size, dtype=DTYPES[dtype_name])
    if _onednn_linear_unsupported(probe, needs_grad=False) is not None:  # e.g. bf16 on an AVX2 CPU
        del functions["tiengine_onednn"]
    with torch.inference_mode():
        diff = outputs_diff()
        timings = time_interleaved(
            functions,
            warmup=args.warmup,
            repeats=args.repeats,
            clock=CLOCKS[args.clock],
        )
    row = {"read": read, "dtype": dtype_name, "batch": batch, "max_abs_diff": diff, "tiengine_onednn_ms": None}
    for name, timing in timings.items():
        row[f"{name}_ms"] = 1e3 * timing.median_s
    row["speedup"] = row["transformers_ms"] / row["tiengine_ms"]
    return row


PROMPT_CASE = (
    "(masterpiece:1.2), best quality, ultra detailed, 8k, portrait of a girl standing in a sunlit forest, "
    "(flowing red dress:1.3), [windy], long silver hair, soft cinematic lighting, volumetric fog, sharp focus, "
    "intricate embroidery, golden hour, depth of field, bokeh, (rick:1.1), looking at viewer, smiling, "
    "detailed eyes, detailed face, ornate jewelry, fantasy, illustration, artstation, trending, concept art, "
    "by a famous painter, oil on canvas, highly detailed background, mountains, river, birds in the sky, "
    "EasyNegative, vivid colors, high contrast, dramatic clouds, wide angle, full body, elegant pose, "
    "rim light, subsurface scattering, photorealistic skin, film grain"
)


def prompt_case(args: argparse.Namespace, reference, model, dtype_name: str) -> dict:
    """The whole A1111 conditioning of PROMPT_CASE (tiengine) vs the model-only peer on its chunks."""
    from tiengine.text.conditioning import EncodeOptions, TextEncoderSlot, encode_texts, tokenize_texts
    from tiengine.text.tokenizer import ClipTokenizer

    tokenizer = ClipTokenizer.default()
    tokenizer.add_embedding("EasyNegative", 8)
    tokenizer.add_embedding("rick", 3)
    dtype = DTYPES[dtype_name]
    rows = torch.randn(11, model.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    slots = [TextEncoderSlot("text_encoder", "clip_l", model)]
    options = EncodeOptions()
    (prompt,) = tokenize_texts([PROMPT_CASE], tokenizer, options)
    peer_chunks = [
        torch.tensor([[0 if token > EOS else token for token in chunk.tokens]]) for chunk in prompt.chunks
    ]  # A1111's placeholders: (1, 77) each

    def processing():
        return tokenize_texts([PROMPT_CASE], tokenizer, options)

    def ours():
        return encode_texts([PROMPT_CASE], tokenizer, slots, {"clip_l": rows}, options)

    def peer():
        return [reference(input_ids=ids).last_hidden_state for ids in peer_chunks]

    with torch.inference_mode():
        timings = time_interleaved(
            {"processing": processing, "tiengine": ours, "transformers": peer},
            warmup=args.warmup, repeats=args.repeats, clock=CLOCKS[args.clock],
        )
    row = {name: 1e3 * timing.median_s for name, timing in timings.items()}
    return {
        "dtype": dtype_name,
        "tokens": prompt.token_count,
        "chunks": len(prompt.chunks),
        "processing_ms": row["processing"],
        "tiengine_ms": row["tiengine"],
        "processing_share": row["processing"] / row["tiengine"],
        "transformers_model_only_ms": row["transformers"],
        "speedup": row["transformers"] / row["tiengine"],
    }


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _format_row(row: dict) -> str:
    return " | ".join("n/a" if row[key] is None else fmt.format(row[key]) for key, _, fmt in COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--reads", nargs="+", choices=["last", "penultimate"], default=["last", "penultimate"])
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--mm-size", type=int, default=2048, help="side of the square matmul for the ceiling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()

    print(
        f"# text encode, SD1 CLIP-L, 77-token chunks | cpu, {args.threads} threads | torch {torch.__version__}, "
        f"transformers {_transformers_version()} | {args.clock} clock, warm-up {args.warmup}, "
        f"median of {args.repeats}, interleaved"
    )
    print(" | ".join(header for _, header, _ in COLUMNS))
    results = run(args)
    for dtype_name, ceiling in results["matmul_ceiling_flops"].items():
        print(f"# matmul ceiling {dtype_name}: {ceiling / 1e9:.0f} GFLOP/s ({args.mm_size}^3 torch.mm)")
    print(f"# FLOPs per 77-token sequence: {results['flops_per_sequence'] / 1e9:.2f} G; "
          f"load average at end: {results['load_average_at_end'][0]:.1f}")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(results, indent=2).encode(), overwrite=True)


if __name__ == "__main__":
    main()
