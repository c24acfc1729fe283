"""A whole 512x512, 20-step generation: `tiengine generate` against diffusers' StableDiffusionPipeline.

The model: the full-size SD1.5 architecture (UNet 859.5M, VAE 83.7M, CLIP-L 123.1M parameters) with
random weights (torch.manual_seed(--seed-weights) then diffusers' / transformers' own initialisation),
saved once as a diffusers folder in --workdir with the real SD1.5 tokenizer files from the wild folder
(../shared/wild/models/sd15_runwayml_mirror_HDRJ-One/tokenizer) and an EulerDiscreteScheduler config.
Both sides read that same folder.

Each side runs in a fresh process, timed from its start to the PNG on disk (imports, model load, text
encoding, 20 Euler steps with CFG 7, VAE decode, writing the image), its peak resident memory taken from
its own VmHWM read every 50 ms while it runs:
- tiengine: the `tiengine generate` command line (`--model FOLDER --sampler Euler --steps 20 --size
  512x512 --seed S --cfg 7 --out FILE`), the default thread policy;
- diffusers: a Python process that loads `StableDiffusionPipeline.from_pretrained(FOLDER)` (fp32, no
  safety checker) and calls it with the same prompt, seed (a CPU generator), guidance and the sigmas
  tiengine's Euler uses (A1111's schedule, passed as `sigmas=`), then saves the PNG.
The runs alternate (tiengine first, then diffusers, --repeat times); times are medians, memory the
largest peak. The two images are compared: largest and mean absolute difference in 8-bit levels.

    python benchmarks/generate.py [--workdir DIR] [--repeat 1] [--steps 20] [--size 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tiengine.io.atomic import atomic_write_bytes

REPO = Path(__file__).resolve().parent.parent
WILD_TOKENIZER = REPO.parent / "shared" / "wild" / "models" / "sd15_runwayml_mirror_HDRJ-One" / "tokenizer"
PROMPT = "a photograph of an astronaut riding a horse, highly detailed"
NEGATIVE = "blurry, low quality"
CFG_SCALE = 7.0
POLL_SECONDS = 0.05  # how often a running side's peak resident set is read
SCHEDULER = dict(_class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
                 timestep_spacing="linspace", prediction_type="epsilon")  # fmt: skip


def build_model(folder: Path, seed: int) -> None:
    """The random full-size SD1.5 diffusers folder (see the module docstring)."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    )  # fmt: skip
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        hidden_act="quick_gelu", max_position_embeddings=77, projection_dim=768,
    ))  # fmt: skip
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    unet.save_pretrained(staging / "unet")
    vae.save_pretrained(staging / "vae")
    text.save_pretrained(staging / "text_encoder")
    shutil.copytree(WILD_TOKENIZER, staging / "tokenizer")
    (staging / "scheduler").mkdir()
    (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (staging / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    }))  # fmt: skip
    staging.rename(folder)


def euler_sigmas(steps: int) -> list[float]:
    """The sigmas tiengine's Euler runs (A1111's Automatic schedule for it), without the final 0."""
    from tiengine.diffusion.samplers import resolve_sampler, resolve_schedule
    from tiengine.diffusion.schedules import NoiseSchedule, get_sigmas

    info, _ = resolve_sampler("Euler")
    sigmas = get_sigmas(NoiseSchedule.from_betas(), steps, resolve_schedule(info, None),
                        discard_penultimate=info.discard_penultimate_sigma)  # fmt: skip
    assert float(sigmas[-1]) == 0.0
    return [float(sigma) for sigma in sigmas[:-1]]


def diffusers_child(folder: str, out: str, steps: int, size: int, seed: int) -> None:
    """The diffusers side, run in its own process (--child diffusers)."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers
    import torch

    diffusers.utils.logging.disable_progress_bar()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                             local_files_only=True)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, negative_prompt=NEGATIVE, height=size, width=size, guidance_scale=CFG_SCALE,
                 sigmas=euler_sigmas(steps), generator=torch.Generator("cpu").manual_seed(seed)).images[0]  # fmt: skip
    image.save(out)


def peak_resident_bytes(pid: int) -> int | None:
    """VmHWM of a running process (its peak resident set since its exec), None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def run_side(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run one side to completion: wall seconds and peak resident bytes.

    The peak is the child's own VmHWM, read every POLL_SECONDS until it exits (wait4's ru_maxrss would
    also count this process's resident set, which a forked child inherits until its exec)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, env=env, cwd=tempfile.gettempdir(), stdout=log, stderr=subprocess.STDOUT)
        peak = 0
        while process.poll() is None:
            peak = max(peak, peak_resident_bytes(process.pid) or 0)
            time.sleep(POLL_SECONDS)
        wall = time.perf_counter() - start
        if process.returncode:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise SystemExit(f"{command[0]} ... exited with {process.returncode}")
    return {"wall_s": wall, "peak_bytes": peak}


def image_difference(a: Path, b: Path) -> dict[str, float]:
    from PIL import Image

    first = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    second = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    difference = np.abs(first - second)
    return {"max_levels": int(difference.max()), "mean_levels": float(difference.mean()),
            "share_within_1": float((difference <= 1).mean())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="where the model (4.3 GB) and images go; default: a temp dir")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512, help="image width and height in pixels")
    parser.add_argument("--seed", type=int, default=1, help="the image seed")
    parser.add_argument("--seed-weights", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "diffusers":
        diffusers_child(args.folder, args.out, args.steps, args.size, args.seed)
        return
    if not WILD_TOKENIZER.is_dir():
        raise SystemExit(f"{WILD_TOKENIZER}: the SD1.5 tokenizer files are needed (the shared wild folder)")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tiengine-generate-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    folder = workdir / f"sd15-random-seed{args.seed_weights}"
    if not folder.is_dir():
        build_model(folder, args.seed_weights)

    env = dict(os.environ, DIFFUSERS_VERBOSITY="error", TRANSFORMERS_VERBOSITY="error")
    tiengine_cli = Path(sys.executable).with_name("tiengine")
    sides = {
        "tiengine": lambda out: [str(tiengine_cli), "generate", PROMPT, "--negative", NEGATIVE, "--model", str(folder),
                                 "--sampler", "Euler", "--steps", str(args.steps), "--cfg", f"{CFG_SCALE:g}",
                                 "--size", f"{args.size}x{args.size}", "--seed", str(args.seed), "--out", str(out),
                                 "--overwrite"],
        "diffusers": lambda out: [sys.executable, __file__, "--child", "diffusers", "--folder", str(folder),
                                  "--out", str(out), "--steps", str(args.steps), "--size", str(args.size),
                                  "--seed", str(args.seed)],
    }  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    images = {name: workdir / f"{name}.png" for name in sides}
    for _ in range(args.repeat):
        for name, command in sides.items():
            images[name].unlink(missing_ok=True)
            runs[name].append(run_side(command(images[name]), env))
            print(f"{name}: {runs[name][-1]['wall_s']:.1f} s, peak {runs[name][-1]['peak_bytes'] / 1e9:.2f} GB",
                  flush=True)  # fmt: skip
    summary = {
        name: {"wall_s": statistics.median(r["wall_s"] for r in result), "peak_bytes": max(r["peak_bytes"] for r in result)}
        for name, result in runs.items()
    }  # fmt: skip
    difference = image_difference(images["tiengine"], images["diffusers"])

    import diffusers
    import torch

    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"# {args.size}x{args.size}, {args.steps} Euler steps, CFG {CFG_SCALE:g}, full-size SD1.5 random weights, fp32")
    print(f"# cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}; load average at the end {' '.join(load)}; median of {args.repeat}")  # fmt: skip
    for name, result in summary.items():
        print(f"{name:<10} {result['wall_s']:>8.1f} s   peak {result['peak_bytes'] / 1e9:>6.2f} GB")
    ratio_time = summary["diffusers"]["wall_s"] / summary["tiengine"]["wall_s"]
    ratio_memory = summary["tiengine"]["peak_bytes"] / summary["diffusers"]["peak_bytes"]
    print(f"time: diffusers / tiengine = {ratio_time:.2f}x; peak memory: tiengine / diffusers = {ratio_memory:.2f}x")
    print(f"images: max |difference| {difference['max_levels']} levels, mean {difference['mean_levels']:.3f}, "
          f"{100 * difference['share_within_1']:.1f}% of values within 1 level")  # fmt: skip
    if args.json:
        report = {"runs": runs, "summary": summary, "difference": difference, "size": args.size, "steps": args.steps,
                  "load_average": load, "torch": torch.__version__, "diffusers": diffusers.__version__}  # fmt: skip
        atomic_write_bytes(args.json, json.dumps(report, indent=2).encode(), overwrite=True)


if __name__ == "__main__":
    main()
