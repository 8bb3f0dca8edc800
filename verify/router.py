"""Router scaling: the grown model's routers give the same logits, and routing did not collapse.

For every MoE layer: the router logits of the old and new model on the same probe (max and
mean |diff|, the mean |logit| of each and their ratio new/old) and the expert load over
the probe (normalized entropy of the top-k assignment, share of tokens sent to the
busiest expert, share of routing slots taken by the k busiest experts), so a collapse is
seen, not inferred: a layer collapses when its k busiest experts take at least
``collapse_share`` (0.9) of the slots (k/E when uniform, 1 when every token goes to the same
k experts) and did not in the source (for a new identity layer or stacked copy: in the old
layer whose router it copies, nor, where the new layer does not follow that one, in the old
layer whose output it reads).

The router's input is the tiled hidden state, so a widened router must be [W/s, ..., W/s];
copied undivided, every logit is multiplied by s (ratio ~ s), the softmax sharpens and
routing collapses toward whichever expert wins. A layer whose input already differs is
not judged (see functional identity). Dense models: skipped. A dense -> MoE upcycle has
no old router to compare with: only the new load is judged (no collapse).

Logit differences use one ``layer_diff_stats`` launch for all layers, magnitudes one more;
the load is a batched top-k and scatter over all layers at once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from growkit.growth.adapters import get_adapter

from .context import Comparison
from .distributed import expert_counts
from .pairing import ORIGINAL
from .report import FAILED, PASSED, SKIPPED, CheckResult
from .stats import abs_stats, diff_stats, relative

NAME, TITLE = "router_scaling", "Router scaling"
RULE = "relative: max|diff| <= tolerance * max|old router logit| per MoE layer"


def top_k_of(model: nn.Module) -> int:
    return get_adapter(model, "verification").top_k(model)


def expert_load(logits: list[torch.Tensor], top_k: int) -> list[dict]:
    """Per layer expert load over the tokens, batched over layers (one top-k, one scatter).

    Args:
        logits: L tensors [N, E] (one shape).
        top_k: experts chosen per token.

    Returns:
        L dicts: ``entropy`` (of the top-k assignment counts, divided by ln E: 1 is uniform,
        ln(k)/ln(E) is every token on the same k experts), ``busiest_share`` (fraction of
        tokens routed to the busiest expert), ``busiest_expert``, ``topk_share`` (fraction of
        all routing slots taken by the k busiest experts: k/E when uniform, 1 when routing has
        collapsed onto k experts) and ``load`` (per expert fraction of tokens).
    """
    if not logits:
        return []
    counts = expert_counts(logits, top_k)
    (L, E), N, k = counts.shape, logits[0].shape[0], min(top_k, logits[0].shape[-1])
    p = counts / max(N * k, 1)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1) / math.log(E) if E > 1 else torch.ones(L)
    share = counts / max(N, 1)
    busiest = share.max(dim=1)
    topk_share = p.topk(k, dim=1).values.sum(dim=1)
    out = []
    for i in range(L):
        out.append(dict(
            entropy=float(ent[i]),
            busiest_share=float(busiest.values[i]),
            busiest_expert=int(busiest.indices[i]),
            topk_share=float(topk_share[i]),
            load=[round(v, 4) for v in share[i].tolist()],
        ))
    return out


def router_check(ctx: Comparison) -> CheckResult:
    """The check on a shared context (threshold ``ctx.collapse_share``)."""
    collapse_share = ctx.collapse_share
    tol = ctx.tolerance
    new_run = ctx.new_run()
    if not new_run.router:
        return CheckResult(NAME, TITLE, SKIPPED, "dense model: no routers to check", tol, RULE,
                           notes=["the grown model has no MoE layers"])
    if not ctx.whole:
        return CheckResult(NAME, TITLE, FAILED, f"new d_model is {ctx.scale} x the old: not a whole multiple",
                           tol, RULE, diagnosis="width_not_whole")
    old_run = ctx.old_run()
    s = ctx.scale
    new_layers = sorted(new_run.router)
    E = new_run.router[new_layers[0]].shape[-1]
    k_new, k_old = top_k_of(ctx.new), top_k_of(ctx.old)
    new_load = dict(zip(new_layers, expert_load([new_run.router[j] for j in new_layers], k_new)))
    old_layers = sorted(old_run.router)
    old_load = dict(zip(old_layers, expert_load([old_run.router[i] for i in old_layers], k_old)))

    pairs = {p.new: p for p in ctx.pairing.pairs}
    table, judged = [], []
    for j in new_layers:
        p = pairs.get(j)
        r = dict(layer=j, source=p.describe() if p else "-", judged="yes", max_rel=None,
                 mean_abs_old=None, mean_abs_new=None, ratio=None,
                 entropy_old=None, entropy_new=new_load[j]["entropy"],
                 busiest_new=new_load[j]["busiest_share"], topk_share_old=None,
                 topk_share_new=new_load[j]["topk_share"], status="")
        if p is not None and p.old in old_load:
            # for an identity layer or a stacked copy: the old layer whose router it copies,
            # so a collapse the source had already trained in is not blamed on the growth;
            # and where the new layer does not follow that layer (G_stack's places) it reads
            # the stream after old layer ref - 1: the more concentrated of the two is the
            # reference (a copied router on a later layer's stream may route as that layer did)
            ref = old_load[p.old]
            after = None if p.kind == ORIGINAL or not p.ref_hidden else p.ref_hidden - 1
            if after is not None and after != p.old and after in old_load \
                    and old_load[after]["topk_share"] > ref["topk_share"]:
                ref = old_load[after]
            r["entropy_old"] = ref["entropy"]
            r["topk_share_old"] = ref["topk_share"]
        table.append(r)
        if p is None or p.kind != ORIGINAL or p.old not in old_run.router:
            r["judged"] = "no reference" if old_run.router else "old is dense"
        elif not ctx.input_ok(j):
            r["judged"] = "input differs"
        elif old_run.router[p.old].shape != new_run.router[j].shape:
            r["judged"] = "shape differs"
            r["status"] = "FAIL"
        else:
            judged.append((r, p))

    if judged:
        old_stack = torch.stack([old_run.router[p.old] for _, p in judged])
        new_stack = torch.stack([new_run.router[p.new] for _, p in judged])
        dmax, dmean = diff_stats(old_stack, new_stack)
        amax, amean = abs_stats(torch.cat([old_stack, new_stack]))
        J = len(judged)
        for i, (r, _) in enumerate(judged):
            r["max_rel"] = relative(float(dmax[i]), float(amax[i]))
            r["mean_abs_old"] = float(amean[i])
            r["mean_abs_new"] = float(amean[J + i])
            r["ratio"] = relative(float(amean[J + i]), float(amean[i]))
            r["status"] = "ok" if r["max_rel"] <= tol else ("drift" if ctx.by_design else "FAIL")

    collapsed = []
    if k_new < E:
        for r in table:
            was = r["topk_share_old"]
            if r["topk_share_new"] >= collapse_share and (was is None or was < collapse_share):
                collapsed.append(r)
                r["status"] = "COLLAPSED" if r["status"] != "FAIL" else "FAIL"

    ratios = [r["ratio"] for r, _ in judged if r["ratio"] is not None]
    figures = {
        "moe_layers": len(new_layers),
        "layers_compared": len(judged),
        "max_rel_diff": max((r["max_rel"] for r, _ in judged), default=None),
        "magnitude_ratio_new_over_old": ratios,
        "expected_ratio": 1.0,
        "min_load_entropy_new": min(r["entropy_new"] for r in table),
        "max_busiest_share_new": max(r["busiest_new"] for r in table),
        "max_topk_share_new": max(r["topk_share_new"] for r in table),
        "uniform_topk_share": min(k_new, E) / E,
        "collapse_share": collapse_share,
        "load_new": {j: new_load[j]["load"] for j in new_layers},
    }
    columns = ["layer", "source", "judged", "max_rel", "mean_abs_old", "mean_abs_new", "ratio",
               "entropy_old", "entropy_new", "busiest_new", "topk_share_old", "topk_share_new", "status"]
    notes = []
    if not old_run.router:
        notes.append("the old model is dense: no router logits to compare; the new routers' load is shown")
    if ctx.by_design:
        notes.append("the growth is not function-preserving by design: logit differences are shown "
                     "(status 'drift'), only a routing collapse is judged")
    skipped_inputs = [r["layer"] for r in table if r["judged"] == "input differs"]
    if skipped_inputs:
        notes.append(f"MoE layers {skipped_inputs} not compared: their input already differs (see functional identity)")

    failing = [r for r in table if r["status"] in ("FAIL", "COLLAPSED")]
    if failing:
        r0 = failing[0]
        ratio = r0.get("ratio")
        if r0["status"] == "FAIL" and ratio is not None and s > 1 and abs(ratio / s - 1.0) <= 0.05:
            diag = "router_not_divided"
            cause = (
                f"router weights not divided by the scale: layer {r0['layer']}'s logits are "
                f"{ratio:.3g} x the source's (scale {s})"
            )
        elif r0["status"] == "COLLAPSED":
            diag = "routing_collapsed"
            cause = (
                f"layer {r0['layer']} routes {r0['topk_share_new']:.0%} of the probe's routing slots to its "
                f"{k_new} busiest experts (uniform: {min(k_new, E) / E:.0%}"
                + ("" if r0["topk_share_old"] is None else f", source: {r0['topk_share_old']:.0%}") + ")"
            )
        else:
            diag = "router_mismatch"
            cause = (
                f"a weight-expansion bug in the router of layer {r0['layer']}: its logits differ "
                f"(max rel diff {r0['max_rel']:.2e}, magnitude ratio {ratio if ratio is None else round(ratio, 4)}) "
                "although its input matches"
            )
        summary = f"router logits or load wrong in MoE layers {[r['layer'] for r in failing]}"
        return CheckResult(NAME, TITLE, FAILED, summary, tol, RULE, figures, table, columns,
                           diagnosis=diag, cause=cause, where=f"layer {r0['layer']} (router)", notes=notes)
    if not judged and old_run.router:
        return CheckResult(NAME, TITLE, SKIPPED, "no MoE layer could be compared: inputs already differ or have no reference",
                           tol, RULE, figures, table, columns, notes=notes)
    if judged and any(r["status"] == "drift" for r, _ in judged):
        summary = (
            f"router logits drift by design (max rel diff {figures['max_rel_diff']:.2e}, not judged); "
            f"the {k_new} busiest experts take at most {figures['max_topk_share_new']:.0%} of routing slots"
        )
    elif judged:
        summary = (
            f"router logits match in {len(judged)} MoE layer{'s' if len(judged) != 1 else ''} (max rel diff {figures['max_rel_diff']:.2e}, "
            f"magnitude ratio {min(ratios):.4g}..{max(ratios):.4g}); the {k_new} busiest experts take at most "
            f"{figures['max_topk_share_new']:.0%} of routing slots (uniform {figures['uniform_topk_share']:.0%})"
        )
    else:
        summary = (
            f"no old routers; new load not collapsed (the {k_new} busiest experts take at most "
            f"{figures['max_topk_share_new']:.0%} of routing slots, uniform {figures['uniform_topk_share']:.0%}; "
            f"min entropy {figures['min_load_entropy_new']:.3f})"
        )
    return CheckResult(NAME, TITLE, PASSED, summary, tol, RULE, figures, table, columns, notes=notes)
