"""Partial upcycling (``upcycle_to_moe(..., layers=...)``): some layers become MoE, the others
keep their dense MLP; exact, expressed by the target's config (the reference model's
``dense_layers``, Qwen-MoE's ``mlp_only_layers``), refused into Mixtral, and kept right by
every operator and tool downstream (checks, width, depth, optimizer state, saving).

Every model is random (norm gains and biases too); every exactness test has a planted bug
beside it that makes it fail."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from growkit.growth import (
    get_adapter,
    grow_depth,
    grow_width,
    load_grown,
    save_grown,
    transfer_adam_state,
    upcycle_to_moe,
)
from growkit.growth import moe as moe_mod
from growkit.growth.moe import parse_moe_layers
from growkit.models import MLP, ModelConfig, MoE, Transformer, load_model, save_model
from growkit.verify import run_growth_checks
from hf_zoo import logits as hf_logits
from hf_zoo import probe as hf_probe
from hf_zoo import tiny_model
from model_factory import random_ids, random_model, rel_err

TOL = 1e-5  # float32: max |new - old| <= TOL * max |old|


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("GROWKIT_BACKEND", "torch")


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


def kinds(model) -> list[str]:
    return ["moe" if isinstance(layer.mlp, MoE) else "dense" for layer in model.layers]


def busiest_expert(model, layer: int, ids) -> int:
    """The expert of ``layer`` that takes the most top-k slots on ``ids``."""
    logits(model, ids)
    moe = model.layers[layer].mlp
    top = moe.last_router_logits.topk(moe.top_k, dim=-1).indices.reshape(-1)
    return int(torch.bincount(top, minlength=moe.n_experts).argmax())


# ----------------------------------------------------------------------------- specs
@pytest.mark.parametrize("spec,expected", [
    (None, [0, 1, 2, 3, 4, 5]),
    ("every:1", [0, 1, 2, 3, 4, 5]),
    ("every:2", [1, 3, 5]),  # Qwen's decoder_sparse_step: layer i iff (i + 1) % K == 0
    ("every:3", [2, 5]),
    ("every:6", [5]),
    ("first:2", [0, 1]),
    ("last:2", [4, 5]),
    ("last:6", [0, 1, 2, 3, 4, 5]),
    ([4, 0, 2], [0, 2, 4]),
    (range(1, 3), [1, 2]),
    ((5,), [5]),
    ("0, 3,5", [0, 3, 5]),
])
def test_layer_specs(spec, expected):
    assert parse_moe_layers(spec, 6) == expected


@pytest.mark.parametrize("spec,message", [
    ("every:7", "selects no layer"),
    ("every:0", "every:K"),
    ("first:0", "first:N"),
    ("last:7", "last:N"),
    ("last:x", "needs a whole number"),
    ("middle:2", "every:K"),
    ("", "every:K"),
    ([], "empty"),
    ([1, 1], "more than once"),
    ([6], "n_layers - 1 = 5"),
    ([-1], "layers"),
    ([1.5], "layers"),
    ([True], "layers"),
    (3, "layers must be"),
    (True, "layers must be"),
])
def test_bad_layer_specs_name_the_argument(spec, message):
    with pytest.raises(ValueError, match="layers") as e:
        parse_moe_layers(spec, 6)
    assert message in str(e.value)


# ----------------------------------------------------------------------------- reference model
@pytest.mark.parametrize("spec,moe_layers", [
    ([0, 2], [0, 2]), ("every:2", [1, 3]), ("last:1", [3]), ("first:3", [0, 1, 2]), (None, [0, 1, 2, 3]),
])
def test_partial_upcycling_of_the_reference_model_is_exact(spec, moe_layers):
    model = random_model(seed=21, n_layers=4, n_kv_heads=2)
    ids = random_ids()
    ref = logits(model, ids)
    snapshot = copy.deepcopy(model.state_dict())
    moe = upcycle_to_moe(model, 4, 2, layers=spec, seed=5)
    assert kinds(moe) == ["moe" if i in moe_layers else "dense" for i in range(4)]
    assert moe.config.dense_layers == tuple(i for i in range(4) if i not in moe_layers)
    assert moe.growth_records[-1].settings["layers"] == (None if len(moe_layers) == 4 else moe_layers)
    assert rel_err(logits(moe, ids), ref) <= TOL
    for i, (new, old) in enumerate(zip(moe.layers, model.layers)):
        if i in moe_layers:
            for e in range(4):
                assert torch.equal(new.mlp.experts.down_proj[e], old.mlp.down_proj.weight)
                assert torch.equal(new.mlp.experts.gate_bias[e], old.mlp.gate_proj.bias)
        else:
            for a, b in zip(new.mlp.state_dict().values(), old.mlp.state_dict().values()):
                assert torch.equal(a, b)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())

    # planted bug: one expert of one sparse layer mis-copied
    layer = moe_layers[-1]
    e = busiest_expert(moe, layer, ids)
    with torch.no_grad():
        moe.layers[layer].mlp.experts.down_proj[e] += 0.3
    assert rel_err(logits(moe, ids), ref) > 100 * TOL


def test_partial_upcycling_checks_pass_and_each_fails_on_a_planted_bug():
    model = random_model(seed=22, n_layers=4)
    ids = random_ids(shape=(2, 16))
    moe = upcycle_to_moe(model, 4, 2, layers="every:2")
    report = run_growth_checks(model, moe, ids, "cpu", scale_factor=1)
    assert report.passed, report
    assert {c.name: c.status for c in report.checks} == {
        "rope_integrity": "PASSED", "router_scaling": "PASSED", "symmetry_breaking": "PASSED",
        "functional_identity": "PASSED"}
    assert report["router_scaling"].figures["moe_layers"] == 2

    def status(bad, name):
        return run_growth_checks(model, bad, ids, "cpu", scale_factor=1, checks=[name])[name]

    # functional identity: one expert of sparse layer 3 mis-copied
    bad = copy.deepcopy(moe)
    e = busiest_expert(bad, 3, ids)
    with torch.no_grad():
        bad.layers[3].mlp.experts.up_proj[e] *= 1.5
    result = status(bad, "functional_identity")
    assert result.status == "FAILED" and "layer 3" in result.where

    # router scaling: the router of sparse layer 1 left at zero: equal logits, so top-k's
    # tie-breaking sends every token to the same experts (collapsed routing)
    bad = copy.deepcopy(moe)
    with torch.no_grad():
        bad.layers[1].mlp.router.weight.zero_()
    result = status(bad, "router_scaling")
    assert result.status == "FAILED" and result.diagnosis == "routing_collapsed" and "layer 1" in result.where

    # symmetry breaking: with top_k = n_experts, a zero router gives every expert of its
    # layer the same weight, so the experts of sparse layer 3 never differ
    full = upcycle_to_moe(model, 4, 4, layers="every:2")
    assert status(full, "symmetry_breaking").status == "PASSED"
    with torch.no_grad():
        full.layers[3].mlp.router.weight.zero_()
    result = status(full, "symmetry_breaking")
    assert result.status == "FAILED" and "3" in result.where and "1" not in result.where

    # RoPE integrity: the grown model rotates with another base
    bad = copy.deepcopy(moe)
    bad.config.rope_theta = 500.0
    bad._build_rope(bad.config.max_seq_len, "cpu")
    assert status(bad, "rope_integrity").status == "FAILED"


def test_width_and_depth_of_a_partial_model_stay_exact():
    model = random_model(seed=23, n_layers=4, n_kv_heads=2)
    ids = random_ids()
    ref = logits(model, ids)
    moe = upcycle_to_moe(model, 4, 2, layers=[1, 3])
    assert kinds(moe) == ["dense", "moe", "dense", "moe"]

    wide = grow_width(moe, 2)
    assert wide.config.dense_layers == (0, 2) and kinds(wide) == kinds(moe)
    assert rel_err(logits(wide, ids), ref) <= TOL
    assert run_growth_checks(moe, wide, ids, "cpu", scale_factor=2).passed

    deep = grow_depth(moe, 3, positions=[0, 1, 3])
    # every new layer has the kind of the layer it copies
    src = [s for s, _ in deep.growth_records[-1].layer_map]
    assert src == [0, 0, 1, 1, 2, 3, 3]
    assert kinds(deep) == [kinds(moe)[s] for s in src] == ["dense", "dense", "moe", "moe", "dense", "moe", "moe"]
    assert deep.config.dense_layers == (0, 1, 4)
    assert rel_err(logits(deep, ids), ref) <= TOL
    assert run_growth_checks(moe, deep, ids, "cpu", scale_factor=1).passed

    both = grow_depth(grow_width(moe, 3), 1, positions=[2])
    assert both.config.dense_layers == (0, 2, 3)
    assert rel_err(logits(both, ids), ref) <= TOL

    # planted bug: a dense layer's MLP corrupted after widening
    with torch.no_grad():
        wide.layers[2].mlp.down_proj.weight[:, :3] += 0.2
    assert rel_err(logits(wide, ids), ref) > 100 * TOL
    result = run_growth_checks(moe, wide, ids, "cpu", scale_factor=2)["functional_identity"]
    assert result.status == "FAILED" and "layer 2" in result.where


def test_depth_growth_of_a_dense_reference_model_leaves_dense_layers_empty():
    model = random_model(seed=24)
    assert grow_depth(model, 2).config.dense_layers == ()


def test_optimizer_state_follows_partial_upcycling_and_depth():
    model = random_model(seed=25, n_layers=3, n_experts=0)
    ids = random_ids()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    opt.step()
    moe = upcycle_to_moe(model, 4, 2, layers=[1])
    moe_opt = torch.optim.AdamW(moe.parameters(), lr=1e-3)
    filled = transfer_adam_state(model, moe, opt, moe_opt)
    state = {n: moe_opt.state[p] for n, p in moe.named_parameters() if p in moe_opt.state}
    old = {n: opt.state[p] for n, p in model.named_parameters()}
    assert filled == len(state) == len(list(moe.parameters()))
    # a dense layer keeps its MLP's moments as they were
    assert torch.equal(state["layers.0.mlp.down_proj.weight"]["exp_avg"], old["layers.0.mlp.down_proj.weight"]["exp_avg"])
    # the upcycled layer: each expert 1/E of the dense moments (1/E^2 for the second); fresh router at 0
    for e in range(4):
        assert torch.allclose(state["layers.1.mlp.experts.up_proj"]["exp_avg"][e],
                              old["layers.1.mlp.up_proj.weight"]["exp_avg"] / 4)
        assert torch.allclose(state["layers.1.mlp.experts.up_proj"]["exp_avg_sq"][e],
                              old["layers.1.mlp.up_proj.weight"]["exp_avg_sq"] / 16)
    assert not state["layers.1.mlp.router.weight"]["exp_avg"].any()
    moe_opt.step()  # the carried state has the right shapes

    # then depth growth of the partial model carries it on: the identity layer after
    # layer 1 is an MoE layer whose residual writers start at zero moments
    grown = grow_depth(moe, 1, positions=[1])
    assert isinstance(grown.layers[2].mlp, MoE) and isinstance(grown.layers[3].mlp, MLP)
    grown_opt = torch.optim.AdamW(grown.parameters(), lr=1e-3)
    assert transfer_adam_state(moe, grown, moe_opt, grown_opt) == len(list(grown.parameters()))
    new = {n: grown_opt.state[p] for n, p in grown.named_parameters()}
    mid = {n: moe_opt.state[p] for n, p in moe.named_parameters()}
    assert torch.equal(new["layers.1.mlp.experts.up_proj"]["exp_avg"], mid["layers.1.mlp.experts.up_proj"]["exp_avg"])
    assert torch.equal(new["layers.3.mlp.up_proj.weight"]["exp_avg"], mid["layers.2.mlp.up_proj.weight"]["exp_avg"])
    assert not new["layers.2.mlp.experts.down_proj"]["exp_avg"].any()
    grown_opt.step()


def test_save_load_round_trip_keeps_the_layer_choice(tmp_path):
    model = random_model(seed=26, n_layers=4, tie_embeddings=True)
    ids = random_ids()
    moe = upcycle_to_moe(model, 4, 2, layers="last:2", router_init="orthogonal")
    save_grown(moe, tmp_path / "g")
    assert json.loads((tmp_path / "g" / "config.json").read_text())["dense_layers"] == [0, 1]
    records = json.loads((tmp_path / "g" / "growth.json").read_text())["records"]
    assert records[0]["settings"]["layers"] == [2, 3] and records[0]["settings"]["router_init"] == "orthogonal"
    back = load_grown(tmp_path / "g")
    assert back.config == moe.config and kinds(back) == ["dense", "dense", "moe", "moe"]
    assert torch.equal(logits(back, ids), logits(moe, ids))
    assert back.growth_records[0].settings["layers"] == [2, 3]

    # a config.json that names other layers than the weights hold is refused at load
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    cfg["dense_layers"] = [0, 3]
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="dense_layers"):
        load_model(tmp_path / "g")


def test_a_config_file_without_dense_layers_still_loads(tmp_path):
    model = random_model(seed=27, n_experts=4)
    save_model(model, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["dense_layers"]  # written before the field existed
    path.write_text(json.dumps(cfg))
    assert load_model(tmp_path / "m").config.dense_layers == ()


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_experts=4, dense_layers=[3]), r"ModelConfig.dense_layers\[i\]"),
    (dict(n_experts=4, dense_layers=[0, 0]), "ModelConfig.dense_layers lists layers"),
    (dict(n_experts=4, dense_layers=[0, 1, 2]), "ModelConfig.dense_layers lists every layer"),
    (dict(n_experts=4, dense_layers="1"), "ModelConfig.dense_layers must be a list"),
    (dict(n_experts=4, dense_layers=[1.0]), "ModelConfig.dense_layers must hold int"),
    (dict(n_experts=0, dense_layers=[1]), "ModelConfig.dense_layers=.* only applies"),
])
def test_dense_layers_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(n_layers=3, **kwargs)


def test_dense_layers_are_stored_sorted_and_build_the_right_blocks():
    cfg = ModelConfig(n_layers=3, n_experts=2, top_k=1, dense_layers=[2, 0])
    assert cfg.dense_layers == (0, 2) and cfg.moe_layer_indices == [1]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    model = Transformer(cfg)
    assert [type(b.mlp) for b in model.layers] == [MLP, MoE, MLP] and len(model.moe_layers()) == 1


# ----------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("family,target", [("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_partial_upcycling_of_qwen_is_exact_in_its_own_forward(tmp_path, family, target, dtype):
    fp32 = tiny_model(family, num_hidden_layers=4, layer_types=None)
    ids = hf_probe(fp32)
    ref = hf_logits(fp32, ids)
    dense = copy.deepcopy(fp32).to(dtype)
    src_err = float((hf_logits(dense, ids) - ref).abs().max())
    moe = upcycle_to_moe(dense, 4, 2, layers="every:2", seed=3)
    assert moe.config.model_type == target
    assert moe.config.decoder_sparse_step == 1 and moe.config.mlp_only_layers == [0, 2]
    assert moe.config.norm_topk_prob is True
    assert get_adapter(moe).moe_layers(moe.config) == [1, 3]
    assert ["Sparse" in type(layer.mlp).__name__ for layer in moe.model.layers] == [False, True, False, True]
    err = float((hf_logits(moe, ids) - ref).abs().max())
    if dtype == torch.float32:
        assert err <= TOL * float(ref.abs().max())
    else:  # within twice the source's own bf16 error, as the other bf16 growth tests
        assert err <= 2 * src_err + 1e-6 * float(ref.abs().max())
    if dtype != torch.float32:
        return
    assert run_growth_checks(dense, moe, ids, "cpu", scale_factor=1).passed

    # the saved config builds the same layer choice
    save_grown(moe, tmp_path / "g")
    saved = json.loads((tmp_path / "g" / "config.json").read_text())
    assert saved["mlp_only_layers"] == [0, 2] and saved["decoder_sparse_step"] == 1 and saved["norm_topk_prob"] is True
    rebuilt = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path / "g"))
    assert [type(a.mlp) for a in rebuilt.model.layers] == [type(b.mlp) for b in moe.model.layers]
    back = load_grown(tmp_path / "g")
    assert float((hf_logits(back, ids) - hf_logits(moe, ids)).abs().max()) <= 1e-6 * float(ref.abs().max())

    # width and depth of the partial model stay exact; depth keeps the list right
    deep = grow_depth(grow_width(moe, 2), 1, positions=[2])
    assert deep.config.mlp_only_layers == [0, 2, 3]
    assert float((hf_logits(deep, ids) - ref).abs().max()) <= TOL * float(ref.abs().max())
    assert run_growth_checks(moe, deep, ids, "cpu", scale_factor=2).passed

    # planted bug: one expert of sparse layer 3 mis-copied (fused gate_up: the whole expert)
    with torch.no_grad():
        moe.model.layers[3].mlp.experts.gate_up_proj.mul_(torch.tensor([1.0, 1.3, 1.0, 1.0]).view(4, 1, 1))
    assert float((hf_logits(moe, ids) - ref).abs().max()) > 100 * TOL * float(ref.abs().max())
    result = run_growth_checks(dense, moe, ids, "cpu", scale_factor=1)["functional_identity"]
    assert result.status == "FAILED" and "layer 3" in result.where


def test_partial_upcycling_into_mixtral_is_refused_before_anything_is_made(monkeypatch):
    model = tiny_model("llama")

    def no(*a, **k):
        raise AssertionError("allocated before refusing")

    monkeypatch.setattr(moe_mod, "source_specs", no)
    with pytest.raises(ValueError) as e:
        upcycle_to_moe(model, 4, 2, layers=[0, 2])
    msg = str(e.value)
    assert "mixtral" in msg and "llama" in msg and "qwen2 -> qwen2_moe" in msg and "qwen3 -> qwen3_moe" in msg
    assert "reference model" in msg
    monkeypatch.undo()
    # a choice of every layer is what Mixtral expresses
    full = upcycle_to_moe(model, 4, 2, layers="first:3")
    assert type(full).__name__ == "MixtralForCausalLM"
