"""Pieces shared by the kernel modules: input errors, interpreter detection, head-dim splitting, tile I/O.

The head-dim split: `tl.dot` needs every tile dimension to be a power of two of at least 16, and SD's
head dims are 40, 64, 80 and 160. Padding each to the next power of two does 64/40 = 1.6x, 128/80 = 1.6x
and 256/160 = 1.6x the dot work (and loads). Instead a head dim is cut into a power-of-two part A plus a
power-of-two remainder part B (at least 16 wide), and every dot over the head dim becomes two dots:
40 = 32 + 16 (B half masked; 1.2x work), 80 = 64 + 16 (exact), 160 = 128 + 32 (exact), 64 = 64 (no B).
Where the two parts would be no smaller than the padded power of two (e.g. 112 -> 64 + 64), one padded
part is used instead, since one wide dot is faster than two narrow ones.
The cost of splitting: twice the dot instructions and loads per tile, and narrow (16- or 32-wide) part-B
tiles use the tensor cores less efficiently than one wide tile; what it saves is padded work, 0.4x the
useful work at head dim 40 (1.6x -> 1.2x) and 0.6x at 80 and 160 (1.6x -> 1.0x). Which side wins is
measured by benchmarks/attention.py on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from tiengine.errors import TiengineError

MIN_DOT_DIM = 16  # smallest tile side tl.dot accepts


class KernelInputError(TiengineError, ValueError):
    """Tensors handed to a Triton launcher that the kernel does not handle (shape, dtype, device, layout)."""


@dataclass(frozen=True)
class HeadDimSplit:
    """A head dim cut into tile widths: part A (`part_a` wide) then part B (`part_b` wide, 0 if absent)."""

    head_dim: int
    part_a: int
    part_b: int

    @property
    def padded(self) -> int:
        """Columns the dots actually compute (head_dim plus masked padding)."""
        return self.part_a + self.part_b

    @property
    def pad_a(self) -> bool:
        """Part A is wider than the head dim (head dims below 16): its loads need a column mask."""
        return self.part_a > self.head_dim

    @property
    def pad_b(self) -> bool:
        """Part B reaches past the head dim (e.g. 40 = 32 + 16 masked to 8): its loads need a column mask."""
        return self.part_b > 0 and self.padded > self.head_dim

    @property
    def part_b_tile(self) -> int:
        """Width of the part-B tiles the kernels allocate; a 16-wide unused tile when there is no part B."""
        return self.part_b if self.part_b > 0 else MIN_DOT_DIM


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def split_head_dim(head_dim: int) -> HeadDimSplit:
    """Cut `head_dim` into power-of-two tile widths (see the module docstring): 40 -> 32 + 16, 80 -> 64 + 16."""
    if head_dim < 1:
        raise KernelInputError(f"head_dim must be at least 1, got {head_dim}")
    padded_single = max(MIN_DOT_DIM, next_power_of_two(head_dim))
    part_a = max(MIN_DOT_DIM, 1 << (head_dim.bit_length() - 1))  # largest power of two <= head_dim
    remainder = head_dim - part_a
    if remainder <= 0:
        return HeadDimSplit(head_dim, part_a, 0)
    part_b = max(MIN_DOT_DIM, next_power_of_two(remainder))
    if part_a + part_b >= padded_single:
        return HeadDimSplit(head_dim, padded_single, 0)
    return HeadDimSplit(head_dim, part_a, part_b)


def element_alignment(*tensors: "torch.Tensor", cap: int = 16) -> int:
    """Largest power of two (at most `cap`) dividing every tensor's element offset and every stride but
    the last: the row and (batch, head) offsets the kernels compute are multiples of it, which they tell
    the compiler (`tl.multiple_of`) so that loads along the unit-stride last axis vectorise and pipeline
    (Triton itself only knows which strides are multiples of 16; a (B, N, H, 40) layout has none)."""
    import math

    common = 0
    for t in tensors:
        common = math.gcd(common, t.data_ptr() // t.element_size(), *t.stride()[:-1])
    common = common or cap  # every offset zero (one-row tensors)
    return min(cap, common & -common)


def interpreter_active() -> bool:
    """True when TRITON_INTERPRET is set: kernels then run in Triton's CPU interpreter. Set it before the
    kernel modules are imported: `triton.jit` reads it when a kernel is defined."""
    return bool(triton.knobs.runtime.interpret)


def device_error(name: str, device_type: str) -> str | None:
    """Why a tensor on `device_type` cannot go to a Triton launcher, or None if it can."""
    if device_type == "cuda":
        return None
    if device_type == "cpu" and interpreter_active():
        return None
    return (
        f"{name} is on {device_type}; the Triton kernels need CUDA tensors "
        "(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)"
    )


def cuda_capability_error(device_index: int | None, needs: tuple[int, int], what: str) -> str | None:
    """Why the CUDA device cannot run `what`, or None when its compute capability is at least `needs`."""
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) < needs:
        return f"{what} needs compute capability {needs[0]}.{needs[1]} or newer, the device has {major}.{minor}"
    return None


@triton.jit
def row_offsets(start, rows, stride_row, ALIGN: tl.constexpr):
    """Element offsets start + rows * stride_row (int64), declared multiples of ALIGN (element_alignment)."""
    return tl.multiple_of(start + rows.to(tl.int64) * stride_row, ALIGN)


@triton.jit
def load_tile(base, offsets, rows, cols, stride_col, n_rows, n_cols,
              MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load the (len(rows), len(cols)) tile at base + offsets[row] + col * stride_col; masked
    entries (rows >= n_rows, cols >= n_cols) read as 0."""
    ptrs = base + offsets[:, None] + cols[None, :] * stride_col
    if MASK_ROWS and MASK_COLS:
        tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif MASK_ROWS:
        tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif MASK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def store_tile(base, tile, offsets, rows, cols, stride_col, n_rows, n_cols, MASK_COLS: tl.constexpr):
    """Store `tile` at base + offsets[row] + col * stride_col, skipping rows >= n_rows (and columns
    >= n_cols if MASK_COLS)."""
    ptrs = base + offsets[:, None] + cols[None, :] * stride_col
    tile = tile.to(base.dtype.element_ty)
    if MASK_COLS:
        tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
    else:
        tl.store(ptrs, tile, mask=rows[:, None] < n_rows)
