"""`tiengine generate` (text to image, image to image, sampler comparison grids) and `tiengine info`.

Images are PNG files carrying the A1111-style `parameters` text (prompt, negative prompt, settings,
`TI hashes` of the embeddings used), which `tiengine info` and other tools read back. Existing files
are never replaced unless `--overwrite` is given. Progress bars on stderr ("loading model", then one per
sampler) are left out with `--json`; `load_engine` is shared with `tiengine encode`. `--hires-scale` /
`--hires-resize` turn on A1111's hires fix with a latent upscaler (a second pass at the larger size).

`generate --from-infotext FILE` (a picture, or a text file holding its parameters) makes an A1111 picture
again (tiengine.infotext): prompts and settings come from the infotext, and the options in
INFOTEXT_OPTIONS given on the command line win over it (their parser defaults are None, so that a given
value is told from a default). `info` prints the text and the same reading: the settings it maps to and
one line per key (mapped, checked, warning, not reproduced, info).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tiengine.cli import (
    CliError,
    add_encode_options,
    add_network_options,
    add_threads_option,
    apply_threads,
    check_threads,
    embeddings_folder,
    encode_options,
    network_report_lines,
    resolve_device,
)
from tiengine.diffusion.names import (
    LATENT_UPSCALERS,
    RNG_SOURCES,
    SAMPLER_NAMES,
    SCHEDULE_TYPES,
)

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SAMPLER_HELP = ", ".join(SAMPLER_NAMES)
SCHEDULE_HELP = ", ".join(kind.label for kind in SCHEDULE_TYPES)
# Options an infotext also says: given ones win over it. option dest -> setting (None: handled by name).
INFOTEXT_OPTIONS = {"negative": "negative_prompt", "sampler": "sampler", "scheduler": "scheduler", "steps": "steps",
                    "cfg": "cfg_scale", "seed": "seed", "size": None, "clip_skip": "clip_skip",
                    "emphasis": "emphasis", "strength": "strength", "rng": "rng", "subseed": "subseed",
                    "subseed_strength": "subseed_strength", "seed_resize_from": "seed_resize_from",
                    "eta_noise_seed_delta": "eta_noise_seed_delta", "hires_scale": "hires_scale",
                    "hires_resize": "hires_resize", "hires_steps": "hires_steps", "hires_upscaler": "hires_upscaler",
                    "eta": "eta"}


def register(subparsers: argparse._SubParsersAction) -> None:
    from tiengine.default_model import A1111_CFG_SCALE, DEFAULT_MODEL_CFG_SCALE

    parser = subparsers.add_parser(
        "generate",
        help="make images from a prompt (with embeddings, negative prompt, any sampler)",
        description="Generate images. With no --model, the small built-in model is used (see README).",
    )
    parser.add_argument("prompt", nargs="?",
                        help="the prompt (A1111 syntax: (word:1.2), [from:to:N], [a|b], AND, BREAK)")
    parser.add_argument("--from-infotext", type=Path, metavar="IMAGE_OR_TEXT_FILE",
                        help="make an A1111 picture again from its parameters (a PNG/JPEG/WebP, or a text file); "
                             "options given here win over it; prints what was mapped, checked and not reproduced")
    parser.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    parser.add_argument("--model", type=Path, help="model: converted folder, diffusers folder or .safetensors/.ckpt")
    parser.add_argument("--embeddings", type=Path, metavar="DIR",
                        help="folder of textual-inversion embeddings (default: $TIENGINE_EMBEDDINGS, if set)")
    parser.add_argument("--sampler", default="Euler a", help=f"one of: {SAMPLER_HELP} (default Euler a); A1111's aliases "
                                                             "(k_euler_a) and combined names (\"DPM++ 2M Karras\") too")
    parser.add_argument("--scheduler", metavar="TYPE",
                        help=f"schedule type, A1111's label or name in any case: {SCHEDULE_HELP} (default: the "
                             "sampler's own, A1111's Automatic)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--cfg", type=float,
                        help=f"classifier-free guidance scale (default {A1111_CFG_SCALE:g}; with the built-in model "
                             f"{DEFAULT_MODEL_CFG_SCALE:g}, the scale it follows prompts best at)")
    parser.add_argument("--seed", type=int, default=-1, help="seed; image i of a batch uses seed + i (-1: random)")
    parser.add_argument("--size", help="WIDTHxHEIGHT (default: the model's native size)")
    parser.add_argument("--rng", choices=RNG_SOURCES, default="cpu",
                        help="random source of the noise: cpu (default), gpu (torch on the CUDA card, A1111's default) "
                             "or nv (NVIDIA's GPU stream computed on any device: reproduces A1111's GPU seeds on a CPU)")
    parser.add_argument("--subseed", type=int, default=-1, help="A1111's variation seed (-1: random)")
    parser.add_argument("--subseed-strength", type=float, default=0.0,
                        help="A1111's variation strength, 0..1 (default 0: no variation)")
    parser.add_argument("--seed-resize-from", metavar="WxH",
                        help="A1111's \"Resize seed from\": keep the noise of this size, centred")
    parser.add_argument("--eta", type=float,
                        help="noise amount of the ancestral, SDE and DDIM samplers (default: A1111's, 1; DDIM 0)")
    parser.add_argument("--ensd", dest="eta_noise_seed_delta", type=int, default=0,
                        help="A1111's eta noise seed delta (ENSD), added to the seed of the noise drawn during sampling")
    parser.add_argument("--batch-size", type=int, default=1, help="images per run (default 1)")
    parser.add_argument("--clip-skip", type=int, default=1, help="CLIP layers to skip (SD1; default 1 = none)")
    add_encode_options(parser)
    add_network_options(parser)
    parser.add_argument("--init-image", type=Path, help="image-to-image: start from this picture")
    parser.add_argument("--strength", "--denoising", dest="strength", type=float, default=0.75,
                        help="denoising strength (0..1) of image to image, or with the hires fix of its second pass "
                             "(A1111's \"Denoising strength\"; default 0.75)")
    parser.add_argument("--hires-scale", type=float, metavar="X",
                        help="hires fix: denoise again at the size times X (A1111's \"Upscale by\")")
    parser.add_argument("--hires-resize", metavar="WxH",
                        help="hires fix: denoise again at WIDTHxHEIGHT pixels (0 for a side: keep the aspect ratio; "
                             "two sides: cover and crop)")
    parser.add_argument("--hires-steps", type=int, default=0,
                        help="hires fix: steps of the second pass (default 0: as many as --steps)")
    parser.add_argument("--hires-upscaler", default="Latent",
                        help=f"hires fix: one of A1111's latent upscalers: {', '.join(LATENT_UPSCALERS)} "
                             f"(default Latent)")
    parser.add_argument("--compare-samplers", metavar="A,B,C",
                        help="run each sampler with the same seed and write one grid, a labelled column each")
    parser.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG (default out.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda (default auto: cuda if "
                                                        "available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights dtype (default fp32)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode large images in tiles (less memory)")
    add_threads_option(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    parser.set_defaults(func=run_generate,
                        option_defaults={dest: parser.get_default(dest) for dest in INFOTEXT_OPTIONS})
    parser.set_defaults(**dict.fromkeys(INFOTEXT_OPTIONS))

    info = subparsers.add_parser("info", help="print the generation parameters stored in an image",
                                 description="Read the `parameters` text that tiengine and A1111 write into PNGs, "
                                             "and what `generate --from-infotext` would make of it.")
    info.add_argument("image", type=Path, help="a picture (PNG, JPEG, WebP) or a text file of its parameters")
    info.add_argument("--model", type=Path,
                      help="compare the Model hash with this model's (a file is hashed, not loaded)")
    info.add_argument("--device", default="auto",
                      help="the device generation would run on (for GPU noise: cuda draws it, else nv); default auto")
    info.add_argument("--json", action="store_true",
                      help="one JSON object: the parameters, and under \"reproduction\" the reading")
    info.set_defaults(func=run_info)


def run_generate(args: argparse.Namespace) -> int:
    args.seed_resize_from = _pixel_size(args.seed_resize_from, "--seed-resize-from", "512x768")
    args.hires_resize = _pixel_size(args.hires_resize, "--hires-resize", "1024x0 (0: keep the aspect ratio)")
    given = _given_options(args)
    text = None
    if args.from_infotext is not None:
        from tiengine.io.metadata import read_parameters_file

        text = read_parameters_file(args.from_infotext)
    elif args.prompt is None:
        raise CliError("a prompt is needed (or --from-infotext IMAGE_OR_TEXT_FILE)")
    width, height = _parse_size(args.size)
    samplers = _sampler_list(args)
    outputs = _output_paths(args, samplers)

    import torch
    from PIL import Image, UnidentifiedImageError

    from tiengine.io.metadata import save_png

    init_image = None
    if args.init_image is not None:
        try:
            init_image = Image.open(args.init_image)
            init_image.load()
        except (OSError, UnidentifiedImageError) as error:
            raise CliError(f"{args.init_image}: cannot read the init image: {error}") from error
    from tiengine.settings import GenerateSettings

    settings = GenerateSettings(
        steps=args.steps, sampler=samplers[0], scheduler=args.scheduler, cfg_scale=args.cfg, seed=args.seed,
        width=width, height=height, batch_size=args.batch_size, strength=args.strength, vae_tiling=args.vae_tiling,
        rng=args.rng, subseed=args.subseed, subseed_strength=args.subseed_strength,
        seed_resize_from=args.seed_resize_from, eta_noise_seed_delta=args.eta_noise_seed_delta, eta=args.eta,
        hires_scale=args.hires_scale, hires_resize=args.hires_resize,
        hires_steps=args.hires_steps, hires_upscaler=args.hires_upscaler, encode=encode_options(args),
    )
    engine = load_engine(args, getattr(torch, DTYPES[args.dtype]), width, height)
    notes = []
    if text is not None:
        settings, notes = _infotext_settings(engine, args, text, given, settings, init_image)
        samplers = samplers if args.compare_samplers else [settings.sampler]
    if settings.cfg_scale is None:
        settings = dataclasses.replace(settings, cfg_scale=engine.default_cfg_scale)  # the built-in model's own
    args.cfg = settings.cfg_scale
    columns = []
    summary = {"images": [], "applied_embeddings": [], "skipped_embeddings": [], "extra_networks": [], "warnings": []}
    if text is not None:
        summary["infotext_notes"] = [dataclasses.asdict(note) for note in notes]
    for sampler in samplers:
        settings = dataclasses.replace(settings, sampler=sampler)
        result = _run_one(engine, args, settings, init_image)
        settings = dataclasses.replace(settings, seed=result.seeds[0])  # a random seed is drawn once, shared
        columns.append((sampler, result.images))
        if len(samplers) == 1:
            for path, image, parameters in zip(outputs, result.images, result.parameters):
                save_png(image, path, parameters, overwrite=args.overwrite)
                summary["images"].append({"path": str(path), "seed": result.seeds[outputs.index(path)],
                                          "parameters": parameters})
        conditioning = result.conditioning
    if len(samplers) > 1:
        from tiengine.io.images import labelled_grid
        from tiengine.io.metadata import format_parameters

        grid = labelled_grid(columns)
        text = format_parameters(args.prompt, args.negative, {"Samplers": ", ".join(samplers), "Seed": settings.seed,
                                                              "Steps": settings.steps, "CFG scale": f"{args.cfg:g}"})
        save_png(grid, outputs[0], text, overwrite=args.overwrite)
        summary["images"].append({"path": str(outputs[0]), "seed": settings.seed, "samplers": samplers})
    summary["applied_embeddings"] = [
        {"name": a.name, "hash": a.short_hash, "prompt": a.prompt, "chunk": a.chunk, "slot": a.slot,
         "vectors": a.n_vectors, "weight": a.weight} for a in conditioning.applied
    ]
    summary["skipped_embeddings"] = [{"name": m.name, "reason": m.reason} for m in conditioning.skipped]
    summary["extra_networks"] = [report.as_dict() for report in conditioning.networks]
    summary["warnings"] = conditioning.warnings
    _report(summary, args.json, network_report_lines(conditioning.networks), [str(note) for note in notes])
    return 0


def _given_options(args: argparse.Namespace) -> dict[str, object]:
    """The INFOTEXT_OPTIONS given on the command line (dest -> value); the others get their defaults."""
    given = {dest: getattr(args, dest) for dest in INFOTEXT_OPTIONS if getattr(args, dest) is not None}
    for dest, default in args.option_defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    return given


def _infotext_settings(engine, args, text, given, settings, init_image):
    """The infotext's settings with the given options over them and the command's own (batch size, VAE
    tiling, encoding) applied; `args.prompt` / `args.negative` set to those run. Returns (settings, notes)."""
    from tiengine.infotext import engine_facts, parse_infotext, plan_reproduction
    from tiengine.settings import settings_with

    infotext = parse_infotext(text, where=str(args.from_infotext))
    overrides = {INFOTEXT_OPTIONS[dest]: value for dest, value in given.items() if INFOTEXT_OPTIONS[dest]}
    if "size" in given:
        overrides.update(width=settings.width, height=settings.height)
    if args.prompt is not None:
        overrides["prompt"] = args.prompt
    facts = engine_facts(engine, str(overrides.get("prompt", infotext.prompt)))
    plan = plan_reproduction(infotext, facts, init_image=init_image is not None, **overrides)
    args.prompt, args.negative = plan.prompt, plan.negative_prompt
    own = {"batch_size": settings.batch_size, "vae_tiling": settings.vae_tiling,
           **{name: getattr(settings.encode, name)
              for name in ("comma_backtrack", "bare_names", "keep_embeddings_on_backtrack")}}
    return settings_with(plan.settings, **own), list(plan.notes)


@contextmanager
def loading_bar(disable: bool) -> Iterator:
    """A "loading model" tqdm bar on stderr, one step per model component; yields Engine.load's `progress`."""
    from tqdm import tqdm

    with tqdm(desc="loading model", unit="part", file=sys.stderr, disable=disable) as bar:
        def advance(component: str, loaded: int, total: int) -> None:
            bar.total = total
            bar.set_postfix_str(component, refresh=False)
            bar.update(loaded - bar.n)

        yield advance


def load_engine(args: argparse.Namespace, dtype, width: int | None = None, height: int | None = None):
    """The Engine of `--model`, `--embeddings`, `--device` and `dtype`, with a loading bar unless `--json`;
    then torch's CPU threads for it (`--threads`, else the environment's, else tiengine.threads' choice for
    the model at width x height pixels, None: its native size)."""
    from tiengine.engine import Engine

    threads = getattr(args, "threads", None)
    check_threads(threads)
    with loading_bar(args.json) as progress:
        engine = Engine.load(args.model, embeddings=embeddings_folder(args.embeddings),
                             device=resolve_device(args.device), dtype=dtype, progress=progress,
                             loras=getattr(args, "loras", None), hypernetworks=getattr(args, "hypernetworks", None))
    apply_threads(threads, engine.config, width, height)
    return engine


def _run_one(engine, args, settings, init_image):
    from tqdm import tqdm

    with tqdm(total=settings.steps, desc=settings.sampler, unit="step", file=sys.stderr, disable=args.json) as bar:
        def advance(step, total, x, denoised):
            bar.total = total
            bar.update(1)

        if init_image is not None:
            return engine.img2img(init_image, args.prompt, args.negative, settings=settings, callback=advance)
        return engine.generate(args.prompt, args.negative, settings=settings, callback=advance)


def _report(summary: dict, as_json: bool, network_lines: list[str], note_lines: list[str]) -> None:
    from tiengine.io.metadata import valid_text

    if as_json:
        print(valid_text(json.dumps(summary, ensure_ascii=False)))
        return
    for line in note_lines:
        print(valid_text(line))
    for image in summary["images"]:
        print(valid_text(f"wrote {image['path']} (seed {image['seed']})"))
    for applied in summary["applied_embeddings"]:
        print(f"embedding {applied['name']} [{applied['hash'] or 'no file'}] in the {applied['prompt']} prompt: "
              f"chunk {applied['chunk']}, slots {applied['slot']}-{applied['slot'] + applied['vectors'] - 1}, "
              f"weight {applied['weight']:.4g}")
    for skipped in summary["skipped_embeddings"]:
        print(f"embedding {skipped['name']} skipped: {skipped['reason']}")
    for line in network_lines:
        print(valid_text(line))
    for warning in summary["warnings"]:
        print(f"warning: {warning}")


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    try:
        width, height = (int(part) for part in size.lower().split("x"))
    except ValueError:
        raise CliError(f"--size must be WIDTHxHEIGHT, e.g. 512x512; got {size!r}") from None
    return width, height


def _pixel_size(size: str | None, option: str, example: str) -> tuple[int, int] | None:
    """WIDTHxHEIGHT in pixels given to `option` (None when not given); a CliError naming the option."""
    if size is None:
        return None
    try:
        width, height = (int(part) for part in size.lower().split("x"))
    except ValueError:
        raise CliError(f"{option} must be WIDTHxHEIGHT in pixels, e.g. {example}; got {size!r}") from None
    return width, height


def _sampler_list(args: argparse.Namespace) -> list[str]:
    from tiengine.diffusion.names import (
        SamplingError,
        schedule_name,
        split_sampler_name,
    )

    names = [args.sampler] if not args.compare_samplers else [s.strip() for s in args.compare_samplers.split(",")]
    try:
        for name in names:
            split_sampler_name(name)
        if args.scheduler is not None:
            schedule_name(args.scheduler)
    except SamplingError as error:
        raise CliError(str(error)) from None
    if args.steps < 1 or args.batch_size < 1:
        raise CliError("--steps and --batch-size must be at least 1")
    return names


def _output_paths(args: argparse.Namespace, samplers: list[str]) -> list[Path]:
    out: Path = args.out
    if out.suffix.lower() != ".png":
        raise CliError(f"--out must be a .png file (it carries the generation parameters), got {out}")
    if len(samplers) > 1 or args.batch_size == 1:
        paths = [out]
    else:
        paths = [out.with_name(f"{out.stem}-{index}{out.suffix}") for index in range(args.batch_size)]
    from tiengine.io.atomic import check_file_path

    for path in paths:
        check_file_path(path)
    existing = [str(path) for path in paths if path.exists()]
    if existing and not args.overwrite:
        raise CliError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")
    return paths


def run_info(args: argparse.Namespace) -> int:
    from tiengine.infotext import EngineFacts, parse_infotext, plan_reproduction
    from tiengine.io.metadata import parse_parameters, read_parameters_file, valid_text
    from tiengine.weights_conv.source import model_hash, model_name, old_model_hash

    text = read_parameters_file(args.image)
    device_type = resolve_device(args.device).split(":")[0]
    facts = EngineFacts(device_type=device_type) if args.model is None else EngineFacts(
        model_hash(args.model), old_model_hash(args.model), model_name(args.model), device_type=device_type)
    plan = plan_reproduction(parse_infotext(text, where=str(args.image)), facts)
    if args.json:
        print(valid_text(json.dumps({**parse_parameters(text), "reproduction": plan.as_dict()}, ensure_ascii=False)))
        return 0
    print(valid_text(text))
    settings = plan.as_dict()["settings"]
    print("\nsettings: " + ", ".join(f"{name}={value!r}" for name, value in settings.items()))
    for note in plan.notes:
        print(valid_text(str(note)))
    return 0
