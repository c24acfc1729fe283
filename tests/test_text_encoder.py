"""ClipTextEncoder against transformers' CLIPTextModel / CLIPTextModelWithProjection on the same weights.

Every parameter (biases and layer norms included) is randomised, so a swapped or misnamed tensor shows.
fp32 bound: 1e-5 max abs difference (the observed gap is 0 to a few fp32 ulps on activations of order 1).
At full size the oneDNN linear path sums in another order; there the bound is derived from transformers'
own fp32 error against float64 (see test_full_size_clip_l_matches_transformers).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tiengine.errors import CheckpointError
from tiengine.models.text_encoder import ClipTextEncoder, TextEncoderConfig, TokenIdError

transformers = pytest.importorskip("transformers")

BOS, EOS, VOCAB = 49406, 49407, 49408
FP32_BOUND = 1e-5


def hf_config(config: TextEncoderConfig, attn_implementation: str = "sdpa", **overrides):
    fields = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps,
        "projection_dim": config.projection_dim or 512,
        "eos_token_id": EOS,  # transformers pools at the first id == eos_token_id (unless it is 2)
        "attn_implementation": attn_implementation,
    }
    fields.update(overrides)
    return transformers.CLIPTextConfig(**fields)


def build_hf(config: TextEncoderConfig, seed: int, attn_implementation: str = "sdpa", **overrides):
    """A transformers model of `config` with every parameter randomised from `seed`."""
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if config.projection_dim else transformers.CLIPTextModel
    model = cls(hf_config(config, attn_implementation, **overrides)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model


def ours_from(hf_model, config: TextEncoderConfig) -> ClipTextEncoder:
    model = ClipTextEncoder(config).eval()
    model.load_state_dict(hf_model.state_dict())
    return model


def chunk_ids(eos_positions: list[int], pad_id: int, seed: int, high: int = BOS) -> torch.Tensor:
    """(B, 77) rows [BOS, words..., EOS, pad...] with EOS at the given positions; words in [0, high)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, high, (len(eos_positions), 77), generator=generator)
    ids[:, 0] = BOS
    for row, position in enumerate(eos_positions):
        ids[row, position] = EOS
        ids[row, position + 1 :] = pad_id
    return ids


def hf_outputs(hf_model, ids: torch.Tensor):
    """(hidden_states, last_hidden_state, pooled, text_embeds or None) from either transformers class."""
    with torch.no_grad():
        out = hf_model(input_ids=ids, output_hidden_states=True)
    if hasattr(out, "text_embeds"):
        text_model = hf_model.text_model(input_ids=ids)
        return out.hidden_states, out.last_hidden_state, text_model.pooler_output, out.text_embeds
    return out.hidden_states, out.last_hidden_state, out.pooler_output, None


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


VARIANTS = {
    "clip_l": TextEncoderConfig.tiny("quick_gelu", num_hidden_layers=4),
    "openclip_h": TextEncoderConfig.tiny("gelu", num_hidden_layers=5, pad_token_id=0, output_layer=-2),
    "openclip_bigg": TextEncoderConfig.tiny(
        "gelu", num_hidden_layers=3, projection_dim=24, pad_token_id=0, output_layer=-2, output_final_norm=False
    ),
}


@pytest.mark.parametrize("linear_backend", ["torch", "onednn"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_transformers(variant: str, attn_implementation: str, linear_backend: str) -> None:
    config = VARIANTS[variant]
    hf_model = build_hf(config, seed=7, attn_implementation=attn_implementation)
    model = ours_from(hf_model, config)
    ids = chunk_ids([1, 9, 40, 76], config.pad_token_id, seed=3)
    hidden, last, pooled, text_embeds = hf_outputs(hf_model, ids)

    with torch.no_grad():
        out = model(ids, linear_backend=linear_backend)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    for ours_state, ref_state in zip(out.hidden_states, hidden, strict=True):
        assert max_diff(ours_state, ref_state) <= FP32_BOUND
    assert max_diff(model.final_layer_norm(out.hidden_states[-1]), last) <= FP32_BOUND
    assert max_diff(out.pooled_output, pooled) <= FP32_BOUND
    if config.projection_dim:
        assert max_diff(out.text_embeds, text_embeds) <= FP32_BOUND
    else:
        assert out.text_embeds is None


def test_pooling_finds_first_eos_by_id_with_extra_rows() -> None:
    """Ids above EOS (appended embedding rows) must not move the pooled position (argmax would)."""
    config = VARIANTS["openclip_bigg"]
    extra_rows = 3
    # Reference: transformers with the token table extended by the extra rows.
    hf_model = build_hf(config, seed=11, vocab_size=VOCAB + extra_rows)
    state = hf_model.state_dict()
    table = state["text_model.embeddings.token_embedding.weight"]
    state["text_model.embeddings.token_embedding.weight"] = table[:VOCAB]
    extra = table[VOCAB:].clone()
    model = ClipTextEncoder(config).eval()
    model.load_state_dict(state)

    ids = chunk_ids([5, 30, 76], config.pad_token_id, seed=5)
    ids[0, 2] = VOCAB + 2
    ids[1, 3:6] = torch.tensor([VOCAB, VOCAB + 1, VOCAB + 2])
    ids[2, 70] = VOCAB + 1
    first_eos = (ids == EOS).int().argmax(1)
    assert (ids.argmax(1) != first_eos).all()  # the data would catch pooling by argmax

    hidden, _, pooled, text_embeds = hf_outputs(hf_model, ids)
    with torch.no_grad():
        out = model(ids, extra)
    for ours_state, ref_state in zip(out.hidden_states, hidden, strict=True):
        assert max_diff(ours_state, ref_state) <= FP32_BOUND
    assert max_diff(out.pooled_output, pooled) <= FP32_BOUND
    assert max_diff(out.text_embeds, text_embeds) <= FP32_BOUND


def test_extra_rows_are_looked_up_exactly() -> None:
    config = VARIANTS["clip_l"]
    model = ClipTextEncoder(config).eval()
    extra = torch.randn(4, config.hidden_size)
    ids = chunk_ids([20], config.pad_token_id, seed=1)
    ids[0, 3:7] = torch.tensor([VOCAB + 3, VOCAB, 17, VOCAB + 1])
    with torch.no_grad():
        embedded = model(ids, extra, num_layers=0).hidden_states[0][0]  # (77, hidden)
    positions = model.text_model.embeddings.position_embedding.weight
    table = model.text_model.embeddings.token_embedding.weight
    expected_rows = [table[i] if i < VOCAB else extra[i - VOCAB] for i in ids[0].tolist()]
    assert torch.equal(embedded, torch.stack(expected_rows) + positions)


def test_gradient_reaches_only_extra_rows() -> None:
    config = VARIANTS["openclip_bigg"]
    model = ClipTextEncoder(config).eval().requires_grad_(False)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    extra = torch.randn(3, config.hidden_size, requires_grad=True)
    ids = chunk_ids([12], config.pad_token_id, seed=2)
    ids[0, 1:3] = torch.tensor([VOCAB, VOCAB + 2])  # row 1 unused

    optimizer = torch.optim.SGD([extra], lr=0.1)
    context, pooled = model.encode(ids, extra, pooled=True)
    (context.square().mean() + pooled.square().mean()).backward()
    optimizer.step()

    assert extra.grad[0].abs().sum() > 0 and extra.grad[2].abs().sum() > 0
    assert torch.equal(extra.grad[1], torch.zeros(config.hidden_size))
    assert all(param.grad is None for param in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_gradients_equal_an_extended_table() -> None:
    """With a trainable model, the base table and the extra rows get exactly the gradients of one
    concatenated table: the lookup leaks nothing from extra positions into base rows."""
    config = VARIANTS["clip_l"]
    model = ClipTextEncoder(config)
    extra = torch.randn(2, config.hidden_size, requires_grad=True)
    wide = ClipTextEncoder(dataclasses.replace(config, vocab_size=VOCAB + 2))
    state = model.state_dict()
    state["text_model.embeddings.token_embedding.weight"] = torch.cat(
        [state["text_model.embeddings.token_embedding.weight"], extra.detach()]
    )
    wide.load_state_dict(state)
    ids = chunk_ids([30, 50], config.pad_token_id, seed=4)
    ids[:, 4] = VOCAB + 1
    ids[1, 8] = VOCAB

    # A weighted sum: the plain sum of a layer-normed vector with unit gain is constant (zero gradient).
    weights = torch.randn(ids.shape[0], config.hidden_size, generator=torch.Generator().manual_seed(5))
    (model(ids, extra).pooled_output * weights).sum().backward()
    (wide(ids).pooled_output * weights).sum().backward()
    wide_grad = wide.text_model.embeddings.token_embedding.weight.grad
    assert max_diff(model.text_model.embeddings.token_embedding.weight.grad, wide_grad[:VOCAB]) <= FP32_BOUND
    assert max_diff(extra.grad, wide_grad[VOCAB:]) <= FP32_BOUND
    assert extra.grad.abs().sum() > 0


def test_out_of_range_ids_raise_naming_the_id() -> None:
    config = VARIANTS["clip_l"]
    model = ClipTextEncoder(config)
    ids = chunk_ids([10], config.pad_token_id, seed=0)
    ids[0, 3] = VOCAB
    with pytest.raises(TokenIdError, match=r"token id 49408 at \(row, position\) \(0, 3\)"):
        model(ids)
    ids[0, 3] = VOCAB + 2
    with pytest.raises(TokenIdError, match="token id 49410"):
        model(ids, torch.zeros(2, config.hidden_size))
    model(ids, torch.zeros(3, config.hidden_size))
    ids[0, 3] = -1
    with pytest.raises(TokenIdError, match="token id -1"):
        model(ids)
    with pytest.raises(TokenIdError, match=r"extra_token_embeddings must be \(rows, 32\)"):
        model(ids.clamp(min=0), torch.zeros(2, 16))


def test_pooling_without_eos_is_an_error() -> None:
    config = VARIANTS["clip_l"]
    model = ClipTextEncoder(config)
    ids = chunk_ids([10, 20], config.pad_token_id, seed=0)
    ids[1, 20:] = 5
    with pytest.raises(TokenIdError, match="row 1 has no EOS"):
        model(ids)
    context, pooled = model.encode(ids, output_layer=-2)  # no pooling, no EOS needed
    assert pooled is None and context.shape == (2, 77, config.hidden_size)


def test_pool_positions_override_the_first_eos() -> None:
    config = VARIANTS["openclip_bigg"]
    model = ClipTextEncoder(config).eval()
    ids = chunk_ids([10, 76], config.pad_token_id, seed=14)
    with torch.no_grad():
        default = model(ids)
        at_eos = model(ids, pool_positions=torch.tensor([10, 76]))
        elsewhere = model(ids, pool_positions=torch.tensor([3, 0]))
    assert torch.equal(at_eos.pooled_output, default.pooled_output)
    last = model.final_layer_norm(default.hidden_states[-1])
    assert max_diff(elsewhere.pooled_output, torch.stack([last[0, 3], last[1, 0]])) <= FP32_BOUND
    assert max_diff(elsewhere.text_embeds, elsewhere.pooled_output @ model.text_projection.weight.T) <= FP32_BOUND


def test_early_stop_matches_full_run_and_skips_layers() -> None:
    config = VARIANTS["openclip_h"]
    model = ClipTextEncoder(config).eval()
    ids = chunk_ids([8, 60], config.pad_token_id, seed=6)
    calls = []
    model.text_model.encoder.layers[-1].register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        full = model(ids)
        assert len(calls) == 1
        for layers in range(config.num_hidden_layers):
            partial = model(ids, num_layers=layers)
            assert len(partial.hidden_states) == layers + 1
            assert partial.pooled_output is None and partial.text_embeds is None
            for a, b in zip(partial.hidden_states, full.hidden_states):
                assert torch.equal(a, b)
        assert len(calls) == 1
        context, _ = model.encode(ids)  # SD2-style read: penultimate layer + final norm
        assert len(calls) == 1
    assert torch.equal(context, model.final_layer_norm(full.hidden_states[-2]))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encode_follows_the_config(variant: str) -> None:
    config = VARIANTS[variant]
    hf_model = build_hf(config, seed=13)
    model = ours_from(hf_model, config)
    ids = chunk_ids([3, 77 - 1], config.pad_token_id, seed=8)
    hidden, last, pooled, text_embeds = hf_outputs(hf_model, ids)
    with torch.no_grad():
        context, pooled_ours = model.encode(ids, pooled=True)
        expected = hidden[config.output_layer]
        if config.output_final_norm:
            expected = last if config.output_layer == -1 else model.final_layer_norm(expected)
        assert max_diff(context, expected) <= FP32_BOUND
        assert max_diff(pooled_ours, text_embeds if config.projection_dim else pooled) <= FP32_BOUND
        raw, _ = model.encode(ids, output_layer=1, final_norm=False)
        assert max_diff(raw, hidden[1]) <= FP32_BOUND


def test_clip_skip_rules() -> None:
    sd1 = TextEncoderConfig.sd1_clip_l()
    assert [sd1.output_layer_for_clip_skip(n) for n in (1, 2, 12)] == [-1, -2, -12]
    sd2 = TextEncoderConfig.sd2_openclip_h()
    assert sd2.output_layer_for_clip_skip(3) == -2
    assert TextEncoderConfig.sd2_openclip_h(23).output_layer_for_clip_skip(3) == -1
    assert TextEncoderConfig.sdxl_clip_l().output_layer_for_clip_skip(1) == -2
    assert TextEncoderConfig.sdxl_clip_l(clip_skip_enabled=True).output_layer_for_clip_skip(1) == -1
    assert TextEncoderConfig.sdxl_openclip_bigg().output_layer_for_clip_skip(2) == -2
    with pytest.raises(ValueError, match="clip skip must be in 1..12"):
        sd1.output_layer_for_clip_skip(13)
    # SD2's read is the output of layer 23 whether or not the unused 24th layer is present.
    assert sd2.hidden_state_index(sd2.output_layer) == 23
    assert TextEncoderConfig.sd2_openclip_h(23).hidden_state_index(-1) == 23


@pytest.mark.parametrize(
    ("preset", "hf_class"),
    [
        (TextEncoderConfig.sd1_clip_l(), "CLIPTextModel"),
        (TextEncoderConfig.sd2_openclip_h(), "CLIPTextModel"),
        (TextEncoderConfig.sdxl_clip_l(), "CLIPTextModel"),
        (TextEncoderConfig.sdxl_openclip_bigg(), "CLIPTextModelWithProjection"),
    ],
)
def test_presets_have_transformers_keys_and_shapes(preset: TextEncoderConfig, hf_class: str) -> None:
    with torch.device("meta"):
        reference = getattr(transformers, hf_class)(hf_config(preset))
        model = ClipTextEncoder(preset)
    ref_shapes = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v.shape
                  for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == ref_shapes


def test_sd1_parameter_count() -> None:
    # 49408*768 + 77*768 + 12 * (4*(768*768+768) + 2*768*3072 + 3072 + 768 + 4*768) + 2*768
    model = ClipTextEncoder(TextEncoderConfig.sd1_clip_l(), device="meta")
    assert sum(p.numel() for p in model.parameters()) == 123_060_480


def test_load_state_dict_layouts() -> None:
    config = VARIANTS["clip_l"]
    hf_model = build_hf(config, seed=3)  # transformers 5 CLIPTextModel: keys without "text_model."
    state = {f"text_model.{k}": v for k, v in hf_model.state_dict().items() if not k.startswith("text_model.")}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older checkpoints
    model = ClipTextEncoder(config)
    model.load_state_dict(state)
    assert torch.equal(model.text_model.final_layer_norm.bias, state["text_model.final_layer_norm.bias"])
    del state["text_model.final_layer_norm.bias"]
    with pytest.raises(RuntimeError, match="final_layer_norm.bias"):
        ClipTextEncoder(config).load_state_dict(state)


def test_half_precision_error_no_worse_than_transformers() -> None:
    """bf16 against the fp32 result: our fp32 layer norms keep the error within transformers' own."""
    config = VARIANTS["openclip_bigg"]
    hf_model = build_hf(config, seed=21)
    model = ours_from(hf_model, config)
    ids = chunk_ids([10, 76], config.pad_token_id, seed=9)
    with torch.no_grad():
        truth = model(ids)
        hf_bf16 = hf_outputs(hf_model.to(torch.bfloat16), ids)
        ours_bf16 = model.to(torch.bfloat16)(ids)
    assert ours_bf16.hidden_states[-1].dtype == torch.bfloat16
    hf_error = max_diff(hf_bf16[0][-1], truth.hidden_states[-1])
    ours_error = max_diff(ours_bf16.hidden_states[-1], truth.hidden_states[-1])
    assert 0 < ours_error <= 1.5 * hf_error
    assert max_diff(ours_bf16.text_embeds, truth.text_embeds) <= 1.5 * max_diff(hf_bf16[3], truth.text_embeds)


def test_config_round_trip_and_errors() -> None:
    for preset in (TextEncoderConfig.sd1_clip_l(), TextEncoderConfig.sdxl_openclip_bigg(), VARIANTS["openclip_h"]):
        data = json.loads(json.dumps(preset.to_dict()))
        assert TextEncoderConfig.from_dict(data) == preset
    with pytest.raises(CheckpointError, match="unknown keys \\['layers'\\]"):
        TextEncoderConfig.from_dict({"layers": 3})
    with pytest.raises(CheckpointError, match="missing key 'hidden_act'"):
        TextEncoderConfig.from_hf({"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                                   "num_attention_heads": 1})
    with pytest.raises(CheckpointError, match="config.json: hidden_act must be one of .*, got 'relu'"):
        TextEncoderConfig.from_hf({"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                                   "num_attention_heads": 1, "hidden_act": "relu"})
    no_architectures = {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                        "hidden_act": "gelu", "architectures": None, "projection_dim": 4}
    assert TextEncoderConfig.from_hf(no_architectures).projection_dim is None
    with pytest.raises(CheckpointError, match="text encoder config: hidden_size 30 is not a multiple"):
        TextEncoderConfig.from_dict({**VARIANTS["clip_l"].to_dict(), "hidden_size": 30, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="output_layer 5"):
        TextEncoderConfig.tiny(num_hidden_layers=4, output_layer=5)


WILD_TEXT_ENCODERS = {
    # folder/text_encoder dir: (hidden, layers, act, projection_dim, reading fields, equal preset)
    "sd15_runwayml_mirror_HDRJ-One/text_encoder": (768, 12, "quick_gelu", None, {}, TextEncoderConfig.sd1_clip_l()),
    "sd21_base_mirror_jack-op11/text_encoder": (
        1024, 23, "gelu", None,
        {"pad_token_id": 0, "output_layer": -1, "clip_skip_enabled": False},
        TextEncoderConfig.sd2_openclip_h(23),
    ),
    "sd21_768v_flax_branch_mirror_Vikas-2025/text_encoder": (
        1024, 23, "gelu", None,
        {"pad_token_id": 0, "output_layer": -1, "clip_skip_enabled": False},
        TextEncoderConfig.sd2_openclip_h(23),
    ),
    "sdxl_base_1.0_mirror_HDRJ-One/text_encoder": (
        768, 12, "quick_gelu", None,
        {"output_layer": -2, "output_final_norm": False, "clip_skip_enabled": False},
        TextEncoderConfig.sdxl_clip_l(),
    ),
    "sdxl_base_1.0_mirror_HDRJ-One/text_encoder_2": (
        1280, 32, "gelu", 1280,
        {"pad_token_id": 0, "output_layer": -2, "output_final_norm": False, "clip_skip_enabled": False},
        TextEncoderConfig.sdxl_openclip_bigg(),
    ),
}


@pytest.mark.parametrize("folder", sorted(WILD_TEXT_ENCODERS))
def test_from_hf_on_real_configs(wild_dir: Path, folder: str) -> None:
    path = wild_dir / "models" / folder / "config.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    hidden, layers, act, projection_dim, reading, preset = WILD_TEXT_ENCODERS[folder]
    config = TextEncoderConfig.from_hf(json.loads(path.read_text()), **reading)
    assert (config.hidden_size, config.num_hidden_layers, config.hidden_act, config.projection_dim) == (
        hidden, layers, act, projection_dim,
    )
    assert config == preset


def test_linear_backend_choice() -> None:
    config = VARIANTS["clip_l"]
    model = ClipTextEncoder(config)
    ids = chunk_ids([10], config.pad_token_id, seed=0)
    with pytest.raises(ValueError, match="gradients are needed"):
        model(ids, linear_backend="onednn")
    with pytest.raises(ValueError, match="linear_backend must be one of"):
        model(ids, linear_backend="mkl")
    with torch.no_grad():
        with pytest.raises(ValueError, match="float16 is not float32 or bfloat16"):
            ClipTextEncoder(config, dtype=torch.float16)(ids, linear_backend="onednn")
        fused = model(ids, linear_backend="onednn").hidden_states[-1]
    plain = model(ids).hidden_states[-1]  # "auto" with trainable parameters: F.linear, autograd works
    plain.sum().backward()
    assert model.text_model.encoder.layers[0].mlp.fc1.weight.grad is not None
    assert max_diff(fused, plain) <= FP32_BOUND


def test_bf16_linear_backend_follows_the_cpu(monkeypatch) -> None:
    """oneDNN has no bf16 kernels on CPUs without AVX-512/AMX: "auto" runs F.linear there (bit for bit the
    "torch" backend) and a forced "onednn" says why it cannot run; on this CPU, whatever it is, bf16 runs."""
    config = TextEncoderConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
    model = ClipTextEncoder(config, dtype=torch.bfloat16)  # from hidden 256 on, "auto" considers oneDNN
    ids = chunk_ids([10], config.pad_token_id, seed=0)
    with torch.no_grad():
        assert torch.isfinite(model(ids).hidden_states[-1].float()).all()  # "auto" on the real CPU
        monkeypatch.setattr("tiengine.models.cpu_precision.onednn_bf16_supported", lambda: False)
        auto = model(ids).hidden_states[-1]
        plain = model(ids, linear_backend="torch").hidden_states[-1]
        assert torch.equal(auto, plain)
        with pytest.raises(ValueError, match="no oneDNN bfloat16 kernels"):
            model(ids, linear_backend="onednn")


@pytest.mark.slow
def test_full_size_clip_l_matches_transformers() -> None:
    """F.linear path: within 1e-5 of transformers. oneDNN path (another fp32 summation order): its error
    against transformers in float64 stays within 4x transformers' own largest fp32 error against float64
    (about 1e-5 on these activations of up to ~14, i.e. some 10 fp32 ulps). The maximum over 59k
    elements of two independent rounding sequences differs by a factor near 2 from run to run (2.05x
    measured with torch 2.13 on a 2-core AVX-512 CPU), so 2x was the noise itself, not a bound on it."""
    config = TextEncoderConfig.sd1_clip_l()
    hf_model = build_hf(config, seed=1)
    model = ours_from(hf_model, config)
    ids = chunk_ids([12, 76], config.pad_token_id, seed=12)
    hidden, last, pooled, _ = hf_outputs(hf_model, ids)
    with torch.no_grad():
        out = model(ids, linear_backend="torch")
        fused = model(ids, linear_backend="onednn")
    for ours_state, ref_state in zip(out.hidden_states, hidden, strict=True):
        assert max_diff(ours_state, ref_state) <= FP32_BOUND
    assert max_diff(model.final_layer_norm(out.hidden_states[-1]), last) <= FP32_BOUND
    assert max_diff(out.pooled_output, pooled) <= FP32_BOUND

    hidden64, last64, pooled64, _ = hf_outputs(hf_model.double(), ids)
    pairs = list(zip(hidden, hidden64)) + [(last, last64), (pooled, pooled64)]
    reference_noise = max(max_diff(ref_state, exact_state) for ref_state, exact_state in pairs)
    fused_states = [*fused.hidden_states, model.final_layer_norm(fused.hidden_states[-1]), fused.pooled_output]
    for fused_state, (_, exact_state) in zip(fused_states, pairs, strict=True):
        assert max_diff(fused_state, exact_state) <= 4 * reference_noise
