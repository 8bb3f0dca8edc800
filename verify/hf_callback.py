"""GrowthMonitor inside ``transformers.Trainer``: a ``TrainerCallback``.

    from growkit.verify.hf_callback import add_growth_monitor
    trainer = Trainer(model=grown, args=args, train_dataset=data)
    add_growth_monitor(trainer, every=100)      # or Trainer(..., callbacks=[GrowthMonitorCallback(100)])
    trainer.train()

The callback makes a :class:`~growkit.verify.GrowthMonitor` of the Trainer's model at
``on_train_begin``, ticks it at ``on_step_end`` (steps where ``global_step % every == 0``)
and closes it at ``on_train_end``. A tick asks the Trainer to log at that step
(``control.should_log``); the callback then adds its figures to the Trainer's own log call in
``on_log``: to the ``logs`` dict every later callback (TensorBoard, W&B, the printer) receives,
and to the entry just appended to ``state.log_history``. A callback cannot call
``Trainer.log``, and a log call hands ``logs`` to the callbacks in their order, so a reporter
sees the figures only when this callback comes before it: :func:`add_growth_monitor` puts it
first (through the Trainer's public ``add_callback`` / ``remove_callback``); one passed in
``Trainer(callbacks=[...])`` comes after the ``report_to`` reporters, which then miss them
(``state.log_history`` has them either way).

Logged keys (floats): ``growth/twin_div_min`` (the smallest relative twin divergence),
``growth/router_entropy/layer_<i>`` and ``growth/router_topk_share/layer_<i>`` per MoE layer,
``growth/warnings`` (warnings raised at that tick; the warnings themselves go through
``warnings.warn`` as :class:`~growkit.verify.GrowthWarning`).

Data-parallel training (``args.world_size > 1``): the monitor reduces over the world group
(FSDP2 DTensor parameters: over their mesh), so every rank logs the same figures; every rank
runs the callback, as the Trainer does.

transformers is an optional dependency: ``growkit.verify`` imports without it; this module
needs it (``pip install 'growkit[hf]'``; the Trainer also needs ``accelerate``).
"""

from __future__ import annotations

from typing import Callable

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without the hf extra
    raise ImportError(
        "growkit.verify.hf_callback needs transformers: pip install 'growkit[hf]' "
        "(transformers.Trainer itself also needs accelerate)") from e

import torch.distributed as dist

from growkit.validate import whole_number

from .monitor import GrowthMonitor, MonitorRecord

PREFIX = "growth/"


def monitor_metrics(rec: MonitorRecord, prefix: str = PREFIX) -> dict[str, float]:
    """A monitoring record as flat ``{name: float}`` log entries (see the module docstring)."""
    out: dict[str, float] = {}
    if rec.min_twin_divergence is not None:
        out[prefix + "twin_div_min"] = float(rec.min_twin_divergence)
    for r in rec.router:
        out[f"{prefix}router_entropy/layer_{r['layer']}"] = float(r["entropy"])
        out[f"{prefix}router_topk_share/layer_{r['layer']}"] = float(r["topk_share"])
    out[prefix + "warnings"] = float(len(rec.warnings))
    return out


def format_record(rec: MonitorRecord) -> str:
    """One line for a console: the figures a tick logs."""
    parts = [f"step {rec.step}"]
    if rec.min_twin_divergence is not None:
        parts.append(f"min twin divergence {rec.min_twin_divergence:.3e}")
    if rec.router:
        parts.append("router entropy " + " ".join(f"{r['entropy']:.3f}" for r in rec.router))
        parts.append("top-k share " + " ".join(f"{r['topk_share']:.2f}" for r in rec.router))
    parts.append(f"{len(rec.warnings)} warnings ({rec.seconds * 1e3:.1f} ms)")
    return "[growth monitor] " + ", ".join(parts)


class GrowthMonitorCallback(TrainerCallback):
    """Runs a :class:`~growkit.verify.GrowthMonitor` in ``Trainer.train()`` and logs its figures.

    Args:
        every: measure every this many optimizer steps (``state.global_step % every == 0``).
        prefix: prefix of the logged keys.
        log_fn: also called with one line per tick (e.g. ``print``); None: not.
        **monitor_kwargs: passed to ``GrowthMonitor`` (``scale_factor``, ``min_divergence``,
            ``collapse_share``, ``stall_ticks``, ``stall_below``, ``warn``, ``process_group``).

    Attributes:
        monitor: the monitor of the current (or latest) ``train()`` call; None before.
    """

    def __init__(self, every: int = 100, *, prefix: str = PREFIX, log_fn: Callable[[str], None] | None = None,
                 **monitor_kwargs) -> None:
        self.every = whole_number(every, "every", min=1)
        self.prefix = prefix
        self.log_fn = log_fn
        self.monitor_kwargs = monitor_kwargs
        self.monitor: GrowthMonitor | None = None
        self._pending: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
        kw = dict(self.monitor_kwargs)
        if kw.get("process_group") is None and getattr(args, "world_size", 1) > 1 \
                and dist.is_available() and dist.is_initialized():
            # the Trainer's data-parallel processes (DDP hands callbacks the unwrapped model)
            kw["process_group"] = dist.group.WORLD
        self.monitor = GrowthMonitor(model, self.every, **kw)
        self._pending = {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is None:
            return control
        rec = self.monitor.step(state.global_step)
        if rec is not None:
            self._pending = monitor_metrics(rec, self.prefix)
            control.should_log = True  # the Trainer logs at this step; on_log adds the figures
            if self.log_fn is not None:
                self.log_fn(format_record(rec))
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending:
            return control
        if logs is not None:
            logs.update(self._pending)  # what the callbacks after this one receive
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(self._pending)  # Trainer.log appended it just before on_log
        self._pending = {}
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
        return control


def add_growth_monitor(trainer, every: int = 100, **kwargs) -> GrowthMonitorCallback:
    """Add a :class:`GrowthMonitorCallback` to ``trainer`` ahead of its other callbacks, so that
    the reporters (``report_to``: TensorBoard, ...) receive its figures; returns it.

    Args:
        trainer: a ``transformers.Trainer``.
        every, **kwargs: :class:`GrowthMonitorCallback`'s arguments.
    """
    callback = GrowthMonitorCallback(every, **kwargs)
    others = list(trainer.callback_handler.callbacks)
    for c in others:
        trainer.remove_callback(c)
    trainer.add_callback(callback)
    for c in others:
        trainer.add_callback(c)
    return callback
