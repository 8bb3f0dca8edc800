"""Check results and the growth report: figures, verdicts, diagnoses, as text and JSON.

Every check returns a :class:`CheckResult`: its verdict (``PASSED``, ``FAILED`` or
``SKIPPED``), the figures it measured, the tolerance it judged them by and, when it
fails, the most likely cause and the fix, taken from :data:`TROUBLESHOOTING`.
:class:`GrowthReport` gathers the results of several checks; ``str(report)`` is the
readable text report (a section per check, then a summary line per check) and
``report.to_json()`` carries the same content for CI.

Non-finite floats are written to JSON as the strings ``"inf"``, ``"-inf"`` and ``"nan"``
(plain JSON has no such numbers).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

PASSED, FAILED, SKIPPED = "PASSED", "FAILED", "SKIPPED"
STATUSES = (PASSED, FAILED, SKIPPED)


@dataclass(frozen=True)
class Diagnosis:
    """One row of the troubleshooting table."""

    key: str
    symptom: str
    cause: str
    fix: str


_DIAGNOSES = [
    Diagnosis(
        "n_heads_not_scaled",
        "head_dim differs between the models; attention output matches at position 0 but "
        "not at later positions",
        "n_heads (and n_kv_heads) were not multiplied with d_model, so head_dim changed: "
        "RoPE rotates other pairs of dims and the 1/sqrt(head_dim) softmax scale changed",
        "grow with growkit.growth.grow_width, which multiplies d_model, n_heads and "
        "n_kv_heads by the scale and keeps head_dim (set head_dim explicitly in the config)",
    ),
    Diagnosis(
        "kv_heads_not_scaled",
        "n_kv_heads grew by another factor than n_heads and d_model",
        "the grouped-query mapping (query head i uses KV head i // (H/KV)) no longer pairs "
        "each query-head clone with the clone of its own KV head",
        "multiply n_kv_heads by the same scale as n_heads (grow_width does)",
    ),
    Diagnosis(
        "rope_theta_changed",
        "rope_theta differs between the models",
        "the rotation frequencies changed, so every position > 0 is rotated differently",
        "keep rope_theta from the source config",
    ),
    Diagnosis(
        "scale_mismatch",
        "d_model grew by another factor than the scale the check was asked for",
        "the grown model is not the width the caller expected (wrong model, or wrong "
        "scale_factor passed to the check)",
        "pass the scale the model was grown by (scale_factor=None reads it from the models)",
    ),
    Diagnosis(
        "rope_position_break",
        "attention output matches at position 0 but not at later positions, with head_dim, "
        "n_heads and rope_theta consistent and q/k projections matching",
        "q and k (before RoPE) match the tiled source, so the rotation or the attention scale "
        "differs: RoPE tables built for another head_dim or theta, or a different softmax scale",
        "build the RoPE tables from the unchanged head_dim and rope_theta; keep the "
        "1/sqrt(head_dim) attention scale",
    ),
    Diagnosis(
        "router_not_divided",
        "router logits of the grown model are about scale_factor times the source's",
        "router weights not divided by the scale: the router's input is the tiled hidden "
        "state, so [W, W] doubles every logit, sharpening the softmax toward collapse",
        "divide the router's input blocks by s: [W/s, ..., W/s] (grow_width does; "
        "hyperclone_weight(W, s, 'router'))",
    ),
    Diagnosis(
        "router_mismatch",
        "router logits differ from the source's on the same input",
        "a weight-expansion bug in the router of the named layer",
        "regrow the router with hyperclone_weight(W, s, 'router') ([W/s, ..., W/s])",
    ),
    Diagnosis(
        "routing_collapsed",
        "the top_k busiest experts take almost all routing slots (>= collapse_share) in the "
        "grown model but not in the source",
        "router logits too large (undivided router, or a router initialized with a large "
        "std), so top-k always picks the same experts",
        "divide the router by the width scale; upcycle with a small router_std (0.02)",
    ),
    Diagnosis(
        "noise_too_small",
        "clones are identical in both weights and gradients",
        "noise_std too small (or 0): exact clones receive identical gradients forever and "
        "can never learn different features, so the added width is wasted",
        "grow with noise_std > 0, e.g. grow_width(model, s, noise_std=1e-5); zero-sum noise "
        "keeps the function exact",
    ),
    Diagnosis(
        "experts_exchangeable",
        "two experts of an upcycled MoE layer have equal router rows and equal weights",
        "a router that cannot tell them apart (router_init='zero', or duplicated rows) over "
        "experts that are still copies of one MLP: every token gives them equal logits, so "
        "they receive equal gradients (or, where torch.topk breaks a tie at the top-k "
        "boundary, one of them none) and train as one expert",
        "start the router with distinct rows (router_init 'normal', 'orthogonal' or "
        "'hidden_pca'), or the experts apart (expert_noise_std, expert_reinit)",
    ),
    Diagnosis(
        "weight_expansion_bug",
        "the output of one layer (or of one of its projections) differs from the tiled "
        "source while the layer's input matches",
        "a weight-expansion bug in the named layer: one of its tensors is not the source "
        "tensor tiled by its role's rule (wrong tiling, missing 1/s on an input dim, or a "
        "corrupted tensor)",
        "compare that layer's tensors with growkit.growth.hyperclone_weight(source, s, role) "
        "and regrow",
    ),
    Diagnosis(
        "noise_amplified",
        "layer outputs drift from the tiled source, more with depth, though every tensor is "
        "the source tiled plus the recorded zero-sum noise, and the same model with that "
        "noise averaged out matches the source",
        "a zero-sum noise too large for this width and depth: it cancels only in exact "
        "arithmetic, and each projection multiplies the rounding differences between clones "
        "by its noise (a gain of about noise_std * sqrt(fan_in)), so they grow layer by layer",
        "regrow with a smaller noise_std (a few times smaller; the growth is exact in "
        "mathematics, so no tensor needs fixing)",
    ),
    Diagnosis(
        "embedding_not_tiled",
        "the embedding output differs from the tiled source embedding",
        "the token embedding was not tiled along d_model (or was divided by s: it has no "
        "input dim)",
        "tile the embedding [V, d] -> [V, s*d] without dividing",
    ),
    Diagnosis(
        "identity_layer_not_identity",
        "an inserted identity layer changes the hidden state",
        "the new layer's residual-writing projections (attention output, MLP/expert down "
        "projection and their biases) are not all zero",
        "zero every residual-writing projection of the new layer (grow_depth(mode='identity'))",
    ),
    Diagnosis(
        "head_mismatch",
        "every hidden state matches but the logits differ",
        "the final norm, the LM head (missing 1/s on its input dim) or the logit scale of a "
        "tied model",
        "tile the final norm, use [W/s, ..., W/s] for the LM head, and for tied embeddings "
        "set config.logit_scale = old / s",
    ),
    Diagnosis(
        "layers_unpaired",
        "the models have different depths and the new layers cannot be paired with the old",
        "the grown model carries no growth_records and its extra layers are not identity "
        "layers (residual-writing projections not zero)",
        "check a model returned by growkit.growth (it carries growth_records), or grow with "
        "grow_depth(mode='identity')",
    ),
    Diagnosis(
        "width_not_whole",
        "new d_model is not a whole multiple of the old d_model",
        "the grown model is not a width-grown copy of the source",
        "grow with a whole scale factor (2, 3, 4, ...)",
    ),
    Diagnosis(
        "non_finite",
        "NaN or inf in the logits, hidden states or loss",
        "a non-finite weight, an overflow (fp16/bf16), or a division by zero in growth",
        "find the first layer with a non-finite max in the table and check its weights",
    ),
    Diagnosis(
        "dead_layer",
        "the residual stream's activations are near zero from this layer on",
        "zeroed embedding or layers that cancel the residual stream",
        "check the embedding and the named layer's weights",
    ),
    Diagnosis(
        "exploding_layer",
        "activations grow by a large factor in one layer or exceed the absolute limit",
        "a weight scaled up by mistake (a missing 1/s) or a diverged training run",
        "check the named layer's weights; compare with the source model",
    ),
    Diagnosis(
        "loss_not_ln_vocab",
        "an untrained model's loss is far from ln(vocab_size)",
        "initialization too large (logits not near uniform) or a broken output head",
        "initialize weights with a small std (0.02) and check the LM head",
    ),
]

TROUBLESHOOTING: dict[str, Diagnosis] = {d.key: d for d in _DIAGNOSES}


def jsonable(value: Any) -> Any:
    """A JSON-safe copy: tensors to lists, non-finite floats to strings, tuples to lists."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def fmt(value: Any) -> str:
    """Compact text form of a figure."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def _table_text(rows: list[dict], columns: list[str], indent: str = "  ") -> list[str]:
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [indent + "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    for row in cells:
        lines.append(indent + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return lines


@dataclass
class CheckResult:
    """The outcome of one check.

    Attributes:
        name: machine name (``rope_integrity``, ``router_scaling``, ``symmetry_breaking``,
            ``functional_identity``, ``sanity``).
        title: human name (``RoPE integrity``...).
        status: ``PASSED``, ``FAILED`` or ``SKIPPED``.
        summary: one line saying what was found.
        tolerance: the number the figures were judged by (None when nothing is judged
            against a number).
        tolerance_rule: how ``tolerance`` is applied, in words.
        figures: the headline figures (JSON-safe values).
        table: per-layer (or per-tensor) rows; ``columns`` are the keys printed.
        diagnosis: key of the :data:`TROUBLESHOOTING` row that explains a failure.
        cause, fix: the specific cause and fix (filled from the diagnosis, with details).
        where: where the failure was found (``"layer 1 (MLP)"``).
        notes: anything else worth reading (by-design skips, warnings).
        details: finer rows (e.g. one per tensor) kept for JSON, not printed.
        seconds: wall time the check took (its share of shared passes not included).
    """

    name: str
    title: str
    status: str
    summary: str
    tolerance: float | None = None
    tolerance_rule: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    diagnosis: str | None = None
    cause: str | None = None
    fix: str | None = None
    where: str | None = None
    notes: list[str] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.diagnosis is not None:
            if self.diagnosis not in TROUBLESHOOTING:
                raise ValueError(f"unknown diagnosis {self.diagnosis!r}")
            d = TROUBLESHOOTING[self.diagnosis]
            self.cause = self.cause or d.cause
            self.fix = self.fix or d.fix

    @property
    def passed(self) -> bool:
        """True unless FAILED (a SKIPPED check does not fail the report)."""
        return self.status != FAILED

    @property
    def skipped(self) -> bool:
        return self.status == SKIPPED

    def to_dict(self) -> dict[str, Any]:
        return jsonable({
            "name": self.name,
            "title": self.title,
            "status": self.status,
            "passed": self.passed,
            "summary": self.summary,
            "tolerance": self.tolerance,
            "tolerance_rule": self.tolerance_rule,
            "figures": self.figures,
            "columns": self.columns,
            "table": self.table,
            "diagnosis": self.diagnosis,
            "cause": self.cause,
            "fix": self.fix,
            "where": self.where,
            "notes": self.notes,
            "details": self.details,
            "seconds": self.seconds,
        })

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def render(self, number: int | None = None) -> str:
        """The text section of this check."""
        head = f"{number}. " if number is not None else ""
        lines = [f"--- {head}{self.title}: {self.status} ---", self.summary]
        if self.tolerance is not None:
            rule = f" ({self.tolerance_rule})" if self.tolerance_rule else ""
            lines.append(f"tolerance: {fmt(self.tolerance)}{rule}")
        elif self.tolerance_rule:
            lines.append(f"judged by: {self.tolerance_rule}")
        if self.figures:
            lines.append("figures:")
            width = max(len(k) for k in self.figures)
            for k, v in self.figures.items():
                lines.append(f"  {k.ljust(width)}  {fmt(v)}")
        if self.table and self.columns:
            lines.append("per layer:")
            lines.extend(_table_text(self.table, self.columns))
        if self.status == FAILED:
            if self.where:
                lines.append(f"where: {self.where}")
            if self.cause:
                lines.append(f"likely cause: {self.cause}")
            if self.fix:
                lines.append(f"fix: {self.fix}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def summary_line(self, width: int = 28) -> str:
        """``<title> .... <STATUS>`` (a skipped check gives its reason)."""
        dots = "." * max(2, width - len(self.title))
        line = f"{self.title} {dots} {self.status}"
        if self.status == SKIPPED:
            line += f" ({self.summary})"
        elif self.status == FAILED and self.where:
            line += f" ({self.where})"
        return line

    def __str__(self) -> str:
        return self.render()


@dataclass
class GrowthReport:
    """Results of several checks on one (old, new) pair.

    ``passed`` is True when no check FAILED; ``report["router_scaling"]`` gives one
    check's result; ``str(report)`` is the text report; ``to_json()`` the same for CI.
    """

    title: str
    checks: list[CheckResult]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == FAILED]

    def __getitem__(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; have {[c.name for c in self.checks]}")

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for c in self.checks)

    def __iter__(self):
        return iter(self.checks)

    def summary(self) -> str:
        """One line per check with its name and PASSED, FAILED or SKIPPED, then the verdict."""
        width = max([len(c.title) for c in self.checks] + [20]) + 4
        lines = [c.summary_line(width) for c in self.checks]
        counts = {s: sum(c.status == s for c in self.checks) for s in STATUSES}
        verdict = PASSED if self.passed else FAILED
        lines.append(
            f"Overall: {verdict} ({counts[PASSED]} passed, {counts[FAILED]} failed, "
            f"{counts[SKIPPED]} skipped)"
        )
        return "\n".join(lines)

    def render(self) -> str:
        lines = [f"=== {self.title} ==="]
        for k, v in self.meta.items():
            if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
                lines.append(f"{k}:")
                lines.extend(f"  {x}" for x in v)
            elif isinstance(v, dict):
                lines.append(f"{k}: " + ", ".join(f"{kk} {fmt(vv)}" for kk, vv in v.items()))
            else:
                lines.append(f"{k}: {fmt(v)}")
        for i, c in enumerate(self.checks, 1):
            lines.append("")
            lines.append(c.render(i))
        lines.append("")
        lines.append("=== Summary ===")
        lines.append(self.summary())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    def to_dict(self) -> dict[str, Any]:
        return jsonable({
            "title": self.title,
            "passed": self.passed,
            "meta": self.meta,
            "summary": {c.name: c.status for c in self.checks},
            "checks": [c.to_dict() for c in self.checks],
        })

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def print(self) -> None:
        print(self.render())
