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

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from .backend import HAS_TRITON, use_triton
from . import cpu_ext
from .memory import check_memory, empty_cpu
from growkit.validate import choice, real_number, whole_number
from growkit.validate import seed as check_seed

from .noise import noise_divisor, seed_keys, uniform_bytes_grid_np, uniform_int_torch, weyl_pattern

NOISE_MODES = ("zero_sum", "independent")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# Argument checking (before any allocation)
# --------------------------------------------------------------------------------------
def _check_args(weight, out_repeat, in_repeat, noise_std, noise, seed):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() not in (1, 2, 3):
        raise ValueError(
            f"weight must be 1-D [O], 2-D [O, I] or 3-D [E, O, I], got shape {tuple(weight.shape)}"
        )
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight dtype must be float32, float16 or bfloat16, got {weight.dtype}")
    out_repeat = whole_number(out_repeat, "out_repeat", min=1)
    in_repeat = whole_number(in_repeat, "in_repeat", min=1)
    if weight.dim() == 1 and in_repeat != 1:
        raise ValueError(
            "in_repeat must be 1 for a 1-D weight (biases and norm gains are tiled with "
            f"out_repeat, never divided); got in_repeat={in_repeat}"
        )
    choice(noise, "noise", NOISE_MODES)
    noise_std = real_number(noise_std, "noise_std", min=0)
    seed = check_seed(seed)
    # The output's size, against the free memory, before anything is allocated.
    check_memory(weight.numel() * out_repeat * in_repeat * weight.element_size(), weight.device,
                 f"out_repeat={out_repeat}, in_repeat={in_repeat} (weight {list(weight.shape)})")
    return out_repeat, in_repeat, noise_std, seed


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


def _divisor_tensor(divisor, device) -> torch.Tensor:
    return torch.full((), float(divisor), dtype=torch.float32, device=device)


def _divide(x: torch.Tensor, divisor) -> torch.Tensor:
    """``x / divisor`` correctly rounded on every device (float32 ``x``; a new tensor).

    NOTE: not ``x / 3.0``: for a Python-number divisor, CUDA PyTorch multiplies by the
    reciprocal, which is off by one ulp for some x (seen on an H200: the torch reference
    then differed from the kernel's ``div_rn`` for scale 3 in float32). A divisor tensor on
    the same device takes the true division.
    """
    return x / _divisor_tensor(divisor, x.device)


def _empty(shape, dtype, device) -> torch.Tensor:
    if torch.device(device).type == "cpu":
        return empty_cpu(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------
@torch.no_grad()
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
    out_repeat, in_repeat, noise_std, seed = _check_args(weight, out_repeat, in_repeat, noise_std, noise, seed)
    return _naive_hyperclone(weight, out_repeat, in_repeat, noise_std=noise_std, noise=noise, seed=seed,
                             divide=divide, rows_per_chunk=rows_per_chunk)


def _naive_hyperclone(weight, out_repeat: int, in_repeat: int, *, noise_std: float, noise: str, seed: int,
                      divide: bool, rows_per_chunk: int | None = None) -> torch.Tensor:
    w3 = _as_3d(weight)
    E, O, I = w3.shape
    out = _empty(_out_shape(weight, out_repeat, in_repeat), weight.dtype, weight.device)
    out5 = out.view(E, out_repeat, O, in_repeat, I)
    divisor = in_repeat if divide else 1
    has_noise, zero_sum, noise_div = _noise_plan(noise_std, noise, in_repeat)

    if not has_noise:
        # NOTE: block (0, 0) is written from the source (divided in float32 and rounded
        # once, as in the kernel: torch does that for half-precision tensors), then copied
        # across its row of blocks, then that row of blocks down the others: three ops per
        # expert, no temporary (a fresh one per call cost its page faults: 16 MB output,
        # 2.1 ms against 1.2 ms for weight.repeat). The ops used to run per chunk of 2**20
        # elements, to copy block (0, 0) while it was still in cache; measured with
        # one-off timings on this 2-core VM (bf16 [8192, 2048] -> x2, fresh
        # output each call, median of 3): 80 ms chunked, 24 ms whole, 32 ms
        # weight.repeat(2, 2); fp32 124 / 35 / 62 ms; 16 MB outputs the same either way.
        divisor_t = _divisor_tensor(divisor, weight.device) if divisor != 1 else None
        for e in range(E):
            first = out5[e, 0, :, 0]
            if divisor_t is None:
                first.copy_(w3[e])
            else:
                torch.div(w3[e], divisor_t, out=first)  # see _divide
            across = out5[e, 0, :, 1:]
            across.copy_(first.unsqueeze(1).expand_as(across))
            down = out5[e, 1:]
            down.copy_(out5[e, :1].expand_as(down))
        return out.view(_out_shape(weight, out_repeat, in_repeat))

    k0, k1 = seed_keys(seed)
    pair = zero_sum and in_repeat == 2
    noise_div_t = torch.tensor(noise_div, dtype=torch.float32, device=weight.device)
    row_len = in_repeat * I  # elements in one output row
    if rows_per_chunk is None:
        rows_per_chunk = max(1, (1 << 16) // max(1, row_len))  # bounds the int64 temporaries
    block = torch.arange(in_repeat, device=weight.device).view(in_repeat, 1) * I + torch.arange(I, device=weight.device)
    for e in range(E):
        for r0 in range(0, O, rows_per_chunk):
            r1 = min(O, r0 + rows_per_chunk)
            w = w3[e, r0:r1].to(torch.float32)
            if divisor != 1:
                w = _divide(w, divisor)
            w = w.view(r1 - r0, 1, I)
            for a in range(out_repeat):
                # global output index of row r of row block a, block b, column i
                start = e * (out_repeat * O * row_len) + (a * O + r0) * row_len
                g = start + torch.arange(r1 - r0, device=weight.device).view(-1, 1, 1) * row_len + block
                if pair:
                    c0 = uniform_int_torch(g[:, :1], k0, k1)  # drawn at block 0's index
                    c = torch.cat([c0, -c0], dim=1)
                else:
                    c = uniform_int_torch(g, k0, k1)
                    if zero_sum:
                        c = in_repeat * c - c.sum(dim=1, keepdim=True)
                out5[e, a, r0:r1] = (w + c.to(torch.float32) / noise_div_t).to(weight.dtype)
    return out.view(_out_shape(weight, out_repeat, in_repeat))


# --------------------------------------------------------------------------------------
# Fast CPU path: numpy draws, several threads
# --------------------------------------------------------------------------------------
CPU_CHUNK_DRAWS = 1 << 18
# NOTE: the C library's chunks are 4x larger: with 2**18 draws, two threads wrote 1 MB
# pieces side by side and met in the same fresh 2 MiB pages (the kernel zeroes a huge page
# under a lock); bf16 [8192, 2048] -> x2 took 50 ms at 2**18, 34 ms at 2**20, 35 ms at
# 2**21 (25 ms without noise), medians of 3 on this 2-core VM. Its workspace stays ~4 MB
# a thread at most (source rows staged only when they are not contiguous), against the
# numpy path's ~4 MB at 2**18. The library reads the source rows in place and divides them
# itself (float32, one IEEE division, as torch), once for all the rows of blocks it feeds,
# instead of staging them through a float32 copy and torch.div: no float32 workspace, one
# pass fewer over the source; the time moved within this VM's noise (the tensor above:
# 29-36 ms against 34-35 ms).
CPU_EXT_CHUNK_DRAWS = 1 << 20


@contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def _hyperclone_cpu(
    weight, out_repeat, in_repeat, *, noise_std, noise, seed, divide, rows_per_chunk=None, workers=None,
    use_ext=True,
):
    """:func:`naive_hyperclone` on the CPU, fast; bit-identical to it.

    NOTE: the noise is the cost of growth on a CPU (the copy path is memory-bound
    already). Where a C compiler is, each chunk's rows are one call into the C library of
    ``cpu_ext`` (draws, noise, add and rounding in one pass, in cache, GIL released); see
    the figures there. Otherwise (``use_ext=False``, ``GROWKIT_CPU_EXT=0``, no compiler),
    per chunk of rows: the draws come from ``uniform_bytes_grid_np`` (numpy,
    four draws per hash), noise and sums are float32 numpy ops into per-thread buffers
    (fresh buffers each chunk were measured 2x slower: large mallocs are fresh mmaps, so
    every chunk paid page faults), and one torch copy rounds the rows to the output dtype
    and writes them. Chunks run on ``torch.get_num_threads()`` Python threads with torch
    held to one intra-op thread meanwhile, so the two kinds of threads do not fight over
    the cores.
    """
    has_noise, zero_sum, noise_div = _noise_plan(noise_std, noise, in_repeat)
    if not has_noise:
        return _naive_hyperclone(weight, out_repeat, in_repeat, noise_std=0.0, noise=noise, seed=seed, divide=divide)
    w3 = _as_3d(weight)
    E, O, I = w3.shape
    out = empty_cpu(_out_shape(weight, out_repeat, in_repeat), weight.dtype)
    if out.numel() == 0:
        return out
    out5 = out.view(E, out_repeat, O, in_repeat, I)
    divisor = in_repeat if divide else 1
    pair = zero_sum and in_repeat == 2
    draw_cols = I if pair else in_repeat * I  # elements of a row that get their own draw
    row_len = in_repeat * I
    lib = cpu_ext.library() if use_ext and cpu_ext.supports(weight.dtype) else None
    mode = "pair" if pair else ("zero_sum" if zero_sum else "independent")
    if rows_per_chunk is None:
        rows_per_chunk = max(1, (CPU_EXT_CHUNK_DRAWS if lib is not None else CPU_CHUNK_DRAWS) // draw_cols)
    rows_per_chunk = min(rows_per_chunk, O)
    k0, k1 = seed_keys(seed)
    # (u - 127.5) / (D / 2) == (2u - 255) / D exactly: both scaled by a power of two.
    half_div = np.float32(noise_div / 2)
    nd = np.float32(noise_div)
    divisor_t = _divisor_tensor(divisor, "cpu") if divisor != 1 else None
    pattern = None
    if lib is None and draw_cols % 4 == 0:
        pattern = weyl_pattern(rows_per_chunk, draw_cols // 4, row_len // 4)
    local = threading.local()

    def workspace(n):
        if not hasattr(local, "w"):
            local.w = torch.empty(rows_per_chunk, I)
            local.y = torch.empty(rows_per_chunk, in_repeat, I)
            local.noise = np.empty((rows_per_chunk, draw_cols), np.float32)
            local.bits = np.empty((rows_per_chunk, draw_cols // 4), np.uint32)
            local.tmp = np.empty_like(local.bits)
        return local.w[:n], local.y[:n], local.noise[:n], local.bits, local.tmp

    def fill(e: int, r0: int) -> None:
        n = min(O, r0 + rows_per_chunk) - r0
        if lib is not None:
            src = w3[e, r0:r0 + n]
            if I > 1 and src.stride(1) != 1:  # rows the library cannot read in place: staged
                if not hasattr(local, "src"):
                    local.src = torch.empty(rows_per_chunk, I, dtype=weight.dtype)
                src = local.src[:n].copy_(src)
            start = e * (out_repeat * O * row_len) + r0 * row_len  # of row block 0; the others O rows on
            cpu_ext.noise_rows(lib, src, divisor, in_repeat, mode, start, k0, k1, noise_div, out5[e, :, r0:r0 + n])
            return
        w, y, noise_f, bits, tmp = workspace(n)
        w.copy_(w3[e, r0:r0 + n])
        if divisor_t is not None:
            torch.div(w, divisor_t, out=w)
        w_np, y_np = w.numpy(), y.numpy()
        for a in range(out_repeat):
            start = e * (out_repeat * O * row_len) + (a * O + r0) * row_len
            u = uniform_bytes_grid_np(start, n, draw_cols, row_len, k0, k1, pattern, bits, tmp)
            if zero_sum and not pair:
                c = u.astype(np.int64).reshape(n, in_repeat, I) * 2 - 255
                c = in_repeat * c - c.sum(axis=1, keepdims=True)
                np.divide(c.reshape(n, draw_cols), nd, out=noise_f, dtype=np.float32)
            else:
                np.subtract(u, np.float32(127.5), out=noise_f, dtype=np.float32)
                np.divide(noise_f, half_div, out=noise_f)
            if pair:
                np.add(w_np, noise_f, out=y_np[:, 0])
                np.subtract(w_np, noise_f, out=y_np[:, 1])
            else:
                np.add(w_np[:, None, :], noise_f.reshape(n, in_repeat, I), out=y_np)
            out5[e, a, r0:r0 + n].copy_(y)

    tasks = [(e, r0) for e in range(E) for r0 in range(0, O, rows_per_chunk)]
    workers = min(workers or torch.get_num_threads(), len(tasks))
    if workers <= 1:
        for task in tasks:
            fill(*task)
    else:
        with _torch_threads(1), ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(fill, *task) for task in tasks]:
                future.result()
    return out


# --------------------------------------------------------------------------------------
# Triton kernel and launcher
# --------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    from .noise import uniform_int, uniform_int_rows

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
        HAS_NOISE: tl.constexpr, ZERO_SUM: tl.constexpr, PAIR: tl.constexpr, ALIGNED4: tl.constexpr, BF16_OUT: tl.constexpr,
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
        col0 = (pid_tile % n_tiles_i) * BLOCK_I
        for a in range(OUT_REPEAT):
            # Global output index of block (a, 0); the output is contiguous, so index == offset.
            row_start = expert_base + (a * O + offs_o) * row_len
            g0 = row_start[:, None] + offs_i[None, :]
            if HAS_NOISE and PAIR:
                # block 1 gets the negation
                if ALIGNED4:
                    c_pair = uniform_int_rows(row_start, col0, k0, k1, BLOCK_O, BLOCK_I)
                else:
                    c_pair = uniform_int(g0, k0, k1)
            elif HAS_NOISE and ZERO_SUM:
                c_sum = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.int64)
                for b in range(IN_REPEAT):
                    if ALIGNED4:
                        c_sum += uniform_int_rows(row_start + b * I, col0, k0, k1, BLOCK_O, BLOCK_I)
                    else:
                        c_sum += uniform_int(g0 + b * I, k0, k1)
            for b in range(IN_REPEAT):
                g = g0 + b * I
                y = w
                if HAS_NOISE:
                    if PAIR:
                        c = c_pair * (1 - 2 * b)
                    else:
                        if ALIGNED4:
                            c = uniform_int_rows(row_start + b * I, col0, k0, k1, BLOCK_O, BLOCK_I)
                        else:
                            c = uniform_int(g, k0, k1)
                        if ZERO_SUM:
                            c = IN_REPEAT * c - c_sum
                    y = w + tl.math.div_rn(c.to(tl.float32), noise_div)
                if BF16_OUT:
                    tl.store(out_ptr + g, _to_bf16_bits(y), mask=mask)
                else:
                    tl.store(out_ptr + g, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_shape(O: int, I: int, has_noise: bool) -> tuple[int, int, int]:
    """(BLOCK_O, BLOCK_I, num_warps) for a weight [O, I]; small weights get one tile.

    NOTE: measured on an H200 with ``python bench/gpu_tune.py``
    (``bench/results/gpu_tune_nvidia-h200.json``). Without noise the kernel is a copy:
    4096-element tiles of 256 contiguous columns (1 KB fp32 row segments) and 4 warps were
    within noise of the best of eight shapes. With noise it is bound by the integer hash:
    8 warps on 8 x 512 tiles ran 1.3-1.5x faster than 4 warps on 16 x 256.
    """
    width, warps = (512, 8) if has_noise else (256, 4)
    block_i = min(width, triton.next_power_of_2(max(I, 1)))
    block_o = min(max(4096 // block_i, 1), triton.next_power_of_2(max(O, 1)))
    return block_o, block_i, warps


def _hyperclone_triton(
    weight, out_repeat, in_repeat, *, noise_std, noise, seed, divide,
    block_o=None, block_i=None, num_warps=None, aligned4=None,
):
    """Launch the kernel; the keyword-only launch shape arguments are for tests and tuning."""
    w3 = _as_3d(weight)
    E, O, I = w3.shape
    out = torch.empty(_out_shape(weight, out_repeat, in_repeat), dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    has_noise, zero_sum, noise_div = _noise_plan(noise_std, noise, in_repeat)
    k0, k1 = seed_keys(seed)
    default_o, default_i, default_warps = _launch_shape(O, I, has_noise)
    block_o = block_o or default_o
    block_i = block_i or default_i
    num_warps = num_warps or default_warps
    if aligned4 is None:
        aligned4 = I % 4 == 0 and block_i % 4 == 0
    bf16 = weight.dtype == torch.bfloat16
    grid = (triton.cdiv(O, block_o) * triton.cdiv(I, block_i), E)
    _hyperclone_kernel[grid](
        w3, out.view(torch.int16) if bf16 else out,
        O, I,
        w3.stride(0), w3.stride(1), w3.stride(2),
        float(in_repeat if divide else 1), noise_div, k0, k1,
        out_repeat, in_repeat,
        HAS_NOISE=has_noise, ZERO_SUM=zero_sum, PAIR=zero_sum and in_repeat == 2,
        ALIGNED4=aligned4, BF16_OUT=bf16,
        BLOCK_O=block_o, BLOCK_I=block_i, num_warps=num_warps,
    )
    return out


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------
@torch.no_grad()
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
        [r_o*O], [r_o*O, r_i*I] or [E, r_o*O, r_i*I], contiguous, in ``weight``'s dtype; a
        new tensor outside autograd (an ``nn.Parameter`` may be passed).
    """
    out_repeat, in_repeat, noise_std, seed = _check_args(weight, out_repeat, in_repeat, noise_std, noise, seed)
    return hyperclone_prevalidated(weight, out_repeat, in_repeat, noise_std=noise_std, noise=noise, seed=seed,
                                   divide=divide, backend=backend)


def hyperclone_prevalidated(weight: torch.Tensor, out_repeat: int, in_repeat: int, *, noise_std: float = 0.0,
                            noise: str = "zero_sum", seed: int = 0, divide: bool = True,
                            backend: str | None = None) -> torch.Tensor:
    """:func:`hyperclone` without its argument checks, for callers that checked them once
    where they entered the public API (the growth operators, ``growkit grow``)."""
    kwargs = dict(noise_std=float(noise_std), noise=noise, seed=seed, divide=divide)
    if use_triton(weight.device, backend):
        return _hyperclone_triton(weight, out_repeat, in_repeat, **kwargs)
    if weight.device.type == "cpu":
        return _hyperclone_cpu(weight, out_repeat, in_repeat, **kwargs)
    return _naive_hyperclone(weight, out_repeat, in_repeat, **kwargs)
