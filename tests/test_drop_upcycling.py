"""Drop-Upcycling (``upcycle_to_moe(..., expert_reinit=r)``, Nakamura et al. 2025): in every
expert a random share r of the FFN units is re-drawn from the dense weights' statistics,
a different set per expert. Re-derived here: which entries change (the same units in the
gate rows, the up rows and the down columns, nothing else), how many, from what
distribution, and that the checks call the result not function-preserving instead of
passing or failing it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from growkit.growth import upcycle_to_moe
from growkit.growth.moe import check_expert_reinit, reinit_units
from growkit.growth.width import derive_seed
from growkit.models import ModelConfig, Transformer
from growkit.validate import ArgumentKindError
from growkit.verify import verify_functional_equivalence

from model_factory import randomize_, random_ids


def dense(d_ff: int = 24, seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab_size=61, d_model=16, n_layers=2, n_heads=2, d_ff=d_ff, mlp_bias=True)
    model = Transformer(cfg)
    return randomize_(model, seed=seed)  # norms and biases too: a unit left out cannot hide


def changed(a: torch.Tensor, b: torch.Tensor, dim: int) -> list[int]:
    """The indices along ``dim`` of a 2-d slice where ``a`` and ``b`` differ anywhere."""
    diff = a != b
    if diff.dim() == 1:
        return diff.nonzero().flatten().tolist()
    return diff.any(dim=1 - dim).nonzero().flatten().tolist()


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_the_same_units_change_in_gate_up_and_down_and_nothing_else(fraction):
    model = dense()
    exact = upcycle_to_moe(model, 4, 2, seed=3)
    drop = upcycle_to_moe(model, 4, 2, seed=3, expert_reinit=fraction)
    f = model.config.d_ff
    n = round(fraction * f)
    for layer in range(model.config.n_layers):
        a, b = exact.layers[layer].mlp.experts, drop.layers[layer].mlp.experts
        want = reinit_units(f, 4, fraction, derive_seed(3, f"expert_reinit.layer{layer}"))
        sets = []
        for e in range(4):
            units = want[e].tolist()
            assert len(units) == n
            # every re-drawn entry differs (a float drawn equal to the old one: probability 0)
            assert changed(a.gate_proj[e], b.gate_proj[e], 0) == units
            assert changed(a.up_proj[e], b.up_proj[e], 0) == units
            assert changed(a.down_proj[e], b.down_proj[e], 1) == units
            assert changed(a.gate_bias[e], b.gate_bias[e], 0) == units
            assert changed(a.up_bias[e], b.up_bias[e], 0) == units
            # the units kept are the dense model's, bit for bit
            kept = [i for i in range(f) if i not in units]
            assert torch.equal(b.gate_proj[e][kept], model.layers[layer].mlp.gate_proj.weight[kept])
            assert torch.equal(b.down_proj[e][:, kept], model.layers[layer].mlp.down_proj.weight[:, kept])
            sets.append(units)
        assert torch.equal(a.down_bias, b.down_bias)  # a residual-width bias has no units
        if fraction < 1:
            assert len({tuple(s) for s in sets}) == 4, "each expert needs its own set of units"
    # routers, attention, norms, embeddings: untouched (the same seed draws the same router)
    exact_params = dict(exact.named_parameters())
    for name, p in drop.named_parameters():
        if ".experts." not in name:
            assert torch.equal(p, exact_params[name]), name


def test_fresh_units_follow_the_dense_statistics():
    model = dense(d_ff=512)
    drop = upcycle_to_moe(model, 2, 1, seed=0, expert_reinit=1.0)
    for layer in range(model.config.n_layers):
        for role in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(model.layers[layer].mlp, role).weight
            fresh = getattr(drop.layers[layer].mlp.experts, role)
            assert not torch.equal(fresh[0], w) and not torch.equal(fresh[0], fresh[1])
            # 16 * 512 draws per expert: mean within 4 standard errors, std within 5%
            assert abs(fresh.mean().item() - w.mean().item()) < 4 * w.std().item() / fresh.numel() ** 0.5
            assert fresh.std().item() == pytest.approx(w.std().item(), rel=0.05)


def test_seeded_and_device_independent_units():
    model = dense()
    a = upcycle_to_moe(model, 4, 2, seed=5, expert_reinit=0.5)
    b = upcycle_to_moe(model, 4, 2, seed=5, expert_reinit=0.5)
    c = upcycle_to_moe(model, 4, 2, seed=6, expert_reinit=0.5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.layers[0].mlp.experts.gate_proj, c.layers[0].mlp.experts.gate_proj)
    # each layer draws its own units
    assert reinit_units(24, 4, 0.5, derive_seed(5, "expert_reinit.layer0"))[0].tolist() != \
        reinit_units(24, 4, 0.5, derive_seed(5, "expert_reinit.layer1"))[0].tolist()


def test_zero_is_the_exact_upcycling():
    model = dense()
    a = upcycle_to_moe(model, 4, 2, seed=1)
    b = upcycle_to_moe(model, 4, 2, seed=1, expert_reinit=0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert b.growth_records[-1].function_preserving


def test_the_check_reports_the_drift_instead_of_judging_it():
    model = dense()
    ids = random_ids(vocab_size=61)
    drop = upcycle_to_moe(model, 4, 2, seed=1, expert_reinit=0.5)
    record = drop.growth_records[-1]
    assert not record.function_preserving and record.settings["expert_reinit"] == 0.5
    assert any("Drop-Upcycling" in note for note in record.notes)
    report = verify_functional_equivalence(model, drop, ids, torch.device("cpu"))
    check = report["functional_identity"]
    assert check.status == "SKIPPED" and "by design" in check.summary, check
    assert check.figures["logits_rel_diff"] > 1e-3  # the drift is measured, and it is real
    assert any("Drop-Upcycling" in note for note in check.notes)
    exact = upcycle_to_moe(model, 4, 2, seed=1)
    assert verify_functional_equivalence(model, exact, ids, torch.device("cpu")).passed


def test_hf_mixtral_fused_experts_redraw_whole_units():
    pytest.importorskip("transformers")  # the hf extra
    from hf_zoo import tiny_model

    model = tiny_model("llama")
    exact = upcycle_to_moe(model, 4, 2, seed=2)
    drop = upcycle_to_moe(model, 4, 2, seed=2, expert_reinit=0.5)
    f = model.config.intermediate_size
    for layer in range(model.config.num_hidden_layers):
        a, b = exact.model.layers[layer].mlp.experts, drop.model.layers[layer].mlp.experts
        want = reinit_units(f, 4, 0.5, derive_seed(2, f"expert_reinit.layer{layer}"))
        for e in range(4):
            units = want[e].tolist()
            # transformers 5 stores Mixtral's experts fused: gate_up_proj [E, 2 f, d] (gate
            # rows, then up rows), down_proj [E, d, f]
            assert changed(a.gate_up_proj[e][:f], b.gate_up_proj[e][:f], 0) == units
            assert changed(a.gate_up_proj[e][f:], b.gate_up_proj[e][f:], 0) == units
            assert changed(a.down_proj[e], b.down_proj[e], 1) == units


def test_qwen2_moe_shared_expert_is_not_redrawn():
    pytest.importorskip("transformers")
    from hf_zoo import tiny_model

    model = tiny_model("qwen2")
    exact = dict(upcycle_to_moe(model, 4, 2, seed=2).named_parameters())
    drop = upcycle_to_moe(model, 4, 2, seed=2, expert_reinit=0.5)
    differ = [n for n, p in drop.named_parameters() if not torch.equal(p, exact[n])]
    assert differ and all(".mlp.experts." in n for n in differ), differ


@pytest.mark.parametrize("value, error", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                          ("0.5", ArgumentKindError), (True, ArgumentKindError)])
def test_bad_fractions_are_refused_by_name(value, error):
    with pytest.raises(error, match="expert_reinit"):
        check_expert_reinit(value)
    with pytest.raises(error, match="expert_reinit"):
        upcycle_to_moe(dense(), 4, 2, expert_reinit=value)


def test_a_dense_model_of_odd_width_rounds_the_unit_count():
    model = dense(d_ff=7)
    drop = upcycle_to_moe(model, 3, 1, seed=0, expert_reinit=0.3)  # round(2.1) = 2 units
    exact = upcycle_to_moe(model, 3, 1, seed=0)
    for e in range(3):
        assert len(changed(exact.layers[0].mlp.experts.up_proj[e], drop.layers[0].mlp.experts.up_proj[e], 0)) == 2
    # configs are unchanged by re-drawing
    assert dataclasses.asdict(drop.config) == dataclasses.asdict(exact.config)


def test_train_what_growth_added_counts_every_redrawn_expert_as_new():
    """experts="first_old" keeps expert 0 as the dense MLP's frozen copy; after
    Drop-Upcycling expert 0 holds re-drawn random units, so it must train too (frozen, they
    would stay random for good). Widening afterwards keeps them new."""
    from growkit.growth import scale_bilaterally, trainable_mask

    model = dense()
    exact = trainable_mask(upcycle_to_moe(model, 4, 2), "new")
    assert not exact["layers.0.mlp.experts.gate_proj"][0].any()  # the dense MLP, kept
    assert exact["layers.0.mlp.experts.gate_proj"][1:].all()
    for grown in (upcycle_to_moe(model, 4, 2, expert_reinit=0.5),
                  scale_bilaterally(upcycle_to_moe(model, 4, 2, expert_reinit=0.5), 2, 1, 1e-2)):
        mask = trainable_mask(grown, "new")
        for name, m in mask.items():
            if ".experts." in name:
                assert m is True or bool(torch.as_tensor(m).all()), name
        assert mask["layers.0.attn.q_proj.weight"] is not True  # the rest keeps its old entries


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_in_chunks_equal_the_whole_tensor_ones(dtype):
    from growkit.growth.moe import _mean_std

    t = (torch.randn(37, 53, generator=torch.Generator().manual_seed(0)) * 3 + 2).to(dtype)
    want = (t.double().mean().item(), t.double().std().item())
    for chunk in (7, 100, 1 << 22):  # ragged last chunk, several, one
        mean, std = _mean_std(t, chunk=chunk)
        assert mean == pytest.approx(want[0], rel=1e-12) and std == pytest.approx(want[1], rel=1e-12)
    assert _mean_std(torch.ones(1)) == (1.0, 0.0)
