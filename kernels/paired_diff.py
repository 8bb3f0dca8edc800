"""One fused reduction behind ``layer_diff_stats`` and ``block_divergence``.

For every slot ``s`` (a layer, or a block of clones) it reduces a pair of [P, D] views::

    a[s, p, r*D + c]  vs  b[s, p, c]       r = 0..REPS-1   (every replica of a against b)

into ``max |a - b|``, ``mean |a - b|`` and, optionally, ``mean |a|``, for all slots in one
launch. The grid is (programs of one slot, slots): every program reduces a column of
``TILES_PER_PROG`` tiles in registers, adds its figures to a per-slot workspace with
atomics, and the last program of a slot (an atomic counter tells) writes the slot's final
figures, so the output buffers are written exactly once by the kernel and nothing but the
workspace needs zeroing.

A NaN difference counts as +inf: a NaN in a grown model must fail every tolerance, and
``max`` is not NaN-propagating in every backend.
"""

from __future__ import annotations

import torch

from .backend import HAS_TRITON


def nan_as_inf(t: torch.Tensor) -> torch.Tensor:
    """``t`` with NaN replaced by +inf: the torch references' side of the NaN rule above.

    The references reduce first (``amax`` and ``mean`` propagate NaN) and map the small
    result, rather than running ``nan_to_num`` over the whole difference.
    """
    return torch.where(t.isnan(), torch.full((), float("inf"), device=t.device), t)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _paired_diff_kernel(
        a_ptr, b_ptr,
        ws_max_ptr, ws_sum_ptr, ws_mag_ptr, ws_count_ptr,
        out_max_ptr, out_mean_ptr, out_mag_ptr,
        P, D, REPS,
        stride_as, stride_ap, stride_ac,
        stride_bs, stride_bp, stride_bc,
        n_elems, TILES_PER_PROG,
        HAS_MAG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        slot = tl.program_id(1).to(tl.int64)
        n_tiles_d = tl.cdiv(D, BLOCK_D)
        row_group = pid // n_tiles_d
        offs_d = (pid % n_tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        acc_max = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        acc_sum = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        acc_mag = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        for t in range(TILES_PER_PROG):
            offs_p = (row_group * TILES_PER_PROG + t) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
            mask = (offs_p[:, None] < P) & (offs_d[None, :] < D)
            # b is read once and compared with every replica of a.
            b = tl.load(
                b_ptr + slot * stride_bs + offs_p[:, None] * stride_bp + offs_d[None, :] * stride_bc,
                mask=mask, other=0.0,
            ).to(tl.float32)
            a_base = a_ptr + slot * stride_as + offs_p[:, None] * stride_ap
            for r in range(REPS):
                a = tl.load(a_base + (r * D + offs_d[None, :]) * stride_ac, mask=mask, other=0.0).to(tl.float32)
                diff = tl.abs(a - b)
                diff = tl.where(diff != diff, float("inf"), diff)
                acc_max = tl.maximum(acc_max, diff)
                acc_sum += diff
                if HAS_MAG:
                    acc_mag += tl.abs(a)

        # Non-negative float32 values order like their int32 bit patterns, so an integer
        # atomic max needs no float atomic support.
        tile_max = tl.max(tl.max(acc_max, axis=1), axis=0)
        tl.atomic_max(ws_max_ptr + slot, tile_max.to(tl.int32, bitcast=True))
        tl.atomic_add(ws_sum_ptr + slot, tl.sum(tl.sum(acc_sum, axis=1), axis=0))
        if HAS_MAG:
            tl.atomic_add(ws_mag_ptr + slot, tl.sum(tl.sum(acc_mag, axis=1), axis=0))
        # acq_rel: the adds above are visible to whichever program finishes the slot.
        done = tl.atomic_add(ws_count_ptr + slot, 1)
        n_programs = tl.cdiv(tl.cdiv(P, BLOCK_P), TILES_PER_PROG) * n_tiles_d
        if done == n_programs - 1:
            total_max = tl.atomic_max(ws_max_ptr + slot, 0).to(tl.float32, bitcast=True)
            tl.store(out_max_ptr + slot, total_max)
            tl.store(out_mean_ptr + slot, tl.math.div_rn(tl.atomic_add(ws_sum_ptr + slot, 0.0), n_elems))
            if HAS_MAG:
                tl.store(out_mag_ptr + slot, tl.math.div_rn(tl.atomic_add(ws_mag_ptr + slot, 0.0), n_elems))


# NOTE: about 16 programs per SM of an H100/H200 (132 SMs). The first version gave every
# 4096-element tile its own program and atomics: block_divergence of a [8192, 4096] fp32
# weight then ran at 7.5% of copy bandwidth on an H200 (65536 one-row programs fighting
# over two workspace addresses), layer_diff_stats at 78-89%.
TARGET_PROGRAMS = 2048


def _block_sizes(P: int, D: int) -> tuple[int, int]:
    # NOTE: 4096-element tiles with up to 256 contiguous columns, as in hyperclone; a slot
    # smaller than a tile is one program.
    block_d = min(256, triton.next_power_of_2(max(D, 1)))
    block_p = min(max(4096 // block_d, 1), triton.next_power_of_2(max(P, 1)))
    return block_p, block_d


def paired_diff_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    reps: int,
    *,
    a_strides: tuple[int, int, int],
    b_strides: tuple[int, int, int],
    n_slots: int,
    P: int,
    D: int,
    with_magnitude: bool,
    block_p: int | None = None,
    block_d: int | None = None,
    tiles_per_prog: int | None = None,
):
    """Launch the fused reduction; returns (max, mean, magnitude-or-None), float32 [n_slots].

    ``a`` and ``b`` are base tensors; the [slot, p, c] element of each is found through
    the given strides (b's slot stride may be 0: every slot compares with one b block).
    """
    device = a.device
    out_max = torch.empty(n_slots, dtype=torch.float32, device=device)
    out_mean = torch.empty(n_slots, dtype=torch.float32, device=device)
    out_mag = torch.empty(n_slots, dtype=torch.float32, device=device) if with_magnitude else out_mean
    if n_slots == 0:
        return out_max, out_mean, (out_mag if with_magnitude else None)
    if P * D * reps == 0:
        out_max.zero_(), out_mean.zero_(), out_mag.zero_()
        return out_max, out_mean, (out_mag if with_magnitude else None)
    default_p, default_d = _block_sizes(P, D)
    block_p, block_d = block_p or default_p, block_d or default_d
    ws_max = torch.zeros(n_slots, dtype=torch.int32, device=device)
    ws_sum = torch.zeros(n_slots, dtype=torch.float32, device=device)
    ws_mag = torch.zeros(n_slots, dtype=torch.float32, device=device)
    ws_count = torch.zeros(n_slots, dtype=torch.int32, device=device)
    n_row_tiles, n_col_tiles = triton.cdiv(P, block_p), triton.cdiv(D, block_d)
    if tiles_per_prog is None:
        tiles_per_prog = max(1, min(n_row_tiles, n_row_tiles * n_col_tiles * n_slots // TARGET_PROGRAMS))
    grid = (triton.cdiv(n_row_tiles, tiles_per_prog) * n_col_tiles, n_slots)
    _paired_diff_kernel[grid](
        a, b,
        ws_max, ws_sum, ws_mag, ws_count,
        out_max, out_mean, out_mag,
        P, D, reps,
        *a_strides, *b_strides,
        float(P * D * reps), tiles_per_prog,
        HAS_MAG=with_magnitude, BLOCK_P=block_p, BLOCK_D=block_d,
    )
    return out_max, out_mean, (out_mag if with_magnitude else None)
