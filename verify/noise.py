"""Too much clone noise, or a tiling bug? Told apart when a check fails.

Zero-sum noise cancels on a tiled input only in exact arithmetic. A widened projection
maps the clone-difference part of its input (the rounding differences between clones)
through its noise alone::

    row block a of W' [x_A, x_B] = (W/s) (x_A + x_B) + N_a0 (x_A - x_B)      (s = 2, N_a1 = -N_a0)

so every projection multiplies that part by a matrix of norm about noise_std * sqrt(fan_in),
and when that gain passes about 1 the rounding differences grow layer after layer instead of
staying at the rounding level. The grown model is then exact as mathematics and not as
floats, and the checks fail it with the symptoms of a tiling bug.

NOTE: measured on the gpu preset's pair (d256/L6 -> d512/L12 MoE, 8 experts, float32, a
20-step source): functional identity's max rel diff 7e-7 at noise_std 1e-2, 1.1e-5 at 3e-2,
4.5e-4 at 4e-2 (fails the 1e-4 tolerance), 1.2e-2 at 5e-2; the small preset's pair
(d128/L4 -> d256/L8) 8e-6 at 5e-2. Where the growth stops being exact depends on depth and
on the weights, not on noise_std * sqrt(d_model) alone (a random d64/L4 widened failed at
3e-2), so no fixed limit is checked: a failure is explained by measuring instead.

:func:`explain_noise` does that after the checks: when a check failed with a tiling-bug
diagnosis, the grown model carries a zero-sum width record with noise, and

1. every noisy tensor's clone deviations (each input block minus the blocks' mean) have the
   recorded noise's std, within a factor of 2, or none at all (an identity layer's zeroed
   writers): deviations of another size are not the noise_std's doing, and lowering it
   would not help, and
2. the same model with those deviations averaged out (each input block replaced by the
   blocks' mean, which for zero-sum noise is W/s) passes functional identity,

then the failures are re-labelled ``noise_amplified``, with both figures in the cause.
Otherwise the diagnosis stands. A model with no width record at all (widened by another tool,
e.g. Apple's ml-hypercloning, which writes none) is measured the same way against the median
of its deviations instead of a recorded std; a width record without zero-sum noise means any
deviation is a bug, and is never measured. It costs nothing unless a check failed; then, in
memory, one copy of the grown model and one forward pass of it, and layerwise
(``verify/layerwise.py``) a second forward pass of both checkpoints, each noisy tensor
averaged as it loads.
"""

from __future__ import annotations

import copy
import math
import statistics

import torch
from torch import nn

from growkit.growth.adapters import get_adapter
from growkit.growth.roles import ROLE_RULES

from .report import FAILED, TROUBLESHOOTING, CheckResult

# Diagnoses a too-large noise can imitate: it breaks the layer outputs, never the config.
IMITATED = ("weight_expansion_bug", "router_mismatch", "rope_position_break")
STD_FACTOR = 2.0


def recorded_noise(model: nn.Module) -> tuple[float, int] | None:
    """(noise_std, scale) of the model's one zero-sum width growth with noise, else None."""
    widths = _width_records(model)
    if len(widths) != 1:
        return None
    s = widths[0].settings
    std, scale = float(s.get("noise_std", 0) or 0), int(s.get("scale_factor", 1))
    if s.get("noise") != "zero_sum" or std <= 0 or scale < 2:
        return None
    return std, scale


def _width_records(model: nn.Module) -> list:
    return [r for r in getattr(model, "growth_records", None) or [] if r.op == "width"]


def noise_to_measure(model: nn.Module, width_scale: int) -> tuple[float | None, int] | None:
    """(the std the clone deviations should have, scale): the recorded noise's; (None, scale)
    for a model ``width_scale`` times wider with no width record (grown elsewhere: the std is
    then the deviations' median); None where no noise can explain a failure."""
    recorded = recorded_noise(model)
    if recorded is not None:
        return recorded
    if _width_records(model) or width_scale < 2:
        return None
    return None, width_scale


def carries_noise(roles, t: torch.Tensor, scale: int) -> bool:
    """Whether ``t``, the tensor of ``roles`` (:class:`ParamRole` s: a fused tensor has several),
    carries zero-sum clone noise over ``scale`` input blocks."""
    return bool(roles) and not t.shape[-1] % scale and all(ROLE_RULES[pr.role].zero_sum_noise for pr in roles)


def noisy_blocks(model: nn.Module, scale: int):
    """(name, tensor view, blocks view [..., s, I]) of every tensor that carries zero-sum noise."""
    adapter = get_adapter(model, "verification")
    params = adapter.role_params(model)
    for name, pr in adapter.param_roles(model).items():
        t = params.get(name)
        if t is None or not carries_noise([pr], t, scale):
            continue
        yield name, t, t.unflatten(-1, (scale, t.shape[-1] // scale))


@torch.no_grad()
def clone_deviation_std(model: nn.Module, scale: int) -> dict[str, float]:
    """Per noisy tensor: the std of (input block - mean of the input blocks); for zero-sum
    noise that is the noise itself, so its std is the noise's."""
    return {name: denoise_tensor(t, scale)[1] for name, t, _ in noisy_blocks(model, scale)}


@torch.no_grad()
def denoised_copy(model: nn.Module, scale: int) -> nn.Module:
    """A copy of ``model`` with every noisy tensor's input blocks replaced by their mean."""
    quiet = copy.deepcopy(model)
    for _, t, _ in noisy_blocks(quiet, scale):
        t.copy_(denoise_tensor(t, scale)[0])
    if getattr(quiet, "growth_records", None):
        quiet.growth_records = without_noise_record(quiet.growth_records)
    return quiet


def without_noise_record(records: list) -> list:
    """The records of a model whose clone noise was averaged out: the width record goes (it
    would say the model carries noise), the depth records, which pair the layers, stay."""
    return [r for r in records if r.op != "width"]


def denoise_tensor(t: torch.Tensor, scale: int) -> tuple[torch.Tensor, float]:
    """(``t`` with its input blocks replaced by their mean, the std of the deviations)."""
    blocks = t.float().unflatten(-1, (scale, t.shape[-1] // scale))
    mean = blocks.mean(dim=-2, keepdim=True)
    dev = float((blocks - mean).pow(2).mean().sqrt())
    return mean.expand_as(blocks).reshape(t.shape).to(t.dtype), dev


def explain_noise(results: list[CheckResult], new: nn.Module, measure, width_scale: int) -> None:
    """Re-label ``results``' tiling-bug failures ``noise_amplified`` where measured so.

    ``measure(scale)`` returns (per noisy tensor: the std of its clone deviations, the
    functional-identity :class:`CheckResult` of the source against ``new`` with them averaged
    out); it runs only when a failure could be the noise's. ``width_scale``: how many times
    wider ``new`` is than the source (used where ``new`` has no width record).
    """
    failing = [r for r in results if r.status == FAILED and r.diagnosis in IMITATED]
    noise = noise_to_measure(new, width_scale) if failing else None
    if noise is None:
        return
    std, scale = noise
    deviations, quiet = measure(scale)
    # tensors with equal clones carry no noise (an identity layer's zeroed writers): skipped
    floor = 1e-3 * (std if std is not None else max(deviations.values(), default=0.0))
    devs = [v for v in deviations.values() if v > floor]
    if not devs:
        return
    recorded = std is not None
    std = std if recorded else float(statistics.median(devs))
    lo, hi = min(devs), max(devs)
    if not (std / STD_FACTOR <= lo and hi <= std * STD_FACTOR) or quiet.status == FAILED:
        return
    d_model = get_adapter(new, "verification").cfg(new, "d_model")
    gain = std * math.sqrt(d_model) if d_model else float("nan")
    which = (f"noise_std {std:g}" if recorded
             else f"no width record: noise_std measured, the median of the deviations, {std:.3g}")
    for r in failing:
        r.cause = (
            f"the width growth's zero-sum noise ({which}; noise_std * sqrt(d_model) = {gain:.2f}) "
            "cancels only in exact arithmetic: each projection multiplies the rounding differences "
            "between clones by its noise, and here they grew layer by layer. Measured: every noisy "
            f"tensor's clone deviations have {'the recorded' if recorded else 'that'} std, within "
            f"{STD_FACTOR:g}x ({lo:.3g}..{hi:.3g}), and with them averaged out the model matches its "
            f"source ({quiet.summary}). What the check saw: " + (r.cause or r.summary)
        )
        r.diagnosis = "noise_amplified"
        r.fix = TROUBLESHOOTING["noise_amplified"].fix
        r.figures["denoised_functional_identity"] = quiet.status
        r.figures["clone_deviation_std"] = [lo, hi]
