"""Counter-based noise that is bit-identical on the GPU, the Triton interpreter and torch.

Every noise value is a pure function of ``(seed, g)``, where ``g`` is the global (flat,
row-major) index of the element in the *output* tensor. So the noise does not depend on
block sizes, grids or which backend ran, and any slice of a tensor can be regenerated.

Why an integer hash and uniform integers, and no Box-Muller:
    ``log``/``cos`` differ in the last bit between libdevice, numpy and the CPU's libm,
    and Triton's ``/`` is approximate on NVIDIA GPUs. Everything here is integer
    arithmetic (exact everywhere), one int -> float32 conversion (round-to-nearest
    everywhere) and one correctly rounded division (``tl.math.div_rn``). No float
    multiply is followed by an add, so FMA contraction cannot change a result either.

The draw for element ``g``::

    lo, hi = g mod 2**32, g div 2**32
    h = mix32(mix32(lo ^ k0) ^ hi ^ k1)          # k0, k1 derived from the seed on the host
    c = 2 * (h >> 8) - (2**24 - 1)                # odd integer, uniform on [-(2**24-1), 2**24-1]

``c`` has mean exactly 0 and std ``STD_C`` = 2**24 / sqrt(3) (to 1 part in 2**48).
``mix32`` is the "lowbias32" integer finalizer (Chris Wellons' hash-prospector), a bijection
of uint32 with good avalanche.
"""

from __future__ import annotations

import math

import torch

from .backend import HAS_TRITON

MASK32 = 0xFFFFFFFF
HALF_RANGE = (1 << 24) - 1
STD_C = float(1 << 24) / math.sqrt(3.0)
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


def uniform_int_torch(g: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """The centered uniform integer ``c`` for global indices ``g`` (int64 tensor)."""
    lo = g & MASK32
    hi = g >> 32
    h = _mix32_torch(_mix32_torch(lo ^ k0) ^ hi ^ k1)
    return 2 * (h >> 8) - HALF_RANGE


def _signed32(v: int) -> int:
    """A uint32 value as the int32 with the same bits."""
    v &= MASK32
    return v - (1 << 32) if v >= (1 << 31) else v


def _mix32_inplace(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """lowbias32 on int32 tensors holding uint32 bits, in place.

    int32 multiplication wraps like uint32; an arithmetic shift followed by a mask is a
    logical shift.
    """
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp.bitwise_and_(0xFFFF))
    x.mul_(_signed32(_MIX_A))
    torch.bitwise_right_shift(x, 15, out=tmp)
    x.bitwise_xor_(tmp.bitwise_and_(0x1FFFF))
    x.mul_(_signed32(_MIX_B))
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp.bitwise_and_(0xFFFF))


def uniform_int_range_torch(start: int, n: int, k0: int, k1: int, device=None) -> torch.Tensor:
    """``uniform_int_torch(arange(start, start + n))`` as int32, fast.

    NOTE: int32 arithmetic in place, meant for cache-sized chunks: measured about 20x
    faster on the CPU than the int64 version over whole tensors. A range that crosses a
    multiple of 2**32 is split there (the high word changes).
    """
    boundary = ((start >> 32) + 1) << 32
    if start + n > boundary:
        head = boundary - start
        return torch.cat([uniform_int_range_torch(start, head, k0, k1, device),
                          uniform_int_range_torch(boundary, n - head, k0, k1, device)])
    x = torch.arange(n, dtype=torch.int32, device=device)
    x.add_(_signed32(start))  # wraps: only the low word matters
    tmp = torch.empty_like(x)
    x.bitwise_xor_(_signed32(k0))
    _mix32_inplace(x, tmp)
    x.bitwise_xor_(_signed32((start >> 32) ^ k1))
    _mix32_inplace(x, tmp)
    torch.bitwise_right_shift(x, 8, out=tmp)
    return tmp.bitwise_and_(0xFFFFFF).mul_(2).sub_(HALF_RANGE)


def noise_divisor(noise_std: float, in_repeat: int, zero_sum: bool) -> float:
    """The float32 number the integer draw is divided by to give noise of std ``noise_std``.

    ``independent``: noise = c / (STD_C / std).
    ``zero_sum`` over s blocks: I_b = s*c_b - sum_k c_k = s*(c_b - mean(c)); its std is
    STD_C * sqrt(s*(s-1)), so noise = I_b / (STD_C * sqrt(s*(s-1)) / std) has std ``std``
    and the s values of one row of blocks sum to zero exactly before the float rounding.
    """
    spread = STD_C * math.sqrt(in_repeat * (in_repeat - 1)) if zero_sum else STD_C
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
    def uniform_int(g, k0, k1):
        """Triton twin of :func:`uniform_int_torch`; ``g`` int64, returns int64."""
        lo = (g & 0xFFFFFFFF).to(tl.uint32)
        hi = (g >> 32).to(tl.uint32)
        h = _mix32(_mix32(lo ^ k0.to(tl.uint32)) ^ hi ^ k1.to(tl.uint32))
        return 2 * (h >> 8).to(tl.int64) - 16777215
