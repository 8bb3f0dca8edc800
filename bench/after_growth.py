"""Training after growth: router initializations and train-what-growth-added, measured.

    python bench/after_growth.py                      # tiny preset, seeds 0 1, ~20 min on 2 CPU cores
    python bench/after_growth.py --seeds 0 --quick    # smoke test: 1/4 of each phase's steps

Runs the three-phase pipeline (``train_tinystories.py``) once per variant and seed, each
variant changing one setting from the preset:

* ``router_init`` after upcycling (phase 2): ``normal`` (N(0, 0.02^2), the default),
  ``orthogonal``, ``zero``, ``hidden_pca`` (``growkit.growth.upcycle_to_moe``);
* ``train_after_growth`` (both growths): ``all`` or ``new`` (only what the growth added:
  ``growkit.growth.freeze_for_growth``).

Every variant of a seed trains the same phase-1 model on the same batches for the same
steps, so the training FLOPs are equal (a frozen entry still costs its forward and
backward; ``new`` saves only optimizer work). Per variant: the validation loss at the end
of phases 2 and 3, each growth's post-growth spike (max validation loss in the first
quarter of the phase over the loss at the growth), and the expert load over phase 2 from
GrowthMonitor (largest share of routing slots taken by the top_k busiest experts, at each
tick; top_k/E = 0.5 is uniform here, 1.0 a collapse). Writes
``bench/results/after_growth_<preset>[_quick]_<device>.json`` and prints a table.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, atomic_write_text, device_label, device_slug  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "normal / all": [],
    "orthogonal / all": ["--router-init", "orthogonal"],
    "zero / all": ["--router-init", "zero"],
    "hidden_pca / all": ["--router-init", "hidden_pca"],
    "normal / new": ["--train-after-growth", "new"],
}


@dataclass
class Args:
    preset: str = "tiny"
    """pipeline preset"""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """seeds (init, data split, batches)"""
    quick: bool = False
    """a quarter of each phase's steps (smoke test)"""
    threads: int = 2
    """torch threads per run"""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """which variants to run (names as in the table)"""


def run_one(args: Args, seed: int, extra: list[str], run_dir: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "train_tinystories.py"), "--preset", args.preset, "--seed", str(seed),
           "--run-dir", str(run_dir), "--no-progress", "--no-plot", "--threads", str(args.threads), *extra]
    if args.quick:
        cmd += ["--steps-phase1", "300", "--steps-phase2", "80", "--steps-phase3", "80", "--eval-interval", "20"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    monitor2 = [r for r in records if r["kind"] == "monitor" and r["phase"] == 2]
    growth = summary["growth"]
    return dict(
        seed=seed,
        val_end_phase2=summary["phases"]["2"]["final_val_loss"],
        val_end_phase3=summary["phases"]["3"]["final_val_loss"],
        spike_phase2=growth["phase2"]["post_growth_spike"],
        spike_phase3=growth["phase3"]["post_growth_spike"],
        checks_passed=summary["checks_passed"],
        flops=summary["flops"],
        topk_share_phase2=[(r["step"], r["router_max_topk_share"]) for r in monitor2],
        min_entropy_phase2=[(r["step"], r["router_min_entropy"]) for r in monitor2],
        wall_s=time.perf_counter() - t,
    )


def mean(xs):
    return statistics.fmean(xs) if xs else None


def main(args: Args) -> int:
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            runs = []
            for seed in args.seeds:
                run = run_one(args, seed, VARIANTS[name], Path(tmp) / f"{name.replace(' / ', '-')}-{seed}")
                print(f"{name:18s} seed {seed}: val {run['val_end_phase2']:.4f} -> {run['val_end_phase3']:.4f}, "
                      f"spikes {100 * run['spike_phase2']:+.2f}% / {100 * run['spike_phase3']:+.2f}%, "
                      f"checks {'passed' if run['checks_passed'] else 'FAILED'} ({run['wall_s']:.0f} s)", flush=True)
                runs.append(run)
            shares = [s for r in runs for _, s in r["topk_share_phase2"] if s is not None]
            rows.append(dict(
                variant=name, seeds=args.seeds, runs=runs,
                val_end_phase2=mean([r["val_end_phase2"] for r in runs]),
                val_end_phase3=mean([r["val_end_phase3"] for r in runs]),
                spike_phase2=mean([r["spike_phase2"] for r in runs]),
                spike_phase3=mean([r["spike_phase3"] for r in runs]),
                topk_share_phase2_first=mean([r["topk_share_phase2"][0][1] for r in runs if r["topk_share_phase2"]]),
                topk_share_phase2_max=max(shares) if shares else None,
                flops=runs[0]["flops"],
            ))
    device = torch.device("cpu")
    out = RESULTS_DIR / f"after_growth_{args.preset}{'_quick' if args.quick else ''}_{device_slug(device)}.json"
    meta = dict(preset=args.preset, seeds=args.seeds, quick=args.quick, device=device_label(device),
                command="python bench/after_growth.py " + " ".join(sys.argv[1:]))
    atomic_write_text(out, json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    print("\n| variant (router init / trained after growth) | val loss end of phase 2 | end of phase 3 "
          "| spike phase 2 | spike phase 3 | top-k share of slots, phase 2 (first tick, max) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['val_end_phase2']:.4f} | {r['val_end_phase3']:.4f} | "
              f"{100 * r['spike_phase2']:+.2f}% | {100 * r['spike_phase3']:+.2f}% | "
              f"{r['topk_share_phase2_first']:.2f}, {r['topk_share_phase2_max']:.2f} |")
    print(f"\n{len(args.seeds)} seed(s), mean; {rows[0]['flops']:.3g} training FLOPs per run; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
