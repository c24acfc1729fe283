"""The `tiengine` command line: one sub-command module per stage of the data flow.

Each module listed in COMMAND_MODULES defines `register(subparsers)`, which adds its
sub-commands and sets `func(args) -> int` on them. Modules are imported when `main` runs,
so `tiengine --help` stays fast and heavy imports happen inside the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tiengine.errors import TiengineError

COMMAND_MODULES = (
    "tiengine.cli.tokenize",
    "tiengine.cli.parse",
    "tiengine.cli.embeddings",
    "tiengine.cli.encode",
    "tiengine.cli.generate",
    "tiengine.cli.train",
    "tiengine.cli.demo",
)


class CliError(TiengineError):
    """A usage failure found by the CLI itself: printed to stderr as one line, exit status 2."""


def apply_threads(threads: int | None) -> None:
    """`--threads N`: torch's CPU thread count (None: torch's own choice)."""
    if threads is None:
        return
    if threads < 1:
        raise CliError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiengine",
        description="Stable Diffusion prompt encoding, textual-inversion embeddings and generation.",
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TiengineError as error:
        print(f"tiengine {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from tiengine import __version__

    return f"tiengine {__version__}"
