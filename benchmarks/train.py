"""Textual-inversion training throughput: tiengine's trainer vs diffusers' textual-inversion step.

Same model, same random weights, same batch: tiengine's UNet / VAE / CLIP encoder share their tensors with
diffusers' UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel. One step of each:
- tiengine: `EmbeddingTrainer.optimizer_step` (tiengine.training.run): latents cached once, prompts
  from templates through the A1111 conditioning path, AdamW on the new vectors only.
- diffusers (examples/textual_inversion/textual_inversion.py, restated): VAE-encode the batch and sample
  the latents, DDPMScheduler.add_noise, CLIPTextModel on the placeholder prompt's ids, UNet, MSE, AdamW on
  the whole token-embedding matrix (grown by the placeholder row), then every other row restored from a
  copy. "diffusers, cached latents" is the same step without the VAE encode, to separate that effect.
Steps are timed interleaved (rotating which goes first) after a warm-up; medians are reported as
samples/s (batch / step time) with the ratio tiengine / diffusers last.

Rows: "toy" is the built-in default model's architecture (tiengine.toyworld.train_base.toyworld_model_config,
64 px); "sd15" the full SD1.5 architecture (860 M UNet parameters) at a reduced resolution on the CPU,
512 px on a GPU (bf16 autocast for both peers there).

    python benchmarks/train.py [--models toy sd15] [--batch 1 4] [--resolution-sd15 128] [--repeats 5]
                               [--threads 2] [--clock wall|cpu] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tiengine.engine import Engine  # noqa: E402
from tiengine.io.atomic import atomic_write_bytes  # noqa: E402
from tiengine.models.config import ModelConfig  # noqa: E402
from tiengine.models.text_encoder import ClipTextEncoder  # noqa: E402
from tiengine.models.unet import UNet2DConditionModel  # noqa: E402
from tiengine.models.vae import AutoencoderKL  # noqa: E402
from tiengine.text.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, ClipTokenizer  # noqa: E402
from tiengine.training.run import EmbeddingTrainer  # noqa: E402
from tiengine.training.textual_inversion import TrainEmbeddingSettings  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet import CLOCKS, cpu_name, interleaved_medians, randomize_  # noqa: E402  (shared benchmark helpers)

PROMPT = "a photo of a [name]"
IMAGES = 5
LEARNING_RATE = 5e-3


def model_config(name: str) -> ModelConfig:
    if name == "toy":
        from tiengine.toyworld.train_base import toyworld_model_config

        return toyworld_model_config(0.5)
    return ModelConfig.sd15()


def build_pair(config: ModelConfig, device: torch.device, seed: int):
    """(tiengine Engine, diffusers/transformers modules) sharing every weight tensor."""
    import diffusers
    import transformers

    text = config.text_encoders["text_encoder"]
    reference_unet = diffusers.UNet2DConditionModel(**config.unet.to_diffusers())
    reference_vae = diffusers.AutoencoderKL(**config.vae.to_diffusers())
    reference_text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        max_position_embeddings=text.max_position_embeddings, hidden_act=text.hidden_act,
        layer_norm_eps=text.layer_norm_eps, eos_token_id=EOS_TOKEN_ID, attn_implementation="sdpa",
    ))
    for offset, module in enumerate((reference_unet, reference_vae, reference_text)):
        randomize_(module, seed + offset)
    reference = {"unet": reference_unet.to(device), "vae": reference_vae.to(device), "text": reference_text.to(device)}
    ours = {
        "unet": UNet2DConditionModel(config.unet, device="meta"),
        "vae": AutoencoderKL(config.vae, device="meta"),
        "text_encoder": ClipTextEncoder(text, device="meta"),
    }
    ours["unet"].load_state_dict(reference["unet"].state_dict(), assign=True)
    ours["vae"].load_state_dict(reference["vae"].state_dict(), assign=True)
    ours["text_encoder"].load_state_dict(reference["text"].state_dict(), assign=True)
    engine = Engine(config, ours, device=device)
    return engine, reference


def write_images(folder: Path, size: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index}.png")


def tiengine_step(engine: Engine, images: Path, template: Path, batch: int, resolution: int,
                  precision: str) -> Callable[[], None]:
    settings = TrainEmbeddingSettings(vectors=1, init_text="photo", steps=10**9, batch_size=batch,
                                      learning_rate=str(LEARNING_RATE), template=str(template),
                                      resolution=resolution, mixed_precision=precision, save_every=0)
    trainer = EmbeddingTrainer(engine, "zorbly", settings, None)
    trainer.plan_files(None, (), None, False, False)
    trainer.load_inputs(images)
    trainer.check_name()
    trainer.prepare()
    counter = iter(range(10**9))
    return lambda: trainer.optimizer_step(next(counter))


class DiffusersTextualInversion:
    """diffusers' textual_inversion.py training loop, restated (module docstring): one setup, steps with or
    without the per-step VAE encode."""

    def __init__(self, reference: dict, config: ModelConfig, images: Path, batch: int, resolution: int,
                 device: torch.device, precision: str) -> None:
        from diffusers import DDPMScheduler
        from PIL import Image

        self.unet, self.vae, self.text = reference["unet"], reference["vae"], reference["text"]
        for module in (self.unet, self.vae, self.text):
            module.requires_grad_(False)
        placeholder = self.text.get_input_embeddings().weight.shape[0]
        self.text.resize_token_embeddings(placeholder + 1)  # a new (vocab + 1, D) table
        self.table = self.text.get_input_embeddings()
        with torch.no_grad():
            self.table.weight[placeholder] = self.table.weight[ClipTokenizer.default().encode("photo")[0]]
        self.table.weight.requires_grad_(True)
        self.original = self.table.weight.detach().clone()
        self.keep = torch.ones(placeholder + 1, dtype=torch.bool, device=device)
        self.keep[placeholder] = False
        self.optimizer = torch.optim.AdamW([self.table.weight], lr=LEARNING_RATE, betas=(0.9, 0.999),
                                           weight_decay=1e-2, eps=1e-8)
        schedule = config.schedule
        self.scheduler = DDPMScheduler(num_train_timesteps=schedule.num_train_timesteps,
                                       beta_start=schedule.beta_start, beta_end=schedule.beta_end,
                                       beta_schedule=schedule.beta_schedule, prediction_type=config.prediction)
        self.prediction, self.batch, self.device = config.prediction, batch, device
        words = ClipTokenizer.default().encode(PROMPT.replace("[name]", "").strip())
        ids = [BOS_TOKEN_ID, *words, placeholder, EOS_TOKEN_ID]
        self.ids = torch.tensor([ids + [EOS_TOKEN_ID] * (77 - len(ids))] * batch, device=device)  # (B, 77)
        self.pixels = torch.stack([
            torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1)
            .permute(2, 0, 1) for path in sorted(images.iterdir())
        ]).to(device)  # (n, 3, S, S)
        assert self.pixels.shape[-1] == resolution
        with torch.no_grad():
            self.cached_latents = self.vae.encode(self.pixels).latent_dist.sample() * self.vae.config.scaling_factor
        self.generator = torch.Generator().manual_seed(0)
        self.precision = precision

    def step(self, cached: bool) -> None:
        index = torch.randint(self.pixels.shape[0], (self.batch,), generator=self.generator).to(self.device)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            if cached:
                latents = self.cached_latents[index]
            else:
                latents = self.vae.encode(self.pixels[index]).latent_dist.sample().detach()
                latents = latents * self.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (self.batch,),
                                      device=self.device)
            noisy = self.scheduler.add_noise(latents, noise, timesteps)
            hidden = self.text(self.ids)[0]
            prediction = self.unet(noisy, timesteps, hidden).sample
        target = noise if self.prediction == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():  # every row but the placeholder's back to its original value
            self.table.weight[self.keep] = self.original[self.keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["toy", "sd15"], default=["toy", "sd15"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--resolution-sd15", type=int, help="SD1.5 training size (default 128 on CPU, 512 on GPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (use --threads 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write header and rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    import diffusers
    import transformers

    header = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {cpu_name()}",
        "threads": str(args.threads), "clock": args.clock, "precision": precision, "torch": torch.__version__,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    rows = []
    for model in args.models:
        config = model_config(model)
        factor = 2 ** (len(config.vae.block_out_channels) - 1)
        native = config.unet.sample_size * factor
        resolution = native if model == "toy" else (args.resolution_sd15 or (512 if device.type == "cuda" else 128))
        for batch in args.batch:
            engine, reference = build_pair(config, device, seed=0)
            with tempfile.TemporaryDirectory() as folder:
                images = Path(folder) / "images"
                images.mkdir()
                write_images(images, resolution, seed=1)
                template = Path(folder) / "template.txt"
                template.write_text(PROMPT + "\n", encoding="utf-8")
                peer = DiffusersTextualInversion(reference, config, images, batch, resolution, device, precision)
                steps = {
                    "tiengine": tiengine_step(engine, images, template, batch, resolution, precision),
                    "diffusers": functools.partial(peer.step, cached=False),
                    "diffusers_cached": functools.partial(peer.step, cached=True),
                }
                seconds = interleaved_medians(steps, repeats=args.repeats, warmup=args.warmup, clock=args.clock,
                                              synchronize=synchronize)
            row = {"model": model, "resolution": resolution, "batch": batch}
            for name, value in seconds.items():
                row[f"{name}_ms"] = 1000 * value
                row[f"{name}_samples_s"] = batch / value
            row["ratio"] = row["tiengine_samples_s"] / row["diffusers_samples_s"]
            row["ratio_cached"] = row["tiengine_samples_s"] / row["diffusers_cached_samples_s"]
            rows.append(row)
            print(f"done {model} {resolution}px batch {batch}", file=sys.stderr)
            del engine, reference, peer, steps
    for key, value in header.items():
        print(f"# {key}: {value}")
    print("model | px | batch | tiengine samples/s | diffusers samples/s | diffusers (cached latents) samples/s | "
          "tiengine / diffusers | tiengine / diffusers cached")
    for row in rows:
        print(f"{row['model']} | {row['resolution']} | {row['batch']} | {row['tiengine_samples_s']:.2f} | "
              f"{row['diffusers_samples_s']:.2f} | {row['diffusers_cached_samples_s']:.2f} | {row['ratio']:.2f}x | "
              f"{row['ratio_cached']:.2f}x")
    if args.json:
        atomic_write_bytes(args.json, json.dumps({"header": header, "rows": rows}, indent=2).encode(), overwrite=True)


if __name__ == "__main__":
    main()
