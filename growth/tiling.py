"""One tensor grown by its role's width rule: the step every width path shares.

Width growth (``width.py``) and the replay of growth on optimizer moments
(``records.GrowthRecord.map_tensors``) both tile a tensor by its role; this module is
below both, so neither imports the other.
"""

from __future__ import annotations

import torch

from growkit.kernels.hyperclone import SUPPORTED_DTYPES
from growkit.kernels.hyperclone import hyperclone_prevalidated as hyperclone

from .roles import ROLE_RULES, Role


def tile_for_role(
    tensor: torch.Tensor,
    role: Role,
    scale: int,
    *,
    divide: bool = True,
    noise_std: float = 0.0,
    noise: str = "zero_sum",
    seed: int = 0,
) -> torch.Tensor:
    """Grow one tensor of ``role`` by ``scale`` through the fused ``hyperclone`` kernel (the
    arguments were checked where they entered the public API)."""
    rule = ROLE_RULES[role]
    if tensor.dim() != len(rule.dims):
        raise ValueError(
            f"a {role.value} tensor has dims {rule.dims}, but this one has shape {tuple(tensor.shape)}"
        )
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"a {role.value} tensor is {tensor.dtype}: width growth takes float32, float16 or "
                        "bfloat16 models (convert with model.float())")
    reps = rule.repeats(scale)
    divide = divide and rule.input_dim is not None
    if not rule.noise or not divide:
        noise_std = 0.0  # only linear maps with a tiled input get (zero-sum) noise
    if tensor.dim() == 1:
        return hyperclone(tensor, reps[0], 1)
    if tensor.dim() == 3 and reps[0] != 1:  # pragma: no cover - excluded by the table check
        raise ValueError(f"{role.value}: a 3-D tensor's leading dim must not widen")
    return hyperclone(tensor, reps[-2], reps[-1], noise_std=noise_std, noise=noise, seed=seed, divide=divide)
