"""Tests of growkit.verify: every check passes clean growth and catches its planted bug.

Tiny models (d_model 32, 2 layers, probe [2, 16]) with random weights everywhere (norm gains
1 + 0.2 * randn, biases too), so a forgotten bias or norm cannot hide. The kernels run
through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so reports are
computed once per module and shared between tests.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import warnings

import pytest
import torch

import growkit.growth as growth
from growkit.growth import grow_depth, upcycle_to_moe
from growkit.models import ModelConfig, Transformer, model_from_state_dict
from growkit.verify import (
    DEFAULT_TOLERANCE,
    DTYPE_TOLERANCES,
    FAILED,
    PASSED,
    SKIPPED,
    TROUBLESHOOTING,
    CheckResult,
    GrowthMonitor,
    GrowthReport,
    GrowthWarning,
    check_functional_identity_layerwise,
    check_rope_integrity,
    check_router_scaling,
    check_symmetry_breaking,
    default_tolerance,
    detailed_growth_check,
    make_probe,
    quick_sanity_check,
    run_growth_checks,
    verify_functional_equivalence,
)

CHECKS = ["rope_integrity", "router_scaling", "symmetry_breaking", "functional_identity"]


def _torch_path(fn):
    """Run a growth operator on the torch reference path of its kernels.

    These tests are about the checks; the hyperclone kernel has its own tests, and its torch
    path gives the same tensors, so growing through the interpreter would only cost time.
    """

    def wrapped(*args, **kwargs):
        old = os.environ.get("GROWKIT_BACKEND")
        os.environ["GROWKIT_BACKEND"] = "torch"
        try:
            return fn(*args, **kwargs)
        finally:
            if old is None:
                del os.environ["GROWKIT_BACKEND"]
            else:
                os.environ["GROWKIT_BACKEND"] = old

    return wrapped


grow_width = _torch_path(growth.grow_width)
scale_bilaterally = _torch_path(growth.scale_bilaterally)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                max_seq_len=32, attn_bias=True, mlp_bias=True)
    base.update(overrides)
    return ModelConfig(**base)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=gen)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * r)
        elif "bias" in name:
            p.copy_(0.1 * r)
        elif p.dim() >= 2:
            p.copy_(r / math.sqrt(p.shape[-1]))
        else:
            p.copy_(r)
    return model


def statuses(report: GrowthReport) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


@pytest.fixture(scope="module")
def dense():
    return randomize_(Transformer(tiny_config()), seed=0)


@pytest.fixture(scope="module")
def moe():
    return randomize_(Transformer(tiny_config(n_experts=4, top_k=2, d_ff=16)), seed=1)


@pytest.fixture(scope="module")
def moe_width(moe):
    """The MoE model grown x2 in width (deep-copy it before changing it)."""
    return grow_width(moe, 2)


@pytest.fixture(scope="module")
def probe(dense):
    return make_probe(dense, batch=2, seq_len=16, seed=0)


@pytest.fixture(scope="module")
def width_pair(dense):
    return dense, grow_width(dense, 2)


@pytest.fixture(scope="module")
def width_report(width_pair, probe):
    old, new = width_pair
    return run_growth_checks(old, new, probe, "cpu", scale_factor=2)


# ----------------------------------------------------------------------------------------
# clean growth of each kind passes
# ----------------------------------------------------------------------------------------
def test_width_growth_passes_with_figures(width_report):
    assert width_report.passed
    assert statuses(width_report) == {
        "rope_integrity": PASSED, "router_scaling": SKIPPED,
        "symmetry_breaking": PASSED, "functional_identity": PASSED,
    }
    ident = width_report["functional_identity"]
    assert ident.tolerance == 1e-4
    assert ident.figures["max_rel_diff_hidden"] < 1e-5
    assert [r["output"] for r in ident.table] == ["embedding", "layer 0", "layer 1", "logits"]
    rope = width_report["rope_integrity"]
    assert len(rope.figures["per_position_max_rel_diff"]) == 16
    sym = width_report["symmetry_breaking"]
    # every layer's attention (q, k, v, o) and MLP (gate, up, down), plus the LM head
    assert sym.figures["tensors_judged"] == 2 * 7 + 1
    assert sym.figures["min_weight_rel_div"] > 1e-5
    least = sym.figures["least_diverged"]
    assert max(least["weight_rel_div"], least["grad_rel_div"]) > sym.tolerance
    assert "least diverged: " in sym.summary and "0.00e+00" not in sym.summary
    assert "dense" in width_report["router_scaling"].summary


def test_report_text_and_json(width_report):
    text = str(width_report)
    for i, title in enumerate(["RoPE integrity", "Router scaling", "Symmetry breaking", "Functional identity"], 1):
        assert f"--- {i}. {title}:" in text
    summary = text.split("=== Summary ===")[1].strip().splitlines()
    assert re.match(r"RoPE integrity \.+ PASSED$", summary[0])
    assert re.match(r"Router scaling \.+ SKIPPED \(", summary[1])
    assert re.match(r"Symmetry breaking \.+ PASSED$", summary[2])
    assert re.match(r"Functional identity \.+ PASSED$", summary[3])
    assert summary[4].startswith("Overall: PASSED")
    data = json.loads(width_report.to_json())
    assert data["passed"] is True
    assert data["summary"] == statuses(width_report)
    by_name = {c["name"]: c for c in data["checks"]}
    assert set(by_name) == set(CHECKS)
    ident = by_name["functional_identity"]
    assert ident["tolerance"] == 1e-4 and "relative" in ident["tolerance_rule"]
    assert ident["table"][-1]["output"] == "logits"
    assert json.loads(width_report["symmetry_breaking"].to_json())["details"]


def test_identity_depth_passes_with_and_without_records(dense, probe):
    deep = grow_depth(dense, 2)
    report = run_growth_checks(dense, deep, probe, scale_factor=1)
    assert report.passed, str(report)
    assert statuses(report)["functional_identity"] == PASSED
    assert statuses(report)["symmetry_breaking"] == SKIPPED
    assert report["functional_identity"].figures["layer_pairing"] == "growth_records"
    # without growth_records the identity layers are found by their zero o/down projections
    del deep.growth_records
    result = check_functional_identity_layerwise(dense, deep, probe, tolerance=1e-4)
    assert result.status == PASSED
    assert result.figures["layer_pairing"] == "inferred"
    sources = [r["source"] for r in result.table[1:-1]]
    assert sources == ["old layer 0", "identity after old 0", "old layer 1", "identity after old 1"]


def test_width_plus_identity_depth_passes(dense, probe):
    grown = scale_bilaterally(dense, 2, 1)  # width x2, then an identity layer after layer 1
    report = run_growth_checks(dense, grown, probe, scale_factor=2)
    assert report.passed, str(report)
    assert all(s == PASSED for n, s in statuses(report).items() if n != "router_scaling")
    # the identity layer (2): q/k/v/gate/up get no gradient and are judged by their weights;
    # its zeroed o/down projections have equal (zero) twins and are judged by their gradients
    sym = report["symmetry_breaking"]
    rows = {r["layer"]: r for r in sym.table}
    assert "q_proj" in rows[2]["zero_grad"] and rows[2]["status"] == "ok"
    assert rows[0]["zero_grad"] == "-"
    assert report["functional_identity"].table[3]["source"] == "identity after old 1"


def test_identity_blocks_in_stacked_places_pass_and_a_planted_writer_fails(dense, probe):
    """stack_scale=0: identity blocks on top of the stack, each a copy of a layer it does not
    follow; an identity layer passes through what the layer before it produced."""
    grown = scale_bilaterally(dense, 2, 2, 1e-2, depth_mode="stack", stack_scale=0)
    report = run_growth_checks(dense, grown, probe, scale_factor=2)
    assert report.passed, str(report)
    ident = report["functional_identity"]
    assert ident.status == PASSED and ident.figures["layer_pairing"] == "growth_records"
    assert [r["source"] for r in ident.table[1:-1]] == [
        "old layer 0", "old layer 1", "identity after old 1 (copy of old 0)", "identity after old 1"]
    bad = copy.deepcopy(grown)
    with torch.no_grad():
        bad.layers[2].attn.o_proj.weight.normal_(0, 0.1)
    result = check_functional_identity_layerwise(dense, bad, probe, scale_factor=2)
    assert result.status == FAILED and result.diagnosis == "identity_layer_not_identity"
    assert result.where == "layer 2 (identity layer)"


def test_moe_upcycle_passes(dense, probe, capsys):
    moe_model = upcycle_to_moe(dense, 4, 2)
    assert detailed_growth_check(dense, moe_model, probe, "cpu", scale_factor=1) is True
    out = capsys.readouterr().out
    assert re.search(r"Functional identity \.+ PASSED", out)
    assert re.search(r"Router scaling \.+ PASSED", out)
    assert re.search(r"Symmetry breaking \.+ PASSED", out)  # expert clones, split by routing
    report = verify_functional_equivalence(dense, moe_model, probe, "cpu")
    assert capsys.readouterr().out == ""  # prints nothing unless asked
    assert report.passed and [c.name for c in report.checks] == ["functional_identity"]
    assert "Functional identity" in str(report) and json.loads(report.to_json())["passed"]
    verify_functional_equivalence(dense, copy.deepcopy(dense), probe, verbose=True)
    assert "Dense -> MoE" in capsys.readouterr().out


def test_stack_growth_is_skipped_by_design(dense, probe):
    stacked = grow_depth(dense, 2, mode="stack")
    ident = check_functional_identity_layerwise(dense, stacked, probe, scale_factor=1)
    report = GrowthReport("stack", [ident])
    assert report.passed
    assert ident.status == SKIPPED and "by design" in ident.summary
    assert ident.figures["logits_rel_diff"] > 1e-3  # the measured drift is shown
    assert [r["status"] for r in ident.table] == ["ok", "ok", "ok", "-", "-", "drift"]
    assert any("stack" in n for n in ident.notes)
    assert re.search(r"Functional identity \.+ SKIPPED \(not function-preserving by design", report.summary())


# ----------------------------------------------------------------------------------------
# planted bugs fail with the right diagnosis
# ----------------------------------------------------------------------------------------
def test_rope_check_catches_head_dim_change(probe):
    # MHA, so that position 0 (no rotation, attends only to itself) still matches exactly.
    old = randomize_(Transformer(tiny_config(n_kv_heads=4)), seed=3)
    good = grow_width(old, 2)
    bad_cfg = dataclasses.replace(good.config, n_heads=4, n_kv_heads=4, head_dim=16)  # n_heads not scaled
    bad = model_from_state_dict(bad_cfg, good.state_dict())
    result = check_rope_integrity(old, bad, probe)
    assert result.status == FAILED
    assert result.diagnosis == "n_heads_not_scaled"
    assert "head_dim" in result.where and "8 -> 16" in result.cause
    assert result.figures["position0_max_rel_diff"] <= 1e-5
    assert result.figures["later_positions_max_rel_diff"] > 1e-2
    assert result.figures["first_failing_position"] == 1
    assert result.fix == TROUBLESHOOTING["n_heads_not_scaled"].fix


def test_rope_check_names_a_broken_q_projection(width_pair, probe):
    old, good = width_pair
    bad = grow_width(old, 2)
    with torch.no_grad():
        bad.layers[1].attn.q_proj.weight.add_(0.05 * torch.randn_like(bad.layers[1].attn.q_proj.weight))
    result = check_rope_integrity(old, bad, probe)
    assert result.status == FAILED and result.diagnosis == "weight_expansion_bug"
    assert result.where == "layer 1 (q_proj)"


def test_scale_mismatch_is_reported(width_pair, probe):
    old, new = width_pair
    result = check_rope_integrity(old, new, probe, scale_factor=4)
    assert result.status == FAILED and result.diagnosis == "scale_mismatch"


def test_router_check_catches_undivided_router(moe, moe_width, probe):
    grown = copy.deepcopy(moe_width)
    with torch.no_grad():
        for layer in grown.moe_layers():
            layer.router.weight.mul_(2)  # left undivided: [W, W] instead of [W/2, W/2]
    result = check_router_scaling(moe, grown, probe, scale_factor=2, tolerance=1e-4)
    assert result.status == FAILED
    assert result.diagnosis == "router_not_divided"
    assert result.where == "layer 0 (router)"
    assert result.figures["magnitude_ratio_new_over_old"][0] == pytest.approx(2.0, rel=1e-4)
    assert "not divided" in result.cause


def _collapsed_moe() -> Transformer:
    """A MoE model whose routers send every token to experts 0 and 1 (a trained-in collapse)."""
    model = randomize_(Transformer(tiny_config(n_experts=4, top_k=2, d_ff=16)), seed=4)
    with torch.no_grad():
        model.embed.weight[:, 0] = 20.0  # every hidden state carries a large positive dim 0
        for block in model.layers:
            block.mlp_norm.weight[0] = 5.0
            block.mlp.router.weight[:, 0] = torch.tensor([4.0, 3.0, -3.0, -4.0])
    return model


def test_router_check_does_not_blame_growth_for_a_collapse_in_the_source(probe):
    old = _collapsed_moe()
    old_share = check_router_scaling(old, old, probe, scale_factor=1).table[0]["topk_share_new"]
    assert old_share >= 0.9  # the source's routing had collapsed before any growth
    # identity layers copy the collapsed routers: the same routing, not a growth bug
    new = grow_depth(old, 2, mode="identity", positions=[0, 1])
    result = check_router_scaling(old, new, probe, scale_factor=1)
    assert result.status == PASSED, result.summary
    copies = [r for r in result.table if r["source"].startswith("identity")]
    assert len(copies) == 2 and all(r["topk_share_new"] >= 0.9 for r in copies)
    # a copy whose routing collapses where the layer it copies did not still fails: layer
    # 0 adds a large dim 0 to its output, which its own router never sees, but its copy does
    src = randomize_(Transformer(tiny_config(n_experts=4, top_k=2, d_ff=16)), seed=4)
    with torch.no_grad():
        src.layers[0].mlp.experts.down_bias[:, 0] = 30.0
        src.layers[0].mlp_norm.weight[0] = 5.0
        src.layers[0].mlp.router.weight[:, 0] = torch.tensor([4.0, 3.0, -3.0, -4.0])
    assert check_router_scaling(src, src, probe, scale_factor=1).table[0]["topk_share_new"] < 0.9
    result = check_router_scaling(src, grow_depth(src, 1, mode="identity", positions=[0]), probe, scale_factor=1)
    assert result.status == FAILED and result.diagnosis == "routing_collapsed"
    assert [r["layer"] for r in result.table if r["status"] == "COLLAPSED"] == [1]


def test_router_check_on_identity_blocks_in_stacked_places(probe):
    """stack_scale=0 puts a copy of layer 0 after layer 1: it reads what old layer 1 read
    after it, so its reference load is the more concentrated of old layer 0's and old layer
    1's. A collapse neither had is still a failure."""
    src = randomize_(Transformer(tiny_config(n_experts=4, top_k=2, d_ff=16)), seed=4)
    with torch.no_grad():
        src.layers[0].mlp.experts.down_bias[:, 0] = 30.0  # layer 0 writes a large dim 0
        src.layers[0].mlp_norm.weight[0] = 5.0
        src.layers[0].mlp.router.weight[:, 0] = torch.tensor([4.0, 3.0, -3.0, -4.0])
        src.layers[1].mlp.router.weight[:, 0] = 0.0  # layer 1's router ignores that dim
    shares = [r["topk_share_new"] for r in check_router_scaling(src, src, probe, scale_factor=1).table]
    assert shares[0] < 0.9 and shares[1] < 0.9
    result = check_router_scaling(src, grow_depth(src, 2, mode="stack", stack_scale=0), probe, scale_factor=1)
    assert result.status == FAILED and result.diagnosis == "routing_collapsed"
    assert [r["layer"] for r in result.table if r["status"] == "COLLAPSED"] == [2]
    # old layer 1 routes that stream the same way (a collapse the source had): not blamed
    with torch.no_grad():
        src.layers[1].mlp_norm.weight[0] = 5.0
        src.layers[1].mlp.router.weight[:, 0] = torch.tensor([4.0, 3.0, -3.0, -4.0])
    assert check_router_scaling(src, src, probe, scale_factor=1).table[1]["topk_share_new"] >= 0.9
    result = check_router_scaling(src, grow_depth(src, 2, mode="stack", stack_scale=0), probe, scale_factor=1)
    assert result.status == PASSED, result.summary
    assert result.table[2]["source"] == "identity after old 1 (copy of old 0)"


def test_router_check_skips_dense_models(width_pair, probe):
    result = check_router_scaling(*width_pair, probe, scale_factor=2)
    assert result.status == SKIPPED and result.passed and "dense" in result.summary


def test_symmetry_check_catches_zero_noise(dense, probe):
    exact = grow_width(dense, 2, noise_std=0)
    result = check_symmetry_breaking(dense, exact, probe, scale_factor=2)
    assert result.status == FAILED
    assert result.diagnosis == "noise_too_small"
    assert result.figures["tensors_failing"] == result.figures["tensors_judged"] == 15
    assert result.where == "all layers"
    assert {r["status"] for r in result.table} == {"FAIL"}
    assert "noise_std" in result.fix
    # the old one-model call is refused with a message that says what changed
    with pytest.raises(TypeError, match="old_model, new_model"):
        check_symmetry_breaking(exact, probe)


@torch.no_grad()
def _make_exchangeable(model, scale, g, h, layer=None):
    """Average every noisy tensor with its copy whose clones g and h are exchanged (along
    the residual and unit dims, or, with ``layer``, that layer's attention heads only):
    the function is kept (both terms are exact growths), clones g and h are now symmetric."""
    from growkit.growth.adapters import get_adapter
    from growkit.verify import symmetry

    params = get_adapter(model, "verification").role_params(model)
    for name, pr, axes, judged in symmetry._items(model, scale, False):
        if not judged or (layer is not None and (pr.layer != layer or symmetry._space(pr.role) != "attention")):
            continue
        x = params[name]
        swapped = x
        for i in axes.swaps["unit" if layer is not None else ("both" if "both" in axes.swaps else "model")]:
            d, n = axes[i]
            block = x.shape[d] // n
            idx = torch.arange(x.shape[d]).view(n, block)
            idx[[g, h]] = idx[[h, g]]
            swapped = swapped.index_select(d, idx.reshape(-1))
        x.copy_((x + swapped) / 2)
    return model


@pytest.mark.parametrize("layer", [None, 1])
def test_symmetry_check_catches_exchangeable_clones(dense, probe, layer):
    """Clones 1 and 2 of a x3 growth made symmetric (the same noise on both), everywhere or
    in one layer's heads: each still differs from clone 0, which the per-tensor rule
    (twins against block 0) took for symmetry broken; they are exchangeable, so their
    gradients stay equal at every step, and the check fails naming them."""
    good = grow_width(dense, 3, noise_std=1e-2)
    bad = _make_exchangeable(copy.deepcopy(good), 3, 1, 2, layer)
    report = run_growth_checks(dense, bad, probe, "cpu", scale_factor=3)
    assert report["functional_identity"].passed  # the growth is still exact
    sym = report["symmetry_breaking"]
    assert sym.status == FAILED and sym.diagnosis == "noise_too_small", sym.render()
    assert sym.figures["tensors_failing"] == 0  # what the rule against block 0 alone saw
    found = {(e["space"], e["layer"], tuple(e["clones"])) for e in sym.figures["exchangeable_clones"]}
    if layer is None:
        assert ("residual", None, (1, 2)) in found and "residual stream" in sym.cause
    else:
        assert found == {("attention", 1, (1, 2))} and sym.where == "1"
        assert [r["status"] for r in sym.table] == ["ok", "FAIL", "ok"]
    assert all(e["clones"] == [1, 2] for e in sym.figures["exchangeable_clones"])
    assert check_symmetry_breaking(dense, good, probe, scale_factor=3).passed

    # one optimizer step on the symmetric model: clones 1 and 2 are still exchangeable
    bad.train()
    opt = torch.optim.Adam(bad.parameters(), lr=1e-2)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(bad(probe)[:, :-1].flatten(0, 1), probe[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    bad.eval()
    after = check_symmetry_breaking(dense, bad, probe, scale_factor=3, tolerance=1.0)
    assert {(e["space"], e["layer"]) for e in after.figures["exchangeable_clones"]} >= {
        (s, l) for s, l, _ in found}, after.render()


def test_identity_layers_are_not_exchangeable(dense, probe):
    """Identity layers in a widened model: their zeroed o/down projections read twin units
    with equal outputs, so those twins are equal in weights and gradients (a rule on twin
    pairs per tensor would flag them), but the units' q/k/v/up/gate rows differ by the
    noise: no clones are exchangeable."""
    grown = scale_bilaterally(dense, 2, 2)
    sym = check_symmetry_breaking(dense, grown, probe, scale_factor=2)
    assert sym.passed and sym.figures["exchangeable_clones"] == []
    o = next(r for r in sym.details if r["name"] == "layers.1.attn.o_proj.weight")
    assert o["weight_rel_div"] == 0.0 and o["swap_rel_div"]["unit:0-1"] == 0.0  # zeroed: unchanged by any swap
    q = next(r for r in sym.details if r["name"] == "layers.1.attn.q_proj.weight")
    assert q["swap_rel_div"]["unit:0-1"] > 1e-5


@pytest.mark.parametrize("k", [0, 1])
def test_identity_check_names_corrupted_layer(width_pair, probe, k):
    old, _ = width_pair
    bad = grow_width(old, 2)
    w = bad.layers[k].mlp.up_proj.weight
    with torch.no_grad():
        w.add_(0.01 * torch.randn_like(w))
    result = check_functional_identity_layerwise(old, bad, probe, scale_factor=2, tolerance=1e-4)
    assert result.status == FAILED
    assert result.diagnosis == "weight_expansion_bug"
    assert result.where == f"layer {k} (MLP)"
    assert result.figures["first_failing"] == f"layer {k}"
    statuses_by_row = [r["status"] for r in result.table]
    assert statuses_by_row[: k + 1] == ["ok"] * (k + 1) and statuses_by_row[k + 1] == "FAIL"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [2, 3])
def test_half_precision_growth_passes_by_default(dtype, scale):
    old = randomize_(Transformer(tiny_config(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_layers=4)),
                     seed=3).to(dtype)
    new = grow_width(old, scale)  # default noise
    probe = make_probe(old, batch=2, seq_len=16, seed=1)
    report = run_growth_checks(old, new, probe, "cpu", scale_factor=scale)
    assert report.passed, str(report)
    identity = report["functional_identity"]
    assert identity.tolerance == DTYPE_TOLERANCES[dtype] == default_tolerance(old, new)
    worst = max(identity.figures["max_rel_diff_hidden"], identity.figures["logits_rel_diff"])
    # the reason for the dtype's tolerance: float32's would have failed this correct growth
    assert worst > DEFAULT_TOLERANCE
    assert check_functional_identity_layerwise(old, new, probe, scale_factor=scale, tolerance=DEFAULT_TOLERANCE).status == FAILED
    # and it still catches a layer that was not divided by the scale
    bad = copy.deepcopy(new)
    with torch.no_grad():
        bad.layers[1].mlp.down_proj.weight.mul_(scale)
    result = check_functional_identity_layerwise(old, bad, probe, scale_factor=scale)
    assert result.status == FAILED and result.where.startswith("layer 1"), result.where


def test_identity_layer_that_is_not_an_identity(dense, probe):
    deep = grow_depth(dense, 1, positions=[0])
    with torch.no_grad():
        deep.layers[1].attn.o_proj.weight.normal_(0, 0.1)
    result = check_functional_identity_layerwise(dense, deep, probe, scale_factor=1)
    assert result.status == FAILED and result.diagnosis == "identity_layer_not_identity"
    assert result.where == "layer 1 (identity layer)"


# ----------------------------------------------------------------------------------------
# checks leave the models as they were, and use a few launches for any depth
# ----------------------------------------------------------------------------------------
def _snapshot(model):
    return dict(
        state={k: v.clone() for k, v in model.state_dict().items()},
        training=[m.training for m in model.modules()],
        requires_grad=[p.requires_grad for p in model.parameters()],
        grads=[(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        attrs=[getattr(m, "last_router_logits", "absent") for m in model.modules()],
    )


def _assert_same(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap["state"][k]), k
    assert [m.training for m in model.modules()] == snap["training"]
    assert [p.requires_grad for p in model.parameters()] == snap["requires_grad"]
    for p, (obj, val) in zip(model.parameters(), snap["grads"]):
        assert p.grad is obj
        if val is not None:
            assert torch.equal(p.grad, val)
    assert all(a is b for a, b in zip((getattr(m, "last_router_logits", "absent") for m in model.modules()),
                                      snap["attrs"]))


def test_width_grown_moe_passes_and_models_are_left_untouched(moe, moe_width, probe):
    old = moe
    new = copy.deepcopy(moe_width)
    new.train()
    new.layers[0].eval()  # mixed modes must come back as they were
    params = list(new.parameters())
    params[3].requires_grad_(False)
    for p in params[:5]:
        p.grad = torch.full_like(p, 0.5)  # a training loop's accumulated gradients
    new(probe)  # leaves last_router_logits from "training"
    old.eval()
    snaps = (_snapshot(old), _snapshot(new))
    report = run_growth_checks(old, new, probe, "cpu", 2)
    assert report.passed and all(s == PASSED for s in statuses(report).values()), str(report)
    router = report["router_scaling"]
    assert router.figures["layers_compared"] == 2
    assert router.figures["magnitude_ratio_new_over_old"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert report["symmetry_breaking"].figures["tensors_judged"] == 2 * 7 + 1  # experts included
    _assert_same(old, snaps[0])
    _assert_same(new, snaps[1])


def test_kernel_launches_do_not_grow_with_depth(monkeypatch, probe):
    import growkit.verify.context as context_mod
    import growkit.verify.stats as stats_mod

    monkeypatch.setenv("GROWKIT_BACKEND", "torch")  # counting calls; the torch path is faster
    calls = []
    real = stats_mod.layer_diff_stats

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(stats_mod, "layer_diff_stats", counting)
    counts = []
    for n_layers in (2, 3):
        old = randomize_(Transformer(tiny_config(n_layers=n_layers)), seed=5)
        calls.clear()
        report = run_growth_checks(old, grow_width(old, 2), probe, scale_factor=2)
        assert report.passed
        counts.append(len(calls))
    assert counts[0] == counts[1] and counts[0] <= 30
    assert context_mod.diff_stats is stats_mod.diff_stats


# ----------------------------------------------------------------------------------------
# quick sanity check
# ----------------------------------------------------------------------------------------
def test_sanity_untrained_model(probe):
    fresh = Transformer(tiny_config())
    result = quick_sanity_check(fresh, probe, expect_untrained=True)
    assert result.status == PASSED
    assert result.figures["loss_over_ln_vocab"] == pytest.approx(1.0, abs=0.05)
    assert [r["output"] for r in result.table] == ["embedding", "layer 0", "layer 1"]
    # a fresh identity layer is noted, not failed
    noted = quick_sanity_check(grow_depth(fresh, 1), probe)
    assert noted.passed and any("unchanged" in n for n in noted.notes)


def test_sanity_flags(dense, width_pair, probe):
    # random weights of std 1/sqrt(fan_in): far from uniform; flagged only when asked
    assert quick_sanity_check(dense, probe).status == PASSED
    result = quick_sanity_check(dense, probe, expect_untrained=True)
    assert result.status == FAILED and result.diagnosis == "loss_not_ln_vocab"
    bad = copy.deepcopy(width_pair[1])
    with torch.no_grad():
        bad.layers[1].mlp.down_proj.weight.mul_(1e6)
    result = quick_sanity_check(bad, probe)
    assert result.diagnosis == "exploding_layer" and result.where == "layer 1"
    with torch.no_grad():
        bad.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    result = quick_sanity_check(bad, probe)
    assert result.diagnosis == "non_finite" and result.where == "layer 0"
    dead = Transformer(tiny_config())
    with torch.no_grad():
        dead.embed.weight.zero_()
        for layer in dead.layers:
            layer.attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    result = quick_sanity_check(dead, probe)
    assert result.diagnosis == "dead_layer" and result.where == "embedding"


# ----------------------------------------------------------------------------------------
# GrowthMonitor
# ----------------------------------------------------------------------------------------
def _train_steps(model, probe, monitor, steps):
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    records = []
    for step in range(steps):
        loss = model.loss(probe[:, :-1], probe[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        records.append(monitor.step(step))
    return records


def test_monitor_tracks_twins_every_n_steps(width_pair, probe):
    model = copy.deepcopy(width_pair[1])
    monitor = GrowthMonitor(model, every=2)
    assert monitor.scale == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", GrowthWarning)
        records = _train_steps(model, probe, monitor, 2)
    assert records[0] is not None and records[1] is None and len(monitor.history) == 1
    assert records[0].min_twin_divergence > 1e-5 and not records[0].warnings
    assert sum(t["tensors"] for t in records[0].twins) == 2 * 7 + 1
    assert monitor(4) is not None and monitor(5) is None  # __call__ is step
    assert json.dumps(records[0].to_dict())


def test_monitor_warns_when_clones_identical(dense, probe):
    model = grow_width(dense, 2, noise_std=0)
    monitor = GrowthMonitor(model, every=1)
    with pytest.warns(GrowthWarning, match="clones identical"):
        records = _train_steps(model, probe, monitor, 1)
    assert records[0].warnings and records[0].min_twin_divergence == 0.0


def test_monitor_warns_on_routing_collapse(moe_width, probe):
    model = copy.deepcopy(moe_width)
    monitor = GrowthMonitor(model, every=1)
    model(probe)  # the monitor's hooks keep each router's logits of the training forward
    with warnings.catch_warnings():
        warnings.simplefilter("error", GrowthWarning)
        rec = monitor.step(0)
    assert len(rec.router) == 2 and all(0 < r["entropy"] <= 1 for r in rec.router)

    def collapse(_module, _inputs, logits):
        collapsed = torch.zeros_like(logits)
        collapsed[..., 2] = 10.0
        collapsed[..., 3] = 5.0  # every token picks experts 2 and 3
        return collapsed

    # runs before the monitor's hook, which then sees the collapsed logits
    handle = model.moe_layers()[1].router.register_forward_hook(collapse, prepend=True)
    model(probe)
    handle.remove()
    with pytest.warns(GrowthWarning, match="routing collapsed in MoE layer 1"):
        rec = monitor.step(1)
    assert rec.router[1]["topk_share"] == 1.0
    monitor.close()
    model(probe)
    rec = monitor.step(2)  # no hooks: the last logits seen are still the collapsed ones
    assert rec.router[1]["topk_share"] == 1.0


# ----------------------------------------------------------------------------------------
# arguments and result objects
# ----------------------------------------------------------------------------------------
def test_bad_arguments(width_pair, probe):
    old, new = width_pair
    with pytest.raises(ValueError, match="tolerance"):
        check_functional_identity_layerwise(old, new, probe, tolerance=-1)
    with pytest.raises(ValueError, match="at least 2"):
        check_rope_integrity(old, new, probe[:, :1])
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        check_rope_integrity(old, new, probe + 64)
    with pytest.raises(ValueError, match="scale_factor"):
        run_growth_checks(old, new, probe, scale_factor=1.5)
    with pytest.raises(ValueError, match="verify_functional_equivalence"):
        verify_functional_equivalence(old, new, probe)


def test_troubleshooting_table_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "GROWTH_VERIFICATION.md").read_text()
    for key in TROUBLESHOOTING:
        assert f"| `{key}` |" in doc, key


def test_check_result_basics():
    r = CheckResult("x", "X", FAILED, "broke", 1e-4, "rule", {"a": float("inf")}, diagnosis="router_not_divided")
    assert not r.passed and r.fix == TROUBLESHOOTING["router_not_divided"].fix
    assert json.loads(r.to_json())["figures"]["a"] == "inf"
    assert "likely cause" in str(r)
    with pytest.raises(ValueError):
        CheckResult("x", "X", "MAYBE", "")
