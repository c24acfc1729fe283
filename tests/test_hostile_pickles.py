"""Hostile pickles that pass the allowlist are refused with a named error in bounded time and memory:
deep nesting (hashed keys, lists filled after insertion), tensor views larger than their storage,
torch.Tensor called as a constructor, zip entries that inflate past a limit (declared or lying), and
BUILD aimed at allowlisted globals, which must leave every later load unchanged."""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest
import torch

from hostile_builders import (
    MEMORY_BOUND_MB,
    build_on_global_pickle,
    deep_list_by_mutation_pickle,
    deep_tuple_key_pickle,
    dict_state,
    load_in_child,
    patch_declared_size,
    slot_state,
    tensor_constructor_pickle,
    tensor_pickle,
    unicode,
    write_legacy,
    write_zip,
    write_zip_of_zeros,
)
from tiengine.embeddings.embedding import load_embedding
from tiengine.errors import CheckpointError, EmbeddingError, TiengineError, UnsafePickleError
from tiengine.io import pickle_allowlist
from tiengine.io.safe_pickle import MAX_NESTING_DEPTH, iter_tensors, load_pickle
from tiengine.weights_conv.readers import open_tensor_file


def _containers(tmp_path, name, payload):
    return [write_zip(tmp_path / f"{name}.pt", payload),
            write_legacy(tmp_path / f"{name}_legacy.pt", payload, pickle.dumps([], protocol=2))]


# -- nesting ----------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [MAX_NESTING_DEPTH + 1, 50_000, 1_000_000])
def test_deep_dict_key_is_refused_before_hashing(tmp_path, depth):
    for path in _containers(tmp_path, f"deep{depth}", deep_tuple_key_pickle(depth)):
        for lazy in (False, True):
            with pytest.raises(CheckpointError, match=rf"deeper than {MAX_NESTING_DEPTH} levels \(max_depth\)") as caught:
                load_pickle(path, lazy=lazy)
            assert str(path) in str(caught.value)
        with pytest.raises(EmbeddingError, match="max_depth"):
            load_embedding(path)
        with pytest.raises(CheckpointError, match="max_depth"):
            open_tensor_file(path)


def test_nesting_at_the_limit_loads_and_the_limit_is_an_option(tmp_path):
    path = write_zip(tmp_path / "ok.pt", deep_tuple_key_pickle(MAX_NESTING_DEPTH - 2))
    (key,) = load_pickle(path)
    assert isinstance(key, tuple)
    with pytest.raises(CheckpointError, match="deeper than 10 levels"):
        load_pickle(path, max_depth=10)
    assert len(load_pickle(write_zip(tmp_path / "deeper.pt", deep_tuple_key_pickle(300)),
                           max_depth=400)) == 1


def test_deep_list_filled_after_insertion_is_refused(tmp_path):
    for path in _containers(tmp_path, "lists", deep_list_by_mutation_pickle(5_000)):
        with pytest.raises(CheckpointError, match="max_depth"):
            load_pickle(path)
        with pytest.raises(EmbeddingError, match="max_depth"):
            load_embedding(path)


def test_deep_key_in_a_child_process_is_bounded(tmp_path):
    """The 1,000,000-deep key crashed the process (signal 11) when hashed; now a named error."""
    path = write_zip(tmp_path / "deep.pt", deep_tuple_key_pickle(1_000_000))
    outcome = load_in_child("embedding", path)
    assert outcome["error"] == "EmbeddingError" and "max_depth" in outcome["message"]
    assert outcome["seconds"] < 30 and outcome["extra_mb"] < MEMORY_BOUND_MB


# -- tensor geometry ----------------------------------------------------------------------------
HUGE = (1_000_000, 850)  # 850 M float32 elements: 3.4 GB from a 4-byte storage


@pytest.mark.parametrize("numel,shape,stride", [(1, HUGE, (0, 0)), (850, HUGE, (0, 1)),
                                                (850, (425, 425), (1, 1))])
def test_view_larger_than_its_storage_is_refused(tmp_path, numel, shape, stride):
    """Inside the storage (extent fits) but more elements than it holds: refused."""
    path = write_zip(tmp_path / "strided.pt", tensor_pickle(numel, shape, stride),
                     {"0": bytes(4 * numel)})
    for lazy in (False, True):
        with pytest.raises(CheckpointError, match="zero or overlapping strides") as caught:
            load_pickle(path, lazy=lazy)
        assert str(path) in str(caught.value)
    with pytest.raises(EmbeddingError, match="zero or overlapping strides"):
        load_embedding(path)
    checkpoint = write_zip(tmp_path / "strided.ckpt", tensor_pickle(numel, shape, stride, wrap=None),
                           {"0": bytes(4 * numel)})
    with pytest.raises(CheckpointError, match="zero or overlapping strides"):
        list(iter_tensors(checkpoint))
    with pytest.raises(CheckpointError, match="zero or overlapping strides"):
        open_tensor_file(checkpoint)


def test_zero_stride_bomb_in_child_processes_is_bounded(tmp_path):
    path = write_zip(tmp_path / "bomb.pt", tensor_pickle(1, HUGE, (0, 0)), {"0": bytes(4)})
    assert path.stat().st_size < 1000
    ckpt = write_zip(tmp_path / "bomb.ckpt", tensor_pickle(1, HUGE, (0, 0), wrap=None), {"0": bytes(4)})
    for kind, target in (("embedding", path), ("checkpoint", ckpt)):
        outcome = load_in_child(kind, target)
        assert outcome["error"] in ("EmbeddingError", "CheckpointError"), outcome
        assert "strides" in outcome["message"] and outcome["extra_mb"] < MEMORY_BOUND_MB


def test_ordinary_views_still_load(tmp_path):
    """A row of a larger storage (what torch.save writes for a slice) is fine."""
    base = torch.arange(12, dtype=torch.float32)
    path = tmp_path / "view.pt"
    torch.save({"w": base.view(3, 4)[1]}, path)
    assert torch.equal(load_pickle(path)["w"], torch.tensor([4.0, 5.0, 6.0, 7.0]))


def test_storages_declaring_more_than_max_storage_bytes_are_refused_before_reading(tmp_path):
    path = write_zip(tmp_path / "claims.pt", tensor_pickle(2**30, (2**30,), (1,)), {"0": bytes(4)})
    with pytest.raises(CheckpointError, match="max_storage_bytes"):
        load_pickle(path, max_storage_bytes=2**20)
    with pytest.raises(EmbeddingError, match=r"\(max_bytes\)") as caught:
        load_embedding(path)
    assert str(path) in str(caught.value)
    with pytest.raises(CheckpointError, match="holds 4 bytes, the pickle needs 4294967296"):
        list(iter_tensors(path))  # checkpoints: no total cap, but the entry must hold the bytes


def test_tensor_constructor_is_refused(tmp_path):
    for path in _containers(tmp_path, "ctor", tensor_constructor_pickle(2_000_000_000)):
        with pytest.raises(UnsafePickleError, match="refused to call 'torch.Tensor' as a constructor"):
            load_pickle(path)
        with pytest.raises(UnsafePickleError, match="torch.Tensor"):
            load_embedding(path)


# -- inflation ------------------------------------------------------------------------------------
def test_deflated_pickle_of_zeros_is_refused_by_its_declared_size(tmp_path):
    path = write_zip_of_zeros(tmp_path / "zeros.pt", "archive/data.pkl", 96 * 2**20)
    assert path.stat().st_size < 2**20
    with pytest.raises(CheckpointError, match=r"declares 100663296 bytes uncompressed.*max_pickle_bytes"):
        load_pickle(path)
    with pytest.raises(EmbeddingError, match=r"max_bytes"):
        load_embedding(path)
    outcome = load_in_child("checkpoint", path)
    assert outcome["error"] == "CheckpointError" and outcome["extra_mb"] < MEMORY_BOUND_MB


def test_lying_zip_header_cannot_get_past_the_cap(tmp_path):
    path = write_zip(tmp_path / "liar.pt", b"\x80\x02N." + bytes(4 * 2**20),
                     compression=zipfile.ZIP_DEFLATED)
    patch_declared_size(path, "archive/data.pkl", 100)
    with pytest.raises(CheckpointError, match=str(path)):
        load_pickle(path, max_pickle_bytes=1000)
    path = write_zip(tmp_path / "liar2.pt", bytes(4 * 2**20), compression=zipfile.ZIP_DEFLATED)
    patch_declared_size(path, "archive/data.pkl", 100)
    with pytest.raises(CheckpointError):
        load_pickle(path, max_pickle_bytes=1000)


def test_compressed_storage_over_max_inflated_bytes_is_refused(tmp_path):
    numel = 2**20
    path = write_zip(tmp_path / "deflated.ckpt", tensor_pickle(numel, (numel,), (1,), wrap=None),
                     {"0": bytes(4 * numel)}, compression=zipfile.ZIP_DEFLATED)
    assert torch.count_nonzero(load_pickle(path)["w"]) == 0  # within the default limit: loads
    with pytest.raises(CheckpointError, match="max_inflated_bytes"):
        load_pickle(path, max_inflated_bytes=2**20)
    patch_declared_size(path, "archive/data/0", 2**31)  # a lying 2 GiB entry for a 2 GiB storage
    big = write_zip(tmp_path / "claims.ckpt", tensor_pickle(2**29, (2**29,), (1,), wrap=None),
                    {"0": bytes(16)}, compression=zipfile.ZIP_DEFLATED)
    patch_declared_size(big, "archive/data/0", 2**31)
    with pytest.raises(CheckpointError, match="max_inflated_bytes"):
        list(iter_tensors(big))


# -- BUILD on allowlisted globals -------------------------------------------------------------
ALLOWED_GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"), ("torch", "FloatStorage"), ("torch", "float32"),
    ("torch", "Size"), ("torch", "device"), ("torch", "Tensor"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
    ("builtins", "bytearray"), ("_codecs", "encode"), ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy", "dtype"), ("numpy", "ndarray"),
    ("torch.nn.modules.container", "ParameterDict"), ("torch.nn.parameter", "Parameter"),
]


def _allowlist_snapshot() -> dict[str, object]:
    snapshot = {}
    for name in dir(pickle_allowlist):
        value = getattr(pickle_allowlist, name)
        if callable(value) and getattr(value, "__module__", "") == pickle_allowlist.__name__:
            snapshot[name] = (getattr(value, "__defaults__", None), getattr(value, "__kwdefaults__", None),
                              dict(getattr(value, "__dict__", {})))
    snapshot["np.float32"] = (np.dtype("float32").byteorder, np.dtype("float32").str)
    return snapshot


@pytest.mark.parametrize("module,name", ALLOWED_GLOBALS)
@pytest.mark.parametrize("form", ["slots", "dict"])
def test_build_cannot_change_an_allowed_global(tmp_path, module, name, form):
    state = (slot_state("__defaults__", unicode("rot13") + b"\x85") if form == "slots"
             else dict_state("__defaults__", unicode("rot13") + b"\x85"))
    good = tmp_path / "good.pt"
    torch.save({"string_to_param": {"*": torch.ones(2, 768)}, "name": "good", "step": 3}, good)
    before_snapshot, before = _allowlist_snapshot(), load_pickle(good)
    path = write_zip(tmp_path / "build.pt", build_on_global_pickle(module, name, state))
    with pytest.raises(TiengineError):
        load_pickle(path)
    assert _allowlist_snapshot() == before_snapshot
    after = load_pickle(good)
    assert torch.equal(after["string_to_param"]["*"], before["string_to_param"]["*"])
    assert after.keys() == before.keys() and after["step"] == 3


def test_build_on_a_function_names_it(tmp_path):
    path = write_zip(tmp_path / "defaults.pt", build_on_global_pickle(
        "_codecs", "encode", slot_state("__defaults__", unicode("rot13") + b"\x85")))
    with pytest.raises(UnsafePickleError, match=r"refused to set state on the global '_codecs.encode'"):
        load_pickle(path)
    assert pickle_allowlist.codecs_encode.__defaults__ == ("utf-8",)


def test_numpy_arrays_still_take_their_state(tmp_path):
    """numpy's own pickles BUILD the dtypes and arrays they create: those still load."""
    path = tmp_path / "numpy.pt"
    torch.save({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float64(2.5)}, path)
    raw = path.read_bytes()
    assert b"_reconstruct" in raw or b"numpy" in raw
    loaded = load_pickle(path)
    assert np.array_equal(loaded["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert loaded["s"] == 2.5 and np.dtype("float32").byteorder == "="
