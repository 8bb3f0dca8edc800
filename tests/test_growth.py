"""Growth operators: function preservation, symmetry breaking, records, bad input."""

import copy
import inspect

import pytest
import torch

from growkit.growth import (
    ROLE_RULES,
    Role,
    default_positions,
    get_adapter,
    grow_depth,
    grow_width,
    hyperclone_weight,
    scale_bilaterally,
    transfer_adam_state,
    upcycle_to_moe,
)
from growkit.growth.depth import layer_plan
from growkit.kernels import backend as backend_mod
from growkit.models import load_model, save_model
from model_factory import random_ids, random_model, randomize_, rel_err

TOL = 1e-5  # max |logits_new - logits_old| <= TOL * max |logits_old| in float32


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """Grow through the torch path: the interpreter takes seconds per model.

    The kernels are checked bitwise against the torch path in test_kernels.py, and
    test_growth_through_the_triton_interpreter_is_bitwise_the_same grows one model both ways.
    """
    monkeypatch.setenv("GROWKIT_BACKEND", "torch")


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


def assert_untouched(model, snapshot):
    after = model.state_dict()
    assert after.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(after[k], v), f"source parameter {k} changed"


def storages(model):
    return {p.untyped_storage().data_ptr() for p in model.state_dict().values()}


# --------------------------------------------------------------------------------------
# width
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("n_experts", [0, 4], ids=["dense", "moe"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_grow_width_preserves_the_function(n_kv_heads, n_experts, tied, scale):
    model = random_model(seed=scale, n_kv_heads=n_kv_heads, n_experts=n_experts, tie_embeddings=tied)
    ids = random_ids()
    ref = logits(model, ids)
    snapshot = copy.deepcopy(model.state_dict())
    grown = grow_width(model, scale, noise_std=1e-3, seed=1)
    cfg, gcfg = model.config, grown.config
    assert (gcfg.d_model, gcfg.n_heads, gcfg.n_kv_heads, gcfg.d_ff) == (
        scale * cfg.d_model, scale * cfg.n_heads, scale * cfg.n_kv_heads, scale * cfg.d_ff)
    assert gcfg.head_dim == cfg.head_dim and gcfg.n_experts == cfg.n_experts
    assert gcfg.tie_embeddings == tied
    assert gcfg.logit_scale == pytest.approx(1 / scale if tied else 1.0)
    err = rel_err(logits(grown, ids), ref)
    assert err <= TOL, err
    # the noise is really in the weights (function kept by zero-sum, not by absence)
    q = grown.layers[0].attn.q_proj.weight
    h = cfg.n_heads * cfg.head_dim
    assert not torch.equal(q[:h, : cfg.d_model], q[:h, cfg.d_model: 2 * cfg.d_model])
    assert_untouched(model, snapshot)
    assert not storages(model) & storages(grown)


@pytest.mark.skipif(not (backend_mod.HAS_TRITON and backend_mod.interpreter_enabled()),
                    reason="needs triton with TRITON_INTERPRET=1 (set by conftest)")
def test_growth_through_the_triton_interpreter_is_bitwise_the_same(monkeypatch):
    model = random_model(seed=20, n_kv_heads=2, n_experts=2, top_k=1, n_layers=2, d_ff=16, d_model=16)
    via_torch = scale_bilaterally(model, 2, extra_layers=1, noise_std=1e-3).state_dict()
    monkeypatch.setenv("GROWKIT_BACKEND", "triton")
    via_triton = scale_bilaterally(model, 2, extra_layers=1, noise_std=1e-3).state_dict()
    assert via_torch.keys() == via_triton.keys()
    for k in via_torch:
        assert torch.equal(via_torch[k], via_triton[k]), k


def test_width_hidden_states_are_tiled():
    model = random_model(seed=3, n_kv_heads=2)
    ids = random_ids()
    with torch.no_grad():
        _, hs = model(ids, return_hidden_states=True)
        _, hg = grow_width(model, 2)(ids, return_hidden_states=True)
    for a, b in zip(hs, hg):
        assert rel_err(b, a.repeat(1, 1, 2)) < TOL


def test_independent_noise_changes_the_function_and_zero_sum_does_not():
    model = random_model(seed=4)
    ids = random_ids()
    ref = logits(model, ids)
    zs = rel_err(logits(grow_width(model, 2, noise_std=1e-2, noise="zero_sum"), ids), ref)
    ind = rel_err(logits(grow_width(model, 2, noise_std=1e-2, noise="independent"), ids), ref)
    assert zs < TOL < ind


def test_tied_embeddings_stay_tied_and_survive_save_load(tmp_path):
    model = random_model(seed=5, tie_embeddings=True)
    grown = grow_width(model, 2)
    assert grown.config.tie_embeddings and not hasattr(grown, "lm_head")
    save_model(grown, tmp_path / "g")
    again = load_model(tmp_path / "g").eval()
    ids = random_ids()
    assert again.config.logit_scale == 0.5
    assert torch.equal(logits(again, ids), logits(grown, ids))
    assert rel_err(logits(again, ids), logits(model, ids)) <= TOL


@pytest.mark.parametrize("scale", [2, 3])
def test_bfloat16_growth_error_is_within_twice_the_sources_own(scale):
    model32 = random_model(seed=6, n_kv_heads=2, n_experts=4)
    ids = random_ids(shape=(4, 16))
    ref = logits(model32, ids)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    own = rel_err(logits(model16, ids).float(), ref)
    grown16 = grow_width(model16, scale, noise_std=1e-5)
    assert grown16.embed.weight.dtype == torch.bfloat16
    grown_err = rel_err(logits(grown16, ids).float(), ref)
    assert 0 < own and grown_err <= 2 * own, (grown_err, own)


def twin_blocks(t, groups, dim):
    return [b.detach().clone() for b in t.chunk(groups, dim=dim)]


@pytest.mark.parametrize("noise_std", [0.0, 1e-3])
def test_symmetry_noise_makes_twin_gradients_differ(noise_std):
    model = random_model(seed=7, n_kv_heads=2).train()
    grown = grow_width(model, 2, noise_std=noise_std).train()
    ids = random_ids()
    loss = torch.nn.functional.cross_entropy(grown(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    checked = 0
    for layer in grown.layers:
        for w in (layer.attn.q_proj.weight, layer.attn.k_proj.weight, layer.mlp.up_proj.weight):
            # twin heads (rows) of the input-column block 0: same weights, same position
            g0, g1 = twin_blocks(w.grad, 2, 0)
            if noise_std == 0:
                assert torch.equal(g0, g1), "without noise, twin gradients are bitwise identical"
            else:
                assert not torch.equal(g0, g1)
            checked += 1
    assert checked == 9


# --------------------------------------------------------------------------------------
# depth
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", [None, [0], [2], [0, 0, 2], [1, 2]])
@pytest.mark.parametrize("n_experts", [0, 4])
def test_identity_depth_preserves_the_function(positions, n_experts):
    model = random_model(seed=8, n_experts=n_experts)
    ids = random_ids()
    ref = logits(model, ids)
    snapshot = copy.deepcopy(model.state_dict())
    extra = 2 if positions is None else len(positions)
    grown = grow_depth(model, extra, mode="identity", positions=positions)
    assert grown.config.n_layers == model.config.n_layers + extra
    assert rel_err(logits(grown, ids), ref) <= TOL
    assert_untouched(model, snapshot)
    assert not storages(model) & storages(grown)
    # inserted layers copy their lower neighbour, with residual writers zeroed
    plan = grown.growth_records[-1].layer_map
    for new_i, (src, kind) in enumerate(plan):
        layer, source = grown.layers[new_i], model.layers[src]
        if kind == "identity":
            assert layer.attn.o_proj.weight.abs().max() == 0
            down = layer.mlp.experts.down_proj if n_experts else layer.mlp.down_proj.weight
            assert down.abs().max() == 0
            assert torch.equal(layer.attn.q_proj.weight, source.attn.q_proj.weight)
        else:
            assert torch.equal(layer.attn.o_proj.weight, source.attn.o_proj.weight)


def test_positions_are_numbered_from_zero_and_validated():
    assert layer_plan(3, 1, "identity", [0]) == [(0, "original"), (0, "identity"), (1, "original"), (2, "original")]
    assert layer_plan(3, 1, "identity", [2])[-1] == (2, "identity")
    assert default_positions(8, 2) == [3, 7]
    assert default_positions(4, 4) == [0, 1, 2, 3]
    assert default_positions(2, 3) == [0, 0, 1]
    model = random_model(seed=9)
    with pytest.raises(ValueError, match="positions"):
        grow_depth(model, 1, positions=[3])  # layers are 0..2
    with pytest.raises(ValueError, match="positions"):
        grow_depth(model, 2, positions=[0])


def test_stack_mode_changes_the_function_as_documented():
    model = random_model(seed=10)
    ids = random_ids()
    ref = logits(model, ids)
    grown = grow_depth(model, 3, mode="stack")  # 3 + 3: the whole stack twice (G_stack)
    assert [s for s, _ in grown.growth_records[-1].layer_map] == [0, 1, 2, 0, 1, 2]
    assert not grown.growth_records[-1].function_preserving
    assert rel_err(logits(grown, ids), ref) > 1e-2
    partial = grow_depth(model, 2, mode="stack")  # not a multiple: the top 2 copied once
    assert [s for s, _ in partial.growth_records[-1].layer_map] == [0, 1, 2, 1, 2]
    for i, j in ((3, 1), (4, 2)):
        assert torch.equal(partial.layers[i].attn.o_proj.weight, model.layers[j].attn.o_proj.weight)
    # copies never alias the originals (the append-the-same-module bug)
    assert not storages(model) & storages(grown)
    doc = inspect.getdoc(grow_depth) + inspect.getmodule(grow_depth).__doc__
    assert "NOT function-preserving" in doc and "changes the function" in doc


@pytest.mark.parametrize("n_experts", [0, 4])
def test_stack_scale_damps_what_the_stacked_copies_write(n_experts):
    """stack_scale a: the copies' residual writers (o_proj, down_proj) are a times the
    source's, every other tensor an exact copy; 1 is G_stack bit for bit; 0 is identity
    blocks in G_stack's places (function-preserving)."""
    from growkit.growth.records import GrowthRecord

    model = randomize_(random_model(seed=10, n_experts=n_experts), seed=10)
    ids = random_ids()
    ref = logits(model, ids)
    full = grow_depth(model, 3, mode="stack")
    one = grow_depth(model, 3, mode="stack", stack_scale=1.0)
    a, b = full.state_dict(), one.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.growth_records[-1].settings == one.growth_records[-1].settings

    zero = grow_depth(model, 3, mode="stack", stack_scale=0)
    rec = zero.growth_records[-1]
    assert rec.function_preserving and rec.settings["stack_scale"] == 0.0
    assert rec.layer_map == [(0, "original"), (1, "original"), (2, "original"),
                             (0, "identity"), (1, "identity"), (2, "identity")]
    assert rel_err(logits(zero, ids), ref) <= TOL

    half = grow_depth(model, 3, mode="stack", stack_scale=0.5)
    rec = half.growth_records[-1]
    assert not rec.function_preserving and "0.5" in rec.notes[0]
    assert rel_err(logits(half, ids), ref) > 1e-3
    kinds = {name: src.kind for name, src in rec.sources.items() if ".5." in name}
    assert kinds["layers.5.attn.o_proj.weight"] == "scaled_copy"
    assert kinds["layers.5.attn.q_proj.weight"] == kinds["layers.5.attn_norm.weight"] == "copy"
    for new_i in (3, 4, 5):
        layer, src = half.layers[new_i], model.layers[new_i - 3]
        down = (lambda m: m.mlp.experts.down_proj) if n_experts else (lambda m: m.mlp.down_proj.weight)
        assert torch.equal(layer.attn.o_proj.weight, 0.5 * src.attn.o_proj.weight)
        assert torch.equal(down(layer), 0.5 * down(src))
        assert torch.equal(layer.attn.q_proj.weight, src.attn.q_proj.weight)
        assert torch.equal(layer.mlp_norm.weight, src.mlp_norm.weight)
    for i in range(3):  # the kept layers are untouched
        assert torch.equal(half.layers[i].attn.o_proj.weight, model.layers[i].attn.o_proj.weight)
    back = GrowthRecord.from_dict(rec.to_dict())
    assert back.sources == rec.sources and back.settings == rec.settings
    # the Adam moments of a damped copy are its source's (a scaled weight takes the same steps)
    moments = rec.map_tensors({"layers.1.attn.o_proj.weight": torch.ones(3)})
    assert torch.equal(moments["layers.4.attn.o_proj.weight"], torch.ones(3))


def test_stack_scale_is_validated():
    model = random_model(seed=9)
    with pytest.raises(ValueError, match="stack_scale=0.5 applies to mode='stack' only"):
        grow_depth(model, 1, mode="identity", stack_scale=0.5)
    with pytest.raises(ValueError, match="stack_scale=0.5 applies to depth_mode='stack'"):
        scale_bilaterally(model, 2, 1, depth_mode="identity", stack_scale=0.5)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="stack_scale"):
            grow_depth(model, 1, mode="stack", stack_scale=bad)
    for bad in ("0.5", True):
        with pytest.raises(TypeError, match="stack_scale"):
            grow_depth(model, 1, mode="stack", stack_scale=bad)


# --------------------------------------------------------------------------------------
# MoE upcycling and bilateral growth
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_experts,top_k", [(4, 2), (2, 1), (8, 8)])
@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_upcycling_preserves_the_function(n_experts, top_k, n_kv_heads):
    model = random_model(seed=11, n_kv_heads=n_kv_heads)
    ids = random_ids()
    ref = logits(model, ids)
    snapshot = copy.deepcopy(model.state_dict())
    moe = upcycle_to_moe(model, n_experts, top_k, seed=3)
    assert moe.config.n_experts == n_experts and moe.config.top_k == top_k
    assert rel_err(logits(moe, ids), ref) <= TOL
    for layer, src in zip(moe.layers, model.layers):
        for e in range(n_experts):
            assert torch.equal(layer.mlp.experts.gate_proj[e], src.mlp.gate_proj.weight)
        # the router is small: logits of std well below 1 on normalized inputs
        assert layer.mlp.router.weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert_untouched(model, snapshot)
    assert not storages(model) & storages(moe)


def test_upcycling_then_width_then_depth_preserves_the_function():
    model = random_model(seed=12, n_kv_heads=2)
    ids = random_ids()
    ref = logits(model, ids)
    moe = upcycle_to_moe(model, 4, 2)
    for s in (2, 3):
        grown = scale_bilaterally(moe, s, extra_layers=2)
        assert [r.op for r in grown.growth_records] == ["width", "depth"]
        assert grown.config.n_layers == model.config.n_layers + 2
        assert rel_err(logits(grown, ids), ref) <= TOL


def test_expert_noise_breaks_exactness_by_a_little():
    model = random_model(seed=13)
    ids = random_ids()
    err = rel_err(logits(upcycle_to_moe(model, 4, 2, expert_noise_std=1e-3), ids), logits(model, ids))
    assert TOL < err < 0.1


def test_norm_topk_prob_false_is_refused_unless_exact():
    model = random_model(seed=14)
    with pytest.raises(ValueError, match="norm_topk_prob"):
        upcycle_to_moe(model, 4, 2, norm_topk_prob=False)
    exact = upcycle_to_moe(model, 4, 4, norm_topk_prob=False)
    ids = random_ids()
    assert rel_err(logits(exact, ids), logits(model, ids)) <= TOL


# --------------------------------------------------------------------------------------
# single tensors, roles and optimizer state
# --------------------------------------------------------------------------------------
def test_hyperclone_weight_follows_the_role_table():
    w = torch.randn(8, 6)
    assert torch.equal(hyperclone_weight(w, 2, "q_proj"), (w / 2).repeat(2, 2))
    assert torch.equal(hyperclone_weight(w, 2, "lm_head"), (w / 2).repeat(1, 2))
    assert torch.equal(hyperclone_weight(w, 2, "embedding"), w.repeat(1, 2))
    assert torch.equal(hyperclone_weight(w, 3, "router"), (w / 3).repeat(1, 3))
    # the router never gets noise: noise could move a token across a top-k boundary
    assert torch.equal(hyperclone_weight(w, 2, "router", noise_std=0.1), (w / 2).repeat(1, 2))
    assert not torch.equal(hyperclone_weight(w, 2, "q_proj", noise_std=0.1), (w / 2).repeat(2, 2))
    e = torch.randn(3, 8, 6)
    assert torch.equal(hyperclone_weight(e, 2, Role.EXPERT_DOWN), (e / 2).repeat(1, 2, 2))
    with pytest.raises(ValueError, match="role"):
        hyperclone_weight(w, 2, "qkv")


def test_every_reference_parameter_has_a_role():
    for kw in (dict(), dict(n_experts=4, tie_embeddings=True)):
        model = random_model(**kw)
        roles = get_adapter(model).param_roles(model)
        assert set(roles) == set(model.state_dict())
        assert all(r.role in ROLE_RULES for r in roles.values())


def test_transfer_adam_state_keeps_each_update_direction():
    model = random_model(seed=15, n_kv_heads=2).train()
    ids = random_ids()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        opt.step()
    grown = scale_bilaterally(model, 2, extra_layers=1, noise_std=0.0)
    new_opt = torch.optim.AdamW(grown.parameters(), lr=1e-3)
    filled = transfer_adam_state(model, grown, opt, new_opt)
    assert filled == len(list(grown.parameters()))
    old_q = opt.state[model.layers[0].attn.q_proj.weight]
    new_q = new_opt.state[grown.layers[0].attn.q_proj.weight]
    # m/sqrt(v) (Adam's direction, eps aside) is the source's, tiled
    ratio_old = old_q["exp_avg"] / old_q["exp_avg_sq"].sqrt().clamp_min(1e-30)
    ratio_new = new_q["exp_avg"] / new_q["exp_avg_sq"].sqrt().clamp_min(1e-30)
    torch.testing.assert_close(ratio_new, ratio_old.repeat(2, 2))
    torch.testing.assert_close(new_q["exp_avg"], old_q["exp_avg"].repeat(2, 2) / 2)
    head = new_opt.state[grown.lm_head.weight]["exp_avg"]  # input-only tiled: factor 1
    torch.testing.assert_close(head, opt.state[model.lm_head.weight]["exp_avg"].repeat(1, 2))
    # the identity layer (after layer 0 by default... here the one new layer) starts cold
    kinds = [k for _, k in grown.growth_records[-1].layer_map]
    ident = kinds.index("identity")
    assert new_opt.state[grown.layers[ident].attn.q_proj.weight]["exp_avg"].abs().max() == 0
    new_opt.step()  # the mapped state is usable


# --------------------------------------------------------------------------------------
# bad input: ValueError naming the argument, before anything is allocated
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: grow_width(m, 1), "scale_factor"),
        (lambda m: grow_width(m, 0), "scale_factor"),
        (lambda m: grow_width(m, -2), "scale_factor"),
        (lambda m: grow_width(m, 2.5), "scale_factor"),
        (lambda m: grow_width(m, "2"), "scale_factor"),
        (lambda m: grow_width(m, 2, noise_std=-1.0), "noise_std"),
        (lambda m: grow_width(m, 2, noise="gauss"), "noise"),
        (lambda m: grow_depth(m, -1), "extra_layers"),
        (lambda m: grow_depth(m, 1, mode="copy"), "mode"),
        (lambda m: upcycle_to_moe(m, 4, 5), "top_k"),
        (lambda m: upcycle_to_moe(m, 1, 1), "n_experts"),
        (lambda m: upcycle_to_moe(m, 4, 0), "top_k"),
        (lambda m: scale_bilaterally(m, 2, extra_layers=-1), "extra_layers"),
        (lambda m: scale_bilaterally(m, 1), "scale_factor"),
        (lambda m: scale_bilaterally(m, 2, depth_mode="deep"), "depth_mode"),
        (lambda m: scale_bilaterally(m, 2, extra_layers=1, positions=[3]), "positions"),
    ],
)
def test_bad_input_is_refused_before_allocation(call, match, monkeypatch):
    model = random_model(seed=16)
    import growkit.growth.adapters as adapters

    built = []
    monkeypatch.setattr(adapters.FamilyAdapter, "build", lambda self, c, s, like=None: built.append(c))
    with pytest.raises(ValueError, match=match):
        call(model)
    assert not built, "a model was built before the error"


def test_upcycling_an_moe_model_is_refused():
    moe = random_model(seed=16, n_experts=2, top_k=1)
    with pytest.raises(ValueError, match="already"):
        upcycle_to_moe(moe, 4, 2)


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown architecture"):
        grow_width(torch.nn.Linear(4, 4), 2)
    with pytest.raises(TypeError, match="model"):
        grow_width("model", 2)


def test_whole_float_scale_is_accepted():
    model = random_model(seed=17)
    assert grow_width(model, 2.0).config.d_model == 64


def test_randomized_norms_would_catch_a_tiling_bug(monkeypatch):
    """Plant a tiling bug (norm gains divided instead of tiled): the test must see it."""
    import growkit.growth.width as width

    real = width.tile_for_role

    def buggy(t, role, scale, **kw):
        out = real(t, role, scale, **kw)
        return out / scale if role is Role.NORM and kw.get("divide", True) else out

    monkeypatch.setattr(width, "tile_for_role", buggy)
    model = random_model(seed=18)
    ids = random_ids()
    assert rel_err(logits(grow_width(model, 2), ids), logits(model, ids)) > 1e-3
    randomize_(model, 19)
