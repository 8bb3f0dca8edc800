"""Does growth pay? Three arms at equal training FLOPs, several seeds.

    python bench/growth_vs_scratch.py --quick                  # smoke test, ~2 min on 2 CPU cores
    python bench/growth_vs_scratch.py --preset tiny            # the packaged stories
    python bench/growth_vs_scratch.py --preset small --data ../shared/data/tinystories/train.txt
    python bench/growth_vs_scratch.py --preset gpu --data hf --seeds 0 1 2

Arms, each trained on the same data with the same batch size, sequence length, optimizer
(AdamW, the pipeline's settings) and validation windows, for the same training FLOPs
(``growkit.train.metrics.training_flops_per_token``; the budget is what the pipeline
spends):

(a) ``pipeline``: the three-phase pipeline (dense -> MoE -> wider and deeper MoE), as
    ``python train_tinystories.py`` runs it with the preset.
(b) ``scratch``: the pipeline's final (phase-3) architecture from a random init, warmup +
    the preset's schedule over its whole run; its peak learning rate is chosen by a sweep
    (``--scratch-lrs``, default the phase-1 rate times 1/3, 1 and 3): every rate's curves
    are kept in the JSON, the one with the lowest mean final validation loss is reported.
(c) ``source``: the phase-1 dense model trained on without growth, at the phase-1 peak
    rate, warmup + schedule over its whole run.

``--variant NAME:FIELD=VALUE,...`` adds other growth recipes to arm (a), each run with
every seed against the same (b) and (c): when to grow (``phase1.steps``), the learning
rate and warmup after growth (``phase3.lr``, ``phase3.warmup_frac``), the schedule
before it (``phase1.min_lr_ratio=1``: no decay before the growth), ``noise_std``,
``expert_reinit`` (Drop-Upcycling at the upcycling), ``reset_optimizer``, ``depth_mode`` (``identity`` or ``stack``: G_stack layers, damped by
``stack_scale``), a smaller
source with larger growth factors (``d_model``, ``n_heads``, ``d_ff``, ``scale_factor``,
``n_layers``, ``extra_layers``, as long as the grown model is still (b)'s architecture)...
Phase 3 of a variant gets as many steps as spend the default pipeline's FLOPs, so every arm still has the same budget, or, with
``budget=F``, that fraction of it (a shorter run with its whole schedule: what a user
with only that much compute would run). A recipe *pays* (issue 10's goal) when it
reaches (b)'s final loss with at most half of (b)'s FLOPs and ends below (c).

Each arm runs with every seed (``--seeds``, at least 2; the seed sets the init, the data
split and the batches, shared by the arms of that seed). The report gives each arm's
final validation loss (mean, standard deviation, min, max over seeds), the FLOPs at which
each arm first reaches (b)'s final loss and (c)'s final loss (linear interpolation
between evaluations; the mean over seeds, None when a seed never reaches it), each
growth's post-growth loss spike, the grown model's pace after its last growth relative to
(b) (``post_growth_speed``), and whether (b) ends below (c): only where it does can
growth pay, since below that budget the small model trained on is the better use of the
compute. Writes ``<results-dir>/growth_vs_scratch_<preset>[_quick]_<data>.json`` and a
``.png`` with all three arms' validation loss against FLOPs (mean over seeds, band from
min to max).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS_DIR,
    atomic_write_text,
    device_label,
    parse_cli,
    usage_error,
)

from growkit.models import ModelConfig, Transformer  # noqa: E402
from growkit.train.config import (  # noqa: E402
    PRESETS,
    TrainConfig,
    flatten_config,
    legacy_to_nested,
    parse_args,
    preset_config,
)
from growkit.train.data import load_tokenizer, prepare_data  # noqa: E402
from growkit.train.metrics import (  # noqa: E402
    post_growth_spikes,
    read_metrics,
    training_flops_per_token,
)
from growkit.train.pipeline import run  # noqa: E402
from growkit.train.trainer import lr_at, make_optimizer  # noqa: E402

#: --quick: a small model and a few hundred steps; every code path, minutes not hours.
QUICK = dict(
    d_model=32, n_layers=2, n_heads=2, seq_len=32, batch_size=8, n_experts=4, top_k=2,
    scale_factor=2, extra_layers=1,
    phase1={"steps": 160}, phase2={"steps": 40}, phase3={"steps": 40},
    eval_interval=20, eval_batches=4, log_interval=20, checkpoint_every=0,
    keep_checkpoints=1, device="cpu",
    # One thread: on a small CPU shared with other work, two OpenMP threads on these tiny
    # matrices can run 50x slower than one (oversubscription); a GPU run ignores it.
    threads=1,
)

Curve = list[tuple[float, float]]


def flops_to_reach(curve: Curve, target: float) -> float | None:
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


def stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": values}


def mean_or_none(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else statistics.fmean(values)


#: Fields a --variant may not change: they define the data, the batches and the validation
#: windows that arms (b) and (c) share with the default pipeline.
SHARED_FIELDS = ("data", "val_data", "max_stories", "val_fraction", "tokenizer",
                 "bpe_vocab_size", "batch_size", "seq_len", "eval_batches", "seed", "device",
                 "dtype")


def loss_at_growth(run: dict) -> tuple[float, float]:
    """(FLOPs, validation loss) of a pipeline run at its last growth: the best loss up to it."""
    g = run["growth_flops"][-1]
    return g, min(l for f, l in run["curve"] if f <= g)


def head_start_at_growth(run: dict, scratch_curve: Curve) -> float | None:
    """FLOPs (b) needs to reach the loss a pipeline run had at its last growth, minus the
    FLOPs the run had spent then: the lead a function-preserving growth hands the grown
    model (None if (b) never reaches that loss)."""
    g, loss = loss_at_growth(run)
    reach = flops_to_reach(scratch_curve, loss)
    return None if reach is None else reach - g


def post_growth_speed(run: dict, scratch_run: dict) -> float | None:
    """How fast a pipeline run learned after its last growth, relative to (b) over the same
    stretch of loss: the FLOPs (b) (``scratch_run``, same seed) took from the loss the run
    had at the growth down to (b)'s own final loss, divided by the FLOPs the run took from
    the growth to that same loss. 1 is (b)'s pace; above 1 the grown model learns faster
    than a fresh one, which a recipe needs to beat the head start it is handed (None when
    either never gets there, or the growth left no loss to make up)."""
    g, start = loss_at_growth(run)
    target = scratch_run["final_val_loss"]
    b_from, b_to = (flops_to_reach(scratch_run["curve"], x) for x in (start, target))
    a_to = flops_to_reach(run["curve"], target)
    if b_from is None or b_to is None or a_to is None or a_to <= g or b_to <= b_from:
        return None
    return (b_to - b_from) / (a_to - g)


def phase_step_flops(cfg: TrainConfig, vocab_size: int) -> dict[int, float]:
    """Training FLOPs of one step of each phase (the pipeline's own count)."""
    tokens = cfg.batch_size * cfg.seq_len
    return {p: training_flops_per_token(cfg.model_config(vocab_size, phase=p), cfg.seq_len) * tokens
            for p in (1, 2, 3)}


def pipeline_flops(cfg: TrainConfig, vocab_size: int) -> float:
    """Training FLOPs of the whole pipeline with ``cfg`` (every phase's steps)."""
    f = phase_step_flops(cfg, vocab_size)
    return sum(cfg.phase(p).steps * f[p] for p in (1, 2, 3))


def fill_budget(cfg: TrainConfig, vocab_size: int, budget: float) -> TrainConfig:
    """``cfg`` with as many phase-3 steps as bring its training FLOPs nearest ``budget``.

    Raises:
        ValueError: If phases 1 and 2 alone leave less than one phase-3 step.
    """
    f = phase_step_flops(cfg, vocab_size)
    left = budget - cfg.phase1.steps * f[1] - cfg.phase2.steps * f[2]
    steps3 = round(left / f[3])
    if steps3 < 1:
        raise ValueError(f"phases 1 and 2 ({cfg.phase1.steps} and {cfg.phase2.steps} steps) "
                         f"spend {budget - left:.3g} of the {budget:.3g} FLOPs budget, leaving no "
                         "phase-3 step: give them fewer steps")
    return TrainConfig.from_dict({"phase3": {"steps": steps3}}, base=cfg)


def with_fields(base: TrainConfig, items: list[str], prog: str) -> TrainConfig:
    """``base`` with ``FIELD=VALUE`` items (``FIELD`` alone: a switch) applied as the
    pipeline applies its flags ``--FIELD VALUE`` (tyro)."""
    flags: list[str] = []
    for item in items:
        key, eq, value = item.partition("=")
        flags += [f"--{key.strip()}", value.strip()] if eq else [f"--{key.strip()}"]
    return parse_args(legacy_to_nested(flags), base, prog=prog).cfg if flags else base


def tyro_flag(t, *, metavar: str | None = None, own_hint: bool = False, repeatable: bool = False):
    """``t`` annotated for tyro: ``metavar`` in the help; ``own_hint``: the help text says the
    default (or that the flag repeats) itself, so tyro adds no "(default: ...)"; ``repeatable``:
    one value per ``--flag VALUE``, given again for more."""
    arg = {**({"metavar": metavar} if metavar else {}),
           **({"help_behavior_hint": ""} if own_hint else {})}
    marks = [tyro.conf.arg(**arg)] if arg else []
    marks += [tyro.conf.UseAppendAction] if repeatable else []
    return Annotated[(t, *marks)] if marks else t


#: The --preset choices: the pipeline's presets.
Preset = Literal[tuple(sorted(PRESETS))]
#: Types of flags (aliases: pyflakes reads a string inside an annotation as a forward reference).
JsonFile = tyro_flag(str | None, metavar="JSON")
SetItems = tyro_flag(tuple[str, ...], metavar="FIELD=VALUE", own_hint=True, repeatable=True)
VariantItems = tyro_flag(tuple[str, ...], metavar="NAME:FIELD=VALUE[,FIELD=VALUE...]",
                         own_hint=True, repeatable=True)
#: A list flag whose help says its default.
Floats = tyro_flag(tuple[float, ...] | None, own_hint=True)


@dataclass
class ConfigArgs:
    """--preset, --quick, --data and --set: the settings the bench scripts start from."""

    preset: Preset = "tiny"
    quick: bool = False
    """a small model and a few hundred steps (smoke test, ~2 min on a CPU)"""
    data: tyro_flag(str | None, own_hint=True) = None
    """'embedded' (default), 'hf' or a .txt path"""
    set: SetItems = ()
    """override a TrainConfig field of the pipeline, as the pipeline's flag --FIELD VALUE (phase1.steps=100, d-model=96; FIELD alone: a switch such as reset-optimizer or no-plot; repeatable)"""


def config_from_arguments(args: ConfigArgs, **overrides: Any) -> tuple[TrainConfig, dict[str, Any]]:
    """The preset (``--quick``'s model if asked) with ``overrides``, ``--data`` and then
    ``--set`` applied, no plot and no progress bars; (that config, the overrides)."""
    overrides = {**(QUICK if args.quick else {}), **overrides}
    if args.data:
        overrides["data"] = args.data
    overrides.update(plot=False, progress=False)
    base = preset_config(args.preset, **overrides)
    try:
        return with_fields(base, list(args.set), "--set"), overrides
    except (TypeError, ValueError) as e:
        usage_error(f"--set: {e}")


def finish_plot(fig, ax, path: Path) -> None:
    """Labels, grid and legend of a loss-against-FLOPs plot; saves it to ``path``."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_variant(text: str, base: TrainConfig) -> tuple[str, list[str], TrainConfig, float]:
    """``NAME:FIELD=VALUE[,FIELD=VALUE...]`` -> (name, the items, ``base`` changed, the
    fraction of the budget the recipe spends).

    ``budget=F`` (F in (0, 1]) is not a field: the recipe's phase 3 is cut to spend that
    fraction of the default pipeline's FLOPs, with its whole schedule (warmup and decay)
    inside it, so a recipe can be asked to reach (b)'s final loss with less compute, as a
    run that had only that budget would. Without it F is 1.

    Raises:
        ValueError: A missing name or item, a bad field or value (the pipeline's own
            message), a budget outside (0, 1], or a field of :data:`SHARED_FIELDS`.
    """
    name, sep, rest = text.partition(":")
    name = name.strip()
    items = [i.strip() for i in rest.split(",") if i.strip()]
    # The name becomes a folder name (NAME-seedN): letters, digits, '-', '_' and '.' (lr1.5e-3),
    # not starting with '.'.
    plain = name.replace("-", "").replace("_", "").replace(".", "").isalnum()
    if not sep or not name or not items or not plain or name.startswith("."):
        raise ValueError(f"--variant {text!r}: write NAME:FIELD=VALUE[,FIELD=VALUE...] with a "
                         "plain name (letters, digits, '-', '_', '.'), e.g. "
                         "late:phase1.steps=3000,phase3.lr=1e-3")
    fraction = 1.0
    fields = []
    for item in items:
        key, _, value = item.partition("=")
        if key.strip() != "budget":
            fields.append(item)
            continue
        try:
            fraction = float(value)
        except ValueError:
            fraction = math.nan
        if not 0 < fraction <= 1:
            raise ValueError(f"--variant {name}: budget={value.strip()!r} must be a fraction "
                             "of the default pipeline's FLOPs in (0, 1], e.g. budget=0.5")
    cfg = with_fields(base, fields, f"--variant {name}")
    changed = [k for k in SHARED_FIELDS if getattr(cfg, k) != getattr(base, k)]
    if changed:
        raise ValueError(f"--variant {name}: {changed} must stay as in the default pipeline "
                         "(arms (b) and (c) share its data, batches and validation windows)")
    return name, items, cfg, fraction


# ---------------------------------------------------------------------------
# Training an arm outside the pipeline
# ---------------------------------------------------------------------------

class Evaluator:
    """The pipeline's validation loss (Trainer.evaluate): the same fixed windows."""

    def __init__(self, ds, cfg: TrainConfig, device: torch.device) -> None:
        self.batches = list(ds.val_batches(cfg.batch_size, cfg.seq_len,
                                           max_batches=cfg.eval_batches, device=device))
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) \
            if cfg.dtype == "bfloat16" else nullcontext

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> float:
        model.eval()
        total, count = 0.0, 0
        for x, y in self.batches:
            with self.autocast():
                loss = model.loss(x, y, include_aux=False)
            total += float(loss) * y.numel()
            count += y.numel()
        model.train()
        return total / count


def arm_schedule(cfg: TrainConfig, steps: int, lr: float) -> TrainConfig:
    """The schedule of an arm without growth (its phase 1, read by ``lr_at``): the
    pipeline's phase-1 warmup fraction and cosine/constant over the arm's ``steps``, at peak
    rate ``lr``, decaying to the run's floor. A phase-1 floor of its own (1 holds the rate
    until a growth) belongs to the pipeline: an arm that never grows still decays."""
    return TrainConfig.from_dict({"phase1": {"steps": steps, "lr": lr, "min_lr_ratio": None}},
                                 base=cfg)


def train_arm(ds, cfg: TrainConfig, model_cfg: ModelConfig, lr: float, budget: float,
              evaluate: Evaluator, device: torch.device, n_evals: int, label: str) -> dict:
    """Trains ``model_cfg`` from ``cfg.seed``'s init for ``budget`` FLOPs; the curve."""
    per_step = training_flops_per_token(model_cfg, cfg.seq_len) * cfg.batch_size * cfg.seq_len
    steps = max(1, int(budget // per_step))
    sched = arm_schedule(cfg, steps, lr)
    model = Transformer(model_cfg)
    model.init_weights(seed=cfg.seed)
    model = model.to(device).train()
    opt = make_optimizer(model, cfg, lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    autocast = evaluate.autocast
    eval_every = max(1, steps // n_evals)
    curve: Curve = [(0.0, evaluate(model))]
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(sched, 1, step)
        x, y = ds.get_batch("train", cfg.batch_size, cfg.seq_len, gen, device=device)
        with autocast():
            loss = model.loss(x, y)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % eval_every == 0 or step == steps - 1:
            curve.append(((step + 1) * per_step, evaluate(model)))
    wall = time.perf_counter() - t0
    if not math.isfinite(curve[-1][1]):
        print(f"  {label}: diverged (val loss {curve[-1][1]})")
    print(f"  {label}: {steps} steps, final val loss {curve[-1][1]:.4f} ({wall:.1f} s)")
    return {"lr": lr, "steps": steps, "flops_per_step": per_step, "curve": curve,
            "final_val_loss": curve[-1][1], "wall_s": wall}


#: Fields that do not change what a run computes (where it writes, what it shows).
RUN_ONLY_FIELDS = ("out_dir", "run_dir", "name", "progress", "plot", "threads",
                   "checkpoint_every", "keep_checkpoints", "token_cache_dir")
#: Fields that change the pipeline's run but neither arm (b) nor arm (c): what happens
#: at and after the growths (the budget is checked on its own); a phase's name covers
#: all of its settings. Phase 1's floor and its steps (when to grow) are the pipeline's
#: only: train_arm runs phase 1's warmup and rate over its own steps, down to the run's floor.
PIPELINE_ONLY_FIELDS = ("phase1.min_lr_ratio", "phase1.steps", "phase2", "phase3", "noise_std", "expert_reinit",
                        "reset_optimizer", "router_init", "train_after_growth", "depth_mode", "stack_scale",
                        "check_tolerance", "val_tolerance", "probe_batch_size",
                        "continue_on_failed_check", "post_growth_evals")
#: What :func:`pipeline_arm` and the report read of each pipeline run.
PIPELINE_RUN_KEYS = frozenset({"seed", "curve", "final_val_loss", "flops", "phase_steps",
                               "post_growth_spike", "growth_flops"})


def _same_settings(cfg: TrainConfig) -> bool:
    """Whether ``cfg.run_dir`` holds a run (its ``config.json``) of these settings."""
    try:
        stored = json.loads((Path(cfg.run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    want = cfg.to_dict()
    return isinstance(stored, dict) and all(stored.get(k) == want[k] for k in want if k not in RUN_ONLY_FIELDS)


def finished_run(cfg: TrainConfig) -> dict | None:
    """The summary of a completed run of these settings in ``cfg.run_dir``, else None
    (a comparison cut short picks up its finished runs when given the same ``--out``)."""
    try:
        summary = json.loads((Path(cfg.run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if _same_settings(cfg) and summary.get("status") == "completed" else None


def clear_unfinished_run(cfg: TrainConfig) -> bool:
    """Removes ``cfg.run_dir`` when it holds an unfinished run of these settings (a
    comparison killed mid-run leaves one: the pipeline would refuse the folder, and the
    rerun would fail that arm); the run starts over, to the same bits. A folder of other
    settings, or no run at all, is left alone (the pipeline then says why it cannot write
    there). Returns whether it removed one."""
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir() or finished_run(cfg) is not None or not _same_settings(cfg):
        return False
    shutil.rmtree(run_dir)
    return True


def run_pipeline(cfg: TrainConfig, label: str, must_pass: bool = True) -> tuple[dict, dict]:
    """Runs the pipeline with ``cfg`` (or reads its finished run); (its record for the
    report, its summary.json). A failed run stops everything if ``must_pass``, else its
    record says ``{"seed", "exit_status"}``."""
    print(f"\n=== seed {cfg.seed}: {label} ===", flush=True)
    summary = finished_run(cfg)
    if summary is None:
        if clear_unfinished_run(cfg):
            print(f"{label}: starting over the unfinished run in {cfg.run_dir}", flush=True)
        code = run(cfg)
        if code != 0:
            if must_pass:
                raise SystemExit(f"{label} (seed {cfg.seed}) failed with exit status {code}")
            print(f"{label} (seed {cfg.seed}) failed with exit status {code}", flush=True)
            return {"seed": cfg.seed, "exit_status": code}, {}
        summary = json.loads((Path(cfg.run_dir) / "summary.json").read_text())
    else:
        print(f"{label}: reusing the finished run in {cfg.run_dir}", flush=True)
    run_dir = Path(cfg.run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    curve = [(r["flops"], r["val_loss"]) for r in records if r["kind"] == "eval"]
    spikes = post_growth_spikes(records, {ph: cfg.phase(ph).steps for ph in (1, 2, 3)})
    return {"seed": cfg.seed, "curve": curve, "final_val_loss": curve[-1][1],
            "flops": summary["flops"],
            "phase_steps": [cfg.phase(ph).steps for ph in (1, 2, 3)],
            "phase_final_val_loss": {k: v["final_val_loss"]
                                     for k, v in summary["phases"].items()},
            "post_growth_spike": {k: v["post_growth_spike"] for k, v in spikes.items()},
            "growth_flops": [r["flops"] for r in records if r["kind"] == "growth"],
            "checks_passed": summary["checks_passed"],
            "wall_s": summary["wall_time_s"]}, summary


def reusable_arms(path: Path, base: TrainConfig, seeds: list[int], lrs: list[float]) -> dict:
    """Arms (b) and (c) of an earlier result JSON for ``seeds``, if it ran the same
    settings (every field but :data:`RUN_ONLY_FIELDS` and :data:`PIPELINE_ONLY_FIELDS`),
    the same (b) sweep and the same budget; arm (a) too (``"pipeline"``, else None) if
    the pipeline's own fields are also the same.

    Raises:
        ValueError: Naming what differs or is missing.
    """
    try:
        prev = json.loads(path.read_text())
        arms, config = prev["arms"], prev["config"]
        sweep, budget = arms["scratch"]["sweep"], float(prev["budget_flops"])
        vocab = int(arms["source"]["model_config"]["vocab_size"])
        # Through TrainConfig: a field added since that run reads as its default.
        config = flatten_config(TrainConfig.from_dict(config).to_dict())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a result of this script ({type(e).__name__}: {e})") \
            from None
    want = flatten_config(base.to_dict())
    differ = sorted(k for k in set(want) | set(config)
                    if k not in RUN_ONLY_FIELDS and want.get(k) != config.get(k))
    if [k for k in differ
            if k not in PIPELINE_ONLY_FIELDS and k.partition(".")[0] not in PIPELINE_ONLY_FIELDS]:
        raise ValueError(f"{path} ran other settings: {differ} differ; rerun without it")
    now = pipeline_flops(base, vocab)
    # The budget to within half a phase-3 step, as fill_budget gives the variants.
    if abs(now - budget) > phase_step_flops(base, vocab)[3] / 2 * (1 + 1e-9):
        raise ValueError(f"{path} had a budget of {budget:.4g} FLOPs, these settings spend "
                         f"{now:.4g}: give phase 3 the steps that spend the same")
    if sorted(float(lr) for lr in sweep) != sorted(lrs):
        raise ValueError(f"{path} swept (b) over {sorted(float(x) for x in sweep)}, not {lrs}")

    def pick(runs: list[dict], what: str) -> list[dict]:
        by_seed = {r["seed"]: r for r in runs}
        missing = [s for s in seeds if s not in by_seed]
        if missing:
            raise ValueError(f"{path} has no {what} run for seeds {missing}")
        return [by_seed[s] for s in seeds]

    # Arm (a) only from a result that records what the report reads of it (results of
    # earlier versions of this script lack some): otherwise it runs again.
    pipeline = None if differ else pick(arms["pipeline"]["runs"], "pipeline")
    if pipeline is not None and any(PIPELINE_RUN_KEYS - set(r) for r in pipeline):
        pipeline = None
    return {"pipeline": pipeline,
            "scratch": {float(lr): pick(e["runs"], f"(b) lr {lr}") for lr, e in sweep.items()},
            "source": pick(arms["source"]["runs"], "(c)"),
            "scratch_model": arms["scratch"]["model_config"],
            "source_model": arms["source"]["model_config"],
            "budget": budget, "data": prev["data"], "device": prev["device"]}


def pipeline_task(cfg: dict, label: str, must_pass: bool = True) -> tuple[dict, dict]:
    """One pipeline run (picklable arguments, for a worker process)."""
    return run_pipeline(TrainConfig.from_dict(cfg), label, must_pass)


def arm_task(model_cfg: dict, lr: float, label: str, cfg: dict, budget: float, n_evals: int,
             device: str, tokenizer_dir: str) -> dict:
    """One arm trained outside the pipeline, on the data and tokenizer of the pipeline run
    in ``tokenizer_dir`` (picklable arguments, for a worker process)."""
    cfg = TrainConfig.from_dict(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ds, _, _ = prepare_data(cfg, tokenizer=load_tokenizer(tokenizer_dir), log=None)
    dev = torch.device(device)
    print(f"=== seed {cfg.seed}: {label} ===", flush=True)
    return train_arm(ds, cfg, ModelConfig.from_dict(model_cfg), lr, budget,
                     Evaluator(ds, cfg, dev), dev, n_evals, label)


def exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """(worker initializer) Ends this process as soon as ``parent_pid`` is no longer its
    parent. A killed comparison's pool workers otherwise run on: the one busy finishes its
    arm, and the arms already handed to the pool's call queue start after it, writing into
    the run folders a new comparison with the same ``--out`` then finds half made
    (measured: a queued pipeline run started after its parent was killed)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def run_tasks(tasks: list[tuple[Any, tuple]], jobs: int) -> list:
    """``[fn(*args) for fn, args in tasks]``, in ``jobs`` processes when ``jobs > 1``
    (which end when this process does, however it ends: :func:`exit_with_parent`)."""
    if jobs <= 1 or len(tasks) <= 1:
        return [fn(*a) for fn, a in tasks]
    # spawn, not fork: a forked child inherits torch's thread pools in whatever state.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as ex:
        futures = [ex.submit(fn, *a) for fn, a in tasks]
        return [f.result() for f in futures]


def pipeline_arm(runs: list[dict]) -> dict:
    return {"runs": runs,
            "final_val_loss": stats([r["final_val_loss"] for r in runs]),
            "budget_flops": statistics.fmean(r["flops"] for r in runs),
            "phase_steps": runs[0]["phase_steps"],
            "growth_flops": runs[0]["growth_flops"],
            "post_growth_spike": {k: stats([r["post_growth_spike"][k] for r in runs])
                                  for k in runs[0]["post_growth_spike"]}}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def _mean_curve(curves: list[Curve]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Pointwise mean/min/max of curves evaluated at the same FLOPs (same steps)."""
    n = min(len(c) for c in curves)
    xs = [statistics.fmean(c[i][0] for c in curves) for i in range(n)]
    ys = [[c[i][1] for c in curves] for i in range(n)]
    return xs, [statistics.fmean(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    arms = result["arms"]
    best = arms["scratch"]["best_lr"]
    series = [
        ("pipeline", [r["curve"] for r in arms["pipeline"]["runs"]], "#cc3311",
         "(a) pipeline: dense -> MoE -> grown"),
        ("scratch", [r["curve"] for r in arms["scratch"]["sweep"][str(best)]["runs"]], "#0077bb",
         f"(b) final architecture from scratch (lr {best:g}, best of sweep)"),
        ("source", [r["curve"] for r in arms["source"]["runs"]], "#009988",
         "(c) phase-1 model trained on, no growth"),
    ]
    tops = []
    for _, curves, color, label in series:
        xs, mean, lo, hi = _mean_curve(curves)
        ax.plot(xs, mean, color=color, lw=1.6, label=f"{label}; n={len(curves)}")
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)
        tops += [m for x, m in zip(xs, mean) if x >= 0.1 * result["budget_flops"]][:1]
    palette = ["#ee7733", "#aa3377", "#bbbb00", "#332288", "#882255", "#44aa99"]
    for i, (name, arm) in enumerate(result.get("variants", {}).items()):
        xs, mean, _, _ = _mean_curve([r["curve"] for r in arm["runs"]])
        ax.plot(xs, mean, color=palette[i % len(palette)], lw=1.1,
                label=f"(a) variant {name}: {textwrap.shorten(', '.join(arm['items']), 60)}")
    for lr, entry in arms["scratch"]["sweep"].items():
        if lr != str(best):
            xs, mean, _, _ = _mean_curve([r["curve"] for r in entry["runs"]])
            ax.plot(xs, mean, color="#0077bb", lw=0.8, ls=":", alpha=0.8,
                    label=f"(b) lr {float(lr):g}")
    for g in arms["pipeline"]["growth_flops"]:
        ax.axvline(g, color="black", ls="--", lw=0.8)
    target = arms["scratch"]["final_val_loss"]["mean"]
    ax.axhline(target, color="gray", ls=":", lw=1)
    lows = [arms[a]["final_val_loss"]["min"] for a in ("pipeline", "source")] + [target]
    if tops:
        ax.set_ylim(min(lows) - 0.03 * abs(min(lows)), max(tops) * 1.02)
    ax.set_title(f"growth vs scratch vs no growth: {result['preset']}"
                 f"{' (quick)' if result['quick'] else ''}, seeds {result['seeds']}\n"
                 f"{textwrap.fill(result['data'], 110)}", fontsize=8)
    finish_plot(fig, ax, path)
    return True


@dataclass
class Args(ConfigArgs):
    """The flags of this script: the common ones (:class:`ConfigArgs`) and these."""

    val_data: str | None = None
    """separate validation .txt file"""
    seeds: tuple[int, ...] = (0, 1)
    scratch_lrs: Floats = None
    """peak learning rates of arm (b)'s sweep (default: the phase-1 rate x 1/3, 1, 3)"""
    variant: VariantItems = ()
    """another growth recipe, run with every seed against the same arms (b) and (c): the pipeline's config with these fields changed (as --set), phase 3 then given the steps that spend the default pipeline's FLOPs (e.g. late:phase1.steps=3000,phase3.lr=1e-3; repeatable)"""
    name: str = ""
    """suffix of the result files (growth_vs_scratch_<preset>_<data>_<name>)"""
    reuse_arms: JsonFile = None
    """take arms (b) and (c) from an earlier result of this script with the same settings (the pipeline's growth and phase-2/3 settings may differ), budget, seeds and --scratch-lrs (checked): run only the pipeline, and not even it if its settings are the same too, and the --variant recipes"""
    n_evals: tyro_flag(int | None, own_hint=True) = None
    """evaluations of arms (b) and (c) (default 20, 10 with --quick)"""
    jobs: tyro_flag(int, own_hint=True) = 1
    """runs at once, each in its own process (default 1; with more, each run gets cpu_count / jobs torch threads unless --set threads=N)"""
    out: tyro_flag(str | None, own_hint=True) = None
    """parent of the pipeline runs (default: temp)"""
    results_dir: str = str(RESULTS_DIR)


def main(argv=None) -> dict:
    args = parse_cli(Args, argv, description=__doc__)
    seeds = list(args.seeds)
    if len(set(seeds)) < 2:
        usage_error("--seeds: give at least 2 different seeds (the report needs a spread)")

    base, overrides = config_from_arguments(
        args, **({"val_data": args.val_data} if args.val_data else {}))
    lr1 = base.phase1.lr
    lrs = sorted(args.scratch_lrs or [lr1 / 3, lr1, lr1 * 3])
    if len(lrs) < 3:
        usage_error("--scratch-lrs: give at least 3 learning rates")
    n_evals = args.n_evals or (10 if args.quick else 20)
    if args.jobs < 1:
        usage_error("--jobs: give 1 or more")
    if args.jobs > 1 and base.threads == 0:  # no oversubscription of the cores
        base = TrainConfig.from_dict({"threads": max(1, (os.cpu_count() or 1) // args.jobs)},
                                     base=base)

    pipe_runs: list[dict] = []
    scratch: dict[float, list[dict]] = {lr: [] for lr in lrs}
    source_runs: list[dict] = []
    variants: dict[str, tuple[list[str], TrainConfig, float]] = {}
    # Before any training: the default pipeline's budget, counted as it counts it (the
    # vocabulary of a BPE tokenizer may end smaller; fill_budget reruns with the real one).
    vocab = 257 if base.tokenizer == "byte" else base.bpe_vocab_size
    planned_budget = pipeline_flops(base, vocab)
    for text in args.variant:
        try:
            name, items, vcfg, fraction = parse_variant(text, base)
        except (TypeError, ValueError) as e:
            usage_error(str(e))
        if name in variants or name in ("pipeline", "scratch", "source"):
            usage_error(f"--variant {name}: the name is taken; give each variant its own")
        try:
            fill_budget(vcfg, vocab, fraction * planned_budget)
        except ValueError as e:
            usage_error(f"--variant {name}: {e}")
        # Another source model or other growth factors are recipes too, as long as they
        # grow into (b)'s architecture: (b) is the target every recipe is measured against.
        grown, target = (c.model_config(vocab, phase=3).to_dict() for c in (vcfg, base))
        if grown != target:
            diff = ", ".join(f"{k} {grown[k]} (not {target[k]})" for k in target
                             if grown[k] != target[k])
            usage_error(f"--variant {name}: its grown model differs from arm (b)'s: {diff}; "
                        "change the source model and the growth factors together (e.g. "
                        "d-model=16,n-heads=1,d-ff=44,scale-factor=4 where the preset has d32, "
                        "2 heads)")
        variants[name] = (items, vcfg, fraction)
    variant_runs: dict[str, list[dict]] = {name: [] for name in variants}

    def seed_cfg(cfg: TrainConfig, seed: int, name: str) -> dict:
        return TrainConfig.from_dict({"seed": seed, "out_dir": str(out_dir),
                                      "run_dir": str(out_dir / f"{name}-seed{seed}")},
                                     base=cfg).to_dict()

    out_dir = Path(args.out or tempfile.mkdtemp(prefix="growth_vs_scratch_"))
    t_start = time.perf_counter()
    reused = None
    if args.reuse_arms:
        try:
            reused = reusable_arms(Path(args.reuse_arms), base, seeds, lrs)
        except ValueError as e:
            usage_error(f"--reuse-arms: {e}")
        scratch, source_runs = reused["scratch"], reused["source"]
    if reused is not None and reused["pipeline"] is not None:
        pipe_runs = reused["pipeline"]
        final_cfg = ModelConfig.from_dict(reused["scratch_model"])
        source_cfg = ModelConfig.from_dict(reused["source_model"])
        budget, data_desc, device_desc = reused["budget"], reused["data"], reused["device"]
    else:
        # Stage 1: the default pipeline of every seed (it fixes the budget and tokenizer).
        firsts = run_tasks([(pipeline_task, (seed_cfg(base, seed, "pipeline"), "(a) pipeline"))
                            for seed in seeds], args.jobs)
        pipe_runs = [record for record, _ in firsts]
        summary = firsts[0][1]
        final_cfg = ModelConfig.from_dict(summary["phases"]["3"]["model_config"])
        source_cfg = ModelConfig.from_dict(summary["phases"]["1"]["model_config"])
        budget = summary["flops"]
        data_desc = summary["data"]
        device = torch.device(summary["device"])
        device_desc = device_label(device)
    # Stage 2: the variants, arm (b)'s sweep and arm (c), every seed.
    tasks, keys = [], []
    for seed in seeds:
        for name, (items, vcfg, fraction) in variants.items():
            try:
                vcfg = fill_budget(vcfg, source_cfg.vocab_size, fraction * budget)
            except ValueError as e:
                raise SystemExit(f"--variant {name}: {e}") from None
            tasks.append((pipeline_task, (seed_cfg(vcfg, seed, name), f"(a) variant {name}",
                                          False)))
            keys.append(("variant", name, seed))
        if reused is not None:
            continue
        arm_args = (seed_cfg(base, seed, "pipeline"), budget, n_evals, str(device),
                    str(out_dir / f"pipeline-seed{seed}"))
        for lr in lrs:
            tasks.append((arm_task, (final_cfg.to_dict(), lr, f"scratch lr {lr:g} seed {seed}",
                                     *arm_args)))
            keys.append(("scratch", lr, seed))
        tasks.append((arm_task, (source_cfg.to_dict(), base.phase1.lr, f"source seed {seed}",
                                 *arm_args)))
        keys.append(("source", None, seed))
    for (kind, key, seed), out in zip(keys, run_tasks(tasks, args.jobs)):
        if kind == "variant":
            variant_runs[key].append(out[0])
        elif kind == "scratch":
            scratch[key].append({"seed": seed, **out})
        else:
            source_runs.append({"seed": seed, **out})

    sweep = {str(lr): {"lr": lr, "runs": runs,
                       "final_val_loss": stats([r["final_val_loss"] for r in runs])}
             for lr, runs in scratch.items()}
    best_lr = min(lrs, key=lambda lr: sweep[str(lr)]["final_val_loss"]["mean"])
    best_runs = scratch[best_lr]
    arms = {
        "pipeline": pipeline_arm(pipe_runs),
        "scratch": {"best_lr": best_lr, "lrs": lrs, "sweep": sweep, "runs": best_runs,
                    # The best rate at an end of the sweep: widen it before trusting (b).
                    "best_lr_at_edge": best_lr in (lrs[0], lrs[-1]),
                    "final_val_loss": sweep[str(best_lr)]["final_val_loss"],
                    "model_config": final_cfg.to_dict()},
        "source": {"runs": source_runs,
                   "final_val_loss": stats([r["final_val_loss"] for r in source_runs]),
                   "model_config": source_cfg.to_dict()},
    }
    # A recipe whose run failed on a seed (a growth check, a NaN loss) is reported as
    # failed, without figures: the comparison needs every seed.
    failed_variants = {name: {"items": items, "failed": {
        str(r["seed"]): r["exit_status"] for r in variant_runs[name] if "exit_status" in r}}
        for name, (items, *_) in variants.items()}
    failed_variants = {k: v for k, v in failed_variants.items() if v["failed"]}
    variant_arms = {name: {"items": items, "budget_fraction": fraction,
                           **pipeline_arm(variant_runs[name])}
                    for name, (items, _, fraction) in variants.items()
                    if name not in failed_variants}
    targets = {"scratch_final": arms["scratch"]["final_val_loss"]["mean"],
               "source_final": arms["source"]["final_val_loss"]["mean"]}
    for name, arm in [*arms.items(), *variant_arms.items()]:
        arm["flops_to_target"] = {}
        for tname, target in targets.items():
            per_seed = [flops_to_reach(r["curve"], target) for r in arm["runs"]]
            mean = mean_or_none(per_seed)
            arm["flops_to_target"][tname] = {
                "target_val_loss": target, "per_seed": per_seed,
                "seeds_reached": sum(v is not None for v in per_seed),
                "mean": mean,  # None unless every seed reached the target
                "fraction_of_budget": None if mean is None else mean / budget}
    # Issue 10's goal for a growth recipe: (b)'s final loss with at most half of (b)'s
    # FLOPs, and a final loss below (c)'s.
    b_of = {s["seed"]: s for s in best_runs}
    for arm in [arms["pipeline"], *variant_arms.values()]:
        half = arm["flops_to_target"]["scratch_final"]["fraction_of_budget"]
        arm["reaches_scratch_final_by_half_budget"] = half is not None and half <= 0.5
        arm["below_source"] = arm["final_val_loss"]["mean"] < targets["source_final"]
        arm["pays"] = arm["reaches_scratch_final_by_half_budget"] and arm["below_source"]
        heads = [head_start_at_growth(r, b_of[r["seed"]]["curve"]) for r in arm["runs"]]
        speeds = [post_growth_speed(r, b_of[r["seed"]]) for r in arm["runs"]]
        arm["post_growth_speed_vs_scratch"] = {"per_seed": speeds, "mean": mean_or_none(speeds)}
        arm["head_start_at_last_growth"] = {
            "per_seed": heads, "mean": mean_or_none(heads),
            # If the grown model then learned as (b) does from the same loss, it would
            # reach (b)'s final loss with this fraction of the budget.
            "best_case_fraction_to_scratch_final":
                None if mean_or_none(heads) is None else 1 - mean_or_none(heads) / budget}
    result = {
        "preset": args.preset, "quick": args.quick, "seeds": seeds, "data": data_desc,
        "device": device_desc, "budget_flops": budget, "reused_arms_from": args.reuse_arms,
        "config": base.to_dict(), "overrides": {k: str(v) for k, v in overrides.items()},
        "set": list(args.set),
        "arms": arms, "variants": variant_arms, "failed_variants": failed_variants,
        "targets": targets,
        "scratch_below_source": targets["scratch_final"] < targets["source_final"],
        "pipeline_below_source": arms["pipeline"]["final_val_loss"]["mean"]
        < targets["source_final"],
        "wall_s": time.perf_counter() - t_start,
        "note": "equal training FLOPs per arm (6 N_active + attention per token); (b)'s "
                "learning rate is the best of the sweep by mean final validation loss; "
                "flops_to_target: first evaluation at or below the target, interpolated",
    }

    print(f"\n=== {args.preset}{' (quick)' if args.quick else ''}: budget {budget:.3g} "
          f"training FLOPs per arm, seeds {seeds} ===")
    print(f"{'arm':<44} {'final val loss':>22} {'FLOPs to (b) final':>19} "
          f"{'to (c) final':>13}")
    names = {"pipeline": "(a) pipeline (dense -> MoE -> grown)",
             "scratch": f"(b) final arch from scratch, lr {best_lr:g}",
             "source": "(c) phase-1 model trained on"}
    names.update({name: f"(a) variant {name}" for name in variant_arms})
    for name, arm in [*arms.items(), *variant_arms.items()]:
        f = arm["final_val_loss"]
        cells = []
        for tname in ("scratch_final", "source_final"):
            t = arm["flops_to_target"][tname]
            if t["fraction_of_budget"] is not None:
                cells.append(f"{100 * t['fraction_of_budget']:.0f}% of budget")
            else:
                cells.append("never" if not t["seeds_reached"] else
                             f"{t['seeds_reached']}/{len(t['per_seed'])} seeds")
        print(f"{names[name]:<44} {f['mean']:.4f} +- {f['std']:.4f} (n={f['n']}) "
              f"{cells[0]:>19} {cells[1]:>13}")
    for lr in lrs:
        f = sweep[str(lr)]["final_val_loss"]
        print(f"    (b) sweep lr {lr:<9g} final {f['mean']:.4f} +- {f['std']:.4f}")
    if arms["scratch"]["best_lr_at_edge"]:
        print(f"    note: (b)'s best rate {best_lr:g} is at an end of the sweep; widen "
              "--scratch-lrs before trusting arm (b)")
    for name, arm in [("pipeline", arms["pipeline"]), *variant_arms.items()]:
        spikes = "; ".join(f"into {k} {100 * sp['mean']:+.2f}% (max {100 * sp['max']:+.2f}%)"
                           for k, sp in arm["post_growth_spike"].items())
        h = arm["head_start_at_last_growth"]
        lead = (f"lead at the last growth {h['mean']:.3g} FLOPs (best case "
                f"{100 * h['best_case_fraction_to_scratch_final']:.0f}% of budget to (b)'s "
                "final)" if h["mean"] is not None else "no lead at the last growth")
        v = arm["post_growth_speed_vs_scratch"]["mean"]
        lead += f"; learning after it at {v:.2f}x (b)'s pace" if v is not None else ""
        print(f"    {names[name]}: phase steps {arm['phase_steps']}, post-growth spike {spikes}; "
              f"{lead}; pays (by half of (b)'s FLOPs, below (c)): {arm['pays']}")
        if "items" in arm:
            print(f"        {', '.join(arm['items'])}")
    for name, v in failed_variants.items():
        print(f"    (a) variant {name} FAILED (exit status by seed {v['failed']}): "
              f"{', '.join(v['items'])}")
    print(f"(b) ends below (c): {result['scratch_below_source']} "
          f"({'growth can pay here' if result['scratch_below_source'] else 'below the crossover: the small model is the better use of this budget'})")

    data_tag = "embedded"
    if args.data and args.data != "embedded":
        data_tag = "hf" if args.data in ("hf", "roneneldan/TinyStories") else Path(args.data).stem
    stem = (f"growth_vs_scratch_{args.preset}{'_quick' if args.quick else ''}_{data_tag}"
            f"{'_' + args.name if args.name else ''}")
    results_dir = Path(args.results_dir)
    atomic_write_text(results_dir / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    drew = plot(result, results_dir / f"{stem}.png")
    print(f"wrote {results_dir / stem}.json{' and .png' if drew else ' (no matplotlib: no plot)'}"
          f"; total {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
