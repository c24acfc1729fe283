"""`weights-conv`: inspect and convert Stable Diffusion checkpoints.

    weights-conv inspect CKPT [--json] [--prediction {epsilon,v}] [--family {sd1,sd2,sdxl}] [--vae VAE] [--no-ema]
    weights-conv convert CKPT OUTDIR [--dtype {fp32,fp16,bf16}] [--overwrite] [same options]

`inspect --json` prints one JSON object (family, prediction, components {name: {params, dtype, ...}},
ema, key accounting, how each fact was detected, any mismatch under "problems"); without --json, a
readable summary. `convert` writes OUTDIR/config.json and one safetensors file per component (unet,
vae, text_encoder[, text_encoder_2]) in tiengine's tensor names, and OUTDIR/source.json with the A1111
name and hashes of the checkpoint file converted (tiengine.weights_conv.source: a converted model's
infotext names the file the user has); `Engine.load` reads that folder, as it reads every input `inspect`
accepts. Exit status: 0 done, 1 inspect found problems, 2 refused input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

from tiengine.errors import TiengineError

DTYPE_CHOICES = ("fp32", "fp16", "bf16")
# Every file a converted folder can hold (SD1/SD2: no text_encoder_2; the SDXL refiner: no text_encoder).
FOLDER_FILES = ("unet.safetensors", "vae.safetensors", "text_encoder.safetensors", "text_encoder_2.safetensors",
                "source.json", "config.json")


def convert_checkpoint(
    path: str | os.PathLike[str],
    outdir: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    family: str | None = None,
    prediction: str | None = None,
    vae: str | os.PathLike[str] | None = None,
    ema: bool = True,
    ignore_unknown: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Convert any supported input into a tiengine model folder; returns the folder.

    An `outdir` holding any converted-model file is refused before the checkpoint is read, unless `overwrite`.
    progress(component, tensors written, total tensors): see `OpenModel.write_folder`.
    """
    from tiengine.weights_conv.convert import DTYPE_NAMES, open_model

    refuse_existing_output(outdir, overwrite)
    with open_model(
        path, family=family, prediction=prediction, vae=vae, ema=ema, ignore_unknown=ignore_unknown
    ) as model:
        return model.write_folder(outdir, dtype=DTYPE_NAMES[dtype] if dtype else None, overwrite=overwrite,
                                  progress=progress)


def refuse_existing_output(outdir: str | os.PathLike[str], overwrite: bool) -> None:
    """FileExistsRefusal if `outdir` holds any file a converted folder can hold and `overwrite` is False."""
    from tiengine.io.atomic import OVERWRITE_HINT, FileExistsRefusal, check_folder_path

    check_folder_path(outdir)
    existing = [str(Path(outdir) / name) for name in FOLDER_FILES if (Path(outdir) / name).exists()]
    if existing and not overwrite:
        raise FileExistsRefusal(f"{outdir}: would replace {', '.join(existing)} ({OVERWRITE_HINT})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weights-conv", description="Inspect and convert Stable Diffusion checkpoints."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_model_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "checkpoint", help="single file (.safetensors/.ckpt/.pt), diffusers folder or converted folder"
        )
        command.add_argument("--prediction", choices=("epsilon", "v"), help="override the detected prediction type")
        command.add_argument(
            "--family", choices=("sd1", "sd2", "sdxl"), help="assert the family (must match the weights)"
        )
        command.add_argument("--vae", help="replacement VAE file or diffusers vae/ folder")
        command.add_argument("--no-ema", dest="ema", action="store_false",
                             help="use model.diffusion_model.* even when model_ema.* weights are present")  # fmt: skip
        command.add_argument(
            "--ignore-unknown",
            action="store_true",
            help="list keys of no known component as ignored instead of refusing the file",
        )

    inspect = commands.add_parser("inspect", help="detect and describe a model")
    add_model_options(inspect)
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    convert = commands.add_parser("convert", help="write a tiengine model folder")
    add_model_options(convert)
    convert.add_argument("outdir", help="output folder")
    convert.add_argument("--dtype", choices=DTYPE_CHOICES, help="cast floating-point tensors (default: keep)")
    convert.add_argument("--overwrite", action="store_true", help="replace existing files in OUTDIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            return _inspect(args)
        refuse_existing_output(args.outdir, args.overwrite)  # before the stage line and any reading
        with _WriteProgress(args.checkpoint, args.outdir) as progress:
            folder = convert_checkpoint(
                args.checkpoint, args.outdir, dtype=args.dtype, overwrite=args.overwrite, family=args.family,
                prediction=args.prediction, vae=args.vae, ema=args.ema, ignore_unknown=args.ignore_unknown,
                progress=progress,
            )  # fmt: skip
        print(f"wrote {folder}")
        return 0
    except TiengineError as error:
        print(f"weights-conv {args.command}: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file error no stage turned into a named one: still one line, naming the file
        from tiengine.io.atomic import os_error_line

        print(f"weights-conv {args.command}: {os_error_line(error)}", file=sys.stderr)
        return 2


class _WriteProgress:
    """Stage lines and a tqdm bar over the tensors written, on stderr (stdout keeps the result line)."""

    def __init__(self, checkpoint: str, outdir: str) -> None:
        self.checkpoint, self.outdir = checkpoint, outdir
        self.bar: Any = None

    def __enter__(self) -> _WriteProgress:
        print(f"reading {self.checkpoint}: detecting the model and checking every component", file=sys.stderr,
              flush=True)
        return self

    def __call__(self, component: str, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            print(f"writing {total} tensors to {self.outdir}", file=sys.stderr, flush=True)
            self.bar = tqdm(total=total, unit="tensor", file=sys.stderr, dynamic_ncols=True)
        self.bar.set_description(component, refresh=False)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _inspect(args: argparse.Namespace) -> int:
    from tiengine.weights_conv.convert import open_model

    with open_model(args.checkpoint, family=args.family, prediction=args.prediction, vae=args.vae, ema=args.ema,
                    ignore_unknown=args.ignore_unknown) as model:  # fmt: skip
        report = model.inspect()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_summary(report))
    return 1 if report["problems"] else 0


def _summary(report: dict[str, Any]) -> str:
    lines = [
        f"{report['path']} ({report['layout']})",
        f"  family      {report['family']}" + (f" ({report['variant']})" if report["variant"] != "base" else ""),
        f"  prediction  {report['prediction']}  [{report['prediction_source']}]",
        f"  dtype       {report['dtype']}",
        "  components:",
    ]
    for name, component in report["components"].items():
        lines.append(
            f"    {name:<15} {component['params']:>14,} params  {component['tensors']:>5} tensors  "
            f"{component['dtype']}  from {component['source']}"
        )
    ema = report["ema"]
    lines.append(f"  ema         {'present' if ema['present'] else 'absent'}" + (", used" if ema["used"] else ""))
    keys = report["keys"]
    lines.append(f"  keys        {keys['total']} total, {keys['converted']} converted")
    for category, count in keys["ignored"].items():
        lines.append(f"    ignored   {count:>6}  {report['ignored_meaning'][category]}")
    for name, value in report["extras"].items():
        lines.append(f"  extra       {name}: {value}")
    lines.append("  detection:")
    for part, evidence in report["detection"].items():
        for line in evidence:
            lines.append(f"    {part}: {line}")
    for problem in report["problems"]:
        lines.append(f"  PROBLEM     {problem}")
    return "\n".join(lines)
