"""The growth checks together: one shared forward/backward, one report.

``run_growth_checks`` runs the four checks of the registry (``verify/checks.py``) on one
:class:`~growkit.verify.context.Comparison`:
the old model's forward pass, the new model's forward pass and (when there are clones) one
backward pass are shared by all of them, so the whole verification costs those passes plus
a few fused reductions per check. ``detailed_growth_check`` prints the report and returns
the verdict; ``verify_functional_equivalence`` is the dense -> MoE step's check and prints
nothing unless ``verbose=True``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from growkit.growth.adapters import get_adapter

from .checks import GROWTH_CHECKS, select_checks
from .context import DEFAULT_COLLAPSE_SHARE, DEFAULT_MIN_DIVERGENCE, Comparison, check_pair
from .identity import identity_check
from .noise import clone_deviation_std, denoised_copy, explain_noise
from .report import CheckResult, GrowthReport
from .state import check_device, on_device
from .symmetry import has_upcycled_experts

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
    checks: Sequence[str] | None = None,
) -> GrowthReport:
    """Run the growth checks in sequence and return the structured report.

    Checks (``verify.checks.GROWTH_CHECKS``, in this order): RoPE integrity, router
    scaling, symmetry breaking, layerwise functional identity. Nothing is printed.

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
        checks: names of the checks to run (None: all four): ``rope_integrity``,
            ``router_scaling``, ``symmetry_breaking``, ``functional_identity``.

    Returns:
        A :class:`GrowthReport` (``.passed``, ``report[name]``, ``str(report)``, ``.to_json()``).

    Raises:
        ValueError: before anything runs or moves: ``device`` unknown to torch, ``"meta"``
            or absent on this machine (``"cuda"`` without CUDA); a model growkit cannot
            read (the message lists what is supported); vocabularies of different sizes;
            a setting out of range.
        TypeError: a model that is not an ``nn.Module``; a setting of the wrong kind.
    """
    t_start = time.perf_counter()
    # Refused before anything moves: a device the checks cannot run on, models they cannot
    # read, unknown check names.
    check_device(device)
    check_pair(old_model, new_model)
    selected = select_checks(checks)
    with on_device([old_model, new_model], device) as dev:
        if probe is not None and isinstance(probe, torch.Tensor):
            probe = probe.to(dev)
        ctx = Comparison(old_model, new_model, probe, scale_factor=scale_factor, tolerance=tolerance,
                         min_divergence=min_divergence, collapse_share=collapse_share)
        seconds: dict[str, float] = {}
        t = time.perf_counter()
        ctx.old_run()
        seconds["old forward"] = time.perf_counter() - t
        t = time.perf_counter()
        backward = any(c.needs_backward for c in selected) and (
            ctx.twin_scale > 1 or has_upcycled_experts(new_model))
        ctx.new_run(backward=backward)
        seconds["new forward" + ("+backward" if backward else "")] = time.perf_counter() - t
        results = []
        for check in selected:
            t = time.perf_counter()
            result = check.run(ctx)
            result.seconds = time.perf_counter() - t
            results.append(result)
        # A failure that too large a clone noise explains is told from a tiling bug here
        # (costs nothing unless a check failed): see verify/noise.py.
        explain_noise(results, new_model, lambda s: (clone_deviation_std(new_model, s), identity_check(
            Comparison(old_model, denoised_copy(new_model, s), ctx.probe, scale_factor=scale_factor,
                       tolerance=tolerance))), ctx.twin_scale)
        seconds["checks"] = sum(c.seconds for c in results)
        seconds["total"] = time.perf_counter() - t_start
        return GrowthReport("Growth verification", results, _meta(ctx, dev, seconds))


def _one_check(name: str, old_model, new_model, probe, device, scale_factor, tolerance,
               min_divergence, collapse_share) -> CheckResult:
    return run_growth_checks(old_model, new_model, probe, device, scale_factor, tolerance,
                             min_divergence=min_divergence, collapse_share=collapse_share,
                             checks=[name])[name]


# The four checks one at a time. They share run_growth_checks' arguments (scale_factor
# defaults to None here: read from the models), move and restore the models the same way,
# and each returns its CheckResult. Run all four with run_growth_checks: the passes they
# share are then made once.
def check_rope_integrity(old_model: nn.Module, new_model: nn.Module, probe: torch.Tensor | None = None,
                         device: torch.device | str | None = None, scale_factor: int | None = None,
                         tolerance: float | None = None, *, min_divergence: float = DEFAULT_MIN_DIVERGENCE,
                         collapse_share: float = DEFAULT_COLLAPSE_SHARE) -> CheckResult:
    """Head structure and position-by-position attention outputs (``verify/rope.py``):
    head_dim kept, heads multiplied like d_model, RoPE parameters equal; every layer's
    attention output equal to the tiled old one at every position. Arguments as
    :func:`run_growth_checks`. Returns the ``rope_integrity`` result."""
    return _one_check("rope_integrity", old_model, new_model, probe, device, scale_factor, tolerance,
                      min_divergence, collapse_share)


def check_router_scaling(old_model: nn.Module, new_model: nn.Module, probe: torch.Tensor | None = None,
                         device: torch.device | str | None = None, scale_factor: int | None = None,
                         tolerance: float | None = None, *, min_divergence: float = DEFAULT_MIN_DIVERGENCE,
                         collapse_share: float = DEFAULT_COLLAPSE_SHARE) -> CheckResult:
    """Every MoE layer's router logits against the old ones and its expert load
    (``verify/router.py``); a layer whose top_k busiest experts take ``collapse_share`` of
    the routing slots has collapsed. Arguments as :func:`run_growth_checks`. Returns the
    ``router_scaling`` result (SKIPPED for dense models)."""
    return _one_check("router_scaling", old_model, new_model, probe, device, scale_factor, tolerance,
                      min_divergence, collapse_share)


def check_symmetry_breaking(old_model: nn.Module, new_model: nn.Module, probe: torch.Tensor | None = None,
                            device: torch.device | str | None = None, scale_factor: int | None = None,
                            tolerance: float | None = None, *, min_divergence: float = DEFAULT_MIN_DIVERGENCE,
                            collapse_share: float = DEFAULT_COLLAPSE_SHARE) -> CheckResult:
    """One backward pass on the probe; the twin divergence of every cloned weight and its
    gradient (``verify/symmetry.py``), experts compared along the experts dim when the
    model was upcycled. Arguments as :func:`run_growth_checks` (the clones' scale is the
    measured width ratio of the two models). Returns the ``symmetry_breaking`` result."""
    if isinstance(new_model, torch.Tensor) or new_model is None:
        raise TypeError("check_symmetry_breaking takes (old_model, new_model, probe, ...) like the other "
                        "checks: pass the source model first")
    return _one_check("symmetry_breaking", old_model, new_model, probe, device, scale_factor, tolerance,
                      min_divergence, collapse_share)


def check_functional_identity_layerwise(old_model: nn.Module, new_model: nn.Module, probe: torch.Tensor | None = None,
                                        device: torch.device | str | None = None, scale_factor: int | None = None,
                                        tolerance: float | None = None, *,
                                        min_divergence: float = DEFAULT_MIN_DIVERGENCE,
                                        collapse_share: float = DEFAULT_COLLAPSE_SHARE) -> CheckResult:
    """The embedding, every layer's hidden state and the logits against the tiled source
    (``verify/identity.py``); the first layer that breaks is named. Arguments as
    :func:`run_growth_checks`. Returns the ``functional_identity`` result."""
    return _one_check("functional_identity", old_model, new_model, probe, device, scale_factor, tolerance,
                      min_divergence, collapse_share)


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
        result = GROWTH_CHECKS["functional_identity"].run(ctx)
        result.seconds = time.perf_counter() - t
        seconds = {"total": time.perf_counter() - t_start}
        report = GrowthReport("Dense -> MoE functional equivalence", [result], _meta(ctx, dev, seconds))
    if verbose:
        print(report)
    return report
