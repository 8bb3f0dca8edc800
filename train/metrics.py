"""Training FLOPs accounting and the run's ``metrics.jsonl`` log.

FLOPs (:func:`training_flops_per_token`) follow the usual dense-transformer estimate
(Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B)::

    flops/token = 6 * N_active + 12 * n_layers * (n_heads * head_dim) * seq_len

``6 * N_active``: one multiply-add (2 FLOPs) per active weight in the forward pass and
twice that in the backward pass. ``N_active`` counts every weight a token is multiplied
by: the attention and MLP projections, the router, the norm gains and the output matrix.
It leaves out the input embedding table (a lookup, not a matmul; a tied model still
counts the shared matrix once, as the output projection). In a mixture of experts a
token runs through ``top_k`` of the ``n_experts`` experts, so only that fraction of the
expert weights is counted.

``12 * n_layers * (n_heads * head_dim) * seq_len``: the attention scores ``QK^T`` and
the weighted sum ``AV`` (2 * 2 * T * H * hd FLOPs per token and layer forward, times 3
for forward + backward). As in PaLM, the full ``T x T`` score matrix is counted, not
halved for the causal mask. Softmax, norms' elementwise work, RoPE and the loss are not
counted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from growkit.files import atomic_write_text
from growkit.validate import whole_number

__all__ = [
    "parameter_counts",
    "training_flops_per_token",
    "MetricsLog",
    "read_metrics",
    "post_growth_spikes",
]


def parameter_counts(model_config) -> dict[str, int]:
    """Parameter counts of ``growkit.models.Transformer(model_config)``, from the config.

    Returns:
        ``total`` (every parameter, a tied matrix once), ``embedding`` (the input table),
        ``experts`` (all expert weights and biases), ``active`` (what one token is
        multiplied by; see the module docstring).
    """
    c = model_config
    d, f, L, V = c.d_model, c.d_ff, c.n_layers, c.vocab_size
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    attn = d * q_dim + 2 * d * kv_dim + q_dim * d
    if c.attn_bias:
        attn += q_dim + 2 * kv_dim + d
    mlp = 3 * d * f + ((2 * f + d) if c.mlp_bias else 0)
    norms = 2 * d
    # partial upcycling (ModelConfig.dense_layers): those layers keep a dense MLP
    n_moe = L - len(getattr(c, "dense_layers", ()) or ()) if c.n_experts > 0 else 0
    experts_per_layer = c.n_experts * mlp
    router = c.n_experts * d
    moe_total, moe_active = experts_per_layer + router, c.top_k * mlp + router
    embedding = V * d
    head = 0 if c.tie_embeddings else V * d
    total = embedding + head + L * (attn + norms) + n_moe * moe_total + (L - n_moe) * mlp + d
    # The output matrix is multiplied by every token, tied or not.
    active = L * (attn + norms) + n_moe * moe_active + (L - n_moe) * mlp + d + V * d
    return {
        "total": int(total),
        "embedding": int(embedding),
        "experts": int(n_moe * experts_per_layer),
        "active": int(active),
    }


def training_flops_per_token(model_config, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a ``seq_len``-token sequence.

    ``6 * N_active + 12 * n_layers * n_heads * head_dim * seq_len``; see the module
    docstring for what is counted. Multiply by ``batch_size * seq_len`` for one step.

    Args:
        model_config: A :class:`growkit.models.ModelConfig` (dense or MoE).
        seq_len: Tokens per training sequence.
    """
    seq_len = whole_number(seq_len, "seq_len", min=1)
    c = model_config
    n_active = parameter_counts(c)["active"]
    attention = 12 * c.n_layers * c.n_heads * c.head_dim * seq_len
    return float(6 * n_active + attention)


def post_growth_spikes(records: Iterable[dict[str, Any]],
                       phase_steps: dict[int, int]) -> dict[str, dict[str, Any]]:
    """The loss spike after each growth, from a run's ``metrics.jsonl`` records.

    For the growth into phase ``p``: the largest validation loss in the first quarter of
    phase ``p`` (evaluations at phase steps ``0 .. steps_p / 4``, the one right after the
    growth included) relative to the last validation loss before the growth::

        post_growth_spike = max_val_first_quarter / val_loss_before - 1

    A function-preserving growth starts at 0; a positive value is a rise after it.

    Args:
        records: ``metrics.jsonl`` records (:class:`MetricsLog`).
        phase_steps: Training steps of each phase, ``{2: cfg.phase2.steps, 3: ...}``.

    Returns:
        ``{"phase<p>": {...}}`` with ``post_growth_spike``, ``max_val_first_quarter``,
        ``max_at_step`` (phase step of that maximum), ``val_loss_before``,
        ``first_quarter_steps``, ``n_evals`` and ``complete`` (whether the run got past
        the first quarter), for each growth in the records.
    """
    records = list(records)
    out: dict[str, dict[str, Any]] = {}
    for g in records:
        if g.get("kind") != "growth" or g.get("val_loss_before") is None:
            continue
        p = g["phase"]
        quarter = phase_steps.get(p, 0) / 4
        evals = [r for r in records if r.get("kind") == "eval" and r.get("phase") == p
                 and r.get("val_loss") is not None and 0 <= r["step"] <= quarter]
        if not evals:
            continue
        top = max(evals, key=lambda r: r["val_loss"])
        before = g["val_loss_before"]
        reached = max((r["step"] for r in records
                       if r.get("phase") == p and r.get("step") is not None), default=0)
        out[f"phase{p}"] = {
            "event": g.get("event"),
            "global_step": g.get("global_step"),
            "val_loss_before": before,
            "max_val_first_quarter": top["val_loss"],
            "max_at_step": top["step"],
            "post_growth_spike": top["val_loss"] / before - 1 if before else None,
            "first_quarter_steps": quarter,
            "n_evals": len(evals),
            "complete": reached >= quarter,
        }
    return out


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; a torn last line (a killed writer) is skipped."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # only the last line can be torn; nothing valid follows it
    return out


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line, flushed per record.

    It is the one file of a run that is appended to rather than replaced, so a crash can
    tear its last line; checkpoints store how many records they cover and a resumed
    run rewrites the file (atomically) to exactly that many before appending again, so
    the log of a resumed run equals the uninterrupted one's.

    Every record has the same keys (:data:`KEYS`); values that do not apply are null.
    ``kind`` is ``"train"`` (loss of one step; ``tokens_per_s`` over the last log
    interval), ``"eval"`` (``val_loss``) or ``"growth"`` (``event`` names the operator,
    ``val_loss_before`` is the last validation loss before the growth, ``val_loss`` the
    first after it, ``val_rel_change`` their relative difference) or ``"monitor"``
    (GrowthMonitor on a grown model: ``min_twin_divergence`` of the clones,
    ``router_min_entropy`` and ``router_max_topk_share`` over the MoE layers,
    ``monitor_warnings``, ``monitor_s`` the tick's time). ``flops`` and
    ``tokens_seen`` are cumulative over the run; ``elapsed_s`` is training wall time.
    """

    KEYS = ("kind", "phase", "step", "global_step", "loss", "ce_loss", "aux_loss",
            "val_loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "flops",
            "elapsed_s", "event", "val_loss_before", "val_rel_change", "min_twin_divergence",
            "router_min_entropy", "router_max_topk_share", "monitor_warnings", "monitor_s")

    def __init__(self, path: str | os.PathLike, keep: int | None = None) -> None:
        """Opens ``path``; ``keep`` truncates it to its first ``keep`` records (resume)."""
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if keep is not None:
            old = read_metrics(self.path)
            if len(old) < keep:
                raise ValueError(
                    f"{self.path} holds {len(old)} records but the checkpoint covers {keep}; "
                    "the run directory is damaged")
            self.records = old[:keep]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        elif self.path.exists() and self.path.stat().st_size > 0:
            raise ValueError(f"{self.path} already exists; start a new run directory")
        self._f = open(self.path, "a", encoding="utf-8")

    def __len__(self) -> int:
        return len(self.records)

    def log(self, kind: str, **values: Any) -> dict[str, Any]:
        unknown = set(values) - set(self.KEYS)
        if unknown:
            raise KeyError(f"unknown metric keys {sorted(unknown)}")
        rec = {k: None for k in self.KEYS}
        rec.update(values, kind=kind)
        self.records.append(rec)
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        return rec

    def sync(self) -> None:
        """Flushes to disk (before a checkpoint records ``len(self)``)."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
