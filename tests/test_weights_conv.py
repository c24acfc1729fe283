"""weights_conv round trips: random-weight diffusers / transformers models written in the original
single-file layouts, converted back, compared bit for bit; and a cross-check with diffusers' own
single-file conversion of the same files.

The original layouts are produced by `ldm_state_dict`, an inverse mapping written here independently of
weights_conv.rules (regular expressions over diffusers / transformers names, in the other direction).
Tiny configs follow the conventions detection relies on (64-channel heads for SD2/SDXL, 8 heads for
SD1, 32 GroupNorm groups, 256-wide SDXL time ids), so the detected config must equal the one built.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiengine.weights_conv import open_model

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

VOCAB = 49408
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "posterior_variance")

# --------------------------------------------------------------------------------------------------
# Reference models (diffusers / transformers, random weights)


def unet_kwargs(family: str, variant: str = "base") -> dict:
    if family == "sd1":
        return dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                    cross_attention_dim=64, layers_per_block=2, norm_num_groups=32, sample_size=8)  # fmt: skip
    if family == "sd2":
        return dict(block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=[1, 2],
                    cross_attention_dim=64, layers_per_block=1, use_linear_projection=True, norm_num_groups=32,
                    sample_size=8)  # fmt: skip
    context = 128 if variant == "refiner" else 64 + 128
    time_ids = 5 if variant == "refiner" else 6
    return dict(block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=[1, 2],
                transformer_layers_per_block=[1, 2], cross_attention_dim=context, layers_per_block=2,
                use_linear_projection=True, norm_num_groups=32, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=128 + time_ids * 256,
                sample_size=8)  # fmt: skip


def vae_kwargs() -> dict:
    return dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                norm_num_groups=32, sample_size=16)  # fmt: skip


def clip_config(width: int, layers: int, act: str, projection: int | None = None):
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=width // 64, hidden_act=act, max_position_embeddings=77, projection_dim=projection or 512,
    )  # fmt: skip


def text_models(family: str, variant: str = "base") -> dict[str, torch.nn.Module]:
    """Component name -> transformers model. SD2 single files hold the full tower (3 layers here)."""
    if family == "sd1":
        return {"text_encoder": transformers.CLIPTextModel(clip_config(64, 2, "quick_gelu"))}
    if family == "sd2":
        return {"text_encoder": transformers.CLIPTextModel(clip_config(64, 3, "gelu"))}
    big = transformers.CLIPTextModelWithProjection(clip_config(128, 3, "gelu", projection=128))
    if variant == "refiner":
        return {"text_encoder_2": big}
    return {"text_encoder": transformers.CLIPTextModel(clip_config(64, 2, "quick_gelu")), "text_encoder_2": big}


def randomize(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Distinct random values everywhere (default inits leave norms at 1/0 and biases at 0)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers state dict in tiengine names (transformers 5 CLIPTextModel omits `text_model.`)."""
    state = model.state_dict()
    if not any(key.startswith("text_model.") for key in state):
        state = {f"text_model.{key}": value for key, value in state.items()}
    return {key: value for key, value in state.items() if not key.endswith("position_ids")}


def reference_models(family: str, variant: str = "base", seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Component -> state dict in diffusers / transformers names, random values."""
    generator = torch.Generator().manual_seed(seed)
    models = {
        "unet": diffusers.UNet2DConditionModel(**unet_kwargs(family, variant)),
        "vae": diffusers.AutoencoderKL(**vae_kwargs()),
        **text_models(family, variant),
    }
    states = {}
    for name, model in models.items():
        randomize(model, generator)
        states[name] = hf_state(model) if name.startswith("text") else dict(model.state_dict())
    return states


# --------------------------------------------------------------------------------------------------
# Independent inverse mapping: diffusers / transformers names -> original single-file names

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def ldm_unet_name(key: str, config: dict) -> str:
    per_level = config["layers_per_block"] + 1
    up_attention = [kind.startswith("CrossAttn") for kind in config["up_block_types"]]

    def resnet(rest: str) -> str:
        module, param = rest.rsplit(".", 1)
        return f"{RESNET_TO_LDM[module]}.{param}"

    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    module, param = key.rsplit(".", 1)
    if module in fixed:
        return f"{fixed[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.0.{resnet(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per_level + int(m[2])}.0.{resnet(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        slot = 2 if up_attention[int(m[1])] else 1
        return f"output_blocks.{int(m[1]) * per_level + per_level - 1}.{slot}.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    raise AssertionError(f"test inverse mapping has no rule for UNet key {key}")


def ldm_vae_name(key: str, levels: int) -> tuple[str, bool]:
    """(LDM name, is a linear attention weight to store as a 1x1 conv)."""
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(weight|bias)", key):
        name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]]
        return f"{m[1]}.mid.attn_1.{name}.{m[3]}", m[2] != "group_norm" and m[3] == "weight"
    key = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block", key)
    key = re.sub(
        r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample", key
    )
    return key, False


def open_clip_state(state: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """transformers CLIP text names -> OpenCLIP's (fused in_proj, transposed projection, logit_scale)."""
    out = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "logit_scale": torch.tensor(4.6052),
    }
    width = out["token_embedding.weight"].shape[1]
    out["text_projection"] = (
        state["text_projection.weight"].t().contiguous() if "text_projection.weight" in state
        else torch.randn(width, width, generator=generator)  # SD2 files carry one the model never uses
    )  # fmt: skip
    layers = {int(m[1]) for key in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", key))}
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
        for hf, oc in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                       ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):  # fmt: skip
            for kind in ("weight", "bias"):
                out[f"{dst}{oc}.{kind}"] = state[f"{src}{hf}.{kind}"]
    return out


TEXT_PREFIXES = {
    ("sd1", "base", "text_encoder"): "cond_stage_model.transformer.",
    ("sd2", "base", "text_encoder"): "cond_stage_model.model.",
    ("sdxl", "base", "text_encoder"): "conditioner.embedders.0.transformer.",
    ("sdxl", "base", "text_encoder_2"): "conditioner.embedders.1.model.",
    ("sdxl", "refiner", "text_encoder_2"): "conditioner.embedders.0.model.",
}


def ldm_state_dict(
    states: dict[str, dict[str, torch.Tensor]],
    family: str,
    variant: str = "base",
    *,
    ema: bool = False,
    extras: bool = False,
    old_clip_names: bool = False,
    seed: int = 1,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(the original single-file layout of `states`, the EMA UNet state in diffusers names or None).

    ema: the file also holds model_ema.* copies of the UNet with DIFFERENT values; extras: schedule
    buffers and position_ids; old_clip_names: CLIP-L keys without `text_model.` (early SD1 files)."""
    generator = torch.Generator().manual_seed(seed)
    unet_cfg = unet_kwargs(family, variant)
    out: dict[str, torch.Tensor] = {}
    ema_unet: dict[str, torch.Tensor] | None = {} if ema else None
    for key, value in states["unet"].items():
        name = ldm_unet_name(key, unet_cfg)
        out["model.diffusion_model." + name] = value
        if ema_unet is not None:
            ema_unet[key] = torch.randn(value.shape, generator=generator).to(value.dtype)
            out["model_ema.diffusion_model" + name.replace(".", "")] = ema_unet[key]
    if ema:
        out["model_ema.decay"] = torch.tensor(0.9999)
        out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    for key, value in states["vae"].items():
        name, as_conv = ldm_vae_name(key, len(vae_kwargs()["block_out_channels"]))
        out["first_stage_model." + name] = value[:, :, None, None] if as_conv else value
    for component in ("text_encoder", "text_encoder_2"):
        if component not in states:
            continue
        prefix = TEXT_PREFIXES[(family, variant, component)]
        if prefix.endswith(".model."):
            text = open_clip_state(states[component], generator)
        else:
            text = dict(states[component])
            if old_clip_names:
                text = {key.removeprefix("text_model."): value for key, value in text.items()}
            if extras:
                text["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        out.update({prefix + key: value for key, value in text.items()})
    if extras:
        for name in SCHEDULE_BUFFERS:
            out[name] = torch.rand(1000, generator=generator, dtype=torch.float64).float()
    return out, ema_unet


def cast_states(states: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.to(dtype) for k, v in state.items()} for name, state in states.items()}


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(
        want
    ), f"{what}: missing {sorted(set(want) - set(got))[:10]}, unexpected {sorted(set(got) - set(want))[:10]}"
    for key, value in want.items():
        assert got[key].dtype == value.dtype, f"{what} {key}: dtype {got[key].dtype} != {value.dtype}"
        assert got[key].shape == value.shape, f"{what} {key}: shape {tuple(got[key].shape)} != {tuple(value.shape)}"
        assert torch.equal(_bytes(got[key]), _bytes(value)), f"{what} {key}: bytes differ"


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)


# --------------------------------------------------------------------------------------------------
# Shared fixtures

MODELS = [("sd1", "base"), ("sd2", "base"), ("sdxl", "base"), ("sdxl", "refiner")]
_STATES: dict[tuple[str, str], dict[str, dict[str, torch.Tensor]]] = {}


def states_for(family: str, variant: str = "base") -> dict[str, dict[str, torch.Tensor]]:
    """Reference states, built once per session (never mutated by the tests)."""
    if (family, variant) not in _STATES:
        _STATES[(family, variant)] = reference_models(family, variant)
    return _STATES[(family, variant)]


def converted(model, name: str) -> dict[str, torch.Tensor]:
    return dict(model.iter_component(name))


def expected_text(states: dict[str, dict[str, torch.Tensor]], family: str, name: str) -> dict[str, torch.Tensor]:
    """SD2's OpenCLIP projection is not part of the model (transformers' CLIPTextModel has none)."""
    state = states[name]
    return {k: v for k, v in state.items() if not (family == "sd2" and k == "text_projection.weight")}


def arch_fields(config) -> dict:
    """The architecture part of a tiengine config (what weights and conventions must reproduce)."""
    skip = {"sample_size", "upcast_attention", "force_upcast", "scaling_factor", "pad_token_id", "eos_token_id",
            "output_layer", "output_final_norm", "clip_skip_enabled", "layer_norm_eps", "norm_eps"}  # fmt: skip
    return {k: v for k, v in config.to_dict().items() if k not in skip}


def test_tiny_configs_follow_detection_conventions():
    """Guard for the other tests: the reference models are what detection must reproduce exactly."""
    from tiengine.models.text_encoder import TextEncoderConfig
    from tiengine.models.unet import UNetConfig
    from tiengine.models.vae import VaeConfig

    for family, variant in MODELS:
        unet = UNetConfig.from_diffusers(dict(diffusers.UNet2DConditionModel(**unet_kwargs(family, variant)).config))
        assert unet.cross_attention_dim == sum(
            m.config.hidden_size for m in text_models(family, variant).values()
        )  # fmt: skip
        assert all(
            c // h == (c // 8 if family == "sd1" else 64)
            for c, h in zip(unet.block_out_channels, unet.num_attention_heads)
        )
    assert VaeConfig.from_diffusers(dict(diffusers.AutoencoderKL(**vae_kwargs()).config)).norm_num_groups == 32
    hf = clip_config(64, 2, "gelu").to_dict() | {"architectures": ["CLIPTextModel"]}
    assert TextEncoderConfig.from_hf(hf).num_attention_heads == 1


# --------------------------------------------------------------------------------------------------
# Single files


ROUND_TRIPS = [
    ("sd1", "base", torch.float32), ("sd1", "base", torch.float16), ("sd2", "base", torch.float32),
    ("sd2", "base", torch.bfloat16), ("sdxl", "base", torch.float16), ("sdxl", "base", torch.bfloat16),
    ("sdxl", "refiner", torch.float32),
]  # fmt: skip


@pytest.mark.parametrize("family,variant,dtype", ROUND_TRIPS)
def test_single_safetensors_round_trip_is_bit_exact(tmp_path, family, variant, dtype):
    states = cast_states(states_for(family, variant), dtype)
    ldm, _ = ldm_state_dict(states, family, variant, extras=True)
    path = tmp_path / "model.safetensors"
    save_file(ldm, str(path))
    with open_model(path) as model:
        assert (model.config.family, model.config.variant) == (family, variant)
        assert set(model.config.components) == set(states)
        for name in states:
            want = expected_text(states, family, name) if name.startswith("text") else states[name]
            assert_bit_equal(converted(model, name), want, f"{family} {variant} {name}")
        report = model.inspect()
    assert report["problems"] == []
    assert report["keys"]["total"] == len(ldm)
    assert report["keys"]["ignored"]["schedule"] == len(SCHEDULE_BUFFERS)
    for name in states:
        assert report["components"][name]["dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("family,variant", MODELS)
def test_detected_config_equals_the_reference_architecture(tmp_path, family, variant):
    from tiengine.models.text_encoder import TextEncoderConfig
    from tiengine.models.unet import UNetConfig
    from tiengine.models.vae import VaeConfig

    states = states_for(family, variant)
    ldm, _ = ldm_state_dict(states, family, variant)
    save_file(ldm, str(tmp_path / "m.safetensors"))
    with open_model(tmp_path / "m.safetensors") as model:
        config = model.config
    unet = UNetConfig.from_diffusers(dict(diffusers.UNet2DConditionModel(**unet_kwargs(family, variant)).config))
    assert arch_fields(config.unet) == arch_fields(unet)
    assert arch_fields(config.vae) == arch_fields(
        VaeConfig.from_diffusers(dict(diffusers.AutoencoderKL(**vae_kwargs()).config))
    )
    for name, reference in text_models(family, variant).items():
        hf = TextEncoderConfig.from_hf(reference.config.to_dict() | {"architectures": [type(reference).__name__]})
        if family == "sd2":
            assert config.text_encoders[name].projection_dim is None
            hf = TextEncoderConfig.from_hf(reference.config.to_dict() | {"architectures": ["CLIPTextModel"]})
        assert arch_fields(config.text_encoders[name]) == arch_fields(hf)
    # How SD reads each encoder comes from the family presets; SD2's full tower is read at index -2.
    expected_layers = {"sd1": {"text_encoder": -1}, "sd2": {"text_encoder": -2},
                       "sdxl": {"text_encoder": -2, "text_encoder_2": -2}}[family]  # fmt: skip
    for name, encoder in config.text_encoders.items():
        assert encoder.output_layer == expected_layers[name]
    assert config.vae.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)


def test_pickled_checkpoint_with_lightning_extras_and_ema(tmp_path):
    states = cast_states(states_for("sd1"), torch.float16)
    ldm, ema_unet = ldm_state_dict(states, "sd1", ema=True, extras=True)
    path = tmp_path / "full.ckpt"
    optimizer = [{"state": {0: {"exp_avg": torch.zeros(4), "step": 10}}, "param_groups": [{"lr": 1e-4}]}]
    torch.save({"state_dict": ldm, "global_step": 840000, "epoch": 6, "optimizer_states": optimizer,
                "lr_schedulers": [], "pytorch-lightning_version": "1.4.2"}, path)  # fmt: skip
    with open_model(path) as model:  # EMA by default
        assert_bit_equal(converted(model, "unet"), ema_unet, "EMA unet")
        for name in ("vae", "text_encoder"):
            assert_bit_equal(converted(model, name), states[name], name)
        report = model.inspect()
    assert report["ema"] == {"present": True, "used": True, "tensors": len(states["unet"])}
    assert report["keys"]["ignored"]["non_ema"] == len(states["unet"])
    assert report["extras"]["global_step"] == "840000"
    assert report["extras"]["optimizer_states"] == "list of 1 items"
    with open_model(path, ema=False) as model:
        assert_bit_equal(converted(model, "unet"), states["unet"], "non-EMA unet")
        assert model.inspect()["ema"]["used"] is False


def test_sdxl_bf16_safetensors_with_ema_and_old_sd1_clip_names(tmp_path):
    states = cast_states(states_for("sdxl"), torch.bfloat16)
    ldm, ema_unet = ldm_state_dict(states, "sdxl", ema=True)
    save_file(ldm, str(tmp_path / "xl.safetensors"))
    with open_model(tmp_path / "xl.safetensors") as model:
        assert_bit_equal(converted(model, "unet"), ema_unet, "sdxl EMA unet")
        assert_bit_equal(converted(model, "text_encoder_2"), states["text_encoder_2"], "bigG")

    sd1 = states_for("sd1")
    ldm, _ = ldm_state_dict(sd1, "sd1", old_clip_names=True)
    assert not any(k.startswith("cond_stage_model.transformer.text_model.") for k in ldm)
    save_file(ldm, str(tmp_path / "old.safetensors"))
    with open_model(tmp_path / "old.safetensors") as model:
        assert_bit_equal(converted(model, "text_encoder"), sd1["text_encoder"], "old CLIP names")


# --------------------------------------------------------------------------------------------------
# Cross-check with diffusers' own single-file conversion of the same file


def diffusers_config_folder(root: Path, family: str, variant: str = "base") -> Path:
    diffusers.UNet2DConditionModel(**unet_kwargs(family, variant)).save_config(root / "unet")
    diffusers.AutoencoderKL(**vae_kwargs()).save_config(root / "vae")
    return root


@pytest.mark.parametrize("family,variant", [("sdxl", "refiner")])  # the others: the pipeline test below
def test_matches_diffusers_single_file_conversion(tmp_path, family, variant):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    states = states_for(family, variant)
    ldm, _ = ldm_state_dict(states, family, variant, extras=True)
    path = tmp_path / "model.safetensors"
    save_file(ldm, str(path))
    configs = diffusers_config_folder(tmp_path / "configs", family, variant)
    unet = diffusers.UNet2DConditionModel.from_single_file(
        str(path), config=str(configs), subfolder="unet", local_files_only=True
    )
    vae = diffusers.AutoencoderKL.from_single_file(
        str(path), config=str(configs), subfolder="vae", local_files_only=True
    )
    with open_model(path) as model:
        assert_bit_equal(converted(model, "unet"), dict(unet.state_dict()), "unet vs diffusers")
        assert_bit_equal(converted(model, "vae"), dict(vae.state_dict()), "vae vs diffusers")
        for name, reference in text_models(family, variant).items():
            prefix = TEXT_PREFIXES[(family, variant, name)]
            if prefix.endswith(".model."):
                theirs = convert_open_clip_checkpoint(reference, ldm, prefix=prefix)
            else:
                theirs = convert_ldm_clip_checkpoint(ldm)
            theirs = {k: v for k, v in theirs.items() if not k.endswith("position_ids")}
            # diffusers drops SD2's layer by its real index (resblocks.23, the 24th); a tiny tower has
            # no such layer, so both sides keep every layer here.
            ours = converted(model, name)
            assert_bit_equal(ours, theirs, f"{name} vs diffusers")


PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_matches_diffusers_pipeline_from_single_file(tmp_path, family):
    """diffusers' whole-pipeline single-file loader (offline, local configs) on the same file."""
    states = states_for(family)
    ldm, _ = ldm_state_dict(states, family, extras=True)
    path = tmp_path / "model.safetensors"
    save_file(ldm, str(path))
    configs = diffusers_config_folder(tmp_path / "configs", family)
    index = {"_class_name": PIPELINES[family], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}  # fmt: skip
    components = {}
    for name, model in text_models(family).items():
        model.config.save_pretrained(configs / name)
        index[name] = ["transformers", type(model).__name__]
        index["tokenizer" + name.removeprefix("text_encoder")] = ["transformers", "CLIPTokenizer"]
        components["tokenizer" + name.removeprefix("text_encoder")] = None
    if family != "sdxl":
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None]}
        components |= {"safety_checker": None, "feature_extractor": None}
    (configs / "model_index.json").write_text(json.dumps(index))
    (configs / "scheduler").mkdir()
    (configs / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "EulerDiscreteScheduler", "steps_offset": 1})
    )
    pipeline = getattr(diffusers, PIPELINES[family]).from_single_file(
        str(path), config=str(configs), local_files_only=True, **components
    )
    with open_model(path) as model:
        for name in states:
            theirs = getattr(pipeline, name)
            theirs = hf_state(theirs) if name.startswith("text") else dict(theirs.state_dict())
            assert_bit_equal(converted(model, name), theirs, f"{family} {name} vs diffusers pipeline")
