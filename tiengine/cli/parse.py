"""`tiengine parse`: show how the A1111 prompt language reads a prompt (tiengine.text.prompt).

For each prompt: its attention fragments (text, weight; BREAK as ("BREAK", -1)), its schedule over the
sampling steps (end_at_step, text) and its AND parts (text, weight). `--json` writes one object per
prompt (JSON lines with `--file`, which reads one prompt per line).
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
    parser.add_argument("--steps", type=int, required=True, metavar="N", help="sampling steps (>= 1)")
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
        report = {
            "prompt": prompt,
            "fragments": [list(fragment) for fragment in parse_prompt_attention(prompt)],
            "schedules": [list(entry) for entry in prompt_schedule(prompt, args.steps, second_order=args.second_order)],
            "and_parts": [list(part) for part in split_and(prompt)],
        }
        if args.json:
            print(json.dumps(report))
        else:
            if number > 1:
                print()
            _print_table(report)
    return 0


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
    write("fragments:\n  weight                text\n")
    for text, weight in report["fragments"]:
        write(f"  {weight!r:<20}  {text!r}\n")
    write("schedule:\n  until step  text\n")
    for step, text in report["schedules"]:
        write(f"  {step:>10}  {text!r}\n")
    write("AND parts:\n  weight                text\n")
    for text, weight in report["and_parts"]:
        write(f"  {weight!r:<20}  {text!r}\n")
