"""The three-phase training loop: dense -> upcycled MoE -> wider and deeper MoE.

:class:`Trainer` owns one run directory. Its state machine is resumable at every
checkpoint, including across the growth transitions::

    phase 1: dense model                      phase1.steps steps at phase1.lr
      | upcycle_to_moe + verify_functional_equivalence, val loss before/after
    phase 2: MoE                              phase2.steps steps at phase2.lr
      | scale_bilaterally + run_growth_checks, val loss before/after
    phase 3: wider, deeper MoE                phase3.steps steps at phase3.lr

A checkpoint stores the model of the phase it was taken in (after a growth, the grown
model and its config), so a resumed run rebuilds exactly that model; a checkpoint taken
at a phase end is followed, on resume, by the same (deterministic, seeded) growth the
uninterrupted run performed. On the CPU a resumed run reproduces the uninterrupted run's
losses bit for bit.

Under ``torchrun`` the pipeline uses :class:`growkit.train.distributed.DistributedTrainer`,
a subclass that overrides the hooks marked "(hook)" below: how a model is built, wrapped
and loaded, which rows of each batch a rank trains on, how losses and checks are combined
over the ranks, and how checkpoints are written. Everything else is this class's code.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from growkit.models import ModelConfig, Transformer, load_model, save_model

from .checkpoint import (
    CHECKPOINTS_DIR,
    ResumeError,
    ResumeRefused,
    atomic_write_json,
    check_resume_config,
    checkpoint_name,
    is_sharded_checkpoint,
    load_optimizer,
    load_rng,
    prune_checkpoints,
    save_checkpoint,
    select_checkpoint,
)
from .config import TrainConfig
from .data import TokenDataset, load_tokenizer, prepare_data
from .metrics import MetricsLog, parameter_counts, training_flops_per_token

__all__ = ["Trainer", "GrowthCheckFailed", "lr_at", "make_optimizer"]

PHASE_LABELS = {1: "dense", 2: "moe", 3: "grown"}
GROWTH_EVENTS = {2: "upcycle_to_moe", 3: "scale_bilaterally"}


class GrowthCheckFailed(RuntimeError):
    """A growth check failed and ``continue_on_failed_check`` is off.

    Attributes:
        phase: The phase the growth led into (2 or 3).
        report_path: The JSON report in the run directory.
    """

    def __init__(self, message: str, phase: int, report_path: Path | None) -> None:
        super().__init__(message)
        self.phase = phase
        self.report_path = report_path


# ---------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) and none on norms and biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)


def lr_at(cfg: TrainConfig, phase: int, step: int) -> float:
    """Learning rate of the ``step``-th (0-based) step of ``phase``.

    Linear warmup over ``warmup(phase)`` steps to ``phase<p>.lr``, then constant or a
    cosine decay to ``phase<p>.min_lr_ratio`` (else the run's ``min_lr_ratio``) times
    ``phase<p>.lr`` at the phase's last step. Each phase has its own schedule.
    """
    ph = cfg.phase(phase)
    peak, warm, total = ph.lr, cfg.warmup(phase), ph.steps
    floor = cfg.min_lr_ratio if ph.min_lr_ratio is None else ph.min_lr_ratio
    if warm > 0 and step < warm:
        return peak * (step + 1) / warm
    if cfg.schedule == "constant":
        return peak
    span = max(1, total - warm - 1)
    progress = min(1.0, max(0.0, (step - warm) / span))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------
# Growth-check results
# ---------------------------------------------------------------------------

def _check_outcome(result) -> tuple[bool, dict[str, Any], str, str]:
    """(passed, JSON report, full text, one-line summary) of a check's report.

    Both checks the pipeline runs (``run_growth_checks``, ``verify_functional_equivalence``)
    return a ``GrowthReport`` or a ``CheckResult``: ``passed``, ``to_json()``, ``render()``.
    """
    report = json.loads(result.to_json())
    report.setdefault("passed", bool(result.passed))
    summary = result.summary() if callable(result.summary) else result.summary_line()
    return bool(result.passed), report, result.render(), summary


def _rehome_(params) -> None:
    """Moves each tensor into memory of its own from the allocator.

    Tensors loaded from a safetensors file share one buffer at offsets that are not
    64-byte aligned; CPU kernels then take other vectorization paths than on freshly
    allocated tensors and round differently in the last bit, so a resumed run would drift
    from the uninterrupted one by ~1e-9 per step. A copy restores the alignment.
    """
    with torch.no_grad():
        for p in params:
            p.data = p.data.clone()


# ---------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------

def load_whole_checkpoint(ckpt: Path, device, cfg: TrainConfig, lr: float) -> tuple[Transformer, torch.optim.AdamW]:
    """The model and AdamW of a single-process (safetensors) checkpoint, whole, on ``device``."""
    model = load_model(ckpt, device=device)
    _rehome_(model.parameters())
    optimizer = make_optimizer(model, cfg, lr)
    load_optimizer(optimizer, model, ckpt)
    for st in optimizer.state.values():
        for k, v in st.items():
            if torch.is_tensor(v):
                st[k] = v.clone()
    return model, optimizer


class Trainer:
    """Runs (or resumes) one three-phase run in ``run_dir``.

    Build it with :meth:`prepare` (which loads the data and checks everything before any
    file is written), then call :meth:`run`.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, dataset: TokenDataset, tokenizer,
                 data_description: str, resume: bool,
                 resume_from: tuple[Path, dict[str, Any]] | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ds = dataset
        self.tokenizer = tokenizer
        self.data_description = data_description
        self.resume = resume
        # (checkpoint, verified state) chosen by checkpoint.select_checkpoint; None: choose
        self.resume_from = resume_from
        self.device = torch.device(cfg.resolved_device())
        self.autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
        self.batch_gen = torch.Generator(device="cpu")
        self.batch_gen.manual_seed(cfg.seed)
        self.model: Transformer | None = None
        self.optimizer: torch.optim.AdamW | None = None
        self.metrics: MetricsLog | None = None
        self.state: dict[str, Any] = {}
        self.freeze = None  # growkit.growth.GrowthFreeze while training only what growth added
        self.monitor = None  # growkit.verify.GrowthMonitor of a grown model
        self._val_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._t0 = time.perf_counter()
        self._elapsed_before = 0.0
        self.is_main = True  # the process that prints and writes files (rank 0 under torchrun)
        self.wrapper = None  # what the training forward runs through: a DDP wrapper, or the model

    # ------------------------------------------------------------------ setup

    @staticmethod
    def load_data(cfg: TrainConfig, run_dir: Path | None = None):
        """(dataset, tokenizer, description); a resumed run reuses its tokenizer.json."""
        tok = None
        if run_dir is not None and (Path(run_dir) / "tokenizer.json").is_file():
            tok = load_tokenizer(run_dir)
        return prepare_data(cfg, tokenizer=tok)

    def data_fingerprint(self) -> dict[str, Any]:
        # From the token caches' checksums: never reads (or holds) the whole corpus.
        return {**self.ds.fingerprint(), "vocab_size": self.tokenizer.vocab_size}

    def _say(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(msg)

    def _write_json(self, path: Path, obj: Any) -> None:
        if self.is_main:
            atomic_write_json(path, obj)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _elapsed(self) -> float:
        return self._elapsed_before + (time.perf_counter() - self._t0)

    # ------------------------------------------------------------------ start / resume

    def start(self) -> None:
        """Builds the phase-1 model, or restores the latest checkpoint when resuming."""
        cfg = self.cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        point = None
        if self.resume:
            point = self.resume_from or select_checkpoint(self.run_dir, say=self._say)
        if point is None:
            if self.resume:
                self._say(f"resume: {self.run_dir} has no checkpoint yet; starting from step 0")
            mcfg = cfg.model_config(self.tokenizer.vocab_size)
            model = Transformer(mcfg)
            model.init_weights(seed=cfg.seed)
            self.model, self.optimizer = self._install(model.to(self.device), None, cfg.phase1.lr)
            self.state = {
                "phase": 1, "phase_step": 0, "phase_done": False, "global_step": 0,
                "tokens_seen": 0, "flops": 0.0, "elapsed_s": 0.0,
                "last_val_loss": None, "last_val_global_step": None,
                "final_val_loss": {}, "checks": {}, "growth": {},
                "phase_models": {"1": self.model.config.to_dict()},
                "data": self.data_fingerprint(),
            }
            self.metrics = self._open_metrics(keep=0 if self.resume else None)
            self._evaluate_and_log()  # the untrained model's validation loss
            return
        ckpt, state = point
        check_resume_config(cfg.to_dict(), ckpt, state)
        fp = self.data_fingerprint()
        if state.get("data") != fp:
            raise ResumeRefused(
                f"TrainConfig.data={cfg.data!r}: the data no longer matches the run being "
                f"resumed (stored {state.get('data')}, now {fp}); resume with the same data")
        try:
            model, optimizer = self._load_checkpoint(ckpt, state)
            load_rng(ckpt, self.batch_gen)
            metrics = self._open_metrics(keep=state["metrics_records"])
        except Exception as e:  # verified files that still do not load: say which, in one line
            why = " ".join(str(e).split())[:300] or type(e).__name__
            raise ResumeError(f"{CHECKPOINTS_DIR}/{ckpt.name} cannot be loaded: {why}") from e
        if cfg.train_after_growth == "new" and state["phase"] > 1:
            # the freeze follows the growth records, which the checkpoint does not hold
            raise ResumeRefused(
                f"{CHECKPOINTS_DIR}/{ckpt.name} is in phase {state['phase']}, after a growth, and "
                "TrainConfig.train_after_growth='new' needs that growth's records, which "
                "checkpoints do not hold: resume from a phase-1 checkpoint, or rerun")
        self.model, self.optimizer, self.metrics = model, optimizer, metrics
        if state["phase"] > 1:
            self._start_monitor(model, state["phase"])
        self.state = state
        self._elapsed_before = float(state["elapsed_s"])
        self._say(f"resume: {ckpt.name} (phase {state['phase']}, step {state['phase_step']}, "
                  f"global step {state['global_step']})")

    def _install(self, model: Transformer, optimizer_state: dict[str, dict[str, Any]] | None,
                 lr: float) -> tuple[Transformer, torch.optim.AdamW]:
        """(hook) The model to train and its AdamW, from a whole model on ``self.device``;
        ``optimizer_state``: Adam state per parameter name to load (None: fresh)."""
        optimizer = make_optimizer(model, self.cfg, lr)
        if optimizer_state:
            params = dict(model.named_parameters())
            for name, st in optimizer_state.items():
                optimizer.state[params[name]] = dict(st)
        return model, optimizer

    def _load_checkpoint(self, ckpt: Path, state: dict[str, Any]) -> tuple[Transformer, torch.optim.AdamW]:
        """(hook) The model and AdamW a checkpoint holds: safetensors files, or the sharded
        (``torch.distributed.checkpoint``) folder a run under torchrun wrote."""
        cfg = self.cfg
        if is_sharded_checkpoint(ckpt):
            from .distributed import load_sharded_whole

            model, opt_state = load_sharded_whole(ckpt, self.device, cfg)
            return self._install(model, opt_state, cfg.phase(state["phase"]).lr)
        return load_whole_checkpoint(ckpt, self.device, cfg, cfg.phase(state["phase"]).lr)

    def _open_metrics(self, keep: int | None):
        """(hook) ``metrics.jsonl``; ``keep``: the records a resumed run keeps."""
        return MetricsLog(self.run_dir / "metrics.jsonl", keep=keep)

    # ------------------------------------------------------------------ evaluation

    def _val_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._val_cache is None:
            self._val_cache = list(self.ds.val_batches(
                self.cfg.batch_size, self.cfg.seq_len, max_batches=self.cfg.eval_batches,
                device=self.device))
        return self._val_cache

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None) -> float:
        """Mean next-token cross entropy (no MoE aux loss) over the fixed val windows."""
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for x, y in self._val_batches():
            x, y, weight = self._val_share(x, y)
            with self._autocast():
                loss = model.loss(x, y, include_aux=False)
            total += weight * float(loss) * y.numel()
            count += weight * y.numel()
        model.train(was_training)
        return self._val_mean(model, total, count)

    def _val_share(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(hook) The rows of a validation batch this process evaluates, and their weight
        (0: run the forward, count nothing): all of them, weight 1."""
        return x, y, 1

    def _val_mean(self, model: torch.nn.Module, total: float, count: int) -> float:
        """(hook) The validation loss from this process's loss sum and token count."""
        return total / count

    def _evaluate_and_log(self) -> float:
        s = self.state
        val = self.evaluate()
        s["last_val_loss"], s["last_val_global_step"] = val, s["global_step"]
        self.metrics.log("eval", phase=s["phase"], step=s["phase_step"],
                         global_step=s["global_step"], val_loss=val,
                         tokens_seen=s["tokens_seen"], flops=s["flops"],
                         elapsed_s=self._elapsed())
        return val

    def _start_monitor(self, model: torch.nn.Module, phase: int) -> None:
        """Watch a grown model's clones and routing every ``eval_interval`` steps (no extra
        passes: GrowthMonitor reads the weights and the routers' latest logits). The width
        scale is the config's, not the growth records': a model resumed from a checkpoint
        has none, and its clones are watched all the same."""
        from growkit.verify import GrowthMonitor

        if self.monitor is not None:
            self.monitor.close()
        scale = self.cfg.scale_factor if phase >= 3 else 1
        self.monitor = GrowthMonitor(model, every=self.cfg.eval_interval, scale_factor=scale, warn=False,
                                     **self._monitor_args())

    def _monitor_args(self) -> dict[str, Any]:
        """(hook) Extra GrowthMonitor arguments (the process group under torchrun)."""
        return {}

    def _monitor_tick(self, phase: int) -> None:
        s = self.state
        rec = None if self.monitor is None else self.monitor.step(s["phase_step"])
        if rec is None:
            return
        router = rec.router or []
        self.metrics.log(
            "monitor", phase=phase, step=s["phase_step"], global_step=s["global_step"],
            min_twin_divergence=rec.min_twin_divergence,
            router_min_entropy=min((r["entropy"] for r in router), default=None),
            router_max_topk_share=max((r["topk_share"] for r in router), default=None),
            monitor_warnings=len(rec.warnings), monitor_s=rec.seconds)

    def probe(self) -> torch.Tensor:
        """The fixed [probe_batch_size, seq_len] batch of validation tokens the checks use."""
        x, _ = next(iter(self.ds.val_batches(self.cfg.probe_batch_size, self.cfg.seq_len,
                                             max_batches=1, device=self.device)))
        return x

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, phase_end: bool) -> Path:
        s = self.state
        self.metrics.sync()
        if self.is_main:  # the process whose metrics.jsonl the checkpoint counts
            s["metrics_records"] = len(self.metrics)
        s["elapsed_s"] = self._elapsed()
        s["model_config"] = self.model.config.to_dict()
        s["train_config"] = self.cfg.to_dict()
        return self._save_checkpoint(checkpoint_name(s["global_step"], s["phase"] if phase_end else None), s)

    def _save_checkpoint(self, name: str, state: dict[str, Any]) -> Path:
        """(hook) Writes checkpoint ``name`` with ``state`` and prunes the older ones."""
        path = save_checkpoint(self.run_dir, name, self.model, self.optimizer, self.batch_gen, state)
        prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        return path

    # ------------------------------------------------------------------ training

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float):
        """One optimizer step on ``model.loss`` (cross entropy + the weighted MoE aux loss).

        Returns (loss, ce, aux, grad norm), detached; aux is None without an aux term.
        The parts for the log: aux is the model's ``aux_loss()`` of this forward, and ce
        the loss less its weighted aux (in float64; within an ulp of the loss's own ce).
        """
        model, opt = self.model, self.optimizer
        for g in opt.param_groups:
            g["lr"] = lr
        with self._autocast():
            loss = model.loss(x, y, forward=self.wrapper)
        coef = model.config.aux_loss_coef
        aux = model.aux_loss().detach() if model.config.n_experts > 0 and coef != 0.0 else None
        ce = loss.detach() if aux is None else loss.detach().double() - coef * aux.double()
        loss.backward()
        self._after_backward()
        grad_norm = None
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
            full = getattr(grad_norm, "full_tensor", None)  # FSDP2's norm is a replicated DTensor
            grad_norm = full() if callable(full) else grad_norm
        opt.step()
        self._after_optimizer_step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), ce, aux, grad_norm

    def _after_backward(self) -> None:
        """(hook) After the backward pass, before clipping: nothing here (a GrowthFreeze
        masks the gradients through its own hooks)."""

    def _after_optimizer_step(self) -> None:
        """(hook) After each optimizer step: nothing here (a GrowthFreeze puts frozen entries
        back through its optimizer hooks)."""

    def _freeze_new(self, model: Transformer):
        """(hook) Train only what the last growth added (``--train-after-growth new``): a
        handle with ``summary()`` and ``remove()``."""
        import growkit.growth as growth

        return growth.freeze_for_growth(model, "new", records=model.growth_records)

    def _next_batch(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(hook) The (x, y) this process trains on: the whole batch [batch_size, seq_len]."""
        return self.ds.get_batch("train", batch_size, seq_len, self.batch_gen, device=self.device)

    def _logged(self, loss, ce, aux):
        """(hook) The (loss, ce, aux) to log: this process's (under torchrun, their mean
        over the ranks, the same on every rank)."""
        return loss, ce, aux

    def _spike_eval(self, phase: int, step: int) -> bool:
        """An extra evaluation: ``post_growth_evals`` of them, evenly spaced over the first
        quarter of a phase that follows a growth, to measure the loss spike there."""
        n, quarter = self.cfg.post_growth_evals, self.cfg.phase(phase).steps // 4
        if phase == 1 or n <= 0 or quarter < 1 or not 0 < step <= quarter:
            return False
        return (step * n) // quarter > ((step - 1) * n) // quarter

    def train_phase(self, phase: int) -> None:
        cfg, s = self.cfg, self.state
        total = cfg.phase(phase).steps
        B, T = cfg.batch_size, cfg.seq_len
        flops_per_step = training_flops_per_token(self.model.config, T) * B * T
        bar = tqdm(total=total, initial=s["phase_step"], disable=not cfg.progress or not self.is_main,
                   desc=f"phase {phase} ({PHASE_LABELS[phase]})", dynamic_ncols=True,
                   unit="step", leave=True)
        interval_tokens, interval_time = 0, 0.0
        try:
            while s["phase_step"] < total:
                step = s["phase_step"]
                lr = lr_at(cfg, phase, step)
                t = time.perf_counter()
                x, y = self._next_batch(B, T)
                loss, ce, aux, gnorm = self._train_step(x, y, lr)
                s["phase_step"] += 1
                s["global_step"] += 1
                s["tokens_seen"] += B * T
                s["flops"] += flops_per_step
                interval_tokens += B * T
                last = s["phase_step"] == total
                if s["phase_step"] % cfg.log_interval == 0 or last:
                    loss, ce, aux = self._logged(loss, ce, aux)
                    loss_v = float(loss)  # syncs the device, so the timing below is real
                    interval_time += time.perf_counter() - t
                    tps = interval_tokens / max(interval_time, 1e-9)
                    self.metrics.log(
                        "train", phase=phase, step=s["phase_step"], global_step=s["global_step"],
                        loss=loss_v, ce_loss=float(ce), aux_loss=None if aux is None else float(aux),
                        lr=lr, grad_norm=None if gnorm is None else float(gnorm),
                        tokens_per_s=tps, tokens_seen=s["tokens_seen"], flops=s["flops"],
                        elapsed_s=self._elapsed())
                    if not math.isfinite(loss_v):
                        raise FloatingPointError(
                            f"phase {phase} step {s['phase_step']}: loss is {loss_v}; lower "
                            f"--phase{phase}.lr or raise --phase{phase}.warmup-frac")
                    bar.set_postfix(loss=f"{loss_v:.3f}", val=f"{s['last_val_loss']:.3f}",
                                    lr=f"{lr:.1e}", tok_s=f"{tps:,.0f}", refresh=False)
                    interval_tokens, interval_time = 0, 0.0
                else:
                    interval_time += time.perf_counter() - t
                bar.update(1)
                self._monitor_tick(phase)
                if s["phase_step"] % cfg.eval_interval == 0 or last \
                        or self._spike_eval(phase, s["phase_step"]):
                    self._evaluate_and_log()
                    bar.set_postfix(loss=f"{float(loss):.3f}", val=f"{s['last_val_loss']:.3f}",
                                    lr=f"{lr:.1e}", refresh=True)
                if last:
                    break
                if cfg.checkpoint_every and s["global_step"] % cfg.checkpoint_every == 0:
                    self.checkpoint(phase_end=False)
        finally:
            bar.close()
        if s["last_val_global_step"] != s["global_step"]:
            self._evaluate_and_log()  # a phase with 0 steps, or a resume at its end
        s["phase_done"] = True
        s["final_val_loss"][str(phase)] = s["last_val_loss"]
        path = self.checkpoint(phase_end=True)
        self._say(f"phase {phase} done: val loss {s['last_val_loss']:.4f} after "
                  f"{total} steps; checkpoint {path.relative_to(self.run_dir)}")

    # ------------------------------------------------------------------ growth

    def _run_check(self, phase: int, old: torch.nn.Module, new: torch.nn.Module,
                   probe: torch.Tensor) -> tuple[bool, dict[str, Any], str | None, str | None]:
        import growkit.verify as verify

        if phase == 2:
            result = verify.verify_functional_equivalence(
                old, new, probe, self.device, tolerance=self.cfg.check_tolerance)
        else:
            result = verify.run_growth_checks(old, new, probe, self.device,
                                              scale_factor=self.cfg.scale_factor,
                                              tolerance=self.cfg.check_tolerance)
        return _check_outcome(result)

    def _grow(self, phase: int, old: torch.nn.Module) -> torch.nn.Module:
        import growkit.growth as growth

        cfg = self.cfg
        if phase == 2:
            # exact: Drop-Upcycling (expert_reinit), which is not, comes after the checks
            return growth.upcycle_to_moe(old, cfg.n_experts, cfg.top_k, seed=cfg.seed,
                                         router_init=cfg.router_init, calibration=self._calibration())
        if self._stacks(phase):
            # G_stack changes the function by design: the width step, which must not, is
            # grown and checked alone first (grow_into stacks the layers after its checks).
            return growth.grow_width(old, cfg.scale_factor, noise_std=cfg.noise_std, seed=cfg.seed)
        return growth.scale_bilaterally(old, cfg.scale_factor, cfg.extra_layers, cfg.noise_std,
                                        depth_mode=cfg.depth_mode, seed=cfg.seed, **self._stack_args())

    def _stack_args(self) -> dict[str, float]:
        return {"stack_scale": self.cfg.stack_scale} if self.cfg.depth_mode == "stack" else {}

    def _stacks(self, phase: int) -> bool:
        """Whether phase ``phase``'s growth ends with G_stack layers that change the function
        (``depth_mode="stack"``, ``stack_scale`` > 0; at 0 they are identity layers, checked
        with the widening)."""
        cfg = self.cfg
        return phase == 3 and cfg.depth_mode == "stack" and cfg.extra_layers > 0 and cfg.stack_scale > 0

    def _by_design(self, phase: int, old: torch.nn.Module,
                   checked: torch.nn.Module) -> tuple[str, torch.nn.Module, dict[str, Any], str] | None:
        """The step after phase ``phase``'s checked growth that changes the function by
        design, or None: (its key in the growth report, the model that trains, its settings,
        what the log says it did).

        * G_stack (``depth_mode="stack"``): the widened, checked model deepened by stacking,
          its records as ``scale_bilaterally`` leaves them (width, then depth) for the
          Adam-state transfer. Du et al. 2024: it then learns faster.
        * Drop-Upcycling (``expert_reinit`` > 0): the upcycling done again from the same
          dense model and seed (so the same routers), with that share of each expert's FFN
          units re-drawn. Nakamura et al. 2025: experts that start apart specialize sooner."""
        import growkit.growth as growth

        cfg = self.cfg
        if self._stacks(phase):
            damped = f", writers x{cfg.stack_scale:g}" if cfg.stack_scale != 1.0 else ""
            return ("depth_stack",
                    growth.deepen_widened(checked, cfg.extra_layers, "stack", **self._stack_args()),
                    {"extra_layers": cfg.extra_layers, "stack_scale": cfg.stack_scale},
                    f"{cfg.extra_layers} layers stacked (G_stack{damped})")
        if phase == 2 and cfg.expert_reinit > 0:
            return ("expert_reinit",
                    growth.upcycle_to_moe(old, cfg.n_experts, cfg.top_k, seed=cfg.seed, router_init=cfg.router_init,
                                          calibration=self._calibration(), expert_reinit=cfg.expert_reinit),
                    {"expert_reinit": cfg.expert_reinit},
                    f"{100 * cfg.expert_reinit:g}% of each expert's FFN units re-drawn (Drop-Upcycling)")
        return None

    def _calibration(self) -> torch.Tensor | None:
        return self.probe() if self.cfg.router_init == "hidden_pca" else None

    def _whole_model(self) -> tuple[Transformer, torch.optim.AdamW]:
        """(hook) The model to grow and the AdamW that trained it, whole on this process."""
        return self.model, self.optimizer

    def _reshard(self, model: Transformer, optimizer: torch.optim.AdamW) -> tuple[Transformer, torch.optim.AdamW]:
        """(hook) The grown model and its AdamW as they train: as they are in one process;
        sharded again under torchrun."""
        return model, optimizer

    def grow_into(self, phase: int) -> None:
        """Grows the current model into phase ``phase``'s model, checks it, swaps it in."""
        import growkit.growth as growth

        cfg, s = self.cfg, self.state
        event = GROWTH_EVENTS[phase]
        if s["last_val_global_step"] != s["global_step"]:
            self._evaluate_and_log()
        val_before = s["last_val_loss"]
        old_model, old_opt = self._whole_model()

        self._say(f"growth into phase {phase}: {event} ...")
        t = time.perf_counter()
        new_model = self._grow(phase, old_model).to(self.device)
        new_model.train()
        t_grow = time.perf_counter() - t
        old_model.eval()
        t = time.perf_counter()
        passed, report, full_text, short_text = self._run_check(
            phase, old_model, new_model, self.probe())
        t_check = time.perf_counter() - t
        old_model.train()

        val_after = self.evaluate(new_model)
        rel = abs(val_after - val_before) / max(abs(val_before), 1e-12)
        val_ok = rel <= cfg.val_tolerance
        report_name = f"verify_phase{phase}_{event}.json"
        report = {
            "phase": phase, "event": event, "global_step": s["global_step"],
            "check": report, "check_passed": passed,
            "val_loss_before": val_before, "val_loss_after": val_after,
            "val_rel_change": rel, "val_tolerance": cfg.val_tolerance, "val_ok": val_ok,
            "passed": bool(passed and val_ok),
            "old_model_config": old_model.config.to_dict(),
            "new_model_config": new_model.config.to_dict(),
            "grow_s": t_grow, "check_s": t_check,
        }
        by_design = self._by_design(phase, old_model, new_model) \
            if report["passed"] or cfg.continue_on_failed_check else None
        if by_design is not None:
            # Checked above: the exact growth. What follows changes the function by design:
            # its effect is reported, not judged.
            key, new_model, settings, did = by_design
            new_model = new_model.to(self.device)
            new_model.train()
            val_changed = self.evaluate(new_model)
            report[key] = {
                **settings, "val_loss_after": val_changed,
                "val_rel_change": (val_changed - val_after) / max(abs(val_after), 1e-12),
                "note": f"{did}: the function changes by design; the checks and the loss "
                        "tolerance above judge the exact growth before it"}
            report["new_model_config"] = new_model.config.to_dict()
        self._write_json(self.run_dir / report_name, report)
        # The text report, as detailed_growth_check prints it (the JSON file has the same).
        text = full_text or short_text
        if text:
            self._say(text)
        self._say(
            f"  check {'PASSED' if passed else 'FAILED'}; val loss {val_before:.4f} -> "
            f"{val_after:.4f} ({100 * rel:.3f}% change, limit {100 * cfg.val_tolerance:g}%) "
            f"{'ok' if val_ok else 'TOO LARGE'}; report {report_name} "
            f"(grow {t_grow:.1f}s, check {t_check:.1f}s)")
        if by_design is not None:
            key, _, _, did = by_design
            st = report[key]
            self._say(f"  then {did}, not function-preserving by design: val loss {val_after:.4f} -> "
                      f"{st['val_loss_after']:.4f} ({100 * st['val_rel_change']:+.2f}%)")
            # what the run records from here on: the model that trains, against the loss before
            val_after = st["val_loss_after"]
            rel = abs(val_after - val_before) / max(abs(val_before), 1e-12)
        s["checks"][f"phase{phase}"] = {
            "event": event, "passed": report["passed"], "check_passed": passed,
            "val_ok": val_ok, "report": report_name}
        s["growth"][f"phase{phase}"] = {
            "event": event, "global_step": s["global_step"], "val_loss_before": val_before,
            "val_loss_after": val_after, "val_rel_change": rel}
        self.metrics.log("growth", phase=phase, step=0, global_step=s["global_step"],
                         event=event, val_loss=val_after, val_loss_before=val_before,
                         val_rel_change=rel, tokens_seen=s["tokens_seen"], flops=s["flops"],
                         elapsed_s=self._elapsed())
        if not report["passed"]:
            why = "the growth check failed" if not passed else \
                f"the validation loss moved {100 * rel:.2f}% (> {100 * cfg.val_tolerance:g}%)"
            if not cfg.continue_on_failed_check:
                raise GrowthCheckFailed(
                    f"phase {phase} growth ({event}): {why}; report: "
                    f"{self.run_dir / report_name}. Rerun with --continue-on-failed-check to "
                    "train on anyway.", phase, self.run_dir / report_name)
            self._say(f"  WARNING: {why}; continuing (--continue-on-failed-check)")

        new_opt = make_optimizer(new_model, cfg, cfg.phase(phase).lr)
        if not cfg.reset_optimizer:
            n = growth.transfer_adam_state(old_model, new_model, old_opt, new_opt)
            self._say(f"  Adam state carried over for {n} of "
                      f"{sum(1 for _ in new_model.parameters())} parameters")
        new_model, new_opt = self._reshard(new_model, new_opt)
        if self.freeze is not None:
            self.freeze.remove()
            self.freeze = None
        if cfg.train_after_growth == "new":
            # what this growth added trains; the rest stays bit-identical (restored after
            # every optimizer step, so AdamW's decay and carried momentum cannot move it)
            self.freeze = self._freeze_new(new_model)
            self._say(f"  training only what phase {phase}'s growth added: {self.freeze.summary()}")
        self._start_monitor(new_model, phase)
        self.model, self.optimizer = new_model, new_opt
        s.update(phase=phase, phase_step=0, phase_done=False)
        s["phase_models"][str(phase)] = new_model.config.to_dict()
        s["last_val_loss"], s["last_val_global_step"] = val_after, s["global_step"]
        self.metrics.log("eval", phase=phase, step=0, global_step=s["global_step"],
                         val_loss=val_after, tokens_seen=s["tokens_seen"], flops=s["flops"],
                         elapsed_s=self._elapsed())
        counts = parameter_counts(new_model.config)
        self._say(f"  phase {phase} model: {counts['total']:,} parameters "
                  f"({counts['active']:,} active per token), d_model "
                  f"{new_model.config.d_model}, {new_model.config.n_layers} layers, "
                  f"{new_model.config.n_experts} experts (top {new_model.config.top_k})")

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        """Trains through the remaining phases; returns the state at the end."""
        s = self.state
        for phase in (1, 2, 3):
            if phase < s["phase"] or (phase == s["phase"] and s["phase_done"]):
                continue
            if phase > s["phase"]:
                self.grow_into(phase)
            self.train_phase(phase)
        s["elapsed_s"] = self._elapsed()
        return s

    def save_final(self) -> Path:
        """The final model and tokenizer in ``<run_dir>/final`` (load with load_model)."""
        out = self.run_dir / "final"
        save_model(self.model, out)
        self.tokenizer.save(out)
        return out

    def model_summary(self, mcfg: ModelConfig) -> dict[str, Any]:
        counts = parameter_counts(mcfg)
        return {**counts, "flops_per_token": training_flops_per_token(mcfg, self.cfg.seq_len),
                "d_model": mcfg.d_model, "n_layers": mcfg.n_layers,
                "n_experts": mcfg.n_experts, "top_k": mcfg.top_k}

