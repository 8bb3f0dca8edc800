"""Depth growth: identity blocks (LLaMA-Pro, LEMON) or G_stack stacking (Du et al. 2024).

``mode="identity"`` (function-preserving): each new layer is a copy of the layer it is
inserted after, with every projection that writes to the residual stream zeroed::

    h -> h + o_proj(attn(.)) + down_proj(mlp(.))      with o_proj = 0, down_proj = 0
      =  h                                            (pre-norm blocks add exactly 0)

The zeroed projections still receive gradients (their inputs are not zero), so the new
layer starts learning at once; its q/k/v/up/gate start with zero gradient.

Families that normalize each sublayer's output before the residual add (OLMo2's post
norms, Gemma2's and Gemma3's ``post_attention_layernorm`` / ``post_feedforward_layernorm``;
roles ``ATTN_OUT_NORM``, ``MLP_OUT_NORM``) get the gain of those norms zeroed instead
(``-1`` for Gemma's ``(1 + w)`` norms) and keep their projections::

    h -> h + g_attn * rmsnorm(o_proj(attn(.))) + g_mlp * rmsnorm(down_proj(mlp(.)))   g = 0

Zeroing the projections there would be exact too, but not trainable: RMSNorm is scale
invariant, so after one small step the tiny projection output is normalized back to full
size (measured on a tiny OLMo2: one SGD step at lr 1e-6 made the new block 44% of the
residual stream's norm, against 1e-7 on Llama). A zero gain grows from 0 with its
gradient instead.

``mode="stack"`` (NOT function-preserving: it changes the function by design): new layers
are copies of existing ones, as in G_stack. When ``n_layers + extra_layers`` is a whole
multiple k of ``n_layers`` the whole stack is repeated k times, as in the paper::

    [0 1 2 3]  --(extra 4)-->  [0 1 2 3 | 0 1 2 3]

otherwise the whole stack is repeated ``extra_layers // n_layers`` times and then the top
``extra_layers % n_layers`` layers are copied once more, on top::

    [0 1 2 3]  --(extra 2)-->  [0 1 2 3 | 2 3]

``stack_scale`` (stack mode only) multiplies what each stacked copy writes to the residual
stream (its residual-writing projections; in a family with output norms, those norms'
effective gains): 1 is G_stack; 0 makes the copies identity blocks in G_stack's places,
function-preserving; in between, the copies start as damped versions of the layers they
copy (measured on the micro preset: 0.25 kept the loss rise after growth near 1% where
full copies rose 9.5%)::

    [0 1]  --(extra 2, stack_scale a)-->  [0 1 | a*0 a*1]      a*k: layer k, writers times a

Layers are numbered from 0. Copies never share storage with the source.
"""

from __future__ import annotations

import torch
from torch import nn

from growkit.kernels.memory import check_memory
from growkit.validate import choice, real_number, whole_number

from .adapters import get_adapter
from .plan import (GrowthPlan, TensorPlan, TensorSpec, build_from_plan, copy_of, scaled_copy_of, source_specs,
                   zeros_like_source)
from .records import GrowthRecord, Source

DEPTH_MODES = ("identity", "stack")


def default_positions(n_layers: int, extra_layers: int) -> list[int]:
    """Where identity layers go by default: spread evenly, at the end of each group.

    With ``extra <= n`` the n layers are cut into ``extra`` near-equal groups and one new
    layer follows each group (LLaMA-Pro's layout): n=8, extra=2 -> after layers 3 and 7.
    With ``extra > n`` every layer is followed by ``extra // n`` or one more new layers,
    the extra ones from the bottom: n=2, extra=3 -> after layers 0, 0, 1.
    """
    if extra_layers <= n_layers:
        return [((k + 1) * n_layers) // extra_layers - 1 for k in range(extra_layers)]
    return sorted((k * n_layers) // extra_layers for k in range(extra_layers))


def check_depth_args(extra_layers, mode, positions, n_layers, *, mode_name: str = "mode") -> list[int] | None:
    """Validate depth-growth arguments (ValueError naming the argument); sorted positions."""
    extra_layers = whole_number(extra_layers, "extra_layers", min=0)
    choice(mode, mode_name, DEPTH_MODES)
    if positions is None:
        return None
    if isinstance(positions, (str, bytes)) or not hasattr(positions, "__iter__"):
        raise TypeError(f"positions must be a list of source-layer indices, got {positions!r}")
    positions = list(positions)
    if len(positions) != extra_layers:
        raise ValueError(
            f"positions must name one source layer per new layer: got {len(positions)} positions "
            f"for extra_layers={extra_layers}"
        )
    hint = "layers are numbered from 0; a new layer goes after the named one"
    return sorted(whole_number(p, "positions[i]", min=0, max=n_layers - 1, hint=hint) for p in positions)


def check_stack_scale(stack_scale, mode: str, *, mode_name: str = "mode") -> float:
    """Validate ``stack_scale`` against ``mode`` (already checked); returns the scale of
    what the new layers write: ``stack_scale`` (default 1) for ``"stack"``, 0 for ``"identity"``."""
    if stack_scale is None:
        return 0.0 if mode == "identity" else 1.0
    if mode != "stack":
        raise ValueError(f"stack_scale={stack_scale!r} applies to {mode_name}='stack' only (identity "
                         f"layers write 0): drop it, or use {mode_name}='stack'")
    return real_number(stack_scale, "stack_scale", min=0, max=1,
                       hint="1: G_stack's full copies; 0: identity blocks in their places")


def check_depth(model: nn.Module, extra_layers, mode, positions, stack_scale, *, mode_name: str = "mode",
                what: str = "depth growth") -> tuple[list[int] | None, float]:
    """Every depth argument checked against ``model`` (``check_depth_args``,
    ``check_stack_scale``): (sorted positions, the scale of what the new layers write)."""
    n_layers = get_adapter(model, what).n_layers(model)
    positions = check_depth_args(extra_layers, mode, positions, n_layers, mode_name=mode_name)
    return positions, check_stack_scale(stack_scale, mode, mode_name=mode_name)


def check_depth_memory(adapter, specs: dict[str, TensorSpec], extra_layers: int, device) -> None:
    """ValueError naming ``extra_layers`` when the deeper model cannot fit in ``device``'s free
    memory (estimated from the source's tensor sizes: its largest layer per new layer),
    before anything is planned or allocated."""
    roles = adapter.roles_for_names(specs)
    per_layer: dict[int, int] = {}
    total = 0
    for name, spec in specs.items():
        total += spec.nbytes
        layer = roles[name].layer
        if layer is not None:
            per_layer[layer] = per_layer.get(layer, 0) + spec.nbytes
    check_memory(total + extra_layers * max(per_layer.values(), default=0), device,
                 f"extra_layers={extra_layers}")


def layer_plan(n_layers: int, extra_layers: int, mode: str, positions: list[int] | None,
               stack_scale: float = 1.0) -> list[tuple[int, str]]:
    """For every new layer, (source layer, kind): kind is original, identity or copy (a
    stacked copy whose writers are scaled by 0 is an identity layer)."""
    new_kind = "identity" if mode == "identity" or stack_scale == 0 else "copy"
    if mode == "stack" and positions is None:
        whole, rest = divmod(extra_layers, n_layers)
        plan = [(i, "original") for i in range(n_layers)]
        plan += [(i, new_kind) for _ in range(whole) for i in range(n_layers)]
        plan += [(i, new_kind) for i in range(n_layers - rest, n_layers)]
        return plan
    if positions is None:
        positions = default_positions(n_layers, extra_layers)
    plan = []
    for i in range(n_layers):
        plan.append((i, "original"))
        plan += [(i, new_kind)] * positions.count(i)
    return plan


def deepen_config(adapter, config, plan: list[tuple[int, str]]):
    """The config of a model whose layer j copies source layer ``plan[j][0]``: the layer
    count, and every per-layer choice (``layer_types``; which layers are MoE) taken from
    the layer each new one copies."""
    updates = {"n_layers": len(plan)}
    layer_types = adapter.cfg(config, "layer_types")
    if layer_types is not None:
        updates["layer_types"] = [layer_types[src] for src, _ in plan]
    sparse = adapter.sparse_layers(config)
    if sparse is not None and adapter.is_moe(config):
        # one form for every family: step 1 and the explicit list of dense layers
        if adapter.has("sparse_step"):
            updates["sparse_step"] = 1
        updates["dense_layers"] = [j for j, (src, _) in enumerate(plan) if not sparse[src]]
    return adapter.config_with(config, **updates)


def plan_depth(adapter, config, specs: dict[str, TensorSpec], tied: bool, extra_layers: int, mode: str,
               positions: list[int] | None, stack_scale: float = 1.0) -> GrowthPlan:
    """The depth-growth plan of a source described by its config and tensor specs (role
    names; ``positions`` and ``stack_scale`` already checked: ``check_depth_args``,
    ``check_stack_scale``). See :func:`grow_depth`."""
    roles = adapter.roles_for_names(specs)
    plan = layer_plan(int(adapter.cfg(config, "n_layers")), extra_layers, mode, positions, stack_scale)
    by_layer: dict[int, list[str]] = {}
    tensors = {}

    for name, pr in roles.items():
        if pr.layer is None:
            tensors[name] = TensorPlan(specs[name], Source("copy", pr.role, name), copy_of(name), (name,))
        else:
            by_layer.setdefault(pr.layer, []).append(name)
    # an identity layer's branches add 0: output norms' gains zeroed where the family has
    # them (their effective gain: -1 for a (1 + w) norm), else the residual writers zeroed
    zero_gain = -1.0 if "norm_offset" in adapter.family.quirks else 0.0
    for new_layer, (src_layer, kind) in enumerate(plan):
        names = by_layer.get(src_layer, [])
        out_norms = any(roles[n].rule.output_norm for n in names)
        for name in names:
            pr = roles[name]
            new_name = adapter.rename_layer(name, new_layer)
            zeroed = pr.rule.output_norm if out_norms else pr.rule.writes_residual
            fill = zero_gain if pr.rule.output_norm else 0.0  # the value that writes nothing
            if kind == "identity" and zeroed:
                tensors[new_name] = TensorPlan(specs[name], Source("zero", pr.role, name),
                                               zeros_like_source(name, fill), (name,))
            elif kind == "copy" and zeroed and stack_scale != 1.0:
                # what the copy writes, damped: a * w for a projection; for a gain g (zero
                # value z, -1 for a (1 + w) norm), a * (g - z) + z, so the effective gain is a * (1 + w)
                tensors[new_name] = TensorPlan(specs[name], Source("scaled_copy", pr.role, name),
                                               scaled_copy_of(name, stack_scale, fill), (name,))
            else:
                kind_name = "identity_copy" if kind == "identity" else "copy"
                tensors[new_name] = TensorPlan(specs[name], Source(kind_name, pr.role, name), copy_of(name), (name,))
    preserving = mode == "identity" or extra_layers == 0 or stack_scale == 0
    settings = dict(extra_layers=extra_layers, mode=mode, positions=positions)
    if mode == "stack" and stack_scale != 1.0:
        settings["stack_scale"] = stack_scale
    record = GrowthRecord(
        "depth",
        settings,
        {n: t.source for n, t in tensors.items()},
        layer_map=plan,
        function_preserving=preserving,
        notes=[] if preserving else ["stack mode copies layers: the function changes by design (G_stack"
                                     + (f", writers scaled by {stack_scale:g})" if stack_scale != 1.0 else ")")],
    )
    return GrowthPlan(adapter, deepen_config(adapter, config, plan), tensors, record, tied)


@torch.no_grad()
def grow_depth(
    model: nn.Module,
    extra_layers: int,
    *,
    mode: str = "identity",
    positions: list[int] | None = None,
    stack_scale: float | None = None,
) -> nn.Module:
    """Insert ``extra_layers`` new layers.

    Args:
        model: the source model (left untouched; nothing is shared with it).
        extra_layers: how many layers to add (0 returns a copy).
        mode: ``"identity"`` (function-preserving) or ``"stack"`` (G_stack; changes the
            function by design, see the module docstring for the rule).
        positions: source-layer indices (from 0) after which each new layer goes; a
            new layer copies the layer it follows. Default: ``default_positions`` for
            ``identity``; the G_stack rule for ``stack``.
        stack_scale: ``stack`` only, in [0, 1] (default 1): the copies' residual-writing
            weights times this; 0 gives identity layers in the stacked places.

    Returns:
        The deeper model with ``growth_records[-1].layer_map`` listing, for every new
        layer, its source layer and kind.
    """
    positions, stack_scale = check_depth(model, extra_layers, mode, positions, stack_scale)
    return deepen(model, int(extra_layers), mode, positions, stack_scale)


def deepen(model: nn.Module, extra_layers: int, mode: str, positions: list[int] | None,
           stack_scale: float = 1.0) -> nn.Module:
    """:func:`grow_depth` on arguments already checked (``check_depth_args``, ``check_stack_scale``)."""
    adapter = get_adapter(model, "depth growth")
    specs, state, tied = source_specs(adapter, model)
    check_depth_memory(adapter, specs, extra_layers, next(iter(state.values())).device)
    plan = plan_depth(adapter, model.config, specs, tied, extra_layers, mode, positions, stack_scale)
    return build_from_plan(plan, plan.execute(state.__getitem__), like=model)
