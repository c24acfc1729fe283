"""`tiengine tokenize`: prompts -> 77-token chunks with per-token weights and embedding slots.

Extra-network tags (`<lora:name:0.8>`, tiengine.text.extra_networks) are removed first, as A1111 does, and
never tokenized: `text` is the prompt without them and `extra_networks` lists them (the objects of
`tiengine parse`, tiengine.reports.extra_network_report; no network file is read).

JSON output (`--json`): one object per prompt (JSON lines with `--file`): `prompt`, `text`, `extra_networks`,
`token_count`,
`chunks` = [{"tokens": [77 ids], "weights": [77 floats], "embeddings": [[slot, name, n_vectors], ...]}],
slots counted from the chunk start (BOS is 0), embedding slots holding their pseudo-token ids (>= 49408).
With `--model`, the model's family and text encoder widths decide which embeddings bind (the engine's
reading, also the service's); without, `--family`'s standard widths. Token ids are those of the family's
first encoder; SDXL adds `tokens_2` for its second encoder (ids after the first EOS are 0). Also `unresolved` (`embedding:NAME` naming nothing), `skipped` (mentioned embeddings
that cannot be used, with the reason) and `warnings`. Built by tiengine.reports.tokenize_report (the service's
/tiengine/v1/tokenize answers the same object, with the served model's embeddings).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tiengine.cli import CliError, add_encode_options, embeddings_folder, encode_options
from tiengine.cli.parse import extra_network_line

FAMILIES = ("sd1", "sd2", "sdxl")  # the keys of tiengine.reports.FAMILY_PAD_IDS (not imported here: it needs torch)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tokenize",
        help="show a prompt's 77-token chunks, weights and embedding slots",
        description="Tokenize prompts the way A1111 conditions them: weighted fragments, BREAK, "
        "75-token chunks with comma backtracking, embeddings bound by name or embedding:NAME. Extra-network "
        "tags such as <lora:name:0.8> are removed first and listed, never tokenized (no network file is read).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("text", nargs="?", help="the prompt")
    source.add_argument("--file", type=Path, help="a text file with one prompt per line")
    parser.add_argument("--embeddings", type=Path, metavar="DIR",
                        help="folder of embedding files to bind (default: $TIENGINE_EMBEDDINGS, if set)")
    parser.add_argument("--family", choices=FAMILIES,
                        help="model family: decides padding and which embeddings fit (default sd1, or --model's)")
    parser.add_argument("--model", type=Path, metavar="M",
                        help="read the embeddings as this model does (model folder or checkpoint): its family and "
                             "text encoder widths decide which bind, as in `tiengine encode` and `tiengine serve`'s "
                             "/tiengine/v1/tokenize (default: no model, --family's standard widths)")
    add_encode_options(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output (JSON lines)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tiengine.reports import tokenize_report
    from tiengine.text.prompt import DEFAULT_LIMITS
    from tiengine.text.tokenizer import ClipTokenizer
    from tiengine.text.vocabulary import EmbeddingVocabulary

    if args.comma_backtrack < 0:
        raise CliError(f"--comma-backtrack must be >= 0, got {args.comma_backtrack}")
    prompts = _read_prompts(args)
    folder = embeddings_folder(args.embeddings)
    family, limits = args.family or "sd1", DEFAULT_LIMITS
    if args.model is not None:
        from tiengine.engine import Engine

        engine = Engine.load(args.model, embeddings=folder if folder is not None else False)
        if args.family is not None and args.family != engine.config.family:
            raise CliError(f"--family {args.family}: the model {args.model} is {engine.config.family}")
        family, tokenizer, vocabulary = engine.config.family, engine.tokenizer, engine.vocabulary
        limits = engine.prompt_limits
    else:
        tokenizer = ClipTokenizer.default()
        vocabulary = EmbeddingVocabulary(tokenizer)
        if folder is not None:
            from tiengine.embeddings.library import EmbeddingLibrary

            vocabulary = EmbeddingVocabulary.from_library(tokenizer, EmbeddingLibrary(folder, family))

    options = encode_options(args)
    for prompt in prompts:
        report = tokenize_report(prompt, tokenizer, vocabulary, family=family, options=options, limits=limits)
        if args.json:
            print(json.dumps(report, ensure_ascii=False))
        else:
            _print_readable(report, tokenizer)
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.file is None:
        return [args.text]
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"{args.file}: cannot read prompts: {error}") from error
    return text.splitlines()


def _print_readable(report: dict, tokenizer) -> None:
    out = sys.stdout
    out.write(f"prompt: {report['prompt']}\n")
    for record in report["extra_networks"]:
        out.write(extra_network_line(record) + "\n")
    if report["extra_networks"]:
        out.write(f"without tags: {report['text']}\n")
    out.write(f"tokens: {report['token_count']} in {len(report['chunks'])} chunk(s) of 75\n")
    for number, chunk in enumerate(report["chunks"]):
        out.write(f"chunk {number}:\n")
        embedding_at = {slot: (name, n) for slot, name, n in chunk["embeddings"]}
        tokens = chunk["tokens"]
        end = len(tokens) - 1
        while end > 1 and tokens[end - 1] in (49407, 0) and end - 1 not in embedding_at:
            end -= 1  # hide padding
        for slot in range(end + 1):
            token_id = tokens[slot]
            note = f"  <- {embedding_at[slot][0]} ({embedding_at[slot][1]} vectors)" if slot in embedding_at else ""
            out.write(f"  {slot:>2}  {token_id:>6}  {tokenizer.token_text(token_id):<24} "
                      f"{chunk['weights'][slot]:.4g}{note}\n")
        if end < len(tokens) - 1:
            out.write(f"  ... padding to {len(tokens)} ids\n")
    for name in report["unresolved"]:
        out.write(f"unresolved: embedding:{name} names no loaded embedding\n")
    for name, reason in report["skipped"]:
        out.write(f"skipped embedding {name}: {reason}\n")
    for warning in report["warnings"]:
        out.write(f"warning: {warning}\n")
