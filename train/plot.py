"""Loss-curve plot of a run (``loss_curve.png``), with the phases and growth points marked.

matplotlib is an optional extra (``pip install growkit[plot]``); without it
:func:`plot_run` prints a note and returns None.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["plot_run"]

_PHASE_NAMES = {1: "phase 1: dense", 2: "phase 2: MoE", 3: "phase 3: grown MoE"}
_PHASE_COLORS = {1: "#e8f0fb", 2: "#fdf1e3", 3: "#eaf6ea"}


def plot_run(records: Sequence[dict[str, Any]], path: str | os.PathLike,
             title: str = "", phase_steps: dict[int, int] | None = None) -> Path | None:
    """Draws train and validation loss against the global step and saves a PNG.

    Each growth is a dashed line labelled with its post-growth spike (the largest
    validation loss in the first quarter of the next phase relative to the last one
    before the growth, :func:`growkit.train.metrics.post_growth_spikes`); that maximum
    is circled and the first quarter shaded.

    Args:
        records: ``metrics.jsonl`` records (see :class:`growkit.train.metrics.MetricsLog`).
        path: Where the PNG goes (written atomically).
        title: Figure title.
        phase_steps: Steps of each phase (``{2: cfg.phase2.steps, ...}``), for the first
            quarters; None infers them from the records (exact for a finished run).

    Returns:
        ``path``, or None when matplotlib is missing or there is nothing to plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no loss_curve.png was drawn "
              "(pip install matplotlib)")
        return None
    from .checkpoint import atomic_write
    from .metrics import post_growth_spikes

    train = [r for r in records if r["kind"] == "train" and r.get("loss") is not None]
    evals = [r for r in records if r["kind"] == "eval" and r.get("val_loss") is not None]
    growth = [r for r in records if r["kind"] == "growth"]
    if not train and not evals:
        return None

    fig, ax = plt.subplots(figsize=(9, 5.5))
    # Phase spans: from the first to the last global step seen in each phase.
    spans: dict[int, list[int]] = {}
    for r in records:
        if r.get("phase") is not None and r.get("global_step") is not None:
            lo_hi = spans.setdefault(r["phase"], [r["global_step"], r["global_step"]])
            lo_hi[0] = min(lo_hi[0], r["global_step"])
            lo_hi[1] = max(lo_hi[1], r["global_step"])
    phases = sorted(spans)
    for i, p in enumerate(phases):
        lo = spans[p][0]
        hi = spans[phases[i + 1]][0] if i + 1 < len(phases) else spans[p][1]
        ax.axvspan(lo, max(hi, lo + 1e-9), color=_PHASE_COLORS.get(p, "#f4f4f4"),
                   zorder=0, label=_PHASE_NAMES.get(p, f"phase {p}"))
    if train:
        ax.plot([r["global_step"] for r in train], [r["loss"] for r in train],
                color="#4477aa", lw=1.0, alpha=0.8, label="train loss")
    if evals:
        ax.plot([r["global_step"] for r in evals], [r["val_loss"] for r in evals],
                color="#cc3311", marker="o", ms=3, lw=1.2, label="validation loss")
    if phase_steps is None:
        phase_steps = {}
        for r in records:
            if r.get("phase") is not None and r.get("step") is not None:
                phase_steps[r["phase"]] = max(phase_steps.get(r["phase"], 0), r["step"])
    spikes = post_growth_spikes(records, phase_steps)
    spike_label = "max val loss, first quarter after growth"
    for g in growth:
        ax.axvline(g["global_step"], color="black", ls="--", lw=1)
        label = g.get("event") or "growth"
        sp = spikes.get(f"phase{g['phase']}")
        if sp is not None and sp["post_growth_spike"] is not None:
            label += f"\nspike {100 * sp['post_growth_spike']:+.2f}%"
            x0 = g["global_step"]
            ax.axvspan(x0, x0 + max(sp["first_quarter_steps"], 1e-9), color="#999999",
                       alpha=0.15, zorder=0)
            ax.plot([x0 + sp["max_at_step"]], [sp["max_val_first_quarter"]], "o", ms=9,
                    mfc="none", mec="black", mew=1.2, label=spike_label)
            spike_label = None  # one legend entry
        ax.annotate(label, (g["global_step"], 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=8, rotation=0,
                    va="top")
    ax.set_xlabel("global step")
    ax.set_ylabel("loss (nats/token, log scale)")
    ax.set_yscale("log")  # the untrained loss (ln V) would flatten everything else
    if title:
        import textwrap

        ax.set_title(textwrap.fill(title, 110), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=5, fontsize=8,
              frameon=False)
    fig.tight_layout()
    out = Path(path)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out
