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

Data-parallel training: pass the ``DistributedDataParallel`` wrapper, or the model sharded
by FSDP2's ``fully_shard`` (DTensor parameters); every rank then reduces its part of the
weights and the tokens it routed, and one all-reduce gives every rank the same record (and
the same warnings): that of one process on the full weights and on all ranks' batches
(:mod:`growkit.verify.distributed` says which rows each rank reduces and what moves). Every
rank must call ``step`` with the same steps. In ``transformers.Trainer``:
:class:`growkit.verify.hf_callback.GrowthMonitorCallback`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from growkit.growth.adapters import PART, get_adapter
from growkit.growth.roles import Role
from growkit.kernels import block_divergence
from growkit.validate import real_number, whole_number

from .context import DEFAULT_COLLAPSE_SHARE, DEFAULT_MIN_DIVERGENCE, check_model
from .distributed import RankReducer, TwinTensor, detect_group, expert_counts, load_figures, unwrap
from .pairing import twin_axes, width_records_scale
from .probe import hook_modules
from .report import jsonable
from .stats import relative, twin_layout

# a monitoring tick reduces the twin stacks in pieces of at most this many bytes of this
# rank's rows (the single-process monitor on a small model: one piece per stack)
CHUNK_BYTES = 256 * 2**20


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
        process_group: the data-parallel group to reduce over; None: found from the model
            (a ``DistributedDataParallel`` wrapper's group, the 1-D mesh of FSDP2 DTensor
            parameters; otherwise no reduction: a plain module is monitored alone, pass
            ``torch.distributed.group.WORLD`` for one replicated by hand).

    Attributes:
        model: the monitored module (the one a ``DistributedDataParallel`` wraps).
        history: the records of every tick.
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
        process_group=None,
    ) -> None:
        self.every = whole_number(every, "every", min=1)
        model, ddp_group = unwrap(model)
        check_model(model)
        self.model = model
        self._reducer = RankReducer(process_group if process_group is not None else detect_group(model, ddp_group))
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

        # Tensors are named, not held: FSDP2 swaps a module's parameters between sharded and
        # unsharded ones, so every tick looks them up (a part of a fused parameter is a slice).
        adapter = get_adapter(model, "monitoring")
        roles = adapter.param_roles(model)
        named = dict(model.named_parameters())
        groups: dict[tuple, dict] = {}
        for name, pr in roles.items():
            if not pr.rule.zero_sum_noise:
                continue
            part = PART.match(name)
            param = part.group(1) if part else name
            if param not in named:
                continue
            dims = twin_axes(pr.role, self.scale)
            if not dims:
                continue
            axes = tuple((d, self.scale) for d in dims)
            p = named[param]
            fused_dim, start, shape = (_part_of(adapter, model, param, tuple(p.shape), name) if part
                                       else (None, 0, tuple(p.shape)))
            member = TwinTensor(param, shape, self.scale if 0 in dims else 1, fused_dim, start)
            key = (shape, p.dtype, axes)
            g = groups.setdefault(key, dict(members=[], roles=set(), axes=axes, shape=shape,
                                            itemsize=p.element_size()))
            g["members"].append(member)
            g["roles"].add(pr.role.value)
        self._groups = list(groups.values())
        self._rounds = self._plan_rounds()

        # The latest router logits of every MoE layer, kept by a forward hook on the module
        # that owns the router weight (a Linear, or a Hugging Face router returning
        # (logits, weights, indices)); close() removes the hooks.
        self._top_k = adapter.top_k(model)
        self._router_logits: dict[int, torch.Tensor] = {}
        routers = sorted(hook_modules(model, Role.ROUTER).items())
        self._hooks = [module.register_forward_hook(self._keep_router_logits(layer)) for layer, module in routers]
        # experts per MoE layer, from the router weight's (global) shape [experts, model]: the
        # all-reduced counts have this size on every rank, whatever each rank has seen
        router_rows = {pr.layer: named[n].shape[0] for n, pr in roles.items()
                       if pr.role is Role.ROUTER and n in named}
        n_experts = int(adapter.cfg(model, "n_experts", 0) or 0)
        self._experts = {layer: int(router_rows.get(layer, n_experts)) for layer, _ in routers}
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
        """Measure now (whatever the step); on a data-parallel model, on every rank at once."""
        t0 = time.perf_counter()
        rec = MonitorRecord(step)
        twin_sums, twin_maxes = self._twin_partials(dict(self.model.named_parameters()))
        layers = sorted(self._experts)
        counts, tokens = self._router_partials(layers)
        sums = torch.cat([*twin_sums, *counts, torch.tensor(tokens, dtype=torch.float64)])
        maxes = torch.cat(twin_maxes) if twin_maxes else torch.zeros(0, dtype=torch.float64)
        sums, maxes = self._reducer.all_reduce(sums, maxes)

        at = at_max = 0
        for g in self._groups:
            G = self.scale ** len(g["axes"])
            diff, magnitude, count = sums[at:at + G], sums[at + G:at + 2 * G], float(sums[at + 2 * G])
            mx = float(maxes[at_max:at_max + G].max())
            at, at_max = at + 2 * G + 1, at_max + G
            means = (diff / count if count else diff).tolist()
            mags = (magnitude / count if count else magnitude).tolist()
            rel = min(relative(means[j], mags[j]) for j in range(1, G))
            key = "+".join(sorted(g["roles"])) + f" {list(g['shape'])}"
            rec.twins.append(dict(group=key, roles=sorted(g["roles"]), tensors=len(g["members"]),
                                  rel_div=rel, max_div=mx, magnitude=mags[0]))
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

        n_tokens = sums[len(sums) - len(layers):]
        by_experts: dict[int, list[int]] = defaultdict(list)
        for i, layer in enumerate(layers):
            if n_tokens[i] > 0:  # layers no rank has seen a forward pass of are not reported
                by_experts[self._experts[layer]].append(i)
        offsets = [at]
        for layer in layers:
            offsets.append(offsets[-1] + self._experts[layer])
        k = self._top_k
        for E, idx in by_experts.items():
            stack = torch.stack([sums[offsets[i]:offsets[i + 1]] for i in idx])
            for i, load in zip(idx, load_figures(stack, n_tokens[idx], k)):
                layer = layers[i]
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

    def _plan_rounds(self) -> list[list[tuple[int, list]]]:
        """The twin stacks cut into pieces of at most CHUNK_BYTES of this rank's rows, packed
        into rounds of at most CHUNK_BYTES: a round is reduced at once, its rows exchanged in
        one collective (a small model: one round, one piece per stack)."""
        world = self._reducer.world
        rounds, current, size = [], [], 0
        for i, g in enumerate(self._groups):
            per_member = max(1, g["itemsize"] * math.prod(g["shape"]) // world)
            step = max(1, CHUNK_BYTES // per_member)
            members = g["members"]
            for lo in range(0, len(members), step):
                piece = members[lo:lo + step]
                if current and size + per_member * len(piece) > CHUNK_BYTES:
                    rounds.append(current)
                    current, size = [], 0
                current.append((i, piece))
                size += per_member * len(piece)
        if current:
            rounds.append(current)
        return rounds

    def _twin_partials(self, params: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per twin stack, this rank's partial sums [sum|B_g - B_0| (G), sum|B_g| (G), elements
        per block] and maxima max|B_g - B_0| (G), float64."""
        sums, maxes = [], []
        for g in self._groups:
            G = self.scale ** len(g["axes"])
            sums.append(torch.zeros(2 * G + 1, dtype=torch.float64))
            maxes.append(torch.zeros(G, dtype=torch.float64))
        for rnd in self._rounds:
            parts = self._reducer.local_parts([piece for _, piece in rnd], params)
            for (i, _), tensors in zip(rnd, parts):
                g = self._groups[i]
                G = self.scale ** len(g["axes"])
                # twin blocks of every widened dim become one dim of G blocks (a permuted view;
                # the stacks [S, ...] have their twin dims one further on); the concatenation
                # is the one copy; one block_divergence launch per piece
                views = [twin_layout(t, [(d + 1, s) for d, s in g["axes"]])[0] for t in tensors]
                stack = torch.cat(views) if len(views) > 1 else views[0]
                inner = stack.shape[-1]
                x = stack.reshape(-1, G, inner)
                if x.numel() == 0:  # this rank has no rows of these tensors
                    continue
                bd = block_divergence(x, G, 1)
                count = x.shape[0] * inner
                sums[i][:G] += bd.mean_diff.double().cpu() * count
                sums[i][G:2 * G] += bd.magnitude.double().cpu() * count
                sums[i][2 * G] += count
                maxes[i] = torch.maximum(maxes[i], bd.max_diff.double().cpu())
        return sums, maxes

    def _router_partials(self, layers: list[int]) -> tuple[list[torch.Tensor], list[float]]:
        """Per MoE layer: the top-k counts [E] of the tokens of its latest forward pass on this
        rank (zeros when none yet), and how many tokens that was (one top-k per logits shape)."""
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for layer in layers:
            if layer in self._router_logits:
                by_shape[tuple(self._router_logits[layer].shape)].append(layer)
        counts = {layer: torch.zeros(self._experts[layer], dtype=torch.float64) for layer in layers}
        tokens = {layer: 0.0 for layer in layers}
        for (n, E), items in by_shape.items():
            c = expert_counts([self._router_logits[layer] for layer in items], self._top_k)
            for layer, row in zip(items, c.double().cpu()):
                if E != self._experts[layer]:
                    raise RuntimeError(f"GrowthMonitor: MoE layer {layer}'s router gave {E} logits per token, "
                                       f"its router weight has {self._experts[layer]} experts")
                counts[layer], tokens[layer] = row, float(n)
        return [counts[layer] for layer in layers], [tokens[layer] for layer in layers]

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


def _part_of(adapter, model: nn.Module, param: str, shape: tuple, name: str) -> tuple[int, int, tuple]:
    """(fused dim, start along it, shape) of the part ``name`` of fused parameter ``param``."""
    fused_dim = adapter.fused_dim(param)
    start = 0
    for part, view in adapter.split(model, {param: torch.empty(shape, device="meta")}).items():
        if part == name:
            return fused_dim, start, tuple(view.shape)
        start += view.shape[fused_dim]
    raise KeyError(f"{name} is not a part of {param}")  # pragma: no cover
