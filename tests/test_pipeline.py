"""Tests of the three-phase TinyStories pipeline (growkit.train: config, trainer, checkpoints).

Every run here is tiny (d_model 32, 2 layers, seq 32, a few steps per phase) so that the
whole file stays well under a minute on two CPU cores, growth kernels included (they run
in the Triton interpreter, see conftest.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import growkit.growth as growth
from growkit.cli import main as cli_main
from growkit.models import ModelConfig, Transformer, load_model
from growkit.train import pipeline
from growkit.train.checkpoint import load_optimizer, save_optimizer
from growkit.train.config import (
    PRESETS,
    PhaseConfig,
    TrainConfig,
    parse_command_line,
    preset_config,
)
from growkit.train.metrics import parameter_counts, read_metrics, training_flops_per_token
from growkit.train.trainer import Trainer, lr_at, make_optimizer

# Phase 1: 6 steps (global 1-6), phase 2: 4 steps (7-10), phase 3: 4 steps (11-14).
from model_factory import TINY_PIPELINE as TINY  # noqa: E402
# The losses a resumed run must reproduce exactly (timings and throughput differ).
EXACT_KEYS = ("kind", "phase", "step", "global_step", "loss", "ce_loss", "aux_loss",
              "val_loss", "lr", "grad_norm", "tokens_seen", "flops", "event",
              "val_loss_before", "val_rel_change", "min_twin_divergence", "router_min_entropy",
              "router_max_topk_share", "monitor_warnings")


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    """The runs use --threads 1 (torch.set_num_threads is process-wide): restore it after."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run_main(tmp_path: Path, name: str, *extra: str) -> tuple[int, Path]:
    run_dir = tmp_path / name
    code = pipeline.main([*TINY, "--run-dir", str(run_dir), *extra])
    return code, run_dir


def exact(records):
    return [{k: r[k] for k in EXACT_KEYS} for r in records]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted tiny run, shared by the artifact and resume tests."""
    tmp = tmp_path_factory.mktemp("ref")
    code, run_dir = run_main(tmp, "run", "--plot")
    assert code == 0
    return run_dir


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

def test_config_file_json_yaml_and_cli_overrides(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(
        {"steps_phase1": 7, "lr_phase2": 5e-4, "d_model": 96, "reset_optimizer": True}))
    # YAML 1.1 reads 2e-4 (no dot) as a string: it must still become a float.
    (tmp_path / "c.yaml").write_text(
        "steps_phase1: 8\nlr_phase2: 2e-4\nd_model: 128\ndepth_mode: stack\n")
    cfg = parse_command_line(
        ["--preset", "tiny", "--config", str(tmp_path / "c.json"), "--steps-phase1", "100",
         "--lr_phase1", "0.002", "--no-reset-optimizer"]).cfg
    assert cfg.phase1.steps == 100  # flag beats file
    assert cfg.phase1.lr == 0.002 and cfg.phase2.lr == 5e-4  # file beats preset
    assert cfg.d_model == 96 and cfg.reset_optimizer is False
    assert cfg.phase2.steps == PRESETS["tiny"]["phase2"]["steps"]  # preset beats default
    cfg = parse_command_line(["--config", str(tmp_path / "c.yaml")]).cfg
    assert (cfg.phase1.steps, cfg.phase2.lr, cfg.d_model, cfg.depth_mode) == (8, 2e-4, 128, "stack")
    assert isinstance(cfg.phase2.lr, float)
    # Both spellings of a flag; None for optional fields.
    cfg = parse_command_line(["--steps_phase3", "5", "--d-ff", "None"]).cfg
    assert cfg.phase3.steps == 5 and cfg.d_ff is None
    # Round trip through the JSON a run directory stores.
    assert TrainConfig.from_dict(json.loads(cfg.to_json_str())) == cfg


def test_presets_are_valid():
    for name in PRESETS:
        cfg = preset_config(name)
        assert cfg.name == name
        cfg.model_config(257)  # a valid ModelConfig
    tiny = preset_config("tiny")
    tiny.check_runtime()  # runs on this machine: CPU, float32, embedded data, bytes
    assert (tiny.device, tiny.dtype, tiny.data, tiny.tokenizer) == ("cpu", "float32", "embedded", "byte")
    # Its budget: the grown phase-3 model dominates; keep the whole run small.
    mcfg = tiny.model_config(257)
    tokens = tiny.batch_size * tiny.seq_len
    flops = tokens * (tiny.phase1.steps * training_flops_per_token(mcfg, tiny.seq_len))
    assert flops < 1e12


@pytest.mark.parametrize("field,value", [
    ("phase1.steps", -1), ("phase2.lr", 0.0), ("phase3.lr", 5.0), ("n_heads", 3),
    ("n_experts", 1), ("top_k", 9), ("scale_factor", 1), ("device", "tpu"),
    ("dtype", "float16"), ("tokenizer", "word"), ("depth_mode", "zero"),
    ("val_fraction", 1.0), ("batch_size", 0), ("seq_len", True), ("schedule", "linear"),
    ("phase1.warmup_frac", 1.5), ("grad_clip", -1.0), ("n_kv_heads", 3), ("d_model", 0),
    ("seed", 1.5), ("progress", "yes"), ("phase2.steps", 2.5),
])
def test_bad_values_raise_naming_the_field(field, value):
    # ValueError for a value out of range, TypeError for one of the wrong kind (a bool
    # or a fraction for a whole number, a string for a switch).
    with pytest.raises((ValueError, TypeError), match=field.replace(".", r"\.")):
        TrainConfig.from_dict({field: value})


def test_bad_config_writes_nothing(tmp_path, capsys):
    out = tmp_path / "runs"
    assert pipeline.main(["--lr-phase1", "0", "--out-dir", str(out)]) == 2
    assert "TrainConfig.phase1.lr must be a finite number > 0" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps-phase1": 5, "stepz_phase2": 5}))
    assert pipeline.main(["--config", str(bad), "--out-dir", str(out)]) == 2
    assert "unknown TrainConfig keys ['stepz_phase2']" in capsys.readouterr().err
    assert pipeline.main(["--data", str(tmp_path / "missing.txt"), "--out-dir", str(out)]) == 2
    assert "data" in capsys.readouterr().err
    assert not out.exists()


def test_cli_train_subcommand(capsys):
    assert cli_main(["train", "--preset", "tiny", "--steps-phase1", "3", "--print-config"]) == 0
    cfg = TrainConfig.from_dict(json.loads(capsys.readouterr().out))
    assert cfg.phase1.steps == 3 and cfg.name == "tiny"
    assert cli_main([]) == 2
    with pytest.raises(SystemExit):
        cli_main(["frobnicate"])


# ---------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(), dict(n_experts=4, top_k=2), dict(tie_embeddings=True),
    dict(n_kv_heads=1, attn_bias=True, mlp_bias=True, n_experts=2, top_k=1),
    dict(n_experts=4, top_k=2, dense_layers=(0,)),  # partial upcycling
])
def test_parameter_counts_and_flops(kw):
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, **kw)
    counts = parameter_counts(cfg)
    model = Transformer(cfg)
    assert counts["total"] == model.num_parameters()
    assert counts["embedding"] == 100 * 32
    expert_frac = cfg.top_k / cfg.n_experts if cfg.n_experts else 1.0
    # Only top_k / n_experts of the experts run per token; the input table is a lookup,
    # not a matmul (a tied matrix is still counted once, as the output head).
    expected = model.num_parameters() - counts["experts"] * (1 - expert_frac)
    if not cfg.tie_embeddings:
        expected -= 100 * 32
    assert counts["active"] == expected
    T = 16
    assert training_flops_per_token(cfg, T) == 6 * counts["active"] + 12 * 2 * 32 * T


def test_lr_schedule():
    cfg = TrainConfig(phase1=PhaseConfig(steps=100, lr=1e-3, warmup_frac=0.1), min_lr_ratio=0.1)
    assert lr_at(cfg, 1, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 1, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 1, 99) == pytest.approx(1e-4)
    assert all(lr_at(cfg, 1, s) >= lr_at(cfg, 1, s + 1) for s in range(10, 99))
    const = TrainConfig.from_dict({"schedule": "constant", "phase2": {"warmup_frac": 0.0, "lr": 3e-4}})
    assert {lr_at(const, 2, s) for s in range(const.phase2.steps)} == {3e-4}
    # A phase's own floor: 1 holds the peak after warmup (warmup-stable, then the growth),
    # 0.5 ends at half of it; the other phases keep the run's floor.
    wsd = TrainConfig.from_dict({"phase1.min_lr_ratio": 1.0, "phase3.min_lr_ratio": 0.5,
                                 "phase1.steps": 100, "phase1.lr": 1e-3, "phase1.warmup_frac": 0.1})
    assert lr_at(wsd, 1, 0) == pytest.approx(1e-4)
    assert {lr_at(wsd, 1, s) for s in range(9, 100)} == {1e-3}
    assert lr_at(wsd, 3, wsd.phase3.steps - 1) == pytest.approx(0.5 * wsd.phase3.lr)
    assert lr_at(wsd, 2, wsd.phase2.steps - 1) == pytest.approx(wsd.min_lr_ratio * wsd.phase2.lr)


def test_optimizer_state_roundtrip_is_exact(tmp_path):
    cfg = TrainConfig()
    model = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2))
    opt = make_optimizer(model, cfg, 1e-3)
    x = torch.randint(0, 50, (2, 8))
    for _ in range(2):
        model.loss(x, x).backward()
        opt.step()
        opt.zero_grad()
    save_optimizer(opt, model, tmp_path)
    opt2 = make_optimizer(model, cfg, 5e-1)
    load_optimizer(opt2, model, tmp_path)
    for p in model.parameters():
        a, b = opt.state[p], opt2.state[p]
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]


# ---------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------

def test_full_run_produces_all_artifacts(reference_run):
    d = reference_run
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "summary.json",
                 "latest.json", "verify_phase2_upcycle_to_moe.json",
                 "verify_phase3_scale_bilaterally.json", "final/model.safetensors",
                 "final/config.json", "final/tokenizer.json"):
        assert (d / name).is_file(), name
    try:
        import matplotlib  # noqa: F401

        assert (d / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        pass

    recs = read_metrics(d / "metrics.jsonl")
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["global_step"] for r in train] == list(range(1, 15))
    assert [r["phase"] for r in train] == [1] * 6 + [2] * 4 + [3] * 4
    for r in train:
        assert all(r[k] is not None for k in ("loss", "lr", "tokens_per_s", "tokens_seen", "flops"))
        assert math.isfinite(r["loss"])
    assert train[-1]["tokens_seen"] == 14 * 4 * 32
    growth_recs = [r for r in recs if r["kind"] == "growth"]
    assert [g["event"] for g in growth_recs] == ["upcycle_to_moe", "scale_bilaterally"]
    for g in growth_recs:  # the first val loss after growth is within 2% of the last before
        assert abs(g["val_loss"] - g["val_loss_before"]) <= 0.02 * g["val_loss_before"]
    # FLOPs per step grow with the model: phase 3 steps cost more than phase 1 steps.
    per_step = {r["phase"]: r["flops"] - p["flops"] for p, r in zip(train, train[1:])}
    assert per_step[1] < per_step[2] < per_step[3]

    summary = json.loads((d / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["checks_passed"]
    assert set(summary["phases"]) == {"1", "2", "3"}
    assert summary["tokens_seen"] == 14 * 4 * 32
    assert summary["flops"] == pytest.approx(train[-1]["flops"])
    assert summary["data"].startswith("embedded TinyStories sample")
    # Each growth's loss spike: the largest validation loss in the first quarter of the
    # next phase (the eval right after the growth and the extra post-growth one at step
    # 1) relative to the last one before the growth.
    for key in ("phase2", "phase3"):
        g = summary["growth"][key]
        evals = [r for r in recs if r["kind"] == "eval" and r["phase"] == int(key[-1])
                 and r["step"] <= 1]
        assert [r["step"] for r in evals] == [0, 1]
        assert g["max_val_first_quarter"] == max(r["val_loss"] for r in evals)
        assert g["post_growth_spike"] == pytest.approx(
            g["max_val_first_quarter"] / g["val_loss_before"] - 1)
        assert g["spike_complete"] is True
    for ph in summary["phases"].values():
        assert math.isfinite(ph["final_val_loss"])
    report = json.loads((d / "verify_phase3_scale_bilaterally.json").read_text())
    assert report["passed"] is True and report["check_passed"] is True

    final = load_model(d / "final")
    assert final.config.d_model == 64 and final.config.n_layers == 3
    assert final.config.n_experts == 4
    # TrainConfig.model_config predicts every phase's architecture (the arms trained from
    # scratch in bench/ rely on it for phase 3).
    cfg = TrainConfig.from_dict(json.loads((d / "config.json").read_text()))
    for p, ph in summary["phases"].items():
        assert cfg.model_config(final.config.vocab_size, phase=int(p)).to_dict() == ph["model_config"]


def test_checkpoints_hold_no_pickle(reference_run):
    ckpts = sorted((reference_run / "checkpoints").iterdir())
    names = [p.name for p in ckpts]
    # phase ends are kept; of the periodic ones only the newest (keep_checkpoints=1)
    assert names == ["step-00000006-phase1-end", "step-00000010-phase2-end",
                     "step-00000012", "step-00000014-phase3-end"]
    for p in reference_run.rglob("*"):
        if not p.is_file():
            continue
        # Every file parses as what its name says, so none is a pickle (torch.save
        # writes a zip, "PK\x03\x04", or a bare pickle).
        assert p.suffix in (".json", ".jsonl", ".safetensors", ".png"), p
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                assert list(f.keys())
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            for line in p.read_text().splitlines():
                json.loads(line)
    ck = reference_run / "checkpoints" / "step-00000012"
    with safe_open(str(ck / "rng.safetensors"), "pt") as f:
        assert f.get_tensor("batch_generator").dtype == torch.uint8
        assert f.get_tensor("torch_cpu").dtype == torch.uint8
    state = json.loads((ck / "state.json").read_text())
    assert (state["phase"], state["phase_step"], state["global_step"]) == (3, 2, 12)
    # the checkpoint stores the grown model's config
    assert load_model(ck).config.d_model == 64


def test_resume_reproduces_uninterrupted_run(reference_run, tmp_path, monkeypatch):
    """Kill at global step 7 (latest checkpoint: the phase-1 end, so the resumed run redoes
    both growths), resume, kill at step 13 (checkpoint 12, mid phase 3: the grown model is
    loaded), resume to the end: the losses equal the uninterrupted run's exactly."""
    real_step = Trainer._train_step
    kill_at = {"step": None}

    def flaky_step(self, *a, **k):
        if self.state["global_step"] + 1 == kill_at["step"]:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(Trainer, "_train_step", flaky_step)
    kill_at["step"] = 7
    code, run_dir = run_main(tmp_path, "run")
    assert code == 130
    assert json.loads((run_dir / "latest.json").read_text())["global_step"] == 6
    kill_at["step"] = 13
    assert pipeline.main(["--resume", str(run_dir)]) == 130
    assert json.loads((run_dir / "latest.json").read_text())["global_step"] == 12
    kill_at["step"] = None
    assert pipeline.main(["--resume", str(run_dir)]) == 0

    ref = read_metrics(reference_run / "metrics.jsonl")
    got = read_metrics(run_dir / "metrics.jsonl")
    assert exact(got) == exact(ref)
    ref_sum = json.loads((reference_run / "summary.json").read_text())
    got_sum = json.loads((run_dir / "summary.json").read_text())
    assert got_sum["phases"] == ref_sum["phases"] and got_sum["status"] == "completed"
    a, b = load_model(reference_run / "final"), load_model(run_dir / "final")
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_resume_refuses_to_change_the_run(reference_run, capsys):
    assert pipeline.main(["--resume", str(reference_run), "--lr-phase1", "0.5"]) == 2
    assert "--resume cannot change ['phase1.lr']" in capsys.readouterr().err


def _corrupt_width_growth(monkeypatch, operator: str = "scale_bilaterally"):
    """Plant a weight-expansion bug: one grown tensor is scaled after a correct growth."""
    real = getattr(growth, operator)

    def broken(*a, **k):
        model = real(*a, **k)
        with torch.no_grad():
            model.layers[0].attn.o_proj.weight.mul_(3.0)
        return model

    monkeypatch.setattr(growth, operator, broken)


def test_failed_check_stops_the_run_and_continue_resumes_it(tmp_path, monkeypatch, capsys):
    """A planted weight-expansion bug fails the phase-3 check: the run stops (exit 1) with
    the report; resuming with --continue-on-failed-check trains on (and records the
    failure). The run uses --reset-optimizer, so that path is covered too."""
    _corrupt_width_growth(monkeypatch)
    code, run_dir = run_main(tmp_path, "run", "--reset-optimizer")
    assert code == 1
    assert "--continue-on-failed-check" in capsys.readouterr().err
    report = json.loads((run_dir / "verify_phase3_scale_bilaterally.json").read_text())
    assert report["passed"] is False and report["check_passed"] is False
    assert any(c["status"] == "FAILED" for c in report["check"]["checks"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed_check" and not summary["checks_passed"]
    assert summary["checks"]["phase2"]["passed"] and not summary["checks"]["phase3"]["passed"]
    recs = read_metrics(run_dir / "metrics.jsonl")
    assert max(r["phase"] for r in recs if r["kind"] == "train") == 2
    assert not (run_dir / "final").exists()

    assert pipeline.main(["--resume", str(run_dir), "--continue-on-failed-check"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and not summary["checks_passed"]
    assert summary["reset_optimizer"] is True
    recs = read_metrics(run_dir / "metrics.jsonl")
    assert [r["global_step"] for r in recs if r["kind"] == "train"] == list(range(1, 15))
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_train_after_growth_new_keeps_every_old_entry_and_logs_the_monitor(tmp_path):
    """--train-after-growth new: phase 3 trains only what scale_bilaterally added (the new
    layer, the clone blocks); every entry the phase-2 model had is bit-identical at the end.
    The grown phases log GrowthMonitor figures (router load, twin divergence)."""
    code, run = run_main(tmp_path, "new-only", "--train-after-growth", "new",
                         "--router-init", "orthogonal", "--keep-checkpoints", "10")
    assert code == 0
    cfg = json.loads((run / "config.json").read_text())
    moe = load_model(sorted((run / "checkpoints").glob("*phase2-end"))[-1])
    start = growth.scale_bilaterally(moe, 2, 1, cfg["noise_std"], seed=cfg["seed"])
    final = load_model(run / "final")
    old = growth.trainable_mask(start, "old", records=start.growth_records)
    moved = 0
    for name, p in final.named_parameters():
        p0, m = start.get_parameter(name), old[name]
        if m is True:
            assert torch.equal(p, p0), name
        elif m is False:
            moved += not torch.equal(p, p0)
        else:
            assert torch.equal(p[m], p0[m]), name
            moved += not torch.equal(p[~m], p0[~m])
    assert moved > 10
    monitor = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "monitor"]
    assert {r["phase"] for r in monitor} == {2, 3}
    assert all(0 < r["router_max_topk_share"] <= 1 for r in monitor)
    assert all(r["min_twin_divergence"] > 0 for r in monitor if r["phase"] == 3)


@pytest.mark.parametrize("stack_scale", [None, 0.25])
def test_stack_mode_checks_the_widening_exactly_then_stacks(tmp_path, monkeypatch, stack_scale):
    """--depth-mode stack (G_stack changes the function by design): the width step is grown
    and checked alone (every check passes, functional identity included, and the loss is
    unchanged), then the layers are stacked; the run needs no --continue-on-failed-check,
    its grown model is the one scale_bilaterally(depth_mode="stack") makes, and the
    stacking's loss change is reported. A planted width bug still stops the run."""
    scale_args = () if stack_scale is None else ("--stack-scale", str(stack_scale))
    code, run = run_main(tmp_path, "stack", "--depth-mode", "stack", "--keep-checkpoints", "10", *scale_args)
    assert code == 0
    report = json.loads((run / "verify_phase3_scale_bilaterally.json").read_text())
    assert report["passed"] and report["check_passed"] and report["val_ok"]
    status = {c["name"]: c["status"] for c in report["check"]["checks"]}
    assert status["functional_identity"] == "PASSED", status
    assert report["val_rel_change"] <= report["val_tolerance"]
    stack = report["depth_stack"]
    assert stack["val_loss_after"] != report["val_loss_after"]  # the function changed
    assert stack["stack_scale"] == (1.0 if stack_scale is None else stack_scale)
    assert report["new_model_config"]["n_layers"] == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["growth"]["phase3"]["val_loss_after"] == stack["val_loss_after"]

    cfg = json.loads((run / "config.json").read_text())
    moe = load_model(sorted((run / "checkpoints").glob("*phase2-end"))[-1])
    expected = growth.scale_bilaterally(moe, 2, 1, cfg["noise_std"], depth_mode="stack",
                                        stack_scale=stack_scale, seed=cfg["seed"])
    grown = Trainer.__new__(Trainer)  # only the growth steps, as grow_into runs them
    grown.cfg = TrainConfig.from_dict(cfg)
    made = grown._by_design(3, moe, grown._grow(3, moe))[1]
    assert [r.op for r in made.growth_records] == [r.op for r in expected.growth_records]
    for (name, p), (name2, q) in zip(made.state_dict().items(), expected.state_dict().items()):
        assert name == name2 and torch.equal(p, q), name

    _corrupt_width_growth(monkeypatch, operator="grow_width")
    code, bad = run_main(tmp_path, "stack-bad", "--depth-mode", "stack")
    assert code == 1
    report = json.loads((bad / "verify_phase3_scale_bilaterally.json").read_text())
    assert not report["check_passed"] and "depth_stack" not in report


def test_drop_upcycling_checks_the_exact_upcycling_then_redraws_units(tmp_path, monkeypatch):
    """--expert-reinit (Drop-Upcycling, not function-preserving by design): the upcycling is
    grown exact and checked (functional identity PASSED, the loss unchanged), then redone
    with the units re-drawn; the run needs no --continue-on-failed-check and records the
    re-drawn model's loss from there on. A planted bug in the exact upcycling still stops it."""
    code, run = run_main(tmp_path, "drop", "--expert-reinit", "0.5")
    assert code == 0
    report = json.loads((run / "verify_phase2_upcycle_to_moe.json").read_text())
    assert report["passed"] and report["check_passed"] and report["val_rel_change"] == 0
    status = {c["name"]: c["status"] for c in report["check"]["checks"]}
    assert status["functional_identity"] == "PASSED", status
    drop = report["expert_reinit"]
    assert drop["expert_reinit"] == 0.5 and drop["val_loss_after"] != report["val_loss_after"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["growth"]["phase2"]["val_loss_after"] == drop["val_loss_after"]
    assert "expert_reinit" not in json.loads((run / "verify_phase3_scale_bilaterally.json").read_text())

    real = growth.upcycle_to_moe

    def broken(*a, **k):  # only the exact upcycling (the one checked) is wrong
        model = real(*a, **k)
        if not k.get("expert_reinit"):
            with torch.no_grad():
                model.layers[0].mlp.experts.down_proj.mul_(3.0)
        return model

    monkeypatch.setattr(growth, "upcycle_to_moe", broken)
    code, bad = run_main(tmp_path, "drop-bad", "--expert-reinit", "0.5")
    assert code == 1
    report = json.loads((bad / "verify_phase2_upcycle_to_moe.json").read_text())
    assert not report["check_passed"] and "expert_reinit" not in report


def test_stack_scale_0_is_identity_layers_checked_with_the_widening(tmp_path, monkeypatch):
    """--stack-scale 0: identity layers in G_stack's places, function-preserving, so the
    whole growth (width and depth together) is grown and checked at once: no stacking step
    after the checks, no loss change; a planted bug in the layers' writers stops the run."""
    code, run = run_main(tmp_path, "stack0", "--depth-mode", "stack", "--stack-scale", "0",
                         "--extra-layers", "2")
    assert code == 0
    report = json.loads((run / "verify_phase3_scale_bilaterally.json").read_text())
    assert report["passed"] and "depth_stack" not in report
    assert report["new_model_config"]["n_layers"] == 4
    idents = [t["source"] for c in report["check"]["checks"] if c["name"] == "functional_identity"
              for t in c["table"]]
    assert "identity after old 1 (copy of old 0)" in idents, idents

    real = growth.scale_bilaterally

    def unzeroed(*a, **k):  # the stacked layers' writers left as full copies
        grown = real(*a, **k)
        with torch.no_grad():
            grown.layers[-1].attn.o_proj.weight.copy_(grown.layers[0].attn.o_proj.weight)
        return grown

    monkeypatch.setattr(growth, "scale_bilaterally", unzeroed)
    code, bad = run_main(tmp_path, "stack0-bad", "--depth-mode", "stack", "--stack-scale", "0",
                         "--extra-layers", "2")
    assert code == 1
    assert not json.loads((bad / "verify_phase3_scale_bilaterally.json").read_text())["check_passed"]
