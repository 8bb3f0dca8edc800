"""Quick sanity check of one model: finite, sensible scales, loss where it should be.

One forward pass on the probe (no gradients; the model is left as it was), then:

* logits and loss finite (a NaN counts as +inf in the kernel max, so it fails);
* loss / ln(vocab_size): about 1 for an untrained model (uniform prediction). Always
  reported; judged only with ``expect_untrained=True`` (|ratio - 1| <= ``loss_ratio_tolerance``);
* per layer: activation scale of the residual stream (max and mean |h|), and the layer's
  update (max and mean |h_out - h_in|, and mean|update| / mean|h_in|);
* dead: mean |h| <= ``dead_threshold`` (the residual stream has vanished);
* exploding: max |h| > ``explode_threshold``, or mean |h| grows by more than
  ``growth_threshold`` times in one layer;
* layers whose update is exactly zero are noted (a freshly inserted identity layer does
  this by design), not failed.

Three kernel launches: hidden-state magnitudes, layer updates, logits.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .context import check_model
from .probe import check_probe, make_probe, run_probe, vocab_size
from .report import FAILED, PASSED, CheckResult
from .state import model_device
from .stats import abs_stats, diff_stats, relative

NAME, TITLE = "sanity", "Quick sanity check"


def quick_sanity_check(
    model: nn.Module,
    probe: torch.Tensor | None = None,
    *,
    expect_untrained: bool = False,
    loss_ratio_tolerance: float = 0.1,
    dead_threshold: float = 1e-6,
    explode_threshold: float = 1e4,
    growth_threshold: float = 100.0,
) -> CheckResult:
    """Finite logits and loss, loss vs ln(vocab), per-layer activation scales, dead/exploding layers.

    Args:
        model: any model growkit can verify (left as it was: mode, grads, attributes).
        probe: [B, T] token ids, T >= 2 (default: a seeded random [2, 16] probe).
        expect_untrained: judge the loss ratio (an untrained model predicts ~uniformly).
        loss_ratio_tolerance: allowed |loss / ln(V) - 1| when ``expect_untrained``.
        dead_threshold: mean |h| at or below this is a dead residual stream.
        explode_threshold: max |h| above this is exploding.
        growth_threshold: mean |h| growing by more than this factor in one layer is exploding.

    Returns:
        A :class:`CheckResult` named ``sanity`` (``.passed``, ``str()``, ``.to_json()``).
    """
    check_model(model)
    if probe is None:
        probe = make_probe(model)
    probe = check_probe(probe, [model]).to(model_device(model))
    run = run_probe(model, probe, attention=False, routers=False)
    hidden = torch.stack(run.hidden)  # [L+1, B, T, d]
    hmax, hmean = abs_stats(hidden)
    umax, umean = diff_stats(hidden[:-1], hidden[1:])
    lmax, lmean = abs_stats(run.logits[None])
    hmax, hmean, umax, umean = hmax.tolist(), hmean.tolist(), umax.tolist(), umean.tolist()
    V = vocab_size(model)
    loss = run.loss
    ratio = loss / math.log(V) if V > 1 else float("nan")

    table, dead, exploding, noop, nonfinite = [], [], [], [], []
    for j in range(len(hmax)):
        row = dict(output="embedding" if j == 0 else f"layer {j - 1}", max_abs=hmax[j], mean_abs=hmean[j],
                   update_mean=None, update_rel=None, flag="")
        if j > 0:
            row["update_mean"] = umean[j - 1]
            row["update_rel"] = relative(umean[j - 1], hmean[j - 1])
            if umax[j - 1] == 0.0:
                noop.append(j - 1)
                row["flag"] = "no-op"
        if not math.isfinite(hmax[j]):
            nonfinite.append(row["output"])
            row["flag"] = "NON-FINITE"
        elif hmean[j] <= dead_threshold:
            dead.append(row["output"])
            row["flag"] = "DEAD"
        elif hmax[j] > explode_threshold or (j > 0 and relative(hmean[j], hmean[j - 1]) > growth_threshold):
            exploding.append(row["output"])
            row["flag"] = "EXPLODING"
        table.append(row)
    logits_finite = math.isfinite(float(lmax[0]))
    loss_finite = math.isfinite(loss)
    figures = {
        "loss": loss,
        "ln_vocab": math.log(V),
        "loss_over_ln_vocab": ratio,
        "logits_max_abs": float(lmax[0]),
        "logits_mean_abs": float(lmean[0]),
        "activation_mean_abs_first_last": [hmean[0], hmean[-1]],
        "max_update_rel": max((r["update_rel"] for r in table[1:]), default=None),
    }
    notes = []
    if noop:
        notes.append(f"layers {noop} leave the residual stream unchanged (fresh identity layers do, by design)")
    if not expect_untrained:
        notes.append("loss ratio not judged (pass expect_untrained=True for an untrained model)")
    columns = ["output", "max_abs", "mean_abs", "update_mean", "update_rel", "flag"]
    rule = (f"finite; mean|h| > {dead_threshold:g}; max|h| <= {explode_threshold:g}; per-layer growth <= "
            f"{growth_threshold:g}x" + (f"; |loss/ln V - 1| <= {loss_ratio_tolerance:g}" if expect_untrained else ""))

    def fail(summary, diagnosis, where, cause=None):
        return CheckResult(NAME, TITLE, FAILED, summary, loss_ratio_tolerance if expect_untrained else None, rule,
                           figures, table, columns, diagnosis=diagnosis, cause=cause, where=where, notes=notes)

    if nonfinite or not logits_finite or not loss_finite:
        where = nonfinite[0] if nonfinite else ("logits" if not logits_finite else "loss")
        return fail(f"non-finite values (first at {where})", "non_finite", where)
    if dead:
        return fail(f"dead activations from {dead[0]}", "dead_layer", dead[0])
    if exploding:
        return fail(f"exploding activations at {exploding[0]}", "exploding_layer", exploding[0])
    if expect_untrained and abs(ratio - 1.0) > loss_ratio_tolerance:
        return fail(f"loss {loss:.3f} is {ratio:.3f} x ln({V}) for an untrained model", "loss_not_ln_vocab", "loss",
                    cause=f"an untrained model should predict about uniformly (loss ~ ln {V} = {math.log(V):.3f}); "
                          f"got {loss:.3f}: initialization too large or a broken output head")
    summary = (f"finite; loss {loss:.4g} = {ratio:.3f} x ln(V); activations "
               f"{hmean[0]:.3g} -> {hmean[-1]:.3g} (mean |h|); logits max |{float(lmax[0]):.3g}|")
    return CheckResult(NAME, TITLE, PASSED, summary, loss_ratio_tolerance if expect_untrained else None, rule,
                       figures, table, columns, notes=notes)
