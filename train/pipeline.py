"""Entry point of the three-phase TinyStories pipeline (``train_tinystories.py``,
``growkit train``).

    python train_tinystories.py --preset tiny                 # ~2 min on a 2-core CPU
    python train_tinystories.py --preset tiny --data /path/to/TinyStories-train.txt
    python train_tinystories.py --config run.yaml --steps-phase1 500
    python train_tinystories.py --resume runs/tiny-20250101-120000

A run directory holds ``config.json`` (the resolved :class:`TrainConfig`),
``tokenizer.json``, ``metrics.jsonl``, ``verify_phase2_upcycle_to_moe.json`` and
``verify_phase3_scale_bilaterally.json`` (the growth checks), ``checkpoints/`` and
``latest.json``, ``loss_curve.png``, ``final/`` (the last model and its tokenizer) and
``summary.json``.

Exit status: 0 when the run completed, 1 when a growth check failed (and
``--continue-on-failed-check`` was not given), 2 for a bad configuration (nothing is
written then), 3 when the loss became NaN/inf, 130 when interrupted (resume with
``--resume RUN_DIR``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .checkpoint import atomic_write_json
from .config import (
    TrainConfig,
    build_parser,
    config_from_namespace,
    resume_overrides,
)
from .metrics import read_metrics
from .trainer import GrowthCheckFailed, Trainer

__all__ = ["main", "run", "make_run_dir", "EXIT_OK", "EXIT_FAILED_CHECK", "EXIT_BAD_CONFIG"]

EXIT_OK = 0
EXIT_FAILED_CHECK = 1
EXIT_BAD_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


def make_run_dir(cfg: TrainConfig) -> Path:
    """Creates the run directory: ``cfg.run_dir``, or ``<out_dir>/<name>-<timestamp>``.

    Raises:
        ValueError: If ``cfg.run_dir`` already holds files (resume it instead).
    """
    if cfg.run_dir:
        path = Path(cfg.run_dir).expanduser()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(
                f"TrainConfig.run_dir={cfg.run_dir!r} already exists and is not empty; "
                f"continue it with --resume {cfg.run_dir} or choose another --run-dir")
        path.mkdir(parents=True, exist_ok=True)
        return path
    base = Path(cfg.out_dir).expanduser() / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            k += 1
            path = base.with_name(f"{base.name}-{k}")


def _fmt_flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.3g} FLOP"


def _summary(trainer: Trainer, status: str, wall_s: float, message: str | None) -> dict[str, Any]:
    s, cfg = trainer.state, trainer.cfg
    from growkit.models import ModelConfig

    phases = {}
    for key, mdict in sorted(s.get("phase_models", {}).items()):
        p = int(key)
        phases[key] = {
            "steps": cfg.steps(p),
            "lr": cfg.lr(p),
            "final_val_loss": s["final_val_loss"].get(key),
            "model": trainer.model_summary(ModelConfig.from_dict(mdict)),
            "model_config": mdict,
        }
    return {
        "status": status,
        "message": message,
        "run_dir": str(trainer.run_dir),
        "data": trainer.data_description,
        "dataset": trainer.ds.describe(),
        "tokenizer": {"kind": trainer.tokenizer.kind, "vocab_size": trainer.tokenizer.vocab_size},
        "device": str(trainer.device),
        "dtype": cfg.dtype,
        "reset_optimizer": cfg.reset_optimizer,
        "phases": phases,
        "growth": s.get("growth", {}),
        "checks": s.get("checks", {}),
        "checks_passed": all(c["passed"] for c in s.get("checks", {}).values()),
        "final_val_loss": s.get("last_val_loss"),
        "global_steps": s.get("global_step"),
        "tokens_seen": s.get("tokens_seen"),
        "flops": s.get("flops"),
        "flops_note": "training only: 6 * active params + 12 * n_layers * n_heads * "
                      "head_dim * seq_len per token (see growkit.train.metrics)",
        "wall_time_s": wall_s,
        "final_model": "final" if status == "completed" else None,
    }


def _print_summary(summary: dict[str, Any]) -> None:
    print("\n=== summary ===")
    print(f"status: {summary['status']}   data: {summary['data']}")
    for key, ph in summary["phases"].items():
        m = ph["model"]
        kind = "dense" if m["n_experts"] == 0 else f"MoE {m['n_experts']}e top{m['top_k']}"
        val = ph["final_val_loss"]
        val_s = f"{val:.4f}" if val is not None else "-"
        print(f"phase {key}: {kind:>14}, d_model {m['d_model']:>4}, {m['n_layers']:>2} layers, "
              f"{m['total']:>10,} params ({m['active']:,} active); {ph['steps']:>6} steps at "
              f"lr {ph['lr']:.1e}; final val loss {val_s}")
    for key, g in summary["growth"].items():
        c = summary["checks"].get(key, {})
        print(f"{g['event']:>17} (into {key}): val loss {g['val_loss_before']:.4f} -> "
              f"{g['val_loss_after']:.4f} ({100 * g['val_rel_change']:.3f}%), check "
              f"{'PASSED' if c.get('check_passed') else 'FAILED'}")
    print(f"tokens: {summary['tokens_seen']:,}   training compute: "
          f"{_fmt_flops(summary['flops'] or 0.0)}   wall time: {summary['wall_time_s']:.1f} s")
    print(f"run directory: {summary['run_dir']}")


def run(cfg: TrainConfig, resume_dir: str | Path | None = None) -> int:
    """Runs (or resumes) the pipeline for a checked config; returns the exit status."""
    t_start = time.perf_counter()
    resume = resume_dir is not None
    try:
        cfg.check_runtime()
        dataset, tokenizer, desc = Trainer.load_data(cfg, Path(resume_dir) if resume else None)
        run_dir = Path(resume_dir) if resume else make_run_dir(cfg)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(f"data source: {desc}")
    print(f"dataset: {dataset.describe()}; tokenizer: {tokenizer.kind} "
          f"(vocab {tokenizer.vocab_size})")
    device = cfg.resolved_device()
    print(f"device: {device} ({cfg.dtype}); run directory: {run_dir}")
    if not resume:
        cfg = TrainConfig.from_dict({"run_dir": str(run_dir)}, base=cfg)
        atomic_write_json(run_dir / "config.json", cfg.to_dict())
        tokenizer.save(run_dir)

    trainer = Trainer(cfg, run_dir, dataset, tokenizer, desc, resume=resume)
    status, code, message = "completed", EXIT_OK, None
    try:
        trainer.start()
        trainer.run()
        trainer.save_final()
    except GrowthCheckFailed as e:
        status, code, message = "failed_check", EXIT_FAILED_CHECK, str(e)
        print(f"\nSTOPPED: {e}", file=sys.stderr)
    except FloatingPointError as e:
        status, code, message = "diverged", EXIT_DIVERGED, str(e)
        print(f"\nSTOPPED: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        status, code = "interrupted", EXIT_INTERRUPTED
        message = f"interrupted; continue with --resume {run_dir}"
        print(f"\n{message}", file=sys.stderr)
    finally:
        if trainer.metrics is not None:
            trainer.metrics.close()
    if not trainer.state:  # failed before the first model existed
        return code
    wall = float(trainer.state.get("elapsed_s", 0.0))
    if status != "completed":
        wall = trainer._elapsed()
    summary = _summary(trainer, status, wall, message)
    summary["this_session_s"] = time.perf_counter() - t_start
    if cfg.plot:
        from .plot import plot_run

        try:
            png = plot_run(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss_curve.png",
                           title=f"{run_dir.name}: {desc}")
            summary["plot"] = png.name if png is not None else None
        except Exception as e:  # a plot must never lose a finished run
            print(f"note: could not draw loss_curve.png: {e}", file=sys.stderr)
            summary["plot"] = None
    atomic_write_json(run_dir / "summary.json", summary)
    _print_summary(summary)
    return code


def main(argv: Sequence[str] | None = None, prog: str = "train_tinystories.py") -> int:
    """Parses the command line and runs; returns the exit status (see module docstring)."""
    parser = build_parser(prog)
    ns = parser.parse_args(argv)
    try:
        if ns.resume:
            run_dir = Path(ns.resume).expanduser()
            if not (run_dir / "config.json").is_file():
                raise ValueError(f"--resume {ns.resume!r}: no config.json there; pass a run "
                                 "directory this pipeline created")
            cfg = resume_overrides(ns, TrainConfig.from_file(run_dir / "config.json"))
        else:
            run_dir = None
            cfg = config_from_namespace(ns)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if ns.print_config:
        print(cfg.to_json_str(), end="")
        return EXIT_OK
    return run(cfg, resume_dir=run_dir)
