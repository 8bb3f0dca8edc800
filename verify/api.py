"""The growth checks together: one shared forward/backward, one report.

``run_growth_checks`` runs the four checks on one :class:`~growkit.verify.context.Comparison`:
the old model's forward pass, the new model's forward pass and (when there are clones) one
backward pass are shared by all of them, so the whole verification costs those passes plus
a few fused reductions per check. ``detailed_growth_check`` prints the report and returns
the verdict; ``verify_functional_equivalence`` is the dense -> MoE step's check and prints
nothing unless ``verbose=True``.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .context import Comparison, check_pair
from .identity import identity_check
from growkit.growth.adapters import get_adapter

from .report import GrowthReport
from .rope import rope_check
from .router import DEFAULT_COLLAPSE_SHARE, router_check
from .state import check_device, on_device
from .symmetry import DEFAULT_MIN_DIVERGENCE, has_upcycled_experts, symmetry_from_context

CONFIG_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "n_experts", "top_k")


def _config_line(model: nn.Module) -> str:
    adapter = get_adapter(model, "verification")
    values = [(k, adapter.cfg(model, k)) for k in CONFIG_FIELDS]
    return f"{type(model).__name__}: " + ", ".join(f"{k}={v}" for k, v in values if v is not None)


def _meta(ctx: Comparison, device: torch.device, seconds: dict) -> dict:
    records = [r.summary() for r in getattr(ctx.new, "growth_records", None) or []]
    return {
        "old model": _config_line(ctx.old),
        "new model": _config_line(ctx.new),
        "growth records": records or ["none (layers paired by inference)"],
        "scale (expected, measured)": f"{ctx.expected_scale if ctx.expected_scale is not None else '-'}, {ctx.scale}",
        "probe": f"[{ctx.probe.shape[0]}, {ctx.probe.shape[1]}] token ids",
        "device": str(device),
        "tolerance": ctx.tolerance,
        "seconds": seconds,
    }


def run_growth_checks(
    old_model: nn.Module,
    new_model: nn.Module,
    probe: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    scale_factor: int | None = 2,
    tolerance: float | None = None,
    *,
    min_divergence: float = DEFAULT_MIN_DIVERGENCE,
    collapse_share: float = DEFAULT_COLLAPSE_SHARE,
) -> GrowthReport:
    """Run the four growth checks in sequence and return the structured report.

    Checks: RoPE integrity, router scaling, symmetry breaking, layerwise functional
    identity (in that order). Nothing is printed.

    Args:
        old_model: the source model.
        new_model: the grown model.
        probe: [B, T] token ids, T >= 2 (default: a seeded random [2, 16] probe).
        device: where to run (None: the new model's device). Both models are moved there
            and back to where each was; their parameters, gradients, requires_grad flags,
            train/eval modes and MoE per-forward attributes are left as they were.
        scale_factor: the width scale expected (2 by default; 1 for depth-only growth or
            upcycling; None reads it from the models). A mismatch fails the RoPE check's
            structure part.
        tolerance: relative tolerance: ``max|diff| <= tolerance * max|reference|``; None:
            1e-4 for float32 models, 0.05 for float16, 0.25 for bfloat16 (``DTYPE_TOLERANCES``).
        min_divergence: twins at or below this relative divergence count as identical.
        collapse_share: share of routing slots on the top_k busiest experts that counts as collapse.

    Returns:
        A :class:`GrowthReport` (``.passed``, ``report[name]``, ``str(report)``, ``.to_json()``).

    Raises:
        ValueError: before anything runs or moves: ``device`` unknown to torch, ``"meta"``
            or absent on this machine (``"cuda"`` without CUDA); a model growkit cannot
            read (the message lists what is supported); vocabularies of different sizes.
        TypeError: a model that is not an ``nn.Module``.
    """
    t_start = time.perf_counter()
    # Refused before anything moves: a device the checks cannot run on, models they cannot read.
    check_device(device)
    check_pair(old_model, new_model)
    with on_device([old_model, new_model], device) as dev:
        if probe is not None and isinstance(probe, torch.Tensor):
            probe = probe.to(dev)
        ctx = Comparison(old_model, new_model, probe, scale_factor=scale_factor, tolerance=tolerance)
        seconds: dict[str, float] = {}
        t = time.perf_counter()
        ctx.old_run()
        seconds["old forward"] = time.perf_counter() - t
        t = time.perf_counter()
        ctx.new_run(backward=ctx.twin_scale > 1 or has_upcycled_experts(new_model))
        seconds["new forward+backward"] = time.perf_counter() - t
        checks = []
        for fn in (
            rope_check,
            lambda c: router_check(c, collapse_share),
            lambda c: symmetry_from_context(c, min_divergence),
            identity_check,
        ):
            t = time.perf_counter()
            result = fn(ctx)
            result.seconds = time.perf_counter() - t
            checks.append(result)
        seconds["checks"] = sum(c.seconds for c in checks)
        seconds["total"] = time.perf_counter() - t_start
        return GrowthReport("Growth verification", checks, _meta(ctx, dev, seconds))


def detailed_growth_check(
    old_model: nn.Module,
    new_model: nn.Module,
    probe: torch.Tensor | None,
    device: torch.device | str | None,
    scale_factor: int | None = 2,
    tolerance: float | None = None,
    **kwargs,
) -> bool:
    """Run the four checks on ``device``, print the text report, return True if none failed.

    Same arguments as :func:`run_growth_checks` (``min_divergence``, ``collapse_share`` as
    keywords). The report ends with one summary line per check (PASSED, FAILED or SKIPPED).
    """
    report = run_growth_checks(old_model, new_model, probe, device, scale_factor, tolerance, **kwargs)
    print(report)
    return report.passed


def verify_functional_equivalence(
    dense_model: nn.Module,
    moe_model: nn.Module,
    probe: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    *,
    tolerance: float | None = None,
    verbose: bool = False,
) -> GrowthReport:
    """The dense -> MoE step: layerwise hidden states and logits at scale 1.

    Returns a :class:`GrowthReport` holding the ``functional_identity`` check (``.passed``,
    ``str(report)``, ``.to_json()``). Prints nothing unless ``verbose=True``.

    Raises:
        ValueError: if the two models differ in width (use :func:`run_growth_checks`), or
            in vocabulary, or ``device`` is one the check cannot run on.
        TypeError: if a model is not an ``nn.Module``.
    """
    t_start = time.perf_counter()
    check_device(device)
    check_pair(dense_model, moe_model, ("dense_model", "moe_model"))
    with on_device([dense_model, moe_model], device) as dev:
        if probe is not None and isinstance(probe, torch.Tensor):
            probe = probe.to(dev)
        ctx = Comparison(dense_model, moe_model, probe, scale_factor=1, tolerance=tolerance)
        if ctx.scale != 1:
            raise ValueError(
                f"the MoE model is {ctx.scale} x as wide as the dense one: verify_functional_equivalence "
                "checks the upcycling step alone (scale 1); use run_growth_checks for width growth"
            )
        t = time.perf_counter()
        result = identity_check(ctx)
        result.seconds = time.perf_counter() - t
        seconds = {"total": time.perf_counter() - t_start}
        report = GrowthReport("Dense -> MoE functional equivalence", [result], _meta(ctx, dev, seconds))
    if verbose:
        print(report)
    return report
