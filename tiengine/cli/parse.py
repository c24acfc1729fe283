"""`tiengine parse`: show how the A1111 prompt language reads a prompt (tiengine.text.prompt).

Shows what the encoder sees, in the order `Engine.encode` works: the prompt is split on AND into parts
(text, weight); each part's text has a schedule over the sampling steps (until step, text); each scheduled
text is read into attention fragments (text, weight; BREAK as ("BREAK", -1)). `--json` writes one object
per prompt (JSON lines with `--file`, which reads one prompt per line):

    {"prompt": str, "parts": [{"text": str, "weight": float,
                               "schedule": [{"until_step": int, "text": str, "fragments": [[str, float], ...]}]}]}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tiengine.cli import CliError
from tiengine.text.prompt import parse_prompt_attention, prompt_schedule, split_and


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "parse",
        help="show attention weights, step schedule and AND parts of a prompt",
        description="Parse prompts with the AUTOMATIC1111 prompt language: attention weights, BREAK, "
        "[from:to:N] schedules, [a|b] alternation and AND composition.",
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


def parse_report(prompt: str, steps: int, *, second_order: bool = False) -> dict:
    """AND parts -> per-part schedule -> per-entry attention fragments, as `Engine.encode` reads `prompt`."""
    parts = []
    for text, weight in split_and(prompt):
        schedule = [
            {
                "until_step": until_step,
                "text": scheduled_text,
                "fragments": [list(fragment) for fragment in parse_prompt_attention(scheduled_text)],
            }
            for until_step, scheduled_text in prompt_schedule(text, steps, second_order=second_order)
        ]
        parts.append({"text": text, "weight": weight, "schedule": schedule})
    return {"prompt": prompt, "parts": parts}


def _read_prompts(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"{path}: no such file (expected a text file with one prompt per line)") from None
    except IsADirectoryError:
        raise CliError(f"{path}: is a folder (expected a text file with one prompt per line)") from None
    except UnicodeDecodeError as error:
        raise CliError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise CliError(f"{path}: cannot be read ({error.strerror})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _print_table(report: dict) -> None:
    write = sys.stdout.write
    write(f"prompt: {report['prompt']!r}\n")
    parts = report["parts"]
    for number, part in enumerate(parts, start=1):
        write(f"AND part {number}/{len(parts)}: weight {part['weight']!r}, text {part['text']!r}\n")
        for entry in part["schedule"]:
            write(f"  until step {entry['until_step']}: {entry['text']!r}\n")
            write("    weight                text\n")
            for text, weight in entry["fragments"]:
                write(f"    {weight!r:<20}  {text!r}\n")
