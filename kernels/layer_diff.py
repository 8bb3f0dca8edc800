"""Per-layer max and mean of |new - tile(old)| for all layers in one launch.

``old`` [L, ..., d] and ``new`` [L, ..., s*d] (s >= 1 a whole number): for every layer l,
every replica r and every element::

    new[l, ..., r*d:(r+1)*d]  -  old[l, ..., :]          (the tiled old, never materialized)

reduced to ``max`` and ``mean`` of the absolute value, float32 [L] each. Used by the
layer-by-layer functional-identity check (hidden states of a width-grown model against the
tiled hidden states of the source model).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .backend import HAS_TRITON, use_triton
from .paired_diff import nan_as_inf

if HAS_TRITON:
    from .paired_diff import paired_diff_triton


class LayerDiffStats(NamedTuple):
    max_diff: torch.Tensor   # [L] float32
    mean_diff: torch.Tensor  # [L] float32


def _stack(name: str, x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.dim() < 2:
            raise ValueError(f"{name} must be [L, ..., d] with at least 2 dims, got shape {tuple(x.shape)}")
        return x
    if isinstance(x, (list, tuple)):
        if not x or not all(isinstance(t, torch.Tensor) for t in x):
            raise TypeError(f"{name} must be a tensor [L, ..., d] or a non-empty list of L tensors")
        shapes = {tuple(t.shape) for t in x}
        if len(shapes) != 1:
            raise ValueError(f"{name}: the L tensors must share one shape, got {sorted(shapes)}")
        # NOTE: a list is stacked (one copy); pass a stacked tensor to avoid it.
        return torch.stack(list(x))
    raise TypeError(f"{name} must be a tensor [L, ..., d] or a list of L tensors, got {type(x).__name__}")


def _check(old, new) -> tuple[torch.Tensor, torch.Tensor, int]:
    old, new = _stack("old", old), _stack("new", new)
    if old.dim() != new.dim():
        raise ValueError(f"old and new must have the same rank, got {tuple(old.shape)} and {tuple(new.shape)}")
    if old.shape[0] != new.shape[0]:
        raise ValueError(f"old and new must have the same number of layers L, got {old.shape[0]} and {new.shape[0]}")
    if old.shape[1:-1] != new.shape[1:-1]:
        raise ValueError(
            f"old and new must match in every dim but the last, got {tuple(old.shape)} and {tuple(new.shape)}"
        )
    d, wide = old.shape[-1], new.shape[-1]
    if d == 0 or wide % d != 0:
        raise ValueError(
            f"new's last dim ({wide}) must be a whole multiple s >= 1 of old's ({d}): "
            "compare a grown tensor with the tensor it was grown from"
        )
    if old.device != new.device:
        raise ValueError(f"old is on {old.device} and new on {new.device}: move them to one device")
    for name, t in (("old", old), ("new", new)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return old, new, wide // d


def naive_layer_diff_stats(old, new) -> LayerDiffStats:
    """Eager reference: one layer at a time, the tiled difference materialized per layer.

    NOTE: per layer, and NaN mapped to inf on the [L] results rather than on the
    differences: the first version (all layers at once, ``nan_to_num`` over the whole
    difference) measured 3x slower than a plain per-layer loop on the CPU (136 vs 45 ms
    for 12 layers of [2048, 512] x2; now on par with it). ``amax`` and ``mean`` propagate
    NaN, so a layer with a NaN difference still reports inf (``nan_as_inf``).
    """
    old, new, s = _check(old, new)
    L, d = old.shape[0], old.shape[-1]
    old3, new3 = old.reshape(L, -1, d), new.reshape(L, -1, s * d)
    if old3.shape[1] == 0:
        z = torch.zeros(L, dtype=torch.float32, device=old.device)
        return LayerDiffStats(z, z.clone())
    maxes, means = [], []
    for o, n in zip(old3, new3):
        diff = (n.view(-1, s, d).float() - o.float().unsqueeze(1)).abs_()
        maxes.append(diff.amax())
        means.append(diff.mean())
    return LayerDiffStats(nan_as_inf(torch.stack(maxes)), nan_as_inf(torch.stack(means)))


def layer_diff_stats(old, new, *, backend: str | None = None) -> LayerDiffStats:
    """Per-layer max and mean |new - tile(old)| over every replica, one launch for all layers.

    Args:
        old: [L, ..., d] tensor, or a list of L tensors [..., d].
        new: [L, ..., s*d] tensor, or a list of L tensors [..., s*d]; s >= 1 whole.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; None reads ``GROWKIT_BACKEND``.

    Returns:
        ``LayerDiffStats(max_diff, mean_diff)``, float32 [L] each. A NaN difference counts
        as +inf.
    """
    old, new, s = _check(old, new)
    if not use_triton(old.device, backend):
        return naive_layer_diff_stats(old, new)
    L, d = old.shape[0], old.shape[-1]
    # reshape is a view whenever the middle dims can merge; otherwise it copies once.
    old3 = old.reshape(L, -1, d)
    new3 = new.reshape(L, -1, s * d)
    mx, mean, _ = paired_diff_triton(
        new3, old3, s,
        a_strides=tuple(new3.stride()), b_strides=tuple(old3.stride()),
        n_slots=L, P=old3.shape[1], D=d, with_magnitude=False,
    )
    return LayerDiffStats(mx, mean)
