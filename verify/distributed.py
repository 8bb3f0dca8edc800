"""GrowthMonitor on a data-parallel model: each rank reduces its part, then one all-reduce.

A model trained data-parallel, wrapped by ``DistributedDataParallel`` (every rank holds
every weight) or sharded by FSDP2's ``fully_shard`` (every parameter a ``DTensor`` sharded
on dim 0), is monitored by all its ranks together: each rank reduces a disjoint part of
every twin-tracked tensor to partial sums (of |B_g - B_0| and |B_g| per twin block g, and
the element count) and maxima (of |B_g - B_0|), and counts the top-k router assignments of
the tokens it saw; one all-reduce (SUM) of the sums and counts and one (MAX) of the maxima
give every rank the same figures: those of the single-process monitor on the full weights
and on the concatenation of the ranks' batches. Every rank must therefore call
``GrowthMonitor.step`` with the same steps (it is a collective on measuring steps).

NOTE (which rows a rank reduces, and what moves). A twin block B_g is compared element by
element with block 0, so a rank can reduce an element of B_g only where it holds the
matching element of B_0. FSDP2's ``Shard(0)`` never splits a dim other than 0, so a row
holds every twin block of the tensor's other widened dims, and the unit of work is a *twin
row set*: when dim 0 is widened s-fold (N = s * n rows: q/k/v/o, the MLP), the rows
{j, n + j, ..., (s-1) n + j} of one j in [0, n); when it is not (the LM head's vocabulary,
the experts of an expert stack), one row. Rank k reduces the units of chunk k of [0, n)
(``torch.chunk`` semantics, like ``Shard``). ``Shard(0)`` gives rank k the rows of chunk k
of [0, N) instead, which cut through the twin blocks: with s = 2 on 2 ranks, rank 1 holds
exactly block 1 and none of the block-0 rows it is compared with; with s = 3, rank 0 holds
block 0 and half of block 1. So an ``all_to_all_single`` with uneven splits hands every
rank the rows of its units that other ranks hold: it receives s * n / W rows per tensor
(one shard's worth) and sends as many, never more than its own shard, and the rows arrive
in twin-block order (see :meth:`RankReducer.exchange`). Where dim 0 is not widened the
units are the rank's own rows: nothing moves. Replicated weights (DDP, a ``Replicate``
DTensor, or an FSDP2 parameter caught unsharded mid-step) are whole on every rank: the rank
selects its units, nothing moves. The exchanges of all the stacks travel in one collective
(per round of at most ``monitor.CHUNK_BYTES`` of rows, which bounds the memory: a round
holds about twice its rows), so a tick is three collectives: the exchange and the two
all-reduces. Measured on 2 gloo ranks on the CPU (``examples/monitor_overhead.py``, a
722k-parameter model): the exchange takes 2-7 ms; ``full_tensor()`` of the same tensors
29-62 ms, with twice the rows on every rank. The alternatives: an all-gather of the
block-0 rows (N / s rows on every rank: W / s shards, growing with the world size);
``redistribute`` to a ``Shard`` of a non-widened dim (q/k/v/o and the MLP weights have
none: [heads, model], [ff, model]); ``full_tensor()`` (the whole tensor on every rank, and
W-fold duplicated work). The last remains the fallback for other layouts (2-D meshes,
``Shard`` of another dim, ``Partial``), one tensor at a time.

Precision: each rank's means (float32, one fused ``block_divergence`` launch per stack) are
turned back into sums in float64 (exact: mean * count), so the all-reduced means differ from
the single-process ones only by float32 rounding in the summation order (relative error
up to 1.7e-6 measured on the tests' models, for the ratio rel_div; the tests allow 1e-5);
the maxima and the router counts (whole numbers) are exact, and so are the router figures
computed from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

try:  # torch.distributed may be absent from a build; DTensor is public since torch 2.5
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = Replicate = Shard = None


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def unwrap(model: nn.Module) -> tuple[nn.Module, object | None]:
    """(the wrapped module, its process group) for ``DistributedDataParallel``; (model, None) else."""
    if dist.is_available():
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            return model.module, getattr(model, "process_group", None) or dist.group.WORLD
    return model, None


def detect_group(model: nn.Module, ddp_group=None):
    """The data-parallel group to reduce over: DDP's, the mesh of the model's DTensor parameters
    (a 1-D FSDP2 mesh; the world for a larger mesh), or None (one process: nothing to reduce)."""
    if ddp_group is not None:
        return ddp_group
    if DTensor is None or not distributed_ready():
        return None
    for p in model.parameters():
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            return mesh.get_group() if mesh.ndim == 1 else dist.group.WORLD
    return None


def chunk_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of chunk ``rank`` of ``range(n)`` in ``world`` chunks (``torch.chunk`` and
    ``Shard`` semantics: chunks of ceil(n / world), the last ones possibly short or empty)."""
    c = -(-n // world) if n else 0
    a = min(rank * c, n)
    return a, min(a + c, n)


def unit_rows(n_rows: int, blocks: int, world: int, rank: int) -> torch.Tensor:
    """The rows (ascending, int64) of rank ``rank``'s twin row sets of a dim of ``n_rows`` made
    of ``blocks`` twin blocks: rows b * n + j for every block b and j in chunk ``rank`` of [0, n)."""
    n = n_rows // blocks
    a, b = chunk_range(n, world, rank)
    return (torch.arange(blocks).unsqueeze(1) * n + torch.arange(a, b)).reshape(-1)


@dataclass(frozen=True)
class TwinTensor:
    """One twin-tracked tensor: a parameter, or one part of a fused parameter.

    Attributes:
        param: its parameter's name in ``named_parameters()``.
        shape: the tensor's (global) shape.
        blocks0: twin blocks along dim 0 (1: dim 0 is not widened).
        fused_dim: the dim along which it is a slice of the parameter (None: all of it).
        start: where the slice starts along ``fused_dim``.
    """

    param: str
    shape: tuple
    blocks0: int
    fused_dim: int | None = None
    start: int = 0

    def part(self, t: torch.Tensor) -> torch.Tensor:
        """This tensor's slice of ``t``, a (local) tensor holding all of the fused dim."""
        if self.fused_dim is None:
            return t
        return t.narrow(self.fused_dim, self.start, self.shape[self.fused_dim])


@dataclass(frozen=True)
class _Plan:
    send: torch.Tensor       # local rows to send, grouped by destination rank
    in_splits: list[int]     # rows sent to each rank
    out_splits: list[int]    # rows received from each rank
    local_only: bool         # every rank holds all its units' rows: no exchange at all


class RankReducer:
    """This rank's share of the monitor's work, and the collectives that combine the shares.

    Args:
        group: the process group to reduce over (None: a single process, no communication).
    """

    def __init__(self, group=None) -> None:
        self.group = group
        if group is not None:
            self.world = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
            self.group_ranks = dist.get_process_group_ranks(group)
            # where the reduced vectors live: the CPU for gloo (also "cpu:gloo,cuda:nccl"), the
            # current GPU for a GPU-only backend (NCCL reduces CUDA tensors only)
            gpu_only = "gloo" not in str(dist.get_backend(group)) and torch.cuda.is_available()
            self.device = torch.device("cuda", torch.cuda.current_device()) if gpu_only else torch.device("cpu")
        else:
            self.world, self.rank, self.group_ranks, self.device = 1, 0, [0], torch.device("cpu")
        self._plans: dict[tuple, _Plan] = {}
        self._units: dict[tuple, torch.Tensor] = {}
        self._meshes: dict[int, bool] = {}

    # ------------------------------------------------------------------ twin rows
    def _on_group(self, t) -> bool:
        mesh = t.device_mesh
        key = id(mesh)
        if key not in self._meshes:
            self._meshes[key] = (mesh.ndim == 1 and self.group is not None
                                 and dist.get_process_group_ranks(mesh.get_group()) == self.group_ranks)
        return self._meshes[key]

    def local_parts(self, pieces: list[list[TwinTensor]], params: dict[str, torch.Tensor]) -> list[list[torch.Tensor]]:
        """This rank's units of every member of every piece, as tensors [S, rows, ...].

        Each is laid out like its members with dim 0 cut to this rank's units: twin block b of
        dim 0 is rows [b * u, (b + 1) * u) of it (u units), so ``twin_layout`` applies as on
        the full tensor. The rows of all the pieces' sharded members that other ranks hold
        arrive in one ``all_to_all_single`` per dtype (see :meth:`exchange`); what each rank
        calls is decided by the members' order and shapes, the same on every rank.

        Args:
            pieces: lists of members (a piece: some tensors of one twin stack).
            params: the model's ``named_parameters()``, looked up now.

        Returns:
            Per piece, the list of its tensors [S, rows, ...] (S members each).
        """
        out: list[list[torch.Tensor]] = [[] for _ in pieces]
        requests: dict[torch.dtype, list] = {}
        for i, members in enumerate(pieces):
            batches: dict[tuple, list] = {}
            for m in members:
                t = params[m.param].detach()
                if DTensor is not None and isinstance(t, DTensor):
                    placements = t.placements
                    if all(isinstance(pl, Replicate) for pl in placements):
                        t = t.to_local()
                    elif (len(placements) == 1 and type(placements[0]) is Shard and placements[0].dim == 0
                          and self._on_group(t)):
                        key = (tuple(t.shape), t.dtype, m.shape, m.blocks0, m.fused_dim, m.start)
                        batches.setdefault(key, []).append((m, t))
                        continue
                    else:  # another layout: the whole tensor on every rank (see the NOTE)
                        t = t.full_tensor()
                out[i].append(self.replicated_rows(m, t).unsqueeze(0))
            for items in batches.values():
                x, plan = self.rows_to_send(items)
                if plan.local_only:
                    out[i].append(x.movedim(1, 0))
                else:
                    requests.setdefault(x.dtype, []).append((i, x, plan))
        for reqs in requests.values():
            for (i, _, _), rows in zip(reqs, self.exchange([(x, plan) for _, x, plan in reqs])):
                out[i].append(rows.movedim(1, 0))
        return out

    def replicated_rows(self, m: TwinTensor, t: torch.Tensor) -> torch.Tensor:
        """This rank's units of ``m`` from a whole parameter ``t`` (a view where they are contiguous)."""
        part = m.part(t)
        if self.world == 1:
            return part
        if m.blocks0 == 1:
            a, b = chunk_range(m.shape[0], self.world, self.rank)
            return part.narrow(0, a, b - a)
        key = (m.shape[0], m.blocks0)
        if key not in self._units:
            self._units[key] = unit_rows(m.shape[0], m.blocks0, self.world, self.rank).to(part.device)
        return part.index_select(0, self._units[key])

    def _plan(self, n_param: int, m: TwinTensor, device) -> _Plan:
        key = (n_param, m.shape[0], m.blocks0, m.fused_dim, m.start)
        plan = self._plans.get(key)
        if plan is None:
            W, r = self.world, self.rank
            off = m.start if m.fused_dim == 0 else 0
            need = [off + unit_rows(m.shape[0], m.blocks0, W, k) for k in range(W)]
            held = [chunk_range(n_param, W, k) for k in range(W)]
            a, b = held[r]
            send, in_splits = [], []
            for k in range(W):
                sel = need[k][(need[k] >= a) & (need[k] < b)] - a
                send.append(sel)
                in_splits.append(len(sel))
            out_splits = [int(((need[r] >= lo) & (need[r] < hi)).sum()) for lo, hi in held]
            local_only = all(bool(((need[k] >= held[k][0]) & (need[k] < held[k][1])).all()) for k in range(W))
            plan = _Plan(torch.cat(send).to(device), in_splits, out_splits, local_only)
            self._plans[key] = plan
        return plan

    def rows_to_send(self, items: list[tuple[TwinTensor, "DTensor"]]) -> tuple[torch.Tensor, _Plan]:
        """Shard(0) DTensors of one shape: the rows this rank sends, [rows, S, ...] (those for
        rank 0, then for rank 1, ...), and the plan; with ``plan.local_only``, its own units."""
        m0, t0 = items[0]
        n_param = t0.shape[0]
        lo, hi = chunk_range(n_param, self.world, self.rank)
        locals_ = []
        for m, t in items:
            local = t.to_local()
            if local.shape[0] != hi - lo:
                raise RuntimeError(
                    f"GrowthMonitor: {m.param} is a Shard(0) DTensor whose local shard has "
                    f"{local.shape[0]} rows on rank {self.rank}; torch.chunk semantics give rows "
                    f"[{lo}, {hi}) of {n_param}: an uneven sharding growkit does not know")
            locals_.append(m.part(local) if m.fused_dim not in (None, 0) else local)
        plan = self._plan(n_param, m0, locals_[0].device)
        # parameter rows: a part fused along dim 0 is addressed by the parameter's rows (its
        # offset is in the plan)
        return torch.stack([loc.index_select(0, plan.send) for loc in locals_], dim=1), plan

    def exchange(self, requests: list[tuple[torch.Tensor, _Plan]]) -> list[torch.Tensor]:
        """Every request's unit rows on this rank, [rows, S, ...]: one all_to_all for them all.

        Rank m sends rank k the rows of k's units it holds, in ascending order; k receives them
        by source rank. The ranks' row ranges are ascending and disjoint, and k's unit rows
        ascending, so what k receives of a request is its unit rows in ascending order: twin
        block 0's units, then block 1's, ..., with no reordering. The requests (one dtype)
        travel flattened: for each rank, request 0's rows then request 1's, ...
        """
        W = self.world
        sizes = [_numel(x.shape[1:]) for x, _ in requests]  # elements per row
        starts = [[sum(plan.in_splits[:k]) for k in range(W)] for _, plan in requests]
        segments, in_splits, out_splits = [], [0] * W, [0] * W
        for k in range(W):
            for j, (x, plan) in enumerate(requests):
                seg = x[starts[j][k]:starts[j][k] + plan.in_splits[k]].reshape(-1)
                segments.append(seg)
                in_splits[k] += seg.numel()
                out_splits[k] += plan.out_splits[k] * sizes[j]
        send = torch.cat(segments)
        recv = send.new_empty(sum(out_splits))
        dist.all_to_all_single(recv, send, out_splits, in_splits, group=self.group)
        got: list[list[torch.Tensor]] = [[] for _ in requests]
        at = 0
        for k in range(W):
            for j, (x, plan) in enumerate(requests):
                n = plan.out_splits[k]
                got[j].append(recv[at:at + n * sizes[j]].view((n,) + tuple(x.shape[1:])))
                at += n * sizes[j]
        return [torch.cat(g) for g in got]

    # ------------------------------------------------------------------ reductions
    def all_reduce(self, sums: torch.Tensor, maxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum ``sums`` and max ``maxes`` over the group (float64 vectors; unchanged alone)."""
        if self.group is None:
            return sums, maxes
        sums, maxes = sums.to(self.device), maxes.to(self.device)
        if sums.numel():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group)
        if maxes.numel():
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=self.group)
        return sums.cpu(), maxes.cpu()


# ---------------------------------------------------------------------------- router load
def expert_counts(logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Per layer, how many of the tokens' top-k slots each expert got: float32 [L, E] (one
    top-k and one scatter for all L layers; ``logits``: L tensors [N, E] of one shape)."""
    x = torch.stack([t.float() for t in logits])  # [L, N, E]
    L, N, E = x.shape
    k = min(top_k, E)
    idx = x.topk(k, dim=-1).indices.reshape(L, N * k)
    counts = torch.zeros(L, E, dtype=torch.float32, device=x.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
    return counts


def load_figures(counts: torch.Tensor, n_tokens: torch.Tensor, top_k: int) -> list[dict]:
    """``router.expert_load``'s figures from (all-reduced) counts [L, E] and tokens [L].

    Returns:
        L dicts: ``entropy``, ``busiest_share``, ``busiest_expert``, ``topk_share`` (see
        :func:`growkit.verify.router.expert_load`).
    """
    import math

    counts = counts.float()
    L, E = counts.shape
    k = min(top_k, E)
    n = n_tokens.float().reshape(L, 1)
    p = counts / (n * k).clamp_min(1)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1) / math.log(E) if E > 1 else torch.ones(L)
    share = counts / n.clamp_min(1)
    busiest = share.max(dim=1)
    topk_share = p.topk(k, dim=1).values.sum(dim=1)
    return [dict(entropy=float(ent[i]), busiest_share=float(busiest.values[i]),
                 busiest_expert=int(busiest.indices[i]), topk_share=float(topk_share[i]))
            for i in range(L)]
