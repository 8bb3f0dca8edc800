"""GrowthMonitor on 2 gloo ranks (FSDP2, DDP) on the CPU, and inside transformers.Trainer.

The distributed scenarios run in one pair of processes that this module starts (torchrun's
environment: RANK, WORLD_SIZE, MASTER_ADDR/PORT on 127.0.0.1 with a free port); each rank
writes what it measured, and the single-process monitor's figures on the same full weights
and on the concatenated batch, to a JSON file that the tests below compare. Running this
file as a script is the worker: ``python tests/test_distributed_monitor.py --worker DIR``.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import sys
import warnings

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from rank_launcher import run_ranks, run_scenarios  # noqa: E402
from model_factory import random_ids, random_model  # noqa: E402

from growkit.growth import grow_width, upcycle_to_moe  # noqa: E402
from growkit.verify import GrowthMonitor, GrowthWarning  # noqa: E402
from growkit.verify.distributed import RankReducer, TwinTensor, chunk_range, unit_rows  # noqa: E402
from growkit.verify.router import expert_load  # noqa: E402

WORLD = 2
# all-reduced means vs the single-process ones: float32 rounding of the summation order only
# (measured: up to 1.7e-6 for rel_div, 4e-7 for the magnitude); maxima and router figures are exact
RTOL = 1e-5
VOCAB = 97  # odd: the LM head's vocabulary rows shard unevenly (49 + 48)


# ----------------------------------------------------------------------------------------
# the worker (each rank)
# ----------------------------------------------------------------------------------------
def _full_weights(model):
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


@torch.no_grad()
def _load(model, weights):
    for n, p in model.named_parameters():
        p.copy_(weights[n])
    return model


def _record(rec):
    d = rec.to_dict()
    d.pop("seconds")
    return d


def _fsdp(model, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _batch(rank, step, batch=2):
    return random_ids(VOCAB, (batch, 13), seed=1000 + 10 * step + rank)


def scenario_fsdp_twins(rank, world):
    """(a) FSDP2 on widened models (x2: rank 1 holds no block-0 row of q/k/v/o/MLP; x3: the
    shards cut through twin blocks), trained 2 steps on different batches per rank."""
    out = {}
    for scale in (2, 3):
        grown = grow_width(random_model(0, vocab_size=VOCAB, n_heads=4, n_kv_heads=2), scale, noise_std=1e-3)
        grown.train()
        ref_before = _record(GrowthMonitor(grown, every=1).measure(-1))
        model = _fsdp(copy.deepcopy(grown), world)
        monitor = GrowthMonitor(model, every=1)
        before = _record(monitor.measure(-1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(2):
            ids = _batch(rank, step)
            model.loss(ids[:, :-1], ids[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
            rec = monitor.step(step)
        from torch.distributed.tensor import DTensor

        sharded = sum(isinstance(p, DTensor) for p in model.parameters())
        # the single-process monitor on the same (full) weights
        ref = GrowthMonitor(_load(copy.deepcopy(grown), _full_weights(model)), every=1)
        out[f"x{scale}"] = dict(before=before, ref_before=ref_before, after=_record(rec),
                                ref_after=_record(ref.measure(1)), sharded=sharded,
                                params=sum(1 for _ in model.parameters()), seconds=monitor.history[-1].seconds)
        monitor.close()
    return out


def scenario_identical_twins(rank, world):
    """(b) a planted bug: grown with noise_std=0, every twin identical: every rank warns."""
    model = _fsdp(grow_width(random_model(1, vocab_size=VOCAB), 2, noise_std=0), world)
    monitor = GrowthMonitor(model, every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = monitor.step(0)
    monitor.close()
    return dict(record=_record(rec),
                warned=[str(w.message) for w in caught if issubclass(w.category, GrowthWarning)])


def scenario_ddp_moe(rank, world):
    """(c) DDP on an upcycled (and widened) MoE model: router load all-reduced over the ranks'
    batches, twins reduced from the replicated weights."""
    from torch.nn.parallel import DistributedDataParallel

    from growkit.models.transformer import causal_lm_loss

    dense = grow_width(random_model(2, vocab_size=VOCAB), 2, noise_std=1e-3)
    moe = upcycle_to_moe(dense, 4, 2, router_std=0.5, seed=3)
    moe.train()
    ddp = DistributedDataParallel(copy.deepcopy(moe), find_unused_parameters=True)
    # upcycle_to_moe records only itself: the width of the clones is passed
    monitor = GrowthMonitor(ddp, every=1, scale_factor=2)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    ids = _batch(rank, 0, batch=3)
    causal_lm_loss(ddp(ids[:, :-1]), ids[:, 1:]).backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        ddp(_batch(rank, 1, batch=3))  # the monitor's hooks keep this rank's router logits
    rec = monitor.step(0)
    monitor.close()
    # one process, the same weights, every rank's batch at once
    single = _load(copy.deepcopy(moe), _full_weights(ddp.module))
    ref = GrowthMonitor(single, every=1, scale_factor=2)
    everything = torch.cat([_batch(r, 1, batch=3) for r in range(world)])
    with torch.no_grad():
        single(everything)
    ref_rec = ref.measure(0)
    direct = expert_load([m.last_router_logits for m in single.moe_layers()], 2)
    return dict(record=_record(rec), ref=_record(ref_rec),
                direct=[{k: v for k, v in d.items() if k != "load"} for d in direct])


def scenario_other_layouts(rank, world):
    """DTensor layouts other than FSDP2's Shard(0), in bfloat16: q_proj Shard(1) (gathered
    whole: the fallback), k_proj Replicate (each rank takes its units), the rest Shard(0)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    grown = grow_width(random_model(4, vocab_size=VOCAB), 3, noise_std=1e-3).to(torch.bfloat16)
    model = copy.deepcopy(grown)
    mesh = init_device_mesh("cpu", (world,))
    for name, p in list(model.named_parameters()):
        layout = [Shard(1)] if name.endswith("q_proj.weight") else [Replicate()] if "k_proj" in name else [Shard(0)]
        module, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(module), attr, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, layout)))
    return dict(record=_record(GrowthMonitor(model, every=1).measure(0)),
                ref=_record(GrowthMonitor(grown, every=1).measure(0)))


def scenario_fsdp_hf_fused(rank, world):
    """FSDP2 on Hugging Face models grown x3: Phi3's fused qkv_proj and gate_up_proj (parts
    fused along the sharded dim 0) and Qwen3-MoE's expert stacks (parts fused along dim 1) and
    routers; measured sharded, then after a forward that leaves the root's parameters unsharded
    (reshard_after_forward=False): plain tensors and DTensors mixed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hf_zoo import tiny_model

    out = {}
    for family in ("phi3", "qwen3_moe"):
        grown = grow_width(tiny_model(family), 3, noise_std=1e-3)
        ref = _record(GrowthMonitor(copy.deepcopy(grown), every=1).measure(0))
        model = copy.deepcopy(grown)
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        monitor = GrowthMonitor(model, every=1)
        sharded = _record(monitor.measure(0))
        with torch.no_grad():
            model(input_ids=random_ids(50, (2, 8), seed=rank))
        from torch.distributed.tensor import DTensor

        kinds = sorted({"DTensor" if isinstance(p, DTensor) else "plain" for p in model.parameters()})
        mixed = _record(monitor.measure(1))
        monitor.close()
        out[family] = dict(ref=ref, sharded=sharded, mixed=mixed, kinds=kinds)
    return out


SCENARIOS = {"fsdp_twins": scenario_fsdp_twins, "identical_twins": scenario_identical_twins,
             "ddp_moe": scenario_ddp_moe, "other_layouts": scenario_other_layouts,
             "fsdp_hf_fused": scenario_fsdp_hf_fused}


def _worker(out_dir: str) -> int:
    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    return run_scenarios(out_dir, {name: (lambda rank, fn=fn: fn(rank, world)) for name, fn in SCENARIOS.items()})


# ----------------------------------------------------------------------------------------
# the tests
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs the scenarios on 2 gloo ranks once; the list of each rank's results."""
    out = tmp_path_factory.mktemp("dist_monitor")
    results, logs = run_ranks(__file__, out, WORLD, 150.0)
    return results


def _same_twins(got, ref, exact_rel=False):
    assert [t["group"] for t in got["twins"]] == [t["group"] for t in ref["twins"]]
    for a, b in zip(got["twins"], ref["twins"]):
        assert a["tensors"] == b["tensors"]
        assert a["max_div"] == b["max_div"], a["group"]  # a max does not depend on the order
        if exact_rel:
            assert a["rel_div"] == b["rel_div"]
        else:
            assert math.isclose(a["rel_div"], b["rel_div"], rel_tol=RTOL, abs_tol=0), (a, b)
        assert math.isclose(a["magnitude"], b["magnitude"], rel_tol=RTOL), (a, b)


def test_fsdp2_monitor_equals_single_process(ranks):
    for scale in ("x2", "x3"):
        per_rank = [r["fsdp_twins"][scale] for r in ranks]
        for res in per_rank:
            assert res["sharded"] == res["params"] > 0  # every parameter a DTensor
            _same_twins(res["before"], res["ref_before"])
            _same_twins(res["after"], res["ref_after"])
            # tracked: q, k, v, o, gate, up, down of every layer, and the LM head (vocab rows)
            assert sum(t["tensors"] for t in res["after"]["twins"]) == 3 * 7 + 1
            assert not res["after"]["warnings"] and res["after"]["min_twin_divergence"] > 1e-5
        # every rank got the same figures (the all-reduced ones)
        assert per_rank[0]["after"] == per_rank[1]["after"]
        assert per_rank[0]["before"] == per_rank[1]["before"]
        # trained: the figures moved, and the reference saw the moved weights
        assert per_rank[0]["after"]["twins"] != per_rank[0]["before"]["twins"]


def test_identical_twins_warn_on_every_rank(ranks):
    for r, res in enumerate(ranks):
        res = res["identical_twins"]
        assert res["record"]["min_twin_divergence"] == 0.0
        assert any("clones identical" in w for w in res["warned"]), f"rank {r} did not warn"
        assert res["record"]["warnings"] == ranks[0]["identical_twins"]["record"]["warnings"]


def test_ddp_router_load_is_all_reduced(ranks):
    for res in ranks:
        res = res["ddp_moe"]
        rec, ref = res["record"], res["ref"]
        assert len(rec["router"]) == 3
        # counts are whole numbers: the all-reduced load is exactly the concatenated batch's
        assert rec["router"] == ref["router"]
        for mine, direct in zip(ref["router"], res["direct"]):
            assert mine["busiest_expert"] == direct["busiest_expert"]
            for key in ("entropy", "busiest_share", "topk_share"):
                assert math.isclose(mine[key], direct[key], rel_tol=1e-6), key
        _same_twins(rec, ref)
        assert rec["twins"] and rec["min_twin_divergence"] > 0
    assert ranks[0]["ddp_moe"]["record"] == ranks[1]["ddp_moe"]["record"]


def test_other_dtensor_layouts_equal_single_process(ranks):
    for res in ranks:
        res = res["other_layouts"]
        _same_twins(res["record"], res["ref"])
        assert res["record"]["min_twin_divergence"] > 0 and not res["record"]["warnings"]
    assert ranks[0]["other_layouts"]["record"] == ranks[1]["other_layouts"]["record"]


def test_fsdp2_fused_hf_parameters_and_unsharded_mid_step(ranks):
    for res in ranks:
        for family in ("phi3", "qwen3_moe"):
            r = res["fsdp_hf_fused"][family]
            assert r["kinds"] == ["DTensor", "plain"]  # the root's parameters unsharded after forward
            _same_twins(r["sharded"], r["ref"])
            _same_twins(r["mixed"], r["ref"])
        roles = {family: {role for t in res["fsdp_hf_fused"][family]["ref"]["twins"] for role in t["roles"]}
                 for family in ("phi3", "qwen3_moe")}
        assert {"q_proj", "k_proj", "v_proj", "mlp_gate", "mlp_up"} <= roles["phi3"]  # fused parts
        assert {"expert_gate", "expert_up", "expert_down"} <= roles["qwen3_moe"]
        assert len(res["fsdp_hf_fused"]["qwen3_moe"]["mixed"]["router"]) == 3
    assert ranks[0]["fsdp_hf_fused"] == ranks[1]["fsdp_hf_fused"]


# ----------------------------------------------------------------------------------------
# the row partition and the exchange plan, on simulated ranks (no processes)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("rows,blocks,fused", [(48, 3, None), (96, 2, None), (97, 1, None), (72, 3, (24, 36))])
def test_units_partition_and_exchange_order(world, rows, blocks, fused):
    """Every unit on exactly one rank, and what each rank receives from the all_to_all is its
    unit rows in twin-block order (the ranks' sends emulated in-process). ``fused``: the
    tensor is a part fused along dim 0, with (before, after) rows of other parts around it."""
    before, after = fused or (0, 0)
    n_param = before + rows + after
    full = torch.arange(n_param * 5, dtype=torch.float32).reshape(n_param, 5)
    m = TwinTensor("w", (rows, 5), blocks) if fused is None else TwinTensor("w", (rows, 5), blocks, 0, before)
    units = [unit_rows(rows, blocks, world, k) for k in range(world)]
    assert sorted(torch.cat(units).tolist()) == list(range(rows))
    reducers = []
    for k in range(world):
        r = RankReducer()
        r.world, r.rank = world, k
        reducers.append(r)
    plans = [r._plan(n_param, m, "cpu") for r in reducers]
    shards = [full[slice(*chunk_range(n_param, world, k))] for k in range(world)]
    for k in range(world):
        # what rank src sends rank k: its rows [start, start + in_splits[k]) of its send list
        sent = []
        for src in range(world):
            start = sum(plans[src].in_splits[:k])
            sent.append(shards[src][plans[src].send[start:start + plans[src].in_splits[k]]])
        assert plans[k].out_splits == [len(rows_) for rows_ in sent]
        want = m.part(full)[units[k]]
        assert torch.equal(torch.cat(sent), want)
        # replicated weights: the same rows without an exchange
        assert torch.equal(reducers[k].replicated_rows(m, full), want)
    assert plans[0].local_only == (blocks == 1 and fused is None)


# ----------------------------------------------------------------------------------------
# transformers.Trainer
# ----------------------------------------------------------------------------------------
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return grow_width(LlamaForCausalLM(cfg), 2, noise_std=1e-3)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=12):
        self.ids = random_ids(VOCAB, (n, seq), seed=5)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _require_accelerate() -> None:
    """transformers.Trainer requires accelerate: a missing install fails (not skips) the test."""
    if importlib.util.find_spec("accelerate") is None:
        pytest.fail("transformers.Trainer needs accelerate>=1.1: pip install accelerate (growkit's "
                    "hf extra does not install it yet)")


@pytest.fixture
def one_thread():
    """One torch thread for the tiny Trainer runs (a thread pool spins on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_trainer_callback_logs_monitor_figures(tmp_path, one_thread):
    _require_accelerate()
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from growkit.verify.hf_callback import GrowthMonitorCallback, add_growth_monitor

    class Reporter(TrainerCallback):  # stands for TensorBoard & co: what on_log hands them
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=100, report_to="none", use_cpu=True,
                             save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    reporter = Reporter()
    trainer = Trainer(model=_tiny_llama(), args=args, train_dataset=_Rows(), callbacks=[reporter])
    callback = add_growth_monitor(trainer, every=2)
    assert isinstance(callback, GrowthMonitorCallback)
    assert trainer.callback_handler.callbacks[0] is callback  # before every reporter
    trainer.train()

    logged = [e for e in trainer.state.log_history if "growth/twin_div_min" in e]
    assert [e["step"] for e in logged] == [2, 4]  # every 2 steps, in the Trainer's log entries
    for e in logged:
        assert e["growth/twin_div_min"] > 0 and e["growth/warnings"] == 0
        assert "loss" in e  # the Trainer's own log of that step
    seen = [e for e in reporter.logs if "growth/twin_div_min" in e]
    assert len(seen) == 2 and seen[0]["growth/twin_div_min"] == logged[0]["growth/twin_div_min"]
    assert callback.monitor is not None and len(callback.monitor.history) == 2


def test_trainer_callback_reports_identical_twins_and_router_load(tmp_path, one_thread):
    _require_accelerate()
    from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainingArguments

    from growkit.verify.hf_callback import GrowthMonitorCallback

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=64)
    model = grow_width(MixtralForCausalLM(cfg), 2, noise_std=0)  # identical twins: a bug
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    callback = GrowthMonitorCallback(every=1)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[callback])
    with pytest.warns(GrowthWarning, match="clones identical"):
        trainer.train()
    (entry,) = [e for e in trainer.state.log_history if "growth/warnings" in e]
    assert entry["growth/warnings"] > 0 and entry["growth/twin_div_min"] == 0.0
    for layer in range(2):
        assert 0 < entry[f"growth/router_entropy/layer_{layer}"] <= 1
        assert 0.5 <= entry[f"growth/router_topk_share/layer_{layer}"] <= 1
    # closed at on_train_end: its hooks are gone, a forward pass no longer reaches it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GrowthWarning)
        before = callback.monitor.measure(9).router
        with torch.no_grad():
            model(input_ids=random_ids(VOCAB, (3, 7), seed=11).to(model.device))
        assert callback.monitor.measure(10).router == before


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.exit(_worker(sys.argv[2]))
