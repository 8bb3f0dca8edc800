"""Carry Adam's moments across growth, so the optimizer does not restart cold.

With symmetric clones each grown block's gradient is a known multiple c of the source
gradient (``RoleRule.gradient_factor``: 1/s where the output is tiled, 1 where only the
input is). Mapping the first moment by c and the second by c^2 keeps m / sqrt(v), and so
each block's Adam update, equal to the source's update. Identity layers start with zero
moments; upcycled experts take 1/E of the dense moments (each sees about 1/E of the
routing mass); fresh routers start at zero.
"""

from __future__ import annotations

import torch
from torch import nn


def transfer_adam_state(
    old_model: nn.Module,
    new_model: nn.Module,
    old_optimizer: torch.optim.Optimizer,
    new_optimizer: torch.optim.Optimizer,
) -> int:
    """Fill ``new_optimizer``'s state for ``new_model`` from ``old_optimizer``'s.

    Args:
        old_model: the model ``old_optimizer`` optimized.
        new_model: a model returned by a growkit growth operator (it carries
            ``growth_records``).
        old_optimizer, new_optimizer: Adam or AdamW (state keys ``step``, ``exp_avg``,
            ``exp_avg_sq``); ``new_optimizer`` must optimize ``new_model``'s parameters.

    Returns:
        The number of new parameters that received a state (0 when ``old_optimizer`` has
        not taken a step yet).

    Raises:
        ValueError: If ``new_model`` carries no growth records, or an optimizer holds none
            of its model's parameters (the wrong optimizer: nothing could be carried over).
    """
    records = getattr(new_model, "growth_records", None)
    if not records:
        raise ValueError(
            "new_model has no growth_records: pass the model a growkit growth operator returned"
        )
    for name, opt, model, which in (("old_optimizer", old_optimizer, old_model, "old_model"),
                                     ("new_optimizer", new_optimizer, new_model, "new_model")):
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"{name} must be a torch.optim.Optimizer (Adam or AdamW), got {type(opt).__name__}")
        held = {id(p) for group in opt.param_groups for p in group["params"]}
        if not any(id(p) in held for p in model.parameters()):
            raise ValueError(
                f"{name} holds none of {which}'s parameters ({len(held)} others): pass the optimizer "
                f"built over {which}.parameters()"
                + (" (the one that trained it)" if which == "old_model" else ""))
    from .adapters import get_adapter

    old_adapter, new_adapter = get_adapter(old_model, "optimizer-state transfer"), get_adapter(new_model)
    old_state = old_optimizer.state
    first, second, steps = {}, {}, []
    for name, p in old_model.named_parameters():
        st = old_state.get(p)
        if not st or "exp_avg" not in st:
            continue
        first[name], second[name] = st["exp_avg"], st["exp_avg_sq"]
        steps.append(st["step"])
    if not first:
        return 0
    # growth records name tensors by role (the parts of fused tensors): split, map, re-fuse
    first, second = old_adapter.split(old_model, first), old_adapter.split(old_model, second)
    for record in records:
        first = {k: v for k, v in record.map_tensors(first, moment=1).items() if v is not None}
        second = {k: v for k, v in record.map_tensors(second, moment=2).items() if v is not None}
    first = new_adapter.fuse(first, skip_incomplete=True)
    second = new_adapter.fuse(second, skip_incomplete=True)
    step = max(steps, key=lambda s: float(s))
    new_params = dict(new_model.named_parameters())
    managed = {id(p) for group in new_optimizer.param_groups for p in group["params"]}
    filled = 0
    for name, p in new_params.items():
        if name not in first or id(p) not in managed:
            continue
        new_optimizer.state[p] = {
            "step": step.clone() if torch.is_tensor(step) else torch.tensor(float(step)),
            "exp_avg": first[name].to(device=p.device, dtype=p.dtype).contiguous(),
            "exp_avg_sq": second[name].to(device=p.device, dtype=p.dtype).contiguous(),
        }
        filled += 1
    return filled
