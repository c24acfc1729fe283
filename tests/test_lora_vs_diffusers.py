"""LoRA files applied by tiengine (`weight + update.delta(weight)`) against diffusers' `load_lora_weights`.

The same tiny SD1 and SDXL weights are loaded into diffusers' UNet2DConditionModel and transformers'
CLIPTextModel / CLIPTextModelWithProjection (test_pipeline_vs_diffusers.py's twins); diffusers reads the
file through PEFT (its own kohya / LDM-name conversion for the kohya files). Compared: the UNet's output
and every hidden state of each text encoder (plus SDXL's projected pooled output).

Bound: diffusers' own fp32 noise. Its adapter forward (x W^T + (x A^T) B^T) and its fused weights
(x (W + B A)^T) compute the same function in two fp32 orders; their largest difference is the noise floor
of this comparison, and tiengine's patched model must agree with the fused one within 4x that floor
(plus 4 fp32 ulps of the output's scale, should the floor be exactly zero).
"""

from __future__ import annotations

import copy

import pytest
import torch
from lora_builders import write_kohya_lora, write_peft_lora
from model_builders import build_modules, tiny_model_config
from test_text_encoder import hf_config

from tiengine.networks.lora import load_lora

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

EPS = torch.finfo(torch.float32).eps
BOS, EOS = 49406, 49407


def diffusers_twins(config, modules) -> dict[str, torch.nn.Module]:
    """diffusers / transformers models holding exactly `modules`' weights."""
    unet = diffusers.UNet2DConditionModel(**config.unet.to_diffusers()).eval()
    unet.load_state_dict(modules["unet"].state_dict())
    twins = {"unet": unet}
    for name, encoder_config in config.text_encoders.items():
        cls = transformers.CLIPTextModelWithProjection if encoder_config.projection_dim else transformers.CLIPTextModel
        model = cls(hf_config(encoder_config)).eval()
        expected = set(model.state_dict())
        state = {key if key in expected else key.removeprefix("text_model."): value
                 for key, value in modules[name].state_dict().items()}
        model.load_state_dict(state)
        twins[name] = model
    return twins


def loader(family: str, twins: dict[str, torch.nn.Module]):
    """The pipeline side of diffusers' LoRA loading (load_lora_weights / fuse_lora) over the twins."""
    base = (diffusers.loaders.StableDiffusionXLLoraLoaderMixin if family == "sdxl"
            else diffusers.loaders.StableDiffusionLoraLoaderMixin)

    class Twins(base):
        hf_device_map = None  # not offloaded

        def __init__(self):
            for name, module in twins.items():
                setattr(self, name, module)

        @property
        def components(self):
            return dict(twins)

    return Twins()


def inputs(config, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((2, 1), BOS), torch.randint(0, BOS, (2, 9), generator=generator),
                     torch.full((2, 1), EOS), torch.zeros(2, 3, dtype=torch.long)], dim=1)  # (2, 14)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 14, config.unet.cross_attention_dim, generator=generator)
    extras = None
    if config.unet.addition_embed_type == "text_time":
        pooled_width = config.unet.projection_class_embeddings_input_dim - 6 * config.unet.addition_time_embed_dim
        extras = (torch.randn(2, pooled_width, generator=generator),
                  torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0], [24.0, 40.0, 4.0, 8.0, 24.0, 40.0]]))
    return ids, sample, torch.tensor([999.0, 261.0]), context, extras


def ours_outputs(config, modules, ids, sample, timestep, context, extras) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        y = modules["unet"].text_time_conditioning(*extras) if extras is not None else None
        found = {"unet": modules["unet"](sample, timestep, context, y)}
        for name in config.text_encoders:
            out = modules[name](ids)
            for index, state in enumerate(out.hidden_states):
                found[f"{name}.hidden_states.{index}"] = state
            if out.text_embeds is not None:
                found[f"{name}.text_embeds"] = out.text_embeds
    return found


def diffusers_outputs(config, twins, ids, sample, timestep, context, extras) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        added = {"text_embeds": extras[0], "time_ids": extras[1]} if extras is not None else None
        found = {"unet": twins["unet"](sample, timestep, context, added_cond_kwargs=added).sample}
        for name in config.text_encoders:
            out = twins[name](ids, output_hidden_states=True)
            for index, state in enumerate(out.hidden_states):
                found[f"{name}.hidden_states.{index}"] = state
            if getattr(out, "text_embeds", None) is not None:
                found[f"{name}.text_embeds"] = out.text_embeds
    return found


@pytest.mark.parametrize(("family", "layout"), [("sd1", "kohya"), ("sd1", "peft"), ("sdxl", "kohya")])
def test_patched_model_matches_diffusers(tmp_path, family, layout):
    config = tiny_model_config(family)
    modules = build_modules(config, seed=11)
    path = tmp_path / "lora.safetensors"
    if layout == "kohya":  # SD1: diffusers names; SDXL: LDM names (kohya's own spellings); LoCon convs included
        write_kohya_lora(path, modules, family=family, conv=True, rank=3, alpha=1.5, seed=2)
    else:
        write_peft_lora(path, modules, conv=True, rank=3, seed=2)
    twins = diffusers_twins(config, modules)
    pipeline = loader(family, twins)
    pipeline.load_lora_weights(str(path))
    data = inputs(config)
    adapter = diffusers_outputs(config, twins, *data)
    pipeline.fuse_lora(components=list(twins))
    fused = diffusers_outputs(config, twins, *data)

    patched = copy.deepcopy(modules)
    network = load_lora(path, patched, family=family)
    assert network.unmatched == ()
    with torch.no_grad():
        for update in network.updates:
            weight = patched[update.component].get_submodule(update.module).weight
            weight += update.delta(weight)
    ours = ours_outputs(config, patched, *data)
    before = ours_outputs(config, modules, *data)

    assert set(ours) == set(fused)
    for name, reference in fused.items():
        floor = (adapter[name] - reference).abs().max().item()
        bound = 4 * floor + 4 * EPS * reference.abs().max().item()
        error = (ours[name] - reference).abs().max().item()
        assert error <= bound, f"{name}: {error:.3g} > {bound:.3g} (noise floor {floor:.3g})"
        if not name.endswith("hidden_states.0"):  # the token embeddings have no LoRA
            change = (before[name] - reference).abs().max().item()
            assert change > 100 * bound, f"{name}: the LoRA changes it by only {change:.3g}"
