"""Layerwise functional identity: the grown model computes what the source computed.

Width growth keeps every hidden vector tiled ([h, ..., h]); identity layers pass their
input through; upcycled MoE layers output what the dense MLP did. So on one probe:

* the embedding output of the new model equals the old one tiled,
* every layer's output equals the tiled output of the old layer it reproduces (layers are
  paired from the ``growth_records`` layer map, or inferred: see ``pairing.py``),
* the logits are equal.

Tolerance is relative: a hidden state (or the logits) passes when
``max|new - tile(old)| <= tolerance * max|old|``, so one tolerance fits models of any scale
and dtype (1e-4 suits float32; use ~1e-2 for bfloat16). The first layer that fails is
named, with the part of it that broke when that can be told: its attention output (from
the same forward pass) or, for MoE layers, its router.

Growth that is not function-preserving by design (``mode="stack"`` depth growth,
``noise="independent"``, expert noise) is reported as SKIPPED with the measured drift,
not as a failure.

All hidden states are compared in one ``layer_diff_stats`` launch; their reference
magnitudes in one more; the logits in two.
"""

from __future__ import annotations

from .context import TOLERANCE_RULE, Comparison
from .pairing import IDENTITY
from .report import FAILED, PASSED, SKIPPED, CheckResult
from .stats import abs_stats, diff_stats, relative

NAME, TITLE = "functional_identity", "Functional identity"


def _attention_broke(ctx: Comparison, layer: int) -> bool | None:
    """Did new layer ``layer``'s attention output differ from its reference? (None: unknown)."""
    rel = ctx.attention().get(layer)
    return None if rel is None else max(rel) > ctx.tolerance


def _router_broke(ctx: Comparison, layer: int) -> bool | None:
    p = ctx.pairing.pairs[layer]
    old_run, new_run = ctx.old_run(), ctx.new_run()
    if p.kind == IDENTITY or layer not in new_run.router or p.old not in old_run.router:
        return None
    ref, new = old_run.router[p.old], new_run.router[layer]
    if ref.shape != new.shape:
        return True
    mx, _ = diff_stats(ref[None], new[None])
    amax, _ = abs_stats(ref[None])
    return relative(float(mx[0]), float(amax[0])) > ctx.tolerance


def identity_check(ctx: Comparison) -> CheckResult:
    tol = ctx.tolerance
    pairing = ctx.pairing
    notes = []
    if pairing.source != "same depth":
        notes.append(f"layers paired from {pairing.source}")
    if not ctx.whole:
        return CheckResult(NAME, TITLE, FAILED, f"new d_model is {ctx.scale} x the old: not a whole multiple",
                           tol, TOLERANCE_RULE, diagnosis="width_not_whole")
    if pairing.problem:
        return CheckResult(NAME, TITLE, FAILED, "new layers cannot be paired with old layers", tol, TOLERANCE_RULE,
                           {"old_layers": len(ctx.old_run().hidden) - 1, "new_layers": len(pairing.pairs)},
                           diagnosis="layers_unpaired", cause=pairing.problem, where="layer pairing", notes=notes)
    h = ctx.hidden()
    table = []
    for j in range(len(h.ref)):
        if j == 0:
            label, source = "embedding", "old embedding"
        else:
            p = pairing.pairs[j - 1]
            label, source = f"layer {j - 1}", p.describe()
        status = "-" if h.ok[j] is None else ("ok" if h.ok[j] else "FAIL")
        table.append(dict(output=label, source=source, max_diff=h.max_diff[j], mean_diff=h.mean_diff[j],
                          ref_max=h.ref_max[j], rel=h.rel[j], status=status))
    table.append(dict(output="logits", source="old logits", max_diff=h.logits_max_diff,
                      mean_diff=h.logits_mean_diff, ref_max=h.logits_ref_max, rel=h.logits_rel,
                      status="ok" if h.logits_ok else "FAIL"))
    columns = ["output", "source", "max_diff", "mean_diff", "ref_max", "rel", "status"]
    judged_rel = [r for r in h.rel if r is not None]
    figures = {
        "scale": ctx.scale,
        "layers_old_new": f"{len(ctx.old_run().hidden) - 1} -> {len(pairing.pairs)}",
        "layer_pairing": pairing.source,
        "max_rel_diff_hidden": max(judged_rel) if judged_rel else None,
        "logits_rel_diff": h.logits_rel,
        "logits_max_diff": h.logits_max_diff,
    }
    if not pairing.function_preserving:
        notes.extend(pairing.by_design)
        unpaired = [p.new for p in pairing.pairs if p.ref_hidden is None]
        summary = (
            "not function-preserving by design: measured drift "
            f"{h.logits_rel:.3g} (relative, logits)"
            + (f"; layers {unpaired} are copies without a reference" if unpaired else "")
        )
        for row in table:
            if row["status"] == "FAIL":
                row["status"] = "drift"
        return CheckResult(NAME, TITLE, SKIPPED, summary, tol, TOLERANCE_RULE, figures, table, columns, notes=notes)

    bad = [j for j in range(len(h.ok)) if h.ok[j] is False]
    if not bad and h.logits_ok:
        summary = (
            f"embedding, {len(pairing.pairs)} layers and logits match the tiled source "
            f"(max rel diff {max(judged_rel + [h.logits_rel]):.2e})"
        )
        return CheckResult(NAME, TITLE, PASSED, summary, tol, TOLERANCE_RULE, figures, table, columns, notes=notes)

    nonfinite = [j for j in bad if h.rel[j] != h.rel[j] or h.rel[j] == float("inf")]
    if bad:
        j = bad[0]
        figures["first_failing"] = table[j]["output"]
        if j in nonfinite and h.max_diff[j] == float("inf"):
            diag, where = "non_finite", table[j]["output"]
            cause = f"non-finite values in the output of {table[j]['output']}"
        elif j == 0:
            diag, where, cause = "embedding_not_tiled", "embedding", None
        else:
            layer = j - 1
            p = pairing.pairs[layer]
            if p.kind == IDENTITY:
                diag, where = "identity_layer_not_identity", f"layer {layer} (identity layer)"
                cause = (f"new layer {layer}, inserted as an identity layer ({p.describe()}), changes "
                         f"the hidden state (rel diff {h.rel[j]:.2e}): its residual-writing projections are not zero")
            else:
                attn = _attention_broke(ctx, layer)
                router = _router_broke(ctx, layer)
                bad_qk = [k for k, v in ctx.projection_rel(layer).items() if v > tol] if attn else []
                if attn and bad_qk:
                    part = f"attention ({'/'.join(bad_qk)})"
                elif attn:
                    part = "attention (attn_norm, q/k/v/o projections or their biases)"
                elif router:
                    part = "router (see router scaling)"
                elif attn is False:
                    part = "MLP (mlp_norm, gate/up/down projections, experts or their biases)"
                else:
                    part = "block"
                short = part.split(" (")[0] if not bad_qk else part
                diag, where = "weight_expansion_bug", f"layer {layer} ({short})"
                cause = (f"a weight-expansion bug in layer {layer}: its output differs from the tiled "
                         f"output of {p.describe()} (rel diff {h.rel[j]:.2e}, tolerance {tol:g}) while its "
                         f"input matches; the {part} is where it starts"
                         + ("" if attn is None else f" (attention output {'differs' if attn else 'matches'})"))
        summary = f"first failure at {table[j]['output']} (rel diff {h.rel[j]:.3g} > {tol:g})"
    else:
        diag, where = "head_mismatch", "final norm / LM head"
        cause = None
        summary = f"all hidden states match but the logits differ (rel diff {h.logits_rel:.3g} > {tol:g})"
    return CheckResult(NAME, TITLE, FAILED, summary, tol, TOLERANCE_RULE, figures, table, columns,
                       diagnosis=diag, cause=cause, where=where, notes=notes)
