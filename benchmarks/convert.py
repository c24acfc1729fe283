"""Peak memory (and time) of converting and loading full-size single-file checkpoints: tiengine vs diffusers.

One checkpoint per family (--family, default all three), random fp16 weights of the real architecture
in the original single-file layout (names from the tests' independent inverse mapping,
tests/test_weights_conv.py), plus the schedule buffers, written once into --workdir:
- sd1: SD1.5 (UNet 859.5M, VAE 83.7M, CLIP-L 123.1M parameters: 2.13 GB);
- sd2-v: SD2.x 768-v (UNet 865.9M, VAE, OpenCLIP ViT-H text tower of 24 layers as the files hold it,
  with its fused in_proj and transposed projection: 2.58 GB);
- sdxl: SDXL base (UNet 2.57G, VAE, CLIP-L and OpenCLIP bigG: 6.94 GB).

Each row runs in a fresh Python process. After its imports it records its resident set (baseline),
resets the kernel's peak counter (/proc/self/clear_refs "5") and reports the peak (VmHWM) reached by the
work: file pages mapped into the process count, as they do for any resident memory. Loaded models are
then read in full (a sum over every parameter), so lazily mapped weights are counted once used, as
they would be by the first generation. Rows:
- tiengine convert: `weights-conv convert` to a folder (tensors streamed one at a time).
- tiengine load fp16 / fp32: `tiengine.weights_conv.convert.load_models(..., dtype=...)`: modules in memory.
- diffusers fp16 / fp32: the family's pipeline `.from_single_file(..., torch_dtype=...)` with local
  configs (offline), the peer; the ratio column compares each row with the diffusers row of its dtype
  (fp16 for convert). fp32 rows are measured for sd1 only (--fp32 adds them for every family).
The "bound" column is the conversion target: added memory at most 1.5x the file + 0.8 GB (shown for the
rows that keep the file's dtype; an fp32 load of an fp16 file holds twice its bytes by definition).
With --ckpt the same file is also saved as a pickled .ckpt ({"state_dict": ...}) and the tiengine
convert and diffusers rows are repeated on it.

The file is read once before measuring so every row starts with it in the page cache; time is the
median of --repeat runs, memory the largest peak. Prints a table (ratio to diffusers last) and, with
--json PATH, writes the numbers.

    python benchmarks/convert.py [--family sd1,sd2-v,sdxl] [--workdir DIR] [--repeat 3] [--ckpt] [--json out.json]
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
BOUND_FILE_RATIO, BOUND_EXTRA_BYTES = 1.5, 0.8e9  # the conversion target: added peak <= 1.5 x file + 0.8 GB

SD15_UNET = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=64, in_channels=4,
                 out_channels=4, norm_num_groups=32, _class_name="UNet2DConditionModel")  # fmt: skip
SD2_UNET = dict(SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                sample_size=96)  # fmt: skip
SDXL_UNET = dict(block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128, in_channels=4, out_channels=4,
                 norm_num_groups=32, _class_name="UNet2DConditionModel")  # fmt: skip
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, in_channels=3,
                out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                norm_num_groups=32, sample_size=512, scaling_factor=0.18215, _class_name="AutoencoderKL")  # fmt: skip
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, hidden_act="quick_gelu", max_position_embeddings=77,
              projection_dim=768, model_type="clip_text_model", architectures=["CLIPTextModel"])  # fmt: skip
OPEN_CLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   hidden_act="gelu", projection_dim=1024)  # fmt: skip
OPEN_CLIP_BIG_G = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       hidden_act="gelu", projection_dim=1280,
                       architectures=["CLIPTextModelWithProjection"])  # fmt: skip
# One OpenCLIP-H layer (width 1024, MLP 4096): q/k/v/out projections, two MLP projections, two LayerNorms.
OPEN_CLIP_H_LAYER_PARAMETERS = 4 * (1024 * 1024 + 1024) + (2 * 1024 * 4096 + 4096 + 1024) + 2 * 2 * 1024
SCHEDULER = dict(_class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)  # fmt: skip

# family -> the pipeline class, UNet config, and (component, transformers config, single-file prefix) per text
# encoder; the prefixes are the tests' TEXT_PREFIXES (OpenCLIP towers end in ".model.").
FAMILIES = {
    "sd1": ("StableDiffusionPipeline", SD15_UNET,
            [("text_encoder", CLIP_L, "cond_stage_model.transformer.")]),
    "sd2-v": ("StableDiffusionPipeline", SD2_UNET,
              [("text_encoder", OPEN_CLIP_H, "cond_stage_model.model.")]),
    "sdxl": ("StableDiffusionXLPipeline", SDXL_UNET,
             [("text_encoder", CLIP_L, "conditioner.embedders.0.transformer."),
              ("text_encoder_2", OPEN_CLIP_BIG_G, "conditioner.embedders.1.model.")]),
}  # fmt: skip


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


def text_model(config: dict):
    import transformers

    fields = {key: value for key, value in config.items() if key not in ("model_type", "architectures")}
    model_class = getattr(transformers, config["architectures"][0])
    return model_class(transformers.CLIPTextConfig(**fields))


def checkpoint_entries(family: str) -> list:
    """(single-file name, TensorInfo) of every tensor of `family`'s checkpoint, from meta-device models."""
    import diffusers
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from test_weights_conv import hf_state, ldm_unet_name, ldm_vae_name, open_clip_state
    from tiengine.weights_conv.readers import TensorInfo

    _, unet_config, texts = FAMILIES[family]
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**{k: v for k, v in unet_config.items() if not k.startswith("_")})
        vae = diffusers.AutoencoderKL(**{k: v for k, v in SD15_VAE.items() if not k.startswith("_")})
        towers = [(text_model(config), prefix) for _, config, prefix in texts]
    fp16 = torch.float16
    entries = [(f"model.diffusion_model.{ldm_unet_name(key, unet_config)}", TensorInfo(fp16, tuple(value.shape)))
               for key, value in unet.state_dict().items()]  # fmt: skip
    for key, value in vae.state_dict().items():
        name, as_conv = ldm_vae_name(key, 4)
        shape = (*value.shape, 1, 1) if as_conv else tuple(value.shape)
        entries.append((f"first_stage_model.{name}", TensorInfo(fp16, shape)))
    for model, prefix in towers:
        state = hf_state(model)
        if prefix.endswith(".model."):  # OpenCLIP names; only shapes are used (the few real tensors are small)
            state = open_clip_state(state, torch.Generator().manual_seed(0))
        entries += [(prefix + key, TensorInfo(fp16, tuple(value.shape))) for key, value in state.items()]
    entries += [
        (name, TensorInfo(torch.float32, (1000,))) for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev")
    ]
    return entries


def write_checkpoint(family: str, path: Path) -> None:
    """Stream random fp16 tensors of `family`'s shapes into `path` in the original layout."""
    import torch
    from tiengine.weights_conv.writer import write_safetensors

    entries = checkpoint_entries(family)
    generator = torch.Generator().manual_seed(0)

    def tensors():
        for name, info in entries:
            yield name, torch.randn(info.shape, generator=generator, dtype=info.dtype)

    write_safetensors(path, entries, tensors(), metadata={"format": "pt"}, overwrite=True)


def write_ckpt(safetensors_path: Path, path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(safetensors_path), "global_step": 0}, path)


def write_diffusers_configs(family: str, folder: Path) -> None:
    """The offline config folder diffusers' from_single_file reads (no tokenizers, no safety checker)."""
    pipeline, unet_config, texts = FAMILIES[family]
    index = {"_class_name": pipeline, "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", SCHEDULER["_class_name"]]}  # fmt: skip
    files = [("unet", "config.json", unet_config), ("vae", "config.json", SD15_VAE),
             ("scheduler", "scheduler_config.json", SCHEDULER)]  # fmt: skip
    for name, config, _ in texts:
        if config is OPEN_CLIP_H:  # diffusers keeps the 23 layers SD2 reads; the file and tiengine have all 24
            config = dict(config, num_hidden_layers=23)
        files.append((name, "config.json", config))
        index[name] = ["transformers", config["architectures"][0]]
        index["tokenizer" + name.removeprefix("text_encoder")] = ["transformers", "CLIPTokenizer"]
    if family != "sdxl":
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None],
                  "requires_safety_checker": False}  # fmt: skip
    for name, file, config in files:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / file).write_text(json.dumps(config))
    (folder / "model_index.json").write_text(json.dumps(index))


# Measured runs (child processes) ----------------------------------------------------------------------


def child(kind: str, family: str, checkpoint: str, scratch: str) -> None:
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
        pipeline_class, _, texts = FAMILIES[family]
        no_tokenizers = {"tokenizer" + name.removeprefix("text_encoder"): None for name, _, _ in texts}
        if family != "sdxl":
            no_tokenizers |= {"safety_checker": None, "feature_extractor": None}
        pipe = getattr(diffusers, pipeline_class).from_single_file(
            checkpoint, config=str(Path(scratch) / "configs"), local_files_only=True,
            torch_dtype=torch.float16 if kind.endswith("fp16") else torch.float32, **no_tokenizers,
        )  # fmt: skip
        modules = [pipe.unet, pipe.vae] + [getattr(pipe, name) for name, _, _ in texts]
    else:
        raise SystemExit(f"unknown kind {kind}")
    wall = time.perf_counter() - start
    parameters = sum(p.numel() for m in modules for p in m.parameters())
    if modules:  # use every weight once
        with torch.no_grad():
            sum(float(p.sum(dtype=torch.float32)) for m in modules for p in m.parameters())
    print(json.dumps({"peak": memory_status()["VmHWM"], "baseline": baseline, "wall_s": wall,
                      "parameters": parameters}))  # fmt: skip


def measure(kind: str, family: str, checkpoint: Path, scratch: Path, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--family", family, "--checkpoint", str(checkpoint),
             "--workdir", str(scratch)],
            check=True, capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "peak_bytes": max(r["peak"] for r in runs),
        "baseline_bytes": max(r["baseline"] for r in runs),
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "parameters": runs[0]["parameters"],
        "runs": len(runs),
    }


def read_through(path: Path) -> None:
    with open(path, "rb") as file:
        while file.read(1 << 24):
            pass


def measure_family(family: str, workdir: Path, args: argparse.Namespace) -> list[dict]:
    """Every row for one family's checkpoint (and its .ckpt with --ckpt)."""
    checkpoint = workdir / f"{family}-random-fp16.safetensors"
    if not checkpoint.is_file():
        write_checkpoint(family, checkpoint)
    scratch = workdir / family
    write_diffusers_configs(family, scratch / "configs")
    inputs = [checkpoint]
    if args.ckpt:
        ckpt = checkpoint.with_suffix(".ckpt")
        if not ckpt.is_file():
            write_ckpt(checkpoint, ckpt)
        inputs.append(ckpt)
    rows = []
    for path in inputs:
        read_through(path)
        size = path.stat().st_size
        kinds = ["tiengine-convert", "tiengine-load-fp16", "diffusers-fp16"]
        if path.suffix != ".ckpt" and (family == "sd1" or args.fp32):
            kinds += ["tiengine-load-fp32", "diffusers-fp32"]
        results = {kind: measure(kind, family, path, scratch, args.repeat) for kind in kinds}
        for kind, result in results.items():
            peer = results["diffusers-fp32" if kind.endswith("fp32") else "diffusers-fp16"]
            expected = peer["parameters"] + (OPEN_CLIP_H_LAYER_PARAMETERS if family == "sd2-v" else 0)
            if kind.startswith("tiengine-load") and result["parameters"] != expected:
                raise SystemExit(f"{family} {kind}: {result['parameters']} parameters, expected {expected} "
                                 f"(diffusers: {peer['parameters']})")  # fmt: skip
            rows.append({"family": family, "input": path.suffix, "file_bytes": size, "kind": kind, **result,
                         "ratio_to_diffusers": result["peak_bytes"] / peer["peak_bytes"],
                         "bound_bytes": BOUND_FILE_RATIO * size + BOUND_EXTRA_BYTES})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="sd1,sd2-v,sdxl", help="comma-separated: sd1, sd2-v, sdxl")
    parser.add_argument("--workdir", type=Path, help="where the checkpoints (2-7 GB each) and outputs go")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ckpt", action="store_true", help="also measure a pickled .ckpt of the same weights")
    parser.add_argument("--fp32", action="store_true", help="fp32 load rows for every family (sd1 always has them)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.family, args.checkpoint, str(args.workdir))
        return
    families = args.family.split(",")
    if unknown := sorted(set(families) - set(FAMILIES)):
        parser.error(f"unknown family {', '.join(unknown)}; expected some of {', '.join(FAMILIES)}")

    import diffusers
    import safetensors
    import torch

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tiengine-convert-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [row for family in families for row in measure_family(family, workdir, args)]

    print("# weights_conv peak memory: full-size random fp16 single-file checkpoints")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    versions = (f"python {platform.python_version()}, torch {torch.__version__}, "
                f"safetensors {safetensors.__version__}, diffusers {diffusers.__version__}")  # fmt: skip
    print(f"# cpu: {machine}; {versions}; peak = VmHWM of a fresh process after its imports; median of {args.repeat}")
    header = (f"{'family':<6} {'input':<12} {'file GB':>8} {'run':<19} {'peak GB':>8} {'added GB':>9} "
              f"{'added/file':>11} {'bound GB':>9} {'wall s':>7} {'peak vs diffusers':>18}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        added = row["peak_bytes"] - row["baseline_bytes"]
        bound = "-"  # fp32 loads hold twice the fp16 file's bytes by definition: the bound is for the file's dtype
        if not row["kind"].endswith("fp32"):
            bound = f"{row['bound_bytes'] / 1e9:.2f}" + ("" if added <= row["bound_bytes"] else " OVER")
        print(f"{row['family']:<6} {row['input']:<12} {row['file_bytes'] / 1e9:>8.2f} {row['kind']:<19} "
              f"{row['peak_bytes'] / 1e9:>8.2f} {added / 1e9:>9.2f} {added / row['file_bytes']:>11.2f} "
              f"{bound:>9} {row['wall_s']:>7.1f} {row['ratio_to_diffusers']:>18.2f}")  # fmt: skip
    if args.json:
        report = {"rows": rows, "torch": torch.__version__, "diffusers": diffusers.__version__}
        atomic_write_bytes(args.json, json.dumps(report, indent=2).encode(), overwrite=True)


if __name__ == "__main__":
    main()
