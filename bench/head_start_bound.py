"""How much compute can a function-preserving growth save, at best? A scaling-law bound.

    python bench/head_start_bound.py                  # Chinchilla's fit, ratios 2..1000
    python bench/head_start_bound.py --ratios 10.6    # the micro preset's pair

A growth that preserves the function hands the large model the small model's loss, no
more. If the grown model then learns as a fresh large model does from that loss, the
FLOPs it saves are the *head start*: what the large model from scratch needs to reach the
small model's loss at the growth, minus what the small model spent. Growth can only be
worth it past the *crossover*, the budget from which the large model from scratch ends
below the small one trained on; so the smallest fraction of a from-scratch run's FLOPs a
growth recipe can need to reach its final loss is ``1 - max head start / crossover``.

The loss model is a parametric scaling law ``L(N, D) = E + A N^-alpha + B D^-beta`` with
training FLOPs ``F = 6 N D``, by default the fit of Hoffmann et al. 2022 (Chinchilla,
approach 3: E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28); ``--fit`` takes another.
``N`` is the parameter count of the small model (``--n-small``); the result depends on the
ratio of the two sizes, not on ``N`` (multiplying both sizes by k multiplies every loss
excess over E by k^-alpha and every FLOPs figure by k^(1 + alpha/beta)). Measured curves
replace this model where they exist (``bench/crossover.py``); the bound says what to
expect of pairs not measured.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_cli, usage_error  # noqa: E402

#: Hoffmann et al. 2022, approach 3 (E, A, B, alpha, beta).
CHINCHILLA = (1.69, 406.4, 410.7, 0.34, 0.28)


def loss(fit: tuple[float, ...], n: float, flops: float) -> float:
    """The fit's loss of ``n`` parameters trained for ``flops`` (``D = flops / 6n``)."""
    e, a, b, alpha, beta = fit
    return e + a * n ** -alpha + b * (flops / (6 * n)) ** -beta


def flops_to_loss(fit: tuple[float, ...], n: float, target: float) -> float:
    """Training FLOPs ``n`` parameters need to reach ``target`` (inf: never)."""
    e, a, b, alpha, beta = fit
    excess = target - e - a * n ** -alpha
    return math.inf if excess <= 0 else 6 * n * (b / excess) ** (1 / beta)


def crossover(fit: tuple[float, ...], n_small: float, n_large: float) -> float:
    """The FLOPs at which ``n_large`` from scratch reaches the loss of ``n_small`` (bisection
    on log FLOPs; below it the small model is lower, above it the large one)."""
    def gap(log_f: float) -> float:
        f = math.exp(log_f)
        return loss(fit, n_small, f) - loss(fit, n_large, f)

    lo, hi = math.log(6 * n_large), math.log(6 * n_large) + 200.0
    if gap(lo) > 0 or gap(hi) <= 0:
        raise ValueError("no crossover in range: give n_large > n_small")
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gap(mid) <= 0 else (lo, mid)
    return math.exp(hi)


def head_start_bound(fit: tuple[float, ...], n_small: float, ratio: float,
                     points: int = 4000) -> dict[str, float]:
    """The largest head start a growth of ``n_small`` into ``ratio * n_small`` parameters
    can hand over, searched on a log grid of growth points below the crossover.

    Returns:
        ``crossover`` (FLOPs), ``max_head_start`` (FLOPs), ``at`` (the growth point as a
        fraction of the crossover) and ``best_fraction`` (``1 - max_head_start /
        crossover``: the least fraction of the from-scratch run's FLOPs a recipe can need
        to reach its final loss at the crossover budget; larger budgets only raise it).
    """
    if not ratio > 1:
        raise ValueError(f"ratio must be > 1 (the grown model is larger), got {ratio}")
    n_large = ratio * n_small
    fx = crossover(fit, n_small, n_large)
    best, at = 0.0, 0.0
    for i in range(points + 1):
        f = fx * 10 ** (-8 * (1 - i / points))
        lead = flops_to_loss(fit, n_large, loss(fit, n_small, f)) - f
        if lead > best:
            best, at = lead, f / fx
    return {"crossover": fx, "max_head_start": best, "at": at,
            "best_fraction": 1 - best / fx}


@dataclass
class Args:
    ratios: Annotated[tuple[float, ...], tyro.conf.arg(metavar="FLOAT [FLOAT ...]")] = (2, 4, 10, 30, 100, 300, 1000)
    """parameter ratios grown / source (each > 1)"""
    n_small: float = 1e8
    """source model's parameters"""
    fit: Annotated[tuple[float, float, float, float, float],
                   tyro.conf.arg(metavar="E A B ALPHA BETA", help_behavior_hint=lambda default: f"({default})")] = CHINCHILLA
    """L(N, D) = E + A N^-ALPHA + B D^-BETA (default: Chinchilla's)"""


def main(argv=None) -> list[dict]:
    args = parse_cli(Args, argv, description=__doc__.split("\n\n")[0])
    if any(not r > 1 for r in args.ratios):
        usage_error("--ratios: each must be > 1 (the grown model is the larger)")
    if not args.n_small > 0 or any(not x > 0 for x in args.fit[1:]):
        usage_error("--n-small and --fit's A, B, ALPHA, BETA must be > 0")
    rows = []
    print(f"{'ratio':>7} {'crossover FLOPs':>16} {'max head start':>15} {'of crossover':>13} "
          f"{'grown at':>9} {'least FLOPs fraction':>21}")
    for r in args.ratios:
        h = head_start_bound(tuple(args.fit), args.n_small, r)
        rows.append({"ratio": r, **h})
        print(f"{r:>7g} {h['crossover']:>16.3g} {h['max_head_start']:>15.3g} "
              f"{1 - h['best_fraction']:>13.0%} {h['at']:>9.0%} {h['best_fraction']:>21.0%}")
    return rows


if __name__ == "__main__":
    main()
