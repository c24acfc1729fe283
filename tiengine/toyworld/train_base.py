"""Train the packaged default model: a tiny Stable Diffusion 1.x on toy-world scenes, on a CPU.

    python -m tiengine.toyworld.train_base --out DIR --seed 1 [--threads 2] [--minutes N] [--preset default]

Architecture: the SD1 stack in a tiny configuration (`toyworld_model_config`): a CLIP text encoder
with the full CLIP vocabulary (49408 token rows, BOS/EOS framing, SD1's reading: last layer through
final_layer_norm), a UNet2DConditionModel with cross-attention on 16x16x4 latents, and an AutoencoderKL
with 4x downsampling for 64x64 RGB images.

Recipe (`TrainSettings`), all randomness drawn from the seed:
1. Render `dataset_size` training-split scenes (tiengine.toyworld.world; held-out combinations excluded).
2. VAE: reconstruction MSE + L1 plus a small KL term, on random crops (fully convolutional, so crops
   cost less and transfer to full images), then frozen. Its `scaling_factor` is 1 / std of the
   dataset's latent means, as SD's 0.18215 was chosen.
3. UNet + text encoder jointly: epsilon prediction under SD's 1000-step "scaled_linear" DDPM schedule
   (betas 0.00085..0.012, tiengine.diffusion.schedules.NoiseSchedule) so every sampler works unchanged, Min-SNR
   loss weighting (gamma 5, Hang et al. 2023), captions drawn per step from several phrasings with
   size/position sometimes left out and the background texture sometimes named (never the
   checkerboard's own: see tiengine.toyworld.world), and caption dropout to "" for classifier-free guidance.
   Half the captions of unnamed-colour scenes get a colour slot between words (`blend_colour_slots`):
   the token rows of the two colour words around the scene's hue, blended by hue, as one extra
   embedding row where a colour word would stand; no caption text or token names it. Caption
   ids are `chunk_frame(tokenizer.encode(caption))`: `[BOS] + tokens + [EOS] * pad`, exactly what
   tiengine.text.conditioning feeds the encoder for a plain prompt. The weights kept are an exponential
   moving average. Token rows of words never seen keep their seeded initialisation.
4. Write a converted model folder (tiengine.models.config: config.json + unet/vae/text_encoder
   .safetensors, fp16), a loss log (train_log.csv) and, unless --no-evaluate, evaluate it with
   tiengine.toyworld.evaluation and write MODEL_CARD.md.

Determinism: the same seed, preset, thread count and torch build give the same weights; `--minutes`
stops a phase early (the log and card then say so), which gives another model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tiengine.weights_conv.readers import TensorInfo
from tiengine.weights_conv.writer import write_safetensors
from torch import nn

from tiengine.default_model import DEFAULT_MODEL_SEED
from tiengine.diffusion.schedules import NoiseSchedule
from tiengine.io.atomic import OVERWRITE_HINT, FileExistsRefusal, atomic_write_bytes, make_readable
from tiengine.models.config import ModelConfig
from tiengine.models.text_encoder import ClipTextEncoder, TextEncoderConfig
from tiengine.models.unet import UNet2DConditionModel, UNetConfig
from tiengine.models.vae import AutoencoderKL, VaeConfig
from tiengine.text.tokenizer import ClipTokenizer, chunk_frame
from tiengine.toyworld.evaluation import evaluate_model, write_model_card
from tiengine.toyworld.world import (
    COLOURS,
    REFERENCE_SIZE,
    SHAPES,
    UNNAMED_COLOUR,
    Scene,
    caption,
    colour_blend,
    object_centres,
    render,
    sample_scenes,
)

COMPONENT_FILES = ("unet", "vae", "text_encoder")
LOG_EVERY = 50  # steps between loss-log rows


def toyworld_model_config(vae_scaling_factor: float = 1.0) -> ModelConfig:
    """The tiny SD1 configuration of the default model (text width 32 = UNet cross-attention width)."""
    text_encoder = TextEncoderConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2
    )
    unet = UNetConfig(
        block_out_channels=(32, 64, 64),
        # cross-attention at 16x16 and 8x8 (and the middle), none at 4x4: SD1's layout, so text reaches
        # the fine textures of the background as well as the objects
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        num_attention_heads=(1, 2, 2),
        cross_attention_dim=text_encoder.hidden_size,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=REFERENCE_SIZE // 4,
    )
    vae = VaeConfig(
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        scaling_factor=vae_scaling_factor,
        sample_size=REFERENCE_SIZE,
        force_upcast=False,
    )
    return ModelConfig("sd1", "epsilon", {"text_encoder": text_encoder}, unet, vae)


@dataclass(frozen=True)
class TrainSettings:
    """Every knob of the recipe (see the module docstring)."""

    dataset_size: int = 16000
    vae_steps: int = 2500
    vae_batch: int = 8
    vae_crop: int = 32  # px; 0 trains on whole images
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4  # per latent element, against per-pixel reconstruction losses
    vae_object_weight: float = 4.0  # extra reconstruction weight on object pixels (chroma > 0.3)
    vae_object_crops: float = 0.5  # share of crops centred on an object
    unet_steps: int = 8000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    text_lr: float = 1e-3
    warmup_steps: int = 200
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    omit_probability: float = 0.1  # size / position left out of a training caption
    background_probability: float = 0.5  # ", <word> background" added to a training caption
    colour_blend_probability: float = 0.5  # unnamed-colour captions whose colour slot gets a blended row
    grad_clip: float = 1.0

    @classmethod
    def default(cls) -> TrainSettings:
        """The recipe of the packaged default model."""
        return cls()

    @classmethod
    def quick(cls) -> TrainSettings:
        """A few-minute run for trying the pipeline (a poor model)."""
        return cls(dataset_size=1000, vae_steps=100, unet_steps=200, warmup_steps=20)


@dataclass
class TrainLog:
    """Loss rows (phase, step, loss, seconds since start), per-phase wall and CPU times (CPU time sums
    every thread of the process, so on an otherwise idle machine wall time is about CPU time / threads)."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    rows: list[tuple[str, int, float, float]] = dataclasses.field(default_factory=list)
    phase_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    phase_cpu_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    stopped_early: list[str] = dataclasses.field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.phase_seconds[name] = time.perf_counter() - wall
            self.phase_cpu_seconds[name] = time.process_time() - cpu

    def add(self, phase: str, step: int, loss: float) -> None:
        self.rows.append((phase, step, loss, time.perf_counter() - self.start))

    def write_csv(self, path: Path) -> None:
        lines = [("phase", "step", "loss", "seconds")] + [(p, s, f"{l:.6f}", f"{t:.1f}") for p, s, l, t in self.rows]
        text = "\n".join(",".join(str(v) for v in line) for line in lines) + "\n"
        make_readable(atomic_write_bytes(path, text.encode("utf-8"), overwrite=True))


class _Deadline:
    """Wall-clock budget shared by the phases (None: unlimited)."""

    def __init__(self, minutes: float | None) -> None:
        self.end = None if minutes is None else time.perf_counter() + 60.0 * minutes

    def passed(self) -> bool:
        return self.end is not None and time.perf_counter() > self.end


def _progress(total: int, description: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="step", dynamic_ncols=True, mininterval=2.0)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def render_dataset(seed: int, n: int) -> tuple[list[Scene], torch.Tensor]:
    """n training-split scenes from `seed` and their renders as uint8 (n, 3, 64, 64)."""
    scenes = sample_scenes(seed, n, split="train")
    images = np.stack([render(scene) for scene in scenes])  # (n, 64, 64, 3)
    return scenes, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (n, 3, 64, 64)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def _crop_corners(
    scenes: list[Scene], index: torch.Tensor, size: int, crop: int, step: int, generator: torch.Generator,
    object_share: float,
) -> list[tuple[int, int]]:
    """(top, left) of each sample's crop, on the latent grid (multiples of `step` px): with probability
    object_share around one of the scene's objects (jittered by up to a quarter crop), else anywhere."""
    corners = []
    slots = (size - crop) // step
    for i in index.tolist():
        draws = torch.rand(3, generator=generator).tolist()
        if draws[0] < object_share:
            centres = object_centres(scenes[i], size)
            x, y = centres[min(int(draws[1] * len(centres)), len(centres) - 1)]
            jitter_x, jitter_y = (torch.rand(2, generator=generator) - 0.5).mul(crop / 2).tolist()
            top = min(max(round((y + jitter_y - crop / 2) / step), 0), slots) * step
            left = min(max(round((x + jitter_x - crop / 2) / step), 0), slots) * step
        else:
            top = min(int(draws[1] * (slots + 1)), slots) * step
            left = min(int(draws[2] * (slots + 1)), slots) * step
        corners.append((top, left))
    return corners


def train_vae(
    images: torch.Tensor, scenes: list[Scene], config: VaeConfig, settings: TrainSettings,
    generator: torch.Generator, log: TrainLog, deadline: _Deadline,
) -> AutoencoderKL:
    """Train the autoencoder on crops of `images` (uint8 (N, 3, H, W)) and return it in eval mode."""
    vae = AutoencoderKL(config, channels_last=False)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    n, _, size, _ = images.shape
    crop = settings.vae_crop or size
    warmup = max(settings.vae_steps // 20, 1)
    with log.phase("vae"), _progress(settings.vae_steps, "vae") as bar:
        for step in range(settings.vae_steps):
            if deadline.passed():
                log.stopped_early.append(f"vae at step {step} of {settings.vae_steps}")
                break
            for group in optimizer.param_groups:
                group["lr"] = settings.vae_lr * _lr_factor(step, settings.vae_steps, warmup)
            index = torch.randint(n, (settings.vae_batch,), generator=generator)
            corners = _crop_corners(
                scenes, index, size, crop, vae.downscale_factor, generator, settings.vae_object_crops
            )
            x = to_model_range(
                torch.stack([images[i, :, t : t + crop, l : l + crop] for i, (t, l) in zip(index.tolist(), corners)])
            )  # (B, 3, crop, crop)
            posterior = vae.encode(x)
            reconstruction = vae.decode(posterior.sample(generator))
            kl = 0.5 * (posterior.mean.square() + posterior.logvar.exp() - 1.0 - posterior.logvar).mean()
            chroma = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / 2  # (B, 1, crop, crop) in [0, 1]
            weight = 1.0 + settings.vae_object_weight * (chroma > 0.3).float()
            error = reconstruction - x
            loss = (weight * (error.square() + error.abs())).mean() / weight.mean() + settings.vae_kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(vae.parameters(), settings.grad_clip)
            optimizer.step()
            if step % LOG_EVERY == 0 or step == settings.vae_steps - 1:
                log.add("vae", step, loss.item())
                bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update(1)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Unscaled latent means (N, 4, H/4, W/4) of uint8 images (N, 3, H, W)."""
    parts = [vae.encode(to_model_range(images[i : i + batch])).mean for i in range(0, images.shape[0], batch)]
    return torch.cat(parts)


def caption_token_ids(tokenizer: ClipTokenizer, captions: list[str], pad_token_id: int) -> torch.Tensor:
    """(B, 77) encoder ids: `[BOS] + tokens + [EOS] * pad`, as conditioning frames a plain prompt."""
    return torch.tensor(
        [chunk_frame(ids, pad_token_id=pad_token_id) for ids in tokenizer.encode_batch(captions)], dtype=torch.long
    )


@dataclass(frozen=True)
class ColourSlotTokens:
    """Token ids of the colour words and the first token of each shape word (singular and plural)."""

    colours: dict[str, int]
    shapes: frozenset[int]

    @classmethod
    def of(cls, tokenizer: ClipTokenizer) -> ColourSlotTokens:
        def single(word: str) -> int:
            (token,) = tokenizer.encode(word)
            return token

        # a shape word starts with its first token ("triangles" may be "triangle" + "s")
        shapes = frozenset(tokenizer.encode(shape + suffix)[0] for shape in SHAPES for suffix in ("", "s"))
        return cls({colour: single(colour) for colour in COLOURS}, shapes)


def blend_colour_slots(
    ids: torch.Tensor, scenes: list[Scene], captions: list[str], text_encoder: ClipTextEncoder,
    tokens: ColourSlotTokens, probability: float, rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Give some unnamed-colour captions a colour slot between words: a continuous colour vocabulary.

    For each caption of an unnamed-colour scene (not dropped to ""), with `probability`: the colour
    words around the scene's hue (toyworld.colour_blend) are blended, w_a * row(a) + w_b * row(b), from
    the live token table, and the blend goes in as an extra embedding row (id vocab_size + k) right
    before the shape word, where a colour word stands. No caption text changes and no token is added:
    the model learns that token-embedding space between colour words means the hues between them, as
    a large text encoder has learned from its data, so textual inversion has a space to search. Returns
    the new ids (B, 77) and the rows (K, hidden), or None when no caption was blended.
    """
    table = text_encoder.text_model.embeddings.token_embedding.weight  # (vocab, hidden)
    vocab_size = table.shape[0]
    ids = ids.clone()
    rows = []
    for row, (scene, text) in enumerate(zip(scenes, captions)):
        if scene.colour != UNNAMED_COLOUR or not text or not rng.random() < probability:
            continue
        (first, first_weight), (second, second_weight) = colour_blend(scene.hue)
        rows.append(first_weight * table[tokens.colours[first]] + second_weight * table[tokens.colours[second]])
        # [BOS] tokens [EOS] pad: the slot goes before the shape word (where captions put a colour word),
        # the rest moves right by one and the last padding token drops out
        shape_position = next(position for position in range(1, ids.shape[1]) if int(ids[row, position]) in tokens.shapes)
        ids[row, shape_position + 1 :] = ids[row, shape_position:-1].clone()
        ids[row, shape_position] = vocab_size + len(rows) - 1
    return ids, (torch.stack(rows) if rows else None)


class _Ema:
    """Exponential moving average of a module's floating-point tensors (decay warmed up as (1+t)/(10+t))."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {name: value.detach().clone() for name, value in module.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, value in module.state_dict().items():
            if value.is_floating_point():
                self.shadow[name].lerp_(value, 1.0 - decay)

    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict(self.shadow)


def train_denoiser(
    latents: torch.Tensor, scenes: list[Scene], config: ModelConfig, settings: TrainSettings, seed: int,
    generator: torch.Generator, log: TrainLog, deadline: _Deadline,
) -> tuple[UNet2DConditionModel, ClipTextEncoder]:
    """Train UNet and text encoder on scaled latents (N, 4, h, w); returns their EMA weights, eval mode."""
    tokenizer = ClipTokenizer.default()
    text_config = config.text_encoders["text_encoder"]
    unet = UNet2DConditionModel(config.unet, channels_last=False)
    text_encoder = ClipTextEncoder(text_config)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": settings.unet_lr, "weight_decay": 0.0},
            {"params": list(text_encoder.parameters()), "lr": settings.text_lr, "weight_decay": 0.0},
        ]
    )
    peaks = [settings.unet_lr, settings.text_lr]
    ema_unet, ema_text = _Ema(unet, settings.ema_decay), _Ema(text_encoder, settings.ema_decay)
    schedule = config.schedule
    alphas_cumprod = NoiseSchedule.from_betas(
        schedule.num_train_timesteps, schedule.beta_start, schedule.beta_end, schedule.beta_schedule
    ).alphas_cumprod  # (T,) float32
    snr = alphas_cumprod / (1.0 - alphas_cumprod)  # (T,)
    loss_weight = torch.clamp(snr, max=settings.min_snr_gamma) / snr  # Min-SNR-gamma for eps prediction
    caption_rng = np.random.default_rng([seed, 1])
    slot_tokens = ColourSlotTokens.of(tokenizer)
    n = latents.shape[0]
    with log.phase("unet+text"), _progress(settings.unet_steps, "unet+text") as bar:
        for step in range(settings.unet_steps):
            if deadline.passed():
                log.stopped_early.append(f"unet+text at step {step} of {settings.unet_steps}")
                break
            for group, peak in zip(optimizer.param_groups, peaks):
                group["lr"] = peak * _lr_factor(step, settings.unet_steps, settings.warmup_steps)
            index = torch.randint(n, (settings.unet_batch,), generator=generator)
            captions = [
                "" if caption_rng.random() < settings.caption_dropout
                else caption(
                    scenes[int(i)], caption_rng, omit_probability=settings.omit_probability,
                    background_probability=settings.background_probability,
                )
                for i in index
            ]
            ids = caption_token_ids(tokenizer, captions, text_config.pad_token_id)  # (B, 77)
            ids, blended_rows = blend_colour_slots(
                ids, [scenes[int(i)] for i in index], captions, text_encoder, slot_tokens,
                settings.colour_blend_probability, caption_rng,
            )
            x0 = latents[index]  # (B, 4, h, w)
            t = torch.randint(schedule.num_train_timesteps, (settings.unet_batch,), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            noisy = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
            context, _ = text_encoder.encode(ids, blended_rows)  # (B, 77, 32)
            prediction = unet(noisy, t, context)
            per_sample = (prediction - noise).square().mean(dim=(1, 2, 3))  # (B,)
            loss = (per_sample * loss_weight[t]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), settings.grad_clip)
            optimizer.step()
            ema_unet.update(unet)
            ema_text.update(text_encoder)
            if step % LOG_EVERY == 0 or step == settings.unet_steps - 1:
                log.add("unet+text", step, loss.item())
                bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update(1)
    ema_unet.copy_to(unet)
    ema_text.copy_to(text_encoder)
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


def save_model(
    folder: Path, config: ModelConfig, modules: dict[str, nn.Module], *, dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> None:
    """Write a converted model folder: <component>.safetensors (module names, `dtype`) and config.json last."""
    files = [folder / f"{name}.safetensors" for name in COMPONENT_FILES] + [folder / "config.json"]
    existing = [str(path) for path in files if path.exists()]
    if existing and not overwrite:
        raise FileExistsRefusal(f"{folder}: would replace {', '.join(existing)} ({OVERWRITE_HINT})")
    folder.mkdir(parents=True, exist_ok=True)
    for name in COMPONENT_FILES:
        tensors = [(key, value.detach().to(dtype).contiguous()) for key, value in modules[name].state_dict().items()]
        entries = [(key, TensorInfo(value.dtype, tuple(value.shape))) for key, value in tensors]
        path = folder / f"{name}.safetensors"
        metadata = {"format": "pt", "tiengine.component": name}
        make_readable(write_safetensors(path, entries, tensors, metadata=metadata, overwrite=overwrite))
    make_readable(atomic_write_bytes(folder / "config.json", config.to_json().encode("utf-8"), overwrite=overwrite))


def train(
    out: Path, *, seed: int = DEFAULT_MODEL_SEED, settings: TrainSettings = TrainSettings(),
    minutes: float | None = None, overwrite: bool = False,
) -> tuple[ModelConfig, TrainLog]:
    """Run the whole recipe and write the model folder and train_log.csv to `out`."""
    if out.exists() and (out / "config.json").exists() and not overwrite:
        raise FileExistsRefusal(f"{out}: already holds a model ({OVERWRITE_HINT})")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    deadline = _Deadline(minutes)
    log = TrainLog()

    with log.phase("render"):
        scenes, images = render_dataset(seed, settings.dataset_size)

    config = toyworld_model_config()
    vae = train_vae(images, scenes, config.vae, settings, generator, log, deadline)
    with log.phase("encode"):
        latents = encode_latents(vae, images)
    scaling_factor = float(1.0 / latents.std())
    config = toyworld_model_config(round(scaling_factor, 5))
    vae = _with_config(vae, config.vae)

    unet, text_encoder = train_denoiser(
        latents * config.vae.scaling_factor, scenes, config, settings, seed, generator, log, deadline
    )
    save_model(out, config, {"unet": unet, "vae": vae, "text_encoder": text_encoder}, overwrite=overwrite)
    log.write_csv(out / "train_log.csv")
    return config, log


def _with_config(vae: AutoencoderKL, config: VaeConfig) -> AutoencoderKL:
    """The same weights under a config with the measured scaling factor."""
    rebuilt = AutoencoderKL(config, channels_last=False)
    rebuilt.load_state_dict(vae.state_dict())
    return rebuilt.eval().requires_grad_(False)


def machine_description(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs visible, torch {torch.__version__} with {threads} threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiengine.toyworld.train_base", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--seed", type=int, default=DEFAULT_MODEL_SEED,
                        help=f"seed of the data, initialisation and batches (default {DEFAULT_MODEL_SEED}: the packaged model)")
    parser.add_argument(
        "--threads", type=int, default=2,
        help="torch CPU threads (default 2; use 1 on a machine other jobs share: waiting threads spin)",
    )
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock cap; phases stop early when hit")
    parser.add_argument("--preset", choices=("default", "quick"), default="default")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model in --out")
    parser.add_argument("--no-evaluate", action="store_true", help="skip the evaluation and the model card")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = TrainSettings.quick() if args.preset == "quick" else TrainSettings.default()
    started = time.perf_counter()
    config, log = train(args.out, seed=args.seed, settings=settings, minutes=args.minutes, overwrite=args.overwrite)
    train_seconds = time.perf_counter() - started
    print(
        f"trained in {train_seconds / 60:.1f} min wall, {sum(log.phase_cpu_seconds.values()) / 60:.1f} min CPU: "
        + ", ".join(f"{k} {v:.0f}s ({log.phase_cpu_seconds[k]:.0f}s CPU)" for k, v in log.phase_seconds.items())
    )
    if log.stopped_early:
        print("stopped early (--minutes): " + "; ".join(log.stopped_early))
    if not args.no_evaluate:
        result = evaluate_model(args.out, seed=args.seed)
        print(result.summary())
        write_model_card(
            args.out, settings=settings, seed=args.seed, preset=args.preset, log=log,
            train_seconds=train_seconds, machine=machine_description(args.threads), result=result,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
