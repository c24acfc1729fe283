"""Hostile inputs built in the test (nothing hostile is committed): pickles assembled from opcodes,
torch-style zips, safetensors headers written by hand, PNGs from chunks; and a runner that loads one
in a child process with a timeout and reports its peak memory above the child's own baseline."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import torch

MEMORY_BOUND_MB = 300  # extra peak resident memory a refused file may cost
TIME_BOUND_S = 60  # child process wall time, torch import included (2 shared cores)


# -- pickles from opcodes -------------------------------------------------------------------
def unicode(text: str) -> bytes:
    """BINUNICODE opcode pushing `text`."""
    raw = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def deep_tuple_key_pickle(depth: int) -> bytes:
    """{((...(None,)...),): 1}: a dict key nested `depth` tuples deep (hashed while unpickling)."""
    return b"\x80\x02}" + b"N" + b"\x85" * depth + b"K\x01s."


def deep_list_by_mutation_pickle(depth: int) -> bytes:
    """[[[...]]] `depth` deep, built as empty memoized lists each appended into the one before
    after creation, so no single opcode looks deep."""
    out = [b"\x80\x02"]
    for index in range(depth):
        out.append(b"]r" + struct.pack("<I", index) + b"0")  # EMPTY_LIST, LONG_BINPUT, POP
    for index in range(depth - 1):
        out.append(b"j" + struct.pack("<I", index) + b"j" + struct.pack("<I", index + 1) + b"a0")
    out.append(b"j" + struct.pack("<I", 0) + b".")
    return b"".join(out)


def build_on_global_pickle(module: str, name: str, state: bytes) -> bytes:
    """GLOBAL module.name, then BUILD with `state` (opcodes pushing one object)."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + state + b"b."


def slot_state(attribute: str, value: bytes) -> bytes:
    """(None, {attribute: value}): BUILD's slot state, applied with setattr."""
    return b"N}" + unicode(attribute) + value + b"s\x86"


def dict_state(attribute: str, value: bytes) -> bytes:
    """{attribute: value}: BUILD's state for __setstate__ or the instance __dict__."""
    return b"}" + unicode(attribute) + value + b"s"


def tensor_constructor_pickle(count: int) -> bytes:
    """torch.Tensor(count): the allowlisted type called as a constructor."""
    return b"\x80\x02ctorch\nTensor\n(J" + struct.pack("<i", count) + b"tR."


class _Storage:
    def __init__(self, key: str, numel: int, storage_type: type = torch.FloatStorage):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class _Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def tensor_pickle(numel: int, size: tuple[int, ...], stride: tuple[int, ...], *,
                  key: str = "0", wrap: str | None = "string_to_param") -> bytes:
    """data.pkl of an A1111-like dict whose tensor is _rebuild_tensor_v2 over a storage of
    `numel` floats with the given (possibly hostile) geometry."""
    tensor = _Reduce(torch._utils._rebuild_tensor_v2, _Storage(key, numel), 0, size, stride, False,
                     OrderedDict())
    obj = {wrap: {"*": tensor}, "name": "x"} if wrap else {"w": tensor}
    buffer = __import__("io").BytesIO()
    _TorchPickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


# -- containers -----------------------------------------------------------------------------
def write_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None,
              compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        for key, raw in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", raw)
        archive.writestr("archive/version", b"3\n")
    return path


def write_zip_of_zeros(path: Path, member: str, nbytes: int, data_pkl: bytes | None = None) -> Path:
    """A deflated zip entry of `nbytes` zeros, streamed (the test never holds them)."""
    chunk = bytes(2**20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        if data_pkl is not None:
            archive.writestr("archive/data.pkl", data_pkl)
        with archive.open(member, "w", force_zip64=True) as entry:
            for start in range(0, nbytes, len(chunk)):
                entry.write(chunk[: min(len(chunk), nbytes - start)])
        archive.writestr("archive/version", b"3\n")
    return path


def patch_declared_size(path: Path, member: str, declared: int) -> Path:
    """Rewrite the central directory's uncompressed size of `member` (a lying zip header)."""
    raw = bytearray(path.read_bytes())
    name = member.encode()
    at = raw.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", raw, at + 28)[0]
        if raw[at + 46 : at + 46 + name_len] == name:
            struct.pack_into("<I", raw, at + 24, declared)
            path.write_bytes(bytes(raw))
            return path
        at = raw.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"{member} not in {path}")


def write_legacy(path: Path, main_pickle: bytes, tail: bytes = b"") -> Path:
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    with open(path, "wb") as file:
        for header in (0x1950A86A20F9469CFC6C, 1001, sys_info):
            pickle.dump(header, file, protocol=2)
        file.write(main_pickle)
        file.write(tail)
    return path


def write_safetensors_header(path: Path, header: bytes | str, data_bytes: int = 0) -> Path:
    """8-byte length, the header as given, then `data_bytes` of data (sparse: never written)."""
    raw = header.encode() if isinstance(header, str) else header
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(raw)) + raw)
        file.truncate(8 + len(raw) + data_bytes)
    return path


def safetensors_embedding_header(shape: list[int], metadata: dict[str, str] | None = None) -> str:
    numel = 1
    for size in shape:
        numel *= size
    header = {"emb_params": {"dtype": "F32", "shape": shape, "data_offsets": [0, numel * 4]}}
    if metadata:
        header["__metadata__"] = metadata
    return json.dumps(header)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_size(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels but carries only a few bytes of them."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(bytes(64))) + png_chunk(b"IEND", b""))


# -- the child-process runner ---------------------------------------------------------------
CHILD = r"""
import json, resource, sys, time
kind, path = sys.argv[1], sys.argv[2]
import torch
from tiengine.errors import TiengineError
if kind == "embedding":
    from tiengine.embeddings.embedding import load_embedding as load
elif kind == "pickle":
    from tiengine.io.safe_pickle import load_pickle as load
else:
    from tiengine.weights_conv.readers import open_tensor_file
    def load(p):
        with open_tensor_file(p) as source:
            for key in source.keys():
                source.read(key).float()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
try:
    load(path)
    outcome = {"error": None, "message": ""}
except TiengineError as error:
    outcome = {"error": type(error).__name__, "message": str(error)}
outcome["seconds"] = time.monotonic() - start
outcome["extra_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps(outcome))
"""


def load_in_child(kind: str, path: Path) -> dict:
    """Load `path` ("embedding", "pickle" or "checkpoint") in a fresh interpreter; its outcome.

    A crash (signal) or a timeout fails the calling test with the child's output.
    """
    result = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True,
                            text=True, timeout=TIME_BOUND_S)
    assert result.returncode == 0, f"child exited {result.returncode}: {result.stderr[-2000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])
