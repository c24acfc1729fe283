"""`tiengine embeddings list | inspect | convert`: textual-inversion files from the command line.

list DIR      what an embeddings folder provides for a model family, and what was skipped why
inspect FILE  name, layout, vectors, widths, family, hashes, step and per-vector norms
convert IN OUT  rewrite as safetensors, A1111 .pt or A1111 PNG (never over a file unless
              --overwrite); with --preview IMAGE the PNG is a card: that picture captioned with the
              name, checkpoint, vector count and step, the data hidden around it, as A1111 saves them
Every command takes --json. Refused files end the command with status 2 and the reason on
stderr (tiengine.cli.main prints TiengineError messages).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

FAMILIES = ("sd1", "sd2", "sdxl")
FORMATS = ("safetensors", "pt", "png")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("embeddings", help="list, inspect and convert embedding files")
    commands = parser.add_subparsers(dest="embeddings_command", metavar="ACTION", required=True)

    listing = commands.add_parser("list", help="embeddings of a folder (sub-folders included)")
    listing.add_argument("folder", metavar="DIR")
    listing.add_argument("--family", choices=FAMILIES, help="skip embeddings made for others")
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(func=run_list)

    inspect = commands.add_parser("inspect", help="describe one embedding file")
    inspect.add_argument("file", metavar="FILE")
    inspect.add_argument("--name", help="bundled embedding to show (LoRA files with several)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(func=run_inspect)

    convert = commands.add_parser("convert", help="rewrite an embedding in another format")
    convert.add_argument("source", metavar="IN")
    convert.add_argument("target", metavar="OUT")
    convert.add_argument("--format", choices=FORMATS, help="default: from OUT's extension")
    convert.add_argument("--name", help="bundled embedding to convert (LoRA files with several)")
    convert.add_argument("--preview", metavar="IMAGE",
                         help="PNG output: caption this picture as a card (name, checkpoint, vectors, step) "
                         "and hide the data around it; without it, a picture drawn from the vectors")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    convert.add_argument("--json", action="store_true", help="print one JSON object")
    convert.set_defaults(func=run_convert)


def run_list(args: argparse.Namespace) -> int:
    from tiengine.embeddings.library import EmbeddingLibrary

    library = EmbeddingLibrary(args.folder, family=args.family)
    loaded = []
    for entry in library.entries:
        embedding = entry.embedding
        if embedding is None:
            continue
        shadowed_by = library.collisions.get(embedding.name, [entry.relative_path])[0]
        loaded.append({
            "name": embedding.name, "path": entry.relative_path, "family": embedding.family,
            "vectors": embedding.n_vectors, "format": embedding.format,
            "short_hash": embedding.short_hash,
            "shadowed_by": None if shadowed_by == entry.relative_path else shadowed_by,
        })
    skipped = [{"path": path, "reason": reason} for path, reason in library.skipped.items()]
    collisions = [{"name": name, "winner": paths[0], "shadowed": paths[1:]}
                  for name, paths in sorted(library.collisions.items())]
    if args.json:
        _print_json({"folder": str(library.folder), "family": args.family, "loaded": loaded,
                     "skipped": skipped, "collisions": collisions})
        return 0
    print(f"{library.folder}: {len(loaded)} loaded, {len(skipped)} skipped"
          + (f" (model family {args.family})" if args.family else ""))
    for item in loaded:
        note = f"  [shadowed by {item['shadowed_by']}]" if item["shadowed_by"] else ""
        print(f"  {item['name']}  {item['family']}  {item['vectors']} vectors  {item['format']}"
              f"  {item['short_hash']}  {item['path']}{note}")
    if skipped:
        print("skipped:")
        for item in skipped:
            print(f"  {item['path']}: {item['reason']}")
    for item in collisions:
        print(f"name {item['name']!r} given by several files: {item['winner']} wins over "
              f"{', '.join(item['shadowed'])}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    embedding = _load(args.file, args.name)
    norms = {encoder: [round(n, 6) for n in values]
             for encoder, values in embedding.vector_norms().items()}
    info = {
        "name": embedding.name, "stored_name": embedding.stored_name,
        "format": embedding.format, "container": embedding.container,
        "vectors": embedding.n_vectors, "widths": embedding.widths, "family": embedding.family,
        "sha256": embedding.sha256, "short_hash": embedding.short_hash, "step": embedding.step,
        "sd_checkpoint": embedding.sd_checkpoint,
        "sd_checkpoint_name": embedding.sd_checkpoint_name,
        "path": str(embedding.path), "norms": norms,
    }
    if args.json:
        _print_json(info)
        return 0
    widths = " + ".join(f"{encoder} {width}" for encoder, width in embedding.widths.items())
    print(f"name:       {embedding.name}"
          + (f" (stored as {embedding.stored_name!r})" if embedding.stored_name
             and embedding.stored_name != embedding.name else ""))
    print(f"format:     {embedding.format} ({embedding.container})")
    print(f"family:     {embedding.family}  ({widths})")
    print(f"vectors:    {embedding.n_vectors}")
    print(f"sha256:     {embedding.sha256}  (short {embedding.short_hash})")
    print(f"step:       {embedding.step if embedding.step is not None else '-'}")
    if embedding.sd_checkpoint or embedding.sd_checkpoint_name:
        print(f"checkpoint: {embedding.sd_checkpoint_name or '-'} [{embedding.sd_checkpoint or '-'}]")
    for encoder, values in norms.items():
        print(f"norms {encoder}: " + " ".join(f"{n:.4f}" for n in values))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tiengine.embeddings.embedding import (
        SAVE_FORMATS,
        embedding_card,
        save_embedding,
    )
    from tiengine.errors import EmbeddingError
    from tiengine.io.atomic import OVERWRITE_HINT, FileExistsRefusal, check_file_path

    check_file_path(args.target)
    if Path(args.target).exists() and not args.overwrite:  # before reading IN, which may be large
        raise FileExistsRefusal(f"{args.target}: already exists ({OVERWRITE_HINT})")
    if args.preview is not None and (args.format or SAVE_FORMATS.get(Path(args.target).suffix.lower())) != "png":
        raise EmbeddingError(f"--preview: only PNG output carries a picture ({args.target} is not .png, "
                             "and no --format png)")
    picture = None if args.preview is None else _picture(args.preview)
    embedding = _load(args.source, args.name)
    card = None if picture is None else embedding_card(embedding, picture)
    written = save_embedding(embedding, args.target, format=args.format,
                             overwrite=args.overwrite, preview=card)
    if args.json:
        _print_json({"source": args.source, "target": str(written), "name": embedding.name,
                     "family": embedding.family, "vectors": embedding.n_vectors,
                     "format": args.format or written.suffix.lstrip(".")})
    else:
        print(f"wrote {written} ({embedding.family}, {embedding.n_vectors} vectors, "
              f"from {embedding.format})")
    return 0


def _picture(path: str) -> Any:
    """The picture of `--preview`, loaded (RGB)."""
    from PIL import Image, UnidentifiedImageError

    from tiengine.errors import EmbeddingError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise EmbeddingError(f"--preview {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise EmbeddingError(f"--preview {path}: not a readable image ({error})") from None


def _load(path: str, bundled_name: str | None) -> Any:
    """The embedding of `path`; `bundled_name` picks one of a LoRA file's bundled embeddings."""
    from tiengine.embeddings.embedding import load_bundled_embeddings, load_embedding
    from tiengine.errors import EmbeddingError

    if bundled_name is None:
        return load_embedding(path)
    bundled = load_bundled_embeddings(path)
    if bundled_name not in bundled:
        raise EmbeddingError(f"{path}: no bundled embedding {bundled_name!r} (has "
                             f"{', '.join(bundled)})")
    return bundled[bundled_name]


def _print_json(value: dict[str, Any]) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))
