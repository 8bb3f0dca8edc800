"""GrowthMonitor: watch a grown model in its training loop, at almost no cost.

Every ``every`` steps it measures, without any extra forward or backward pass:

* twin divergence of the cloned weights: the tensors the growth record's scale tiled,
  stacked by shape across layers and permuted so that the s^k twin blocks of their k widened
  dims form one dim (``stats.twin_layout``); one ``block_divergence`` launch per shape gives,
  per twin block g, max and mean |B_g - B_0| and mean |B_g|; the relative divergence is the
  min over twins of mean|B_g - B_0| / mean|B_g| (aggregated over the layers of the stack;
  ``check_symmetry_breaking`` gives the per-layer picture);
* router load of every MoE layer, from the router logits of its latest forward pass (kept by a
  forward hook on each router module; ``close()`` removes the hooks)
  (normalized entropy of the top-k assignment, busiest expert's token share, share of the
  routing slots taken by the k busiest experts).

It warns (``warnings.warn`` with :class:`GrowthWarning`, and in the returned record) when
clones are identical (relative divergence <= ``min_divergence``), when they stop diverging
(no growth over ``stall_ticks`` ticks while still below ``stall_below``), or when routing
collapses (the k busiest experts take >= ``collapse_share`` of the routing slots, with
top_k < n_experts).

Usage::

    monitor = GrowthMonitor(model, every=100)
    for step, batch in enumerate(loader):
        loss = model.loss(*batch); loss.backward(); opt.step(); opt.zero_grad()
        monitor.step(step)          # or monitor(step); None except every 100 steps
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from growkit.growth.adapters import get_adapter
from growkit.growth.roles import Role
from growkit.kernels import block_divergence
from growkit.validate import real_number, whole_number

from .context import DEFAULT_COLLAPSE_SHARE, DEFAULT_MIN_DIVERGENCE, check_model
from .pairing import twin_axes, width_records_scale
from .probe import hook_modules
from .report import jsonable
from .router import expert_load
from .stats import relative, twin_layout


class GrowthWarning(UserWarning):
    """Clones not diverging, or routing collapsed, in a grown model under training."""


@dataclass
class MonitorRecord:
    """What one monitoring tick measured.

    Attributes:
        step: the training step.
        twins: per stacked group: ``roles``, ``tensors``, ``rel_div`` (min over twin blocks of
            mean|B_g - B_0| / mean|B_g|), ``max_div``, ``magnitude``.
        min_twin_divergence: the smallest ``rel_div`` over the groups (None: no clones).
        router: per MoE layer: ``layer``, ``entropy``, ``busiest_share``, ``busiest_expert``,
            ``topk_share``.
        warnings: the warnings raised at this tick.
        seconds: time the tick took.
    """

    step: int
    twins: list[dict] = field(default_factory=list)
    min_twin_divergence: float | None = None
    router: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return jsonable(self.__dict__)


class GrowthMonitor:
    """Tracks twin divergence and router load of a grown model every ``every`` steps.

    Args:
        model: the grown model being trained.
        every: measure every this many steps (steps where ``step % every == 0``).
        scale_factor: the width scale of the clones (None: product of the model's width
            growth records; without any, twins are not tracked).
        min_divergence: relative twin divergence at or below which clones are identical.
        collapse_share: share of routing slots on the k busiest experts that counts as collapse.
        stall_ticks: warn when a group's divergence has not grown for this many ticks...
        stall_below: ...while it is still below this relative divergence.
        warn: call ``warnings.warn`` (the record always lists the warnings).
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 100,
        *,
        scale_factor: int | None = None,
        min_divergence: float = DEFAULT_MIN_DIVERGENCE,
        collapse_share: float = DEFAULT_COLLAPSE_SHARE,
        stall_ticks: int = 3,
        stall_below: float = 1e-2,
        warn: bool = True,
    ) -> None:
        self.every = whole_number(every, "every", min=1)
        check_model(model)
        self.model = model
        self.scale = (whole_number(scale_factor, "scale_factor", min=1) if scale_factor is not None
                      else (width_records_scale(model) or 1))
        self.min_divergence = real_number(min_divergence, "min_divergence", min=0)
        self.collapse_share = real_number(collapse_share, "collapse_share", above=0, max=1)
        self.stall_ticks = whole_number(stall_ticks, "stall_ticks", min=1)
        self.stall_below = real_number(stall_below, "stall_below", min=0)
        self.warn = warn
        self.history: list[MonitorRecord] = []
        self._calls = 0
        self._stalled: set = set()
        self._series: dict[str, list[float]] = defaultdict(list)

        adapter = get_adapter(model, "monitoring")
        roles = adapter.param_roles(model)
        params = adapter.role_params(model)  # parts of fused tensors are views of the parameters
        groups: dict[tuple, dict] = {}
        for name, pr in roles.items():
            if name not in params or not (pr.rule.noise and pr.rule.input_dim is not None):
                continue
            axes = tuple((d, self.scale) for d in twin_axes(pr.role, self.scale))
            if not axes:
                continue
            p = params[name]
            key = (tuple(p.shape), p.dtype, axes)
            g = groups.setdefault(key, dict(params=[], roles=set(), axes=axes, dims=pr.rule.dims))
            g["params"].append(p)
            g["roles"].add(pr.role.value)
        self._groups = list(groups.values())

        # The latest router logits of every MoE layer, kept by a forward hook on the module
        # that owns the router weight (a Linear, or a Hugging Face router returning
        # (logits, weights, indices)); close() removes the hooks.
        self._top_k = adapter.top_k(model)
        self._router_logits: dict[int, torch.Tensor] = {}
        self._hooks = [
            module.register_forward_hook(self._keep_router_logits(layer))
            for layer, module in sorted(hook_modules(model, Role.ROUTER).items())
        ]
        if not self._groups and not self._hooks:
            why = ("it has no growth records and no MoE router" if not getattr(model, "growth_records", None)
                   else "its growth made no clones (scale 1) and it has no MoE router")
            warnings.warn(
                f"GrowthMonitor has nothing to monitor on this {type(model).__name__}: {why}, so "
                "there are no twin blocks to compare and no routing load to watch; pass the model "
                "a growth operator returned (grow_width, scale_bilaterally, upcycle_to_moe), or "
                "scale_factor=... for a model widened elsewhere",
                GrowthWarning, stacklevel=2)

    def _keep_router_logits(self, layer: int):
        store = self._router_logits

        def hook(_module, _inputs, output):
            logits = output[0] if isinstance(output, (tuple, list)) else output
            store[layer] = logits.detach().reshape(-1, logits.shape[-1])

        return hook

    def close(self) -> None:
        """Remove the monitor's forward hooks from the model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ ticks
    def __call__(self, step: int | None = None) -> MonitorRecord | None:
        return self.step(step)

    def step(self, step: int | None = None) -> MonitorRecord | None:
        """Call once per training step (after ``optimizer.step()``); measures every ``every`` steps.

        Args:
            step: the training step (None: counts calls, starting at 0).

        Returns:
            A :class:`MonitorRecord` on measuring steps, else None.
        """
        if step is None:
            step = self._calls
        self._calls += 1
        if step % self.every != 0:
            return None
        return self.measure(step)

    @torch.no_grad()
    def measure(self, step: int = 0) -> MonitorRecord:
        """Measure now (whatever the step)."""
        t0 = time.perf_counter()
        rec = MonitorRecord(step)
        for g in self._groups:
            # Twin blocks of every widened dim become one dim of G blocks (a permuted view;
            # the stack is the one copy): one block_divergence launch per group.
            views = [twin_layout(p.detach(), g["axes"]) for p in g["params"]]
            _, rows, inner = views[0]
            stack = torch.stack([v for v, _, _ in views])
            G = self.scale ** len(g["axes"])
            bd = block_divergence(stack.reshape(-1, G, inner), G, 1)
            means, mags = bd.mean_diff.tolist(), bd.magnitude.tolist()
            rel = min(relative(means[i], mags[i]) for i in range(1, G))
            mx = float(bd.max_diff.max())
            mag = float(bd.magnitude[0])
            key = "+".join(sorted(g["roles"])) + f" {list(g['params'][0].shape)}"
            rec.twins.append(dict(group=key, roles=sorted(g["roles"]), tensors=len(g["params"]),
                                  rel_div=rel, max_div=mx, magnitude=mag))
            self._series[key].append(rel)
            if rel <= self.min_divergence:
                rec.warnings.append(
                    f"step {step}: clones identical in {key} (relative twin divergence {rel:.2e} <= "
                    f"{self.min_divergence:g}): symmetry not broken, grow with noise_std > 0"
                )
            elif self._stalling(key):
                rec.warnings.append(
                    f"step {step}: clones stopped diverging in {key} (relative twin divergence {rel:.2e}, "
                    f"not growing for {self.stall_ticks} checks)"
                )
        if rec.twins:
            rec.min_twin_divergence = min(t["rel_div"] for t in rec.twins)

        logits = [(layer, lg, self._top_k) for layer, lg in sorted(self._router_logits.items())]
        by_shape: dict[tuple, list] = defaultdict(list)
        for layer, lg, k in logits:
            by_shape[(tuple(lg.shape), k)].append((layer, lg.detach()))
        for (shape, k), items in by_shape.items():
            loads = expert_load([lg for _, lg in items], k)
            E = shape[-1]
            for (layer, _), load in zip(items, loads):
                rec.router.append(dict(layer=layer, entropy=load["entropy"], busiest_share=load["busiest_share"],
                                       busiest_expert=load["busiest_expert"], topk_share=load["topk_share"]))
                if k < E and load["topk_share"] >= self.collapse_share:
                    rec.warnings.append(
                        f"step {step}: routing collapsed in MoE layer {layer}: its {k} busiest experts take "
                        f"{load['topk_share']:.0%} of the routing slots (uniform {k / E:.0%}; expert "
                        f"{load['busiest_expert']} gets {load['busiest_share']:.0%} of the tokens)"
                    )
        rec.router.sort(key=lambda r: r["layer"])
        rec.seconds = time.perf_counter() - t0
        if self.warn:
            for w in rec.warnings:
                warnings.warn(w, GrowthWarning, stacklevel=3)
        self.history.append(rec)
        return rec

    def _stalling(self, key: str) -> bool:
        series = self._series[key]
        n = self.stall_ticks
        if key in self._stalled or len(series) <= n or series[-1] >= self.stall_below:
            return False
        window = series[-(n + 1):]
        if all(b <= a * (1 + 1e-3) for a, b in zip(window, window[1:])):
            self._stalled.add(key)
            return True
        return False
