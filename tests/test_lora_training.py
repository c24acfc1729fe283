"""LoRA training (tiengine.training.lora) and the packaged striped LoRA (tiengine.toyworld.train_lora).

The trainer's files have kohya-ss's key layout, shapes and `ss_*` metadata, and diffusers' kohya loader
(the reference for how A1111-format files are read) applied to the diffusers / transformers twins of a
tiny model gives the outputs tiengine's adapters give. Zero-initialised adapters change nothing, bit for
bit; training lowers a fixed-batch loss and is reproducible from its seed; merging a saved file at
multiplier m equals running the adapters at m within fp32 rounding. The packaged file fits the default
model, and merged at 1 it changes a fixed-seed image while 0 leaves it bit-identical.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from model_builders import build_modules, tiny_model_config, write_model_folder
from safetensors import safe_open
from safetensors.torch import save_file

from tiengine.default_model import default_model_path
from tiengine.diffusion.schedules import NoiseSchedule
from tiengine.engine import Engine
from tiengine.errors import NetworkError
from tiengine.io.atomic import FileExistsRefusal
from tiengine.models.unet import UNet2DConditionModel, UNetConfig
from tiengine.text.conditioning import encode_texts
from tiengine.toyworld import train_lora as toy
from tiengine.toyworld.evaluation import generate, load_engine
from tiengine.training.data import TrainingError
from tiengine.training.lora import (
    TEXT_ENCODER_TARGETS,
    LoraNetwork,
    LoraSettings,
    kohya_metadata,
    read_kohya_lora,
    train_lora,
)
from tiengine.training.textual_inversion import denoising_loss

CAPTIONS = ["a red circle", "two blue squares on the left", "a small green triangle", ""]
# The layers sd-scripts' networks.lora adapts by default, as tiengine names them (diffusers / transformers).
UNET_LAYER_ENDINGS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                      "attn2.to_v", "attn2.to_out.0", "proj_in", "proj_out")
TEXT_LAYER_ENDINGS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                      "mlp.fc2")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, the modules as built, a folder holding them) of a tiny SD1 model."""
    config = tiny_model_config("sd1")
    modules = build_modules(config, seed=3)
    return config, modules, write_model_folder(tmp_path_factory.mktemp("lora") / "model", config, modules)


@pytest.fixture
def engine(tiny) -> Engine:
    return Engine.load(tiny[2], embeddings=False)


def _latents(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed))  # (N, 4, 8, 8)


def _unet_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 4, 8, 8), generator=generator)  # (B, 4, h, w)
    context = torch.randn((2, 77, 48), generator=generator)  # (B, 77, cross-attention width)
    return x, torch.tensor([10.0, 700.0]), context


def _randomised(network: LoraNetwork, seed: int = 0, std: float = 0.3) -> LoraNetwork:
    """The network with every up drawn at random (a trained network's kind of update)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in network.layers.values():
            layer.up.normal_(0.0, std, generator=generator)
    return network


def _weights_with(module: torch.nn.Module, endings: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    return {key.removesuffix(".weight"): tuple(value.shape) for key, value in module.state_dict().items()
            if key.endswith(".weight") and key.removesuffix(".weight").endswith(endings)}


# ------------------------------------------------------------------------------------------------ the file


def test_saved_file_has_the_kohya_layout_and_metadata(engine, tmp_path):
    settings = LoraSettings(rank=3, alpha=1.5, steps=2, batch_size=2, text_encoder_learning_rate=1e-4, seed=7)
    result = train_lora(engine, _latents(), CAPTIONS, settings)
    metadata = kohya_metadata(settings, engine.config, output_name="tiny", comment="a test run", images=4,
                              resolution=32)
    path = result.network.save(tmp_path / "tiny.safetensors", metadata)

    unet_layers = _weights_with(engine.modules["unet"], UNET_LAYER_ENDINGS)
    text_layers = _weights_with(engine.modules["text_encoder"], TEXT_LAYER_ENDINGS)
    assert len(unet_layers) == 60 and len(text_layers) == 18  # 6 transformer blocks (down 2, mid 1, up 3); 3 layers
    expected = {"lora_unet_" + name.replace(".", "_"): shape for name, shape in unet_layers.items()}
    expected |= {"lora_te_" + name.replace(".", "_"): shape for name, shape in text_layers.items()}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0" in expected
    assert "lora_te_text_model_encoder_layers_2_mlp_fc2" in expected
    with safe_open(str(path), framework="pt") as file:
        keys = set(file.keys())
        assert keys == {f"{module}.{suffix}" for module in expected
                        for suffix in ("lora_down.weight", "lora_up.weight", "alpha")}
        for module, (out_features, in_features, *kernel) in expected.items():
            down, up = file.get_tensor(f"{module}.lora_down.weight"), file.get_tensor(f"{module}.lora_up.weight")
            alpha = file.get_tensor(f"{module}.alpha")
            assert down.shape == (3, in_features, *kernel) and up.shape == (out_features, 3, *[1] * len(kernel))
            assert alpha.shape == () and alpha.item() == 1.5 and down.dtype == up.dtype == torch.float32
        assert file.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight").shape == (3, 32, 1, 1)
        header = file.metadata()
    assert header == metadata
    assert header["ss_network_module"] == "networks.lora" and header["ss_base_model_version"] == "sd_v1"
    assert (header["ss_network_dim"], header["ss_network_alpha"], header["ss_output_name"]) == ("3", "1.5", "tiny")
    assert header["ss_training_comment"] == "a test run" and header["ss_seed"] == "7"

    with pytest.raises(FileExistsRefusal, match="overwrite"):
        result.network.save(path, metadata)
    result.network.save(path, {}, overwrite=True)
    assert read_kohya_lora(path).metadata == {}


def test_diffusers_kohya_loader_reads_the_file_as_the_adapters_run(tiny, engine):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    config, modules, _ = tiny
    network = _randomised(LoraNetwork.create(engine.modules, rank=3, alpha=2.0, seed=5,
                                             text_encoder_targets=TEXT_ENCODER_TARGETS))
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(network.kohya_tensors())
    unet = diffusers.UNet2DConditionModel(**config.unet.to_diffusers()).eval()
    unet.load_state_dict(modules["unet"].state_dict())
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet, adapter_name="kohya")
    encoder_config = config.text_encoders["text_encoder"]
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=encoder_config.hidden_size, intermediate_size=encoder_config.intermediate_size,
        num_hidden_layers=encoder_config.num_hidden_layers, num_attention_heads=encoder_config.num_attention_heads,
        hidden_act=encoder_config.hidden_act, max_position_embeddings=77, eos_token_id=49407,
    )).eval()
    text_encoder.load_state_dict({key.removeprefix("text_model."): value
                                  for key, value in modules["text_encoder"].state_dict().items()})
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(state, alphas, text_encoder, adapter_name="kohya")

    x, t, context = _unet_inputs()
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368] + [49407] * 71])  # "a photo of a cat"
    with torch.no_grad():
        base = engine.modules["unet"](x, t, context)
        for multiplier in (1.0, 0.5):
            theirs = unet(x, t, context, cross_attention_kwargs={"scale": multiplier}).sample
            with network.applied(engine.modules, multiplier):
                ours = engine.modules["unet"](x, t, context)
            # both sides compute the same fp32 sums in other orders: a few ulps of outputs of size ~1
            assert (ours - theirs).abs().max() <= 1e-5
            assert (ours - base).abs().max() > 0.1 * multiplier  # the adapters do reach the output
        theirs = text_encoder(ids).last_hidden_state
        with network.applied(engine.modules):
            ours, _ = engine.modules["text_encoder"].encode(ids)
        base, _ = engine.modules["text_encoder"].encode(ids)
    assert (ours - theirs).abs().max() <= 1e-5 and (ours - base).abs().max() > 0.1


# --------------------------------------------------------------------------------------------- adapters


def test_zero_initialised_up_gives_exactly_the_base_unet(engine):
    unet = engine.modules["unet"]
    originals = {name: param for name, param in unet.named_parameters()}
    snapshot = {name: param.detach().clone() for name, param in originals.items()}
    x, t, context = _unet_inputs()
    network = LoraNetwork.create(engine.modules, rank=4, alpha=4.0, seed=0)
    assert all(not layer.up.any() and layer.down.abs().max() > 0 for layer in network.layers.values())
    with torch.no_grad():
        base = unet(x, t, context)
        with network.applied(engine.modules):
            assert torch.equal(unet(x, t, context), base)
        _randomised(network)
        with network.applied(engine.modules, 0.0):
            assert torch.equal(unet(x, t, context), base)  # multiplier 0: nothing either
        with network.applied(engine.modules):
            assert not torch.allclose(unet(x, t, context), base, atol=1e-2)
        assert torch.equal(unet(x, t, context), base)
    # detaching gives back the very parameters, untouched
    assert {name: param for name, param in unet.named_parameters()}.keys() == originals.keys()
    assert all(param is originals[name] and torch.equal(param, snapshot[name])
               for name, param in unet.named_parameters())


def test_training_lowers_the_loss_and_repeats_from_its_seed(engine):
    latents = _latents(4, seed=2)
    generator = torch.Generator().manual_seed(3)
    timesteps = torch.randint(1000, (4,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    alphas_cumprod = NoiseSchedule.from_betas(**engine.config.schedule.__dict__).alphas_cumprod
    with torch.no_grad():
        context = encode_texts(CAPTIONS, engine.tokenizer, engine.slots).context

    def fixed_batch_loss(network: LoraNetwork | None) -> float:
        with torch.no_grad(), (network.applied(engine.modules) if network is not None else contextlib.nullcontext()):
            return denoising_loss(engine.modules["unet"], "epsilon", alphas_cumprod, latents, timesteps, noise,
                                  context).item()

    settings = LoraSettings(rank=4, alpha=4.0, steps=25, batch_size=4, learning_rate=1e-2, seed=11)
    before = fixed_batch_loss(None)
    result = train_lora(engine, latents, CAPTIONS, settings)
    after = fixed_batch_loss(result.network)
    assert after < 0.8 * before, (before, after)
    assert len(result.losses) == 25 and all(math.isfinite(loss) for loss in result.losses)

    again = train_lora(engine, latents, CAPTIONS, settings).network.kohya_tensors()
    trained = result.network.kohya_tensors()
    assert all(torch.equal(again[key], trained[key]) for key in trained)
    reseeded = train_lora(engine, latents, CAPTIONS, dataclasses.replace(settings, seed=12, steps=1))
    other = reseeded.network.kohya_tensors()
    assert not any(torch.equal(other[key], trained[key]) for key in trained if key.endswith("down.weight"))


@pytest.mark.parametrize("multiplier", [1.0, 0.6, -0.8])
def test_merging_the_saved_file_equals_the_adapters(engine, tmp_path, multiplier):
    unet = engine.modules["unet"]
    network = _randomised(LoraNetwork.create(engine.modules, rank=4, alpha=2.0, seed=1), seed=4, std=0.5)
    path = network.save(tmp_path / "lora.safetensors", {})
    base = {key: value.clone() for key, value in unet.state_dict().items()}
    lora = read_kohya_lora(path)
    merged = copy.deepcopy(unet)
    merged.load_state_dict(toy.merged_unet_weights(base, lora, multiplier))
    # the merge in float64, the reference for what fp32 rounding alone does
    exact = copy.deepcopy(unet).double()
    exact.load_state_dict({key: value.double() for key, value in base.items()})
    with torch.no_grad():
        for module, weights in lora.modules.items():
            key = next(k for k in base if k.endswith(".weight")
                       and "lora_unet_" + k.removesuffix(".weight").replace(".", "_") == module)
            delta = weights.up.double().flatten(1) @ weights.down.double().flatten(1) * (weights.alpha / weights.rank)
            exact.get_parameter(key).add_(multiplier * delta.reshape(base[key].shape))
    x, t, context = _unet_inputs()
    with torch.no_grad():
        with network.applied(engine.modules, multiplier):
            adapters = unet(x, t, context)
        from_file = merged(x, t, context)
        reference = exact(x.double(), t.double(), context.double())
        base_output = unet(x, t, context)
    rounding = (from_file.double() - reference).abs().max().item()  # fp32 noise of one path
    assert 0 < rounding < 1e-4
    assert (adapters.double() - reference).abs().max().item() <= 4 * rounding
    assert (adapters - from_file).abs().max().item() <= 4 * rounding
    assert (from_file - base_output).abs().max() > 0.05  # a real update, far above the rounding


# ----------------------------------------------------------------------------------------- bad input


def _write(path, tensors: dict[str, torch.Tensor]):
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


def test_bad_files_are_named_network_errors(engine, tmp_path):
    network = LoraNetwork.create(engine.modules, rank=2, alpha=1.0)
    good = network.kohya_tensors()
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"

    missing = {key: value for key, value in good.items() if key != f"{module}.lora_up.weight"}
    with pytest.raises(NetworkError, match=rf"missing\.safetensors.*{module}.*lora_up\.weight"):
        read_kohya_lora(_write(tmp_path / "missing.safetensors", missing))
    wrong = {**good, f"{module}.lora_up.weight": torch.zeros(32, 3, 1, 1)}
    with pytest.raises(NetworkError, match=r"wrong\.safetensors.*lora_up\.weight.*\(out, 2, 1, 1\).*\[32, 3, 1, 1\]"):
        read_kohya_lora(_write(tmp_path / "wrong.safetensors", wrong))
    lycoris = {**good, f"{module}.hada_w1_a": torch.zeros(2, 2)}
    with pytest.raises(NetworkError, match=r"lycoris\.safetensors.*hada_w1_a.*not a LoRA key"):
        read_kohya_lora(_write(tmp_path / "lycoris.safetensors", lycoris))
    nan_alpha = {**good, f"{module}.alpha": torch.tensor(float("nan"))}
    with pytest.raises(NetworkError, match=r"nan\.safetensors.*alpha.*finite"):
        read_kohya_lora(_write(tmp_path / "nan.safetensors", nan_alpha))
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(NetworkError, match=r"cut\.safetensors"):
        read_kohya_lora(tmp_path / "cut.safetensors")

    base = engine.modules["unet"].state_dict()
    stranger = {**good, "lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4),
                "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2)}
    with pytest.raises(NetworkError, match=r"stranger\.safetensors.*lora_unet_no_such_layer.*no layer of this UNet"):
        toy.merged_unet_weights(base, read_kohya_lora(_write(tmp_path / "stranger.safetensors", stranger)), 1.0)
    misfit = {**good, f"{module}.lora_down.weight": torch.zeros(2, 16, 1, 1)}
    with pytest.raises(NetworkError, match=rf"misfit\.safetensors.*{module}.*\[32, 32, 1, 1\].*\[32, 16, 1, 1\]"):
        toy.merged_unet_weights(base, read_kohya_lora(_write(tmp_path / "misfit.safetensors", misfit)), 1.0)


def test_sdxl_networks_use_kohyas_two_encoder_prefixes(tmp_path):
    config = tiny_model_config("sdxl")
    engine = Engine.load(write_model_folder(tmp_path / "sdxl", config, build_modules(config, seed=1)), embeddings=False)
    settings = LoraSettings(rank=2, steps=1, batch_size=2, text_encoder_learning_rate=1e-4)
    result = train_lora(engine, _latents(2), CAPTIONS[:2], settings)  # the UNet's text_time vector path too
    assert math.isfinite(result.losses[0])
    prefixes = {name.split("_text_model_")[0] for name in result.network.layers if "_text_model_" in name}
    assert prefixes == {"lora_te1", "lora_te2"}
    assert any(name.startswith("lora_unet_down_blocks_") for name in result.network.layers)
    metadata = kohya_metadata(settings, engine.config, output_name="x", comment="", images=2, resolution=32)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"



def test_attaching_to_a_model_the_network_was_not_made_for_is_refused():
    sd1_unet = UNet2DConditionModel(UNetConfig.tiny_sd1())  # 1x1 conv projections
    sd2_unet = UNet2DConditionModel(UNetConfig.tiny_sd2())  # linear projections
    network = LoraNetwork.create({"unet": sd1_unet}, rank=2, alpha=1.0)
    refusal = r"lora_unet_down_blocks_0_attentions_0_proj_in.*\[32, 32\].*\[32, 32, 1, 1\]"
    with pytest.raises(TrainingError, match=refusal):
        network.attach({"unet": sd2_unet})
    sdxl_unet = UNet2DConditionModel(UNetConfig.tiny_sdxl())  # no attention at the first level
    with pytest.raises(TrainingError, match=r"no layer unet\.down_blocks\.0\.attentions\.0\.proj_in"):
        network.attach({"unet": sdxl_unet})
    # a refused attach leaves every layer as it was
    for unet in (sd2_unet, sdxl_unet):
        assert not any(hasattr(module, "parametrizations") for module in unet.modules())
    with network.applied({"unet": sd1_unet}):
        assert sum(hasattr(module, "parametrizations") for module in sd1_unet.modules()) == len(network.layers)


def test_settings_are_checked():
    with pytest.raises(TrainingError, match="rank must be an integer >= 1"):
        LoraSettings(rank=0)
    with pytest.raises(TrainingError, match="caption_dropout"):
        LoraSettings(caption_dropout=1.5)
    with pytest.raises(TrainingError, match="min < max"):
        LoraSettings(min_timestep=500, max_timestep=100)


def test_model_card_section_is_replaced_not_repeated(tmp_path):
    card = tmp_path / "MODEL_CARD.md"
    card.write_text("# model\n\ntext\n\n## License\nMIT\n", encoding="utf-8")
    toy.write_card_section(card, "## LoRA: striped\nfirst\n")
    toy.write_card_section(card, "## LoRA: striped\nsecond\n")
    assert card.read_text(encoding="utf-8") == "# model\n\ntext\n\n## License\nMIT\n\n## LoRA: striped\nsecond\n"
    card.write_text("# model\n\n## LoRA: striped\nold\nlines\n\n## License\nMIT\n", encoding="utf-8")
    toy.write_card_section(card, "## LoRA: striped\nnew\n")
    assert card.read_text(encoding="utf-8") == "# model\n\n## LoRA: striped\nnew\n\n## License\nMIT\n"


# --------------------------------------------------------------------------------------- the packaged file


def test_packaged_striped_lora_fits_the_default_model():
    path = toy.striped_lora_path()
    assert path == default_model_path() / "loras" / "striped.safetensors"
    assert path.stat().st_size < 1_000_000
    lora = read_kohya_lora(path)
    engine = load_engine()
    unet = engine.modules["unet"]
    expected = _weights_with(unet, UNET_LAYER_ENDINGS)
    assert len(expected) == 70  # 7 transformer blocks of the default UNet
    assert set(lora.modules) == {"lora_unet_" + name.replace(".", "_") for name in expected}
    merged = toy.merged_unet_weights(unet.state_dict(), lora, 1.0)  # every update fits its weight
    assert merged.keys() == unet.state_dict().keys()
    ranks = {weights.rank for weights in lora.modules.values()}
    assert len(ranks) == 1 and 4 <= ranks.pop() <= 8
    assert {weights.alpha for weights in lora.modules.values()} == {float(lora.metadata["ss_network_alpha"])}
    metadata = lora.metadata
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_network_dim"] == str(lora.modules[next(iter(lora.modules))].rank)
    assert metadata["ss_output_name"] == "striped" and metadata["ss_network_train_unet_only"] == "True"
    comment = metadata["ss_training_comment"]
    assert "python -m tiengine.toyworld.train_lora" in comment and "--seed" in comment and "thread" in comment


def test_packaged_striped_lora_changes_an_image_at_1_and_nothing_at_0():
    engine = load_engine()
    unet = engine.modules["unet"]
    base = {key: value.clone() for key, value in unet.state_dict().items()}
    lora = read_kohya_lora(toy.striped_lora_path())
    prompts = ["two large red circles on the left"]
    before = generate(engine, prompts, seed=5)
    try:
        unet.load_state_dict(toy.merged_unet_weights(base, lora, 0.0))
        at_zero = generate(engine, prompts, seed=5)
        unet.load_state_dict(toy.merged_unet_weights(base, lora, 1.0))
        at_one = generate(engine, prompts, seed=5)
    finally:
        unet.load_state_dict(base)
    assert np.array_equal(at_zero, before)
    assert np.abs(at_one.astype(int) - before.astype(int)).mean() > 2.0  # grey levels, over every pixel
