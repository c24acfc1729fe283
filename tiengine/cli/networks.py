"""`tiengine loras list|inspect` and `tiengine hypernetworks list|inspect`: what a folder or file holds.

`list DIR` scans a folder as `--loras DIR` / `--hypernetworks DIR` do (tiengine.networks.library: names by
file stem, sub-folders, collisions, skipped files with reasons) and describes each file; `inspect FILE`
describes one file (LoRA: tiengine.networks.lora.describe_lora: algorithm, family, rank, alpha, blocks,
text-encoder part, bundled embeddings, hashes, training metadata; hypernetwork:
tiengine.networks.hypernetwork.describe_hypernetwork). Nothing is executed: pickles go through the
restricted unpickler, safetensors headers are validated before any tensor is read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tiengine.cli import CliError

KINDS = {"loras": "lora", "hypernetworks": "hypernetwork"}


def register(subparsers: argparse._SubParsersAction) -> None:
    for command, kind in KINDS.items():
        label = "LoRA / LyCORIS" if kind == "lora" else "A1111 hypernetwork"
        parser = subparsers.add_parser(command, help=f"list a folder of {label} files, or inspect one file",
                                       description=f"{label} files: what they are and what they change.")
        actions = parser.add_subparsers(dest="action", required=True, metavar="{list,inspect}")
        listing = actions.add_parser("list", help=f"every {label} file of a folder (sub-folders included), "
                                                  "with its prompt name, skipped files with the reason")
        listing.add_argument("folder", type=Path, metavar="DIR")
        listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
        listing.set_defaults(func=_run_list, kind=kind)
        inspect = actions.add_parser("inspect", help=f"describe one {label} file")
        inspect.add_argument("file", type=Path, metavar="FILE")
        inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
        inspect.set_defaults(func=_run_inspect, kind=kind)


def _describe(kind: str, path: Path) -> dict:
    if kind == "lora":
        from tiengine.networks.lora import describe_lora

        return describe_lora(path)
    from tiengine.networks.hypernetwork import describe_hypernetwork

    return describe_hypernetwork(path)


def _run_list(args: argparse.Namespace) -> int:
    from tiengine.errors import TiengineError
    from tiengine.io.metadata import valid_text
    from tiengine.networks.library import NetworkLibrary

    library = NetworkLibrary(args.folder, args.kind)
    networks = []
    for entry in library.files:
        row: dict = {"name": entry.name, "alias": entry.alias, "file": entry.relative_path,
                     "prompt": f"<{'lora' if args.kind == 'lora' else 'hypernet'}:{entry.name}:1>",
                     "reachable_as": entry.name if library.lookup(entry.name) is entry else entry.path_key}
        try:
            row["description"] = _describe(args.kind, entry.path)
        except (TiengineError, OSError) as error:
            row["error"] = str(error)
        networks.append(row)
    report = {"folder": str(args.folder), "networks": networks, "skipped": library.skipped,
              "collisions": library.collisions}
    if args.json:
        print(valid_text(json.dumps(report, ensure_ascii=False, default=str)))
        return 0
    for row in networks:
        summary = row.get("error") or _one_line(args.kind, row["description"])
        alias = f" (alias {row['alias']})" if row["alias"] else ""
        print(valid_text(f"{row['reachable_as']}{alias}  {row['file']}  {summary}"))
    for relative, reason in report["skipped"].items():
        print(valid_text(f"skipped {relative}: {reason}"))
    for name, files in report["collisions"].items():
        print(valid_text(f"name {name!r} is used by {', '.join(files)}; {files[0]} has it, the others are "
                         "reachable by their relative path"))
    if not networks:
        print(f"no {args.kind} files in {args.folder}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from tiengine.io.metadata import valid_text

    if not args.file.is_file():
        raise CliError(f"{args.file}: no such file")
    description = _describe(args.kind, args.file)
    if args.json:
        print(valid_text(json.dumps(description, ensure_ascii=False, default=str)))
        return 0
    for key, value in description.items():
        text = json.dumps(value, ensure_ascii=False, default=str) if isinstance(value, (dict, list)) else value
        print(valid_text(f"{key}: {text}"))
    return 0


def _one_line(kind: str, description: dict) -> str:
    """The facts users scan a listing for: family, algorithm or structure, rank, alpha, text-encoder part."""
    if kind == "hypernetwork":
        keys = ("layer_structure", "activation", "sizes", "short_hash")
        return ", ".join(f"{key} {description[key]}" for key in keys if description.get(key) not in (None, "", []))
    parts = [description.get("family") or "family unknown"]
    parts += [f"{algorithm} x{count}" for algorithm, count in (description.get("algorithms") or {}).items()]
    for key in ("rank", "alpha"):
        span = description.get(key)
        if span:
            low, high = span["min"], span["max"]
            parts.append(f"{key} {low:g}" if low == high else f"{key} {low:g}-{high:g}")
    parts.append("text encoder + UNet" if description.get("text_encoder") else "UNet only")
    if description.get("bundled_embeddings"):
        parts.append("bundled: " + ", ".join(item["name"] for item in description["bundled_embeddings"]))
    parts.append(f"hash {description.get('short_hash')}")
    return ", ".join(str(part) for part in parts)
