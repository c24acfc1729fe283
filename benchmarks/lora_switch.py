"""Switching LoRA sets between prompts: tiengine's in-place patching vs reloading vs diffusers.

The model: full-size SD1.5 UNet (859.5M parameters) + CLIP-L text encoder (123.1M) + VAE with random
weights, written once as a converted tiengine folder (fp16 files, loaded as fp32) into --workdir. The
LoRA files: --count kohya-format files (`lora_unet_*` / `lora_te_*`, `lora_down` / `lora_up` / `alpha`)
of rank --rank on the layers kohya-ss sd-scripts trains by default (UNet transformer blocks' attention,
feed-forward and proj_in/proj_out; text encoder attention and MLP): 192 UNet + 72 text-encoder layers.

Rows (median of --repeat runs each; every run changes the set, so no row is a cache hit):
- tiengine switch: the engine goes from LoRA set A to set B (restore A's layers bit-exactly, add B's
  updates): `Engine.apply_networks(prompt)`: the tags resolved (files cached after their first use), then
  NetworkPatcher.
- tiengine remove: set B -> no LoRA (the base weights back, bit-equal).
- tiengine first use: the same switch with the file not yet read (read + map + patch).
- reload: `load_models` of the whole model folder, what a user without in-place switching pays.
- diffusers switch: the same two files with diffusers' pipeline on the same weights:
  `unfuse_lora` + `unload_lora_weights` + `load_lora_weights(B)` + `fuse_lora` (peft backend).
The ratio column is each row's time over tiengine's switch.

    python benchmarks/lora_switch.py [--workdir DIR] [--rank 16] [--repeat 5] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiengine.weights_conv.convert import empty_module, load_models

from tiengine.engine import Engine
from tiengine.io.atomic import atomic_write_bytes
from tiengine.models.config import ModelConfig

UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")  # per transformer block
UNET_BLOCK_TARGETS = ("proj_in", "proj_out")  # per Transformer2DModel
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                "mlp.fc2")  # per encoder layer


def processor_name() -> str:
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return models[0] if models else platform.processor() or platform.machine()


def write_model(folder: Path) -> ModelConfig:
    config = ModelConfig.sd15()
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for name in ("unet", "vae", "text_encoder"):
        module = empty_module(name, config, device="cpu", dtype=torch.float32)
        tensors = {}
        for key, value in module.state_dict().items():
            tensors[key] = (torch.randn(value.shape, generator=generator) * 0.02).to(torch.float16)
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / "config.json").write_text(config.to_json(), encoding="utf-8")
    return config


def lora_layers(modules: dict[str, torch.nn.Module]) -> list[tuple[str, str, torch.nn.Module]]:
    """(kohya prefix, component, module) for the layers sd-scripts' default LoRA trains."""
    found = []
    for name, module in modules["unet"].named_modules():
        if name.endswith(UNET_TARGETS) and "transformer_blocks" in name or name.endswith(UNET_BLOCK_TARGETS) \
                and "attentions" in name:
            found.append(("lora_unet_" + name.replace(".", "_"), "unet", module))
    for name, module in modules["text_encoder"].named_modules():
        if name.endswith(TEXT_TARGETS):
            found.append(("lora_te_" + name.replace(".", "_"), "text_encoder", module))
    return found


def write_lora(path: Path, layers: list[tuple[str, str, torch.nn.Module]], rank: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, _, module in layers:
        out_features, in_features = module.weight.shape[:2]
        kernel = tuple(module.weight.shape[2:])
        tensors[f"{prefix}.lora_down.weight"] = (torch.randn((rank, in_features, *kernel), generator=generator)
                                                 * 0.01).to(torch.float16)
        tensors[f"{prefix}.lora_up.weight"] = (torch.randn((out_features, rank, *(1,) * len(kernel)),
                                                           generator=generator) * 0.01).to(torch.float16)
        tensors[f"{prefix}.alpha"] = torch.tensor(float(rank) / 2, dtype=torch.float16)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})


def timed(function, *arguments, **keywords) -> float:
    start = time.perf_counter()
    function(*arguments, **keywords)
    return time.perf_counter() - start


def tiengine_rows(folder: Path, loras: Path, repeat: int) -> dict[str, list[float]]:
    engine = Engine.load(folder, loras=loras, embeddings=False)
    names = sorted(path.stem for path in loras.glob("*.safetensors"))

    def use(name: str | None) -> None:
        reports = engine.apply_networks(f"a photo <lora:{name}:0.8>" if name else "a photo")
        assert all(report.applied for report in reports), reports

    rows: dict[str, list[float]] = {"tiengine first use": [], "tiengine switch": [], "tiengine remove": []}
    rows["tiengine first use"].append(timed(use, names[0]))
    use(names[1])  # read and cache the second file too
    for index in range(repeat):
        use(names[index % 2])
        rows["tiengine switch"].append(timed(use, names[(index + 1) % 2]))
        rows["tiengine remove"].append(timed(use, None))
    return rows


def reload_rows(folder: Path, repeat: int) -> dict[str, list[float]]:
    return {"reload": [timed(load_models, folder, device="cpu", dtype=torch.float32)
                       for _ in range(max(1, repeat // 2))]}


def diffusers_rows(folder: Path, loras: Path, repeat: int) -> dict[str, list[float]]:
    import diffusers
    import transformers

    config, modules = load_models(folder, device="cpu", dtype=torch.float32)
    unet = diffusers.UNet2DConditionModel(**config.unet.to_diffusers())
    unet.load_state_dict(modules["unet"].state_dict())
    encoder = config.text_encoders["text_encoder"]
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=encoder.vocab_size, hidden_size=encoder.hidden_size, intermediate_size=encoder.intermediate_size,
        num_hidden_layers=encoder.num_hidden_layers, num_attention_heads=encoder.num_attention_heads,
        hidden_act=encoder.hidden_act, max_position_embeddings=encoder.max_position_embeddings))
    text_encoder.load_state_dict({key.removeprefix("text_model."): value
                                  for key, value in modules["text_encoder"].state_dict().items()}, strict=False)
    del modules
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(), text_encoder=text_encoder, tokenizer=None, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    files = sorted(loras.glob("*.safetensors"))

    def use(path: Path) -> None:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=0.8)

    pipe.load_lora_weights(str(files[0]))
    pipe.fuse_lora(lora_scale=0.8)
    return {"diffusers switch": [timed(use, files[(index + 1) % 2]) for index in range(repeat)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tiengine-lora-bench-"))
    folder, loras = workdir / "sd15", workdir / "loras"
    if not (folder / "config.json").exists():
        write_model(folder)
    if not loras.is_dir():
        loras.mkdir(parents=True)
        _, modules = load_models(folder, device="cpu", dtype=torch.float32)
        layers = lora_layers(modules)
        for seed, name in enumerate(("style_a", "style_b")):
            write_lora(loras / f"{name}.safetensors", layers, args.rank, seed)
        print(f"LoRA files: {len(layers)} layers, rank {args.rank}", file=sys.stderr)
    rows = {**tiengine_rows(folder, loras, args.repeat), **reload_rows(folder, args.repeat)}
    if not args.skip_diffusers:
        rows.update(diffusers_rows(folder, loras, args.repeat))
    medians = {name: statistics.median(times) for name, times in rows.items()}
    reference = medians["tiengine switch"]
    print(f"# {processor_name()}, {args.threads} threads, torch {torch.__version__}, python {platform.python_version()}; "
          f"SD1.5 UNet + CLIP-L fp32, LoRA rank {args.rank}")
    print(f"| {'row':<20} | {'median s':>9} | {'runs':>4} | {'/ tiengine switch':>17} |")
    print(f"|{'-' * 22}|{'-' * 11}|{'-' * 6}|{'-' * 19}|")
    for name, median in medians.items():
        print(f"| {name:<20} | {median:9.3f} | {len(rows[name]):4d} | {median / reference:17.1f} |")
    if args.json:
        atomic_write_bytes(args.json, json.dumps({"rows": rows, "medians": medians, "cpu": processor_name(),
                                                  "threads": args.threads, "rank": args.rank}).encode(),
                           overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
