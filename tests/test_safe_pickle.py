"""tiengine.io.safe_pickle: malicious pickles are refused without side effects; torch.save'd
files (zip and legacy) load equal to torch.load(weights_only=True); corrupt files fail clearly."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from tiengine.errors import CheckpointError, UnsafePickleError
from tiengine.io.safe_pickle import (
    InertModelCheckpoint,
    InertParameterDict,
    TensorRef,
    iter_tensors,
    load_pickle,
    open_torch_file,
)

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# -- building files byte by byte ------------------------------------------------------------
def write_zip_archive(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None,
                      compression: int = zipfile.ZIP_STORED, byteorder: bytes | None = None) -> Path:
    """A torch-style zip: archive/data.pkl, archive/data/<key>, archive/version."""
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        if byteorder is not None:
            archive.writestr("archive/byteorder", byteorder)
        for key, raw in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", raw)
        archive.writestr("archive/version", b"3\n")
    return path


def write_legacy(path: Path, main_pickle: bytes, tail: bytes = b"") -> Path:
    """Legacy layout: magic, protocol 1001, sys_info, the object pickle, then `tail`."""
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    with open(path, "wb") as file:
        for header in (LEGACY_MAGIC, 1001, sys_info):
            pickle.dump(header, file, protocol=2)
        file.write(main_pickle)
        file.write(tail)
    return path


class _Reduce:
    """Pickles as `func(*args)` (what an attacker writes with __reduce__)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch_command(marker: Path) -> str:
    return f'"{sys.executable}" -c "open(r\'{marker}\', \'w\').close()"'


def malicious_payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes, refused global) for several opcodes and callables."""
    command = _touch_command(marker)
    code = f"open(r'{marker}', 'w').close()"
    quoted = command.replace("'", "\\'")
    return {
        # protocol 0 GLOBAL + REDUCE, written by hand
        "global_os_system": (f"cos\nsystem\n(S'{quoted}'\ntR.".encode(), "os.system"),
        # protocol 0 INST opcode
        "inst_os_system": (f"(S'{quoted}'\nios\nsystem\n.".encode(), "os.system"),
        # protocol 4 STACK_GLOBAL (pickle.dumps of a __reduce__ object)
        "stack_global_eval": (pickle.dumps(_Reduce(eval, code), protocol=4), "builtins.eval"),
        "stack_global_exec": (pickle.dumps(_Reduce(exec, code), protocol=4), "builtins.exec"),
        "protocol2_popen": (pickle.dumps(_Reduce(subprocess.Popen, [sys.executable, "-c", code]),
                                         protocol=2), "subprocess.Popen"),
        "system_via_dumps": (pickle.dumps(_Reduce(os.system, command), protocol=2),
                             f"{os.system.__module__}.system"),
        # nested deep inside an otherwise harmless dict/list structure
        "nested": (pickle.dumps({"string_to_param": {"*": [1, 2, {"x": _Reduce(eval, code)}]}},
                                protocol=2), "builtins.eval"),
    }


def test_payloads_are_live_with_plain_pickle(tmp_path):
    """Control: the payloads really execute under plain pickle, so the refusals below mean
    something. Runs in a child process so the test process never unpickles them."""
    for name in malicious_payloads(tmp_path / "unused"):
        marker = tmp_path / f"control_{name}"
        data = malicious_payloads(marker)[name][0]
        script = "import pickle, sys, time; pickle.loads(sys.stdin.buffer.read()); time.sleep(0.5)"
        subprocess.run([sys.executable, "-c", script], input=data, check=False, timeout=60,
                       capture_output=True)
        assert marker.exists(), f"payload {name} did not run under plain pickle"


@pytest.mark.parametrize("container", ["zip", "legacy", "zip_deflated"])
def test_malicious_pickles_are_refused_without_side_effect(tmp_path, container):
    marker = tmp_path / "marker"
    for name, (payload, refused) in malicious_payloads(marker).items():
        if container == "legacy":
            path = write_legacy(tmp_path / f"{name}.pt", payload)
        else:
            compression = zipfile.ZIP_DEFLATED if container == "zip_deflated" else zipfile.ZIP_STORED
            path = write_zip_archive(tmp_path / f"{name}.pt", payload, compression=compression)
        for lazy in (False, True):
            with pytest.raises(UnsafePickleError) as caught:
                load_pickle(path, lazy=lazy)
            assert f"'{refused}'" in str(caught.value), name
            assert str(path) in str(caught.value)
        with pytest.raises(UnsafePickleError):
            list(iter_tensors(path))
    assert not marker.exists()


def test_refusal_happens_before_later_tensors(tmp_path):
    """A real torch.save'd dict with a malicious entry appended is refused as a whole."""
    marker = tmp_path / "marker"
    obj = {"ok": torch.ones(3), "evil": _Reduce(os.system, _touch_command(marker))}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path = tmp_path / "mixed.pt"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UnsafePickleError, match="system"):
        load_pickle(path)
    assert not marker.exists()


# -- equality with torch.load(weights_only=True) -------------------------------------------
def reference_object() -> dict:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=generator)
    with_attribute = torch.randn(3, generator=generator)
    with_attribute.note = "pickled through torch._tensor._rebuild_from_type_v2"
    return {
        "with_attribute": with_attribute,
        "f32": base,
        "f32_view": base[1:, 2:],  # shares base's storage, non-zero offset
        "f32_t": base.t(),  # non-contiguous stride
        "f16": torch.randn(3, 5, generator=generator).half(),
        "bf16": torch.randn(7, generator=generator).bfloat16(),
        "f64": torch.randn(2, 2, generator=generator).double(),
        "i64": torch.arange(10),
        "i32": torch.arange(5, dtype=torch.int32),
        "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 768),
        "scalar": torch.tensor(3.5),
        "param": torch.nn.Parameter(torch.randn(2, 3, generator=generator)),
        "ordered": OrderedDict([("a", torch.ones(2)), ("b", 1)]),
        "nested": [1, 2.5, "text", None, (torch.zeros(2), {"k": torch.full((2,), 7.0)})],
        "size": torch.Size([2, 3]),
        "set": {1, 2, 3},
        "bytes": b"\x00\xffbytes",
    }


def assert_same(ours, reference, where="root"):
    if isinstance(reference, torch.Tensor):
        assert isinstance(ours, torch.Tensor), where
        assert ours.dtype == reference.dtype and ours.shape == reference.shape, where
        assert ours.stride() == reference.stride(), where
        assert torch.equal(ours, reference), where
    elif isinstance(reference, dict):
        assert type(ours) is type(reference) and list(ours) == list(reference), where
        for key in reference:
            assert_same(ours[key], reference[key], f"{where}.{key}")
    elif isinstance(reference, (list, tuple)):
        assert type(ours) is type(reference) and len(ours) == len(reference), where
        for i, (a, b) in enumerate(zip(ours, reference)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert ours == reference and type(ours) is type(reference), where


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_torch_save_loads_equal_to_weights_only(tmp_path, zipped):
    path = tmp_path / "obj.pt"
    torch.save(reference_object(), path, _use_new_zipfile_serialization=zipped)
    reference = torch.load(path, weights_only=True)
    ours = load_pickle(path)
    assert_same(ours, reference)
    # views keep sharing their storage, as with torch.load
    assert ours["f32_view"].untyped_storage().data_ptr() == ours["f32"].untyped_storage().data_ptr()
    assert not ours["param"].requires_grad and type(ours["param"]) is torch.Tensor


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_lazy_refs_and_iteration_match(tmp_path, zipped):
    path = tmp_path / "obj.pt"
    torch.save(reference_object(), path, _use_new_zipfile_serialization=zipped)
    reference = torch.load(path, weights_only=True)
    lazy = load_pickle(path, lazy=True)
    assert isinstance(lazy["f16"], TensorRef)
    assert lazy["f16"].shape == (3, 5) and lazy["f16"].dtype == torch.float16
    assert_same(lazy["f32_view"].load(), reference["f32_view"])
    assert_same(lazy["nested"][4][1]["k"].load(), reference["nested"][4][1]["k"])
    seen = dict(iter_tensors(path))
    assert_same(seen["nested.4.1.k"], reference["nested"][4][1]["k"])
    assert_same(seen["ordered.a"], reference["ordered"]["a"])
    assert_same(seen["bf16"], reference["bf16"])
    expected_keys = {"with_attribute", "f32", "f32_view", "f32_t", "f16", "bf16", "f64", "i64", "i32", "u8", "bool",
                     "empty", "scalar", "param", "ordered.a", "nested.4.0", "nested.4.1.k"}
    assert set(seen) == expected_keys


def test_untyped_storages_with_rebuild_tensor_v3(tmp_path):
    """Dtypes without a typed storage class are saved through _rebuild_tensor_v3."""
    path = tmp_path / "v3.pt"
    values = {"u16": torch.arange(6, dtype=torch.int32).to(torch.uint16),
              "f8": torch.linspace(-2, 2, 6).to(torch.float8_e4m3fn)}
    values["f8_view"] = values["f8"][2:]
    torch.save(values, path)
    reference = torch.load(path, weights_only=True)
    for loaded in (load_pickle(path), {k: r.load() for k, r in load_pickle(path, lazy=True).items()}):
        for key, tensor in reference.items():
            assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape
            assert torch.equal(loaded[key].view(torch.uint8), tensor.view(torch.uint8)), key


def test_lazy_tensors_are_copy_on_write(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"w": torch.arange(1024, dtype=torch.float32)}}, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with open_torch_file(path) as archive:
        ((key, ref),) = list(archive.tensors())
        tensor = ref.load()
        tensor.add_(1.0)
        assert key == "state_dict.w" and tensor[5].item() == 6.0
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert load_pickle(path)["state_dict"]["w"][5].item() == 5.0


def test_parameterdict_is_an_inert_stand_in(tmp_path):
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(2, 768))})
    path = tmp_path / "ti.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params}, path)
    loaded = load_pickle(path)["string_to_param"]
    assert isinstance(loaded, InertParameterDict)
    assert torch.equal(loaded.state["_parameters"]["*"], params["*"].detach())


def test_lightning_model_checkpoint_is_an_inert_stand_in(tmp_path, monkeypatch):
    """A full SD .ckpt keys its callback state by pytorch_lightning's ModelCheckpoint class."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    marker = tmp_path / "marker"

    class ModelCheckpoint:
        def __setstate__(self, state):  # would run with plain pickle; must not run here
            marker.write_text("ran")
            self.__dict__.update(state)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    instance = ModelCheckpoint.__new__(ModelCheckpoint)
    instance.__dict__["best_model_score"] = torch.tensor(0.25)
    path = tmp_path / "model.ckpt"
    torch.save({"callbacks": {ModelCheckpoint: {"best": 1}}, "cb": instance,
                "global_step": np.int64(470000), "lr": np.float64(1e-4)}, path)
    monkeypatch.undo()  # the class is no longer importable: only the stand-in can load it
    assert module.__name__ not in sys.modules
    loaded = load_pickle(path)
    ((key, value),) = loaded["callbacks"].items()
    assert key is InertModelCheckpoint and value == {"best": 1}
    assert isinstance(loaded["cb"], InertModelCheckpoint)
    assert loaded["cb"].state["best_model_score"].item() == 0.25
    assert loaded["global_step"] == 470000 and isinstance(loaded["global_step"], np.int64)
    assert loaded["lr"] == 1e-4
    assert not marker.exists()


def test_numpy_arrays_of_plain_dtypes_load(tmp_path):
    path = tmp_path / "np.pt"
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    torch.save({"array": array}, path)
    loaded = load_pickle(path)["array"]
    assert loaded.dtype == np.float32 and np.array_equal(loaded, array)


def test_numpy_object_arrays_are_refused(tmp_path):
    path = write_zip_archive(tmp_path / "obj.pt",
                             pickle.dumps({"a": np.array([1, "x"], dtype=object)}, protocol=2))
    with pytest.raises(UnsafePickleError, match="numpy dtype 'O"):
        load_pickle(path)


def test_big_endian_and_deflated_archives(tmp_path):
    """byteorder "big" swaps each element; compressed entries are read without the map."""
    source = tmp_path / "little.pt"
    expected = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
                "c": torch.randn(6).bfloat16()}
    torch.save(expected, source)
    with zipfile.ZipFile(source) as archive:
        prefix = archive.namelist()[0].split("/")[0]
        data_pkl = archive.read(f"{prefix}/data.pkl")
        storages = {name.split("/")[-1]: archive.read(name) for name in archive.namelist()
                    if "/data/" in name}
    lazy = load_pickle(source, lazy=True)
    itemsize = {r.storage.key: r.dtype.itemsize for r in lazy.values()}
    swapped = {key: np.frombuffer(raw, np.uint8).reshape(-1, itemsize[key])[:, ::-1].tobytes()
               for key, raw in storages.items()}
    big = write_zip_archive(tmp_path / "big.pt", data_pkl, swapped, byteorder=b"big")
    assert_same(load_pickle(big), expected)
    assert_same(load_pickle(big, lazy=True)["a"].load(), expected["a"])
    deflated = write_zip_archive(tmp_path / "deflated.pt", data_pkl, storages,
                                 compression=zipfile.ZIP_DEFLATED)
    assert_same(load_pickle(deflated), expected)
    assert_same(dict(iter_tensors(deflated)), expected)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_copied_views_read_only_their_own_span(tmp_path, zipped):
    """load(copy=True) of a view into a big shared storage reads just the elements the view spans (a model
    saved as views of one flat buffer streams in one tensor's memory), with the same values and strides."""
    flat = torch.randn(10_000, generator=torch.Generator().manual_seed(3))
    views = {"head": flat[:12].view(3, 4), "middle": flat[5000:5060].view(6, 10), "strided": flat[100:130].view(5, 6).t(),
             "tail": flat[-7:], "whole": flat}  # fmt: skip
    path = tmp_path / "flat.pt"
    torch.save(views, path, _use_new_zipfile_serialization=zipped)
    reference = torch.load(path, weights_only=True)
    lazy = load_pickle(path, lazy=True)
    for key, tensor in reference.items():
        copied = lazy[key].load(copy=True)
        assert_same(copied, tensor, key)
        span = 1 + sum((size - 1) * step for size, step in zip(tensor.shape, tensor.stride()))
        assert copied.untyped_storage().nbytes() == span * tensor.element_size(), key


# -- corrupt and malformed files -----------------------------------------------------------
def test_corrupt_wild_zip_gives_clear_error(wild_dir):
    path = wild_dir / "embeddings/fgjd4j23423f_sd/EasyNegative_alt_7620f06.pt"
    with pytest.raises(CheckpointError, match="corrupt or truncated PyTorch zip archive"):
        load_pickle(path)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_truncated_files(tmp_path, zipped):
    path = tmp_path / "t.pt"
    torch.save({"x": torch.randn(64, 64)}, path, _use_new_zipfile_serialization=zipped)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 40):
        broken = tmp_path / f"cut{cut}.pt"
        broken.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=str(broken)):
            load_pickle(broken)


def test_empty_garbage_and_plain_pickles(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_pickle(empty)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch file"):
        load_pickle(garbage)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="magic"):
        load_pickle(plain)
    no_pickle = tmp_path / "nopkl.pt"
    with zipfile.ZipFile(no_pickle, "w") as archive:
        archive.writestr("archive/other.txt", b"x")
    with pytest.raises(CheckpointError, match="data.pkl"):
        load_pickle(no_pickle)


def test_storage_shorter_than_the_pickle_says(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"x": torch.randn(16)}, path)
    with zipfile.ZipFile(path) as archive:
        prefix = archive.namelist()[0].split("/")[0]
        data_pkl = archive.read(f"{prefix}/data.pkl")
        raw = archive.read(f"{prefix}/data/0")
    short = write_zip_archive(tmp_path / "short.pt", data_pkl, {"0": raw[:20]})
    with pytest.raises(CheckpointError, match="holds 20 bytes"):
        load_pickle(short)
    missing = write_zip_archive(tmp_path / "missing.pt", data_pkl, {})
    with pytest.raises(CheckpointError, match="missing"):
        load_pickle(missing)


def test_view_outside_its_storage_is_refused(tmp_path):
    """A hand-made pickle asking for a (100,) view of a 4-element storage."""
    data_pkl = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(("
                b"X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
                b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00Kd\x85K\x01\x85\x89"
                b"ccollections\nOrderedDict\n)RtR.")
    path = write_zip_archive(tmp_path / "oob.pt", data_pkl, {"0": b"\x00" * 16})
    with pytest.raises(CheckpointError, match="outside"):
        load_pickle(path)
    good = data_pkl.replace(b"Kd\x85", b"K\x04\x85")
    ok = write_zip_archive(tmp_path / "ok.pt", good, {"0": np.arange(4, dtype="<f4").tobytes()})
    assert torch.equal(load_pickle(ok), torch.arange(4, dtype=torch.float32))
    assert torch.equal(torch.load(ok, weights_only=True), torch.arange(4, dtype=torch.float32))
