"""A1111 prompts for diffusers pipelines: tiengine's conditioning as a pipeline call's keyword arguments.

    encoder = PipelineEncoder.from_pipeline(pipe, embeddings="./embeddings")
    image = pipe(**encoder.kwargs("a (red:1.3) cat BREAK sky", "EasyNegative"), num_inference_steps=20).images[0]

`PipelineEncoder.from_pipeline` runs tiengine's conditioning (A1111's parser, weights, BREAK, long prompts,
clip skip, embeddings, SDXL's two encoders and pooled output) on the pipeline's own text encoders: the
tiengine encoders' parameters are the pipeline's tensors (tiengine.integrations.shared_encoders), so there
is no second copy of the weights and the pipeline is never changed (embedding vectors are extra rows passed
per call). `PipelineEncoder.from_engine` uses a tiengine Engine's encoders instead.

The keyword arguments are those of `StableDiffusionPipeline` (`prompt_embeds`, `negative_prompt_embeds`) and
`StableDiffusionXLPipeline` (plus `pooled_prompt_embeds`, `negative_pooled_prompt_embeds`), and of the
img2img / inpaint pipelines that take the same names. Both contexts have the same number of 77-token chunks
(diffusers requires equal shapes): the shorter is padded with the empty prompt's encoding, as A1111 pads
cond and uncond for one batch. AND and prompt schedules that change the text during sampling are refused
(tiengine.integrations.shared_encoders.single_call_conditioning).

How a pipeline's encoders are read (the family): a pipeline with `text_encoder_2` is SDXL (with no
`text_encoder`, the refiner); otherwise the text encoder's `hidden_act` tells OpenAI CLIP-L ("quick_gelu",
SD1) from OpenCLIP-H ("gelu", SD2), the rule tiengine's converter applies to diffusers folders, and the
reading (layer, final norm, padding id) is the family's (tiengine.weights_conv.sources.text_encoder_config).
diffusers itself is not imported: any object with these attributes works.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from tiengine.embeddings.library import EmbeddingLibrary
from tiengine.engine import Engine
from tiengine.integrations.cache import PROCESS_CACHE
from tiengine.integrations.shared_encoders import (
    IntegrationError,
    SingleCallConditioning,
    shared_encoder,
    single_call_conditioning,
    text_only_engine,
)
from tiengine.models.text_encoder import TextEncoderConfig
from tiengine.results import Conditioning
from tiengine.text.conditioning import EncodeOptions
from tiengine.text.prompt import PromptLimits
from tiengine.weights_conv.sources import text_encoder_config

CALLER = "a diffusers pipeline call (prompt_embeds)"
HIDDEN_ACT_FAMILIES = {"quick_gelu": "sd1", "gelu": "sd2"}  # OpenAI CLIP-L, OpenCLIP-H


@dataclass(frozen=True)
class PipelineEmbeds:
    """A prompt pair as diffusers takes it: contexts (1, 77 * chunks, C) of equal shape, SDXL pooled (1, P) or
    None, and the engine's report (`conditioning.applied`, `.skipped`, `.warnings`, `.networks`)."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None
    negative_pooled_prompt_embeds: torch.Tensor | None
    conditioning: Conditioning

    def kwargs(self) -> dict[str, torch.Tensor]:
        """The pipeline call's keyword arguments: two for SD1/SD2, four for SDXL."""
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


class PipelineEncoder:
    """Encodes A1111 prompts into a diffusers pipeline's `prompt_embeds` keyword arguments."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_pipeline(
        cls,
        pipeline: Any,
        *,
        embeddings: str | os.PathLike[str] | EmbeddingLibrary | None = None,
        prompt_limits: PromptLimits | None = None,
    ) -> PipelineEncoder:
        """On the pipeline's own text encoders (the tensors they hold now: build it after `pipeline.to(...)`);
        `embeddings`: a folder or a library."""
        library = EmbeddingLibrary(embeddings) if isinstance(embeddings, (str, os.PathLike)) else embeddings
        family, variant, modules = _pipeline_encoders(pipeline)
        encoders = {
            component: shared_encoder(_encoder_config(family, component, module), module.state_dict(),
                                      where=f"pipeline.{component}")
            for component, module in modules.items()
        }
        return cls(text_only_engine(family, encoders, embeddings=library, prompt_limits=prompt_limits,
                                    variant=variant))

    @classmethod
    def from_engine(cls, engine: Engine) -> PipelineEncoder:
        """On a tiengine Engine's encoders (its embeddings, LoRA and hypernetwork folders included)."""
        return cls(engine)

    @classmethod
    def from_model(
        cls,
        model_path: str | os.PathLike[str],
        *,
        embeddings: str | os.PathLike[str] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> PipelineEncoder:
        """On the engine of a model path, loaded once per process (tiengine.integrations.cache.PROCESS_CACHE)."""
        return cls(PROCESS_CACHE.engine(model_path, embeddings=embeddings, device=device, dtype=dtype))

    def encode(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        steps: int = 20,
        options: EncodeOptions | None = None,
        **option_fields: object,
    ) -> PipelineEmbeds:
        """The pair's embeddings (A1111 semantics; `options` / EncodeOptions keywords such as clip_skip=2 as in
        Engine.encode). `steps` only decides whether a prompt schedule resolves to one text."""
        single: SingleCallConditioning = single_call_conditioning(
            self.engine, prompt, negative_prompt, steps=steps, options=options, pad=True, caller=CALLER,
            **option_fields,
        )
        return PipelineEmbeds(single.context, single.negative_context, single.pooled, single.negative_pooled,
                              single.conditioning)

    def kwargs(self, prompt: str, negative_prompt: str = "", **encode_fields: Any) -> dict[str, torch.Tensor]:
        """`encode(...).kwargs()`: pass them as `pipeline(**kwargs, num_inference_steps=..., ...)`."""
        return self.encode(prompt, negative_prompt, **encode_fields).kwargs()


def _pipeline_encoders(pipeline: Any) -> tuple[str, str, dict[str, torch.nn.Module]]:
    """(family, variant, {"text_encoder"[, "text_encoder_2"]: module}) of a diffusers pipeline."""
    first = getattr(pipeline, "text_encoder", None)
    second = getattr(pipeline, "text_encoder_2", None)
    if second is not None:
        modules = {"text_encoder": first, "text_encoder_2": second} if first is not None else {"text_encoder_2": second}
        return "sdxl", "base" if first is not None else "refiner", modules
    if first is None:
        raise IntegrationError(f"{type(pipeline).__name__}: expected a pipeline with a text_encoder "
                               "(StableDiffusionPipeline, StableDiffusionXLPipeline), found none")
    activation = getattr(getattr(first, "config", None), "hidden_act", None)
    if activation not in HIDDEN_ACT_FAMILIES:
        raise IntegrationError(f"{type(pipeline).__name__}.text_encoder: config.hidden_act {activation!r} is neither "
                               "CLIP-L's 'quick_gelu' (SD1) nor OpenCLIP-H's 'gelu' (SD2)")
    return HIDDEN_ACT_FAMILIES[activation], "base", {"text_encoder": first}


def _encoder_config(family: str, component: str, module: torch.nn.Module) -> TextEncoderConfig:
    """The tiengine config of a transformers CLIP text model: its architecture (the class name says whether it
    has a text projection, which a freshly built model's config does not record) read as the family reads it."""
    architecture = {**module.config.to_dict(), "architectures": [type(module).__name__]}
    return text_encoder_config(family, component, architecture, full_tower=False)
