"""tiengine.integrations.comfyui: the "tiengine A1111 text encode" node against ComfyUI's structures.

ComfyUI is not installed: `FakeComfyClip` restates the parts of ComfyUI's CLIP object the node reads (comfy/sd.py
`CLIP` with `cond_stage_model` and `load_model()`; comfy/sd1_clip.py `SD1ClipModel.clip_l` and comfy/sdxl_clip.py
`SDXLClipModel.clip_l` / `.clip_g`, each an `SDClipModel` whose `transformer` is a comfy/clip_model.py
`CLIPTextModel`: `text_model.embeddings.token_embedding`, `text_model.encoder.layers[i].self_attn.heads`,
`text_model.final_layer_norm`, `text_projection`, the identity for CLIP-L), filled with a tiny model's weights.
The CONDITIONING it returns has ComfyUI's published layout (`[[cond (B, T, C), {"pooled_output": ...}]]`, as
nodes.py CLIPTextEncode returns it) and equals the tiengine engine's conditioning of the same weights bit for bit.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from embedding_builders import vectors
from model_builders import build_modules, tiny_model_config, write_model_folder
from torch import nn

import tiengine.integrations.comfyui as comfyui_package
from tiengine.embeddings.embedding import Embedding, save_embedding
from tiengine.engine import Engine
from tiengine.integrations.comfyui.nodes import (
    NODE_CLASS_MAPPINGS,
    NODE_DISPLAY_NAME_MAPPINGS,
    TiengineA1111TextEncode,
    clip_encoders,
)
from tiengine.integrations.shared_encoders import IntegrationError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- ComfyUI's text-model structure, restated (comfy/clip_model.py, comfy/sd1_clip.py, comfy/sdxl_clip.py) ----

class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)


class CLIPMLP(nn.Module):
    def __init__(self, width: int, intermediate: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, intermediate), nn.Linear(intermediate, width)


class CLIPLayer(nn.Module):
    def __init__(self, width: int, heads: int, intermediate: int):
        super().__init__()
        self.layer_norm1, self.self_attn = nn.LayerNorm(width), CLIPAttention(width, heads)
        self.layer_norm2, self.mlp = nn.LayerNorm(width), CLIPMLP(width, intermediate)


class CLIPEncoder(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, intermediate: int):
        super().__init__()
        self.layers = nn.ModuleList([CLIPLayer(width, heads, intermediate) for _ in range(layers)])


class CLIPEmbeddings(nn.Module):
    def __init__(self, width: int):
        super().__init__()  # ComfyUI keeps these two tables in float32 whatever the layers' dtype
        self.token_embedding, self.position_embedding = nn.Embedding(49408, width), nn.Embedding(77, width)


class CLIPTextModel_(nn.Module):  # ComfyUI's name
    def __init__(self, config: dict):
        super().__init__()
        width = config["hidden_size"]
        self.embeddings = CLIPEmbeddings(width)
        self.encoder = CLIPEncoder(config["num_hidden_layers"], width, config["num_attention_heads"],
                                   config["intermediate_size"])
        self.final_layer_norm = nn.LayerNorm(width)


class CLIPTextModel(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.num_layers = config["num_hidden_layers"]
        self.text_model = CLIPTextModel_(config)
        width = config["hidden_size"]
        self.text_projection = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.text_projection.weight.copy_(torch.eye(width))


class SDClipModel(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.transformer = CLIPTextModel(config)
        self.logit_scale = nn.Parameter(torch.tensor(4.6055))


class SD1ClipModel(nn.Module):
    def __init__(self, clip_l: SDClipModel):
        super().__init__()
        self.clip_l = clip_l


class SDXLClipModel(nn.Module):
    def __init__(self, clip_l: SDClipModel, clip_g: SDClipModel):
        super().__init__()
        self.clip_l, self.clip_g = clip_l, clip_g


class SDXLRefinerClipModel(nn.Module):
    def __init__(self, clip_g: SDClipModel):
        super().__init__()
        self.clip_g = clip_g


class FakeComfyClip:
    """comfy/sd.py CLIP: the text model in `cond_stage_model`; `load_model()` readies it (counted here)."""

    def __init__(self, cond_stage_model: nn.Module):
        self.cond_stage_model = cond_stage_model
        self.layer_idx = None
        self.loads = 0

    def load_model(self) -> None:
        self.loads += 1


def comfy_tower(module: nn.Module) -> SDClipModel:
    """A ComfyUI SDClipModel holding a tiengine encoder's weights (CLIP-L keeps its identity projection)."""
    config = module.config
    tower = SDClipModel({"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                         "num_attention_heads": config.num_attention_heads,
                         "intermediate_size": config.intermediate_size})
    tower.transformer.load_state_dict(module.state_dict(), strict=config.projection_dim is not None)
    return tower.eval()


def comfy_clip(family: str, modules: dict[str, nn.Module]) -> FakeComfyClip:
    if family == "sdxl":
        return FakeComfyClip(SDXLClipModel(comfy_tower(modules["text_encoder"]), comfy_tower(modules["text_encoder_2"])))
    return FakeComfyClip(SD1ClipModel(comfy_tower(modules["text_encoder"])))


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def model(request, tmp_path_factory):
    """(family, engine with an embeddings folder (SD1), fake ComfyUI CLIP on the same weights, embeddings folder)."""
    family = request.param
    config = tiny_model_config(family)
    modules = build_modules(config, seed=5)
    root = tmp_path_factory.mktemp(family)
    embeddings = root / "embeddings"
    embeddings.mkdir()
    if family == "sd1":  # tiny SDXL widths are no embedding format's; SD1 takes a custom width
        save_embedding(Embedding("rick", {"clip_l": vectors(3, 48, seed=1) * 50}), embeddings / "rick.safetensors")
    engine = Engine.load(write_model_folder(root / "model", config, modules), embeddings=embeddings)
    return family, engine, comfy_clip(family, modules), embeddings


def entry(conditioning, which: str = "positive") -> tuple[torch.Tensor, torch.Tensor | None]:
    scheduled = conditioning.positive[0][0] if which == "positive" else conditioning.negative
    _, context, pooled = scheduled.entries[0]
    return context, pooled


def test_node_declares_what_comfyui_reads():
    inputs = TiengineA1111TextEncode.INPUT_TYPES()
    assert list(inputs) == ["required"]
    required = inputs["required"]
    assert required["clip"] == ("CLIP",) and required["text"][0] == "STRING" and required["text"][1]["multiline"]
    assert required["embeddings_folder"][0] == "STRING"
    assert required["emphasis"][0] == ["original", "no_norm", "ignore", "none", "lerp"]
    assert required["clip_skip"] == ("INT", {"default": 1, "min": 1, "max": 12})
    assert TiengineA1111TextEncode.RETURN_TYPES == ("CONDITIONING",)
    assert callable(getattr(TiengineA1111TextEncode(), TiengineA1111TextEncode.FUNCTION))
    assert isinstance(TiengineA1111TextEncode.CATEGORY, str)
    assert NODE_CLASS_MAPPINGS == {"TiengineA1111TextEncode": TiengineA1111TextEncode}
    assert NODE_DISPLAY_NAME_MAPPINGS == {"TiengineA1111TextEncode": "tiengine A1111 text encode"}


def test_folder_loads_as_comfyui_loads_a_custom_node_package():
    """ComfyUI (nodes.py load_custom_node) imports custom_nodes/<folder>/__init__.py under the folder's name."""
    init = Path(comfyui_package.__file__)
    spec = importlib.util.spec_from_file_location("tiengine_custom_nodes", init)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS["TiengineA1111TextEncode"] is TiengineA1111TextEncode
    assert module.NODE_DISPLAY_NAME_MAPPINGS == NODE_DISPLAY_NAME_MAPPINGS


def test_conditioning_has_comfyuis_layout_and_the_engines_values(model):
    family, engine, clip, embeddings = model
    text = "a (red:1.3) circle, (blue sky:0.8) BREAK on the [left]" + (", (rick:1.2)" if family == "sd1" else "")
    (conditioning,) = TiengineA1111TextEncode().encode(clip, text, str(embeddings))
    assert clip.loads == 1  # ComfyUI's load_model: device and LoRA patches before the tensors are read
    assert isinstance(conditioning, list) and len(conditioning) == 1
    cond, extras = conditioning[0]
    assert list(extras) == ["pooled_output"]
    context, pooled = entry(engine.encode(text))
    width = 48 if family == "sd1" else 64
    assert cond.shape == (1, 154, width) and cond.dtype == torch.float32
    assert torch.equal(cond, context)
    if family == "sdxl":  # encoder 2's pooled chunk 0 (through its projection): what SDXL's UNet reads
        assert extras["pooled_output"].shape == (1, 32) and torch.equal(extras["pooled_output"], pooled)
    else:
        assert extras["pooled_output"] is None


def test_emphasis_and_clip_skip_inputs_are_a1111s(model):
    family, engine, clip, _ = model
    text = "a (red:1.3) circle, (blue sky:0.8)"
    for emphasis, clip_skip in (("no_norm", 2), ("lerp", 1), ("none", 1)):
        (conditioning,) = TiengineA1111TextEncode().encode(clip, text, "", emphasis, clip_skip)
        reference, _ = entry(engine.encode(text, emphasis=emphasis, clip_skip=clip_skip))
        assert torch.equal(conditioning[0][0], reference), (emphasis, clip_skip)
    skipped, _ = entry(engine.encode(text, clip_skip=2))
    plain, _ = entry(engine.encode(text))
    assert torch.equal(skipped, plain) == (family == "sdxl")  # clip skip moves SD1's layer only (A1111's default)


def test_encoders_share_the_clips_tensors(model):
    family, _, clip, _ = model
    _, _, encoders = clip_encoders(clip)
    towers = {"text_encoder": clip.cond_stage_model.clip_l}
    if family == "sdxl":
        towers["text_encoder_2"] = clip.cond_stage_model.clip_g
    for component, tower in towers.items():
        ours = encoders[component].state_dict()
        theirs = tower.transformer.state_dict()
        expected = set(theirs) - ({"text_projection.weight"} if component == "text_encoder" else set())
        assert set(ours) == expected
        assert all(ours[key].data_ptr() == theirs[key].data_ptr() for key in expected)


def test_half_precision_layers_with_float32_tables_as_comfyui_keeps_them(model):
    family, engine, _, _ = model
    model_half = comfy_clip(family, engine.modules)
    for name in ("clip_l", "clip_g"):
        tower = getattr(model_half.cond_stage_model, name, None)
        if tower is not None:
            tower.transformer.text_model.encoder.to(torch.bfloat16)
            tower.transformer.text_model.final_layer_norm.to(torch.bfloat16)
            tower.transformer.text_projection.to(torch.bfloat16)
    _, _, encoders = clip_encoders(model_half)
    layers = model_half.cond_stage_model.clip_l.transformer.text_model.encoder.layers
    shared = encoders["text_encoder"].text_model.encoder.layers[0].self_attn.q_proj.weight
    assert shared.dtype == torch.bfloat16 and shared.data_ptr() == layers[0].self_attn.q_proj.weight.data_ptr()
    (conditioning,) = TiengineA1111TextEncode().encode(model_half, "a (red:1.3) circle", "")
    reference, _ = entry(engine.encode("a (red:1.3) circle"))
    assert conditioning[0][0].dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: a few units of 2^-8 relative through 3 layers on values of order 1-10
    assert (conditioning[0][0].float() - reference).abs().max() <= 0.1 * reference.abs().max()


def test_sdxl_refiner_clip_is_encoder_2_alone(model):
    family, engine, _, _ = model
    if family != "sdxl":
        pytest.skip("the refiner is SDXL's")
    clip = FakeComfyClip(SDXLRefinerClipModel(comfy_tower(engine.modules["text_encoder_2"])))
    text = "a (red:1.3) circle BREAK on the left"
    (conditioning,) = TiengineA1111TextEncode().encode(clip, text, "")
    context, pooled = entry(engine.encode(text))
    # emphasis is applied per encoder, so encoder 2's channels of the base model's context are the refiner's
    assert torch.equal(conditioning[0][0], context[..., 32:]) and torch.equal(conditioning[0][1]["pooled_output"], pooled)


def test_and_and_changing_schedules_are_refused_for_comfyui(model):
    _, _, clip, _ = model
    for text, expected in (("a cat AND a dog", "AND"), ("a [cat:dog:0.5]", "changes its text during sampling")):
        with pytest.raises(IntegrationError) as error:
            TiengineA1111TextEncode().encode(clip, text, "")
        assert expected in str(error.value) and "ComfyUI CONDITIONING" in str(error.value)


def test_a_clip_of_another_model_family_is_refused_by_name():
    class FluxClipModel(nn.Module):
        pass

    with pytest.raises(IntegrationError, match="cond_stage_model is a FluxClipModel; expected one of SD1ClipModel"):
        TiengineA1111TextEncode().encode(FakeComfyClip(FluxClipModel()), "a cat", "")
