"""Router initializations of ``upcycle_to_moe`` (normal, orthogonal, zero, hidden_pca), the
tie-breaking of top-k on a zero router, the routing-scale traps (``norm_topk_prob``, where the
softmax sits) checked against every target class's own forward, and the argument checks."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from growkit.growth import DEFAULT_ROUTER_STD, get_adapter, save_grown, upcycle_to_moe
from growkit.growth import moe as moe_mod
from growkit.growth.moe import check_moe_args, orthonormal_rows
from growkit.growth.width import derive_seed
from growkit.models import MoE
from hf_zoo import logits as hf_logits
from hf_zoo import probe as hf_probe
from hf_zoo import tiny_model
from model_factory import random_ids, random_model, rel_err

TOL = 1e-5
INITS = ["normal", "orthogonal", "zero", "hidden_pca"]


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("GROWKIT_BACKEND", "torch")


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


def upcycle(model, init, ids, **kw):
    return upcycle_to_moe(model, kw.pop("n_experts", 4), kw.pop("top_k", 2), router_init=init,
                          calibration=ids if init == "hidden_pca" else None, **kw)


# ----------------------------------------------------------------------------- each init
@pytest.mark.parametrize("init", INITS)
def test_every_router_init_is_exact_and_recorded(init):
    model = random_model(seed=31, n_layers=3, n_kv_heads=2)
    ids = random_ids(shape=(2, 16))
    moe = upcycle(model, init, ids, layers=[0, 2], seed=4)
    assert rel_err(logits(moe, ids), logits(model, ids)) <= TOL
    assert moe.growth_records[-1].settings["router_init"] == init
    # planted bug: renormalization switched off in one layer: the output is scaled by the
    # chosen experts' routing mass (a zero router: exactly top_k / n_experts)
    moe.layers[2].mlp.norm_topk_prob = False
    assert rel_err(logits(moe, ids), logits(model, ids)) > 100 * TOL


def test_normal_is_todays_draw_bitwise():
    model = random_model(seed=32, n_layers=2)
    moe = upcycle_to_moe(model, 4, 2, seed=7, router_std=0.05)
    assert torch.equal(moe.layers[1].mlp.router.weight,
                       upcycle_to_moe(model, 4, 2, seed=7, router_std=0.05, router_init="normal").layers[1].mlp.router.weight)
    for i, layer in enumerate(moe.layers):
        name = f"layers.{i}.mlp.router.weight"
        gen = torch.Generator().manual_seed(derive_seed(7, name))
        assert torch.equal(layer.mlp.router.weight, torch.randn(4, 32, generator=gen) * 0.05)


@pytest.mark.parametrize("router_std", [DEFAULT_ROUTER_STD, 0.3])
def test_orthogonal_rows_are_orthonormal_with_the_norm_of_a_normal_row(router_std):
    model = random_model(seed=33, n_layers=2, d_model=32)
    moe = upcycle_to_moe(model, 8, 2, router_init="orthogonal", router_std=router_std, seed=1)
    norm = router_std * math.sqrt(32)
    routers = [layer.mlp.router.weight.double() for layer in moe.layers]
    for w in routers:
        torch.testing.assert_close(w @ w.T, norm**2 * torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(routers[0], routers[1])  # keyed by tensor name
    again = upcycle_to_moe(model, 8, 2, router_init="orthogonal", router_std=router_std, seed=1)
    assert torch.equal(again.layers[0].mlp.router.weight, moe.layers[0].mlp.router.weight)
    # the average normal row has about the same norm
    normal = upcycle_to_moe(model, 8, 2, router_std=router_std, seed=1).layers[0].mlp.router.weight
    assert normal.norm(dim=1).mean().item() == pytest.approx(norm, rel=0.25)
    # planted bug: a draw of the Gaussian itself (not orthogonalized) is not orthonormal
    g = torch.randn(8, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert not torch.allclose(g @ g.T / 32, torch.eye(8, dtype=torch.float64), atol=1e-3)
    u = orthonormal_rows(8, 32, 5)
    torch.testing.assert_close(u @ u.T, torch.eye(8, dtype=torch.float64))


@pytest.mark.parametrize("init", ["orthogonal", "hidden_pca"])
def test_orthonormal_inits_need_n_experts_up_to_d_model(init, monkeypatch):
    model = random_model(seed=34, d_model=16, n_heads=2)
    monkeypatch.setattr(moe_mod, "source_specs", lambda *a: pytest.fail("allocated before refusing"))
    with pytest.raises(ValueError, match=r"router_init=.*n_experts \(17\) must be <= d_model \(16\)"):
        upcycle(model, init, random_ids(shape=(2, 16)), n_experts=17)


def _mlp_inputs(model, ids) -> dict[int, torch.Tensor]:
    """Each layer's MLP input (the post-norm state), captured at mlp_norm's output."""
    out = {}
    handles = [layer.mlp_norm.register_forward_hook(lambda m, a, y, i=i: out.__setitem__(i, y.detach()))
               for i, layer in enumerate(model.layers)]
    logits(model, ids)
    for h in handles:
        h.remove()
    return {i: x.reshape(-1, x.shape[-1]).double() for i, x in out.items()}


def test_hidden_pca_rows_are_the_principal_directions_of_the_mlp_inputs():
    model = random_model(seed=35, n_layers=3)
    ids = random_ids(shape=(4, 24), seed=3)
    moe = upcycle_to_moe(model, 4, 2, router_init="hidden_pca", calibration=ids, layers=[1, 2], router_std=0.1)
    states = _mlp_inputs(model, ids)
    for i in (1, 2):
        x = states[i] - states[i].mean(0)
        evals, evecs = torch.linalg.eigh(x.T @ x)
        top = evecs[:, -4:].flip(1).T  # [4, d], largest variance first
        w = moe.layers[i].mlp.router.weight.double()
        assert torch.allclose(w.norm(dim=1), torch.full((4,), 0.1 * math.sqrt(32), dtype=torch.float64), rtol=1e-5)
        cos = (w / w.norm(dim=1, keepdim=True) * top).sum(1).abs()
        assert torch.allclose(cos, torch.ones(4, dtype=torch.float64), atol=1e-4), cos
        # planted bug: directions of another layer's inputs are not these
        other = states[0] - states[0].mean(0)
        wrong = torch.linalg.eigh(other.T @ other).eigenvectors[:, -4:].flip(1).T
        assert not torch.allclose((wrong * top).sum(1).abs(), torch.ones(4, dtype=torch.float64), atol=1e-2)
    assert moe.growth_records[-1].settings["router_init"] == "hidden_pca"
    # the source runs once, in eval mode, and is left in its mode
    model.train()
    upcycle_to_moe(model, 4, 2, router_init="hidden_pca", calibration=ids)
    assert model.training


def test_hidden_pca_on_a_hugging_face_model():
    model = tiny_model("qwen3")
    ids = hf_probe(model, batch=2, seq_len=16)
    moe = upcycle_to_moe(model, 4, 2, router_init="hidden_pca", calibration=ids, layers="last:2")
    ref = hf_logits(model, ids)
    assert float((hf_logits(moe, ids) - ref).abs().max()) <= TOL * float(ref.abs().max())
    w = moe.model.layers[2].mlp.gate.weight.double()
    torch.testing.assert_close(w @ w.T, (0.02**2 * 48) * torch.eye(4, dtype=torch.float64), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(router_init="hidden_pca"), "needs calibration"),
    (dict(router_init="hidden_pca", calibration=[[1, 2, 3]]), "calibration must be a"),
    (dict(router_init="hidden_pca", calibration=torch.ones(2, 8)), "integer tensor"),
    (dict(router_init="hidden_pca", calibration=torch.ones(8, dtype=torch.long)), r"\[B, T\]"),
    (dict(router_init="hidden_pca", calibration=torch.ones(1, 4, dtype=torch.long)), "at least n_experts \\+ 1"),
    (dict(router_init="hidden_pca", calibration=torch.full((2, 8), 97)), r"in \[0, 97\)"),
    (dict(router_init="normal", calibration=torch.ones(2, 8, dtype=torch.long)), "only used by"),
])
def test_calibration_is_checked(kwargs, message, monkeypatch):
    model = random_model(seed=36)
    monkeypatch.setattr(moe_mod, "source_specs", lambda *a: pytest.fail("allocated before refusing"))
    with pytest.raises(ValueError, match=message):
        upcycle_to_moe(model, 4, 2, **kwargs)


# ----------------------------------------------------------------------------- zero: ties
def _chosen_reference(moe_model, ids) -> dict[int, set]:
    """layer -> the experts the reference MoE ran (Experts.forward(x, e) is called once per used expert)."""
    used = {}
    handles = []
    for i, layer in enumerate(moe_model.layers):
        if isinstance(layer.mlp, MoE):
            handles.append(layer.mlp.experts.register_forward_pre_hook(
                lambda m, a, i=i: used.setdefault(i, set()).add(int(a[1]))))
    logits(moe_model, ids)
    for h in handles:
        h.remove()
    return used


def _chosen_hf(moe_model, ids) -> dict[int, torch.Tensor]:
    """layer -> [tokens, k] expert indices from the HF router module's own output."""
    out = {}
    handles = [layer.mlp.gate.register_forward_hook(lambda m, a, y, i=i: out.__setitem__(i, y[2]))
               for i, layer in enumerate(moe_model.model.layers) if hasattr(layer.mlp, "gate")]
    hf_logits(moe_model, ids)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("n_experts,top_k", [(4, 2), (8, 2), (16, 4)])
def test_zero_router_sends_every_token_to_the_same_experts_in_every_target(n_experts, top_k):
    """Equal logits: ``torch.topk``'s tie-breaking decides, the same for every token, in the
    reference MoE and in transformers' Mixtral, Qwen2-MoE and Qwen3-MoE alike (all call
    torch.topk on the softmax). Which experts is torch's choice, not the lowest indices."""
    tie = set(torch.full((1, n_experts), 1.0 / n_experts).topk(top_k, dim=-1).indices[0].tolist())
    print(f"E={n_experts} k={top_k}: torch.topk on ties picks experts {sorted(tie)}")
    ref_model = random_model(seed=37, n_layers=2, d_model=32)
    ids = random_ids(shape=(3, 16))
    moe = upcycle_to_moe(ref_model, n_experts, top_k, router_init="zero")
    assert rel_err(logits(moe, ids), logits(ref_model, ids)) <= TOL
    assert _chosen_reference(moe, ids) == {0: tie, 1: tie}
    for family in ("llama", "qwen2", "qwen3"):
        dense = tiny_model(family)
        hf_ids = hf_probe(dense, batch=3)
        up = upcycle_to_moe(dense, n_experts, top_k, router_init="zero")
        chosen = _chosen_hf(up, hf_ids)
        assert len(chosen) == 3
        for idx in chosen.values():
            rows = {tuple(sorted(r)) for r in idx.tolist()}
            assert rows == {tuple(sorted(tie))}, (family, rows)
        ref = hf_logits(dense, hf_ids)
        assert float((hf_logits(up, hf_ids) - ref).abs().max()) <= TOL * float(ref.abs().max())
    # planted bug: a normal router spreads the tokens over more than top_k experts
    spread = upcycle_to_moe(ref_model, n_experts, top_k, router_std=0.5)
    assert len(_chosen_reference(spread, ids)[0]) > top_k


def test_zero_router_routing_is_reported_as_collapsed():
    from growkit.verify import run_growth_checks

    model = random_model(seed=38, n_layers=2)
    ids = random_ids(shape=(2, 16))
    report = run_growth_checks(model, upcycle_to_moe(model, 4, 2, router_init="zero"), ids, "cpu", scale_factor=1)
    assert report["functional_identity"].status == "PASSED"
    assert report["router_scaling"].diagnosis == "routing_collapsed"
    assert any("tie-breaking" in n for n in upcycle_to_moe(model, 4, 2, router_init="zero").growth_records[-1].notes)


# ----------------------------------------------------------------------------- routing-scale traps
def _unrenormalize(moe_model):
    """Planted bug: the target class stops renormalizing its top-k weights."""
    adapter = get_adapter(moe_model)
    if not adapter.is_hf:
        for m in moe_model.moe_layers():
            m.norm_topk_prob = False
        return
    for layer in moe_model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is None:
            continue
        if hasattr(gate, "norm_topk_prob"):
            gate.norm_topk_prob = False
        else:  # Mixtral renormalizes unconditionally: replace its routing by softmax -> top-k
            def forward(hidden, gate=gate):
                hidden = hidden.reshape(-1, gate.hidden_dim)
                router_logits = torch.nn.functional.linear(hidden, gate.weight)
                top, idx = torch.softmax(router_logits.float(), dim=-1).topk(gate.top_k, dim=-1)
                return router_logits, top.to(router_logits.dtype), idx

            gate.forward = forward


@pytest.mark.parametrize("family", ["reference", "llama", "mistral", "qwen2", "qwen3"])
def test_each_target_class_forward_is_exact_with_sharp_routing(family):
    """The target class's own forward, with a strong router (routing weights far from
    uniform, top_k < n_experts), equals the dense model: its routing renormalizes as
    growkit's exactness argument needs. A class that did not would fail here, as the
    planted one does."""
    if family == "reference":
        dense, ids = random_model(seed=39, n_layers=2), random_ids(shape=(2, 16))
        run = logits
    else:
        dense = tiny_model(family)
        ids, run = hf_probe(dense), hf_logits
    ref = run(dense, ids)
    moe = upcycle_to_moe(dense, 4, 2, router_std=1.0, seed=2)
    assert float((run(moe, ids) - ref).abs().max()) <= TOL * float(ref.abs().max())
    if family in ("qwen2", "qwen3"):
        assert moe.config.norm_topk_prob is True
    _unrenormalize(moe)
    assert float((run(moe, ids) - ref).abs().max()) > 100 * TOL * float(ref.abs().max())


@pytest.mark.parametrize("family", ["reference", "qwen2", "qwen3"])
def test_without_renormalization_only_top_k_equal_n_experts_is_exact(family):
    dense = random_model(seed=40, n_layers=2) if family == "reference" else tiny_model(family)
    ids = random_ids() if family == "reference" else hf_probe(dense)
    run = logits if family == "reference" else hf_logits
    with pytest.raises(ValueError, match="norm_topk_prob=False with top_k=2 < n_experts=4"):
        upcycle_to_moe(dense, 4, 2, norm_topk_prob=False)
    moe = upcycle_to_moe(dense, 4, 4, norm_topk_prob=False, router_std=1.0)
    assert get_adapter(moe).cfg(moe, "norm_topk_prob") is False
    ref = run(dense, ids)
    assert float((run(moe, ids) - ref).abs().max()) <= TOL * float(ref.abs().max())


def test_mixtral_refuses_norm_topk_prob_false():
    with pytest.raises(ValueError, match="norm_topk_prob=False: mixtral always renormalizes"):
        upcycle_to_moe(tiny_model("mistral"), 4, 2, norm_topk_prob=False)


@pytest.mark.parametrize("family,top_k,expected", [("qwen2", 2, True), ("qwen3", 2, True), ("qwen2", 4, True)])
def test_saved_target_config_states_norm_topk_prob(tmp_path, family, top_k, expected):
    """transformers' Qwen-MoE default is norm_topk_prob=False: the written config must say True."""
    moe = upcycle_to_moe(tiny_model(family), 4, top_k)
    save_grown(moe, tmp_path / "g")
    assert json.loads((tmp_path / "g" / "config.json").read_text())["norm_topk_prob"] is expected
    moe_false = upcycle_to_moe(tiny_model(family), 4, 4, norm_topk_prob=False)
    save_grown(moe_false, tmp_path / "f")
    assert json.loads((tmp_path / "f" / "config.json").read_text())["norm_topk_prob"] is False


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kwargs,name", [
    (dict(n_experts=True), "n_experts"),
    (dict(n_experts=1), "n_experts"),
    (dict(n_experts=2.5), "n_experts"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=5), "top_k"),
    (dict(top_k="2"), "top_k"),
    (dict(router_std=-0.1), "router_std"),
    (dict(router_std=float("nan")), "router_std"),
    (dict(router_std=True), "router_std"),
    (dict(expert_noise_std=-1.0), "expert_noise_std"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(router_init="uniform"), "router_init"),
    (dict(norm_topk_prob="yes"), "norm_topk_prob"),
    (dict(layers="sometimes"), "layers"),
    (dict(layers=[0, 9]), "layers"),
])
def test_arguments_are_checked_before_anything_is_made(kwargs, name, monkeypatch):
    model = random_model(seed=41)
    monkeypatch.setattr(moe_mod, "source_specs", lambda *a: pytest.fail("allocated before refusing"))
    args = dict(n_experts=4, top_k=2) | kwargs
    with pytest.raises(ValueError, match=name):
        upcycle_to_moe(model, args.pop("n_experts"), args.pop("top_k"), **args)


def test_check_moe_args_normalizes():
    assert check_moe_args(4.0, 2, 0, 0, 3, True, router_init="zero") == (4, 2, 0.0, 0.0, 3)
    assert isinstance(check_moe_args(4, 2)[2], float)


# ----------------------------------------------------------------------------- exchangeable experts
def test_symmetry_check_fails_experts_the_router_cannot_tell_apart():
    """Experts with equal router rows and equal weights are exchangeable: the rule against
    expert 0 misses it (each expert differs from expert 0 in its gradient), the exchange
    does not. A zero router over fresh copies makes every pair exchangeable, and two AdamW
    steps later the pairs topk's tie-breaking treats alike are still bitwise equal; one
    duplicated router row makes one pair; distinct rows, or experts started apart
    (Drop-Upcycling), make none."""
    import torch.nn.functional as F

    from growkit.verify import run_growth_checks

    model = random_model(seed=41, n_layers=2)
    ids = random_ids(shape=(2, 16))

    def symmetry(moe):
        return run_growth_checks(model, moe, ids, "cpu", scale_factor=1)["symmetry_breaking"]

    zero = upcycle_to_moe(model, 4, 2, router_init="zero")
    check = symmetry(zero)
    assert check.status == "FAILED" and check.diagnosis == "experts_exchangeable", check.summary
    pairs = {(e["layer"], tuple(e["clones"])) for e in check.figures["exchangeable_clones"]}
    assert pairs == {(layer, p) for layer in (0, 1) for p in itertools.combinations(range(4), 2)}
    assert [row["status"] for row in check.table] == ["FAIL", "FAIL"]
    # the premise, measured: trained, pairs the top-k takes together stay equal
    opt = torch.optim.AdamW(zero.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(zero(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
    experts = zero.layers[0].mlp.experts.gate_proj
    assert torch.equal(experts[0], experts[1]) and torch.equal(experts[2], experts[3])
    assert not torch.equal(experts[1], experts[2])

    assert symmetry(upcycle_to_moe(model, 4, 2)).status == "PASSED"
    duplicated = upcycle_to_moe(model, 4, 2)
    with torch.no_grad():
        duplicated.layers[1].mlp.router.weight[2] = duplicated.layers[1].mlp.router.weight[1]
    check = symmetry(duplicated)
    assert check.status == "FAILED" and check.where == "1"
    assert [(e["layer"], e["clones"]) for e in check.figures["exchangeable_clones"]] == [(1, [1, 2])]
    assert "experts 1 and 2 of layer 1" in check.cause
    # equal router rows, experts apart: nothing to exchange
    assert symmetry(upcycle_to_moe(model, 4, 2, router_init="zero", expert_reinit=0.25)).status == "PASSED"
