"""The `tiengine` command line: one sub-command module per stage of the data flow.

Each module listed in COMMAND_MODULES defines `register(subparsers)`, which adds its
sub-commands and sets `func(args) -> int` on them. Modules are imported when `main` runs,
so `tiengine --help` stays fast and heavy imports happen inside the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from tiengine.errors import TiengineError, TiengineWarning

COMMAND_MODULES = (
    "tiengine.cli.tokenize",
    "tiengine.cli.parse",
    "tiengine.cli.embeddings",
    "tiengine.cli.networks",
    "tiengine.cli.encode",
    "tiengine.cli.generate",
    "tiengine.cli.train",
    "tiengine.cli.demo",
    "tiengine.cli.serve",
    "tiengine.cli.batch",
)
# set by `main` before any command imports torch, unless the user set them: waiting OpenMP threads sleep at
# once instead of spinning (tiengine.threads says why; OpenMP reads these only when torch loads)
PASSIVE_WAIT_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


class CliError(TiengineError):
    """A usage failure found by the CLI itself: printed to stderr as one line, exit status 2."""


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """`--threads N`, the same on every command that runs a model."""
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: $OMP_NUM_THREADS if set, else 1 for small models such as "
                             "the built-in one and every CPU for full-size ones; see tiengine.threads)")


def check_threads(threads: int | None) -> None:
    """`--threads N` is refused before any model loads when N < 1."""
    if threads is not None and threads < 1:
        raise CliError(f"--threads must be >= 1, got {threads}")


def apply_threads(threads: int | None, config=None, width: int | None = None, height: int | None = None) -> None:
    """torch's CPU thread count for this command: `--threads N` when given, else as $OMP_NUM_THREADS /
    $MKL_NUM_THREADS set it, else tiengine.threads' choice for the model `config` (a ModelConfig) at width x
    height pixels (None: its native size). The policy is applied here, by the command line that owns the
    process, and never by the library (see tiengine.threads)."""
    check_threads(threads)
    from tiengine.threads import apply_cpu_threads

    apply_cpu_threads(threads, config, width, height)


def model_config(path: Path | None):  # -> tiengine.models.config.ModelConfig | None
    """The ModelConfig of a converted model folder (None: the built-in model) from its config.json, without
    loading weights; None for anything else or a config that cannot be read (the loader names the problem)."""
    from tiengine.default_model import default_model_path
    from tiengine.models.config import read_model_config

    try:
        return read_model_config(default_model_path() if path is None else path)
    except (TiengineError, OSError):
        return None


def resolve_device(name: str) -> str:
    """`--device`: "auto" is CUDA when torch sees a GPU, else the CPU; any other name is passed on as is."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_encode_options(parser: argparse.ArgumentParser) -> None:
    """The encode options every prompt-taking command offers (tiengine.text.conditioning.EncodeOptions)."""
    from tiengine.text.chunking import DEFAULT_COMMA_BACKTRACK, EMPHASIS_MODES

    parser.add_argument("--emphasis", default="original", choices=EMPHASIS_MODES,
                        help="how (word:1.2) weights apply (default original, as A1111; 'none' skips attention "
                             "parsing, so BREAK is text)")
    parser.add_argument("--comma-backtrack", type=int, default=DEFAULT_COMMA_BACKTRACK, metavar="N",
                        help=f"move up to N tokens after the last comma to the next chunk (0 disables; "
                             f"default {DEFAULT_COMMA_BACKTRACK})")
    parser.add_argument("--explicit-embedding-syntax", action="store_true",
                        help="read embedding:NAME as a reference to that embedding (names with spaces or "
                             "sub-folders too); by default it is text, as in A1111: the words 'embedding' and ':' "
                             "are encoded and only a bare name in it binds")
    parser.add_argument("--explicit-only", action="store_true",
                        help="bind embeddings only through embedding:NAME, never by bare name (implies "
                             "--explicit-embedding-syntax)")
    parser.add_argument("--keep-embeddings-on-backtrack", action="store_true",
                        help="move an embedding with its slots when comma backtracking moves it (A1111 loses it)")


def add_network_options(parser: argparse.ArgumentParser) -> None:
    """--loras / --hypernetworks: the folders `<lora:NAME:...>` and `<hypernet:NAME:...>` tags name files in."""
    parser.add_argument("--loras", type=Path, metavar="DIR",
                        help="folder of LoRA / LyCORIS files (A1111's models/Lora) that <lora:NAME:WEIGHT> and "
                             "<lyco:NAME:WEIGHT> tags in the prompt name (by file stem; sub-folders allowed)")
    parser.add_argument("--hypernetworks", type=Path, metavar="DIR",
                        help="folder of A1111 hypernetworks (.pt, A1111's models/hypernetworks) that "
                             "<hypernet:NAME:STRENGTH> tags name")


def network_report_lines(reports: list) -> list[str]:
    """One line per extra-network tag: applied (with multipliers and hash) or skipped with the reason."""
    lines = []
    for report in reports:
        if report.multiplier is not None:
            strength = f"strength {report.multiplier:g}"
        elif report.te_multiplier is not None:
            strength = f"te {report.te_multiplier:g}, unet {report.unet_multiplier:g}" + \
                (f", dyn {report.dyn_dim}" if report.dyn_dim is not None else "")
        else:
            strength = ""
        if report.applied:
            lines.append(f"{report.kind} {report.name} [{report.short_hash}] applied ({strength}; "
                         f"{report.layers} layers, from {report.file})")
        else:
            lines.append(f"{report.kind} {report.name or report.tag} skipped: {report.reason}")
    return lines


def encode_options(args: argparse.Namespace):  # -> tiengine.text.conditioning.EncodeOptions
    """The EncodeOptions of `add_encode_options`' flags (and `--clip-skip` where the command has it)."""
    from tiengine.text.conditioning import EncodeOptions

    return EncodeOptions(clip_skip=getattr(args, "clip_skip", 1), emphasis=args.emphasis,
                         comma_backtrack=args.comma_backtrack, bare_names=not args.explicit_only,
                         explicit_embedding_syntax=args.explicit_embedding_syntax,
                         keep_embeddings_on_backtrack=args.keep_embeddings_on_backtrack)


def embeddings_folder(folder: Path | None) -> Path | None:
    """`--embeddings DIR`, else the folder named by $TIENGINE_EMBEDDINGS (None when neither is given)."""
    if folder is not None:
        return folder
    from tiengine.embeddings.library import default_embeddings_folder

    return default_embeddings_folder()


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
    for name, value in PASSIVE_WAIT_ENVIRONMENT.items():  # before any command imports torch (tiengine.threads)
        os.environ.setdefault(name, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(args.command, warnings.showwarning)
            return int(args.func(args) or 0)
    except TiengineError as error:
        print(f"tiengine {args.command}: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file error no stage turned into a named one: still one line, naming the file
        from tiengine.io.atomic import os_error_line

        print(f"tiengine {args.command}: {os_error_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _warning_printer(command: str, fallback: Callable) -> Callable:
    """warnings.showwarning for a command: tiengine's own warnings as one line, `tiengine COMMAND: warning: ...`
    on stderr; any other warning as Python shows it."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, TiengineWarning):
            from tqdm import tqdm  # write above any progress bar on the line, which is then redrawn

            tqdm.write(f"tiengine {command}: warning: {message}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


def _version() -> str:
    from tiengine import __version__

    return f"tiengine {__version__}"
