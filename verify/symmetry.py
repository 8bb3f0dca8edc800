"""Symmetry breaking: are the clones of every cloned weight free to learn different things?

Width growth makes s twin blocks along every widened dim of every tensor (the role table
says which dims: q_proj [s*H*hd, s*d] has twins along both). Exact twins receive exactly
equal gradients, so they stay equal forever and the added width is wasted; zero-sum noise
(``noise_std``) makes the twin weights differ, and through them the gradients.

After one backward pass on the probe, for every cloned tensor, the twin blocks of the
weight and of its gradient along all its widened dims (s^k blocks for k widened dims) are
compared with block 0 (max and mean |B_g - B_0|) and put relative to the mean magnitude of
block 0: relative divergence = mean|B_g - B_0| / mean|B_0|. A tensor fails when its twins
are identical (relative divergence <= ``min_divergence``) in both its weights and its
gradients. That rule judges freshly inserted identity layers correctly: their q/k/v/up/gate
get zero gradients (judged by their weights, copied with noise) and their zeroed o/down
projections have equal (zero) weights (judged by their gradients).

Judged: the linear maps that receive noise (role rule ``noise`` with an input dim: q/k/v/o,
MLP and expert gate/up/down, LM head). Embeddings, norms and biases are tiled without
noise by design and the router's input twins always see equal inputs: they are measured
and shown, not judged. For a model upcycled to MoE (a ``moe`` growth record) the experts
are clones of one MLP too: they are compared along the experts dim and judged the same way.

Tensors of one shape are stacked across layers (weights and gradients in one stack), each
permuted so that its twin blocks along every widened dim are replicas of the last dim
(``stats.twin_layout``; the stack is the one copy): one ``layer_diff_stats`` launch for the
twin differences and one for the magnitudes cover all of them.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from growkit.growth.adapters import get_adapter
from growkit.growth.roles import Role

from .context import DEFAULT_MIN_DIVERGENCE, Comparison
from .pairing import twin_axes
from .probe import ProbeRun
from .report import FAILED, PASSED, SKIPPED, CheckResult
from .stats import abs_stats, relative, twin_layout, twin_stats

NAME, TITLE = "symmetry_breaking", "Symmetry breaking"
RULE = (
    "twins identical when mean|B_g - B_0| / mean|B_0| <= min_divergence; a cloned tensor "
    "fails when identical in both weights and gradients"
)


def has_upcycled_experts(model: nn.Module) -> bool:
    return any(r.op == "moe" for r in getattr(model, "growth_records", None) or [])


def _items(model: nn.Module, scale: int, expert_twins: bool):
    """(name, ParamRole, [(dim, groups)], judged) for every tensor with twins."""
    adapter = get_adapter(model, "verification")
    roles = adapter.param_roles(model)
    params = adapter.role_params(model)
    n_experts = int(adapter.cfg(model, "n_experts", 0) or 0)
    out = []
    for name, pr in roles.items():
        if name not in params:
            continue
        rule = pr.rule
        axes = [(d, scale) for d in twin_axes(pr.role, scale)]
        if expert_twins and n_experts >= 2 and rule.dims[0] == "experts" and pr.role is not Role.ROUTER:
            axes.append((0, n_experts))
        if not axes:
            continue
        shape = params[name].shape
        for d, g in axes:
            if shape[d] % g != 0:
                raise ValueError(
                    f"{name} has size {shape[d]} along its {rule.dims[d]} dim, not {g} equal blocks: "
                    f"is the scale ({scale}) right?"
                )
        judged = rule.noise and rule.input_dim is not None
        out.append((name, pr, axes, judged))
    return out


def _measure(tensors: list[torch.Tensor], axes) -> tuple[list, list, list]:
    """Per tensor of ``tensors`` (one shape): max twin diff, relative twin divergence
    (mean|B_g - B_0| / mean|B_0|) and mean|B_0|. Two launches for the whole list."""
    views = [twin_layout(t, axes) for t in tensors]
    _, _, inner = views[0]
    stack = torch.stack([v for v, _, _ in views])
    groups = math.prod(g for _, g in axes)
    # magnitude of block 0 (the block every twin is compared with): 1/groups of the data
    _, mag = abs_stats(stack.reshape(stack.shape[0], -1, groups * inner)[..., :inner])
    mx, mean = twin_stats(stack, groups, inner)
    mag, mx, mean = mag.tolist(), mx.tolist(), mean.tolist()
    rel = [relative(mean[i], mag[i]) for i in range(len(mag))]
    return mx, rel, mag


@torch.no_grad()
def measure_twins(model: nn.Module, grads: dict[str, torch.Tensor | None] | None, scale: int,
                  expert_twins: bool, names: set[str] | None = None) -> list[dict]:
    """Relative twin divergence of weights (and gradients), batched by shape.

    Judged tensors get a row each (one slot per tensor: weights, then gradients, in one
    stack). Unjudged tensors (tiled without noise by design) are measured per group of one
    shape, all of its tensors in one slot for the weights and one for the gradients.
    """
    adapter = get_adapter(model, "verification")
    params = adapter.role_params(model)
    if grads is not None:  # parameter names -> role names (parts of fused tensors)
        grads = adapter.split(model, grads)
    groups: dict[tuple, list] = defaultdict(list)
    for item in _items(model, scale, expert_twins):
        if names is not None and item[0] not in names:
            continue  # layerwise: only the tensors loaded now
        p = params[item[0]]
        groups[(tuple(p.shape), p.dtype, p.device, tuple(item[2]), item[3])].append(item)
    rows = []
    for (shape, dtype, device, axes, judged), items in groups.items():
        n = len(items)
        weights = [params[name].detach() for name, *_ in items]
        grad_list = []
        if grads is not None:
            for name, *_ in items:
                g = grads.get(name)
                grad_list.append(torch.zeros(shape, dtype=dtype, device=device) if g is None else g.to(dtype))
        dims = items[0][1].rule.dims
        axis_names = [f"{dims[d]}/{g}" for d, g in axes]
        if judged:
            if names is None:
                mx, rel, mag = _measure(weights + grad_list, list(axes))
            else:
                # layerwise: weights and gradients measured apart, so that the stacked copy
                # of one large tensor (an LM head) is its size, not twice it
                mx, rel, mag = _measure(weights, list(axes))
                if grad_list:
                    gx, grel, gmag = _measure(grad_list, list(axes))
                    mx, rel, mag = mx + gx, rel + grel, mag + gmag
            for i, (name, pr, _, _) in enumerate(items):
                row = dict(name=name, role=pr.role.value, layer=pr.layer, judged=True, axes=axis_names,
                           weight_rel_div=rel[i], weight_max_div=mx[i], weight_block0_mean_abs=mag[i])
                if grads is not None:
                    row.update(grad_rel_div=rel[n + i], grad_max_div=mx[n + i], grad_block0_mean_abs=mag[n + i])
                rows.append(row)
        else:
            # One slot for all the weights, one for all the gradients: shift the axes by one.
            if n == 1 and names is not None:
                # layerwise, one large tensor (an embedding): measured apart, no stacked copy
                mx, rel, mag = _measure(weights, list(axes))
                if grads is not None:
                    gx, grel, gmag = _measure(grad_list, list(axes))
                    mx, rel, mag = mx + gx, rel + grel, mag + gmag
            else:
                parts = [torch.stack(weights)] + ([torch.stack(grad_list)] if grads is not None else [])
                mx, rel, mag = _measure(parts, [(d + 1, g) for d, g in axes])
            roles = sorted({pr.role.value for _, pr, _, _ in items})
            row = dict(name=f"{n} tensors {list(shape)}", role="+".join(roles), layer=None, judged=False,
                       axes=axis_names, weight_rel_div=rel[0], weight_max_div=mx[0], weight_block0_mean_abs=mag[0])
            if grads is not None:
                row.update(grad_rel_div=rel[1], grad_max_div=mx[1], grad_block0_mean_abs=mag[1])
            rows.append(row)
    return rows


def symmetry_check(model: nn.Module, run: ProbeRun | None, scale: int, *, expert_twins: bool | None = None,
                   min_divergence: float = DEFAULT_MIN_DIVERGENCE, rows: list[dict] | None = None) -> CheckResult:
    """The symmetry verdict from one backward pass (``run.grads``), or from ``rows`` that
    :func:`measure_twins` measured already (layer by layer, ``verify.layerwise``);
    ``min_divergence`` checked by the caller (``Comparison``)."""
    if expert_twins is None:
        expert_twins = has_upcycled_experts(model)
    if scale <= 1 and not expert_twins:
        return CheckResult(NAME, TITLE, SKIPPED, "not widened (scale 1) and no upcycled experts: no clones",
                           min_divergence, RULE)
    if rows is None:
        rows = measure_twins(model, run.grads, scale, expert_twins)
    for r in rows:
        r["identical_weights"] = r["weight_rel_div"] <= min_divergence
        r["identical_grads"] = r.get("grad_rel_div", 0.0) <= min_divergence
        r["zero_grad"] = r.get("grad_block0_mean_abs", 0.0) == 0.0 and r.get("grad_max_div", 0.0) == 0.0
        r["fails"] = r["judged"] and r["identical_weights"] and r["identical_grads"]
    # NOTE: with tied embeddings the output side is the tiled embedding, without noise, so
    # the gradient entering the top of the network is the same for every clone: a tensor
    # with nothing noisy between it and the head (an identity layer placed last) gets
    # identical twin gradients at step 1. The embedding's input side gets the asymmetric
    # gradients of the noisy layers, so after one step the head, and through it that
    # tensor, differ (tests/test_verify.py::test_tied_symmetry_breaks_at_step_two shows
    # it). Such tensors are excused when some tensor carries noise; with no noise at all
    # nothing ever breaks the symmetry and they still fail.
    tied = get_adapter(model, "verification").tied(model)
    noisy = any(r["judged"] and not r["identical_weights"] for r in rows)
    excused = []
    if tied and noisy:
        for r in rows:
            if r["fails"]:
                r["fails"], r["breaks_at_step_2"] = False, True
                excused.append(r)

    by_layer: dict = defaultdict(list)
    for r in rows:
        by_layer[r["layer"]].append(r)
    table = []
    for layer in sorted(by_layer, key=lambda x: (x is None, x if x is not None else 0)):
        items = by_layer[layer]
        judged = [r for r in items if r["judged"]]
        if not judged:
            continue
        table.append(dict(
            layer="global" if layer is None else layer,
            tensors=len(judged),
            min_weight_div=min(r["weight_rel_div"] for r in judged),
            min_grad_div=min(r["grad_rel_div"] for r in judged),
            zero_grad=",".join(r["role"] for r in judged if r["zero_grad"]) or "-",
            identical=",".join(r["role"] for r in judged if r["fails"] or r.get("breaks_at_step_2")) or "-",
            status="FAIL" if any(r["fails"] for r in judged) else (
                "ok (step 2)" if any(r.get("breaks_at_step_2") for r in judged) else "ok"),
        ))
    judged_rows = [r for r in rows if r["judged"]]
    failing = [r for r in judged_rows if r["fails"]]
    info = [r for r in rows if not r["judged"]]
    figures = {
        "scale": scale,
        "expert_twins": expert_twins,
        "tensors_judged": len(judged_rows),
        "tensors_failing": len(failing),
        "min_weight_rel_div": min((r["weight_rel_div"] for r in judged_rows), default=None),
        "max_weight_rel_div": max((r["weight_rel_div"] for r in judged_rows), default=None),
        "min_grad_rel_div": min((r["grad_rel_div"] for r in judged_rows), default=None),
        "unjudged_identical_in_both": sorted({r["role"] for r in info if r["identical_weights"] and r["identical_grads"]}),
    }
    columns = ["layer", "tensors", "min_weight_div", "min_grad_div", "zero_grad", "identical", "status"]
    notes = [
        "unjudged (tiled without noise by design): "
        + ", ".join(sorted({r["role"] for r in info})) if info else "every tensor with twins is judged"
    ]
    if excused:
        where_excused = sorted({("global" if r["layer"] is None else r["layer"]) for r in excused}, key=str)
        notes.append(
            f"{len(excused)} tensors (layers {where_excused}) have identical twins at step 1 because the tied "
            "output embedding gives every clone the same gradient at the top; the embedding's input side "
            "gets the noisy layers' asymmetric gradients, so they diverge from step 2 (status 'ok (step 2)')"
        )
        figures["breaks_at_step_2"] = len(excused)
    if failing:
        layers = sorted({("global" if r["layer"] is None else r["layer"]) for r in failing}, key=str)
        everything = len(failing) == len(judged_rows)
        cause = (
            "noise_std too small: "
            + ("every cloned tensor" if everything else f"{len(failing)} of {len(judged_rows)} cloned tensors (layers {layers})")
            + " has twins identical in both weights and gradients"
            + (f" (max weight divergence {figures['max_weight_rel_div']:.2e})" if everything else "")
            + ", so the clones can never learn different features"
        )
        where = "all layers" if everything else "layers " + ", ".join(map(str, layers))
        summary = f"{len(failing)} of {len(judged_rows)} cloned tensors have identical twins (weights and gradients)"
        return CheckResult(NAME, TITLE, FAILED, summary, min_divergence, RULE, figures, table, columns,
                           diagnosis="noise_too_small", cause=cause, where=where, notes=notes, details=rows)
    # NOTE: a tensor passes on its weights or on its gradients, so name the least diverged
    # tensor by the larger of its two: the separate minima (weights 0 for a tensor whose
    # gradients differ) read like a failure.
    least = min(judged_rows, key=lambda r: max(r["weight_rel_div"], r.get("grad_rel_div", 0.0)), default=None)
    if least is None:
        summary = "no cloned tensor to judge"
    else:
        figures["least_diverged"] = dict(role=least["role"], layer=least["layer"],
                                         weight_rel_div=least["weight_rel_div"], grad_rel_div=least.get("grad_rel_div", 0.0))
        where_least = "global" if least["layer"] is None else f"layer {least['layer']}"
        summary = (
            f"all {len(judged_rows)} cloned tensors have twins that differ in weights or gradients "
            f"(least diverged: {least['role']} in {where_least}, relative divergence of weights "
            f"{least['weight_rel_div']:.2e}, of gradients {least.get('grad_rel_div', 0.0):.2e})"
        )
    return CheckResult(NAME, TITLE, PASSED, summary, min_divergence, RULE, figures, table, columns,
                       notes=notes, details=rows)


def symmetry_from_context(ctx: Comparison) -> CheckResult:
    """The check on a shared context (threshold ``ctx.min_divergence``): one backward pass
    of the new model on the probe, shared with the other checks."""
    scale = ctx.twin_scale
    if scale <= 1 and not has_upcycled_experts(ctx.new):
        return CheckResult(NAME, TITLE, SKIPPED, "not widened (scale 1) and no upcycled experts: no clones",
                           ctx.min_divergence, RULE)
    return symmetry_check(ctx.new, ctx.new_run(backward=True), scale, min_divergence=ctx.min_divergence)
