"""Does growth pay? The three-phase pipeline vs the final architecture trained from scratch.

    python bench/growth_vs_scratch.py --preset tiny
    python bench/growth_vs_scratch.py --preset small --data ../shared/data/tinystories/train.txt

1. Runs the pipeline (dense -> MoE -> wider and deeper MoE) with the given preset.
2. Trains the pipeline's final (phase-3) architecture from a random init on the same data,
   batches drawn the same way, until it has spent the same training FLOPs as the whole
   pipeline (``growkit.train.metrics.training_flops_per_token``), with the phase-1 peak
   learning rate and warmup + cosine schedule over its whole run.
3. Reports validation loss against FLOPs for both, the FLOPs each needs to reach the
   scratch run's final loss, and the saving, with a plot.

Reference points from the literature (not measured here): HyperCloning reports 2.2-4x
fewer tokens to reach a random-init baseline's accuracy; G_stack reaches a 7B baseline's
loss with 194B instead of 300B tokens; bert2BERT saves about 45%. Small models on small
data need not behave like that: this script reports what it measures, whatever it shows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, atomic_write_text, device_label  # noqa: E402

from growkit.models import ModelConfig, Transformer, causal_lm_loss  # noqa: E402
from growkit.train.config import TrainConfig, preset_config  # noqa: E402
from growkit.train.metrics import read_metrics, training_flops_per_token  # noqa: E402
from growkit.train.pipeline import run  # noqa: E402
from growkit.train.trainer import Trainer, make_optimizer  # noqa: E402


def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First FLOPs at which the (flops, val_loss) curve is at or below ``target``,
    linearly interpolated between evaluations; None if never."""
    prev = None
    for flops, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return flops
            f0, l0 = prev
            return f0 + (flops - f0) * (l0 - target) / (l0 - loss)
        prev = (flops, loss)
    return None


def train_scratch(cfg: TrainConfig, run_dir: Path, final_cfg: ModelConfig, budget_flops: float,
                  n_evals: int = 12) -> list[tuple[float, float]]:
    dataset, tokenizer, desc = Trainer.load_data(cfg, run_dir)
    trainer = Trainer(cfg, run_dir, dataset, tokenizer, desc, resume=False)  # for evaluate()
    torch.manual_seed(cfg.seed)
    model = Transformer(final_cfg)
    model.init_weights(seed=cfg.seed + 1)
    model = model.to(trainer.device)
    opt = make_optimizer(model, cfg, cfg.lr_phase1)
    per_step = training_flops_per_token(final_cfg, cfg.seq_len) * cfg.batch_size * cfg.seq_len
    steps = max(1, int(budget_flops // per_step))
    warm = max(1, int(cfg.warmup_frac_phase1 * steps))
    eval_every = max(1, steps // n_evals)
    gen = torch.Generator().manual_seed(cfg.seed)
    curve = [(0.0, trainer.evaluate(model))]
    model.train()
    for step in range(steps):
        lr = cfg.lr_phase1 * ((step + 1) / warm if step < warm else
                              cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 *
                              (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm - 1))))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = dataset.get_batch("train", cfg.batch_size, cfg.seq_len, gen, device=trainer.device)
        loss = causal_lm_loss(model(x), y)
        if final_cfg.n_experts > 0 and final_cfg.aux_loss_coef:
            loss = loss + final_cfg.aux_loss_coef * model.aux_loss()
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % eval_every == 0 or step == steps - 1:
            curve.append(((step + 1) * per_step, trainer.evaluate(model)))
            print(f"scratch step {step + 1}/{steps}: val loss {curve[-1][1]:.4f}")
    return curve


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data", default=None, help="TinyStories .txt path (default: the embedded stories)")
    p.add_argument("--out", default=None, help="run directory parent (default: a temp dir)")
    args = p.parse_args(argv)

    overrides = {"plot": False}
    if args.data:
        overrides["data"] = args.data
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="growth_vs_scratch_"))
    cfg = preset_config(args.preset, out_dir=str(out_dir), **overrides)
    code = run(cfg)
    if code != 0:
        raise SystemExit(f"pipeline failed with exit status {code}")
    run_dir = max((d for d in out_dir.iterdir() if (d / "summary.json").is_file()), key=lambda d: d.stat().st_mtime)
    summary = json.loads((run_dir / "summary.json").read_text())
    final_cfg = ModelConfig.from_dict(summary["phases"]["3"]["model_config"])
    pipe_curve = [(r["flops"], r["val_loss"]) for r in read_metrics(run_dir / "metrics.jsonl")
                  if r.get("val_loss") is not None]
    budget = summary["flops"]
    cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    scratch_curve = train_scratch(cfg, run_dir, final_cfg, budget)

    target = scratch_curve[-1][1]
    pipe_flops = flops_to_reach(pipe_curve, target)
    scratch_flops = flops_to_reach(scratch_curve, target)
    result = dict(
        preset=args.preset, data=summary["data"], device=device_label(torch.device(summary["device"])),
        budget_flops=budget, final_architecture=final_cfg.to_dict(),
        pipeline_final_val_loss=pipe_curve[-1][1], scratch_final_val_loss=target,
        pipeline_flops_to_reach_scratch_final=pipe_flops, scratch_flops_to_reach_its_final=scratch_flops,
        flops_saving=(1 - pipe_flops / scratch_flops) if pipe_flops and scratch_flops else None,
        pipeline_curve=pipe_curve, scratch_curve=scratch_curve,
        growth_points=summary.get("growth"),
    )
    print(f"\npipeline: final val loss {result['pipeline_final_val_loss']:.4f} after {budget:.3g} FLOPs")
    print(f"scratch:  final val loss {target:.4f} after {scratch_curve[-1][0]:.3g} FLOPs")
    if pipe_flops:
        print(f"pipeline reaches the scratch run's final loss after {pipe_flops:.3g} FLOPs: "
              f"saving {100 * result['flops_saving']:.1f}%")
    else:
        print("pipeline never reaches the scratch run's final loss within the same FLOPs")
    stem = f"growth_vs_scratch_{args.preset}_{'file' if args.data else 'embedded'}"
    atomic_write_text(RESULTS_DIR / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(*zip(*pipe_curve), label="growkit pipeline (dense -> MoE -> grown)")
        ax.plot(*zip(*scratch_curve), label="final architecture from scratch")
        ax.axhline(target, color="gray", ls=":", lw=1)
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("validation loss")
        ax.set_title(f"growth vs scratch ({args.preset}, {summary['data'][:40]})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS_DIR / f"{stem}.png", dpi=110)
        print(f"wrote {RESULTS_DIR / stem}.json and .png")
    except ImportError:
        print(f"wrote {RESULTS_DIR / stem}.json (matplotlib missing: no plot)")


if __name__ == "__main__":
    main()
