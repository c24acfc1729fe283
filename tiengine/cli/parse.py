"""`tiengine parse`: show how the A1111 prompt language reads a prompt (tiengine.text.prompt).

Shows what the encoder sees, in the order `Engine.encode` works: extra-network tags (`<lora:name:0.8>`,
tiengine.text.extra_networks) are removed first and listed; the rest (`text`) is split on AND into parts
(text, weight); each part's text has a schedule over the sampling steps (until step, text); each scheduled
text is read into attention fragments (text, weight; BREAK as ("BREAK", -1)). `--json` writes one object
per prompt (JSON lines with `--file`, which reads one prompt per line), built by tiengine.reports.parse_report
(the service's /tiengine/v1/parse answers the same object):

    {"prompt": str, "text": str, "extra_networks": [tag, ...],
     "parts": [{"text": str, "weight": float,
                "schedule": [{"until_step": int, "text": str, "fragments": [[str, float], ...]}]}]}

Each tag (tiengine.reports.extra_network_report, shared with `tiengine tokenize`) is {"kind", "name", "where"
("positive"),
"text" (as written), "start", "end" (its character offsets in the prompt)} plus, for lora/lyco,
"te_multiplier", "unet_multiplier", "dyn_dim" (null: the file's rank); for hypernet, "multiplier"; for other
kinds, "items" (the ":"-split arguments). A "note" says why a tag will not be applied (unknown kind, no
name). No network file is read: whether the name exists is for `tiengine encode` / `generate` to say.
A tag argument that is not a number is an error (exit status 2), as the engine would refuse it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tiengine.cli import CliError
from tiengine.io.text_files import read_utf8_text


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "parse",
        help="show attention weights, step schedule and AND parts of a prompt",
        description="Parse prompts with the AUTOMATIC1111 prompt language: attention weights, BREAK, "
        "[from:to:N] schedules, [a|b] alternation and AND composition. Extra-network tags such as "
        "<lora:name:0.8> or <hypernet:name> are removed first, as A1111 does, and listed with their "
        "multipliers (no network file is read).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("text", nargs="?", metavar="TEXT", help="the prompt")
    source.add_argument("--file", type=Path, metavar="F", help="a UTF-8 file with one prompt per line")
    parser.add_argument("--steps", type=int, default=20, metavar="N", help="sampling steps (>= 1, default 20)")
    parser.add_argument(
        "--second-order",
        action="store_true",
        help="the sampler calls the model twice per step (Heun, DPM2, DPM++ 2S...): schedule over 2N calls",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tiengine.reports import parse_report

    if args.steps < 1:
        raise CliError(f"--steps must be at least 1, got {args.steps}")
    prompts = [args.text] if args.file is None else _read_prompts(args.file)
    for number, prompt in enumerate(prompts, start=1):
        report = parse_report(prompt, args.steps, second_order=args.second_order)
        if args.json:
            print(json.dumps(report))
        else:
            if number > 1:
                print()
            _print_table(report)
    return 0


def extra_network_line(record: dict) -> str:
    """The human-readable line of one `extra_network_report` record."""
    if "te_multiplier" in record:
        strengths = f"te {record['te_multiplier']!r}, unet {record['unet_multiplier']!r}"
        if record["dyn_dim"] is not None:
            strengths += f", dyn {record['dyn_dim']}"
    elif "multiplier" in record:
        strengths = f"multiplier {record['multiplier']!r}"
    else:
        strengths = f"arguments {record['items']!r}"
    network = record["kind"] if "items" in record else f"{record['kind']} {record['name']!r}"
    line = f"extra network ({record['where']}): {network}, {strengths}, from {record['text']!r}"
    return line + (f"; {record['note']}" if "note" in record else "")


def _read_prompts(path: Path) -> list[str]:
    text = read_utf8_text(path, "a text file with one prompt per line", CliError)
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _print_table(report: dict) -> None:
    write = sys.stdout.write
    write(f"prompt: {report['prompt']!r}\n")
    for record in report["extra_networks"]:
        write(extra_network_line(record) + "\n")
    if report["extra_networks"]:
        write(f"without tags: {report['text']!r}\n")
    parts = report["parts"]
    for number, part in enumerate(parts, start=1):
        write(f"AND part {number}/{len(parts)}: weight {part['weight']!r}, text {part['text']!r}\n")
        for entry in part["schedule"]:
            write(f"  until step {entry['until_step']}: {entry['text']!r}\n")
            write("    weight                text\n")
            for text, weight in entry["fragments"]:
                write(f"    {weight!r:<20}  {text!r}\n")
