"""LoRA training: low-rank weight updates for a frozen model's UNet (and text encoders), saved as kohya-ss files.

The method is LoRA (Hu et al. 2021, "Low-Rank Adaptation") as kohya-ss sd-scripts' `networks.lora` applies
it to Stable Diffusion and AUTOMATIC1111 reads it back. A target layer's weight W becomes

    W + multiplier * (alpha / rank) * up @ down

- Linear (out, in): down (rank, in), up (out, rank).
- Conv2d (out, in, kh, kw): down (rank, in, kh, kw) is a convolution with the layer's kernel and up
  (out, rank, 1, 1) a 1x1 one, so up @ down (over the rank) is an (out, in, kh, kw) kernel.
- down starts as nn.Linear's default draw (uniform +-1/sqrt(fan_in); kohya's kaiming_uniform(a=sqrt(5))),
  up at zero, so an untrained network changes nothing. `multiplier` is A1111's `<lora:name:multiplier>`.
- Default targets (`UNET_TARGETS`): the UNet transformer blocks' attn1/attn2 to_q, to_k, to_v, to_out.0
  and the blocks' proj_in/proj_out; text encoders (`TEXT_ENCODER_TARGETS`, kohya's CLIPAttention and
  CLIPMLP layers) only when a text-encoder learning rate is given.

Adapters act as parametrizations of the target weights (torch.nn.utils.parametrize): the model reads the
updated weight wherever it reads the weight, including the places that use it directly rather than
calling the layer (Transformer2DModel's 1x1 projections through `layers.pointwise`, the text encoder's
linear paths). Attaching and detaching leave the base weights' tensors untouched.

File layout (kohya-ss, what A1111's Lora extension reads): per target module, keys
`<prefix>_<module path with "." -> "_">.lora_down.weight`, `.lora_up.weight` and `.alpha` (a 0-d tensor);
prefix `lora_unet` for the UNet, `lora_te` for the single text encoder of SD1/SD2 and `lora_te1` /
`lora_te2` for SDXL's two. Module paths are tiengine's, which are diffusers' (UNet2DConditionModel) and
transformers' (CLIPTextModel, `text_model.` included): the names sd-scripts gives SD1/SD2 networks. A1111
converts diffusers-style UNet names to its LDM layer names for every family (sd-scripts itself names
SDXL UNet layers by their LDM paths, `lora_unet_input_blocks_4_1_...`; both forms load in A1111). The
safetensors header carries kohya's `ss_*` metadata (`kohya_metadata`). A missing `.alpha` means
alpha = rank (scale 1), kohya's and A1111's rule.

Training (`train_lora`): cached latents (N, C, h, w), already multiplied by the VAE's scaling factor, and
one caption each. Every step draws a batch, uniform integer timesteps and noise from a generator seeded by
(seed, step) (`textual_inversion.seeded_generator`; timesteps optionally limited to [min_timestep,
max_timestep), kohya's options of those names), drops captions to "" with `caption_dropout` (for
classifier-free guidance), encodes the captions through tiengine.text.conditioning exactly as inference
encodes prompts, and minimises `textual_inversion.denoising_loss` (epsilon or v MSE under the model's DDPM
schedule) with AdamW on the adapters only (constant rate, kohya's default; gradient norm clipping).
The same seed, settings, thread count and torch build give the same adapters.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from tiengine.diffusion.schedules import NoiseSchedule
from tiengine.errors import CheckpointError, NetworkError
from tiengine.models.config import ModelConfig, size_time_ids
from tiengine.networks.lora import read_alpha, read_checked_tensor
from tiengine.text.conditioning import EncodeOptions, encode_tokenized, tokenize_texts
from tiengine.training.data import TrainingError
from tiengine.training.textual_inversion import STREAM_STEP, denoising_loss, seeded_generator
from tiengine.weights_conv.readers import SafetensorsFile, TensorInfo
from tiengine.weights_conv.writer import write_safetensors

if TYPE_CHECKING:
    from tiengine.engine import Engine
    from tiengine.text.chunking import TokenizedPrompt

__all__ = ["TEXT_ENCODER_TARGETS", "UNET_TARGETS", "LoraFile", "LoraLayer", "LoraNetwork", "LoraProgress",
           "LoraSettings", "LoraTrainResult", "LoraWeights", "kohya_metadata", "kohya_name", "lora_delta",
           "read_kohya_lora", "train_lora"]

# Module-path patterns (re.fullmatch) of the layers that get adapters.
UNET_TARGETS = (
    r".*\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    r".*\.attentions\.\d+\.(proj_in|proj_out)",
)
TEXT_ENCODER_TARGETS = (r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])",)
UNET_PREFIX = "lora_unet"
KEY_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
NETWORK_MODULE = "networks.lora"  # kohya's ss_network_module of a plain LoRA
STREAM_INIT = 4  # generator stream of the adapters' initial draw (textual_inversion uses 1..3)
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"  # sd-scripts' ss_base_model_version of every SDXL network


def kohya_name(prefix: str, module_path: str) -> str:
    """"lora_unet", "down_blocks.0.attentions.0.proj_in" -> "lora_unet_down_blocks_0_attentions_0_proj_in"."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def text_encoder_prefixes(components: Sequence[str]) -> dict[str, str]:
    """Text-encoder component -> kohya prefix: "lora_te" for one encoder, "lora_te1", "lora_te2" for two."""
    if len(components) == 1:
        return {components[0]: "lora_te"}
    return {name: f"lora_te{index}" for index, name in enumerate(components, start=1)}


def base_model_version(config: ModelConfig) -> str:
    """sd-scripts' ss_base_model_version: "sd_v1" / "sd_v2", "_v" added for v prediction; SDXL's one name."""
    if config.family == "sdxl":
        return SDXL_BASE_MODEL_VERSION
    return f"sd_{'v2' if config.family == 'sd2' else 'v1'}{'_v' if config.prediction == 'v' else ''}"


def lora_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """up @ down over the rank, shaped as the layer's weight: (out, in) or (out, in, kh, kw)."""
    rank = down.shape[0]
    product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)  # (out, in * kh * kw)
    return product.reshape(up.shape[0], *down.shape[1:])


class LoraLayer(nn.Module):
    """One layer's adapter; as a parametrization, `forward(W)` is W + multiplier * alpha / rank * up @ down."""

    def __init__(self, weight_shape: Sequence[int], rank: int, alpha: float, *, generator: torch.Generator,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        out_features, in_features, *kernel = weight_shape
        self.weight_shape = tuple(weight_shape)
        fan_in = in_features * math.prod(kernel)
        bound = 1.0 / math.sqrt(fan_in)
        down = (torch.rand((rank, in_features, *kernel), generator=generator) * 2.0 - 1.0) * bound
        self.down = nn.Parameter(down.to(device))  # (rank, in[, kh, kw])
        up = torch.zeros((out_features, rank, *[1] * len(kernel)), device=device)  # (out, rank[, 1, 1])
        self.up = nn.Parameter(up)
        self.rank, self.alpha = rank, float(alpha)
        self.multiplier = 1.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.multiplier * self.scale * lora_delta(self.down, self.up)).to(weight.dtype)


class LoraNetwork(nn.Module):
    """Adapters by kohya module name, with the (component, module path) each one updates."""

    def __init__(self, layers: Mapping[str, LoraLayer], targets: Mapping[str, tuple[str, str]]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(dict(layers))
        self.targets = dict(targets)
        self._attached: list[nn.Module] = []

    @classmethod
    def create(
        cls,
        modules: Mapping[str, nn.Module],
        *,
        rank: int,
        alpha: float,
        seed: int = 0,
        unet_targets: Sequence[str] = UNET_TARGETS,
        text_encoder_targets: Sequence[str] = (),
    ) -> LoraNetwork:
        """Adapters on every Linear / Conv2d of `modules["unet"]` whose path fully matches a pattern of
        `unet_targets`, and of each text encoder ("text_encoder", "text_encoder_2") for `text_encoder_targets`.
        The initial draw comes from `seed` alone, in module order."""
        encoders = [name for name in ("text_encoder", "text_encoder_2") if name in modules]
        prefixes = {"unet": UNET_PREFIX, **text_encoder_prefixes(encoders)}
        generator = seeded_generator(seed, STREAM_INIT)
        layers: dict[str, LoraLayer] = {}
        targets: dict[str, tuple[str, str]] = {}
        for component, prefix in prefixes.items():
            patterns = [re.compile(p) for p in (unet_targets if component == "unet" else text_encoder_targets)]
            for path, module in modules[component].named_modules():
                if not isinstance(module, (nn.Linear, nn.Conv2d)) or not any(p.fullmatch(path) for p in patterns):
                    continue
                name = kohya_name(prefix, path)
                weight = module.weight
                layers[name] = LoraLayer(weight.shape, rank, alpha, generator=generator, device=weight.device)
                targets[name] = (component, path)
        if not layers:
            raise TrainingError(f"no layer of {sorted(prefixes)} matches the LoRA target patterns {list(unet_targets)}")
        return cls(layers, targets)

    def set_multiplier(self, multiplier: float) -> None:
        for layer in self.layers.values():
            layer.multiplier = float(multiplier)

    def attach(self, modules: Mapping[str, nn.Module]) -> None:
        """Make each target weight read through its adapter (detach() undoes it exactly)."""
        if self._attached:
            raise TrainingError("this LoRA network is attached already; detach it first")
        try:
            for name, (component, path) in self.targets.items():
                try:
                    module = modules[component].get_submodule(path)
                except (KeyError, AttributeError):
                    raise TrainingError(f"adapter {name}: the model has no layer {component}.{path}") from None
                expected = self.layers[name].weight_shape
                if tuple(module.weight.shape) != expected:
                    raise TrainingError(f"adapter {name}: {component}.{path} has a weight {list(module.weight.shape)}, "
                                        f"the adapter was made for {list(expected)}")
                parametrize.register_parametrization(module, "weight", self.layers[name])
                self._attached.append(module)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove the adapters; the modules get back their original weight parameters."""
        while self._attached:
            parametrize.remove_parametrizations(self._attached.pop(), "weight", leave_parametrized=False)

    @contextlib.contextmanager
    def applied(self, modules: Mapping[str, nn.Module], multiplier: float = 1.0) -> Iterator[None]:
        """The adapters attached at `multiplier` for the duration of the block."""
        self.set_multiplier(multiplier)
        self.attach(modules)
        try:
            yield
        finally:
            self.detach()

    def kohya_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The file's tensors: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` (0-d)."""
        tensors = {}
        for name, layer in self.layers.items():
            tensors[f"{name}.lora_down.weight"] = layer.down.detach().to("cpu", dtype).contiguous()
            tensors[f"{name}.lora_up.weight"] = layer.up.detach().to("cpu", dtype).contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=dtype)
        return tensors

    def save(self, path: str | os.PathLike[str], metadata: Mapping[str, str], *, dtype: torch.dtype = torch.float32,
             overwrite: bool = False) -> Path:
        """Write the kohya-ss safetensors file atomically; an existing file is replaced only with `overwrite`."""
        bad = {key: value for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)}
        if bad:
            raise TrainingError(f"{path}: safetensors metadata must map str to str, got {bad!r}")
        tensors = sorted(self.kohya_tensors(dtype).items())
        entries = [(key, TensorInfo(value.dtype, tuple(value.shape))) for key, value in tensors]
        return write_safetensors(path, entries, tensors, metadata=metadata, overwrite=overwrite)


@dataclass(frozen=True)
class LoraWeights:
    """One module of a kohya LoRA file: down (rank, in[, kh, kw]), up (out, rank[, 1, 1]), alpha (None: rank)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """alpha / rank * up @ down, shaped as the layer's weight."""
        return self.scale * lora_delta(self.down, self.up)


@dataclass(frozen=True)
class LoraFile:
    """A read LoRA file: its modules by kohya name and its safetensors metadata."""

    path: Path
    modules: dict[str, LoraWeights]  # kohya module name -> weights (float32)
    metadata: dict[str, str]


def read_kohya_lora(path: str | os.PathLike[str]) -> LoraFile:
    """Read a kohya-ss LoRA safetensors file; a NetworkError names the file, the key, what was expected
    and what was found for any key, shape or value that is not a plain LoRA's. Tensors are read and checked
    (floating point, finite; a scalar alpha) as tiengine.networks.lora reads them for inference."""
    path = Path(path)
    try:
        with SafetensorsFile(path) as source:
            grouped: dict[str, dict[str, str]] = {}  # module -> {suffix: key}
            for key in source.keys():
                module, _, suffix = key.partition(".")
                if suffix not in KEY_SUFFIXES:
                    raise NetworkError(f"{path}: key {key!r} is not a LoRA key (expected <module>.lora_down.weight, "
                                       ".lora_up.weight or .alpha; LyCORIS layouts are not read here)")
                grouped.setdefault(module, {})[suffix] = key
            modules = {module: _module_weights(source, module, keys) for module, keys in grouped.items()}
            metadata = source.metadata
    except CheckpointError as error:
        raise NetworkError(str(error)) from None
    except OSError as error:
        raise NetworkError(f"{path}: cannot read the LoRA file ({error.strerror or error})") from None
    if not modules:
        raise NetworkError(f"{path}: no LoRA modules (expected keys <module>.lora_down.weight ...; found none)")
    return LoraFile(path, modules, metadata)


def _module_weights(source: SafetensorsFile, module: str, keys: dict[str, str]) -> LoraWeights:
    path = source.path
    for suffix in KEY_SUFFIXES[:2]:
        if suffix not in keys:
            raise NetworkError(f"{path}: module {module!r} has no {module}.{suffix} (found {sorted(keys)})")
    down = read_checked_tensor(source, keys["lora_down.weight"]).to(torch.float32)
    up = read_checked_tensor(source, keys["lora_up.weight"]).to(torch.float32)
    key = f"{module}.lora_up.weight"
    if down.ndim not in (2, 4):
        raise NetworkError(f"{path}: key {module}.lora_down.weight: expected 2 or 4 dimensions, found "
                           f"{list(down.shape)}")
    expected_up = f"(out, {down.shape[0]})" if down.ndim == 2 else f"(out, {down.shape[0]}, 1, 1)"
    if up.ndim != down.ndim or up.shape[1] != down.shape[0] or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise NetworkError(f"{path}: key {key}: expected shape {expected_up} for down {list(down.shape)}, "
                           f"found {list(up.shape)}")
    alpha = read_alpha(source, keys["alpha"]) if "alpha" in keys else None
    return LoraWeights(down, up, alpha)


# ------------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class LoraSettings:
    """Every knob of a LoRA run (defaults: kohya's constant-rate AdamW with alpha = rank)."""

    rank: int = 4
    alpha: float = 4.0
    steps: int = 500
    batch_size: int = 8
    learning_rate: float = 1e-3  # UNet adapters
    text_encoder_learning_rate: float | None = None  # None: no text-encoder adapters
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0
    caption_dropout: float = 0.0  # share of captions replaced by "" (the unconditional prompt)
    # training timesteps drawn uniformly from [min_timestep, max_timestep) (kohya's --min/--max_timestep);
    # None: the schedule's first / last
    min_timestep: int | None = None
    max_timestep: int | None = None
    seed: int = 0
    unet_targets: tuple[str, ...] = UNET_TARGETS
    text_encoder_targets: tuple[str, ...] = TEXT_ENCODER_TARGETS

    def __post_init__(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise TrainingError(message)

        for key in ("rank", "steps", "batch_size"):
            value = getattr(self, key)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{key} must be an integer >= 1, got {value!r}")
        need(math.isfinite(self.alpha) and self.alpha > 0, f"alpha must be a positive number, got {self.alpha!r}")
        need(math.isfinite(self.learning_rate) and self.learning_rate > 0,
             f"learning_rate must be a positive number, got {self.learning_rate!r}")
        need(self.text_encoder_learning_rate is None or (math.isfinite(self.text_encoder_learning_rate)
                                                         and self.text_encoder_learning_rate > 0),
             f"text_encoder_learning_rate must be a positive number or None, got {self.text_encoder_learning_rate!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(self.grad_clip is None or (math.isfinite(self.grad_clip) and self.grad_clip > 0),
             f"grad_clip must be a positive number or None, got {self.grad_clip!r}")
        need(0.0 <= self.caption_dropout <= 1.0, f"caption_dropout must lie in [0, 1], got {self.caption_dropout!r}")
        need(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        low, high = self.min_timestep, self.max_timestep
        need((low is None or (isinstance(low, int) and low >= 0))
             and (high is None or (isinstance(high, int) and high >= 1))
             and (low is None or high is None or low < high),
             f"min_timestep / max_timestep must be integers with 0 <= min < max, got {low!r} / {high!r}")


@dataclass(frozen=True)
class LoraProgress:
    """Passed to the callback after every step; the callback may return False to stop."""

    step: int  # completed steps
    steps: int
    loss: float
    elapsed_s: float


@dataclass
class LoraTrainResult:
    network: LoraNetwork  # detached from the model
    losses: list[float] = field(default_factory=list)  # mean loss of each step's batch
    seconds: float = 0.0
    stopped_early: bool = False


def kohya_metadata(
    settings: LoraSettings, config: ModelConfig, *, output_name: str, comment: str, images: int, resolution: int,
) -> dict[str, str]:
    """The `ss_*` header entries sd-scripts writes (those that apply to this trainer), as strings."""
    text_lr = settings.text_encoder_learning_rate
    return {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(settings.rank),
        "ss_network_alpha": str(float(settings.alpha)),
        "ss_base_model_version": base_model_version(config),
        "ss_v2": str(config.family == "sd2"),
        "ss_output_name": output_name,
        "ss_training_comment": comment,
        "ss_seed": str(settings.seed),
        "ss_max_train_steps": str(settings.steps),
        "ss_batch_size_per_device": str(settings.batch_size),
        "ss_num_train_images": str(images),
        "ss_resolution": str((resolution, resolution)),
        "ss_learning_rate": str(settings.learning_rate),
        "ss_unet_lr": str(settings.learning_rate),
        "ss_text_encoder_lr": str(text_lr),
        "ss_network_train_unet_only": str(text_lr is None),
        "ss_lr_scheduler": "constant",
        "ss_optimizer": f"torch.optim.AdamW(weight_decay={settings.weight_decay})",
        "ss_max_grad_norm": str(settings.grad_clip),
        "ss_caption_dropout_rate": str(settings.caption_dropout),
        "ss_mixed_precision": "no",
    }


def train_lora(
    engine: Engine,
    latents: torch.Tensor,
    captions: Sequence[str],
    settings: LoraSettings = LoraSettings(),
    *,
    callback: Callable[[LoraProgress], bool | None] | None = None,
) -> LoraTrainResult:
    """Train a LoRA network on `engine`'s frozen model from scaled latents (N, C, h, w) and their captions.

    The engine's modules are used in place and left as they were (the network is detached at the end);
    the returned network holds the adapters (save it with `network.save`).
    """
    if latents.ndim != 4 or latents.shape[0] != len(captions) or not len(captions):
        raise TrainingError(f"expected latents (N, C, h, w) and N captions, got latents {list(latents.shape)} and "
                            f"{len(captions)} captions")
    if engine.dtype == torch.float16:
        raise TrainingError("LoRA training needs float32 or bfloat16 model weights; load the engine with "
                            "dtype=torch.float32")
    modules, device = engine.modules, engine.device
    train_text = settings.text_encoder_learning_rate is not None
    network = LoraNetwork.create(modules, rank=settings.rank, alpha=settings.alpha, seed=settings.seed,
                                 unet_targets=settings.unet_targets,
                                 text_encoder_targets=settings.text_encoder_targets if train_text else ())
    groups = [{"params": [p for name, layer in network.layers.items() for p in layer.parameters()
                          if network.targets[name][0] == "unet"], "lr": settings.learning_rate}]
    text_params = [p for name, layer in network.layers.items() for p in layer.parameters()
                   if network.targets[name][0] != "unet"]
    if text_params:
        groups.append({"params": text_params, "lr": settings.text_encoder_learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    alphas_cumprod = NoiseSchedule.from_betas(**engine.config.schedule.__dict__).alphas_cumprod.to(device)
    first = settings.min_timestep or 0
    last = alphas_cumprod.numel() if settings.max_timestep is None else settings.max_timestep
    if last > alphas_cumprod.numel():
        raise TrainingError(f"max_timestep {last} is past the schedule's {alphas_cumprod.numel()} timesteps")
    options = EncodeOptions()
    chunked: dict[str, TokenizedPrompt] = {}
    # captions bind the engine's embeddings as its prompts do: their rows after the vocabulary's
    rows = {slot.embedding_key: engine.vocabulary.extra_rows(slot.embedding_key, device=device, dtype=engine.dtype)
            for slot in engine.slots}
    latents = latents.to(device, torch.float32)
    result = LoraTrainResult(network)
    started = time.perf_counter()
    with network.applied(modules):
        for step in range(settings.steps):
            generator = seeded_generator(settings.seed, STREAM_STEP, step)
            index = torch.randint(len(captions), (settings.batch_size,), generator=generator)
            timesteps = torch.randint(first, last, (settings.batch_size,), generator=generator)
            noise = torch.randn((settings.batch_size, *latents.shape[1:]), generator=generator)  # (B, C, h, w)
            dropped = (torch.rand(settings.batch_size, generator=generator) < settings.caption_dropout).tolist()
            texts = ["" if drop else captions[i] for i, drop in zip(index.tolist(), dropped)]
            for text in set(texts) - chunked.keys():
                chunked[text] = tokenize_texts([text], engine.tokenizer, options)[0]
            with torch.set_grad_enabled(train_text):
                encoded = encode_tokenized([chunked[text] for text in texts], engine.slots, rows, options)
            y = None
            if engine.config.unet.addition_embed_type == "text_time":
                side = latents.shape[-1] * modules["vae"].downscale_factor
                time_ids = torch.tensor([size_time_ids(engine.config, side, side)], device=device)
                y = modules["unet"].text_time_conditioning(encoded.pooled.float(), time_ids.expand(len(texts), -1))
            loss = denoising_loss(modules["unet"], engine.config.prediction, alphas_cumprod, latents[index.to(device)],
                                  timesteps.to(device), noise.to(device), encoded.context, y)
            if not math.isfinite(loss.item()):
                raise TrainingError(f"the loss became {loss.item()} at step {step + 1}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip is not None:
                nn.utils.clip_grad_norm_(list(network.parameters()), settings.grad_clip)
            optimizer.step()
            result.losses.append(loss.item())
            result.seconds = time.perf_counter() - started
            if callback is not None and callback(LoraProgress(step + 1, settings.steps, loss.item(),
                                                              result.seconds)) is False:
                result.stopped_early = step + 1 < settings.steps
                break
    return result
