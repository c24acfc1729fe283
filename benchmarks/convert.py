"""Peak memory (and time) of reading a full-size SD1.5-shaped checkpoint: tiengine vs diffusers.

The checkpoint: random fp16 weights of the real SD1.5 architecture (UNet 859.5M, VAE 83.7M, CLIP-L
123.1M parameters: 2.13 GB) in the original single-file layout (names from the tests' independent
inverse mapping, tests/test_weights_conv.py), plus the schedule buffers. Written once into --workdir.

Each row runs in a fresh Python process. After its imports it records its resident set (baseline),
resets the kernel's peak counter (/proc/self/clear_refs "5") and reports the peak (VmHWM) reached by the
work: file pages mapped into the process count, as they do for any resident memory. Loaded models are
then read in full (a sum over every parameter), so lazily mapped weights are counted once used, as
they would be by the first generation. Rows:
- tiengine convert: `weights-conv convert` to a folder (tensors streamed one at a time).
- tiengine load fp16 / fp32: `tiengine.weights_conv.convert.load_models(..., dtype=...)`: modules in memory.
- diffusers fp16 / fp32: `StableDiffusionPipeline.from_single_file(..., torch_dtype=...)` with local
  configs (offline), the peer; the ratio column compares each row with the diffusers row of its dtype
  (fp16 for convert).
With --ckpt the same file is also saved as a pickled .ckpt ({"state_dict": ...}) and the tiengine
convert and diffusers rows are repeated on it.

The file is read once before measuring so every row starts with it in the page cache; time is the
median of --repeat runs, memory the largest peak. Prints a table (ratio to diffusers last) and, with
--json PATH, writes the numbers.

    python benchmarks/convert.py [--workdir DIR] [--repeat 3] [--ckpt] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tiengine.io.atomic import atomic_write_bytes

REPO = Path(__file__).resolve().parent.parent

SD15_UNET = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=64, in_channels=4,
                 out_channels=4, norm_num_groups=32, _class_name="UNet2DConditionModel")  # fmt: skip
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, in_channels=3,
                out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                norm_num_groups=32, sample_size=512, scaling_factor=0.18215, _class_name="AutoencoderKL")  # fmt: skip
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, hidden_act="quick_gelu", max_position_embeddings=77,
                 projection_dim=768, model_type="clip_text_model", architectures=["CLIPTextModel"])  # fmt: skip
SCHEDULER = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)  # fmt: skip
MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
               "safety_checker": [None, None], "feature_extractor": [None, None],
               "requires_safety_checker": False}  # fmt: skip


def memory_status() -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak since the last reset) in bytes, from /proc/self/status."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024  # kB
    return values


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS


# Building the inputs (parent process) ---------------------------------------------------------------


def write_checkpoint(path: Path) -> None:
    """Stream random fp16 tensors of the SD1.5 shapes into `path` in the original layout."""
    import diffusers
    import torch
    import transformers

    sys.path.insert(0, str(REPO / "tests"))
    from test_weights_conv import ldm_unet_name, ldm_vae_name
    from tiengine.weights_conv.readers import TensorInfo
    from tiengine.weights_conv.writer import write_safetensors

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**{k: v for k, v in SD15_UNET.items() if not k.startswith("_")})
        vae = diffusers.AutoencoderKL(**{k: v for k, v in SD15_VAE.items() if not k.startswith("_")})
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_CLIP))
    entries: list[tuple[str, TensorInfo]] = []
    for key, value in unet.state_dict().items():
        entries.append(
            (f"model.diffusion_model.{ldm_unet_name(key, SD15_UNET)}", TensorInfo(torch.float16, tuple(value.shape)))
        )
    for key, value in vae.state_dict().items():
        name, as_conv = ldm_vae_name(key, 4)
        shape = (*value.shape, 1, 1) if as_conv else tuple(value.shape)
        entries.append((f"first_stage_model.{name}", TensorInfo(torch.float16, shape)))
    for key, value in text.state_dict().items():
        if not key.endswith("position_ids"):
            entries.append(
                (f"cond_stage_model.transformer.text_model.{key}", TensorInfo(torch.float16, tuple(value.shape)))
            )
    entries += [
        (name, TensorInfo(torch.float32, (1000,))) for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev")
    ]
    generator = torch.Generator().manual_seed(0)

    def tensors():
        for name, info in entries:
            yield name, torch.randn(info.shape, generator=generator, dtype=info.dtype)

    write_safetensors(path, entries, tensors(), metadata={"format": "pt"}, overwrite=True)


def write_ckpt(safetensors_path: Path, path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(safetensors_path), "global_step": 0}, path)


def write_diffusers_configs(folder: Path) -> None:
    for name, config in (("unet", SD15_UNET), ("vae", SD15_VAE), ("text_encoder", SD15_CLIP), ("scheduler", SCHEDULER)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name / file).write_text(json.dumps(config))
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX))


# Measured runs (child processes) ----------------------------------------------------------------------


def child(kind: str, checkpoint: str, scratch: str) -> None:
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import torch

    if kind.startswith("diffusers"):
        import diffusers

        diffusers.utils.logging.disable_progress_bar()
    from tiengine.weights_conv.convert import load_models  # noqa: I001 (after the optional diffusers import)
    from tiengine.weights_conv import open_model

    baseline = memory_status()["VmRSS"]
    reset_peak()
    start = time.perf_counter()
    modules: list[torch.nn.Module] = []
    if kind == "tiengine-convert":
        with open_model(checkpoint) as model:
            model.write_folder(Path(scratch) / "converted", overwrite=True)
    elif kind.startswith("tiengine-load"):
        _, loaded = load_models(checkpoint, dtype=torch.float16 if kind.endswith("fp16") else torch.float32)
        modules = list(loaded.values())
    elif kind.startswith("diffusers"):
        pipe = diffusers.StableDiffusionPipeline.from_single_file(
            checkpoint, config=str(Path(scratch) / "configs"), local_files_only=True,
            torch_dtype=torch.float16 if kind.endswith("fp16") else torch.float32,
            tokenizer=None, safety_checker=None, feature_extractor=None,
        )  # fmt: skip
        modules = [pipe.unet, pipe.vae, pipe.text_encoder]
    else:
        raise SystemExit(f"unknown kind {kind}")
    wall = time.perf_counter() - start
    if modules:  # use every weight once
        assert sum(p.numel() for m in modules for p in m.parameters()) == 1_066_235_307
        with torch.no_grad():
            sum(float(p.sum(dtype=torch.float32)) for m in modules for p in m.parameters())
    print(json.dumps({"peak": memory_status()["VmHWM"], "baseline": baseline, "wall_s": wall}))


def measure(kind: str, checkpoint: Path, scratch: Path, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--checkpoint", str(checkpoint), "--workdir", str(scratch)],
            check=True, capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "peak_bytes": max(r["peak"] for r in runs),
        "baseline_bytes": max(r["baseline"] for r in runs),
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "runs": len(runs),
    }


def read_through(path: Path) -> None:
    with open(path, "rb") as file:
        while file.read(1 << 24):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="where the 2 GB checkpoint (and outputs) go; default: a temp dir")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ckpt", action="store_true", help="also measure a pickled .ckpt of the same weights")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.checkpoint, str(args.workdir))
        return

    import diffusers
    import safetensors
    import torch

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tiengine-convert-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / "sd15-random-fp16.safetensors"
    if not checkpoint.is_file():
        write_checkpoint(checkpoint)
    write_diffusers_configs(workdir / "configs")
    inputs = [checkpoint]
    if args.ckpt:
        ckpt = workdir / "sd15-random-fp16.ckpt"
        if not ckpt.is_file():
            write_ckpt(checkpoint, ckpt)
        inputs.append(ckpt)

    size = checkpoint.stat().st_size
    rows = []
    for path in inputs:
        read_through(path)
        kinds = ["tiengine-convert", "tiengine-load-fp16", "diffusers-fp16", "tiengine-load-fp32", "diffusers-fp32"]
        if path.suffix == ".ckpt":
            kinds = ["tiengine-convert", "tiengine-load-fp16", "diffusers-fp16"]
        results = {kind: measure(kind, path, workdir, args.repeat) for kind in kinds}
        for kind, result in results.items():
            peer = results["diffusers-fp32" if kind.endswith("fp32") else "diffusers-fp16"]["peak_bytes"]
            rows.append(
                {"input": path.suffix, "kind": kind, **result, "ratio_to_diffusers": result["peak_bytes"] / peer}
            )

    gib = 1024**3
    print(
        f"# weights_conv peak memory: SD1.5-shaped random fp16 checkpoint, {size / 1e9:.2f} GB ({size / gib:.2f} GiB)"
    )
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    versions = (f"python {platform.python_version()}, torch {torch.__version__}, "
                f"safetensors {safetensors.__version__}, diffusers {diffusers.__version__}")  # fmt: skip
    print(f"# cpu: {machine}; {versions}; peak = VmHWM of a fresh process after its imports; median of {args.repeat}")
    header = (f"{'input':<13} {'run':<20} {'imports GiB':>12} {'peak GiB':>9} {'added GiB':>10} {'added/file':>11} "
              f"{'wall s':>8} {'peak vs diffusers':>18}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        added = row["peak_bytes"] - row["baseline_bytes"]
        print(f"{row['input']:<13} {row['kind']:<20} {row['baseline_bytes'] / gib:>12.2f} "
              f"{row['peak_bytes'] / gib:>9.2f} {added / gib:>10.2f} {added / size:>11.2f} {row['wall_s']:>8.1f} "
              f"{row['ratio_to_diffusers']:>18.2f}")  # fmt: skip
    if args.json:
        report = {"file_bytes": size, "rows": rows, "torch": torch.__version__, "diffusers": diffusers.__version__}
        atomic_write_bytes(args.json, json.dumps(report, indent=2).encode(), overwrite=True)


if __name__ == "__main__":
    main()
