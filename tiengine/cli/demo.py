"""`tiengine demo`: textual inversion end to end on the built-in model, in a few minutes on a CPU.

Renders 5 images of objects in a colour the model has no word for (purple), learns an embedding from
them, generates held-out prompts with and without it, and prints how often the colour appears (see
tiengine.toyworld.demo). Everything goes into one folder: the training images, the embedding, an image grid and
scores.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tiengine.cli import add_threads_option, apply_threads, check_threads, model_config


def register(subparsers: argparse._SubParsersAction) -> None:
    # the recipe's constants import no torch; tiengine.toyworld.demo (which does) loads when the command runs
    from tiengine.toyworld.demo_recipe import CONCEPT_NAME, TRAIN_STEPS

    parser = subparsers.add_parser(
        "demo",
        help="learn a new concept from 5 images and show it in generated images (a few minutes on a CPU)",
        description="Textual inversion end to end on the built-in model: render 5 images of objects in a "
                    "colour the model has no word for, train the embedding "
                    f"'{CONCEPT_NAME}' on them, generate held-out prompts with and without it, print how often "
                    "the colour appears and write an image grid.",
    )
    parser.add_argument("--out", type=Path, default=Path("tiengine-demo"),
                        help="folder for images, embedding, grid and scores (default ./tiengine-demo)")
    parser.add_argument("--model", type=Path, help="model folder (default: the built-in toy-world model)")
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS, metavar="N",
                        help=f"training steps (default {TRAIN_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images, the training and the sampling")
    add_threads_option(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier demo in --out")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON instead of text")
    parser.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tiengine.toyworld.demo import STAGES, run_demo

    check_threads(args.threads)
    apply_threads(args.threads, model_config(args.model))  # the demo runs at the model's native size
    bars: dict[str, tqdm] = {}
    units = {"training": "step", "scoring and writing": "item"}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            if not args.json:  # a header before each stage's bar, on stderr with the bars
                number = STAGES.index(stage) + 1 if stage in STAGES else "?"
                print(f"[{number}/{len(STAGES)}] {stage}", file=sys.stderr, flush=True)
            bar = bars[stage] = tqdm(total=total, desc=stage, unit=units.get(stage, "image"),
                                     file=sys.stderr, disable=args.json, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    report = run_demo(args.out, model=args.model, seed=args.seed, train_steps=args.steps,
                      overwrite=args.overwrite, progress=progress)
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(report), ensure_ascii=False))
        return 0
    print("\n".join(report.summary_lines()))
    print(f"embedding: {report.embedding_path}")
    print(f"image grid: {report.grid_path}")
    print(f"the same training from the command line: {report.train_command}")
    return 0
