"""Entry point of the three-phase TinyStories pipeline (``train_tinystories.py``,
``growkit train``).

    python train_tinystories.py --preset tiny                 # ~2 min on a 2-core CPU
    python train_tinystories.py --preset tiny --data /path/to/TinyStories-train.txt
    python train_tinystories.py --config run.yaml --phase1.steps 500   # or --steps-phase1 500
    python train_tinystories.py --resume runs/tiny-20250101-120000
    torchrun --nproc-per-node 2 train_tinystories.py --preset tiny   # growkit.train.distributed

A run directory holds ``config.json`` (the resolved :class:`TrainConfig`),
``tokenizer.json``, ``metrics.jsonl``, ``verify_phase2_upcycle_to_moe.json`` and
``verify_phase3_scale_bilaterally.json`` (the growth checks), ``checkpoints/`` and
``latest.json``, ``loss_curve.png``, ``final/`` (the last model and its tokenizer) and
``summary.json``.

Exit status (:data:`EXIT_STATUS_HELP`, also in ``--help``):

    0    the run completed
    1    a growth check failed (and ``--continue-on-failed-check`` was not given)
    2    bad configuration: a bad flag, config file or value, or a ``--resume`` flag
         that would change the run (nothing is written then)
    3    the loss became NaN/inf
    4    ``--resume RUN_DIR`` cannot resume: not a run directory, its config.json,
         tokenizer.json or latest.json unreadable, latest.json naming a folder outside
         RUN_DIR/checkpoints, or no checkpoint that verifies against its manifest
    5    ``--resume`` refused: the run's config.json was edited since the checkpoint
         (the changed fields are named), or the data no longer match the run
    70   an unexpected error, i.e. a bug (the traceback is printed, then one line)
    130  interrupted (resume with ``--resume RUN_DIR``)

Every failure prints one line to stderr (``error: ...``), except a flag the command line
cannot parse (an unknown flag, a word for a number, a choice not offered), which tyro
reports with the flag's help (exit 2 too). A resumed run first removes the
unfinished checkpoint folders an interrupted save left (``checkpoints/.step-*.tmp``),
then starts from the newest checkpoint that verifies: when the one ``latest.json`` names
is damaged it says so and falls back to an older one.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from .checkpoint import (
    ResumeError,
    ResumeRefused,
    atomic_write_json,
    check_resume_config,
    clean_orphans,
    select_checkpoint,
)
from .config import TrainConfig, parse_command_line, peek_run_options
from .metrics import post_growth_spikes, read_metrics
from .trainer import GrowthCheckFailed, Trainer

__all__ = ["main", "run", "make_run_dir", "EXIT_OK", "EXIT_FAILED_CHECK", "EXIT_BAD_CONFIG",
           "EXIT_DIVERGED", "EXIT_RESUME_FAILED", "EXIT_RESUME_REFUSED", "EXIT_INTERNAL", "EXIT_INTERRUPTED",
           "EXIT_STATUS_HELP"]

EXIT_OK = 0
EXIT_FAILED_CHECK = 1
EXIT_BAD_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_RESUME_FAILED = 4
EXIT_RESUME_REFUSED = 5
EXIT_INTERNAL = 70  # an unexpected exception (a bug): traceback, then one line
EXIT_INTERRUPTED = 130

EXIT_STATUS_HELP = (
    "exit status: 0 completed; 1 a growth check failed; 2 bad configuration (nothing "
    "written); 3 loss not finite; 4 --resume cannot resume (not a run directory, a damaged "
    "config.json/tokenizer.json/latest.json, latest.json naming a folder outside the run, "
    "or no checkpoint that verifies); 5 --resume refused (config.json edited since the "
    "checkpoint, or different data); 70 internal error (a bug; the traceback is printed); "
    "130 interrupted. A resumed run falls back to the "
    "newest checkpoint that verifies and says so.")

DESCRIPTION = (
    "Three-phase TinyStories training: a dense model, upcycled to a mixture of experts, "
    "then grown wider and deeper; every growth is verified. Settings apply in the order "
    "defaults < --preset < --config < flags; flags accept - or _ (--d-model, --d_model), and "
    "the flat per-phase flags of earlier versions (--steps-phase1, --lr-phase2, "
    "--warmup-frac-phase3) mean --phase1.steps, --phase2.lr, --phase3.warmup-frac. "
    + EXIT_STATUS_HELP)


def _resume_code(e: ResumeError) -> int:
    return EXIT_RESUME_REFUSED if isinstance(e, ResumeRefused) else EXIT_RESUME_FAILED


def make_run_dir(cfg: TrainConfig) -> Path:
    """Creates the run directory: ``cfg.run_dir``, or ``<out_dir>/<name>-<timestamp>``.

    Raises:
        ValueError: If ``cfg.run_dir`` already holds files (resume it instead).
    """
    if cfg.run_dir:
        path = Path(cfg.run_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(
                f"TrainConfig.run_dir={cfg.run_dir!r} is a file, not a folder; choose a new "
                "or empty folder for --run-dir")
        if path.exists() and any(path.iterdir()):
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
            "steps": cfg.phase(p).steps,
            "lr": cfg.phase(p).lr,
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
        "growth": _growth_with_spikes(trainer),
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


def _growth_with_spikes(trainer: Trainer) -> dict[str, Any]:
    """The state's growth records plus each growth's loss spike (metrics.post_growth_spikes)."""
    growth = {k: dict(v) for k, v in trainer.state.get("growth", {}).items()}
    steps = {p: trainer.cfg.phase(p).steps for p in (1, 2, 3)}
    for key, sp in post_growth_spikes(read_metrics(trainer.run_dir / "metrics.jsonl"),
                                      steps).items():
        growth.setdefault(key, {}).update(
            post_growth_spike=sp["post_growth_spike"],
            max_val_first_quarter=sp["max_val_first_quarter"],
            max_at_step=sp["max_at_step"], first_quarter_steps=sp["first_quarter_steps"],
            spike_evals=sp["n_evals"], spike_complete=sp["complete"])
    return growth


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
        if g.get("post_growth_spike") is not None:
            print(f"{'':>17}  first quarter of phase {key[-1]} (steps 0-"
                  f"{g['first_quarter_steps']:g}): max val loss {g['max_val_first_quarter']:.4f} "
                  f"at step {g['max_at_step']}, post-growth spike "
                  f"{100 * g['post_growth_spike']:+.2f}% (goal <= 2%)")
    print(f"tokens: {summary['tokens_seen']:,}   training compute: "
          f"{_fmt_flops(summary['flops'] or 0.0)}   wall time: {summary['wall_time_s']:.1f} s")
    print(f"run directory: {summary['run_dir']}")


def run(cfg: TrainConfig, resume_dir: str | Path | None = None) -> int:
    """Runs (or resumes) the pipeline for a checked config; returns the exit status.

    Under torchrun (``WORLD_SIZE`` set) every rank calls it: it joins the process group
    (:mod:`growkit.train.distributed`), trains data-parallel, and returns the same status
    on every rank; rank 0 alone prints and writes files.
    """
    from .distributed import DistributedTrainer, context_from_env

    try:
        ctx = context_from_env(cfg)
    except (ValueError, RuntimeError) as e:  # the launcher's environment, or no rendezvous
        print(f"error: cannot join the torchrun job: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        return _run(cfg, resume_dir, ctx, DistributedTrainer if ctx.distributed else Trainer)
    finally:
        ctx.close()


def _run(cfg: TrainConfig, resume_dir, ctx, trainer_class) -> int:
    t_start = time.perf_counter()
    say = print if ctx.is_main else (lambda *a, **k: None)
    resume = resume_dir is not None
    point = None
    if resume:
        try:
            point = _resume_point(Path(resume_dir), cfg, ctx)
        except ResumeError as e:
            say(f"error: --resume {resume_dir}: {e}", file=sys.stderr)
            return _resume_code(e)
    # What a failed start may not leave behind ("nothing is written"): folders it creates.
    out_dir = Path(cfg.out_dir).expanduser()
    fresh = [p for p in (out_dir, out_dir / ".tokenizer-cache") if not p.exists()]
    try:
        cfg.check_runtime()
        ctx.check_config(cfg)
        # rank 0 first: the token and tokenizer caches are built once
        dataset, tokenizer, desc = ctx.rank0_first(
            lambda: Trainer.load_data(cfg, Path(resume_dir) if resume else None))
        run_dir = Path(resume_dir) if resume else Path(ctx.rank0_only(lambda: str(make_run_dir(cfg))))
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        if ctx.is_main:
            _remove_fresh(fresh)
        say(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except BaseException:
        if ctx.is_main:
            _remove_fresh(fresh)
        raise
    say(f"data source: {desc}")
    say(f"dataset: {dataset.describe()}; tokenizer: {tokenizer.kind} "
        f"(vocab {tokenizer.vocab_size})")
    device = cfg.resolved_device()
    ranks = f"; {ctx.world} ranks ({cfg.parallel})" if ctx.distributed else ""
    say(f"device: {device} ({cfg.dtype}){ranks}; run directory: {run_dir}")
    if not resume:
        cfg = TrainConfig.from_dict({"run_dir": str(run_dir)}, base=cfg)
        if ctx.is_main:
            atomic_write_json(run_dir / "config.json", cfg.to_dict())
            tokenizer.save(run_dir)
        ctx.barrier()

    kw = {"ctx": ctx} if ctx.distributed else {}
    trainer = trainer_class(cfg, run_dir, dataset, tokenizer, desc, resume=resume, resume_from=point, **kw)
    status, code, message = "completed", EXIT_OK, None
    try:
        trainer.start()
        trainer.run()
        trainer.save_final()
    except ResumeError as e:
        status, code, message = "resume_failed", _resume_code(e), str(e)
        say(f"error: --resume {run_dir}: {e}", file=sys.stderr)
    except GrowthCheckFailed as e:
        status, code, message = "failed_check", EXIT_FAILED_CHECK, str(e)
        say(f"\nSTOPPED: {e}", file=sys.stderr)
    except FloatingPointError as e:
        status, code, message = "diverged", EXIT_DIVERGED, str(e)
        say(f"\nSTOPPED: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        status, code = "interrupted", EXIT_INTERRUPTED
        message = f"interrupted; continue with --resume {run_dir}"
        say(f"\n{message}", file=sys.stderr)
    finally:
        if trainer.metrics is not None:
            trainer.metrics.close()
    if not trainer.state or not ctx.is_main:  # failed before the first model existed; rank > 0
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
                           title=f"{run_dir.name}: {desc}",
                           phase_steps={p: cfg.phase(p).steps for p in (1, 2, 3)})
            summary["plot"] = png.name if png is not None else None
        except Exception as e:  # a plot must never lose a finished run
            print(f"note: could not draw loss_curve.png: {e}", file=sys.stderr)
            summary["plot"] = None
    atomic_write_json(run_dir / "summary.json", summary)
    _print_summary(summary)
    return code


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _remove_fresh(paths: list[Path]) -> None:
    """Removes the folders in ``paths`` (created by this call), innermost first."""
    for p in reversed(paths):
        if p.is_dir() and not p.is_symlink():
            if p.name == ".tokenizer-cache":
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    p.rmdir()  # only if empty
                except OSError:
                    pass


def _resume_point(run_dir: Path, cfg: TrainConfig, ctx=None):
    """Cleans a resumed run's orphaned temporary folders, checks its tokenizer.json, picks
    the checkpoint to start from (falling back past damaged ones) and refuses a changed
    config; see checkpoint.py. Raises ResumeError / ResumeRefused (one-line messages).
    Under torchrun rank 0 cleans, then every rank reads the same files (and decides the same)."""
    main = ctx is None or ctx.is_main
    if main:
        removed = clean_orphans(run_dir)
        if removed:
            print(f"resume: removed {len(removed)} unfinished checkpoint folder(s) left by an "
                  f"interrupted save: {', '.join(removed)}", file=sys.stderr)
    if ctx is not None:
        ctx.barrier()
    if (run_dir / "tokenizer.json").exists():
        from .data import load_tokenizer

        try:
            load_tokenizer(run_dir)
        except ImportError:
            pass  # a missing package: the data step names it (exit 2)
        except Exception as e:  # noqa: BLE001 - any failure to read it is damage
            raise ResumeError(f"the run's tokenizer.json is damaged ({_one_line(e)})") from None
    point = select_checkpoint(run_dir, say=lambda m: print(m, file=sys.stderr) if main else None)
    if point is not None:
        check_resume_config(cfg.to_dict(), *point)
    return point


def _load_stored(run_dir: Path, prog: str) -> TrainConfig | int:
    """The stored config of the run to resume, or the exit status when there is none."""
    where = f"--resume {run_dir}"
    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "does not exist"
        print(f"{prog}: error: {where}: {what}; pass a run directory this pipeline created",
              file=sys.stderr)
        return EXIT_RESUME_FAILED
    if not (run_dir / "config.json").is_file():
        print(f"{prog}: error: {where}: no config.json there; pass a run directory this "
              "pipeline created", file=sys.stderr)
        return EXIT_RESUME_FAILED
    try:
        data = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        return TrainConfig.from_dict(data)
    except (ValueError, TypeError, OSError) as e:
        print(f"{prog}: error: {where}: the run's config.json is damaged or invalid "
              f"({_one_line(e)}); restore it (each checkpoint's state.json holds a copy "
              "under train_config)", file=sys.stderr)
        return EXIT_RESUME_FAILED


def main(argv: Sequence[str] | None = None, prog: str = "train_tinystories.py") -> int:
    """Parses the command line and runs; returns the exit status (see module docstring).

    The flags come from :class:`~growkit.train.config.TrainArgs` through tyro, over the
    defaults, ``--preset`` and ``--config`` (or, with ``--resume``, over the run's stored
    config); the flat flags of earlier versions (``--steps-phase1``) are rewritten to the
    nested ones first (:func:`~growkit.train.config.legacy_to_nested`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = peek_run_options(argv)["resume"]
    stored = run_dir = None
    if resume:
        run_dir = Path(resume).expanduser()
        stored = _load_stored(run_dir, prog)
        if isinstance(stored, int):
            return stored
    try:
        args = parse_command_line(argv, stored, prog=prog, description=DESCRIPTION)
        cfg = args.cfg
    except (ValueError, TypeError, ImportError) as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.print_config:
        print(cfg.to_json_str(), end="")
        return EXIT_OK
    try:
        return run(cfg, resume_dir=run_dir)
    except Exception as e:  # noqa: BLE001 - keep exit 1 for "a growth check failed"
        traceback.print_exc()
        print(f"{prog}: error: internal error ({type(e).__name__}: {_one_line(e)}); this is a "
              "bug, please report it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL
