"""The TinyStories pipeline under torchrun: 2 gloo ranks on the CPU (FSDP2 and DDP).

This module starts one pair of processes with torchrun's environment (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT on 127.0.0.1 with a free port); each runs the scenarios below
through ``growkit.train.pipeline.main`` (the code ``torchrun train_tinystories.py`` runs)
and writes what it saw to ``rank<r>.json``; the grown weights each rank built are written
before they are sharded. Before the pair starts, this process runs the tiny pipeline once
whole and once killed mid phase 3 (a single-process checkpoint for the ranks to resume);
after, it resumes a 2-rank checkpoint alone. Running this file as a script is the worker:
``python tests/test_distributed_pipeline.py --worker DIR``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from rank_launcher import run_ranks, run_scenarios  # noqa: E402
from model_factory import TINY_PIPELINE as TINY  # noqa: E402

WORLD = 2
# The losses a resumed run must reproduce exactly (timings and throughput differ).
EXACT_KEYS = ("kind", "phase", "step", "global_step", "loss", "ce_loss", "aux_loss",
              "val_loss", "lr", "grad_norm", "tokens_seen", "flops", "event",
              "val_loss_before", "val_rel_change", "min_twin_divergence", "router_min_entropy",
              "router_max_topk_share", "monitor_warnings")
SHORT = ["--steps-phase1", "2"]
# 2 ranks vs 1 process on the same global batches: measured up to 2.5e-6 relative on the
# cross entropy over 14 steps; ranks training on the same half batch differ by 1.2e-2
LOSS_RTOL = 1e-4  # the planted failures stop at the first growth


def _exact(records):
    return [{k: r[k] for k in EXACT_KEYS} for r in records]


# ----------------------------------------------------------------------------------------
# the worker (each rank)
# ----------------------------------------------------------------------------------------
def _record_grown(patches, out: Path, tag: str, rank: int):
    """Writes the whole grown model of each growth (before it is sharded) to a file."""
    from safetensors.torch import save_file

    from growkit.train.distributed import DistributedTrainer

    real = DistributedTrainer._reshard

    def reshard(self, model, optimizer):
        phase = self.state["phase"] + 1
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                  str(out / f"grown_{tag}_phase{phase}_rank{rank}.safetensors"))
        return real(self, model, optimizer)

    patches.setattr(DistributedTrainer, "_reshard", reshard)


def _count_metrics_logs(patches, seen: list):
    import growkit.train.trainer as trainer_mod

    real = trainer_mod.MetricsLog

    class Counted(real):
        def __init__(self, *a, **k):
            seen.append(str(a[0]) if a else "?")
            super().__init__(*a, **k)

    patches.setattr(trainer_mod, "MetricsLog", Counted)


def _kill_at(patches, steps: dict):
    from growkit.train.distributed import DistributedTrainer

    real = DistributedTrainer._train_step

    def flaky(self, *a, **k):
        if self.state["global_step"] + 1 == steps.get("at"):
            raise KeyboardInterrupt
        return real(self, *a, **k)

    patches.setattr(DistributedTrainer, "_train_step", flaky)


def _capture_states(patches, states: list):
    """Keeps each rank's trainer state (its verdicts) at the end of run()."""
    from growkit.train.trainer import Trainer

    real = Trainer.grow_into

    def grow_into(self, phase):
        try:
            real(self, phase)
        finally:
            states.append(json.loads(json.dumps(self.state.get("checks", {}))))

    patches.setattr(Trainer, "grow_into", grow_into)


def scenario_fsdp(out: Path, rank: int) -> dict:
    """The whole pipeline (FSDP2), its grown models, its MetricsLogs; then a run killed at
    global step 7 (resumed from the phase-1 end: both growths redone) and 13 (resumed from
    step 12, mid phase 3: the grown model loaded), resumed to the end."""
    from growkit.train import pipeline

    p, logs, states = pytest.MonkeyPatch(), [], []
    _record_grown(p, out, "fsdp", rank)
    _count_metrics_logs(p, logs)
    _capture_states(p, states)
    try:
        code = pipeline.main([*TINY, "--run-dir", str(out / "fsdp")])
    finally:
        p.undo()
    res = {"code": code, "metrics_logs": logs, "checks": states}
    steps = {"at": 7}
    _kill_at(p, steps)
    try:
        res["kill7"] = pipeline.main([*TINY, "--run-dir", str(out / "fsdp_resumed")])
        steps["at"] = 13
        res["kill13"] = pipeline.main(["--resume", str(out / "fsdp_resumed")])
        if rank == 0:  # a copy stopped at step 12, for the single process to resume
            shutil.copytree(out / "fsdp_resumed", out / "fsdp_partial")
        import torch.distributed as dist

        dist.barrier()
        steps["at"] = None
        res["resumed"] = pipeline.main(["--resume", str(out / "fsdp_resumed")])
    finally:
        p.undo()
    return res


def scenario_ddp(out: Path, rank: int) -> dict:
    from growkit.train import pipeline

    p, states = pytest.MonkeyPatch(), []
    _record_grown(p, out, "ddp", rank)
    _capture_states(p, states)
    try:
        code = pipeline.main([*TINY, "--parallel", "ddp", "--run-dir", str(out / "ddp")])
    finally:
        p.undo()
    return {"code": code, "checks": states}


def scenario_corrupt_one_rank(out: Path, rank: int) -> dict:
    """A planted bug on rank 1 only: one tensor of its upcycled model scaled by 3."""
    import growkit.growth as growth
    from growkit.train import pipeline

    p, states = pytest.MonkeyPatch(), []
    _capture_states(p, states)
    if rank == 1:
        real = growth.upcycle_to_moe

        def broken(*a, **k):
            model = real(*a, **k)
            with torch.no_grad():
                model.layers[0].attn.o_proj.weight.mul_(3.0)
            return model

        p.setattr(growth, "upcycle_to_moe", broken)
    try:
        code = pipeline.main([*TINY, *SHORT, "--run-dir", str(out / "corrupt")])
    finally:
        p.undo()
    return {"code": code, "checks": states}


def scenario_check_fails_on_one_rank(out: Path, rank: int) -> dict:
    """Rank 1's check result says FAILED (the weights are right): every rank must stop."""
    from growkit.train import pipeline
    from growkit.train.trainer import Trainer

    p, states = pytest.MonkeyPatch(), []
    _capture_states(p, states)
    if rank == 1:
        real = Trainer._run_check

        def failing(self, *a, **k):
            passed, report, full, short = real(self, *a, **k)
            return False, dict(report, passed=False), full, "planted failure"

        p.setattr(Trainer, "_run_check", failing)
    try:
        code = pipeline.main([*TINY, *SHORT, "--run-dir", str(out / "checkfail")])
    finally:
        p.undo()
    return {"code": code, "checks": states}


def scenario_resume_single_process_run(out: Path, rank: int) -> dict:
    """Resume, on 2 ranks, a run one process started (safetensors checkpoint at step 12)."""
    from growkit.train import pipeline

    return {"code": pipeline.main(["--resume", str(out / "single_partial")])}


NEW_ONLY = ["--train-after-growth", "new", "--keep-checkpoints", "10"]


def scenario_new_only(out: Path, rank: int) -> dict:
    """--train-after-growth new, sharded (FSDP2) and replicated (DDP)."""
    from growkit.train import pipeline

    return {mode: pipeline.main([*TINY, *NEW_ONLY, "--parallel", mode, "--run-dir", str(out / f"new_{mode}")])
            for mode in ("fsdp", "ddp")}


SCENARIOS = {"fsdp": scenario_fsdp, "ddp": scenario_ddp, "new_only": scenario_new_only,
             "corrupt": scenario_corrupt_one_rank,
             "checkfail": scenario_check_fails_on_one_rank,
             "resume_single": scenario_resume_single_process_run}


def _worker(out_dir: str) -> int:
    out = Path(out_dir)
    return run_scenarios(out, {name: (lambda rank, fn=fn: fn(out, rank)) for name, fn in SCENARIOS.items()})


# ----------------------------------------------------------------------------------------
# the tests
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process runs (whole; killed at step 13), then the 2-rank scenarios."""
    from growkit.train import pipeline
    from growkit.train.trainer import Trainer

    n_threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("dist_pipeline")
    assert "WORLD_SIZE" not in os.environ
    assert pipeline.main([*TINY, "--run-dir", str(out / "single")]) == 0
    assert pipeline.main([*TINY, *NEW_ONLY, "--run-dir", str(out / "single_new")]) == 0
    real = Trainer._train_step

    def flaky(self, *a, **k):
        if self.state["global_step"] + 1 == 13:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    Trainer._train_step = flaky
    try:
        assert pipeline.main([*TINY, "--run-dir", str(out / "single_partial")]) == 130
    finally:
        Trainer._train_step = real
    results, logs = run_ranks(__file__, out, WORLD, 180.0)
    torch.set_num_threads(n_threads)
    return out, results, logs


def _metrics(run_dir: Path):
    from growkit.train.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def _grow_reference(ckpt: Path, run_dir: Path, phase: int):
    """A single-process growth of the weights in ``ckpt`` (a 2-rank sharded checkpoint, read
    whole), with the run's settings, exactly as Trainer._grow calls the operators."""
    import growkit.growth as growth
    from growkit.train.config import TrainConfig
    from growkit.train.distributed import load_sharded_whole

    cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    old, _ = load_sharded_whole(ckpt, torch.device("cpu"), cfg)
    if phase == 2:
        return growth.upcycle_to_moe(old, cfg.n_experts, cfg.top_k, seed=cfg.seed,
                                     router_init=cfg.router_init, calibration=None)
    return growth.scale_bilaterally(old, cfg.scale_factor, cfg.extra_layers, cfg.noise_std,
                                    depth_mode=cfg.depth_mode, seed=cfg.seed)


@pytest.mark.parametrize("tag", ["fsdp", "ddp"])
def test_grown_weights_equal_single_process_growth(runs, tag):
    """Every rank's grown model (width + depth into phase 3, the upcycling into phase 2) is
    bit for bit a single-process growth of the pre-growth weights the ranks held (read back
    from the phase-end checkpoint, which DCP wrote from the shards)."""
    from safetensors.torch import load_file

    out, results, _ = runs
    run_dir = out / tag
    for r in range(WORLD):
        assert results[r][tag]["code"] == 0
    for phase, ckpt in ((2, "step-00000006-phase1-end"), (3, "step-00000010-phase2-end")):
        ref = _grow_reference(run_dir / "checkpoints" / ckpt, run_dir, phase).state_dict()
        for r in range(WORLD):
            got = load_file(str(out / f"grown_{tag}_phase{phase}_rank{r}.safetensors"))
            assert sorted(got) == sorted(ref)
            for name, t in ref.items():
                assert torch.equal(got[name], t), (tag, phase, r, name)
    # phase 3 really grew: wider and deeper than phase 2
    final = json.loads((run_dir / "final" / "config.json").read_text())
    assert final["d_model"] == 64 and final["n_layers"] == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["checks_passed"]


def test_every_rank_same_verdict_and_only_rank0_writes(runs):
    out, results, logs = runs
    for tag in ("fsdp", "ddp"):
        verdicts = [results[r][tag]["checks"] for r in range(WORLD)]
        assert verdicts[0] == verdicts[1] and len(verdicts[0]) == 2
        assert all(c["passed"] for c in verdicts[0][-1].values())
    # rank 0 alone opened metrics.jsonl; it holds each record once, like one process's
    assert results[0]["fsdp"]["metrics_logs"] == [str(out / "fsdp" / "metrics.jsonl")]
    assert results[1]["fsdp"]["metrics_logs"] == []
    key = [(r["kind"], r["phase"], r["step"], r["global_step"]) for r in _metrics(out / "fsdp")]
    assert key == [(r["kind"], r["phase"], r["step"], r["global_step"]) for r in _metrics(out / "single")]
    assert "=== summary ===" in logs.split("--- rank 1:")[0]
    assert "=== summary ===" not in logs.split("--- rank 1:")[1]
    report = json.loads((out / "fsdp" / "verify_phase3_scale_bilaterally.json").read_text())
    ranks = report["check"]["ranks"]
    assert [r["passed"] for r in ranks] == [True, True] and report["check"]["grown_weights_agree"]
    assert [r["probe_rows"] for r in ranks] == [[0, 2], [0, 2]]  # every rank checks the whole probe
    single = json.loads((out / "single" / "verify_phase3_scale_bilaterally.json").read_text())
    assert report["check"]["summary"] == single["check"]["summary"]  # the single process's verdicts


def test_two_rank_losses_match_single_process(runs):
    """Data parallel over the same global batches: the losses agree with one process's to
    float rounding (the gradient is averaged over two halves instead of one batch)."""
    out, _, _ = runs
    one = [r for r in _metrics(out / "single") if r["kind"] == "train"]
    two = [r for r in _metrics(out / "fsdp") if r["kind"] == "train"]
    assert len(one) == len(two) == 14
    for a, b in zip(one, two):
        assert math.isclose(a["ce_loss"], b["ce_loss"], rel_tol=LOSS_RTOL), (a, b)


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_train_after_growth_new_under_torchrun(runs, mode):
    """--train-after-growth new on 2 ranks: after each growth only what it added trains;
    every entry the pre-growth model had is bit-identical at the end of the phase (each
    rank froze and put back its own shard), what was added moved, and the losses are one
    process's with the same setting (to float rounding)."""
    from growkit.growth import trainable_mask
    from growkit.models import load_model
    from growkit.train.config import TrainConfig
    from growkit.train.distributed import load_sharded_whole

    out, results, logs = runs
    run_dir = out / f"new_{mode}"
    assert [results[r]["new_only"][mode] for r in range(WORLD)] == [0, 0]
    cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    ckpts = run_dir / "checkpoints"
    phase2_end, _ = load_sharded_whole(ckpts / "step-00000010-phase2-end", torch.device("cpu"), cfg)
    for phase, start_ckpt, end in ((2, "step-00000006-phase1-end", phase2_end),
                                   (3, "step-00000010-phase2-end", load_model(run_dir / "final"))):
        start = _grow_reference(ckpts / start_ckpt, run_dir, phase)
        old = trainable_mask(start, "old", records=start.growth_records)
        moved = 0
        for name, p in end.named_parameters():
            p0, m = start.get_parameter(name).detach(), old[name]
            if m is True:
                assert torch.equal(p, p0), (phase, name)
            elif m is False:
                moved += not torch.equal(p, p0)
            else:
                assert torch.equal(p[m], p0[m]), (phase, name)
                moved += not torch.equal(p[~m], p0[~m])
        assert moved >= 3, (phase, moved)
    one = [r for r in _metrics(out / "single_new") if r["kind"] == "train"]
    two = [r for r in _metrics(run_dir) if r["kind"] == "train"]
    assert len(one) == len(two) == 14
    for a, b in zip(one, two):
        assert math.isclose(a["ce_loss"], b["ce_loss"], rel_tol=LOSS_RTOL), (a, b)
        # NOTE: in phase 2 only the routers and the new experts train, and the routers'
        # gradient is mostly the load-balancing loss, which each rank takes over its own
        # half batch (not linear in the batch): the norms differ there by up to 9e-4
        # relative, also without the freeze's masks (1.1e-5 when everything trains)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=LOSS_RTOL if a["phase"] != 2 else 3e-3), (a, b)
    # and not by accident: training everything gives other losses after the first growth
    every = [r for r in _metrics(out / "single") if r["kind"] == "train"]
    assert any(not math.isclose(a["ce_loss"], b["ce_loss"], rel_tol=LOSS_RTOL) for a, b in zip(every[7:], two[7:]))
    assert logs.count("training only what phase 3's growth added") >= 1


@pytest.mark.parametrize("scenario", ["corrupt", "checkfail"])
def test_failure_on_one_rank_fails_every_rank(runs, scenario):
    out, results, _ = runs
    codes = [results[r][scenario]["code"] for r in range(WORLD)]
    assert codes == [1, 1]  # EXIT_FAILED_CHECK on both ranks
    verdicts = [results[r][scenario]["checks"][-1]["phase2"] for r in range(WORLD)]
    assert verdicts[0] == verdicts[1] and verdicts[0]["passed"] is False
    report = json.loads((out / scenario / "verify_phase2_upcycle_to_moe.json").read_text())
    assert report["passed"] is False
    assert [r["passed"] for r in report["check"]["ranks"]] == [True, False]
    # the corrupted weights differ between the ranks; the planted verdict alone does not
    assert report["check"]["grown_weights_agree"] is (scenario == "checkfail")
    summary = json.loads((out / scenario / "summary.json").read_text())
    assert summary["status"] == "failed_check"
    assert not (out / scenario / "final").exists()


def test_resume_same_world_size_is_bit_identical(runs):
    out, results, _ = runs
    for r in range(WORLD):
        res = results[r]["fsdp"]
        assert (res["kill7"], res["kill13"], res["resumed"]) == (130, 130, 0)
    assert _exact(_metrics(out / "fsdp_resumed")) == _exact(_metrics(out / "fsdp"))
    from growkit.models import load_model

    a, b = load_model(out / "fsdp" / "final"), load_model(out / "fsdp_resumed" / "final")
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    # the sharded checkpoints: DCP shards of both ranks, listed in a verified manifest
    ck = out / "fsdp" / "checkpoints" / "step-00000012"
    manifest = json.loads((ck / "manifest.json").read_text())
    assert manifest["layout"] == "sharded"
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(manifest["files"])
    assert not (ck / "model.safetensors").exists()


def test_resume_at_another_world_size(runs, tmp_path):
    """A 2-rank checkpoint (step 12, sharded) resumed by one process, and a one-process
    checkpoint (step 12, safetensors) resumed by 2 ranks: both finish, with the losses of the
    uninterrupted run up to float rounding (and exactly up to the checkpoint)."""
    from growkit.train import pipeline

    out, results, _ = runs
    n_threads = torch.get_num_threads()
    run_dir = tmp_path / "partial"
    shutil.copytree(out / "fsdp_partial", run_dir)
    try:
        assert pipeline.main(["--resume", str(run_dir)]) == 0
    finally:
        torch.set_num_threads(n_threads)
    assert [results[r]["resume_single"]["code"] for r in range(WORLD)] == [0, 0]
    for resumed, ref in ((run_dir, out / "fsdp"), (out / "single_partial", out / "single")):
        got, want = _metrics(resumed), _metrics(ref)
        assert [(r["kind"], r["global_step"]) for r in got] == [(r["kind"], r["global_step"]) for r in want]
        n_before = sum(1 for r in want if r["global_step"] <= 12 and r["kind"] == "train")
        train_got = [r for r in got if r["kind"] == "train"]
        train_want = [r for r in want if r["kind"] == "train"]
        assert _exact(train_got[:n_before]) == _exact(train_want[:n_before])
        for a, b in zip(train_got[n_before:], train_want[n_before:]):
            assert math.isclose(a["ce_loss"], b["ce_loss"], rel_tol=LOSS_RTOL), (a, b)
        assert json.loads((resumed / "summary.json").read_text())["status"] == "completed"


def test_batch_size_must_divide_among_ranks():
    from growkit.train.config import preset_config
    from growkit.train.distributed import DistContext

    ctx = DistContext(rank=0, world=3, local_rank=0, device=torch.device("cpu"), owns_group=False)
    with pytest.raises(ValueError, match="batch_size=16 must be a multiple of the world size 3"):
        ctx.check_config(preset_config("tiny"))
    ctx.check_config(preset_config("tiny", batch_size=18, probe_batch_size=1))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.exit(_worker(sys.argv[2]))


def test_resume_refuses_a_metadata_pickle_that_runs_code(runs, tmp_path, capsys):
    """The newest sharded checkpoint's ``dcp/.metadata`` replaced by a pickle that calls a
    function, its manifest rewritten to match (so the checksums pass): resuming refuses the
    file (exit 4, naming it) and nothing in it runs."""
    import hashlib
    import pickle

    from growkit.train import pipeline

    from test_hardening import _RunsACommand

    out, _, _ = runs
    run_dir = tmp_path / "partial"
    shutil.copytree(out / "fsdp_partial", run_dir)
    ckpt = max((run_dir / "checkpoints").glob("step-*"))
    marker = tmp_path / "ran"
    meta = ckpt / "dcp" / ".metadata"
    meta.write_bytes(pickle.dumps(_RunsACommand(marker)))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["dcp/.metadata"] = {"bytes": meta.stat().st_size,
                                          "sha256": hashlib.sha256(meta.read_bytes()).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    n_threads = torch.get_num_threads()
    try:
        assert pipeline.main(["--resume", str(run_dir)]) == 4
    finally:
        torch.set_num_threads(n_threads)
    assert not marker.exists()
    assert "is not DCP metadata: posix.system is not part of" in capsys.readouterr().err
