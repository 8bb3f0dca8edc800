"""Masks that follow the growth records: train only what growth added (LLaMA-Pro), or only
what it kept, or both at their own learning rates.

Every weight is random (norm gains and biases too). The expected old / new entries are
worked out here from the source model's shapes and the growth's known layout, not from
the records, so a wrong record or a tampered layer map shows up as an old entry that
moved (the planted-bug tests check exactly that).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from model_factory import random_ids, random_model  # noqa: E402

from growkit.growth import (  # noqa: E402
    GrowthFreeze,
    freeze_for_growth,
    get_adapter,
    grow_depth,
    grow_width,
    growth_param_groups,
    load_growth_records,
    save_grown,
    scale_bilaterally,
    trainable_mask,
    upcycle_to_moe,
)
from growkit.growth.records import GrowthRecord  # noqa: E402
from growkit.models import Transformer  # noqa: E402
from growkit.models.transformer import causal_lm_loss  # noqa: E402


# ---------------------------------------------------------------------------- helpers
def hf_llama(seed: int = 0):
    hf_zoo = pytest.importorskip("hf_zoo")
    return hf_zoo.tiny_model("llama", seed=seed, attention_bias=True, mlp_bias=True)


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model, Transformer):
        return causal_lm_loss(model(ids[:, :-1]), ids[:, 1:])
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def ids_for(model, seed: int = 0) -> torch.Tensor:
    return random_ids(model.config.vocab_size, (2, 12), seed)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(model, optimizer, steps: int = 3) -> None:
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, ids_for(model, step)).backward()
        optimizer.step()


def dense(mask, p: torch.Tensor) -> torch.Tensor:
    return torch.full(p.shape, bool(mask)) if isinstance(mask, bool) else mask


def assert_only_trainable_moved(model, before, trainable: dict[str, torch.Tensor]) -> None:
    """Every entry outside ``trainable`` is bit-identical; every parameter with a trainable
    entry moved somewhere in it."""
    for name, p in model.named_parameters():
        moved = p.detach() != before[name]
        t = dense(trainable[name], p)
        assert not (moved & ~t).any(), f"{name}: {int((moved & ~t).sum())} frozen entries moved"
        if t.any():
            assert (moved & t).any(), f"{name}: no trainable entry moved"


def width_truth(source, grown) -> dict[str, torch.Tensor]:
    """Old entries of a widened model: the leading block shaped like the source tensor."""
    src = dict(source.named_parameters())
    out = {}
    for name, p in grown.named_parameters():
        old = torch.zeros(p.shape, dtype=torch.bool)
        old[tuple(slice(0, n) for n in src[name].shape)] = True
        out[name] = old
    return out


def depth_truth(grown, new_layers: set[int]) -> dict[str, torch.Tensor]:
    """Old entries after depth growth: everything outside the added layers."""
    adapter = get_adapter(grown)
    roles = adapter.param_roles(grown)
    return {name: torch.full(p.shape, roles[name].layer not in new_layers) for name, p in grown.named_parameters()}


def count_old(model, masks) -> int:
    return sum(int(dense(masks[n], p).sum()) for n, p in model.named_parameters())


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# default_positions(3, 2) = [0, 2]: layers [0, new, 1, 2, new]
NEW_LAYERS_3_PLUS_2 = {1, 4}


# Width growth of the reference model, made once (the Triton interpreter makes it slow):
# each test takes a deep copy (records included).
@pytest.fixture(scope="module")
def _widened():
    source = random_model()
    return source, grow_width(source, 2)


@pytest.fixture
def widened(_widened):
    source, grown = _widened
    return source, copy.deepcopy(grown)


@pytest.fixture(scope="module")
def _bilateral():
    source = random_model()
    return source, scale_bilaterally(source, 2, 2)


@pytest.fixture
def bilateral(_bilateral):
    source, grown = _bilateral
    return source, copy.deepcopy(grown)


# ---------------------------------------------------------------------------- masks
def test_no_records_is_an_error_that_says_how_to_get_them():
    model = random_model()
    with pytest.raises(ValueError, match="growth_records") as info:
        trainable_mask(model)
    assert "load_grown" in str(info.value) and "records=" in str(info.value)
    with pytest.raises(ValueError, match="which"):
        trainable_mask(grow_depth(model, 1), "newest")
    with pytest.raises(ValueError, match="experts"):
        trainable_mask(grow_depth(model, 1), experts="some")


@pytest.mark.parametrize("scale", [2, 3])
def test_width_old_is_the_first_clone_block(scale, _widened):
    # scale 3 on a tied model (the reference model keeps it tied through logit_scale)
    source, grown = _widened if scale == 2 else (None, None)
    if scale == 3:
        source = random_model(tie_embeddings=True)
        grown = grow_width(source, scale)
    truth = width_truth(source, grown)
    new, old, everything = trainable_mask(grown, "new"), trainable_mask(grown, "old"), trainable_mask(grown, "all")
    for name, p in grown.named_parameters():
        assert torch.equal(dense(old[name], p), truth[name]), name
        assert torch.equal(dense(new[name], p), ~truth[name]), name
        assert everything[name] is True
        assert isinstance(new[name], bool) or new[name].dtype == torch.bool
    # the old entries are exactly as many as the source model had
    assert count_old(grown, old) == n_params(source)


def test_depth_new_layers_are_wholly_new_for_identity_and_stack():
    source = random_model()
    grown = grow_depth(source, 2)
    masks = trainable_mask(grown)
    truth = depth_truth(grown, NEW_LAYERS_3_PLUS_2)
    for name, p in grown.named_parameters():
        assert masks[name] is (not bool(truth[name].all())), name
    for stack_scale in (1.0, 0.5, 0.0):  # full, damped copies, identity blocks in their places
        stacked = grow_depth(source, 3, mode="stack", stack_scale=stack_scale)  # [0 1 2 | 0 1 2]
        masks = trainable_mask(stacked)
        truth = depth_truth(stacked, {3, 4, 5})
        assert all(masks[n] is (not bool(truth[n].all())) for n in masks), stack_scale


def test_chains_compose_and_new_stays_new(_bilateral, _widened):
    source, both = _bilateral
    masks = trainable_mask(both, "old")
    roles = get_adapter(both).param_roles(both)
    src = dict(source.named_parameters())
    for name, p in both.named_parameters():
        layer = roles[name].layer
        if layer in NEW_LAYERS_3_PLUS_2:
            assert masks[name] is False, name  # an identity layer of the widened model: all new
            continue
        kept = {0: 0, 2: 1, 3: 2}.get(layer)
        src_name = name if layer is None else name.replace(f"layers.{layer}.", f"layers.{kept}.", 1)
        truth = torch.zeros(p.shape, dtype=torch.bool)
        truth[tuple(slice(0, n) for n in src[src_name].shape)] = True
        assert torch.equal(masks[name], truth), name
    assert count_old(both, masks) == n_params(source)

    # grown by two calls: the model's growth_history composes them by default (its
    # growth_records hold the last call's record only), as do the records passed together
    wide = _widened[1]  # the same source (random_model() is seeded)
    deep = grow_depth(wide, 2)
    assert [r.op for r in deep.growth_records] == ["depth"]
    assert [r.op for r in deep.growth_history] == ["width", "depth"]
    for chained in (trainable_mask(deep, "old"),
                    trainable_mask(deep, "old", records=wide.growth_records + deep.growth_records)):
        assert all(torch.equal(dense(chained[n], p), dense(masks[n], p)) for n, p in deep.named_parameters())
    # the last call alone: the width clones count as old
    last = trainable_mask(deep, "old", records=deep.growth_records)
    assert count_old(deep, last) > count_old(deep, masks)
    # records that are not this model's: refused
    with pytest.raises(ValueError, match="records"):
        trainable_mask(both, records=[both.growth_records[1]] + grow_depth(random_model(), 1).growth_records)
    with pytest.raises(ValueError, match="do not describe"):
        trainable_mask(both, records=wide.growth_records)  # the width step alone: 3 layers, not 5


@pytest.mark.parametrize("experts", ["first_old", "all_new"])
def test_moe_router_new_and_experts_by_choice(experts):
    source = random_model()
    moe = upcycle_to_moe(source, 4, 2)
    masks = trainable_mask(moe, experts=experts)
    for name, p in moe.named_parameters():
        if ".router." in name:
            assert masks[name] is True
        elif ".experts." in name:
            if experts == "all_new":
                assert masks[name] is True
            else:
                assert not masks[name][0].any() and masks[name][1:].all(), name
        else:
            assert masks[name] is False, name
    if experts == "first_old":
        assert count_old(moe, trainable_mask(moe, "old")) == n_params(source)
        # then widened: expert 0's first block is the only old part of an expert tensor
        wide = grow_width(moe, 2)
        old = trainable_mask(wide, "old", records=moe.growth_records + wide.growth_records)
        gate = old["layers.0.mlp.experts.gate_proj"]
        E, F, D = moe.get_parameter("layers.0.mlp.experts.gate_proj").shape
        assert gate.shape == (E, 2 * F, 2 * D)
        assert gate[0, :F, :D].all() and int(gate.sum()) == F * D


def test_hf_upcycled_fused_experts_and_phi3_fused_width():
    hf_zoo = pytest.importorskip("hf_zoo")
    moe = upcycle_to_moe(hf_zoo.tiny_model("llama"), 4, 2)  # -> Mixtral: experts fused, gate_up [E, 2I, d]
    masks = trainable_mask(moe)
    gate_up = masks["model.layers.0.mlp.experts.gate_up_proj"]
    assert not gate_up[0].any() and gate_up[1:].all()
    assert masks["model.layers.0.mlp.gate.weight"] is True
    assert masks["model.layers.0.self_attn.q_proj.weight"] is False
    phi3 = hf_zoo.tiny_model("phi3")
    wide = grow_width(phi3, 2)
    old = trainable_mask(wide, "old")["model.layers.0.self_attn.qkv_proj.weight"]
    hd, H, KV, d = 12, 4, 2, 48
    truth = torch.zeros(2 * (H + 2 * KV) * hd, 2 * d, dtype=torch.bool)
    for start, rows in ((0, H * hd), (2 * H * hd, KV * hd), (2 * (H + KV) * hd, KV * hd)):
        truth[start:start + rows, :d] = True  # the first block of q, of k and of v
    assert torch.equal(old, truth)


def test_records_from_disk_for_a_from_pretrained_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    grown = grow_width(hf_llama(), 2)
    save_grown(grown, tmp_path / "g")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    with pytest.raises(ValueError, match="load_growth_records"):
        trainable_mask(loaded)
    expected = trainable_mask(grown)
    for records in (tmp_path / "g", str(tmp_path / "g"), load_growth_records(tmp_path / "g")):
        got = trainable_mask(loaded, records=records)
        assert all(torch.equal(dense(got[n], p), dense(expected[n], p)) for n, p in loaded.named_parameters())


# ---------------------------------------------------------------------------- identity blocks
@pytest.mark.parametrize("kind", ["reference", "hf_llama"])
def test_identity_block_gradients_step_one_and_two(kind):
    source = random_model() if kind == "reference" else hf_llama()
    grown = grow_depth(source, 2)
    adapter = get_adapter(grown)
    roles = adapter.param_roles(grown)
    new = {n: p for n, p in grown.named_parameters() if roles[n].layer in NEW_LAYERS_3_PLUS_2}
    zeroed = {n for n in new if roles[n].rule.writes_residual}
    assert {roles[n].role.value for n in zeroed} == {"o_proj", "o_bias", "mlp_down", "mlp_down_bias"}
    assert all(not new[n].any() for n in zeroed)  # they start at exactly 0
    opt = torch.optim.SGD(grown.parameters(), lr=0.5)
    loss_of(grown, ids_for(grown)).backward()
    for name, p in new.items():
        if name in zeroed:
            assert p.grad.abs().max() > 0, f"{name}: a zeroed projection must get a gradient at step 1"
        else:
            assert p.grad is None or not p.grad.any(), f"{name}: must get exactly zero gradient at step 1"
    opt.step()
    opt.zero_grad()
    loss_of(grown, ids_for(grown, 1)).backward()
    for name, p in new.items():
        assert p.grad.abs().max() > 0, f"{name}: no gradient at step 2"


# ---------------------------------------------------------------------------- freezing
@pytest.mark.parametrize("kind", ["reference", "hf_llama"])
def test_llama_pro_train_only_new_blocks(kind):
    source = random_model() if kind == "reference" else hf_llama()
    grown = grow_depth(source, 2)
    before = snapshot(grown)
    handle = freeze_for_growth(grown, "new")
    assert isinstance(handle, GrowthFreeze) and not handle.partial
    truth = depth_truth(grown, NEW_LAYERS_3_PLUS_2)
    assert set(handle.frozen) == {n for n, t in truth.items() if t.all()}
    opt = torch.optim.AdamW([p for p in grown.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    train(grown, opt, 3)
    assert_only_trainable_moved(grown, before, {n: ~t for n, t in truth.items()})
    handle.remove()
    assert all(p.requires_grad for p in grown.parameters())


@pytest.mark.parametrize("which", ["new", "old"])
def test_width_freeze_keeps_the_other_side_bit_identical_under_adamw(which, widened):
    source, grown = widened
    truth = width_truth(source, grown)
    before = snapshot(grown)
    loss_of(grown, ids_for(grown)).backward()
    full_grads = {n: p.grad.clone() for n, p in grown.named_parameters()}
    grown.zero_grad(set_to_none=True)
    with freeze_for_growth(grown, which) as handle:
        assert len(handle.partial) == len(before) and handle.n_trainable == (
            n_params(source) if which == "old" else n_params(grown) - n_params(source))
        # the hooks pass the trainable entries' gradients through and zero the others
        loss_of(grown, ids_for(grown)).backward()
        for name, p in grown.named_parameters():
            t = truth[name] if which == "old" else ~truth[name]
            assert torch.equal(p.grad, torch.where(t, full_grads[name], 0.0)), name
        # every parameter, even the frozen ones: an optimizer built before freezing
        opt = torch.optim.AdamW(grown.parameters(), lr=1e-2, weight_decay=0.1)
        train(grown, opt, 3)
    assert_only_trainable_moved(grown, before, {n: t if which == "old" else ~t for n, t in truth.items()})


def test_adamw_trap_gradient_hooks_alone_let_frozen_entries_drift(_widened):
    """Weight decay and carried momentum move entries whose gradient is zeroed; the
    post-step restore keeps them bit-identical."""
    source, wide = _widened
    for restore, wd in ((False, 0.1), (False, 0.0), (True, 0.1), (True, 0.0)):
        grown = copy.deepcopy(wide)
        opt = torch.optim.AdamW(grown.parameters(), lr=1e-2, weight_decay=wd)
        if wd == 0.0:
            train(grown, opt, 2)  # momentum first, then freeze: m / sqrt(v) stays nonzero
        before = snapshot(grown)
        handle = freeze_for_growth(grown, "new", restore=restore)
        train(grown, opt, 2)
        handle.remove()
        old = width_truth(source, grown)
        drift = sum(int(((p.detach() != before[n]) & old[n]).sum()) for n, p in grown.named_parameters())
        if restore:
            assert drift == 0, (restore, wd)
        else:
            assert drift > 0, f"restore=False, weight_decay={wd}: the trap should show"


def test_remove_undoes_hooks_and_restore(widened):
    source, grown = widened
    handle = freeze_for_growth(grown, "new")
    with pytest.raises(ValueError, match="already frozen"):
        freeze_for_growth(grown, "new")
    handle.remove()
    handle.remove()  # idempotent
    loss_of(grown, ids_for(grown)).backward()
    q = grown.get_parameter("layers.0.attn.q_proj.weight")
    assert q.grad[:16, :16].abs().max() > 0  # the old block gets its gradient again
    before = snapshot(grown)
    torch.optim.AdamW(grown.parameters(), lr=1e-2, weight_decay=0.1).step()
    assert not torch.equal(q.detach()[:16, :16], before["layers.0.attn.q_proj.weight"][:16, :16])


# ---------------------------------------------------------------------------- param groups
def test_param_groups_give_each_entry_its_own_rate_exactly(bilateral):
    """One AdamW step through the groups equals a plain AdamW step at lr_new on the new
    entries and at lr_old on the old ones (same start, same gradients)."""
    source, grown = bilateral
    lr_new, lr_old, wd = 1e-2, 2.5e-3, 0.1
    groups = growth_param_groups(grown, lr_new, lr_old, wd)
    assert {(g["growth"], g["weight_decay"]) for g in groups} == {
        ("new", wd), ("new", 0.0), ("partial", wd), ("partial", 0.0)}
    for g in groups:
        assert all((p.dim() < 2) == (g["weight_decay"] == 0.0) for p in g["params"])
    refs = {}
    for lr in (lr_new, lr_old):
        ref = copy.deepcopy(grown)
        opt = torch.optim.AdamW([{"params": [p], "weight_decay": wd if p.dim() > 1 else 0.0}
                                 for p in ref.parameters()], lr=lr)
        train(ref, opt, 1)
        refs[lr] = dict(ref.named_parameters())
    opt = torch.optim.AdamW(groups)
    train(grown, opt, 1)
    new = trainable_mask(grown)
    for name, p in grown.named_parameters():
        m = dense(new[name], p)
        want = torch.where(m, refs[lr_new][name].detach(), refs[lr_old][name].detach())
        # the rescaled step is rounded once more: a few ulps (an update is ~1e-2)
        err = ((p.detach() - want).abs() / (want.abs() + 0.1)).max().item()
        assert err < 3e-7, f"{name}: off by {err:.2e} of its size"


@pytest.mark.parametrize("frozen_side", ["old", "new"])
def test_param_groups_rate_zero_is_bit_identical(frozen_side, widened):
    source, grown = widened
    truth = width_truth(source, grown)
    before = snapshot(grown)
    lr_new, lr_old = (1e-2, 0.0) if frozen_side == "old" else (0.0, 1e-2)
    opt = torch.optim.AdamW(growth_param_groups(grown, lr_new, lr_old, weight_decay=0.1))
    train(grown, opt, 3)
    assert_only_trainable_moved(grown, before, {n: ~t if frozen_side == "old" else t for n, t in truth.items()})


def test_param_groups_with_transformers_trainer():
    pytest.importorskip("accelerate")  # the Trainer needs it; skipped where it is not installed
    transformers = pytest.importorskip("transformers")
    source = hf_llama()
    grown = scale_bilaterally(source, 2, 2)
    before = snapshot(grown)
    opt = torch.optim.AdamW(growth_param_groups(grown, lr_new=1e-2, lr_old=0.0, weight_decay=0.1))
    ids = random_ids(grown.config.vocab_size, (4, 12))
    data = [{"input_ids": row, "labels": row} for row in ids]
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=2, per_device_train_batch_size=2, report_to="none", use_cpu=True,
            save_strategy="no", logging_strategy="no", disable_tqdm=True)
        transformers.Trainer(model=grown.train(), args=args, train_dataset=data, optimizers=(opt, None)).train()
    assert_only_trainable_moved(grown, before, trainable_mask(grown, "new"))


# ---------------------------------------------------------------------------- planted bugs
def test_planted_tampered_layer_map_is_caught_by_bit_identity():
    """A stack record whose layer map swaps an original layer and its copy passes every
    consistency check, so the mask trains old layer 1; the bit-identity check of the true
    old layers catches it."""
    source = random_model()
    grown = grow_depth(source, 2, mode="stack")  # [0 1 2 | 1 2]: new layers 3, 4
    record = grown.growth_records[0]
    assert record.layer_map == [(0, "original"), (1, "original"), (2, "original"), (1, "copy"), (2, "copy")]
    tampered = dataclasses.replace(record, layer_map=[(0, "original"), (1, "copy"), (2, "original"),
                                                     (1, "original"), (2, "copy")])
    truth = depth_truth(grown, {3, 4})
    for records, ok in (([record], True), ([tampered], False)):
        model = copy.deepcopy(grown)
        before = snapshot(model)
        freeze_for_growth(model, "new", records=records)
        train(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                       weight_decay=0.1), 2)
        if ok:
            assert_only_trainable_moved(model, before, {n: ~t for n, t in truth.items()})
        else:
            with pytest.raises(AssertionError, match="layers.1."):
                assert_only_trainable_moved(model, before, {n: ~t for n, t in truth.items()})


def test_planted_wrong_width_record_is_caught(widened):
    """A width record claiming scale 4 for a model widened by 2 marks part of the old block
    new: those entries train and the bit-identity check against the true layout fails. A
    record of an identity layer moved into an original one is refused outright."""
    source, grown = widened
    record = grown.growth_records[0]
    wrong = GrowthRecord(record.op, dict(record.settings),
                         {n: dataclasses.replace(s, scale=4) for n, s in record.sources.items()})
    before = snapshot(grown)
    freeze_for_growth(grown, "new", records=[wrong])
    train(grown, torch.optim.AdamW([p for p in grown.parameters() if p.requires_grad], lr=1e-2), 2)
    with pytest.raises(AssertionError, match="frozen entries moved"):
        assert_only_trainable_moved(grown, before, {n: ~t for n, t in width_truth(source, grown).items()})

    deep = grow_depth(source, 2)
    rec = deep.growth_records[0]
    bad_map = list(rec.layer_map)
    bad_map[1], bad_map[2] = (0, "original"), (1, "identity")
    with pytest.raises(ValueError, match="layer_map calls"):
        trainable_mask(deep, records=[dataclasses.replace(rec, layer_map=bad_map)])
