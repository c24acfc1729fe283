"""Tokenizer throughput: tiengine's ClipTokenizer vs transformers' CLIPTokenizer, prompts per second.

Both tokenize the same corpus (the real prompts of ../shared/wild/prompts.jsonl when present, else a
generated corpus) without BOS/EOS, single prompts in a loop and as one batch. tiengine includes OpenAI's
full text cleaning (ftfy + HTML unescape) that transformers skips, and is checked to give the reference
ids; transformers gets the cleaned text so both produce the same ids (asserted before timing).

    python benchmarks/tokenizer.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from tiengine.io.atomic import atomic_write_bytes  # noqa: E402


def load_corpus() -> tuple[list[str], str]:
    wild = REPO.parent / "shared" / "wild" / "prompts.jsonl"
    if wild.is_file():
        prompts = [json.loads(line)["prompt"] for line in wild.open(encoding="utf-8")]
        return prompts, f"{len(prompts)} real prompts ({wild})"
    from prompt_corpus import generated_prompts

    prompts = generated_prompts(3000)
    return prompts, f"{len(prompts)} generated prompts (tests/prompt_corpus.py)"


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import tokenizers
    import transformers
    from test_tokenizer import BPE_PATH, ReferenceClipTokenizer

    from tiengine.text.tokenizer import ClipTokenizer, clean_text

    corpus, corpus_name = load_corpus()
    ours = ClipTokenizer.default()
    with tempfile.TemporaryDirectory() as folder:
        ReferenceClipTokenizer(BPE_PATH).write_hf_files(Path(folder))
        theirs = transformers.CLIPTokenizer.from_pretrained(folder)
    cleaned = [clean_text(text) for text in corpus]
    plain = [i for i, text in enumerate(cleaned) if "<|" not in text]
    assert all(
        ours.encode(corpus[i]) == theirs(cleaned[i], add_special_tokens=False)["input_ids"] for i in plain[:500]
    ), "tokenizers disagree; fix before timing"

    rows = [
        ("single", lambda: [ours.encode(t) for t in corpus], lambda: [theirs(t, add_special_tokens=False) for t in cleaned]),
        ("batch", lambda: ours.encode_batch(corpus), lambda: theirs(cleaned, add_special_tokens=False)),
    ]
    header = {
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
        "corpus": corpus_name,
    }
    print("# tokenizer throughput, prompts/s (median of", args.repeats, "runs)")
    for key, value in header.items():
        print(f"# {key}: {value}")
    print(f"{'mode':<8} {'tiengine':>12} {'transformers':>14} {'ratio':>7}")
    results = []
    for mode, run_ours, run_theirs in rows:
        ours_rate = len(corpus) / median_seconds(run_ours, args.repeats)
        theirs_rate = len(corpus) / median_seconds(run_theirs, args.repeats)
        ratio = ours_rate / theirs_rate
        results.append({"mode": mode, "tiengine_per_s": ours_rate, "transformers_per_s": theirs_rate, "ratio": ratio})
        print(f"{mode:<8} {ours_rate:>12.0f} {theirs_rate:>14.0f} {ratio:>6.2f}x")
    print("# tiengine includes ftfy/HTML cleaning; transformers is given pre-cleaned text")
    if args.json:
        atomic_write_bytes(args.json, json.dumps({"header": header, "results": results}, indent=2).encode(), overwrite=True)


if __name__ == "__main__":
    main()
