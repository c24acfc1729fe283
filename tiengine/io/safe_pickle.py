"""Restricted reader for PyTorch pickle files (.pt, .bin, .ckpt) that never executes code.

A PyTorch file is a Python pickle whose tensors point at raw storages kept beside it. Two
containers exist (layouts from torch/serialization.py, which we read but do not call):

- zip (torch >= 1.6): `<dir>/data.pkl` (the pickle), `<dir>/data/<key>` (one raw storage per
  key), optional `<dir>/byteorder` ("little" or "big"). Storages of entries stored without
  compression are memory-mapped, so a multi-GB .ckpt is never read whole.
- legacy (`_use_new_zipfile_serialization=False`): pickled magic number 0x1950a86a20f9469cfc6c,
  protocol 1001, a sys_info dict, the object pickle, a pickled list of storage keys, then for
  each key an int64 element count followed by the raw little-endian bytes.

The pickle runs through a `pickle.Unpickler` whose `find_class` resolves only an allowlist:
tensor rebuild functions (re-implemented here), typed storages, `torch.Size`, dtypes,
`collections.OrderedDict`, plain containers, `_codecs.encode`, numpy scalars/dtypes/arrays of
plain numeric types, and inert stand-ins (`InertObject`) for a few harmless classes seen in
real files (the original textual-inversion repo's `ParameterDict`, `Parameter`, PyTorch
Lightning's `ModelCheckpoint`). Any other global raises UnsafePickleError naming it and the
file before anything is constructed from it. Malformed or truncated files raise
CheckpointError.

Hostile files are refused before they can use up memory, stack or time (README, "Threat model and
limits"); each limit is a keyword option of TorchArchive / load_pickle / iter_tensors:

- max_depth (MAX_NESTING_DEPTH): the pickle's opcodes are first replayed on a model of its stack
  that records only how deep each container nests, so a dict key nested 100,000 deep is refused
  before the real unpickler hashes it (which would crash the process); the loaded object is
  checked again without recursion.
- max_pickle_bytes (MAX_PICKLE_BYTES): the pickle stream itself (data.pkl after decompression, or
  the legacy file's pickles), checked against the zip entry's declared size and read with a cap.
- max_inflated_bytes (MAX_INFLATED_BYTES): a storage stored compressed in the zip (torch never
  writes those) is inflated into memory only up to this size.
- max_storage_bytes (None: no limit): the sum of the declared sizes of all storages; embeddings
  pass a small value so a file that claims gigabytes is refused before anything is read.
- Every tensor view must lie inside its storage and hold no more elements than the storage does
  (zero or overlapping strides would turn a few bytes into gigabytes on the first copy).
- Globals from the allowlist are handed to the pickle wrapped so that BUILD / __setstate__ cannot
  change them (nor anything else the process shares); only the inert objects the file itself
  creates take state. `torch.Tensor` may only name a type, never be called.
"""

from __future__ import annotations

import _compat_pickle
import io
import mmap
import os
import pickle
import pickletools
import struct
import types
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tiengine.errors import CheckpointError, TiengineError, UnsafePickleError
from tiengine.io.limits import MAX_NESTING_DEPTH
from tiengine.io.pickle_allowlist import (
    INERT_CLASSES,
    STORAGE_DTYPES,
    TORCH_DTYPE_NAMES,
    InertModelCheckpoint,
    InertObject,
    InertParameter,
    InertParameterDict,
    StorageType,
    codecs_encode,
    int_tuple,
    make_bytearray,
    make_device,
    make_size,
    non_negative_int,
    numpy_dtype,
    numpy_ndarray_class,
    numpy_reconstruct,
    numpy_scalar,
    rebuild_parameter,
    rebuild_parameter_with_state,
)

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
MAX_PICKLE_BYTES = 8 * 2**20  # real data.pkl: kilobytes (embeddings) to ~1 MB (SD checkpoints)
MAX_INFLATED_BYTES = 256 * 2**20  # > SDXL's largest tensor in fp32 (token embedding, 241 MiB)

# stand-ins a caller may meet in a loaded object (defined beside the rest of the allowlist)
__all__ = ["InertObject", "InertParameterDict", "InertParameter", "InertModelCheckpoint",
           "StorageRef", "TensorRef", "TorchArchive", "open_torch_file", "load_pickle",
           "iter_tensors", "MAX_NESTING_DEPTH", "MAX_PICKLE_BYTES", "MAX_INFLATED_BYTES"]


@dataclass(frozen=True)
class StorageRef:
    """One storage of the file: `numel` elements of `dtype` under `key`.

    `element_offset` is non-zero only for legacy storage views into a root storage.
    """

    key: str
    dtype: torch.dtype
    numel: int
    element_offset: int = 0


@dataclass(frozen=True)
class TensorRef:
    """A tensor not yet read: its storage, view geometry and the archive that holds the bytes."""

    storage: StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    archive: TorchArchive = field(repr=False, compare=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize

    def load(self, *, copy: bool = False) -> torch.Tensor:
        """Read the tensor: memory-mapped (copy-on-write) when the bytes allow it, or, with copy=True,
        into memory of its own so that nothing of the file stays mapped (for one-at-a-time streaming)."""
        return self.archive._tensor(self, copy=copy)


def _view_extent(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Number of storage elements a strided view spans (0 for an empty tensor)."""
    if any(size == 0 for size in shape):
        return 0
    return 1 + sum((size - 1) * step for size, step in zip(shape, stride))


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _check_view(path: Path, shape: tuple[int, ...], stride: tuple[int, ...], offset: int,
                storage_numel: int, what: str) -> None:
    """A view must lie inside its storage and hold no more elements than the storage has."""
    if len(shape) != len(stride):
        raise CheckpointError(f"{path}: tensor size {shape} and stride {stride} differ in length")
    if offset + _view_extent(shape, stride) > storage_numel:
        raise CheckpointError(f"{path}: a tensor view {shape} lies outside its storage {what}of "
                              f"{storage_numel} elements")
    numel = _numel(shape)
    if numel > storage_numel:
        raise CheckpointError(f"{path}: a tensor of shape {shape} ({numel} elements) is rebuilt with "
                              f"strides {stride} from a storage {what}of {storage_numel} elements; "
                              "zero or overlapping strides are refused (a few stored bytes would "
                              "become gigabytes when copied)")


# -- nesting depth, before the real unpickler runs ------------------------------------------------
# Opcodes (pickletools names) by their effect on the stack of the model below.
_ATOMS = frozenset((
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NONE", "NEWTRUE",
    "NEWFALSE", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "FLOAT", "BINFLOAT",
    "GLOBAL", "PERSID", "NEXT_BUFFER", "EXT1", "EXT2", "EXT4",
))  # fmt: skip
_EMPTIES = frozenset(("EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_DICT", "EMPTY_SET"))
_FROM_MARK = frozenset(("TUPLE", "LIST", "DICT", "FROZENSET", "OBJ", "INST"))
_INTO_FROM_MARK = frozenset(("APPENDS", "SETITEMS", "ADDITEMS"))
_CALLS = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3,
          "BINPERSID": 1, "STACK_GLOBAL": 2}  # fmt: skip
_NOOPS = frozenset(("PROTO", "FRAME", "READONLY_BUFFER", "STOP"))


def _scan_pickle_depth(stream: io.BytesIO, max_depth: int, path: Path) -> None:
    """Replay one pickle's opcodes on a stack of nesting depths; refuse one deeper than max_depth.

    Each object the pickle builds gets a depth (1 + its deepest part; atoms are 0), shared through
    the memo like the object itself. Hashable objects (tuples, frozensets: what a dict key or set
    item can be) are immutable, so their depth is exact before the unpickler hashes them; a list
    or dict filled after it was put inside another is caught by the check of the loaded object.
    Leaves `stream` where it was.
    """
    start = stream.tell()
    depths = [0]  # depths[i]: nesting depth of the i-th object built; index 0 stands for atoms
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[int, int] = {}

    def build(parts: list[int]) -> int:
        depth = 1 + max((depths[p] for p in parts), default=0)
        if depth > max_depth:
            raise CheckpointError(f"{path}: the pickle nests containers deeper than {max_depth} "
                                  "levels (max_depth); refused before building them")
        depths.append(depth)
        return len(depths) - 1

    def fill(target: int, parts: list[int]) -> None:
        if target and parts:
            depths[target] = max(depths[target], depths[build(parts)])

    def pop_mark() -> list[int]:
        begin = marks.pop()
        items = stack[begin:]
        del stack[begin:]
        return items

    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            name = opcode.name
            if name in _ATOMS:
                stack.append(0)
            elif name in _EMPTIES:
                stack.append(build([]))
            elif name == "MARK":
                marks.append(len(stack))
            elif name in _FROM_MARK:
                stack.append(build(pop_mark()))
            elif name in _CALLS:
                count = _CALLS[name]
                parts = stack[-count:]
                if len(parts) != count:
                    raise IndexError("stack underflow")
                del stack[-count:]
                stack.append(0 if name == "STACK_GLOBAL" else build(parts))
            elif name in _INTO_FROM_MARK:
                items = pop_mark()
                fill(stack[-1], items)
            elif name in ("APPEND", "BUILD"):
                value = stack.pop()
                fill(stack[-1], [value])
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                fill(stack[-1], [key, value])
            elif name == "POP":
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    stack.pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name not in _NOOPS:
                raise ValueError(f"unknown opcode {name}")
    except TiengineError:
        raise
    except Exception as error:  # truncated or malformed: the unpickler would fail the same way
        raise CheckpointError(f"{path}: malformed or truncated pickle ({type(error).__name__}: "
                              f"{error})") from None
    finally:
        stream.seek(start)


def _check_loaded_depth(root: Any, max_depth: int, path: Path) -> None:
    """Nesting depth of a loaded object, walked without recursion (shared parts counted once)."""
    depth_of: dict[int, int] = {}
    pending: list[tuple[Any, bool]] = [(root, False)]
    while pending:
        obj, finished = pending.pop()
        parts = _parts(obj)
        if parts is None:
            continue
        if finished:
            depth = 1 + max((depth_of.get(id(p), 0) for p in parts), default=0)
            if depth > max_depth:
                raise CheckpointError(f"{path}: the pickle nests containers deeper than "
                                      f"{max_depth} levels (max_depth)")
            depth_of[id(obj)] = depth
        elif id(obj) not in depth_of:
            depth_of[id(obj)] = 0  # in progress: a cycle back to it adds nothing
            pending.append((obj, True))
            pending.extend((p, False) for p in parts if id(p) not in depth_of)


def _parts(obj: Any) -> list[Any] | None:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, InertObject):
        return [getattr(obj, "args", ()), getattr(obj, "kwargs", {}), obj.state]
    return None


class _AllowedCallable:
    """An allowlisted function as the pickle sees it: callable, but BUILD cannot change it.

    pickle's BUILD sets state on whatever object is on the stack (`__setstate__`, else the
    instance `__dict__` and setattr). On a plain function that would rewrite e.g. its
    `__defaults__` for every later file; this wrapper has no `__dict__` and refuses state.
    """

    __slots__ = ("function", "name", "path")

    def __init__(self, function: Any, name: str, path: Path):
        self.function, self.name, self.path = function, name, path

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"{self.path}: refused to set state on the global '{self.name}' "
                                "(pickle BUILD); only objects the file creates take state")


class _TensorTypeName(_AllowedCallable):
    """`torch.Tensor` from a pickle: only the type argument of _rebuild_from_type_v2."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(f"{self.path}: refused to call 'torch.Tensor' as a constructor "
                                f"(arguments {args!r:.80}); it may only name the type of a tensor")


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals only from the allowlist; storages through the owning archive."""

    def __init__(self, file: io.BufferedIOBase, archive: TorchArchive, *, materialize: bool):
        super().__init__(file, encoding="utf-8")
        self._archive = archive
        self._materialize = materialize
        self._roots: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # storages read so far
        self._rebuild_functions = (self._rebuild_tensor, self._rebuild_tensor_v2,
                                   self._rebuild_tensor_v3)  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles use Python 2 names ('__builtin__.set', 'commands.Popen'); map them
        # as pickle itself would, so the allowlist and messages see the real global
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self._allowed(module, name)
        if found is None:
            raise UnsafePickleError(
                f"{self._archive.path}: refused to load global '{module}.{name}' (only tensors, "
                "storages and plain containers are allowed); nothing from the file was executed"
            )
        if found is torch.Tensor:
            return _TensorTypeName(found, "torch.Tensor", self._archive.path)
        if isinstance(found, (types.FunctionType, types.MethodType)):
            # classes stay classes (NEWOBJ needs one) and refuse BUILD themselves: builtin and
            # numpy types are immutable, the inert stand-ins' __setstate__ needs an instance
            return _AllowedCallable(found, f"{module}.{name}", self._archive.path)
        return found

    def _allowed(self, module: str, name: str) -> Any:
        if module == "torch._utils":
            return {
                "_rebuild_tensor": self._rebuild_tensor,
                "_rebuild_tensor_v2": self._rebuild_tensor_v2,
                "_rebuild_tensor_v3": self._rebuild_tensor_v3,
                "_rebuild_parameter": rebuild_parameter,
                "_rebuild_parameter_with_state": rebuild_parameter_with_state,
            }.get(name)
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return self._rebuild_from_type_v2
        if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
            return StorageType(STORAGE_DTYPES[name])
        if module == "torch":
            if name in TORCH_DTYPE_NAMES and hasattr(torch, name):
                return getattr(torch, name)
            return {"Size": make_size, "device": make_device, "Tensor": torch.Tensor}.get(name)
        if (module, name) in INERT_CLASSES:
            return INERT_CLASSES[(module, name)]
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "builtins":
            return {"set": set, "frozenset": frozenset, "complex": complex,
                    "bytearray": make_bytearray}.get(name)  # fmt: skip
        if (module, name) == ("_codecs", "encode"):
            return codecs_encode
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return {"scalar": numpy_scalar, "_reconstruct": numpy_reconstruct}.get(name)
        if module == "numpy" and name in ("dtype", "ndarray"):
            return numpy_dtype if name == "dtype" else numpy_ndarray_class()
        return None

    def persistent_load(self, pid: Any) -> Any:
        ref = self._archive._storage_from_pid(pid)
        if not self._materialize or not isinstance(ref, StorageRef):
            return ref
        root = self._roots.get((ref.key, ref.dtype))
        if root is None:
            root = self._archive._root_tensor(ref.key, ref.dtype, copy=True)
            self._roots[(ref.key, ref.dtype)] = root
        return root[ref.element_offset : ref.element_offset + ref.numel]

    # -- tensor rebuild functions (same arguments as torch._utils', but no code from the file)
    def _rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any) -> Any:
        return self._rebuild_tensor_v2(storage, storage_offset, size, stride, False, None)

    def _rebuild_tensor_v2(self, storage: Any, storage_offset: Any, size: Any, stride: Any,
                           requires_grad: Any, backward_hooks: Any, metadata: Any = None) -> Any:
        if isinstance(storage, torch.Tensor):  # materialized storage (1-D, its dtype)
            shape, strides = int_tuple(size, "size"), int_tuple(stride, "stride")
            offset = non_negative_int(storage_offset, "storage offset")
            _check_view(self._archive.path, shape, strides, offset, storage.numel(), "")
            return storage.as_strided(shape, strides, storage.storage_offset() + offset)
        if not isinstance(storage, StorageRef):
            raise CheckpointError(f"{self._archive.path}: tensor rebuilt from a "
                                  f"{type(storage).__name__}, expected a storage")
        return self._archive._tensor_ref(storage, storage_offset, size, stride)

    def _rebuild_tensor_v3(self, storage: Any, storage_offset: Any, size: Any, stride: Any,
                           requires_grad: Any, backward_hooks: Any, dtype: Any,
                           metadata: Any = None) -> Any:
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self._archive.path}: _rebuild_tensor_v3 without a dtype")
        if isinstance(storage, torch.Tensor):
            storage = storage.view(torch.uint8).view(dtype)
        elif isinstance(storage, StorageRef):
            storage = self._archive._retype(storage, dtype)
        return self._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, None)

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
        function = func.function if isinstance(func, _AllowedCallable) else func
        if function not in self._rebuild_functions or not (
                isinstance(new_type, _TensorTypeName) or new_type is InertParameter):
            raise UnsafePickleError(f"{self._archive.path}: refused _rebuild_from_type_v2 of "
                                    f"{getattr(new_type, '__name__', new_type)!r}")
        if not isinstance(args, tuple):
            raise CheckpointError(f"{self._archive.path}: _rebuild_from_type_v2 arguments are a "
                                  f"{type(args).__name__}, expected a tuple")
        return function(*args)


class TorchArchive:
    """An opened PyTorch file whose tensors are read one at a time.

    `root` is the unpickled object with TensorRef leaves; `tensors()` walks it. Tensors from
    `TensorRef.load()` share memory with a copy-on-write map of the file when stored
    uncompressed and aligned, otherwise they are read into their own memory. The keyword
    options are the limits of the module docstring.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_depth: int = MAX_NESTING_DEPTH,
                 max_pickle_bytes: int = MAX_PICKLE_BYTES,
                 max_inflated_bytes: int = MAX_INFLATED_BYTES,
                 max_storage_bytes: int | None = None):
        self.path = Path(path)
        self.max_depth = max_depth
        self.max_pickle_bytes = max_pickle_bytes
        self.max_inflated_bytes = max_inflated_bytes
        self.max_storage_bytes = max_storage_bytes
        self._storage_bytes = 0  # declared bytes of the storages met so far
        self._storages: dict[str, StorageRef] = {}
        self._mapped: mmap.mmap | None = None
        self._zip: zipfile.ZipFile | None = None
        self._zip_prefix = ""
        self._big_endian = False
        self._legacy_offsets: dict[str, int] = {}  # storage key -> byte offset of its data
        self._legacy_main_pickle = b""  # the object pickle of a legacy file
        self.format = self._open()
        try:
            self.root = self._unpickle(materialize=False)
        except BaseException:
            self.close()
            raise

    # -- opening
    def _open(self) -> str:
        try:
            with open(self.path, "rb") as file:
                head = file.read(4)
        except OSError as error:
            raise CheckpointError(f"{self.path}: cannot read ({error.strerror})") from None
        if not head:
            raise CheckpointError(f"{self.path}: file is empty (0 bytes)")
        if head == b"PK\x03\x04":
            self._open_zip()
            return "zip"
        if head[:1] == b"\x80":
            return "legacy"
        raise CheckpointError(f"{self.path}: not a PyTorch file (starts with {head!r})")

    def _open_zip(self) -> None:
        try:
            self._zip = zipfile.ZipFile(self.path)
            names = self._zip.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            raise CheckpointError(f"{self.path}: corrupt or truncated PyTorch zip archive "
                                  f"({error})") from None
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{self.path}: zip archive without exactly one '<dir>/data.pkl'"
                                  f" (entries: {', '.join(names[:8])})")
        self._zip_prefix = pickles[0][: -len("data.pkl")]
        if self._zip_prefix + "byteorder" in names:
            order = self._read_member(self._zip_prefix + "byteorder", 16, "byteorder record")
            if order not in (b"little", b"big"):
                raise CheckpointError(f"{self.path}: unknown byteorder record {order!r:.20}")
            self._big_endian = order == b"big"

    def _read_member(self, name: str, limit: int, what: str) -> bytes:
        """A zip entry's bytes, refused when it declares or inflates to more than `limit`."""
        assert self._zip is not None
        info = self._zip.getinfo(name)
        if info.file_size > limit:
            raise CheckpointError(f"{self.path}: {what} {name!r} declares {info.file_size} bytes "
                                  f"uncompressed, more than the limit of {limit} ({_limit_hint(what)})")
        with self._zip.open(info) as entry:
            data = entry.read(limit + 1)  # a lying header cannot get past the cap
        if len(data) > limit:
            raise CheckpointError(f"{self.path}: {what} {name!r} inflates to more than the limit "
                                  f"of {limit} bytes ({_limit_hint(what)})")
        return data

    def _unpickle(self, *, materialize: bool) -> Any:
        try:
            if self.format == "zip":
                data = self._read_member(self._zip_prefix + "data.pkl", self.max_pickle_bytes,
                                         "pickle")
                root = self._load(io.BytesIO(data), materialize=materialize)
            else:
                root = self._unpickle_legacy(materialize=materialize)
            _check_loaded_depth(root, self.max_depth, self.path)
            return root
        except TiengineError:
            raise
        except Exception as error:  # a truncated or malformed stream; nothing was executed
            raise CheckpointError(f"{self.path}: malformed PyTorch file ({type(error).__name__}:"
                                  f" {error})") from None

    def _load(self, stream: io.BytesIO, *, materialize: bool) -> Any:
        """One pickle from `stream`: its nesting checked first, then unpickled."""
        _scan_pickle_depth(stream, self.max_depth, self.path)
        return _RestrictedUnpickler(stream, self, materialize=materialize).load()

    def _unpickle_legacy(self, *, materialize: bool) -> Any:
        if materialize:  # second pass: storages located by the first
            return self._load(io.BytesIO(self._legacy_main_pickle), materialize=True)
        with open(self.path, "rb") as file:
            # the pickles come first; storages follow the last one, outside this bounded window
            window = io.BytesIO(file.read(self.max_pickle_bytes))
            try:
                if self._load(window, materialize=False) != LEGACY_MAGIC_NUMBER:
                    raise CheckpointError(f"{self.path}: not a PyTorch file (pickle without magic)")
                if self._load(window, materialize=False) != LEGACY_PROTOCOL_VERSION:
                    raise CheckpointError(f"{self.path}: unsupported legacy protocol version")
                sys_info = self._load(window, materialize=False)
                if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
                    raise CheckpointError(f"{self.path}: big-endian legacy files are not supported")
                main_start = window.tell()
                root = self._load(window, materialize=False)
                self._legacy_main_pickle = window.getvalue()[main_start : window.tell()]
                keys = self._load(window, materialize=False)
            except CheckpointError as error:
                if len(window.getvalue()) == self.max_pickle_bytes:
                    raise CheckpointError(f"{self.path}: the pickles of this legacy file do not end "
                                          f"within the limit of {self.max_pickle_bytes} bytes "
                                          f"(max_pickle_bytes) or are malformed ({error})") from None
                raise
            file.seek(window.tell())
            self._locate_legacy_storages(file, keys)
            return root

    def _locate_legacy_storages(self, file: io.BufferedReader, keys: Any) -> None:
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CheckpointError(f"{self.path}: legacy storage key list is malformed")
        offset = file.tell()
        size = os.fstat(file.fileno()).st_size
        for key in keys:
            ref = self._storages.get(key)
            if ref is None:
                raise CheckpointError(f"{self.path}: storage {key!r} listed but never used")
            file.seek(offset)
            (count,) = struct.unpack("<q", file.read(8).rjust(8, b"\0"))
            if count != ref.numel or offset + 8 + count * ref.dtype.itemsize > size:
                raise CheckpointError(f"{self.path}: storage {key!r} is truncated or its size "
                                      f"({count}) differs from the pickle's ({ref.numel})")
            self._legacy_offsets[key] = offset + 8
            offset += 8 + count * ref.dtype.itemsize

    # -- storages
    def _storage_from_pid(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] in ("module", b"module"):
            # legacy files record each nn.Module class with its source; the class itself was
            # resolved (or refused) by find_class, the source text is ignored
            if isinstance(pid[1], type) and issubclass(pid[1], InertObject):
                return pid[1]
            raise CheckpointError(f"{self.path}: unexpected module record {pid[1]!r:.80}")
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ("storage",
                                                                                  b"storage"):
            raise CheckpointError(f"{self.path}: unexpected persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, StorageType) or not isinstance(key, str):
            raise CheckpointError(f"{self.path}: storage {key!r:.40} has no storage type")
        numel = non_negative_int(numel, f"storage {key!r} size")
        view = pid[5] if len(pid) == 6 else None
        ref = self._storages.get(key)
        if ref is None:
            self._storage_bytes += numel * storage_type.dtype.itemsize
            if self.max_storage_bytes is not None and self._storage_bytes > self.max_storage_bytes:
                raise CheckpointError(f"{self.path}: its storages declare more than "
                                      f"{self.max_storage_bytes} bytes of tensor data "
                                      f"(max_storage_bytes); refused before reading any")
            ref = StorageRef(key, storage_type.dtype, numel)
            self._storages[key] = ref
        elif ref.dtype != storage_type.dtype:
            raise CheckpointError(f"{self.path}: storage {key!r} used as two dtypes")
        if view is not None:  # legacy view: (view_key, element offset, element count)
            _view_key, view_offset, view_numel = view
            view_offset = non_negative_int(view_offset, "storage view offset")
            view_numel = non_negative_int(view_numel, "storage view size")
            if view_offset + view_numel > ref.numel:
                raise CheckpointError(f"{self.path}: storage view outside storage {key!r}")
            return StorageRef(key, ref.dtype, view_numel, view_offset)
        return ref

    def _retype(self, ref: StorageRef, dtype: torch.dtype) -> StorageRef:
        nbytes = ref.numel * ref.dtype.itemsize
        if nbytes % dtype.itemsize or ref.element_offset:
            raise CheckpointError(f"{self.path}: storage {ref.key!r} cannot hold {dtype}")
        return StorageRef(ref.key, dtype, nbytes // dtype.itemsize)

    def _tensor_ref(self, storage: StorageRef, storage_offset: Any, size: Any,
                    stride: Any) -> TensorRef:
        shape, strides = int_tuple(size, "size"), int_tuple(stride, "stride")
        offset = non_negative_int(storage_offset, "storage offset")
        _check_view(self.path, shape, strides, offset, storage.numel, f"{storage.key!r} ")
        return TensorRef(storage, offset + storage.element_offset, shape, strides, self)

    def _root_tensor(self, key: str, dtype: torch.dtype, *, copy: bool,
                     span: tuple[int, int] | None = None) -> torch.Tensor:
        """Storage `key` as a 1-D tensor of `dtype`: whole (storage offset 0), or with copy=True and
        span=(first element, element count) just those elements, read into memory of their own."""
        root = self._storages[key]
        nbytes = root.numel * root.dtype.itemsize
        offset, stored = self._data_location(key, nbytes)
        if stored and not copy and nbytes and offset % dtype.itemsize == 0:
            data = torch.frombuffer(self._map(), dtype=torch.uint8, count=nbytes, offset=offset)
        else:
            first, count = span if span is not None else (0, nbytes // dtype.itemsize)
            begin, end = first * dtype.itemsize, (first + count) * dtype.itemsize  # bytes of the storage
            if stored:  # uncompressed bytes are read from their position
                data = torch.empty(end - begin, dtype=torch.uint8)
                if data.numel():
                    with open(self.path, "rb") as file:
                        file.seek(offset + begin)
                        _read_into(file, data.numpy(), f"{self.path}: storage {key!r}")
            else:  # a compressed entry is inflated whole, then the span keeps memory of its own
                data = torch.empty(nbytes, dtype=torch.uint8)
                if data.numel():
                    assert self._zip is not None
                    with self._zip.open(self._zip_prefix + "data/" + key) as entry:
                        _read_into(entry, data.numpy(), f"{self.path}: storage {key!r}")
                if (begin, end) != (0, nbytes):
                    data = data[begin:end].clone()
            nbytes = data.numel()
        if self._big_endian and dtype.itemsize > 1:
            # (numel, itemsize) bytes, each element's bytes reversed -> native little-endian
            data = data.view(-1, dtype.itemsize).flip(-1).reshape(-1)
        return data.view(dtype) if nbytes else torch.empty(0, dtype=dtype)

    def _data_location(self, key: str, nbytes: int) -> tuple[int, bool]:
        """(byte offset in the file, stored uncompressed) of a storage's bytes."""
        if self.format == "legacy":
            if key not in self._legacy_offsets:
                raise CheckpointError(f"{self.path}: storage {key!r} has no data")
            return self._legacy_offsets[key], True
        assert self._zip is not None
        name = self._zip_prefix + "data/" + key
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self.path}: storage entry {name!r} is missing") from None
        if info.file_size < nbytes:
            raise CheckpointError(f"{self.path}: storage {name!r} holds {info.file_size} bytes, "
                                  f"the pickle needs {nbytes}")
        if info.compress_type != zipfile.ZIP_STORED:
            if nbytes > self.max_inflated_bytes:
                raise CheckpointError(f"{self.path}: compressed storage {name!r} would inflate to "
                                      f"{nbytes} bytes, more than the limit of "
                                      f"{self.max_inflated_bytes} (max_inflated_bytes)")
            return 0, False
        with open(self.path, "rb") as file:
            file.seek(info.header_offset)
            local = file.read(30)
            file_size = os.fstat(file.fileno()).st_size
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: bad local header for {name!r}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        offset = info.header_offset + 30 + name_len + extra_len
        if offset + nbytes > file_size:
            raise CheckpointError(f"{self.path}: storage {name!r} needs {nbytes} bytes at offset "
                                  f"{offset} but the file has {file_size} (truncated)")
        return offset, True

    def _map(self) -> mmap.mmap:
        if self._mapped is None:
            with open(self.path, "rb") as file:
                self._mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mapped

    def _tensor(self, ref: TensorRef, *, copy: bool) -> torch.Tensor:
        if not copy:
            root = self._root_tensor(ref.storage.key, ref.dtype, copy=False)
            return root.as_strided(ref.shape, ref.stride, ref.storage_offset)
        # Only the elements the view spans: a tensor that shares one big storage with others (a whole
        # model saved as views of one flat buffer) costs its own bytes, not the storage's.
        extent = _view_extent(ref.shape, ref.stride)
        data = self._root_tensor(ref.storage.key, ref.dtype, copy=True, span=(ref.storage_offset, extent))
        return data.as_strided(ref.shape, ref.stride, 0)

    # -- public
    def tensors(self) -> Iterator[tuple[str, TensorRef]]:
        """(dotted key, TensorRef) for every tensor under `root`, in pickle order."""
        yield from _walk_tensors(self.root, "", set())

    def materialize(self) -> Any:
        """The whole object with every tensor read into its own memory."""
        return self._unpickle(materialize=True)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        self._mapped = None  # the map closes once no tensor uses it

    def __enter__(self) -> TorchArchive:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _limit_hint(what: str) -> str:
    return "max_pickle_bytes" if what == "pickle" else "not a PyTorch file"


def _read_into(file: Any, target: Any, what: str) -> None:
    view = memoryview(target).cast("B")
    done = 0
    while done < len(view):
        count = file.readinto(view[done:])
        if not count:
            raise CheckpointError(f"{what} is truncated ({done} of {len(view)} bytes)")
        done += count


def _walk_tensors(obj: Any, prefix: str, seen: set[int]) -> Iterator[tuple[str, TensorRef]]:
    if isinstance(obj, TensorRef):
        yield prefix, obj
        return
    if id(obj) in seen:
        return
    items: Any
    if isinstance(obj, dict):
        seen.add(id(obj))
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        seen.add(id(obj))
        items = enumerate(obj)
    elif isinstance(obj, InertObject):
        seen.add(id(obj))
        items = [("", obj.state)]
    else:
        return
    for key, value in items:
        name = f"{prefix}.{key}" if prefix and key != "" else (prefix or str(key))
        yield from _walk_tensors(value, name, seen)


def open_torch_file(path: str | os.PathLike[str], **limits: Any) -> TorchArchive:
    """Open a .pt/.bin/.ckpt for reading tensors one at a time (see TorchArchive; `limits` are
    its keyword options max_depth, max_pickle_bytes, max_inflated_bytes, max_storage_bytes)."""
    return TorchArchive(path, **limits)


def load_pickle(path: str | os.PathLike[str], *, lazy: bool = False, **limits: Any) -> Any:
    """Load a PyTorch file without executing code.

    lazy=False: tensors are torch tensors in their own memory (the file is closed after).
    lazy=True: tensors are TensorRef placeholders; call `.load()` on each when needed.
    `limits`: TorchArchive's keyword options (max_depth, max_pickle_bytes, ...).
    """
    archive = TorchArchive(path, **limits)
    if lazy:
        return archive.root
    try:
        return archive.materialize()
    finally:
        archive.close()


def iter_tensors(path: str | os.PathLike[str], **limits: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted key, tensor) pairs read one at a time, e.g. "state_dict.model.x.weight".

    Only one tensor is made resident at a time (memory-mapped where possible); a caller
    that drops each tensor after use keeps memory bounded on multi-GB checkpoints.
    """
    with TorchArchive(path, **limits) as archive:
        for key, ref in archive.tensors():
            yield key, ref.load()
