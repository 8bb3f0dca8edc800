"""Which old layer each new layer should reproduce, and by how much the model was widened.

Depth growth inserts layers, so new layer j is not old layer j. The pairing comes from the
grown model's ``growth_records`` (the ``layer_map`` of every depth record, composed when
there are several) when they describe this pair of models; otherwise it is inferred:
layers whose residual-writing projections (the ``writes_residual`` roles of the role
table; in a family with output norms, those norms' gains) are all zero are identity
layers, and the others must be the old layers in order.

For new layer j, ``ref_hidden`` is the index into the old model's hidden states that new
hidden state j + 1 must equal (tiled): ``old + 1`` for a kept layer; for an identity layer
what the layer before it had to produce (it passes its input through: ``old + 1`` when it
follows the layer it copies, as identity blocks do; not so for identity blocks in G_stack's
places, ``stack_scale=0``); ``None`` for a stacked copy, which changes the function by design.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from growkit.growth.adapters import get_adapter
from growkit.growth.roles import ROLE_RULES, WIDENED_DIMS, Role

from .stats import abs_stats

ORIGINAL, IDENTITY, COPY = "original", "identity", "copy"


@dataclass(frozen=True)
class LayerPair:
    """New layer ``new`` reproduces old layer ``old`` (kind ``original``), passes through
    what old layer ``old`` produced (``identity``), or is a stacked copy of it (``copy``)."""

    new: int
    old: int | None
    kind: str
    ref_hidden: int | None

    def describe(self) -> str:
        if self.kind == ORIGINAL:
            return f"old layer {self.old}"
        if self.kind == IDENTITY:
            if not self.ref_hidden:  # 0: at the input; None: after a stacked copy
                return "identity (at the input)" if self.ref_hidden == 0 else f"identity (copy of old {self.old})"
            after = f"identity after old {self.ref_hidden - 1}"
            return after if self.ref_hidden - 1 == self.old else f"{after} (copy of old {self.old})"
        return f"copy of old {self.old}"


@dataclass
class Pairing:
    pairs: list[LayerPair]
    source: str  # "growth_records", "same depth", "inferred", "unpaired"
    function_preserving: bool = True
    by_design: list[str] = field(default_factory=list)
    problem: str | None = None

    def hidden_ref(self, j: int) -> int | None:
        """Old hidden-state index that new hidden state ``j`` must equal (None: no reference)."""
        if j == 0:
            return 0
        return self.pairs[j - 1].ref_hidden


def n_layers(model: nn.Module) -> int:
    return int(get_adapter(model, "verification").n_layers(model))


def model_width(model: nn.Module) -> int:
    """d_model, read from the embedding's shape through the role table."""
    adapter = get_adapter(model, "verification")
    for name, t in model.state_dict().items():
        if adapter.role_of(name) is Role.EMBEDDING:
            return int(t.shape[-1])
    return int(adapter.cfg(model, "d_model"))  # pragma: no cover


def width_records_scale(model: nn.Module) -> int | None:
    """Product of the scales of the model's width growth records (None: no width record)."""
    scale = None
    for r in getattr(model, "growth_records", None) or []:
        if r.op == "width":
            scale = (scale or 1) * int(r.settings.get("scale_factor", 1))
    return scale


def measured_scale(old: nn.Module, new: nn.Module) -> float | int:
    """new d_model / old d_model (an int when whole)."""
    ratio = model_width(new) / model_width(old)
    return int(ratio) if float(ratio).is_integer() else ratio


def _compose(maps: list[list[tuple[int, str]]], n_old: int, n_new: int) -> list[LayerPair] | None:
    """Compose depth layer maps (applied in order) into new -> old pairs; None if inconsistent."""
    width = n_old
    for m in maps:
        if not m or any(not 0 <= src < width for src, _ in m):
            return None
        width = len(m)
    if width != n_new:
        return None
    pairs = []
    for j in range(n_new):
        src, kinds = j, []
        for m in reversed(maps):
            src, kind = m[src]
            kinds.append(kind)
        kind = COPY if COPY in kinds else IDENTITY if IDENTITY in kinds else ORIGINAL
        if kind == IDENTITY:  # passes through what the layer before it produced
            ref = 0 if j == 0 else pairs[j - 1].ref_hidden
        else:
            ref = None if kind == COPY else src + 1
        pairs.append(LayerPair(j, src, kind, ref))
    return pairs


@torch.no_grad()
def zero_writer_layers(model: nn.Module) -> list[bool]:
    """For each layer: does it add exactly 0? All its residual-writing tensors zero or, in a
    family with output norms, those norms' effective gains zero (kernel-reduced)."""
    adapter = get_adapter(model, "verification")
    roles = adapter.param_roles(model)
    state = adapter.role_state(model)
    L = n_layers(model)
    out_norms = any(pr.rule.output_norm for pr in roles.values())
    offset = 1.0 if "norm_offset" in adapter.family.quirks else 0.0
    groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    for name, pr in roles.items():
        if pr.layer is not None and (pr.rule.output_norm if out_norms else pr.rule.writes_residual):
            t = state[name] + offset if pr.rule.output_norm and offset else state[name]
            groups.setdefault((tuple(t.shape), t.dtype), []).append((pr.layer, t))
    zero = [True] * L
    seen = [False] * L
    for items in groups.values():
        stack = torch.stack([t for _, t in items])
        mx, _ = abs_stats(stack)
        for (layer, _), m in zip(items, mx.tolist()):
            seen[layer] = True
            zero[layer] = zero[layer] and m == 0.0
    return [z and s for z, s in zip(zero, seen)]


def pair_layers(old: nn.Module, new: nn.Module) -> Pairing:
    n_old, n_new = n_layers(old), n_layers(new)
    records = list(getattr(new, "growth_records", None) or [])
    by_design = [
        f"{r.op} growth {r.settings}: " + ("; ".join(r.notes) if r.notes else "not function-preserving")
        for r in records
        if not r.function_preserving
    ]
    preserving = not by_design
    maps = [list(r.layer_map) for r in records if r.op == "depth" and r.layer_map is not None]
    if maps:
        pairs = _compose(maps, n_old, n_new)
        if pairs is not None:
            return Pairing(pairs, "growth_records", preserving, by_design)
    if n_old == n_new:
        return Pairing([LayerPair(j, j, ORIGINAL, j + 1) for j in range(n_new)], "same depth", preserving, by_design)
    zero = zero_writer_layers(new)
    kept = [j for j in range(n_new) if not zero[j]]
    if len(kept) == n_old:
        pairs, last = [], None
        for j in range(n_new):
            if not zero[j]:
                last = kept.index(j)
                pairs.append(LayerPair(j, last, ORIGINAL, last + 1))
            else:
                pairs.append(LayerPair(j, last, IDENTITY, 0 if last is None else last + 1))
        return Pairing(pairs, "inferred", preserving, by_design)
    problem = (
        f"the new model has {n_new} layers and the old {n_old}; {n_new - len(kept)} new layers "
        f"have all-zero residual-writing projections (identity layers), which leaves "
        f"{len(kept)} to pair with {n_old} old layers"
    )
    pairs = [LayerPair(j, None, COPY, None) for j in range(n_new)]
    return Pairing(pairs, "unpaired", preserving, by_design, problem)


def twin_axes(role: Role, scale: int) -> list[int]:
    """The dims of a ``role`` tensor that width growth by ``scale`` tiled (empty for s=1)."""
    if scale <= 1:
        return []
    return [i for i, kind in enumerate(ROLE_RULES[role].dims) if kind in WIDENED_DIMS]
