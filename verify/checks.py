"""The four growth checks, one registry: each is ``check(ctx: Comparison) -> CheckResult``.

A check reads everything it needs from the shared :class:`~growkit.verify.context.Comparison`
(the models, the probe runs, the layer pairing, the tolerance and the thresholds), so the
four together cost one forward pass of each model and one backward pass of the new one.
``run_growth_checks`` runs them in the registry's order; ``check_rope_integrity`` and the
other single-check functions (``verify/api.py``) run one of them with the same arguments.

Adding a check: write ``my_check(ctx) -> CheckResult`` and add a :class:`GrowthCheck` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import identity, rope, router, symmetry
from .context import Comparison
from .report import CheckResult


@dataclass(frozen=True)
class GrowthCheck:
    """One check: its name (the ``CheckResult.name`` and the report key), title, function,
    and whether it needs the new model's backward pass (gradients of the probe loss)."""

    name: str
    title: str
    run: Callable[[Comparison], CheckResult]
    needs_backward: bool = False


GROWTH_CHECKS: dict[str, GrowthCheck] = {c.name: c for c in (
    GrowthCheck(rope.NAME, rope.TITLE, rope.rope_check),
    GrowthCheck(router.NAME, router.TITLE, router.router_check),
    GrowthCheck(symmetry.NAME, symmetry.TITLE, symmetry.symmetry_from_context, needs_backward=True),
    GrowthCheck(identity.NAME, identity.TITLE, identity.identity_check),
)}


def select_checks(names) -> list[GrowthCheck]:
    """The registry entries named (None: all four, in order); ValueError listing the names."""
    if names is None:
        return list(GROWTH_CHECKS.values())
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in GROWTH_CHECKS]
    if unknown or not names:
        raise ValueError(f"checks must name some of {', '.join(GROWTH_CHECKS)}, got {list(names)!r}")
    return [GROWTH_CHECKS[n] for n in GROWTH_CHECKS if n in set(names)]
