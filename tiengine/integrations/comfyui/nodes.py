"""The ComfyUI node "tiengine A1111 text encode": CLIP + an A1111 prompt -> CONDITIONING.

ComfyUI's own CLIPTextEncode reads `(word:1.2)` with its own rules (weights blend towards the empty prompt,
no mean restore, `embedding:NAME` syntax, no BREAK). This node gives A1111's conditioning instead: tiengine's
parser, chunking, emphasis modes, clip skip and bare-name embeddings, computed on the ComfyUI CLIP's own
transformer tensors (shared, not copied, when they are in one dtype; ComfyUI keeps the token table in fp32 and
may run the layers in fp16, in which case the table is cast per call).

The ComfyUI structures used (ComfyUI's comfy/sd.py `CLIP`, comfy/sd1_clip.py, comfy/sdxl_clip.py,
comfy/sd2_clip.py, comfy/clip_model.py, nodes.py `CLIPTextEncode`):
- `clip.load_model()` moves the text model to its device and applies the patches (LoRAs) it carries;
  `clip.cond_stage_model` is an `SD1ClipModel` (attribute `clip_l`), `SD2ClipModel` (`clip_h`),
  `SDXLClipModel` (`clip_l`, `clip_g`) or `SDXLRefinerClipModel` (`clip_g`); each of those is an
  `SDClipModel` whose `transformer` is a `clip_model.CLIPTextModel` with transformers' parameter names
  (`text_model.embeddings.token_embedding.weight`, ..., `text_projection.weight`, an identity for CLIP-L) and
  its head count in `text_model.encoder.layers[i].self_attn.heads`. Activations follow the towers: CLIP-L
  quick_gelu, OpenCLIP-H and bigG gelu (ComfyUI's sd1_clip_config.json, sd2_clip_config.json,
  clip_config_bigg.json).
- CONDITIONING is a list of `[cond (B, T, C), {"pooled_output": (B, P) or None}]`; SDXL reads the pooled
  output (encoder 2's, chunk 0); ComfyUI fills the size conditioning from the latent size, as A1111 does.

A1111 differences that stay outside this node: its empty SDXL negative prompt is all zeros (use ComfyUI's
ConditioningZeroOut for the negative), and ComfyUI's CLIPSetLastLayer is not read (the node's clip_skip input,
A1111's numbering, decides). AND and prompt schedules that change the text are refused with a message.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tiengine.integrations.cache import PROCESS_CACHE
from tiengine.integrations.shared_encoders import (
    IntegrationError,
    shared_encoder,
    single_call_conditioning,
    text_only_engine,
)
from tiengine.models.text_encoder import ClipTextEncoder
from tiengine.text.chunking import EMPHASIS_MODES
from tiengine.text.conditioning import EncodeOptions
from tiengine.weights_conv.sources import text_encoder_config

CALLER = "a ComfyUI CONDITIONING"
LOGGER = logging.getLogger("tiengine.comfyui")
# ComfyUI text-model class -> (family, variant, [(tiengine component, ComfyUI attribute)])
COMFY_TEXT_MODELS = {
    "SD1ClipModel": ("sd1", "base", [("text_encoder", "clip_l")]),
    "SD2ClipModel": ("sd2", "base", [("text_encoder", "clip_h")]),
    "SDXLClipModel": ("sdxl", "base", [("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")]),
    "SDXLRefinerClipModel": ("sdxl", "refiner", [("text_encoder_2", "clip_g")]),
}
TOWER_ACTIVATIONS = {"clip_l": "quick_gelu", "clip_h": "gelu", "clip_g": "gelu"}
MAX_CLIP_SKIP = 12  # CLIP-L's layer count: A1111's slider range


class TiengineA1111TextEncode:
    """ComfyUI node: an A1111 prompt (weights, BREAK, long prompts, embeddings by bare name) -> CONDITIONING."""

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "conditioning/tiengine"
    DESCRIPTION = ("Encodes a prompt as AUTOMATIC1111 does (tiengine): weights with mean restore, BREAK, "
                   "75-token chunks, clip skip, textual-inversion embeddings named bare in the prompt.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:
        return {
            "required": {
                "clip": ("CLIP",),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
                "embeddings_folder": ("STRING", {"default": ""}),
                "emphasis": (list(EMPHASIS_MODES), {"default": "original"}),
                "clip_skip": ("INT", {"default": 1, "min": 1, "max": MAX_CLIP_SKIP}),
            }
        }

    def encode(self, clip: Any, text: str, embeddings_folder: str = "", emphasis: str = "original",
               clip_skip: int = 1) -> tuple[list[list[Any]]]:
        """([[cond (1, 77 * chunks, C), {"pooled_output": (1, P) or None}]],) for `text`."""
        if hasattr(clip, "load_model"):
            clip.load_model()  # ComfyUI: on its device, with its LoRA patches applied
        family, variant, encoders = clip_encoders(clip)
        library = PROCESS_CACHE.library(embeddings_folder) if embeddings_folder.strip() else None
        engine = text_only_engine(family, encoders, embeddings=library, variant=variant)
        single = single_call_conditioning(engine, text, "", options=EncodeOptions(clip_skip=clip_skip, emphasis=emphasis),
                                          pad=False, caller=CALLER)
        for warning in single.conditioning.warnings:
            LOGGER.warning(warning)  # ComfyUI's console shows its custom nodes' log
        for mention in single.conditioning.skipped:
            LOGGER.warning("%s: %s", mention.name, mention.reason)
        return ([[single.context, {"pooled_output": single.pooled}]],)


def clip_encoders(clip: Any) -> tuple[str, str, dict[str, ClipTextEncoder]]:
    """(family, variant, tiengine encoders on the tensors of a ComfyUI CLIP object's transformers)."""
    model = getattr(clip, "cond_stage_model", None)
    kind = type(model).__name__
    if kind not in COMFY_TEXT_MODELS:
        raise IntegrationError(f"CLIP.cond_stage_model is a {kind}; expected one of {', '.join(COMFY_TEXT_MODELS)} "
                               "(SD1, SD2, SDXL text models)")
    family, variant, towers = COMFY_TEXT_MODELS[kind]
    encoders = {}
    for component, attribute in towers:
        transformer = getattr(getattr(model, attribute, None), "transformer", None)
        if transformer is None:
            raise IntegrationError(f"CLIP.cond_stage_model ({kind}).{attribute}.transformer: expected ComfyUI's CLIP "
                                   "text transformer, found none")
        encoders[component] = _tower_encoder(family, component, attribute, transformer, where=f"{kind}.{attribute}")
    return family, variant, encoders


def _tower_encoder(family: str, component: str, attribute: str, transformer: torch.nn.Module, *,
                   where: str) -> ClipTextEncoder:
    """A tiengine encoder on one ComfyUI `clip_model.CLIPTextModel`: architecture from its tensors and modules,
    reading from the family (SD2's tower is complete: 24 layers read at the penultimate)."""
    text_model = transformer.text_model
    layers = text_model.encoder.layers
    table = text_model.embeddings.token_embedding.weight  # (vocab, hidden)
    projected = attribute == "clip_g"  # CLIP-L's and OpenCLIP-H's text_projection are not read (identity in ComfyUI)
    architecture = {
        "hidden_size": table.shape[1],
        "intermediate_size": layers[0].mlp.fc1.weight.shape[0],
        "num_hidden_layers": len(layers),
        "num_attention_heads": layers[0].self_attn.heads,
        "hidden_act": TOWER_ACTIVATIONS[attribute],
        "vocab_size": table.shape[0],
        "max_position_embeddings": text_model.embeddings.position_embedding.weight.shape[0],
        "architectures": ["CLIPTextModelWithProjection" if projected else "CLIPTextModel"],
    }
    if projected:
        architecture["projection_dim"] = transformer.text_projection.weight.shape[0]
    config = text_encoder_config(family, component, architecture, full_tower=True)
    reference = text_model.final_layer_norm.weight  # the layers' dtype and device
    state = {key: value.to(reference.device, reference.dtype) for key, value in transformer.state_dict().items()
             if projected or key != "text_projection.weight"}
    return shared_encoder(config, state, where=where)


NODE_CLASS_MAPPINGS = {"TiengineA1111TextEncode": TiengineA1111TextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"TiengineA1111TextEncode": "tiengine A1111 text encode"}
