"""Counter-based noise that is bit-identical on the GPU, the Triton interpreter and torch.

Every noise value is a pure function of ``(seed, d)``, where ``d`` is the global (flat,
row-major) index of an element in the *output* tensor. So the noise does not depend on
block sizes, grids or which backend ran, and any slice of a tensor can be regenerated.

Why an integer hash and uniform integers, and no Box-Muller:
    ``log``/``cos`` differ in the last bit between libdevice, numpy and the CPU's libm,
    and Triton's ``/`` is approximate on NVIDIA GPUs. Everything here is integer
    arithmetic (exact everywhere), one int -> float32 conversion (exact: the integers are
    small) and one correctly rounded division (``tl.math.div_rn``). No float multiply is
    followed by an add, so FMA contraction cannot change a result either.

The draw for element ``d``: one 32-bit hash serves four consecutive elements, a byte each::

    q, k   = d div 4, d mod 4
    lo, hi = q mod 2**32, q div 2**32
    key    = mix32(hi ^ k1) ^ k0                  # k0, k1 derived from the seed on the host
    h      = mix32(lo * 0x9E3779B9 + key)         # uint32 arithmetic (wraps)
    u      = (h >> 8k) & 0xFF                     # byte k of h
    c      = 2u - 255                             # odd, uniform on [-255, 255]

``c`` has mean exactly 0 and std ``STD_C`` = sqrt((256**2 - 1) / 3) ~= 147.8. 256 levels
are plenty for noise whose only job is to make clones unequal: the step between levels is
std / 74. ``mix32`` is the "lowbias32" finalizer (Chris Wellons' hash-prospector), a
bijection of uint32 with good avalanche, so its four bytes are independent draws;
``lo * 0x9E3779B9`` (a Weyl sequence) is a bijection too.

NOTE: this layout is what makes the CPU path cheap. Over a block of rows, ``lo * 0x9E3779B9
+ key`` is a precomputed pattern plus one constant (the high word only changes every 2**34
elements), the hash costs 9 uint32 operations per four elements, and the bytes come out
of a little-endian uint32 array as a free uint8 view. The first version hashed twice per
element with 24-bit draws; growing a 1B-parameter model was 8x slower than writing it.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from .backend import HAS_TRITON

MASK32 = 0xFFFFFFFF
WEYL = 0x9E3779B9
STD_C = math.sqrt((256**2 - 1) / 3.0)
_MIX_A = 0x7FEB352D
_MIX_B = 0x846CA68B


def mix32_int(x: int) -> int:
    """The lowbias32 finalizer on a Python int (host side, for the seed keys)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _MIX_A) & MASK32
    x ^= x >> 15
    x = (x * _MIX_B) & MASK32
    x ^= x >> 16
    return x


def seed_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys from a non-negative seed of up to 64 bits."""
    k0 = mix32_int((seed & MASK32) ^ 0x9E3779B9)
    k1 = mix32_int(((seed >> 32) & MASK32) ^ k0 ^ 0x85EBCA6B)
    return k0, k1


def _mix32_torch(x: torch.Tensor) -> torch.Tensor:
    # uint32 arithmetic emulated in int64: a product of two values < 2**32 wraps in int64,
    # but its low 32 bits (all we keep) are still right.
    x = x ^ (x >> 16)
    x = (x * _MIX_A) & MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX_B) & MASK32
    return x ^ (x >> 16)


def hi_key(hi: int, k0: int, k1: int) -> int:
    """The key that stands for the high word ``hi`` of a hash index (host side)."""
    return mix32_int(hi ^ k1) ^ k0


def uniform_int_torch(d: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """The centered draw ``c`` for global element indices ``d`` (int64 tensor): the spec."""
    q = d >> 2
    key = _mix32_torch((q >> 32) ^ k1) ^ k0
    h = _mix32_torch(((q & MASK32) * WEYL + key) & MASK32)
    u = (h >> (8 * (d & 3))) & 0xFF
    return 2 * u - 255


def weyl_pattern(rows: int, cols: int, row_stride: int) -> np.ndarray:
    """``(r * row_stride + j) * WEYL mod 2**32`` for r < rows, j < cols: uint32 [rows, cols].

    Reused across the chunks of a tensor: the Weyl term of hash indices ``q0 + offset``
    is ``pattern + q0 * WEYL`` (mod 2**32).
    """
    offsets = np.arange(rows, dtype=np.uint64)[:, None] * np.uint64(row_stride) + np.arange(cols, dtype=np.uint64)
    return ((offsets * np.uint64(WEYL)) & np.uint64(MASK32)).astype(np.uint32)


def _mix32_np(x: np.ndarray, tmp: np.ndarray) -> None:
    """lowbias32 on a uint32 array, in place (numpy's uint32 multiply wraps)."""
    np.right_shift(x, 16, out=tmp)
    x ^= tmp
    x *= _MIX_A_NP
    np.right_shift(x, 15, out=tmp)
    x ^= tmp
    x *= _MIX_B_NP
    np.right_shift(x, 16, out=tmp)
    x ^= tmp


_MIX_A_NP = np.uint32(_MIX_A)
_MIX_B_NP = np.uint32(_MIX_B)
_LITTLE_ENDIAN = sys.byteorder == "little"


def uniform_bytes_grid_np(
    start: int, rows: int, cols: int, row_stride: int, k0: int, k1: int,
    pattern: np.ndarray | None = None, out: np.ndarray | None = None, tmp: np.ndarray | None = None,
) -> np.ndarray:
    """The bytes ``u`` (``c = 2u - 255``) of elements ``start + r * row_stride + j``.

    Args:
        start, rows, cols, row_stride: the grid of element indices, r < rows, j < cols.
        pattern: ``weyl_pattern(>= rows, cols // 4, row_stride // 4)``, reused across calls.
        out, tmp: uint32 [>= rows, cols // 4] workspaces (allocated when None).

    Returns:
        uint8 [rows, cols], bit-identical to ``(uniform_int_torch(d) + 255) // 2``.

    NOTE: numpy, not torch: its native uint32 shifts and in-place ufuncs measured about 4x
    faster per element-operation than torch's int32 ops on 64K-element chunks (2-core CPU),
    and its ufuncs release the GIL, so threads can run chunks side by side. A grid that is
    not 4-aligned (or a big-endian host) takes the spec's slow path.
    """
    q0, stride4, cols4 = start >> 2, row_stride >> 2, cols >> 2
    aligned = _LITTLE_ENDIAN and start % 4 == 0 and row_stride % 4 == 0 and cols % 4 == 0
    if not aligned or q0 >> 32 != (q0 + (rows - 1) * stride4 + cols4 - 1) >> 32:
        d = start + torch.arange(rows, dtype=torch.int64)[:, None] * row_stride + torch.arange(cols)
        return ((uniform_int_torch(d, k0, k1) + 255) >> 1).to(torch.uint8).numpy()
    if pattern is None:
        pattern = weyl_pattern(rows, cols4, stride4)
    x = np.empty((rows, cols4), np.uint32) if out is None else out[:rows]
    base = ((q0 & MASK32) * WEYL + hi_key(q0 >> 32, k0, k1)) & MASK32
    np.add(pattern[:rows], np.uint32(base), out=x)
    _mix32_np(x, np.empty_like(x) if tmp is None else tmp[:rows])
    return x.view(np.uint8)


def noise_divisor(noise_std: float, in_repeat: int, zero_sum: bool) -> float:
    """The float32 number the integer draw is divided by to give noise of std ``noise_std``.

    ``independent``: noise = c / (STD_C / std), a draw per element (max |noise| is
    255 / 147.8 = 1.73 std).
    ``zero_sum`` over 2 blocks: the pair gets +c and -c, with c drawn at the index of block
    0, so noise = +-c / (STD_C / std) and the two cancel exactly, in float too.
    ``zero_sum`` over s > 2 blocks: I_b = s*c_b - sum_k c_k = s*(c_b - mean(c)); its std is
    STD_C * sqrt(s*(s-1)), so noise = I_b / (STD_C * sqrt(s*(s-1)) / std) has std ``std``
    and the s values of one row of blocks sum to zero exactly before the float rounding.
    """
    spread = STD_C * math.sqrt(in_repeat * (in_repeat - 1)) if zero_sum and in_repeat > 2 else STD_C
    # Round to float32 on the host so every backend divides by the same number.
    return float(torch.tensor(spread / noise_std, dtype=torch.float32))


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _mix32(x):
        x = x ^ (x >> 16)
        x = x * tl.full((), 0x7FEB352D, tl.uint32)
        x = x ^ (x >> 15)
        x = x * tl.full((), 0x846CA68B, tl.uint32)
        x = x ^ (x >> 16)
        return x

    @triton.jit
    def _hash(q, k0, k1):
        """The uint32 hash of hash indices ``q`` (int64)."""
        lo = (q & 0xFFFFFFFF).to(tl.uint32)
        hi = (q >> 32).to(tl.uint32)
        key = _mix32(hi ^ k1.to(tl.uint32)) ^ k0.to(tl.uint32)
        return _mix32(lo * tl.full((), 0x9E3779B9, tl.uint32) + key)

    @triton.jit
    def uniform_int(g, k0, k1):
        """Triton twin of :func:`uniform_int_torch`; ``g`` int64, returns int64."""
        h = _hash(g >> 2, k0, k1)
        u = (h >> (8 * (g & 3)).to(tl.uint32)) & 0xFF
        return 2 * u.to(tl.int64) - 255

    @triton.jit
    def uniform_int_rows(row_start, col0, k0, k1, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """``uniform_int(row_start[:, None] + col0 + arange(BLOCK_C))``, one hash per 4 elements.

        Needs ``row_start + col0`` to be multiples of 4 and ``BLOCK_C % 4 == 0``: then the
        four elements of a group share one hash and take its bytes in order.
        NOTE: the per-element version hashes the same index four times; the noisy
        hyperclone on a GPU is bound by that integer work, not by memory.
        """
        q = (row_start[:, None] + col0) // 4 + tl.arange(0, BLOCK_C // 4).to(tl.int64)[None, :]
        h = _hash(q, k0, k1)
        shifts = (8 * tl.arange(0, 4)).to(tl.uint32)
        u = (h[:, :, None] >> shifts[None, None, :]) & 0xFF
        return tl.reshape(2 * u.to(tl.int64) - 255, (BLOCK_R, BLOCK_C))
