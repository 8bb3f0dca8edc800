"""Train what growth added, or what it kept: masks, freezing and optimizer groups.

Every growth operator leaves ``model.growth_records`` (``records.py``): where each tensor
came from. From them this module tells, entry by entry, what is *new* and what is *old*:

* **depth growth** (identity blocks or G_stack copies): every parameter of an added
  layer is new (LLaMA-Pro trains exactly these; "train the last N layers" misses them,
  since the new blocks are interleaved); kept layers are old.
* **width growth** (HyperCloning): a tiled tensor is s x s blocks (s along every widened
  dim, ``RoleRule.repeats``); the *first* block sits where the source tensor's entries
  sat and is old, the clones are new::

        q_proj [2*H*hd, 2*d] after s = 2       norm [2*d]
        +-------+-------+                      +-----+-----+
        |  old  |  new  |                      | old | new |
        +-------+-------+                      +-----+-----+
        |  new  |  new  |
        +-------+-------+

  A tensor with no widened dim (a per-head q/k norm) stays old; an embedding [V, s*d] is
  old in its first d columns.
* **MoE upcycling**: the router (and a Qwen2-MoE shared expert and its gate) is new.
  Experts, by default (``experts="first_old"``): expert 0 is old, experts 1..E-1 new, the
  same positional rule as width growth (the dense MLP's entries sit in expert 0; any
  expert could have been picked, all start equal). So the old entries are always exactly
  as many as the source model had, and training only new entries keeps a bit-identical
  copy of the dense MLP inside the MoE. ``experts="all_new"`` counts every expert as new
  (the whole MoE FFN trains with ``which="new"``; only attention, norms and embeddings
  count as old), and so does Drop-Upcycling (``expert_reinit`` > 0 in the record): its
  expert 0 holds re-drawn random units, no copy of the dense MLP to keep.
* **chains** (width then depth from ``scale_bilaterally``, a checkpoint grown in one
  ``growkit grow`` pass, or records passed explicitly): composed in order; new in an
  earlier step stays new (an identity layer of a widened model is wholly new; an old
  layer's clone blocks stay new after depth growth copies the layer).

Separate calls compose too: an operator attaches the records of its own call
(``model.growth_records``, what the checks compare) and the whole chain since the last
model growkit did not grow (``model.growth_history``, ``records.attach_records``), and the
masks read the history: after ``grow_depth(grow_width(m, 2), 2)`` the width clones and
the new layers are new. To mask against an intermediate model instead (new since the
MoE step, say), pass ``records=model.growth_records`` or the records of the calls since.
A model loaded from disk carries the records ``save_grown`` / ``growkit grow`` wrote.

Identity blocks: what is zero and what learns first
----------------------------------------------------
An identity block (``grow_depth(mode="identity")``) is a copy of the layer before it with
the projections that write to the residual stream zeroed: ``o_proj`` and ``down_proj``
(and their biases, ``writes_residual`` in ``roles.py``), so the block adds exactly 0::

    h -> h + o_proj(attn(norm1(h))) + down_proj(mlp(norm2(.)))  =  h + 0 + 0

At the first backward the zeroed projections get nonzero gradients (their inputs are
not zero and the loss depends on their outputs), while q/k/v, gate/up, their biases and
the block's norms get *exactly zero* gradient: everything they produce is multiplied by
a zero matrix. They receive gradients from the second step on, once an optimizer step
has moved o_proj / down_proj off zero. In OLMo2 and Gemma2/3, whose sublayer outputs pass
through a norm before the residual add, the zeroed tensors are those norms' gains instead
(``depth.py``): there the gains get the step-1 gradient, and everything before them from
step 2. (``transfer_adam_state`` starts them with zero
moments for the same reason.) With ``which="new"`` nothing else moves: the old layers,
embeddings and final norm stay bit-identical.

The AdamW trap
--------------
Zeroing a gradient does not freeze an entry. AdamW's decoupled weight decay,
``p <- p - lr * wd * p``, moves every entry of a tensor it steps, whatever its gradient;
and Adam moments carried from earlier steps (or filled by ``transfer_adam_state``) keep
``m / (sqrt(v) + eps)`` nonzero after the gradient went to zero. So for a tensor that is
only partly trainable (width growth: every tensor), gradient hooks alone let the frozen
entries drift. :func:`freeze_for_growth` therefore also *restores* the frozen entries of
partly-trainable tensors after every optimizer step (a ``torch.optim`` step post-hook
acting only on the parameters it froze): they stay bit-identical under any torch
optimizer, weight decay or not. Wholly frozen tensors get ``requires_grad=False`` (no
gradient, so optimizers skip them).

Two learning rates in one tensor
--------------------------------
A param group has one learning rate, so :func:`growth_param_groups` puts a partly-new
tensor in a ``"partial"`` group at ``max(lr_new, lr_old)`` and, around every step of an
optimizer holding that group, rescales the step of the entries whose rate is lower
(``p = before + (after - before) * lr_x / lr_max``; at rate 0 the entries are restored
bit for bit). Adam(W) and SGD steps are linear in the learning rate (decoupled decay too)
and their moments do not depend on it, so each entry gets exactly the step it would get
at its own rate; LR schedulers that scale every group by one factor keep the ratio.
Not for optimizers whose state depends on the learning rate.

Limits: the hooks act on the parameters as the model holds them (single process or DDP);
FSDP / DeepSpeed flatten parameters, so use masks there through their own APIs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from growkit.validate import choice, real_number

from .adapters import get_adapter
from .records import GrowthRecord, Source
from .roles import ROLE_RULES

WHICH = ("new", "old", "all")
EXPERT_CHOICES = ("first_old", "all_new")

# Role space: a tensor's old entries are the leading 1/den[d] of every dim d (den () = the
# whole tensor is old); None: every entry is new.
Den = tuple[int, ...] | None
Box = tuple[slice, ...]

_RECORDS_HINT = (
    "The growth operators (grow_width, grow_depth, upcycle_to_moe, scale_bilaterally) attach "
    "them to the model they return; growkit.growth.load_grown(directory) reads them back from a "
    "checkpoint written by save_grown; for a model loaded otherwise (e.g. AutoModelForCausalLM."
    "from_pretrained) pass records=growkit.growth.load_growth_records(directory), or records="
    "directory; after separate growth calls pass every call's records, oldest first"
)
_NO_RECORDS = "the model has no growth_records, so which entries growth added is unknown. " + _RECORDS_HINT


# ---------------------------------------------------------------------------- regions
@dataclass(frozen=True)
class _Region:
    """The old entries of one parameter: disjoint boxes (empty list: all new)."""

    shape: tuple[int, ...]
    boxes: tuple[Box, ...]

    @property
    def n_old(self) -> int:
        return sum(_numel(b) for b in self.boxes)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def all_old(self) -> bool:
        return self.n_old == self.numel

    @property
    def all_new(self) -> bool:
        return self.n_old == 0

    def old_mask(self, device=None) -> torch.Tensor:
        mask = torch.zeros(self.shape, dtype=torch.bool, device=device)
        for b in self.boxes:
            mask[b] = True
        return mask


def _numel(box: Box) -> int:
    n = 1
    for s in box:
        n *= s.stop - s.start
    return n


def _pad(den: tuple[int, ...], ndim: int, what: str) -> tuple[int, ...]:
    if den == ():
        return (1,) * ndim
    if len(den) != ndim:
        raise ValueError(f"growth records do not describe this model: {what} has {ndim} dims, its "
                         f"source {len(den)}")
    return den


def resolve_records(model: nn.Module | None, records=None) -> list[GrowthRecord]:
    """The growth records to use: ``records`` (a list of :class:`GrowthRecord` or their
    dicts, one record, or a checkpoint directory with ``growth.json``), else
    ``model.growth_history`` (every growth since an un-grown model), else
    ``model.growth_records``; ValueError when there are none."""
    if records is None:
        records = getattr(model, "growth_history", None) or getattr(model, "growth_records", None)
        if not records:
            raise ValueError(_NO_RECORDS)
    if isinstance(records, (str, os.PathLike)):
        from .saving import load_growth_records

        records = load_growth_records(records)
    if isinstance(records, (GrowthRecord, dict)):
        records = [records]
    if isinstance(records, (bytes, torch.Tensor)) or not hasattr(records, "__iter__"):
        raise TypeError(f"records must be a list of GrowthRecord, a GrowthRecord or a checkpoint "
                        f"directory, got {type(records).__name__}")
    out = []
    for r in records:
        if isinstance(r, dict):
            r = GrowthRecord.from_dict(r)
        if not isinstance(r, GrowthRecord):
            raise TypeError(f"records must hold GrowthRecord objects, got {type(r).__name__}")
        out.append(r)
    if not out:
        raise ValueError("records is empty: " + _NO_RECORDS)
    return out


def _layer_index(rx: re.Pattern, name: str | None) -> int | None:
    m = rx.match(name) if name is not None else None
    return int(m.group(1)) if m else None


def _step(k: int, rec: GrowthRecord, new_name: str, src: Source, inp: Den, layer_rx: re.Pattern,
          experts: str) -> Den:
    """The old region of one output tensor of record ``k`` from its source's region."""
    where = f"growth record {k} ({rec.op}), {new_name!r}"
    ndim = len(ROLE_RULES[src.role].dims)
    if src.kind == "fresh":
        return None
    if rec.op == "width":
        if src.kind != "widen":
            raise ValueError(f"{where}: a width record with a {src.kind!r} source")
        if inp is None:
            return None
        reps = ROLE_RULES[src.role].repeats(src.scale)
        return tuple(d * r for d, r in zip(_pad(inp, ndim, new_name), reps))
    if rec.op == "depth":
        layer = _layer_index(layer_rx, new_name)
        if layer is None:  # embeddings, final norm, LM head
            if src.kind != "copy":
                raise ValueError(f"{where}: a tensor outside the layers with a {src.kind!r} source")
            return inp
        layer_map = rec.layer_map
        if layer_map is None or layer >= len(layer_map):
            raise ValueError(f"{where}: layer {layer} is not in the record's layer_map "
                             f"({0 if layer_map is None else len(layer_map)} layers)")
        src_layer, kind = layer_map[layer]
        if _layer_index(layer_rx, src.name) != src_layer:
            raise ValueError(f"{where}: the layer_map says new layer {layer} comes from layer {src_layer}, "
                             f"but its source is {src.name!r}")
        expected = {"original": ("copy",), "copy": ("copy", "scaled_copy"),
                    "identity": ("zero", "identity_copy")}.get(kind)
        if expected is None or src.kind not in expected:
            raise ValueError(f"{where}: a {src.kind!r} tensor in a layer the layer_map calls {kind!r}")
        return inp if kind == "original" else None
    if rec.op == "moe":
        if src.kind == "copy" and new_name == src.name:
            return inp
        if src.kind in ("copy", "zero"):  # a shared expert: a new module
            return None
        if src.kind == "experts":
            if experts == "all_new" or inp is None or rec.settings.get("expert_reinit", 0):
                return None  # Drop-Upcycling re-drew units of expert 0 too
            return (int(src.n_experts),) + _pad(inp, ndim - 1, new_name)
        raise ValueError(f"{where}: an MoE record with a {src.kind!r} source")
    raise ValueError(f"{where}: unknown growth op {rec.op!r}")


def _compose(records: list[GrowthRecord], layer_rx: re.Pattern, experts: str) -> dict[str, Den]:
    prev: dict[str, Den] | None = None
    for k, rec in enumerate(records):
        out: dict[str, Den] = {}
        for new_name, src in rec.sources.items():
            if src.name is None or src.kind == "fresh":
                inp = None
            elif prev is None:
                inp = ()  # the first record reads the original model: all old
            elif src.name in prev:
                inp = prev[src.name]
            else:
                raise ValueError(
                    f"growth record {k} ({rec.op}) reads {src.name!r}, which record {k - 1} "
                    f"({records[k - 1].op}) did not make: the records are not one chain of this "
                    "model's growth (pass all of them, oldest first)")
            out[new_name] = _step(k, rec, new_name, src, inp, layer_rx, experts)
        prev = out
    return prev or {}


def _regions(model: nn.Module, records=None, experts: str = "first_old") -> dict[str, _Region]:
    """Per parameter name (``model.named_parameters()``): where its old entries are."""
    choice(experts, "experts", EXPERT_CHOICES)
    records = resolve_records(model, records)
    adapter = get_adapter(model, "growth masks")
    layers = getattr(getattr(adapter, "family", None), "layers", None)
    if layers is None:  # pragma: no cover - a hand-written adapter
        raise ValueError(f"{adapter!r} names no decoder-layer path (family.layers): masks need it")
    layer_rx = re.compile("^" + re.escape(layers) + r"\.(\d+)\.")
    dens = _compose(records, layer_rx, experts)
    held = set(adapter.roles_for_names(model.state_dict()))
    extra = sorted(set(dens) - held)
    if extra:
        raise ValueError(f"growth records do not describe this model: they make {extra[:3]}, which it "
                         "does not have (records of another model?)")
    regions = {}
    for name, p in model.named_parameters():
        parts = adapter.split(model, {name: p.detach()})
        fused_dim = adapter.fused_dim(name) if len(parts) > 1 or next(iter(parts)) != name else None
        boxes, offset = [], 0
        for part_name, part in parts.items():
            if part_name not in dens:
                raise ValueError(
                    f"growth records do not describe this model: no record made {part_name!r}. Records "
                    "of another model, or of only the last of several growth calls? " + _RECORDS_HINT)
            den = dens[part_name]
            shape = tuple(part.shape)
            if den is not None:
                den = _pad(den, len(shape), part_name)
                if any(n % d for n, d in zip(shape, den)):
                    raise ValueError(f"growth records do not describe this model: {part_name!r} has shape "
                                     f"{shape}, which the recorded growth ({den} blocks) does not divide")
                box = [slice(0, n // d) for n, d in zip(shape, den)]
                if fused_dim is not None:
                    box[fused_dim] = slice(offset, offset + box[fused_dim].stop)
                boxes.append(tuple(box))
            if fused_dim is not None:
                offset += shape[fused_dim]
        regions[name] = _Region(tuple(p.shape), tuple(b for b in boxes if _numel(b) > 0))
    return regions


def _check_which(which: str) -> str:
    choice(which, "which", WHICH)
    return which


# ---------------------------------------------------------------------------- 1. masks
def trainable_mask(model: nn.Module, which: str = "new", *, records=None,
                   experts: str = "first_old") -> dict[str, bool | torch.Tensor]:
    """Which entries of every parameter to train.

    Args:
        model: a grown model (it carries ``growth_records``), or any model with ``records``.
        which: ``"new"``: what growth added (added layers, router, clone blocks, experts
            1..E-1); ``"old"``: the rest (the entries that sit where the source model's
            sat); ``"all"``: everything.
        records: the growth records, oldest first, when the model does not carry them: a
            list of :class:`GrowthRecord`, or a checkpoint directory (``growth.json``), e.g.
            for a model loaded with ``from_pretrained``.
        experts: ``"first_old"`` (expert 0 of an upcycled MoE is old, the others new) or
            ``"all_new"``.

    Returns:
        ``model.named_parameters()`` name -> ``True`` / ``False`` for a whole tensor, or a
        bool tensor shaped like the parameter (on its device) where only part of it is.

    Raises:
        ValueError: no records, or records that do not describe this model.
    """
    _check_which(which)
    regions = _regions(model, records, experts)
    params = dict(model.named_parameters())
    out: dict[str, bool | torch.Tensor] = {}
    for name, region in regions.items():
        if which == "all":
            out[name] = True
        elif region.all_old or region.all_new:
            out[name] = region.all_old == (which == "old")
        else:
            old = region.old_mask(params[name].device)
            out[name] = old if which == "old" else ~old
    return out


# ---------------------------------------------------------------------------- hooks
_HOOKS: list = []
_FROZEN: dict[str, int] = {"count": 0}  # parameters marked by live freeze handles
FREEZE_ATTR = "_growkit_freeze"
REGION_ATTR = "_growkit_lr_region"
BEFORE_ATTR = "_growkit_before"


def _ensure_optimizer_hooks() -> None:
    if not _HOOKS:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        _HOOKS.append(register_optimizer_step_pre_hook(_before_step))
        _HOOKS.append(register_optimizer_step_post_hook(_after_step))


def _partial_groups(optimizer):
    for group in optimizer.param_groups:
        if group.get("growth") == "partial":
            s_new, s_old = group.get("growth_lr_scale_new", 1.0), group.get("growth_lr_scale_old", 1.0)
            if s_new != 1.0 or s_old != 1.0:
                yield group, float(s_new), float(s_old)


@torch.no_grad()
def _before_step(optimizer, args, kwargs) -> None:
    for group, s_new, s_old in _partial_groups(optimizer):
        for p in group["params"]:
            if p.grad is None:
                continue
            region = getattr(p, REGION_ATTR, None)
            if region is None:
                raise RuntimeError("a 'partial' growth param group holds a parameter that "
                                   "growth_param_groups did not mark: rebuild the groups")
            before = p.detach().clone() if s_new != 1.0 else [p[b].clone() for b in region.boxes]
            setattr(p, BEFORE_ATTR, before)


def _blend(after: torch.Tensor, before: torch.Tensor, scale: float) -> torch.Tensor:
    """``before + (after - before) * scale``: the step taken at ``scale`` times the rate."""
    if scale == 1.0:
        return after
    if scale == 0.0:
        return before
    return (before.float() + (after.float() - before.float()) * scale).to(after.dtype)


@torch.no_grad()
def _after_step(optimizer, args, kwargs) -> None:
    for group, s_new, s_old in _partial_groups(optimizer):
        for p in group["params"]:
            before = getattr(p, BEFORE_ATTR, None)
            if before is None:
                continue
            delattr(p, BEFORE_ATTR)
            boxes = getattr(p, REGION_ATTR).boxes
            if s_new != 1.0:  # old entries at the group's rate, new ones slower
                kept = [p[b].clone() for b in boxes]
                p.copy_(_blend(p, before, s_new))
                for b, v in zip(boxes, kept):
                    p[b] = _blend(v, before[b], s_old)
            else:
                for b, v in zip(boxes, before):
                    p[b] = _blend(p[b], v, s_old)
    if _FROZEN["count"]:
        for group in optimizer.param_groups:
            for p in group["params"]:
                spec = getattr(p, FREEZE_ATTR, None)
                if spec is not None and spec.restore:
                    spec.put_back(p)


@dataclass
class _Frozen:
    """The frozen entries of one partly-trainable parameter and how to put them back."""

    train_old: bool  # True: the old boxes train, the rest is frozen
    boxes: tuple[Box, ...]
    saved: object  # the frozen values: per box (train_old False) or the whole tensor
    restore: bool

    def mask_grad(self, g: torch.Tensor) -> torch.Tensor:
        if self.train_old:
            out = torch.zeros_like(g)
            for b in self.boxes:
                out[b] = g[b]
            return out
        g = g.clone()
        for b in self.boxes:
            g[b] = 0
        return g

    def put_back(self, p: torch.Tensor) -> None:
        if self.train_old:
            kept = [p[b].clone() for b in self.boxes]
            p.copy_(self.saved)
            for b, v in zip(self.boxes, kept):
                p[b] = v
        else:
            for b, v in zip(self.boxes, self.saved):
                p[b] = v


def describe_freeze(handle) -> str:
    """One line for a freeze handle (``which``, ``n_trainable``, ``n_total``, ``frozen``,
    ``partial``): :class:`GrowthFreeze`, or the trainer's sharded one under torchrun."""
    return (f"which={handle.which!r}: {handle.n_trainable:,} of {handle.n_total:,} entries trainable; "
            f"{len(handle.frozen)} tensors frozen, {len(handle.partial)} partly trainable")


class GrowthFreeze:
    """What :func:`freeze_for_growth` did; :meth:`remove` undoes it (also on ``with`` exit).

    Attributes:
        which: the argument it was called with.
        frozen: names of the parameters set to ``requires_grad=False``.
        partial: names of the partly trainable parameters (gradient hooks, restore).
        n_trainable, n_total: trainable entries and all entries.
    """

    def __init__(self, which: str) -> None:
        self.which = which
        self.frozen: list[str] = []
        self.partial: list[str] = []
        self.n_trainable = 0
        self.n_total = 0
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._hooks: list = []
        self._marked: list[nn.Parameter] = []
        self.active = True

    def remove(self) -> None:
        """Remove the gradient hooks, stop restoring, restore every ``requires_grad``."""
        if not self.active:
            return
        for h in self._hooks:
            h.remove()
        for p in self._marked:
            if hasattr(p, FREEZE_ATTR):
                delattr(p, FREEZE_ATTR)
                _FROZEN["count"] -= 1
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        self._hooks, self._marked, self._requires_grad = [], [], []
        self.active = False

    def __enter__(self) -> "GrowthFreeze":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def summary(self) -> str:
        return describe_freeze(self)

    def __repr__(self) -> str:
        return f"GrowthFreeze({self.summary()}{'' if self.active else ', removed'})"


# ---------------------------------------------------------------------------- 2. freezing
@torch.no_grad()
def freeze_for_growth(model: nn.Module, which: str = "new", *, records=None, experts: str = "first_old",
                      restore: bool = True) -> GrowthFreeze:
    """Train only the ``which`` entries (see :func:`trainable_mask`) of a grown model.

    A parameter with no trainable entry gets ``requires_grad=False``; a partly trainable
    one gets a gradient hook that zeroes its frozen entries and, with ``restore``, has
    them put back after every optimizer step (the AdamW trap: see the module docstring).
    Freeze after loading the weights you want to keep: the restored values are those at
    this call.

    Args:
        model, which, records, experts: as for :func:`trainable_mask`.
        restore: put the frozen entries of partly-trainable tensors back after each
            ``torch.optim`` step (default). False: gradient hooks only (their entries then
            drift under weight decay or momentum).

    Returns:
        A :class:`GrowthFreeze`; ``handle.remove()`` undoes everything.
    """
    _check_which(which)
    regions = _regions(model, records, experts)
    params = dict(model.named_parameters())
    if which == "all":
        handle = GrowthFreeze(which)
        handle.n_total = handle.n_trainable = sum(p.numel() for p in params.values())
        return handle
    twice = [n for n, p in params.items() if hasattr(p, FREEZE_ATTR)]
    if twice:
        raise ValueError(f"{twice[0]!r} is already frozen by freeze_for_growth: call that handle's "
                         "remove() first")
    handle = GrowthFreeze(which)
    train_old = which == "old"
    if restore:
        _ensure_optimizer_hooks()
    for name, region in regions.items():
        p = params[name]
        handle.n_total += p.numel()
        n_train = region.n_old if train_old else region.numel - region.n_old
        handle.n_trainable += n_train if p.requires_grad else 0
        if n_train == region.numel:
            continue
        if n_train == 0:
            handle._requires_grad.append((p, p.requires_grad))
            p.requires_grad_(False)
            handle.frozen.append(name)
            continue
        saved = p.detach().clone() if train_old else [p[b].clone() for b in region.boxes]
        spec = _Frozen(train_old, region.boxes, saved if restore else None, restore)
        setattr(p, FREEZE_ATTR, spec)
        _FROZEN["count"] += 1
        handle._marked.append(p)
        handle._hooks.append(p.register_hook(spec.mask_grad))
        handle.partial.append(name)
    return handle


# ---------------------------------------------------------------------------- 3. groups
def growth_param_groups(model: nn.Module, lr_new: float, lr_old: float, weight_decay: float = 0.0, *,
                        no_decay_1d: bool = True, records=None, experts: str = "first_old") -> list[dict]:
    """Optimizer param groups: new entries at ``lr_new``, old ones at ``lr_old``.

    ``torch.optim.AdamW(growth_param_groups(model, 1e-4, 1e-5, 0.1))``, also as a
    ``transformers.Trainer``'s ``optimizers=(opt, None)``. Groups (empty ones left out):
    ``"new"`` (wholly new tensors: added layers, routers) at ``lr_new``, ``"old"`` at
    ``lr_old``, and ``"partial"`` (tensors with both: every tensor after width growth) at
    ``max(lr_new, lr_old)``, whose lower-rate entries have their step scaled down around
    each optimizer step (exact for Adam, AdamW and SGD; an entry at rate 0 is restored
    bit for bit; see the module docstring). Each group is split by decay: 1-D tensors
    (norm gains, biases) get weight decay 0 when ``no_decay_1d``. Parameters with
    ``requires_grad=False`` are left out (combine with :func:`freeze_for_growth`).

    Groups carry ``growth`` (new / old / partial), ``growth_names`` and, for partial
    groups, ``growth_lr_scale_new`` / ``growth_lr_scale_old``. For ``lr_old=0``,
    :func:`freeze_for_growth` (``which="new"``) saves the old tensors' gradients and
    optimizer state as well.

    Args:
        model: a grown model (or any model with ``records``).
        lr_new, lr_old: learning rates (>= 0).
        weight_decay: decoupled weight decay of every group that decays.
        no_decay_1d: no decay for 1-D tensors (the usual LLaMA / GPT convention).
        records, experts: as for :func:`trainable_mask`.
    """
    lr_new, lr_old = real_number(lr_new, "lr_new", min=0), real_number(lr_old, "lr_old", min=0)
    weight_decay = real_number(weight_decay, "weight_decay", min=0)
    regions = _regions(model, records, experts)
    params = dict(model.named_parameters())
    top = max(lr_new, lr_old)
    scale_new = lr_new / top if top > 0 else 1.0
    scale_old = lr_old / top if top > 0 else 1.0
    groups: dict[tuple[str, bool], dict] = {}
    for name, region in regions.items():
        p = params[name]
        if not p.requires_grad:
            continue
        kind = "old" if region.all_old else "new" if region.all_new else "partial"
        decay = not (no_decay_1d and p.dim() < 2)
        group = groups.get((kind, decay))
        if group is None:
            group = groups[(kind, decay)] = dict(
                params=[], growth_names=[], growth=kind,
                lr=float({"new": lr_new, "old": lr_old, "partial": top}[kind]),
                weight_decay=float(weight_decay) if decay else 0.0)
            if kind == "partial":
                group.update(growth_lr_scale_new=scale_new, growth_lr_scale_old=scale_old)
        group["params"].append(p)
        group["growth_names"].append(name)
        if kind == "partial":
            setattr(p, REGION_ATTR, region)
            if scale_new != 1.0 or scale_old != 1.0:
                _ensure_optimizer_hooks()
    order = [(k, d) for k in ("new", "partial", "old") for d in (True, False)]
    return [groups[key] for key in order if key in groups]


__all__ = ["GrowthFreeze", "freeze_for_growth", "growth_param_groups", "trainable_mask"]
