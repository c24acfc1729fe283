"""What tiengine.io.safe_pickle lets a pickle name: storage dtypes, inert stand-ins, safe constructors.

Every callable here checks its arguments and builds only plain data (tensors' sizes, devices,
bytes, numpy scalars and arrays of numeric dtypes); none of them runs code from the file.
Names of the storage classes and rebuild arguments come from torch/storage.py and
torch/_utils.py; numpy's pickle helpers from numpy/core/multiarray.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from tiengine.errors import CheckpointError, UnsafePickleError

# torch.<Name>Storage -> element dtype (names from torch/storage.py)
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}

# dtypes that may appear as globals, e.g. `torch.float16` passed to _rebuild_tensor_v3
TORCH_DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "uint16", "uint32", "uint64", "bool", "complex64", "complex128", "float8_e4m3fn",
    "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
)  # fmt: skip

# numpy dtype strings accepted for scalars and arrays: bool, ints, floats, complex
NUMPY_DTYPE_PATTERN = re.compile(r"^[<>|=]?(\?|b1|[iu][1248]|f[248]|c(8|16)|bool)$")


class InertObject:
    """Stand-in for an allowed class: records constructor arguments and pickled state only.

    `qualified_name` is the class the file asked for; `state` is what pickle's BUILD gave
    (for an nn.Module, its `__dict__`, whose `_parameters` holds the tensors).
    """

    qualified_name = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"InertObject({self.qualified_name})"


class InertParameterDict(InertObject):
    qualified_name = "torch.nn.modules.container.ParameterDict"


class InertParameter(InertObject):
    qualified_name = "torch.nn.parameter.Parameter"


class InertModelCheckpoint(InertObject):
    qualified_name = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


INERT_CLASSES: dict[tuple[str, str], type[InertObject]] = {
    ("torch.nn.modules.container", "ParameterDict"): InertParameterDict,
    ("torch.nn.parameter", "Parameter"): InertParameter,
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): InertModelCheckpoint,
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"): InertModelCheckpoint,
}


@dataclass(frozen=True)
class StorageType:
    """What a pickled `torch.FloatStorage` (etc.) resolves to: only its element dtype."""

    dtype: torch.dtype

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"refused to set state on storage type {self.dtype} (pickle BUILD)")


def rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Any:
    return data


def rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any,
                                  state: Any) -> Any:
    return data


def int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise CheckpointError(f"tensor {what} must be a tuple of ints, found {value!r:.80}")
    if any(v < 0 for v in value):
        raise CheckpointError(f"tensor {what} has a negative entry: {tuple(value)}")
    return tuple(value)


def non_negative_int(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise CheckpointError(f"{what} must be a non-negative int, found {value!r:.80}")
    return value


def make_size(*args: Any) -> torch.Size:
    dims = args[0] if args else ()
    return torch.Size(int_tuple(dims, "torch.Size"))


def make_device(*args: Any) -> torch.device:
    if not all(isinstance(a, (str, int)) for a in args):
        raise CheckpointError(f"torch.device arguments must be str/int, found {args!r:.80}")
    return torch.device(*args)


def make_bytearray(*args: Any) -> bytearray:
    if len(args) == 1 and isinstance(args[0], (bytes, list)):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return bytearray(args[0], args[1])
    if not args:
        return bytearray()
    raise CheckpointError(f"bytearray from unexpected arguments {args!r:.80}")


def codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """How protocol-2 pickles spell bytes: `_codecs.encode('\\x00...', 'latin1')`."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise CheckpointError(f"_codecs.encode with unexpected arguments ({encoding!r})")
    return text.encode(encoding)


def numpy_dtype(spec: Any, align: Any = False, copy: Any = False) -> Any:
    import numpy

    if not isinstance(spec, str) or not NUMPY_DTYPE_PATTERN.match(spec):
        raise UnsafePickleError(f"refused numpy dtype {spec!r:.40} (only bool/int/float/complex)")
    return numpy.dtype(spec, copy=True)  # a copy: numpy's BUILD of it must not touch numpy's own


def numpy_ndarray_class() -> type:
    import numpy

    return numpy.ndarray


def numpy_scalar(dtype: Any, data: Any = None) -> Any:
    import numpy

    if not isinstance(dtype, numpy.dtype) or dtype.kind not in "biufc" or dtype.fields:
        raise UnsafePickleError(f"refused numpy scalar of dtype {dtype!r:.40}")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise CheckpointError(f"numpy scalar of {dtype} with {len(data or b'')} bytes")
    return numpy.frombuffer(data, dtype=dtype)[0].copy()


def numpy_reconstruct(cls: Any, shape: Any, typecode: Any) -> Any:
    """numpy's array pickle: an empty array that BUILD then fills (numeric dtypes only)."""
    import numpy

    if cls is not numpy.ndarray:
        raise UnsafePickleError(f"refused numpy _reconstruct of {cls!r:.80}")
    return numpy.ndarray.__new__(numpy.ndarray, (0,), numpy.uint8)
