"""The arithmetic behind bench/growth_vs_scratch.py and bench/crossover.py: the budget a
growth recipe is given, where two loss curves cross, when a curve reaches a target."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from crossover import crossover  # noqa: E402
from growth_vs_scratch import (  # noqa: E402
    fill_budget,
    flops_to_reach,
    parse_variant,
    pipeline_flops,
    phase_step_flops,
)

from growkit.train.config import preset_config  # noqa: E402
from growkit.train.metrics import training_flops_per_token  # noqa: E402


def test_phase_step_flops_follow_each_phase_model():
    cfg = preset_config("tiny")
    f = phase_step_flops(cfg, 257)
    tokens = cfg.batch_size * cfg.seq_len
    for p in (1, 2, 3):
        assert f[p] == training_flops_per_token(cfg.model_config(257, phase=p), cfg.seq_len) * tokens
    assert f[1] < f[2] < f[3]
    grown = cfg.model_config(257, phase=3)
    assert (grown.d_model, grown.n_layers, grown.n_heads, grown.head_dim) == (128, 4, 8, 16)


@pytest.mark.parametrize("steps1", [600, 1200, 2400])
def test_fill_budget_spends_the_default_budget_to_one_step(steps1):
    base = preset_config("tiny")
    f = phase_step_flops(base, 257)
    budget = sum(getattr(base, f"phase{p}").steps * f[p] for p in (1, 2, 3))
    variant = preset_config("tiny", **{"phase1.steps": steps1, "phase3.lr": 1e-3})
    filled = fill_budget(variant, 257, budget)
    spent = sum(getattr(filled, f"phase{p}").steps * f[p] for p in (1, 2, 3))
    assert abs(spent - budget) <= f[3] / 2
    assert filled.phase3.lr == 1e-3 and filled.phase1.steps == steps1
    # Growing later leaves fewer (costlier) phase-3 steps.
    assert (filled.phase3.steps < base.phase3.steps) == (steps1 > base.phase1.steps)


def test_fill_budget_refuses_a_budget_spent_before_phase_3():
    base = preset_config("tiny")
    f = phase_step_flops(base, 257)
    with pytest.raises(ValueError, match="no phase-3 step"):
        fill_budget(preset_config("tiny", **{"phase1.steps": 10**6}), 257, 1000 * f[1])


def test_parse_variant_changes_fields_and_refuses_shared_ones():
    base = preset_config("tiny")
    name, items, cfg, fraction = parse_variant(
        "late:phase1.steps=3000, noise-std=1e-2,reset-optimizer", base)
    assert name == "late" and items == ["phase1.steps=3000", "noise-std=1e-2", "reset-optimizer"]
    assert (cfg.phase1.steps, cfg.noise_std, cfg.reset_optimizer) == (3000, 1e-2, True)
    assert fraction == 1.0
    assert base.phase1.steps == 1200  # the base is not changed
    assert parse_variant("lr1.5e-3:phase3.lr=1.5e-3", base)[0] == "lr1.5e-3"
    for bad in ("late", ":phase1.steps=3", "a b:phase1.steps=3", "../x:phase1.steps=3",
                ".x:phase1.steps=3", "a/b:phase1.steps=3"):
        with pytest.raises(ValueError, match="NAME:FIELD=VALUE"):
            parse_variant(bad, base)
    with pytest.raises(ValueError, match="batch_size"):
        parse_variant("x:batch-size=4", base)


def test_parse_variant_budget_is_a_fraction_not_a_field():
    base = preset_config("micro")
    name, items, cfg, fraction = parse_variant("half:budget=0.5,phase1.min-lr-ratio=1", base)
    assert (name, fraction, cfg.phase1.min_lr_ratio) == ("half", 0.5, 1.0)
    assert items == ["budget=0.5", "phase1.min-lr-ratio=1"]  # reported as given
    assert parse_variant("b:budget=1", base)[2] == base  # budget alone changes no field
    for bad in ("0", "1.5", "-0.2", "nan", "half"):
        with pytest.raises(ValueError, match="budget=.*in \\(0, 1\\]"):
            parse_variant(f"x:budget={bad}", base)
    # Its phase 3 is cut to spend that fraction of the default budget.
    full = pipeline_flops(base, 257)
    short = fill_budget(cfg, 257, fraction * full)
    assert short.phase3.steps < base.phase3.steps
    assert abs(pipeline_flops(short, 257) - full / 2) <= phase_step_flops(base, 257)[3] / 2


def test_a_variant_must_grow_into_arm_b_s_architecture(tmp_path, capsys, monkeypatch):
    import growth_vs_scratch
    from growth_vs_scratch import main

    def no_training(*args, **kwargs):  # without the check the benchmark would start: fail now
        raise AssertionError("a training run started: the variant was not refused")

    monkeypatch.setattr(growth_vs_scratch, "run_tasks", no_training)
    for bad, named in (("x:scale-factor=3", "d_model 96 (not 64)"),
                       ("x:extra-layers=1", "n_layers 3 (not 4)"),
                       ("x:budget=0.01", "no phase-3 step")):
        with pytest.raises(SystemExit) as e:
            main(["--preset", "micro", "--out", str(tmp_path / "out"), "--variant", bad])
        assert e.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_flops_to_reach_interpolates_and_says_never():
    curve = [(0.0, 3.0), (10.0, 2.0), (20.0, 1.0)]
    assert flops_to_reach(curve, 1.5) == pytest.approx(15.0)
    assert flops_to_reach(curve, 3.0) == 0.0
    assert flops_to_reach(curve, 0.5) is None


def test_crossover_finds_the_last_overtaking():
    small = [(0.0, 2.0), (10.0, 1.5), (20.0, 1.3), (30.0, 1.25), (40.0, 1.22)]
    # Large: above, dips below at 20 (noise), back above, then below for good from ~30.
    large = [(0.0, 3.0), (10.0, 1.8), (20.0, 1.29), (25.0, 1.30), (35.0, 1.20), (40.0, 1.15)]
    x = crossover(large, small)
    # at 25 the gap is 1.30 - 1.275 = +0.025, at 35 it is 1.20 - 1.235 = -0.035
    assert x == pytest.approx(25.0 + 10.0 * 0.025 / 0.06)
    assert crossover([(0.0, 3.0), (40.0, 1.3)], small) is None
    assert crossover([(0.0, 1.0), (40.0, 1.0)], small) == 0.0


def _result(cfg, seeds=(0, 1), lrs=("0.001", "0.003", "0.009")) -> dict:
    run = lambda s: {"seed": s, "curve": [[0.0, 2.0], [1.0, 1.0]], "final_val_loss": 1.0}  # noqa: E731
    f = phase_step_flops(cfg, 257)
    budget = sum(getattr(cfg, f"phase{p}").steps * f[p] for p in (1, 2, 3))
    return {"config": cfg.to_dict(), "budget_flops": budget, "data": "d", "device": "cpu",
            "arms": {"pipeline": {"runs": [{**run(s), "flops": budget, "phase_steps": [1, 1, 1],
                                            "post_growth_spike": {}, "growth_flops": [1.0]}
                                           for s in seeds]},
                     "scratch": {"sweep": {lr: {"runs": [run(s) for s in seeds]} for lr in lrs},
                                 "model_config": {"d_model": 128}},
                     "source": {"runs": [run(s) for s in seeds],
                                "model_config": {"d_model": 64, "vocab_size": 257}}}}


def test_arms_decay_though_the_pipeline_holds_its_rate_until_the_growth():
    from growth_vs_scratch import arm_schedule

    from growkit.train.trainer import lr_at

    wsd = preset_config("micro", **{"phase1.min_lr_ratio": 1.0})
    sched = arm_schedule(wsd, 1000, 2e-3)
    assert lr_at(wsd, 1, wsd.phase1.steps - 1) == wsd.phase1.lr  # the pipeline: held
    assert lr_at(sched, 1, 999) == pytest.approx(wsd.min_lr_ratio * 2e-3)  # the arm: decays
    assert lr_at(sched, 1, round(0.08 * 1000)) == pytest.approx(2e-3, rel=1e-3)


def test_reusable_arms_takes_only_a_matching_earlier_result(tmp_path):
    from growth_vs_scratch import reusable_arms

    base = preset_config("tiny")
    path = tmp_path / "prev.json"
    lrs = [0.001, 0.003, 0.009]
    # Settings that only say where a run writes or how it shows progress may differ.
    path.write_text(json.dumps(_result(preset_config("tiny", out_dir="elsewhere", threads=1))))
    got = reusable_arms(path, base, [1], lrs)
    assert [r["seed"] for r in got["pipeline"]] == [1] and set(got["scratch"]) == set(lrs)
    # The pipeline's own settings: (b) and (c) still hold, (a) must run again.
    path.write_text(json.dumps(_result(preset_config("tiny", noise_std=1e-2,
                                                     **{"phase3.lr": 1e-3}))))
    got = reusable_arms(path, base, [0], lrs)
    assert got["pipeline"] is None and [r["seed"] for r in got["source"]] == [0]
    # Phase 1's own floor too (the arms decay to the run's), but not phase 1's rate.
    path.write_text(json.dumps(_result(preset_config("tiny", **{"phase1.min_lr_ratio": 0.5}))))
    assert reusable_arms(path, base, [0], lrs)["pipeline"] is None
    # When to grow (the arms take phase 1's warmup and rate over their own steps), with
    # phase 3 given the steps that keep the budget.
    later = fill_budget(preset_config("tiny", **{"phase1.steps": 1000}), 257,
                        pipeline_flops(base, 257))
    path.write_text(json.dumps(_result(later)))
    assert reusable_arms(path, base, [0], lrs)["pipeline"] is None
    path.write_text(json.dumps(_result(preset_config("tiny", **{"phase1.lr": 1e-3}))))
    with pytest.raises(ValueError, match="phase1.lr"):
        reusable_arms(path, base, [0], lrs)
    # A result written before a field existed: the field reads as its default.
    no_floors = preset_config("tiny", **{f"phase{p}.min_lr_ratio": None for p in (1, 2, 3)})
    old = _result(no_floors)
    for p in ("phase1", "phase2", "phase3"):
        del old["config"][p]["min_lr_ratio"]
    del old["config"]["weight_decay"]  # a field whose default is not None: read as 0.1
    path.write_text(json.dumps(old))
    assert reusable_arms(path, no_floors, [0], lrs)["pipeline"] is not None
    assert reusable_arms(path, base, [0], lrs)["pipeline"] is None  # the preset's floors differ
    # Arm (a) of a result written before its runs recorded their FLOPs: it runs again.
    for r in old["arms"]["pipeline"]["runs"]:
        del r["flops"]
    path.write_text(json.dumps(old))
    got = reusable_arms(path, no_floors, [0], lrs)
    assert got["pipeline"] is None and [r["seed"] for r in got["source"]] == [0]
    # Anything (b) or (c) depends on: refused, naming it.
    path.write_text(json.dumps(_result(preset_config("tiny", weight_decay=0.0))))
    with pytest.raises(ValueError, match="weight_decay"):
        reusable_arms(path, base, [0], lrs)
    # Another budget (phase 3's steps), though phase 3 is the pipeline's own.
    path.write_text(json.dumps(_result(preset_config("tiny", **{"phase3.steps": 301}))))
    with pytest.raises(ValueError, match="budget"):
        reusable_arms(path, base, [0], lrs)
    path.write_text(json.dumps(_result(base)))
    with pytest.raises(ValueError, match="seeds \\[2\\]"):
        reusable_arms(path, base, [0, 2], lrs)
    with pytest.raises(ValueError, match="swept"):
        reusable_arms(path, base, [0], [0.001, 0.003, 0.03])
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a result"):
        reusable_arms(path, base, [0], lrs)


def test_growth_head_start_is_the_largest_lead_of_the_small_curve():
    from crossover import growth_head_start

    large = [(0.0, 3.0), (10.0, 2.0), (20.0, 1.5), (30.0, 1.2), (40.0, 1.0)]
    small = [(0.0, 3.0), (5.0, 2.0), (10.0, 1.6), (20.0, 1.45), (40.0, 1.4)]
    h = growth_head_start(large, small)
    # small at 10 has 1.6, which large reaches at 10 + 10 * 0.4 / 0.5 = 18: lead 8;
    # at 5 (2.0): large at 10, lead 5; at 20 (1.45): 20 + 10 * 0.05 / 0.3, lead 1.67
    assert h["grow_at_flops"] == 10.0 and h["head_start_flops"] == pytest.approx(8.0)
    assert growth_head_start([(0.0, 3.0), (40.0, 2.5)], small) is None


def test_head_start_at_growth_reads_the_loss_before_the_last_growth():
    from growth_vs_scratch import head_start_at_growth

    run = {"growth_flops": [5.0, 10.0],
           "curve": [(0.0, 3.0), (5.0, 1.8), (10.0, 1.5), (12.0, 1.6), (20.0, 1.2)]}
    scratch = [(0.0, 3.0), (10.0, 2.0), (20.0, 1.5), (30.0, 1.2)]
    assert head_start_at_growth(run, scratch) == pytest.approx(10.0)  # 1.5 at 20, grown at 10
    assert head_start_at_growth(run, [(0.0, 3.0), (30.0, 1.7)]) is None


def test_post_growth_speed_compares_the_same_stretch_of_loss():
    from growth_vs_scratch import post_growth_speed

    # (b): 3.0 -> 1.0 linearly over 20 FLOPs, so 10 FLOPs from 2.0 (at 10) to its final
    # 1.0 (at 20). The run grows at 5 with 2.0 (its best before the growth; 2.4 after it
    # must not count) and reaches 1.0 at 10: 5 FLOPs, twice (b)'s pace.
    scratch = {"final_val_loss": 1.0, "curve": [(0.0, 3.0), (20.0, 1.0)]}
    run = {"growth_flops": [2.0, 5.0],
           "curve": [(0.0, 3.0), (4.0, 2.0), (5.0, 2.1), (6.0, 2.4), (10.0, 1.0), (12.0, 0.9)]}
    assert post_growth_speed(run, scratch) == pytest.approx(2.0)
    # reaching (b)'s final at 15 instead: 10 FLOPs, (b)'s pace
    slower = dict(run, curve=[*run["curve"][:4], (15.0, 1.0)])
    assert post_growth_speed(slower, scratch) == pytest.approx(1.0)
    never = dict(run, curve=run["curve"][:4])
    assert post_growth_speed(never, scratch) is None


def test_head_start_bound_inverts_the_fit_and_depends_only_on_the_ratio():
    from head_start_bound import (
        CHINCHILLA,
        crossover,
        flops_to_loss,
        head_start_bound,
        loss,
        main,
    )

    fit = CHINCHILLA
    for n, f in ((1e6, 1e15), (3e8, 7e20)):
        assert flops_to_loss(fit, n, loss(fit, n, f)) == pytest.approx(f, rel=1e-9)
    assert flops_to_loss(fit, 1e6, 1.0) == float("inf")  # below the model's floor: never
    fx = crossover(fit, 1e6, 1e7)
    assert loss(fit, 1e6, fx) == pytest.approx(loss(fit, 1e7, fx), rel=1e-12)
    assert loss(fit, 1e6, fx / 2) < loss(fit, 1e7, fx / 2)  # small ahead before it
    assert loss(fit, 1e6, fx * 2) > loss(fit, 1e7, fx * 2)  # large ahead after it
    # Scaling both sizes by k scales FLOPs by k^(1 + alpha/beta) and keeps the fractions.
    a, b = head_start_bound(fit, 1e6, 10), head_start_bound(fit, 1e8, 10)
    k = 100 ** (1 + fit[3] / fit[4])
    assert b["crossover"] == pytest.approx(k * a["crossover"], rel=1e-6)
    assert b["best_fraction"] == pytest.approx(a["best_fraction"], abs=1e-3)
    # The largest lead, found again on a grid of growth points of its own.
    leads = [flops_to_loss(fit, 1e7, loss(fit, 1e6, f)) - f
             for f in (a["crossover"] * 10 ** (-4 * i / 997) for i in range(998))]
    assert a["max_head_start"] == pytest.approx(max(leads), rel=1e-3)
    assert a["best_fraction"] == pytest.approx(1 - max(leads) / a["crossover"], rel=1e-3)
    # The head start is a real lead: at the growth point the large model needs more.
    g = a["at"] * a["crossover"]
    assert flops_to_loss(fit, 1e7, loss(fit, 1e6, g)) - g == pytest.approx(a["max_head_start"])
    # Larger pairs hand over more, relative to their crossover.
    fractions = [r["best_fraction"] for r in main(["--ratios", "2", "10", "100", "1000"])]
    assert fractions == sorted(fractions, reverse=True) and 0 < fractions[-1] < fractions[0] < 1
    with pytest.raises(ValueError, match="ratio must be > 1"):
        head_start_bound(fit, 1e6, 1.0)
    with pytest.raises(SystemExit):
        main(["--ratios", "0.5"])


def test_recipe_table_has_a_row_per_recipe_best_first_and_refuses_another_arm_b(tmp_path):
    from recipe_table import table

    b_runs = [{"seed": 0, "final_val_loss": 1.0, "curve": [(0.0, 3.0), (20.0, 1.0)]}]

    def arm(final, reach_at, items=None):
        a = {"final_val_loss": {"mean": final, "std": 0.0},
             "flops_to_target": {"scratch_final": {"fraction_of_budget": reach_at / 20,
                                                   "seeds_reached": 1, "per_seed": [reach_at]}},
             "post_growth_spike": {"phase2": {"mean": 0.2, "max": 0.25}, "phase3": {"mean": 0.01, "max": 0.02}},
             "runs": [{"seed": 0, "final_val_loss": final, "growth_flops": [5.0],
                       "curve": [(0.0, 3.0), (5.0, 2.0), (reach_at, 1.0), (20.0, final)]}]}
        return a if items is None else {**a, "items": items}

    result = {"preset": "micro", "budget_flops": 20.0,
              "arms": {"pipeline": arm(0.95, 15.0),
                       "scratch": {"runs": b_runs, "best_lr": 3e-3,
                                   "final_val_loss": {"mean": 1.0, "std": 0.0}},
                       "source": {"final_val_loss": {"mean": 1.1, "std": 0.0}}},
              "variants": {"fast": arm(0.9, 10.0, ["phase3.lr=2e-3"])}}
    first = tmp_path / "a.json"
    first.write_text(json.dumps(result))
    rows = [line for line in table([first]).splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 2
    assert rows[0].startswith("| phase3.lr=2e-3 | 100% | 0.9000")  # best final first
    assert rows[0].endswith("| 2.00 |")  # (b) takes 10 FLOPs from 2.0 to 1.0, the recipe 5
    assert rows[1].endswith("| 1.00 |")
    assert "+1.0% (max +2.0%)" in rows[0] and "+20.0%" not in rows[0]
    # --upcycling-spike: phase 2's spike in its own column, before the widening's
    up = [line for line in table([first], upcycling_spike=True).splitlines() if line.startswith("| ")]
    assert "| loss spike after upcycling | loss spike after widening |" in up[0]
    assert up[1].count("|") == rows[0].count("|") + 1
    assert "| +20.0% (max +25.0%) | +1.0% (max +2.0%) |" in up[2]
    other = tmp_path / "b.json"
    b_runs[0]["final_val_loss"] = 1.01
    other.write_text(json.dumps(result))
    with pytest.raises(SystemExit, match="arm \\(b\\) differs"):
        table([first, other])


WORKER_SCRIPT = """
import os, sys, time
sys.path.insert(0, {bench!r})
import growth_vs_scratch

def task(i):
    with open(os.path.join({out!r}, f"started-{{i}}"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)

if __name__ == "__main__":
    growth_vs_scratch.run_tasks([(task, (i,)) for i in range(3)], 2)
"""


def test_pool_workers_end_with_a_killed_comparison(tmp_path):
    """Killing a --jobs comparison ends its workers: the busy ones stop, and the arm already
    queued for the pool never starts (it would write into a run folder after its parent is
    gone)."""
    import os
    import signal
    import subprocess
    import time

    bench = str(Path(__file__).resolve().parent.parent / "bench")
    script = tmp_path / "pool.py"
    script.write_text(WORKER_SCRIPT.format(bench=bench, out=str(tmp_path)))
    parent = subprocess.Popen([sys.executable, str(script)])
    started = [tmp_path / f"started-{i}" for i in range(3)]

    def wait_for(what, limit_s):
        end = time.monotonic() + limit_s
        while not what() and time.monotonic() < end:
            time.sleep(0.1)
        return what()

    try:
        assert wait_for(lambda: all(p.exists() and p.read_text() for p in started[:2]), 120)
        workers = [int(p.read_text()) for p in started[:2]]
        parent.send_signal(signal.SIGKILL)
        parent.wait()

        def alive(pid):
            try:
                with open(f"/proc/{pid}/stat") as f:  # a zombie has ended: state Z
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"
            except FileNotFoundError:
                return False

        assert wait_for(lambda: not any(alive(pid) for pid in workers), 10), "workers outlived their parent"
        time.sleep(1.0)
        assert not started[2].exists(), "a queued task started after its parent was killed"
    finally:
        parent.kill()
        for p in started:
            if p.exists() and p.read_text():
                try:
                    os.kill(int(p.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_a_killed_run_folder_starts_over_and_a_foreign_one_is_left_alone(tmp_path):
    """Rerunning a comparison with the same --out: a finished run is reused, an unfinished
    run of the same settings (what a kill leaves) is removed so that it can start over, and
    a folder of other settings or no run at all is never touched."""
    from growth_vs_scratch import clear_unfinished_run, finished_run

    cfg = preset_config("tiny", run_dir=str(tmp_path / "run"), threads=1)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run_dir / "metrics.jsonl").write_text("")  # killed before its summary
    assert finished_run(cfg) is None
    assert clear_unfinished_run(cfg) and not run_dir.exists()

    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "flops": 1.0}))
    assert finished_run(cfg) == {"status": "completed", "flops": 1.0}
    assert not clear_unfinished_run(cfg) and run_dir.exists()  # finished: reused, kept
    # the settings that only say where a run writes or shows progress may differ
    assert finished_run(preset_config("tiny", run_dir=str(run_dir), threads=2)) is not None

    other = preset_config("tiny", run_dir=str(run_dir), noise_std=1e-3)
    (run_dir / "summary.json").unlink()
    assert not clear_unfinished_run(other) and (run_dir / "config.json").exists()
    (run_dir / "config.json").unlink()  # a folder without a run: not the comparison's
    (run_dir / "notes.txt").write_text("mine")
    assert not clear_unfinished_run(cfg) and (run_dir / "notes.txt").exists()
    (run_dir / "config.json").write_text("[1, 2]")  # not a config at all
    assert not clear_unfinished_run(cfg) and (run_dir / "notes.txt").exists()
