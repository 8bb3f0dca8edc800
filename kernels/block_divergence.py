"""How far have clones drifted apart? Per-block difference from block 0, in one launch.

A tensor made of ``groups`` equal blocks along ``dim`` (twin heads, cloned rows)::

    x = [ B_0 | B_1 | ... | B_{G-1} ]   along dim

gives, for every block g, ``max |B_g - B_0|``, ``mean |B_g - B_0|`` and ``mean |B_g|``
(float32 [G] each; entry 0 of the first two is zero). Clones that never diverge show
``max_diff == 0``; comparing ``mean_diff`` with ``magnitude`` says how large the
divergence is relative to the weights themselves.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from growkit.validate import whole_number

from .backend import HAS_TRITON, use_triton
from .paired_diff import nan_as_inf

if HAS_TRITON:
    from .paired_diff import paired_diff_triton


class BlockDivergence(NamedTuple):
    max_diff: torch.Tensor   # [G] float32
    mean_diff: torch.Tensor  # [G] float32
    magnitude: torch.Tensor  # [G] float32


def _check(x, groups, dim) -> tuple[torch.Tensor, int, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dim to split into groups")
    groups = whole_number(groups, "groups", min=1, hint="the number of clones")
    dim = whole_number(dim, "dim", min=-x.dim(), max=x.dim() - 1)
    dim = dim % x.dim()
    if x.shape[dim] % groups != 0:
        raise ValueError(
            f"x.shape[{dim}] = {x.shape[dim]} is not divisible by groups={groups}: "
            "pass the number of clones the tensor was grown into"
        )
    return x, groups, dim


def _as_3d(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """[pre, G, inner] (a view when the dims after ``dim`` can merge)."""
    pre = math.prod(x.shape[:dim])
    return x.reshape(pre, groups, -1)


def _row_width(k: int) -> int:
    """The largest power of two <= 1024 that divides k (1 for odd k)."""
    return math.gcd(k, 1024) if k else 1


def naive_block_divergence(x: torch.Tensor, groups: int, dim: int = 0) -> BlockDivergence:
    """Eager reference."""
    x, groups, dim = _check(x, groups, dim)
    x3 = _as_3d(x, groups, dim).float()
    if x3.numel() == 0:
        z = x3.new_zeros(groups)
        return BlockDivergence(z, z.clone(), z.clone())
    diff = (x3 - x3[:, :1]).abs_()
    return BlockDivergence(
        nan_as_inf(diff.amax(dim=(0, 2))), nan_as_inf(diff.mean(dim=(0, 2))), x3.abs().mean(dim=(0, 2))
    )


def block_divergence(x: torch.Tensor, groups: int, dim: int = 0, *, backend: str | None = None) -> BlockDivergence:
    """Each block's max and mean absolute difference from block 0, and its mean magnitude.

    Args:
        x: any float tensor whose size along ``dim`` is ``groups`` equal blocks.
        groups: number of blocks (clones).
        dim: the dim the blocks are laid along.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; None reads ``GROWKIT_BACKEND``.

    Returns:
        ``BlockDivergence(max_diff, mean_diff, magnitude)``, float32 [groups] each.
    """
    x, groups, dim = _check(x, groups, dim)
    if not use_triton(x.device, backend):
        return naive_block_divergence(x, groups, dim)
    x3 = _as_3d(x, groups, dim)
    P, _, K = x3.shape
    s_pre, s_group, s_inner = x3.stride()
    if P == 1:
        # Blocks along the first dim: one row per block would leave the kernel a single
        # row of tiles, so view each block as [K / w, w] rows instead (same elements).
        w = _row_width(K)
        P, K, s_pre = K // w, w, w * s_inner
    mx, mean, mag = paired_diff_triton(
        x3, x3, 1,
        a_strides=(s_group, s_pre, s_inner), b_strides=(0, s_pre, s_inner),
        n_slots=groups, P=P, D=K, with_magnitude=True,
    )
    return BlockDivergence(mx, mean, mag)
