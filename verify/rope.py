"""RoPE integrity: the attention of the grown model still rotates and scales as before.

Structure: head_dim equal; n_heads and n_kv_heads multiplied by the same factor as d_model;
rope_theta equal. Behaviour: every layer's attention output (its o_proj output, or the
output of the norm on it in OLMo2 and Gemma2/3, [B, T, d])
in both models on the same probe, compared position by position against the tiled old
output. Position 0 attends only to itself and is not rotated, so a head_dim change can
leave it intact while every later position breaks: the per-position figures show it.

A layer is judged only when its input matches the reference (the hidden state it reads
is within tolerance); a layer whose input already differs is shown as such, because its
attention cannot be blamed for an upstream bug (the functional-identity check names it).
Inserted identity layers must output exactly zero attention (their o_proj, or their
output norm's gain, is zero);
stacked copies have no reference.

Launches: reference scales (one), every layer's position 0 and later positions (two), and
the per-position maximum over the judged layers (one slot per position, one launch).
"""

from __future__ import annotations

from torch import nn

from growkit.growth.adapters import get_adapter

from .context import Comparison
from .report import FAILED, PASSED, SKIPPED, CheckResult

NAME, TITLE = "rope_integrity", "RoPE integrity"
RULE = "relative: max|diff| <= tolerance * max|old attention output of that layer|, at every position"


def _cfg(model: nn.Module, key: str):
    """A canonical config field (``rope_theta``: whatever RoPE depends on besides head_dim:
    the base, or a Hugging Face config's whole ``rope_parameters``)."""
    return get_adapter(model, "verification").cfg(model, "rope" if key == "rope_theta" else key)


def _structure(ctx: Comparison) -> tuple[list[dict], str | None, str | None]:
    """Rows of (field, old, new, expected, ok) and the first problem's diagnosis and text."""
    old, new = ctx.old, ctx.new
    s = ctx.scale
    expected = ctx.expected_scale if ctx.expected_scale is not None else s
    rows = []

    def row(field, o, n, want):
        ok = o is None or n is None or n == want
        rows.append(dict(field=field, old=o, new=n, expected=want, ok=ok))
        return ok

    d_old, d_new = _cfg(old, "d_model"), _cfg(new, "d_model")
    diag = text = None
    if not row("d_model", d_old, d_new, None if d_old is None else d_old * expected):
        diag, text = ("width_not_whole", None) if not ctx.whole else (
            "scale_mismatch", f"d_model grew x{s}, but the check was asked for x{expected}")
    factor = s if ctx.whole else None
    hd_ok = row("head_dim", _cfg(old, "head_dim"), _cfg(new, "head_dim"), _cfg(old, "head_dim"))
    h_old = _cfg(old, "n_heads")
    h_ok = row("n_heads", h_old, _cfg(new, "n_heads"), None if h_old is None or factor is None else h_old * factor)
    kv_old = _cfg(old, "n_kv_heads")
    kv_ok = row("n_kv_heads", kv_old, _cfg(new, "n_kv_heads"), None if kv_old is None or factor is None else kv_old * factor)
    th_ok = row("rope_theta", _cfg(old, "rope_theta"), _cfg(new, "rope_theta"), _cfg(old, "rope_theta"))
    if not hd_ok or not h_ok:
        diag = "n_heads_not_scaled"
        text = (
            f"n_heads went {h_old} -> {_cfg(new, 'n_heads')} while d_model went x{s}, so head_dim "
            f"changed {_cfg(old, 'head_dim')} -> {_cfg(new, 'head_dim')}: RoPE rotates other "
            "pairs of dims and the 1/sqrt(head_dim) softmax scale changed"
        )
    elif not kv_ok:
        diag = "kv_heads_not_scaled"
        text = f"n_kv_heads went {kv_old} -> {_cfg(new, 'n_kv_heads')} while n_heads and d_model went x{s}"
    elif not th_ok:
        diag = "rope_theta_changed"
        text = f"rope_theta went {_cfg(old, 'rope_theta')} -> {_cfg(new, 'rope_theta')}"
    return rows, diag, text


def rope_check(ctx: Comparison) -> CheckResult:
    tol = ctx.tolerance
    rows, diag, cause = _structure(ctx)
    figures: dict = {
        "structure": ", ".join(
            f"{r['field']} {r['old']}->{r['new']}" + ("" if r["ok"] else f" (expected {r['expected']})") for r in rows
        ),
    }
    structure_ok = all(r["ok"] for r in rows)
    if not ctx.whole:
        return CheckResult(
            NAME, TITLE, FAILED,
            f"new d_model is {ctx.scale} x the old: not a whole multiple, behaviour not compared",
            tol, RULE, figures, diagnosis=diag or "width_not_whole", cause=cause,
        )

    pairing = ctx.pairing
    T = ctx.probe.shape[1]
    attention = ctx.attention()
    table, judged = [], []
    for p in pairing.pairs:
        j = p.new
        r = dict(layer=j, source=p.describe(), judged="yes", max_rel=None, pos0_rel=None, later_rel=None, status="")
        table.append(r)
        if j not in attention:
            r["judged"], r["status"] = "no reference", "-"
        elif not ctx.input_ok(j):
            r["judged"], r["status"] = "input differs", "-"
        else:
            judged.append((r, p))
    for r, p in judged:
        pos0, later = attention[p.new]
        r["pos0_rel"], r["later_rel"], r["max_rel"] = pos0, later, max(pos0, later)
        r["status"] = "ok" if r["max_rel"] <= tol else ("drift" if ctx.by_design else "FAIL")
    per_pos = ctx.attention_per_position([p.new for _, p in judged]) if judged else None

    notes = []
    if ctx.by_design:
        notes.append("the growth is not function-preserving by design: attention differences are "
                     "shown (status 'drift'), only the head structure is judged")
    if pairing.problem:
        notes.append(f"layers could not be paired: {pairing.problem}")
    not_judged = [r["layer"] for r in table if r["judged"] == "input differs"]
    if not_judged:
        notes.append(
            f"layers {not_judged} not judged: their input already differs from the reference "
            "(see functional identity for the first layer that breaks)"
        )

    if per_pos:
        figures["layers_judged"] = f"{len(judged)} of {len(table)}"
        figures["position0_max_rel_diff"] = per_pos[0]
        figures["later_positions_max_rel_diff"] = max(per_pos[1:])
        bad_pos = [t for t, v in enumerate(per_pos) if v > tol]
        figures["first_failing_position"] = bad_pos[0] if bad_pos else None
        figures["per_position_max_rel_diff"] = per_pos
    else:
        figures["layers_judged"] = f"0 of {len(table)}"

    failing = [(r, p) for r, p in judged if r["status"] == "FAIL"]
    columns = ["layer", "source", "judged", "pos0_rel", "later_rel", "max_rel", "status"]
    if not structure_ok or failing:
        where = None
        if not structure_ok:
            where = "config: " + ", ".join(f"{r['field']} {r['old']} -> {r['new']}" for r in rows if not r["ok"])
        elif failing:
            where = f"layer {failing[0][0]['layer']} (attention)"
        if diag is None:
            r0 = failing[0][0]
            layer = r0["layer"]
            qk = ctx.projection_rel(layer)
            bad_qk = [role for role, v in qk.items() if v > tol]
            if bad_qk:
                diag = "weight_expansion_bug"
                where = f"layer {layer} ({'/'.join(bad_qk)})"
                cause = (
                    f"a weight-expansion bug in {' and '.join(bad_qk)} of layer {layer}: its output "
                    f"(before RoPE) differs from the tiled source ("
                    + ", ".join(f"{k} rel diff {v:.2e}" for k, v in qk.items())
                    + "); position 0 attends only to itself, so it shows at positions > 0"
                )
            elif r0["pos0_rel"] <= tol:
                diag = "rope_position_break"
                cause = (
                    f"attention output of layer {layer} matches at position 0 (rel diff "
                    f"{r0['pos0_rel']:.2e}) but not at later positions (max rel diff {r0['later_rel']:.2e}) "
                    "while its q and k projections match"
                    + (" (" + ", ".join(f"{k} rel diff {v:.2e}" for k, v in qk.items()) + ")" if qk else "")
                    + ": the rotation or the attention scale differs"
                )
            else:
                diag = "weight_expansion_bug"
                where = f"layer {layer} (attention v/o)"
                cause = (
                    f"a weight-expansion bug in the attention of layer {layer} (attn_norm, v/o "
                    "projections or their biases): its output differs at every position including 0, "
                    "where RoPE does not rotate and q/k do not matter"
                    + (" (" + ", ".join(f"{k} rel diff {v:.2e}" for k, v in qk.items()) + ")" if qk else "")
                )
        elif per_pos and failing:
            cause = (cause or "") + (
                f"; measured: position 0 rel diff {figures['position0_max_rel_diff']:.2e}, "
                f"later positions up to {figures['later_positions_max_rel_diff']:.2e}"
            )
        summary = "attention breaks" + (
            f" at positions >= {figures['first_failing_position']}" if per_pos and figures.get("first_failing_position") is not None else ""
        ) + ("" if structure_ok else " and the head structure is inconsistent")
        if not failing:
            summary = "head structure inconsistent: " + (cause or "")
        return CheckResult(NAME, TITLE, FAILED, summary, tol, RULE, figures, table, columns,
                           diagnosis=diag, cause=cause, where=where or "config", notes=notes)
    if not judged:
        return CheckResult(
            NAME, TITLE, SKIPPED, "no layer could be judged: inputs already differ or have no reference",
            tol, RULE, figures, table, columns, notes=notes,
        )
    worst = max(r["max_rel"] for r, _ in judged)
    if any(r["status"] == "drift" for r, _ in judged):
        summary = f"head structure consistent; attention drifts by design (max rel diff {worst:.2e}, not judged)"
    else:
        summary = (
            f"head structure consistent; attention matches at all {T} positions in {len(judged)} "
            f"layer{'s' if len(judged) != 1 else ''} "
            f"(max rel diff {worst:.2e})"
        )
    return CheckResult(NAME, TITLE, PASSED, summary, tol, RULE, figures, table, columns, notes=notes)
