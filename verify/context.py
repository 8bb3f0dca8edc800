"""What the growth checks share: the probe runs, the layer pairing, the hidden-state comparison.

``run_growth_checks`` builds one :class:`Comparison` and hands it to every check, so the
four checks together cost one forward pass of the old model, one forward and one backward
pass of the new model, and a few fused reductions. Each public ``check_*`` function
builds its own when called alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from growkit.growth.adapters import get_adapter
from growkit.validate import real_number, whole_number

from .pairing import COPY, IDENTITY, Pairing, measured_scale, pair_layers, width_records_scale
from .probe import ProbeRun, check_probe, make_probe, run_probe, vocab_size
from .state import model_device
from .stats import abs_stats, diff_stats, relative

DEFAULT_TOLERANCE = 1e-4
# NOTE: a correct growth of a half-precision model is only as exact as its dtype: with the
# default noise, random models of 3-8 layers measured up to 2.4% (x2) and 10% (x3, where
# w/3 itself rounds) relative difference per layer in bfloat16, and 0.3% / 1.2% in float16
# (tests/test_verify.py::test_half_precision_growth_passes_by_default measures it).
# The bugs the checks exist for (a layer not tiled or not divided, router logits scaled,
# RoPE broken) are O(1) differences, so these still catch them.
DTYPE_TOLERANCES = {torch.float16: 5e-2, torch.bfloat16: 0.25}
TOLERANCE_RULE = "relative: max|diff| <= tolerance * max|reference| per layer"
# twins count as identical at or below this relative divergence (symmetry check)
DEFAULT_MIN_DIVERGENCE = 1e-6
# a layer whose top_k busiest experts take this share of the routing slots has collapsed
DEFAULT_COLLAPSE_SHARE = 0.9


def default_tolerance(*models: nn.Module) -> float:
    """The tolerance for the lowest-precision floating dtype among the models' parameters."""
    dtypes = {p.dtype for m in models for p in m.parameters() if p.is_floating_point()}
    return max([DEFAULT_TOLERANCE] + [DTYPE_TOLERANCES.get(d, DEFAULT_TOLERANCE) for d in dtypes])


def check_model(model, name: str = "model") -> None:
    """TypeError/ValueError naming ``name`` and what is accepted when growkit cannot verify
    ``model`` (not an nn.Module, or an architecture without a family table entry)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module (a growkit.models.Transformer or a "
                        f"supported transformers model), got {type(model).__name__}")
    try:
        get_adapter(model, "verification")
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def check_pair(old, new, names: tuple[str, str] = ("old_model", "new_model")) -> None:
    """Both models verifiable (:func:`check_model`) and sharing one vocabulary: growth never
    changes the vocabulary, so differing sizes mean the wrong pair of models."""
    check_model(old, names[0])
    check_model(new, names[1])
    v_old, v_new = vocab_size(old), vocab_size(new)
    if v_old != v_new:
        raise ValueError(
            f"{names[0]} has a vocabulary of {v_old} tokens and {names[1]} one of {v_new}: growth "
            f"keeps the vocabulary, so these cannot be source and grown model; pass the model "
            f"{names[1]} was grown from")


def check_scale_arg(scale_factor) -> int | None:
    if scale_factor is None:
        return None
    return whole_number(scale_factor, "scale_factor", min=1, hint="or None to read it from the models")


@dataclass
class HiddenComparison:
    """New hidden state j against old hidden state ``ref[j]`` tiled (j = 0: embedding).

    ``rel[j] = max_diff[j] / ref_max[j]``; ``ok[j]`` is ``rel[j] <= tolerance``; entries
    without a reference (stacked copies) are None. The logits likewise.
    """

    ref: list[int | None]
    max_diff: list[float | None]
    mean_diff: list[float | None]
    ref_max: list[float | None]
    rel: list[float | None]
    ok: list[bool | None]
    logits_max_diff: float
    logits_mean_diff: float
    logits_ref_max: float
    logits_rel: float
    logits_ok: bool


class Comparison:
    """An (old, new) pair on one probe, with lazily computed shared results: the context
    every growth check (``verify.checks.GROWTH_CHECKS``) reads.

    Every setting of the checks is checked here, once: the probe, ``tolerance``,
    ``scale_factor``, and the thresholds ``min_divergence`` (symmetry) and
    ``collapse_share`` (router)."""

    def __init__(
        self,
        old: nn.Module,
        new: nn.Module,
        probe: torch.Tensor | None,
        *,
        scale_factor: int | None = None,
        tolerance: float | None = None,
        min_divergence: float = DEFAULT_MIN_DIVERGENCE,
        collapse_share: float = DEFAULT_COLLAPSE_SHARE,
        min_len: int = 2,
    ) -> None:
        check_pair(old, new)
        self.old, self.new = old, new
        if probe is None:
            probe = make_probe(new)
        device = model_device(new)
        if model_device(old) != device:
            raise ValueError(
                f"the old model is on {model_device(old)} and the new one on {device}: move both to one "
                "device, or use run_growth_checks(..., device=...), which moves them and back"
            )
        self.probe = check_probe(probe, [old, new], min_len=min_len).to(device)
        self.tolerance = default_tolerance(old, new) if tolerance is None else real_number(tolerance, "tolerance", min=0)
        self.expected_scale = check_scale_arg(scale_factor)
        # the thresholds of the symmetry and router checks
        self.min_divergence = real_number(min_divergence, "min_divergence", min=0)
        self.collapse_share = real_number(collapse_share, "collapse_share", above=0, max=1)
        self.scale = measured_scale(old, new)
        self.whole = isinstance(self.scale, int) and self.scale >= 1
        self._old_run: ProbeRun | None = None
        self._new_run: ProbeRun | None = None
        self._pairing: Pairing | None = None
        self._hidden: HiddenComparison | None = None
        self._attention: dict[int, tuple[float, float]] | None = None
        self._attention_inputs = None
        self._attention_scale: dict[int, float] | None = None

    # ------------------------------------------------------------------ runs
    def old_run(self) -> ProbeRun:
        if self._old_run is None:
            self._old_run = run_probe(self.old, self.probe)
        return self._old_run

    def new_run(self, backward: bool = False) -> ProbeRun:
        if self._new_run is None or (backward and self._new_run.grads is None):
            self._new_run = run_probe(self.new, self.probe, backward=backward)
        return self._new_run

    @property
    def pairing(self) -> Pairing:
        if self._pairing is None:
            self._pairing = pair_layers(self.old, self.new)
        return self._pairing

    @property
    def by_design(self) -> bool:
        """True when the growth is not function-preserving by design (stack, independent noise)."""
        return not self.pairing.function_preserving

    @property
    def twin_scale(self) -> int:
        """The width scale the clones were made with (measured; 1 when not whole)."""
        if self.whole:
            return int(self.scale)
        return width_records_scale(self.new) or 1

    # ------------------------------------------------------------------ hidden states
    def hidden(self) -> HiddenComparison:
        """Every new hidden state against its tiled old reference: two launches in all."""
        if self._hidden is not None:
            return self._hidden
        if not self.whole:
            raise ValueError(f"new d_model is {self.scale} x the old: not a whole multiple")
        old_h, new_h = self.old_run().hidden, self.new_run().hidden
        pairing = self.pairing
        n = len(new_h)
        refs = [pairing.hidden_ref(j) for j in range(n)]
        judged = [j for j in range(n) if refs[j] is not None]
        mx = [None] * n
        mean = [None] * n
        ref_max = [None] * n
        if judged:
            old_stack = torch.stack([old_h[refs[j]] for j in judged])
            new_stack = torch.stack([new_h[j] for j in judged])
            dmax, dmean = diff_stats(old_stack, new_stack)
            amax, _ = abs_stats(old_stack)
            for i, j in enumerate(judged):
                mx[j], mean[j], ref_max[j] = float(dmax[i]), float(dmean[i]), float(amax[i])
        rel = [None if mx[j] is None else relative(mx[j], ref_max[j]) for j in range(n)]
        ok = [None if r is None else r <= self.tolerance for r in rel]
        old_logits = self.old_run().logits
        new_logits = self.new_run().logits
        lmax, lmean = diff_stats(old_logits[None], new_logits[None])
        lref, _ = abs_stats(old_logits[None])
        lrel = relative(float(lmax[0]), float(lref[0]))
        self._hidden = HiddenComparison(
            refs, mx, mean, ref_max, rel, ok,
            float(lmax[0]), float(lmean[0]), float(lref[0]), lrel, lrel <= self.tolerance,
        )
        return self._hidden

    def input_ok(self, layer: int) -> bool:
        """Does new layer ``layer`` receive (within tolerance) the input its reference got?"""
        if not self.whole:
            return False
        ok = self.hidden().ok[layer]
        return bool(ok)

    # ------------------------------------------------------------------ attention outputs
    def _attention_pairs(self) -> tuple[list, list, list]:
        """(pairs, references, new outputs) of every layer whose attention has a reference."""
        if self._attention_inputs is None:
            old_run, new_run = self.old_run(), self.new_run()
            pairs, refs, news = [], [], []
            for p in self.pairing.pairs:
                if p.kind == COPY or p.new not in new_run.attn or p.old not in old_run.attn:
                    continue
                new_out = new_run.attn[p.new]
                if p.kind == IDENTITY:  # an identity layer's attention adds 0 (o_proj or output norm zeroed)
                    d_old = new_out.shape[-1] // self.scale
                    refs.append(torch.zeros(*new_out.shape[:-1], d_old, dtype=new_out.dtype, device=new_out.device))
                else:
                    refs.append(old_run.attn[p.old])
                news.append(new_out)
                pairs.append(p)
            self._attention_inputs = (pairs, refs, news)
        return self._attention_inputs

    def attention_scale(self) -> dict[int, float]:
        """old layer -> max|its attention output| (one launch), the reference scale."""
        if self._attention_scale is None:
            old_run = self.old_run()
            layers = sorted(old_run.attn)
            self._attention_scale = {}
            if layers:
                amax, _ = abs_stats(torch.stack([old_run.attn[i] for i in layers]))
                self._attention_scale = dict(zip(layers, amax.tolist()))
        return self._attention_scale

    def attention(self) -> dict[int, tuple[float, float]]:
        """new layer -> (position 0, positions >= 1) relative max diff of its attention output.

        The reference is the paired old layer's attention output (o_proj output) tiled, zero
        for an identity layer; the scale is max|old attention output of the source layer|.
        Layers without a reference (stacked copies) are absent. Two launches (position 0 of
        every layer, then all later positions of every layer).
        """
        if self._attention is not None:
            return self._attention
        pairs, refs, news = self._attention_pairs()
        scale = self.attention_scale()
        self._attention = {}
        if not pairs:
            return self._attention
        ref, new = torch.stack(refs), torch.stack(news)  # [J, B, T, d], [J, B, T, s*d]
        first, _ = diff_stats(ref[:, :, :1], new[:, :, :1])
        T = ref.shape[2]
        later = diff_stats(ref[:, :, 1:], new[:, :, 1:])[0].tolist() if T > 1 else [0.0] * len(pairs)
        for p, a, b in zip(pairs, first.tolist(), later):
            sc = scale.get(p.old, 0.0)
            self._attention[p.new] = (relative(a, sc), relative(b, sc))
        return self._attention

    def attention_per_position(self, layers: list[int]) -> list[float]:
        """Per position: max over ``layers`` of the relative attention-output diff (one launch,
        one slot per position)."""
        pairs, refs, news = self._attention_pairs()
        scale = self.attention_scale()
        chosen = [i for i, p in enumerate(pairs) if p.new in set(layers)]
        if not chosen:
            return []
        # Put every reference on one scale: divide by the layer's scale before comparing.
        ref = torch.stack([refs[i] / max(scale.get(pairs[i].old, 0.0), 1e-30) for i in chosen])
        new = torch.stack([news[i] / max(scale.get(pairs[i].old, 0.0), 1e-30) for i in chosen])
        J, B, T, d = ref.shape
        # [J, B, T, d] -> [T, J*B, d]: one slot per position.
        ref = ref.permute(2, 0, 1, 3).reshape(T, J * B, d)
        new = new.permute(2, 0, 1, 3).reshape(T, J * B, new.shape[-1])
        mx, _ = diff_stats(ref, new)
        return mx.tolist()

    def projection_rel(self, layer: int) -> dict[str, float]:
        """Relative max diff of new layer ``layer``'s q and k projection outputs (pre-RoPE)
        against the tiled outputs of its paired old layer (computed on demand)."""
        p = self.pairing.pairs[layer]
        out = {}
        if p.kind == COPY or p.kind == IDENTITY or p.old is None:
            return out
        old_qk, new_qk = self.old_run().qk or {}, self.new_run().qk or {}
        for role in ("q_proj", "k_proj"):
            o, n = old_qk.get((role, p.old)), new_qk.get((role, layer))
            if o is None or n is None or n.shape[-1] % o.shape[-1] != 0:
                continue
            mx, _ = diff_stats(o[None], n[None])
            amax, _ = abs_stats(o[None])
            out[role] = relative(float(mx[0]), float(amax[0]))
        return out
