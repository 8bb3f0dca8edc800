"""Markdown table of the growth recipes in results of ``growth_vs_scratch.py --variant``.

    python bench/recipe_table.py bench/results/growth_vs_scratch_micro_embedded_recipes*.json
    python bench/recipe_table.py --upcycling-spike FILE...   # also the loss spike after upcycling

One row per recipe (the first file's default pipeline, then every variant), best final
validation loss first, with the FLOPs it spent (a ``budget=F`` recipe is a shorter run);
every file must share arms (b) and (c) (``--reuse-arms``), whose figures head the table.
The pace after the growth is :func:`growth_vs_scratch.post_growth_speed` per seed (1: as
fast as (b) over the same stretch of loss). Failed recipes are listed after it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from growth_vs_scratch import post_growth_speed


def _spike(a: dict, phase: str) -> str:
    spike = a["post_growth_spike"][phase]
    return f"{100 * spike['mean']:+.1f}% (max {100 * spike['max']:+.1f}%)"


def table(paths: list[Path], upcycling_spike: bool = False) -> str:
    """The table of ``paths``; ``upcycling_spike`` adds a column with the loss spike after
    the upcycling (phase 2's, e.g. for Drop-Upcycling recipes)."""
    results = [json.loads(p.read_text()) for p in paths]
    first = results[0]
    for p, r in zip(paths[1:], results[1:]):
        if r["arms"]["scratch"]["runs"] != first["arms"]["scratch"]["runs"]:
            raise SystemExit(f"{p}: its arm (b) differs from {paths[0]}'s; run with --reuse-arms")
    b, c = (first["arms"][k]["final_val_loss"] for k in ("scratch", "source"))
    b_run = {x["seed"]: x for x in first["arms"]["scratch"]["runs"]}
    b_seed = {seed: x["final_val_loss"] for seed, x in b_run.items()}
    rows, failed = [], []
    arms = [("the pipeline's settings in " + paths[0].name, first["arms"]["pipeline"])]
    for r in results:
        arms += [(", ".join(a["items"]), a) for a in r.get("variants", {}).values()]
        failed += [f"- {', '.join(v['items'])}: failed (exit status by seed {v['failed']})"
                   for v in r.get("failed_variants", {}).values()]
    for name, a in arms:
        f, t = a["final_val_loss"], a["flops_to_target"]["scratch_final"]
        to_b = (f"{100 * t['fraction_of_budget']:.0f}%" if t["fraction_of_budget"] is not None
                else f"{t['seeds_reached']}/{len(t['per_seed'])} seeds")
        minus_b = " / ".join(f"{x['final_val_loss'] - b_seed[x['seed']]:+.3f}" for x in a["runs"])
        pace = " / ".join("-" if v is None else f"{v:.2f}"
                          for v in (post_growth_speed(x, b_run[x["seed"]]) for x in a["runs"]))
        spent = 100 * a.get("budget_fraction", 1.0)  # budget=F recipes: a shorter run
        up = f" {_spike(a, 'phase2')} |" if upcycling_spike else ""
        rows.append((f["mean"], f"| {name} | {spent:.0f}% | {f['mean']:.4f} +- {f['std']:.4f} | "
                                f"{minus_b} | {to_b} |{up} {_spike(a, 'phase3')} | {pace} |"))
    seeds = " / ".join(str(x["seed"]) for x in first["arms"]["scratch"]["runs"])
    lines = [f"Preset {first['preset']}, budget {first['budget_flops']:.3g} training FLOPs, seeds "
             f"{seeds}: (b) from scratch (lr {first['arms']['scratch']['best_lr']:g}) "
             f"{b['mean']:.4f} +- {b['std']:.4f}; (c) no growth {c['mean']:.4f} +- {c['std']:.4f}.",
             "",
             f"| recipe | its FLOPs (of the budget) | final validation loss | minus (b)'s, seed "
             f"{seeds} | FLOPs to (b)'s final |{' loss spike after upcycling |' if upcycling_spike else ''} "
             f"loss spike after widening | pace after the growth vs (b), seed {seeds} |",
             "|---|---|---|---|---|" + ("---|" if upcycling_spike else "") + "---|---|"]
    lines += [row for _, row in sorted(rows)]
    return "\n".join(lines + ([""] + failed if failed else [])) + "\n"


if __name__ == "__main__":
    args = sys.argv[1:]
    upcycling = "--upcycling-spike" in args
    args = [a for a in args if a != "--upcycling-spike"]
    if not args or args[0] in ("-h", "--help"):
        raise SystemExit(__doc__)
    missing = [a for a in args if not Path(a).is_file()]
    if missing:
        raise SystemExit(f"recipe_table.py: no such result file: {', '.join(missing)}\n{__doc__}")
    sys.stdout.write(table([Path(a) for a in args], upcycling_spike=upcycling))
