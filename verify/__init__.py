"""Verify grown models: the four growth checks, a quick sanity check, a training-loop monitor.

    from growkit.verify import detailed_growth_check, run_growth_checks
    ok = detailed_growth_check(old, new, probe, "cpu", scale_factor=2)   # prints the report
    report = run_growth_checks(old, new, probe, scale_factor=2)          # .passed, .to_json()

Checks (one registry, :data:`GROWTH_CHECKS`; each alone, with run_growth_checks' arguments,
returns a :class:`CheckResult`): :func:`check_rope_integrity`, :func:`check_router_scaling`,
:func:`check_symmetry_breaking`, :func:`check_functional_identity_layerwise`;
:func:`verify_functional_equivalence` for the
dense -> MoE step; :func:`quick_sanity_check` for one model; :class:`GrowthMonitor` for a
training loop, on one process or on every rank of a DDP / FSDP2 model
(:mod:`growkit.verify.distributed`); :class:`GrowthMonitorCallback` (with
:func:`add_growth_monitor`) runs it in ``transformers.Trainer`` (imported on first use:
growkit.verify itself does not need transformers). See docs/GROWTH_VERIFICATION.md.
"""

from .api import (
    check_functional_identity_layerwise,
    check_rope_integrity,
    check_router_scaling,
    check_symmetry_breaking,
    detailed_growth_check,
    run_growth_checks,
    verify_functional_equivalence,
)
from .checks import GROWTH_CHECKS, GrowthCheck
from .context import DEFAULT_TOLERANCE, DTYPE_TOLERANCES, default_tolerance
from .monitor import GrowthMonitor, GrowthWarning, MonitorRecord
from .probe import make_probe
from .report import FAILED, PASSED, SKIPPED, TROUBLESHOOTING, CheckResult, Diagnosis, GrowthReport
from .sanity import quick_sanity_check

__all__ = [
    "CheckResult",
    "DEFAULT_TOLERANCE",
    "DTYPE_TOLERANCES",
    "GROWTH_CHECKS",
    "GrowthCheck",
    "Diagnosis",
    "FAILED",
    "GrowthMonitor",
    "GrowthReport",
    "GrowthWarning",
    "MonitorRecord",
    "PASSED",
    "SKIPPED",
    "TROUBLESHOOTING",
    "check_functional_identity_layerwise",
    "default_tolerance",
    "check_rope_integrity",
    "check_router_scaling",
    "check_symmetry_breaking",
    "detailed_growth_check",
    "make_probe",
    "quick_sanity_check",
    "run_growth_checks",
    "verify_functional_equivalence",
]


_HF_CALLBACK = ("GrowthMonitorCallback", "add_growth_monitor", "monitor_metrics")


def __getattr__(name):
    # transformers is optional: the Trainer callback is imported when first asked for
    if name in _HF_CALLBACK:
        from . import hf_callback

        return getattr(hf_callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
