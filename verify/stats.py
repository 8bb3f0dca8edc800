"""The reductions of every check, through the fused kernels (one launch per call).

All of them take a stack [L, ...] of tensors of one shape (layers, or several tensors
batched together) and reduce each slot in the same launch:

* :func:`diff_stats` - per slot max and mean of |new - tile(old)| (``layer_diff_stats``);
* :func:`abs_stats` - per slot max and mean of |x|: ``layer_diff_stats`` against a
  stride-0 zero tensor (nothing is allocated for the zeros on the kernel path);
* :func:`twin_stats` - per slot, how far the twin blocks of the tiled dims are from the
  first block: :func:`twin_layout` permutes each tensor so that twin block r is replica r
  of the last dim (for every tiled dim at once; ``torch.stack`` makes the one copy), and
  ``layer_diff_stats`` compares every replica with block 0 in one launch;
"""

from __future__ import annotations

import math

import torch

from growkit.kernels import layer_diff_stats


def diff_stats(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot (dim 0) max and mean of |new - tile(old)|, float32 [L] each."""
    return tuple(layer_diff_stats(old, new))


def abs_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot (dim 0) max and mean of |x|, float32 [L] each. NaN counts as +inf."""
    if x.dim() < 2:
        x = x.reshape(x.shape[0], 1) if x.dim() == 1 else x.reshape(1, 1)
    zeros = torch.zeros((), dtype=torch.float32, device=x.device).expand(x.shape)
    return tuple(layer_diff_stats(zeros, x))


def twin_layout(t: torch.Tensor, axes: list[tuple[int, int]]) -> tuple[torch.Tensor, int, int]:
    """A permuted view of ``t`` whose twin blocks are replicas of the last dim.

    Each tiled dim ``d`` of size ``g * n`` (``axes``: (d, g) pairs) is split into (g, n);
    the g parts are moved just before the innermost dim. Stacking such views (``torch.stack``
    copies anyway) gives [S, ..., G * inner] where replica r of the last dim is twin block r
    (r = 0 is the block every twin is compared with), for all tiled dims at once.

    Returns:
        (view, P, inner): ``view.reshape(P, G * inner)`` is the [rows, replicas*inner] form.
    """
    groups = dict(axes)
    split, kinds = [], []
    for i, size in enumerate(t.shape):
        g = groups.get(i)
        if g:
            if size % g:
                raise ValueError(f"dim {i} of size {size} is not {g} equal blocks")
            split += [g, size // g]
            kinds += ["g", "n"]
        else:
            split.append(size)
            kinds.append("n")
    n_idx = [k for k, kind in enumerate(kinds) if kind == "n"]
    g_idx = [k for k, kind in enumerate(kinds) if kind == "g"]
    view = t.reshape(split).permute(n_idx[:-1] + g_idx + n_idx[-1:])
    rows = math.prod(split[k] for k in n_idx[:-1])
    return view, rows, split[n_idx[-1]]


def twin_stats(stack: torch.Tensor, groups: int, inner: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How far the twin blocks are from block 0, per slot, in one launch.

    Args:
        stack: [S, ..., groups * inner], stacked :func:`twin_layout` views (contiguous).
        groups: number of twin blocks (product over the tiled dims).
        inner: size of the innermost dim of one block.

    Returns:
        (max, mean) float32 [S]: max of |B_g - B_0| over every twin block, and the mean of
        |B_g - B_0| over the twins g >= 1 (block 0 itself excluded).
    """
    if groups < 2:
        raise ValueError(f"groups must be >= 2 to compare twins, got {groups}")
    full = stack.reshape(stack.shape[0], -1, groups * inner)
    # blocks 1..G-1 (views) against block 0: block 0 is not compared with itself
    mx, mean = layer_diff_stats(full[..., :inner], full[..., inner:])
    return mx, mean


def relative(num: float, den: float) -> float:
    """num / den, with 0/0 = 0 and x/0 = inf."""
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den
