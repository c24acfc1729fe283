"""A1111 hypernetworks: files written here in A1111's format (torch.save of a plain dict, as its
Hypernetwork.save does), tiengine's modules against a restatement of A1111's HypernetworkModule and
Hypernetwork.load (modules/hypernetworks/hypernetwork.py), and the UNet hook against diffusers'
UNet2DConditionModel with an attention processor that feeds the restated modules' outputs to to_k / to_v.

Tolerance for tiengine vs diffusers UNets: 1e-4 * max|reference| in fp32, as tests/test_unet.py (the two
differ only in summation order); every hypernetwork used here moves the output by far more than that.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from hostile_builders import deep_tuple_key_pickle, tensor_pickle, write_zip
from model_builders import build_modules, tiny_model_config
from torch import nn

from tiengine.errors import NetworkError
from tiengine.models.layers import Attention
from tiengine.networks.hypernetwork import (
    ACTIVATIONS,
    REFUSED_ACTIVATIONS,
    apply_hypernetworks,
    attention_context_widths,
    describe_hypernetwork,
    hypernetwork_context,
    hypernetwork_file_hash,
    load_hypernetwork,
)

FP32_RELATIVE_TOLERANCE = 1e-4
SD1_WIDTHS = (32, 48, 64)  # tiny SD1: level-0 self-attention, text context, mid-block self-attention

# -- A1111's HypernetworkModule and Hypernetwork.load, restated ----------------------------------------
A1111_ACTIVATIONS = {"linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
                     "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}  # fmt: skip
A1111_ACTIVATIONS.update({name.lower(): cls for name, cls in inspect.getmembers(nn.modules.activation)
                          if inspect.isclass(cls) and cls.__module__ == "torch.nn.modules.activation"})


class A1111Module(nn.Module):
    def __init__(self, dim, layer_structure, activation_func, add_layer_norm, activate_output, dropout_structure):
        super().__init__()
        self.multiplier = 1.0
        linears = []
        for i in range(len(layer_structure) - 1):
            linears.append(nn.Linear(int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])))
            if not (activation_func in ("linear", None) or (i >= len(layer_structure) - 2 and not activate_output)):
                linears.append(A1111_ACTIVATIONS[activation_func]())
            if add_layer_norm:
                linears.append(nn.LayerNorm(int(dim * layer_structure[i + 1])))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                linears.append(nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = nn.Sequential(*linears)

    def forward(self, x):
        return x + self.linear(x) * self.multiplier


def a1111_dropout_structure(layer_structure, use_dropout, last_layer_dropout):
    if not use_dropout:
        return [0] * len(layer_structure)
    return [0] + [0.3] * (len(layer_structure) - 3) + [0.3 if last_layer_dropout else 0] + [0]


def a1111_module_arguments(saved: dict) -> tuple:
    """Hypernetwork.load's reading of the non-layer keys."""
    layer_structure = saved.get("layer_structure", [1, 2, 1])
    dropout = saved.get("dropout_structure", None)
    use_dropout = True if dropout is not None and any(dropout) else saved.get("use_dropout", False)
    if dropout is None:
        dropout = a1111_dropout_structure(layer_structure, use_dropout, saved.get("last_layer_dropout", False))
    return (layer_structure, saved.get("activation_func", None), saved.get("is_layer_norm", False),
            saved.get("activate_output", True), dropout)  # fmt: skip


def a1111_load(saved: dict) -> dict[int, tuple[A1111Module, A1111Module]]:
    old_names = {"linear1.bias": "linear.0.bias", "linear1.weight": "linear.0.weight",
                 "linear2.bias": "linear.1.bias", "linear2.weight": "linear.1.weight"}  # fmt: skip
    layers = {}
    for size, pair in saved.items():
        if type(size) is int:
            modules = []
            for state in pair:
                module = A1111Module(size, *a1111_module_arguments(saved))
                module.load_state_dict({old_names.get(k, k): v.float() for k, v in state.items()})
                modules.append(module.eval())
            layers[size] = tuple(modules)
    return layers


def a1111_apply(chain, context):
    """apply_hypernetworks: (restated layers, multiplier) pairs in order."""
    context_k = context_v = context
    for layers, multiplier in chain:
        pair = layers.get(context_k.shape[2])
        if pair is not None:
            pair[0].multiplier = pair[1].multiplier = multiplier
            context_k, context_v = pair[0](context_k), pair[1](context_v)
    return context_k, context_v


def write_hypernetwork(path, sizes, metadata: dict, *, seed: int, old_names=False, legacy=False, stored_dtype=None):
    """An A1111-format file: for each size a (k, v) pair of state dicts with seeded weights, plus `metadata`.
    Returns the dict saved."""
    generator = torch.Generator().manual_seed(seed)
    saved = {}
    for size in sizes:
        pair = []
        for _ in "kv":
            module = A1111Module(size, *a1111_module_arguments(metadata))
            state = {}
            for key, tensor in module.state_dict().items():
                if tensor.ndim == 2:  # Linear: unit-variance outputs
                    value = (torch.rand(tensor.shape, generator=generator) * 2 - 1) * (3 / tensor.shape[1]) ** 0.5
                else:  # biases, norm scales, PReLU slopes
                    value = torch.rand(tensor.shape, generator=generator) * 0.4 + (0.8 if "weight" in key else -0.2)
                if old_names:
                    key = key.replace("linear.0.", "linear1.").replace("linear.1.", "linear2.")
                state[key] = value if stored_dtype is None else value.to(stored_dtype)
            pair.append(state)
        saved[size] = tuple(pair)
    saved.update(metadata)
    torch.save(saved, path, _use_new_zipfile_serialization=not legacy)
    return saved


FULL_METADATA = {"layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False,
                 "weight_initialization": "Normal", "use_dropout": False, "dropout_structure": [0, 0, 0],
                 "last_layer_dropout": False, "activate_output": False, "name": "stored name", "step": 1200,
                 "sd_checkpoint": "e1441589a6", "sd_checkpoint_name": "v1-5-pruned-emaonly",
                 "optional_info": None}  # fmt: skip
CASES = {
    "novelai_old_names_no_metadata": ({}, {"old_names": True}),
    "full_metadata_relu": (FULL_METADATA, {}),
    "legacy_container": (FULL_METADATA, {"legacy": True}),
    "fp16_stored": (FULL_METADATA, {"stored_dtype": torch.float16}),
    "leakyrelu_layer_norm_fractional": ({"layer_structure": [1, 1.5, 1], "activation_func": "leakyrelu",
                                         "is_layer_norm": True, "activate_output": True}, {}),
    "swish_dropout_slots_shift_indices": ({"layer_structure": [1, 2, 2, 1], "activation_func": "swish",
                                           "is_layer_norm": True, "activate_output": False,
                                           "dropout_structure": [0, 0.3, 0.3, 0]}, {}),
    "elu_dropout_from_use_dropout": ({"layer_structure": [1, 2, 2, 1], "activation_func": "elu",
                                      "use_dropout": True, "last_layer_dropout": True}, {}),
    "tanh_activate_output_default": ({"layer_structure": [1, 2, 1], "activation_func": "tanh"}, {}),
    "prelu_has_weights": ({"layer_structure": [1, 2, 1], "activation_func": "prelu", "is_layer_norm": True}, {}),
    "rrelu_evaluation_slope": ({"layer_structure": [1, 0.5, 1], "activation_func": "rrelu"}, {}),
    "softmax_implicit_dim": ({"layer_structure": [1, 2, 1], "activation_func": "softmax"}, {}),
    "linear_is_no_activation": ({"layer_structure": [1, 3, 1], "activation_func": "linear"}, {}),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_modules_equal_a1111s(tmp_path, case):
    metadata, options = CASES[case]
    path = tmp_path / f"{case}.pt"
    reference = a1111_load(write_hypernetwork(path, SD1_WIDTHS, metadata, seed=1, **options))
    ours = load_hypernetwork(path)
    arguments = a1111_module_arguments(metadata)
    assert ours.sizes == SD1_WIDTHS and ours.name == case
    assert list(ours.layer_structure) == arguments[0] and ours.activation == arguments[1]
    assert (ours.layer_norm, ours.activate_output, list(ours.dropout_structure)) == arguments[2:]
    assert ours.stored_name == metadata.get("name") and ours.step == metadata.get("step", 0)
    generator = torch.Generator().manual_seed(2)
    for size in SD1_WIDTHS:
        for ours_module, reference_module in zip(ours.layers[size], reference[size]):
            assert set(ours_module.state_dict()) == set(reference_module.state_dict())
            context = torch.randn(2, 5, size, generator=generator)
            for multiplier in (0.7, -1.3):
                reference_module.multiplier = multiplier
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # A1111's Softmax() warns about its implicit dim
                    expected = reference_module(context)
                got = ours_module(context, multiplier)
                assert torch.equal(got, expected), case
            assert not torch.equal(got, context)


def test_activation_table_is_a1111s():
    """Every name A1111 can build and run is here, with the same class; the rest are refused by name."""
    runnable = {name for name, cls in A1111_ACTIVATIONS.items() if name != "linear"
                and name not in ("glu", "threshold", "multiheadattention")}  # fmt: skip
    assert set(ACTIVATIONS) == runnable and set(REFUSED_ACTIVATIONS) == {"glu", "threshold", "multiheadattention"}
    for name, build in ACTIVATIONS.items():
        assert type(build()) is A1111_ACTIVATIONS[name], name


def test_bfloat16_modules_compute_in_their_dtype(tmp_path):
    metadata = {"layer_structure": [1, 2, 1], "activation_func": "relu"}
    reference = a1111_load(write_hypernetwork(tmp_path / "h.pt", (48,), metadata, seed=3))[48][0]
    ours = load_hypernetwork(tmp_path / "h.pt", dtype=torch.bfloat16).layers[48][0]
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in ours.parameters())
    context = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(4))
    reference.multiplier = 0.5
    expected = reference.to(torch.bfloat16)(context.to(torch.bfloat16)).float()
    assert torch.equal(ours(context, 0.5), expected)


def test_optimizer_state_is_never_read_and_description_is_json(tmp_path):
    saved = write_hypernetwork(tmp_path / "h.pt", SD1_WIDTHS, FULL_METADATA, seed=5)
    module = A1111Module(48, *a1111_module_arguments(FULL_METADATA))
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.randn(1, 48)).sum().backward()
    optimizer.step()
    saved["optimizer_state_dict"] = optimizer.state_dict()
    torch.save(saved, tmp_path / "h.pt")
    description = describe_hypernetwork(tmp_path / "h.pt")
    sha256 = hashlib.sha256((tmp_path / "h.pt").read_bytes()).hexdigest()
    assert hypernetwork_file_hash(tmp_path / "h.pt") == sha256 == description["sha256"]
    assert description["short_hash"] == sha256[:10]  # A1111's shorthash
    assert json.loads(json.dumps(description)) == description
    parameters = sum(t.numel() for size in SD1_WIDTHS for state in saved[size] for t in state.values())
    assert description["parameters"] == parameters and description["has_optimizer_state"]
    assert description["sizes"] == list(SD1_WIDTHS) and description["sd_checkpoint"] == "e1441589a6"


# -- bad files ----------------------------------------------------------------------------------------
def _edited(saved: dict, edit) -> dict:
    copy = {key: tuple(dict(state) for state in value) if type(key) is int else value
            for key, value in saved.items()}  # fmt: skip
    edit(copy)
    return copy


BAD_FILES = {
    "unknown activation": (lambda d: d.update(activation_func="swishy"), ["'activation_func'", "'swishy'"]),
    "glu": (lambda d: d.update(activation_func="glu"), ["'activation_func'", "halves the width"]),
    "threshold": (lambda d: d.update(activation_func="threshold"), ["'activation_func'", "arguments"]),
    "structure not from 1": (lambda d: d.update(layer_structure=[2, 1]), ["'layer_structure'", "[2, 1]"]),
    "structure as text": (lambda d: d.update(layer_structure="1, 2, 1"), ["'layer_structure'", "'1, 2, 1'"]),
    "width zero": (lambda d: d.update(layer_structure=[1, 0.001, 1]), ["key 32", "[32, 0, 32]"]),
    "dropout of 1": (lambda d: d.update(dropout_structure=[0, 1.0, 0]), ["'dropout_structure'", "[0, 1.0, 0]"]),
    "flag not bool": (lambda d: d.update(activate_output="yes"), ["'activate_output'", "true or false", "'yes'"]),
    "step as text": (lambda d: d.update(step="12"), ["'step'", "'12'"]),
    "wrong shape": (lambda d: d[48][0].update({"linear.0.weight": torch.zeros(96, 40)}),
                    ["key 48, k module", "'linear.0.weight'", "expected shape [96, 48]", "found [96, 40]"]),
    "missing key": (lambda d: d[64][1].pop("linear.2.bias"), ["key 64, v module", "missing: linear.2.bias"]),
    "unexpected key": (lambda d: d[32][0].update({"linear.5.weight": torch.zeros(1)}),
                       ["key 32, k module", "unexpected: linear.5.weight"]),
    "one state dict": (lambda d: d.update({48: d[48][0]}), ["key 48", "expected a pair of state dicts"]),
    "three state dicts": (lambda d: d.update({48: (*d[48], {})}), ["key 48", "expected a pair"]),
    "nan": (lambda d: d[32][1]["linear.0.bias"].__setitem__(3, float("nan")),
            ["key 32, v module", "'linear.0.bias'", "NaN or infinite"]),
    "inf": (lambda d: d[64][0]["linear.2.weight"].__setitem__((0, 0), float("inf")), ["key 64", "NaN or inf"]),
    "int tensor": (lambda d: d[32][0].update({"linear.0.bias": torch.zeros(64, dtype=torch.int64)}),
                   ["'linear.0.bias'", "floating-point tensor", "torch.int64"]),
    "number for tensor": (lambda d: d[32][0].update({"linear.0.bias": 1.5}), ["'linear.0.bias'", "float 1.5"]),
    "negative size": (lambda d: d.update({-8: d.pop(32)}), ["key -8", "positive context width"]),
    "no sizes": (lambda d: [d.pop(size) for size in SD1_WIDTHS], ["expected int keys", "found none", "step"]),
}  # fmt: skip


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_name_the_file_the_key_and_what_was_expected(tmp_path, name):
    edit, needles = BAD_FILES[name]
    saved = write_hypernetwork(tmp_path / "good.pt", SD1_WIDTHS, FULL_METADATA, seed=6)
    torch.save(_edited(saved, edit), tmp_path / "bad.pt")
    with pytest.raises(NetworkError) as caught:
        load_hypernetwork(tmp_path / "bad.pt")
    for needle in [str(tmp_path / "bad.pt"), *needles]:
        assert needle in str(caught.value), (needle, str(caught.value))


def test_fp16_overflow_is_named(tmp_path):
    saved = write_hypernetwork(tmp_path / "h.pt", (48,), FULL_METADATA, seed=7)
    saved[48][0]["linear.0.weight"][0, 0] = 1e6
    torch.save(saved, tmp_path / "h.pt")
    assert load_hypernetwork(tmp_path / "h.pt").layers[48][0].linear[0].weight[0, 0] == 1e6
    with pytest.raises(NetworkError, match=r"key 48, k module: 'linear.0.weight' overflows torch.float16"):
        load_hypernetwork(tmp_path / "h.pt", dtype=torch.float16)


def test_declared_tensor_bytes_are_bounded_before_reading(tmp_path):
    write_hypernetwork(tmp_path / "h.pt", SD1_WIDTHS, FULL_METADATA, seed=8)
    # [1, 2, 1]: weights (2w, w) and (w, 2w), biases 2w and w; k and v modules; 4-byte floats
    stored = sum(2 * 4 * (4 * width * width + 3 * width) for width in SD1_WIDTHS)
    load_hypernetwork(tmp_path / "h.pt", max_bytes=stored)
    with pytest.raises(NetworkError, match=r"h.pt: its storages declare more than 8 bytes .*\(max_bytes\)"):
        load_hypernetwork(tmp_path / "h.pt", max_bytes=8)


def test_files_that_are_not_hypernetworks(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "text.pt").write_text("not a torch file")
    for path, needle in [(tmp_path / "list.pt", "expected a dict"), (tmp_path / "text.pt", "not a PyTorch file"),
                         (tmp_path / "absent.pt", "cannot read")]:  # fmt: skip
        with pytest.raises(NetworkError, match=needle) as caught:
            load_hypernetwork(path)
        assert str(path) in str(caught.value)


class _Call:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_hostile_pickles_run_no_code(tmp_path):
    marker = tmp_path / "written-by-the-pickle"
    payload = pickle.dumps({768: (_Call(open, str(marker), "w"), {}), "layer_structure": [1, 2, 1]}, protocol=2)
    with pytest.raises(NetworkError, match=r"refused to load global 'io.open'"):
        load_hypernetwork(write_zip(tmp_path / "open.pt", payload))
    assert not marker.exists()
    with pytest.raises(NetworkError, match="nests containers deeper"):
        load_hypernetwork(write_zip(tmp_path / "deep.pt", deep_tuple_key_pickle(100_000)))
    bomb = tensor_pickle(1, (1 << 20, 1 << 20), (0, 0), wrap=None)  # 2^40 elements from one stored float
    with pytest.raises(NetworkError, match="zero or overlapping strides"):
        load_hypernetwork(write_zip(tmp_path / "bomb.pt", bomb, {"0": bytes(4)}))


# -- in the UNet ----------------------------------------------------------------------------------------
def _tiny_unet_inputs(config, seed: int):
    generator = torch.Generator().manual_seed(seed)
    unet_config = config.unet
    sample = torch.randn(2, unet_config.in_channels, 8, 8, generator=generator)
    context = torch.randn(2, 7, unet_config.cross_attention_dim, generator=generator)
    extras = None
    if unet_config.addition_embed_type == "text_time":
        pooled = torch.randn(2, unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim,
                             generator=generator)  # fmt: skip
        extras = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 80, 8, 0, 64, 64]])}
    return sample, torch.tensor([999.0, 321.0]), context, extras


def _run(unet, sample, timestep, context, extras):
    y = None if extras is None else unet.text_time_conditioning(extras["text_embeds"], extras["time_ids"])
    with torch.no_grad():
        return unet(sample, timestep, context, y)


class A1111HypernetworkProcessor:
    """A diffusers attention processor that computes attention as A1111's hijacked CrossAttention.forward:
    the (self- or cross-) context through apply_hypernetworks, k from the first result, v from the second."""

    def __init__(self, chain):
        self.chain = chain

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert attention_mask is None and attn.group_norm is None and attn.spatial_norm is None
        assert not attn.residual_connection and attn.rescale_output_factor == 1 and attn.norm_cross is None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        context_k, context_v = a1111_apply(self.chain, context)
        batch, heads = hidden_states.shape[0], attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(context_k), attn.to_v(context_v)
        q, k, v = (t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (B, heads, N, d)
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(batch, -1, q.shape[-1] * heads)))


def _relative_error(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unet_with_hypernetworks_matches_a1111_in_diffusers(tmp_path, family):
    diffusers = pytest.importorskip("diffusers")
    config = tiny_model_config(family)
    unet = build_modules(config, seed=8)["unet"].eval()
    widths = sorted(attention_context_widths(unet))
    first_metadata = {"layer_structure": [1, 2, 1], "activation_func": "relu", "activate_output": False}
    second_metadata = {"layer_structure": [1, 1.5, 1], "activation_func": "tanh", "is_layer_norm": True}
    first_saved = write_hypernetwork(tmp_path / "first.pt", [*widths, 1024], first_metadata, seed=9)
    second_saved = write_hypernetwork(tmp_path / "second.pt", widths[-1:], second_metadata, seed=10)
    first, second = load_hypernetwork(tmp_path / "first.pt"), load_hypernetwork(tmp_path / "second.pt")
    active = [(first, 0.7), (second, -0.4)]
    chain = [(a1111_load(first_saved), 0.7), (a1111_load(second_saved), -0.4)]
    inputs = _tiny_unet_inputs(config, seed=11)

    reference = diffusers.UNet2DConditionModel(**config.unet.to_diffusers()).eval()
    reference.load_state_dict(unet.state_dict())
    reference.set_attn_processor(A1111HypernetworkProcessor(chain))
    sample, timestep, context, extras = inputs
    with torch.no_grad():
        expected = reference(sample, timestep, context, added_cond_kwargs=extras).sample

    base = _run(unet, *inputs)
    notices = apply_hypernetworks(unet, active)
    assert len(notices) == 1 and "first.pt" in notices[0] and "width 1024" in notices[0]
    assert ", ".join(map(str, widths)) in notices[0]
    got = _run(unet, *inputs)
    assert _relative_error(got, expected) <= FP32_RELATIVE_TOLERANCE
    assert _relative_error(base, expected) > 100 * FP32_RELATIVE_TOLERANCE  # the hypernetworks matter

    # the same restated modules in a hand-written hook: bit for bit
    unet.set_key_value_context(lambda source: a1111_apply(chain, source))
    assert torch.equal(_run(unet, *inputs), got)
    # strength 0 and removal restore the plain UNet bit for bit
    apply_hypernetworks(unet, [(first, 0.0), (second, 0.0)])
    assert torch.equal(_run(unet, *inputs), base)
    assert apply_hypernetworks(unet, []) == ()
    assert all(m.key_value_context is None for m in unet.modules() if isinstance(m, Attention))
    assert torch.equal(_run(unet, *inputs), base)


def test_hook_changes_nothing_else_and_rejects_modules(tmp_path):
    config = tiny_model_config("sd1")
    modules = build_modules(config, seed=12)
    unet, vae = modules["unet"], modules["vae"]
    keys = list(unet.state_dict())
    write_hypernetwork(tmp_path / "h.pt", SD1_WIDTHS, {}, seed=13)
    apply_hypernetworks(unet, [(load_hypernetwork(tmp_path / "h.pt"), 1.0)])
    assert list(unet.state_dict()) == keys
    assert all(m.key_value_context is not None for m in unet.modules() if isinstance(m, Attention))
    assert all(m.key_value_context is None for m in vae.modules() if isinstance(m, Attention))
    with pytest.raises(TypeError, match="not an nn.Module"):
        unet.set_key_value_context(nn.Identity())
    with pytest.raises(NetworkError, match="finite strength"):
        hypernetwork_context([(load_hypernetwork(tmp_path / "h.pt"), float("nan"))])
