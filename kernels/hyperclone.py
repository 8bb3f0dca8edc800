"""HyperClone a weight: tile it into a larger one, divide by the input repeat, add noise.

For a weight ``W`` [O, I] and repeats ``(r_o, r_i)`` the result is [r_o*O, r_i*I]::

        W / r_i + N00 | W / r_i + N01 | ... | W / r_i + N0(r_i-1)      <- row of blocks a = 0
        --------------+---------------+-----+-------------------
        W / r_i + N10 | W / r_i + N11 | ... |                          <- row of blocks a = 1
        ...

An input tiled r_i times, x' = [x, x, ..., x], then gives W' x' = [W x, ..., W x] (r_o
copies): the function is preserved, and the clones of a row (or of a head) are born equal.

Noise ``N_ab`` breaks that symmetry (without it, clones receive identical gradients
forever). ``noise="zero_sum"``: within each row of blocks, sum_b N_ab = 0 element-wise, so
it cancels on a tiled input and the function is unchanged up to float rounding. With
``r_i == 1`` there is one block per row, so a zero-sum noise is necessarily zero.
``noise="independent"``: i.i.d. noise in every block (changes the function by about
``noise_std * ||x||``).

Noise values are a pure function of ``(seed, global output index)`` (see ``noise.py``):
the same for every tile size and on every backend. The Triton kernel reads ``W`` once and
writes the output once; it is bit-identical to the torch reference (``naive_hyperclone``),
including the float32 -> bfloat16 rounding (round-to-nearest-even, done by hand in the
kernel because the interpreter's cast truncates).

1-D tensors (biases, norm gains) are tiled ``r_o`` times (``in_repeat`` must be 1: they
are not divided). 3-D tensors [E, O, I] (stacked experts) are cloned expert by expert.
"""

from __future__ import annotations

import math

import torch

from .backend import HAS_TRITON, use_triton
from .noise import noise_divisor, seed_keys, uniform_int_range_torch

NOISE_MODES = ("zero_sum", "independent")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# Argument checking (before any allocation)
# --------------------------------------------------------------------------------------
def _check_repeat(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
        isinstance(value, float) and value.is_integer()
    ):
        raise TypeError(f"{name} must be a whole number >= 1, got {value!r}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value}")
    return value


def _check_args(weight, out_repeat, in_repeat, noise_std, noise, seed):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() not in (1, 2, 3):
        raise ValueError(
            f"weight must be 1-D [O], 2-D [O, I] or 3-D [E, O, I], got shape {tuple(weight.shape)}"
        )
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight dtype must be float32, float16 or bfloat16, got {weight.dtype}")
    out_repeat = _check_repeat("out_repeat", out_repeat)
    in_repeat = _check_repeat("in_repeat", in_repeat)
    if weight.dim() == 1 and in_repeat != 1:
        raise ValueError(
            "in_repeat must be 1 for a 1-D weight (biases and norm gains are tiled with "
            f"out_repeat, never divided); got in_repeat={in_repeat}"
        )
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)):
        raise TypeError(f"noise_std must be a float >= 0, got {noise_std!r}")
    if not math.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"noise_std must be a finite float >= 0, got {noise_std}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return out_repeat, in_repeat


def _as_3d(weight: torch.Tensor) -> torch.Tensor:
    """View any supported weight as [E, O, I] (no copy)."""
    if weight.dim() == 1:
        return weight.view(1, -1, 1) if weight.is_contiguous() else weight.unsqueeze(0).unsqueeze(-1)
    if weight.dim() == 2:
        return weight.unsqueeze(0)
    return weight


def _out_shape(weight: torch.Tensor, out_repeat: int, in_repeat: int) -> tuple[int, ...]:
    if weight.dim() == 1:
        return (out_repeat * weight.shape[0],)
    *lead, o, i = weight.shape
    return (*lead, out_repeat * o, in_repeat * i)


def _noise_plan(noise_std: float, noise: str, in_repeat: int):
    """(has_noise, zero_sum, divisor) for a call."""
    zero_sum = noise == "zero_sum"
    if noise_std == 0.0 or (zero_sum and in_repeat == 1):
        return False, zero_sum, 1.0
    return True, zero_sum, noise_divisor(noise_std, in_repeat, zero_sum)


# --------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------
def naive_hyperclone(
    weight: torch.Tensor,
    out_repeat: int,
    in_repeat: int,
    *,
    noise_std: float = 0.0,
    noise: str = "zero_sum",
    seed: int = 0,
    divide: bool = True,
    rows_per_chunk: int | None = None,
) -> torch.Tensor:
    """Eager torch reference of :func:`hyperclone` (also the CPU fallback).

    Works on [E, r_o, O, r_i, I] views of the output, a chunk of source rows at a time, so
    the int64 index and hash temporaries stay bounded for any weight size.
    """
    out_repeat, in_repeat = _check_args(weight, out_repeat, in_repeat, noise_std, noise, seed)
    w3 = _as_3d(weight)
    E, O, I = w3.shape
    out = torch.empty(_out_shape(weight, out_repeat, in_repeat), dtype=weight.dtype, device=weight.device)
    out5 = out.view(E, out_repeat, O, in_repeat, I)
    divisor = in_repeat if divide else 1
    has_noise, zero_sum, noise_div = _noise_plan(noise_std, noise, in_repeat)

    if not has_noise:
        # NOTE: divide the small source once (float32, one rounding to the dtype, as in the
        # kernel), fill row block 0 by a broadcast copy, then copy that block: contiguous
        # copies. Measured on 2 CPU cores at 4096x4096 -> x2: 165 ms, vs 300 ms for one
        # broadcast division into the output and 135 ms for weight.repeat(2, 2).
        src = w3 if divisor == 1 else (w3.float() / divisor).to(weight.dtype)
        out5[:, 0].copy_(src.view(E, O, 1, I).expand(E, O, in_repeat, I))
        rows = out.view(E, out_repeat, -1)
        for a in range(1, out_repeat):
            rows[:, a].copy_(rows[:, 0])
        return out.view(_out_shape(weight, out_repeat, in_repeat))

    k0, k1 = seed_keys(seed)
    noise_div_t = torch.tensor(noise_div, dtype=torch.float32, device=weight.device)
    row_len = in_repeat * I  # elements in one output row
    if rows_per_chunk is None:
        # NOTE: ~32K elements a chunk keeps the hash temporaries in cache; measured much
        # faster than whole-tensor int64 passes, which are memory-bound.
        rows_per_chunk = max(1, (1 << 15) // max(1, row_len))
    for e in range(E):
        for r0 in range(0, O, rows_per_chunk):
            r1 = min(O, r0 + rows_per_chunk)
            w = w3[e, r0:r1].to(torch.float32)
            if divisor != 1:
                w = w / divisor
            w = w.view(r1 - r0, 1, I)
            for a in range(out_repeat):
                # rows r0..r1 of row block a are one contiguous range of global indices
                start = e * (out_repeat * O * row_len) + (a * O + r0) * row_len
                c = uniform_int_range_torch(start, (r1 - r0) * row_len, k0, k1, weight.device)
                c = c.view(r1 - r0, in_repeat, I)
                if zero_sum:
                    total = c.sum(dim=1, keepdim=True, dtype=torch.int32)
                    c = c.mul_(in_repeat).sub_(total)
                out5[e, a, r0:r1] = (w + c.to(torch.float32) / noise_div_t).to(weight.dtype)
    return out.view(_out_shape(weight, out_repeat, in_repeat))


# --------------------------------------------------------------------------------------
# Triton kernel and launcher
# --------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    from .noise import uniform_int

    @triton.jit
    def _to_bf16_bits(y):
        """float32 -> bfloat16 bits, round-to-nearest-even (the interpreter's cast truncates)."""
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)  # keep NaN a NaN
        return rounded.to(tl.uint16).to(tl.int16, bitcast=True)

    @triton.jit
    def _hyperclone_kernel(
        w_ptr, out_ptr,
        O, I,
        stride_we, stride_wo, stride_wi,
        divisor, noise_div, k0, k1,
        OUT_REPEAT, IN_REPEAT,
        HAS_NOISE: tl.constexpr, ZERO_SUM: tl.constexpr, BF16_OUT: tl.constexpr,
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        # int64 from the start: offsets of a tensor past 2**31 elements overflow int32.
        pid_tile = tl.program_id(0).to(tl.int64)
        e = tl.program_id(1).to(tl.int64)
        n_tiles_i = tl.cdiv(I, BLOCK_I)
        offs_o = (pid_tile // n_tiles_i) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
        offs_i = (pid_tile % n_tiles_i) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
        mask = (offs_o[:, None] < O) & (offs_i[None, :] < I)

        # Read W once; everything below reuses this tile.
        w = tl.load(
            w_ptr + e * stride_we + offs_o[:, None] * stride_wo + offs_i[None, :] * stride_wi,
            mask=mask, other=0.0,
        ).to(tl.float32)
        w = tl.math.div_rn(w, divisor)

        row_len = IN_REPEAT * I
        expert_base = e * (OUT_REPEAT * O) * row_len
        for a in range(OUT_REPEAT):
            # Global output index of block (a, 0); the output is contiguous, so index == offset.
            g0 = expert_base + (a * O + offs_o[:, None]) * row_len + offs_i[None, :]
            if HAS_NOISE and ZERO_SUM:
                c_sum = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.int64)
                for b in range(IN_REPEAT):
                    c_sum += uniform_int(g0 + b * I, k0, k1)
            for b in range(IN_REPEAT):
                g = g0 + b * I
                y = w
                if HAS_NOISE:
                    c = uniform_int(g, k0, k1)
                    if ZERO_SUM:
                        c = IN_REPEAT * c - c_sum
                    y = w + tl.math.div_rn(c.to(tl.float32), noise_div)
                if BF16_OUT:
                    tl.store(out_ptr + g, _to_bf16_bits(y), mask=mask)
                else:
                    tl.store(out_ptr + g, y.to(out_ptr.dtype.element_ty), mask=mask)


def _block_sizes(O: int, I: int) -> tuple[int, int]:
    # NOTE: a memory-bound copy: 4096-element tiles with 256 contiguous columns give
    # 1 KB (fp32) coalesced row segments; small weights get one tile.
    block_i = min(256, triton.next_power_of_2(max(I, 1)))
    block_o = min(max(4096 // block_i, 1), triton.next_power_of_2(max(O, 1)))
    return block_o, block_i


def _hyperclone_triton(
    weight, out_repeat, in_repeat, *, noise_std, noise, seed, divide, block_o=None, block_i=None
):
    w3 = _as_3d(weight)
    E, O, I = w3.shape
    out = torch.empty(_out_shape(weight, out_repeat, in_repeat), dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    has_noise, zero_sum, noise_div = _noise_plan(noise_std, noise, in_repeat)
    k0, k1 = seed_keys(seed)
    default_o, default_i = _block_sizes(O, I)
    block_o = block_o or default_o
    block_i = block_i or default_i
    bf16 = weight.dtype == torch.bfloat16
    grid = (triton.cdiv(O, block_o) * triton.cdiv(I, block_i), E)
    _hyperclone_kernel[grid](
        w3, out.view(torch.int16) if bf16 else out,
        O, I,
        w3.stride(0), w3.stride(1), w3.stride(2),
        float(in_repeat if divide else 1), noise_div, k0, k1,
        out_repeat, in_repeat,
        HAS_NOISE=has_noise, ZERO_SUM=zero_sum, BF16_OUT=bf16,
        BLOCK_O=block_o, BLOCK_I=block_i,
    )
    return out


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------
def hyperclone(
    weight: torch.Tensor,
    out_repeat: int,
    in_repeat: int,
    *,
    noise_std: float = 0.0,
    noise: str = "zero_sum",
    seed: int = 0,
    divide: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Tile ``weight`` ``out_repeat`` x ``in_repeat`` times, divided by ``in_repeat``, plus noise.

    Args:
        weight: [O] (bias, norm gain), [O, I] (linear weight, nn.Linear layout) or
            [E, O, I] (stacked experts); float32, float16 or bfloat16; any strides.
        out_repeat: copies along the output dimension O (whole number >= 1).
        in_repeat: copies along the input dimension I (whole number >= 1); the weight is
            divided by it so that a tiled input gives the same output. Must be 1 for 1-D.
        noise_std: standard deviation of the symmetry-breaking noise (0 = none).
        noise: ``"zero_sum"`` (noise of the ``in_repeat`` blocks of a row sums to zero:
            function-preserving; necessarily zero when ``in_repeat == 1``) or
            ``"independent"`` (i.i.d., changes the function slightly).
        seed: noise seed; the noise is a pure function of (seed, global output index).
        divide: divide by ``in_repeat`` (True for linear maps; False tiles an embedding
            table [V, d] along d unchanged).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; None reads ``GROWKIT_BACKEND``.

    Returns:
        [r_o*O], [r_o*O, r_i*I] or [E, r_o*O, r_i*I], contiguous, in ``weight``'s dtype.
    """
    out_repeat, in_repeat = _check_args(weight, out_repeat, in_repeat, noise_std, noise, seed)
    kwargs = dict(noise_std=float(noise_std), noise=noise, seed=seed, divide=divide)
    if use_triton(weight.device, backend):
        return _hyperclone_triton(weight, out_repeat, in_repeat, **kwargs)
    return naive_hyperclone(weight, out_repeat, in_repeat, **kwargs)
