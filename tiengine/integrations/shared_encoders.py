"""tiengine's A1111 conditioning run on another program's text-encoder tensors, for one sampler call.

- `shared_encoder(config, state)`: a tiengine `ClipTextEncoder` whose parameters are the given tensors
  (`load_state_dict(assign=True)` on a meta-device module: no copy, `data_ptr` equal). The state-dict names
  are transformers' `CLIPTextModel` ones, which diffusers pipelines and ComfyUI's `clip_model.CLIPTextModel`
  both use; tiengine's modules carry the same names (tiengine.models.text_encoder).
- `text_only_engine(family, encoders)`: an `Engine` holding text encoders only, so prompts go through the
  engine's own path (prompt parsing, embeddings, chunking, emphasis, clip skip, reports). Its ModelConfig's
  UNet and VAE entries are placeholders that state only the context width: this engine encodes, it never
  samples. Embedding vectors reach the encoders as the engine's extra rows for ids >= 49408, so the other
  program's token table is never changed.
- `single_call_conditioning(engine, prompt, negative_prompt)`: the conditioning a single sampler call takes,
  one context per prompt for every step. A1111's `AND` (several conds per step, weighted) and prompt
  schedules that change the text between steps need a sampler that switches conditioning per step, so they
  are refused by name; a schedule that resolves to one text for every step is fine. With `pad=True` the
  shorter context is padded with empty-prompt chunks to the other's length, as A1111 pads cond and uncond
  for one batch (its "pad prompt/negative prompt to be same length" option: `pad_cond` in
  modules/sd_samplers_cfg_denoiser.py appends the encoding of "" chunk by chunk).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tiengine.embeddings.library import EmbeddingLibrary
from tiengine.engine import Engine
from tiengine.errors import EngineError
from tiengine.models.config import ModelConfig
from tiengine.models.text_encoder import (
    CLIP_CONTEXT_LENGTH,
    ClipTextEncoder,
    TextEncoderConfig,
)
from tiengine.models.unet import UNetConfig
from tiengine.models.vae import VaeConfig
from tiengine.results import Conditioning, ScheduledConditioning
from tiengine.text.conditioning import EncodeOptions
from tiengine.text.prompt import PromptLimits


class IntegrationError(EngineError):
    """A prompt that a single call of another program's sampler cannot take (AND, prompt schedules), or
    another program's objects that are not what tiengine expects (the message names what was found)."""


@dataclass(frozen=True)
class SingleCallConditioning:
    """One prompt pair as a single sampler call takes it, with the engine's report.

    context / negative_context: (1, 77 * chunks, C), the same chunk count when padded; pooled /
    negative_pooled: (1, P) for SDXL (encoder 2's pooled chunk 0), else None. `conditioning` is the
    engine's result (applied and skipped embeddings, warnings, extra-network tags)."""

    context: torch.Tensor
    pooled: torch.Tensor | None
    negative_context: torch.Tensor
    negative_pooled: torch.Tensor | None
    conditioning: Conditioning


def shared_encoder(config: TextEncoderConfig, state: Mapping[str, torch.Tensor], *, where: str) -> ClipTextEncoder:
    """A tiengine encoder of `config` whose parameters are the tensors of `state` (transformers' names), shared,
    not copied. `where` names the tensors' owner in errors. Every tensor must have one dtype and device."""
    kinds = {(tensor.dtype, tensor.device) for tensor in state.values()}
    if len(kinds) != 1:
        found = ", ".join(sorted(f"{dtype} on {device}" for dtype, device in kinds))
        raise IntegrationError(f"{where}: expected every text-encoder tensor in one dtype on one device, found {found}")
    encoder = ClipTextEncoder(config, device="meta")
    try:
        encoder.load_state_dict(dict(state), assign=True)
    except RuntimeError as error:
        raise IntegrationError(
            f"{where}: the tensors do not fit a CLIP text encoder of width {config.hidden_size} with "
            f"{config.num_hidden_layers} layers: {error}"
        ) from None
    return encoder.eval().requires_grad_(False)


def text_only_engine(
    family: str,
    encoders: Mapping[str, ClipTextEncoder],
    *,
    embeddings: EmbeddingLibrary | None = None,
    prompt_limits: PromptLimits | None = None,
    variant: str = "base",
) -> Engine:
    """An Engine over these text encoders ("text_encoder" and/or "text_encoder_2") that encodes prompts only.

    The tensors live where the encoders' live: the engine's device and dtype are their token table's."""
    configs = {name: encoder.config for name, encoder in encoders.items()}
    width = sum(config.hidden_size for config in configs.values())  # SDXL: 768 + 1280 channels
    placeholder_unet = dataclasses.replace(UNetConfig.sd15(), cross_attention_dim=width)  # never built
    config = ModelConfig(family, "epsilon", configs, placeholder_unet, VaeConfig.sd(), variant=variant)
    table = next(iter(encoders.values())).text_model.embeddings.token_embedding.weight
    return Engine(config, dict(encoders), embeddings=embeddings, device=table.device, dtype=table.dtype,
                  prompt_limits=prompt_limits)


def single_call_conditioning(
    engine: Engine,
    prompt: str,
    negative_prompt: str = "",
    *,
    steps: int = 20,
    options: EncodeOptions | None = None,
    pad: bool = True,
    caller: str = "a single sampler call",
    **option_fields: object,
) -> SingleCallConditioning:
    """The engine's A1111 conditioning of the pair, refused with a message naming `caller` when it varies
    across steps or composes prompts; with `pad` both contexts get the same number of 77-token chunks."""
    conditioning = engine.encode(prompt, negative_prompt, steps=steps, options=options, **option_fields)
    if len(conditioning.positive) != 1 or conditioning.positive[0][1] != 1.0:
        parts = ", ".join(f"{scheduled.texts[0]!r} (weight {weight:g})" for scheduled, weight in conditioning.positive)
        raise IntegrationError(
            f"the prompt composes {len(conditioning.positive)} weighted part(s) with AND: {parts}; {caller} "
            "takes one conditioning per prompt, so AND (and a part weight other than 1) cannot be expressed. "
            "Remove AND, or generate with tiengine's Engine.generate, which composes the parts per step"
        )
    context, pooled = _one_text(conditioning.positive[0][0], "prompt", caller, steps)
    negative_context, negative_pooled = _one_text(conditioning.negative, "negative prompt", caller, steps)
    if pad and context.shape[1] != negative_context.shape[1]:
        empty = engine.encode("", steps=1, options=options, **option_fields).positive[0][0].entries[0][1]  # (1, 77, C)
        chunks = max(context.shape[1], negative_context.shape[1]) // CLIP_CONTEXT_LENGTH
        context = pad_with_empty_chunks(context, chunks, empty)
        negative_context = pad_with_empty_chunks(negative_context, chunks, empty)
    return SingleCallConditioning(context, pooled, negative_context, negative_pooled, conditioning)


def pad_with_empty_chunks(context: torch.Tensor, chunks: int, empty: torch.Tensor) -> torch.Tensor:
    """(1, 77 * k, C) -> (1, 77 * chunks, C): the empty prompt's chunk (1, 77, C) appended chunks - k times."""
    missing = chunks - context.shape[1] // CLIP_CONTEXT_LENGTH
    if missing <= 0:
        return context
    return torch.cat([context, empty.to(context).repeat(1, missing, 1)], dim=1)


def _one_text(
    scheduled: ScheduledConditioning, what: str, caller: str, steps: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (context, pooled) of a schedule with one entry; a schedule of several texts is refused."""
    if len(scheduled.entries) != 1:
        plan = "; ".join(f"{text!r} until step {last_step}"
                         for (last_step, _, _), text in zip(scheduled.entries, scheduled.texts))
        raise IntegrationError(
            f"the {what} changes its text during sampling ({steps} steps: {plan}); {caller} takes one "
            "conditioning for every step, so [from:to:when] and [a|b] that change the text cannot be expressed. "
            "Write the text of one step, or generate with tiengine's Engine.generate"
        )
    _, context, pooled = scheduled.entries[0]
    return context, pooled
