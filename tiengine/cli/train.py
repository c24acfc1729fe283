"""`tiengine train-embedding`: learn a textual-inversion embedding from a folder of 3-5+ images.

The model stays frozen; only the new vectors are trained (tiengine.training.textual_inversion). The embedding is written
to `--out` (default `NAME.safetensors`), checkpoints, the loss log (`loss.csv`) and previews go to a
hidden work folder beside it, and `--resume` continues an interrupted run exactly, with the settings the
checkpoint recorded: only the options typed on the command line count as changes (they default to None
here, so a typed value is told apart from a default). Ctrl-C saves the state and exits with status 130.
A progress bar shows the loss and the time left; `--json` prints a summary instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tiengine.cli import add_threads_option, check_threads

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# argparse destination -> TrainEmbeddingSettings field, for every option that is a training setting.
SETTING_OPTIONS = {
    "vectors": "vectors", "init_text": "init_text", "steps": "steps", "batch_size": "batch_size",
    "grad_accum": "grad_accum", "lr": "learning_rate", "template": "template", "seed": "seed",
    "resolution": "resolution", "flip": "flip", "alpha_weight": "alpha_weight", "grad_clip": "grad_clip",
    "mixed_precision": "mixed_precision", "save_every": "save_every", "preview_every": "preview_every",
    "preview_prompt": "preview_prompt", "allow_word_name": "allow_word_name",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-embedding",
        help="learn a textual-inversion embedding from a few images (the model stays frozen)",
        description="Train a new embedding on IMAGES_DIR (images, optional NAME.txt captions beside them). "
                    "With no --model, the small built-in model is used.",
    )
    parser.add_argument("images", type=Path, metavar="IMAGES_DIR", help="folder of training images")
    parser.add_argument("--name", required=True, help="the embedding's name (the word you will type in prompts)")
    parser.add_argument("--model", type=Path, help="model: converted folder, diffusers folder or .safetensors/.ckpt")
    parser.add_argument("--embeddings", type=Path, metavar="DIR",
                        help="embeddings the templates may mention, as at generation time (default: "
                             "$TIENGINE_EMBEDDINGS, if set)")
    parser.add_argument("--init-text", metavar="TEXT",
                        help="words whose token vectors start the embedding (default '*'; '' = zeros)")
    parser.add_argument("--vectors", type=int, metavar="N", help="vectors per token, 1..75 (default 1)")
    parser.add_argument("--steps", type=int, metavar="S", help="optimizer steps (default 1000)")
    parser.add_argument("--batch-size", type=int, metavar="B", help="images per micro-batch (default 1)")
    parser.add_argument("--grad-accum", type=int, metavar="A",
                        help="micro-batches per optimizer step (default 1)")
    parser.add_argument("--lr", metavar="SCHEDULE",
                        help="learning rate or schedule, e.g. '0.005:100, 1e-3:1000, 1e-5' (default 0.005)")
    parser.add_argument("--template", metavar="FILE|object|style",
                        help="prompt templates with [name]/[filewords]: object, style, object-filewords, "
                             "style-filewords or a file (default: object, or object-filewords with captions)")
    parser.add_argument("--seed", type=int, help="seed of every random draw (-1: random; default 0)")
    parser.add_argument("--save-every", type=int, metavar="K",
                        help="checkpoint every K steps (0: only at the end; default 500)")
    parser.add_argument("--out", type=Path, help="embedding file: .safetensors (default NAME.safetensors), .pt or .png")
    parser.add_argument("--also", metavar="FORMATS",
                        help="more formats written beside --out, e.g. 'pt,png' (A1111 .pt, PNG with the embedding; "
                             "--resume: the run's unless given)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint of this --out, with its settings (options given "
                             "here may raise --steps or change checkpoint/preview options; one that changes the run "
                             "is refused)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs / start a run over")
    parser.add_argument("--work-dir", type=Path, help="checkpoints, loss.csv, previews (default .OUT.training/)")
    parser.add_argument("--resolution", type=int, metavar="PX", help="training image size (default: the model's)")
    parser.add_argument("--flip", action="store_true", default=None, help="also train on mirrored images")
    parser.add_argument("--alpha-weight", action="store_true", default=None, help="weight the loss by the images' alpha channel")
    parser.add_argument("--grad-clip", type=float, metavar="X", help="clip the gradient norm to X")
    parser.add_argument("--mixed-precision", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast on GPU (default auto: bf16, fp16 where bf16 is missing; CPU: fp32)")
    parser.add_argument("--preview-every", type=int, metavar="K", help="preview image every K steps (default 0: none)")
    parser.add_argument("--preview-prompt", metavar="TEXT", help="prompt of the previews (default: the first template)")
    parser.add_argument("--allow-word-name", action="store_true", default=None,
                        help="allow a name that is an ordinary vocabulary word (it then replaces that word)")
    parser.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda (default auto: cuda if "
                                                        "available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model weights dtype (default fp32)")
    add_threads_option(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of a progress bar")
    parser.set_defaults(func=run_train_embedding)


def run_train_embedding(args: argparse.Namespace) -> int:
    import torch

    from tiengine.cli.generate import load_engine
    from tiengine.training.textual_inversion import (
        TrainingInterrupted,
        settings_from_options,
    )

    check_threads(args.threads)  # applied by load_engine once the model is known
    also = [fmt.strip() for fmt in (args.also or "").split(",") if fmt.strip()]
    given = {field: getattr(args, dest) for dest, field in SETTING_OPTIONS.items() if getattr(args, dest) is not None}
    settings = settings_from_options(**given)
    out = args.out or Path(f"{args.name}.safetensors")
    stage = _stage_printer(args.json)
    stage("loading model")
    engine = load_engine(args, getattr(torch, DTYPES[args.dtype]))
    stage(f"training {args.name}: reading the images and caching their latents, then the steps")
    from tqdm import tqdm

    try:
        with tqdm(total=settings.steps, desc=f"training {args.name}", unit="step", file=sys.stderr,
                  disable=args.json, dynamic_ncols=True) as bar:
            def advance(progress) -> None:
                if bar.total != progress.steps:
                    bar.total = progress.steps
                if bar.n == 0 and progress.step > 1:  # a resumed run: count (and time) from where it left off
                    bar.initial = bar.n = progress.step - 1
                bar.set_postfix(loss=f"{progress.loss:.4f}", lr=f"{progress.learning_rate:.3g}", refresh=False)
                bar.update(progress.step - bar.n)

            # only the typed settings are given: with --resume the others come from the checkpoint
            result = engine.train_embedding(args.images, args.name, out=out, also_save=tuple(also),
                                            work_dir=args.work_dir, overwrite=args.overwrite, resume=args.resume,
                                            callback=advance, **given)
    except TrainingInterrupted as interrupted:
        print(f"tiengine train-embedding: interrupted at step {interrupted.step}; resume with --resume "
              f"(state saved in {interrupted.state_path})", file=sys.stderr)
        return 130
    summary = {
        "name": result.name, "steps": result.steps_done, "seed": result.seed,
        "resumed_from": result.resumed_from,
        "final_loss": result.losses[-1].loss if result.losses else None,
        "outputs": [str(path) for path in result.outputs],
        "work_dir": str(result.work_dir) if result.work_dir is not None else None,
        "warnings": result.warnings,
    }
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
        return 0
    for warning in result.warnings:
        print(f"warning: {warning}")
    if result.resumed_from is not None:
        print(f"resumed at step {result.resumed_from}")
    for path in result.outputs:
        print(f"wrote {path} ({result.steps_done} steps, seed {result.seed})")
    print(f"checkpoints, loss.csv and previews: {result.work_dir}")
    return 0


def _stage_printer(quiet: bool):
    """A header on stderr before each stage's progress bar: "[n/2] what"; nothing with --json."""
    stages = iter(range(1, 3))

    def stage(what: str) -> None:
        number = next(stages)
        if not quiet:
            print(f"[{number}/2] {what}", file=sys.stderr, flush=True)

    return stage
