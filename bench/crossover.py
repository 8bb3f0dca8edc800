"""Where does the large model from scratch overtake the small one? The growth crossover.

    python bench/crossover.py --preset tiny --budget 5e13            # ~25 min on 2 CPU cores
    python bench/crossover.py --preset tiny --budget 2e12 --quick    # smoke test
    python bench/crossover.py --analyze bench/results/crossover_<...>.json   # analysis again

Growth can only pay at budgets where the pipeline's final architecture trained from
scratch (arm (b) of ``bench/growth_vs_scratch.py``) ends below the phase-1 model simply
trained on (arm (c)): below that budget the small model is the better use of the compute,
and no growth recipe can beat it by more than it beats (b). This script finds that budget
for a preset without running the pipeline: it trains (b) and (c) once each per seed for
``--budget`` training FLOPs with a constant learning rate after the warmup
(``--schedule constant``, the default), evaluates them ``--n-evals`` times on the same
validation windows, and reports the first FLOPs from which (b)'s curve stays below (c)'s.

A constant-rate curve is the envelope that any shorter run with a decaying schedule ends
near (a decayed run ends a little lower, for both arms alike), so the crossover it gives
is an estimate: confirm it with ``growth_vs_scratch.py`` at a budget past it, where each
arm's schedule spans its whole run. Writes ``<results-dir>/crossover_<preset>_<device>.json``
and a ``.png`` with both curves.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS_DIR,
    atomic_write_text,
    device_label,
    device_slug,
    parse_cli,
    usage_error,
)
from growth_vs_scratch import (  # noqa: E402
    ConfigArgs,
    Evaluator,
    Floats,
    JsonFile,
    config_from_arguments,
    finish_plot,
    train_arm,
)

from growkit.train.config import TrainConfig  # noqa: E402
from growkit.train.data import prepare_data  # noqa: E402


def crossover(large: list[tuple[float, float]], small: list[tuple[float, float]]) -> float | None:
    """First FLOPs from which ``large`` stays at or below ``small`` (both curves read at
    ``large``'s evaluations, ``small`` linearly interpolated), interpolated between the
    two evaluations around the last sign change; None if ``large`` ends above."""
    def small_at(f: float) -> float:
        for (f0, l0), (f1, l1) in zip(small, small[1:]):
            if f0 <= f <= f1:
                return l0 + (l1 - l0) * (f - f0) / (f1 - f0) if f1 > f0 else l1
        return small[-1][1]

    gaps = [(f, loss - small_at(f)) for f, loss in large if f <= small[-1][0]]
    if not gaps or gaps[-1][1] > 0:
        return None
    i = len(gaps) - 1
    while i > 0 and gaps[i - 1][1] <= 0:
        i -= 1
    if i == 0:
        return gaps[0][0]
    (f0, g0), (f1, g1) = gaps[i - 1], gaps[i]
    return f0 + (f1 - f0) * g0 / (g0 - g1)


def growth_head_start(large: list[tuple[float, float]],
                      small: list[tuple[float, float]]) -> dict | None:
    """The most FLOPs a growth of the small model could save against the large one.

    A function-preserving growth at FLOPs ``T`` hands the large architecture the small
    model's loss ``L(T)``; from scratch the large model first reaches ``L(T)`` at ``T_s``.
    If the grown model then learns as the one from scratch does from the same loss, it
    stays ``T_s - T`` FLOPs ahead: the head start. This returns its largest value over the
    small model's evaluations (None if the large curve never reaches a loss of the small
    one's): an upper bound on what growth saves unless a grown model learns faster than a
    fresh one at equal loss (measured so far: slower).
    """
    from growth_vs_scratch import flops_to_reach

    best = None
    for t, loss in small[1:]:
        reach = flops_to_reach(large, loss)
        if reach is not None and (best is None or reach - t > best["head_start_flops"]):
            best = {"grow_at_flops": t, "small_loss": loss, "large_reaches_at_flops": reach,
                    "head_start_flops": reach - t}
    return best


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, color in (("scratch", "#0077bb"), ("source", "#009988")):
        for lr, runs in result["arms"][arm].items():
            for r in runs:
                xs, ys = zip(*r["curve"][1:])
                ax.plot(xs, ys, color=color, lw=1.2, alpha=0.8,
                        label=f"{result['labels'][arm]}, lr {float(lr):g}, seed {r['seed']}")
    for c in result["crossover_flops"]["per_run"]:
        if c["flops"] is not None:
            ax.axvline(c["flops"], color="black", ls="--", lw=0.8)
    runs = [r for arm in result["arms"].values() for rs in arm.values() for r in rs]
    low = min(loss for r in runs for _, loss in r["curve"])
    high = max(r["curve"][-1][1] for r in runs)
    ax.set_ylim(low - 0.03, high + 0.5)
    ax.set_title(f"crossover, preset {result['preset']} {' '.join(result.get('set', []))}: "
                 f"{result['schedule']} learning rate "
                 f"after warmup\n{result['data'][:110]}", fontsize=8)
    finish_plot(fig, ax, path)
    return True


@dataclass
class Args(ConfigArgs):
    """The flags of this script: the common ones (:class:`ConfigArgs`) and these."""

    budget: float | None = None
    """training FLOPs per arm"""
    analyze: JsonFile = None
    """train nothing: analyze the curves of an earlier result again and rewrite it and its plot"""
    seeds: tuple[int, ...] = (0,)
    scratch_lrs: Floats = None
    """peak rates of the large model (default: the phase-1 rate)"""
    source_lrs: Floats = None
    """peak rates of the small model (default: the phase-1 rate)"""
    name: str = ""
    """suffix of the result files"""
    schedule: Literal["constant", "cosine"] = "constant"
    n_evals: int = 40
    results_dir: str = str(RESULTS_DIR)


def main(argv=None) -> dict:
    args = parse_cli(Args, argv, description=__doc__)
    if args.analyze:
        path = Path(args.analyze)
        try:
            result = json.loads(path.read_text())
            result["arms"]["scratch"], result["arms"]["source"]  # noqa: B018
        except (OSError, ValueError, KeyError, TypeError) as e:
            usage_error(f"--analyze: {path} is not a result of this script ({e})")
        return report(result, path.with_suffix(""))
    if args.budget is None or not args.budget > 0:
        usage_error("--budget: give a positive number of training FLOPs, e.g. 5e13")

    base, _ = config_from_arguments(args, schedule=args.schedule)
    if base.threads > 0:
        torch.set_num_threads(base.threads)
    device = torch.device("cuda" if base.device in ("cuda", "auto")
                          and torch.cuda.is_available() else "cpu")
    lrs = {"scratch": list(args.scratch_lrs or [base.phase1.lr]),
           "source": list(args.source_lrs or [base.phase1.lr])}
    t0 = time.perf_counter()
    arms: dict[str, dict[str, list]] = {a: {str(lr): [] for lr in v} for a, v in lrs.items()}
    data_desc = ""
    for seed in args.seeds:
        cfg = TrainConfig.from_dict({"seed": seed}, base=base)
        ds, tok, data_desc = prepare_data(cfg, log=None)
        models = {"scratch": cfg.model_config(tok.vocab_size, phase=3),
                  "source": cfg.model_config(tok.vocab_size, phase=1)}
        evaluate = Evaluator(ds, cfg, device)
        for arm, model_cfg in models.items():
            for lr in lrs[arm]:
                print(f"=== seed {seed}: {arm}, lr {lr:g} ===", flush=True)
                r = train_arm(ds, cfg, model_cfg, lr, args.budget, evaluate, device,
                              args.n_evals, f"{arm} lr {lr:g} seed {seed}")
                arms[arm][str(lr)].append({"seed": seed, **r})

    result = {
        "preset": args.preset, "quick": args.quick, "budget_flops": args.budget,
        "schedule": args.schedule, "seeds": list(args.seeds), "data": data_desc,
        "set": list(args.set), "config": base.to_dict(),
        "device": device_label(device),
        "labels": {"scratch": "(b) final architecture from scratch",
                   "source": "(c) phase-1 model trained on"},
        "model_configs": {a: m.to_dict() for a, m in models.items()},
        "arms": arms, "wall_s": time.perf_counter() - t0,
    }
    stem = (f"crossover_{args.preset}{'_quick' if args.quick else ''}"
            f"{'_' + args.name if args.name else ''}_{device_slug(device)}")
    return report(result, Path(args.results_dir) / stem)


def analyze(result: dict) -> dict:
    """``result`` with the best rate of each arm, the crossover and the head start of
    every seed, computed from its curves."""
    arms = result["arms"]

    def best(arm: str) -> str:
        return min(arms[arm], key=lambda lr: statistics.fmean(
            r["final_val_loss"] for r in arms[arm][lr]))

    per_run = []
    for big, small in zip(arms["scratch"][best("scratch")], arms["source"][best("source")]):
        per_run.append({"seed": big["seed"], "flops": crossover(big["curve"], small["curve"]),
                        "final_gap": big["final_val_loss"] - small["final_val_loss"],
                        "head_start": growth_head_start(big["curve"], small["curve"])})
    found = [c["flops"] for c in per_run]
    return {**result, "best_lr": {a: best(a) for a in arms},
            "crossover_flops": {"per_run": per_run,
                                "mean": None if None in found else statistics.fmean(found)},
            "note": "constant learning rate after the phase-1 warmup fraction unless "
                    "--schedule cosine; crossover: first FLOPs from which (b)'s validation "
                    "loss stays at or below (c)'s, the best rate of each arm by mean final "
                    "loss; head_start: the largest FLOPs a function-preserving growth of (c) "
                    "could save against (b) if the grown model then learned as (b) does "
                    "from the same loss"}


def report(result: dict, stem: Path) -> dict:
    """Analyzes ``result``, prints it, writes ``stem``.json and .png."""
    result = analyze(result)
    for c in result["crossover_flops"]["per_run"]:
        where = (f"{c['flops']:.3g} FLOPs" if c["flops"] is not None
                 else f"not within {result['budget_flops']:.3g} FLOPs")
        print(f"seed {c['seed']}: (b) overtakes (c) at {where}; final gap (b) - (c) "
              f"{c['final_gap']:+.4f}")
        h = c["head_start"]
        if h is not None:
            print(f"    largest head start a growth could give: {h['head_start_flops']:.3g} "
                  f"FLOPs (grow at {h['grow_at_flops']:.3g}, loss {h['small_loss']:.4f}, which "
                  f"the large model reaches at {h['large_reaches_at_flops']:.3g})"
                  + (f"; {h['head_start_flops'] / c['flops']:.0%} of the crossover budget"
                     if c["flops"] else ""))
    atomic_write_text(stem.with_name(stem.name + ".json"), json.dumps(result, indent=1) + "\n")
    drew = plot(result, stem.with_name(stem.name + ".png"))
    print(f"wrote {stem}.json{' and .png' if drew else ''}; {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
