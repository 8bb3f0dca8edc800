"""The pipeline's configuration (growkit.train.config): tyro flags, the flat flags and keys of
earlier versions, presets, files, precedence, checks, and the config hash of checkpoints.

Nothing here trains: every test builds configs only (well under a second each).
"""

from __future__ import annotations

import hashlib
import json
import typing

import pytest

pytest.importorskip("tyro")

from growkit.train import pipeline  # noqa: E402
from growkit.train.checkpoint import config_changes, run_config_hash  # noqa: E402
from growkit.train.config import (  # noqa: E402
    LEGACY_KEYS,
    PRESETS,
    RESUME_OVERRIDABLE,
    PhaseConfig,
    TrainArgs,
    TrainConfig,
    flatten_config,
    legacy_to_nested,
    parse_command_line,
    preset_config,
)


def cli(*argv: str) -> TrainConfig:
    return parse_command_line(list(argv)).cfg


# ---------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------

def test_legacy_flat_flags_equal_the_nested_flags():
    legacy = cli("--steps-phase1", "100", "--steps_phase2", "20", "--steps-phase3=30",
                 "--lr-phase1", "1e-3", "--lr_phase2=2e-4", "--lr-phase3", "1e-4",
                 "--warmup-frac-phase1", "0.1", "--warmup_frac_phase2", "0.2",
                 "--warmup-frac-phase3=0.3")
    nested = cli("--phase1.steps", "100", "--phase2.steps", "20", "--phase3.steps", "30",
                 "--phase1.lr", "1e-3", "--phase2.lr", "2e-4", "--phase3.lr", "1e-4",
                 "--phase1.warmup-frac", "0.1", "--phase2.warmup_frac", "0.2",
                 "--phase3.warmup-frac", "0.3")
    assert legacy == nested
    assert nested.phase2 == PhaseConfig(steps=20, lr=2e-4, warmup_frac=0.2)
    assert nested.warmup(2) == 4
    # Only flags are rewritten: a value that looks like one, after "--", stays.
    assert legacy_to_nested(["--name", "x", "--", "--steps-phase1"]) == \
        ["--name", "x", "--", "--steps-phase1"]


def test_flags_in_both_spellings_and_switches():
    cfg = cli("--d-model", "96", "--n_heads", "4", "--reset-optimizer", "--no-plot",
              "--max-stories", "None", "--device", "cpu")
    assert (cfg.d_model, cfg.n_heads, cfg.reset_optimizer, cfg.plot, cfg.max_stories,
            cfg.device) == (96, 4, True, False, None, "cpu")
    with pytest.raises(SystemExit):  # tyro refuses a choice it does not know
        cli("--device", "tpu")


def test_precedence_defaults_preset_file_flags(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("d_model: 96\nsteps_phase1: 8\nphase2:\n  lr: 2.0e-4\n")
    cfg = cli("--preset", "tiny", "--config", str(f), "--steps-phase1", "9")
    assert cfg.phase1.steps == 9                              # flag beats file
    assert cfg.d_model == 96 and cfg.phase2.lr == 2e-4        # file beats preset
    assert cfg.phase2.steps == PRESETS["tiny"]["phase2"]["steps"]  # preset ...
    assert cfg.name == "tiny" and cfg.device == "cpu"         # ... beats default
    assert cfg.phase2.warmup_frac == PRESETS["tiny"]["phase2"]["warmup_frac"]
    assert cfg.weight_decay == TrainConfig().weight_decay      # default where none sets it
    # The order of the flags on the line does not matter.
    assert cli("--steps-phase1", "9", "--config", str(f), "--preset", "tiny") == cfg


def test_a_negative_learning_rate_gets_the_clear_error(capsys):
    with pytest.raises(ValueError, match=r"TrainConfig\.phase2\.lr must be a finite number > 0 and < 1 "
                                         r"\(e\.g\. 1e-3\), got -0\.001"):
        cli("--lr-phase2", "-1e-3")
    assert pipeline.main(["--phase2.lr", "-1e-3", "--print-config"]) == pipeline.EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: TrainConfig.phase2.lr" in err


def test_help_lists_the_run_options_and_nested_flags(capsys):
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--preset", "tiny", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--preset", "--resume", "--print-config", "--phase1.steps",
                 "--phase3.warmup-frac", "--d-model", "--no-plot", "--steps-phase1"):
        assert flag in out, flag
    assert "(default: 1200)" in out  # the defaults shown are the preset's
    # The presets tyro offers are the presets there are.
    hints = typing.get_type_hints(TrainArgs, include_extras=True)
    assert set(typing.get_args(typing.get_args(hints["preset"])[0])) == set(PRESETS)


# ---------------------------------------------------------------------------
# Files and dicts
# ---------------------------------------------------------------------------

def test_a_config_file_with_flat_and_nested_keys(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("steps_phase1: 8\nlr_phase2: 2e-4\nphase3:\n  steps: 7\n"
                 "phase1.warmup_frac: 0.1\nd-model: 128\ndepth_mode: stack\n")
    cfg = cli("--config", str(y))
    assert cfg.phase1 == PhaseConfig(8, TrainConfig().phase1.lr, 0.1)
    assert cfg.phase2.lr == 2e-4 and isinstance(cfg.phase2.lr, float)  # YAML 1.1: a string
    assert (cfg.phase3.steps, cfg.d_model, cfg.depth_mode) == (7, 128, "stack")
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"phase1": {"steps": 8, "warmup_frac": 0.1}, "lr_phase2": 2e-4,
                             "phase3.steps": 7, "d_model": 128, "depth_mode": "stack"}))
    assert cli("--config", str(j)) == cfg


@pytest.mark.parametrize("doc,name", [
    ({"stepz_phase1": 8}, "stepz_phase1"),
    ({"phase1": {"stepz": 8}}, "phase1.stepz"),
    ({"phase4.steps": 8}, "phase4.steps"),
    ({"d_modle": 8}, "d_modle"),
])
def test_a_config_file_unknown_key_is_refused_with_its_name(tmp_path, capsys, doc, name):
    f = tmp_path / "run.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"run\.json'?: unknown TrainConfig keys \['{name}'\]"):
        cli("--config", str(f))
    assert pipeline.main(["--config", str(f)]) == pipeline.EXIT_BAD_CONFIG
    assert f"['{name}']" in capsys.readouterr().err


def test_config_file_values_are_checked_naming_the_file(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"phase1": {"steps": "many"}}))
    with pytest.raises(TypeError, match=r"run\.json.*TrainConfig\.phase1\.steps must be a whole"):
        cli("--config", str(f))
    f.write_text(json.dumps({"phase1": 5}))
    with pytest.raises(TypeError, match=r"TrainConfig\.phase1 must be a mapping"):
        cli("--config", str(f))


def test_dicts_round_trip_and_old_flat_configs_load():
    cfg = preset_config("small", steps_phase1=10, phase2={"lr": 1e-4})
    assert (cfg.phase1.steps, cfg.phase2.lr, cfg.phase2.steps) == (10, 1e-4, 1000)
    assert TrainConfig.from_dict(json.loads(cfg.to_json_str())) == cfg
    # The flat config.json of a run made before the phases were nested (and before a phase
    # had its own cosine floor, which the preset now sets).
    assert cfg.phase1.min_lr_ratio == 1.0
    cfg = preset_config("small", steps_phase1=10, phase2={"lr": 1e-4},
                        **{f"{p}.min_lr_ratio": None for p in ("phase1", "phase2", "phase3")})
    old = {k: v for k, v in flatten_config(cfg.to_dict()).items() if "." not in k}
    old.update({legacy: flatten_config(cfg.to_dict())[new] for legacy, new in LEGACY_KEYS.items()})
    assert TrainConfig.from_dict(old) == cfg
    # The per-phase cosine floor came after the flat names (None there: the run's floor).
    assert flatten_config(old) == {k: v for k, v in flatten_config(cfg.to_dict()).items()
                                   if not k.endswith(".min_lr_ratio")}


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------

def test_model_shape_errors_come_from_model_config():
    with pytest.raises(ValueError, match=r"invalid phase-1 model: ModelConfig\.d_model=64 is not "
                                         r"divisible by n_heads=3"):
        TrainConfig(n_heads=3)
    with pytest.raises(ValueError, match=r"invalid phase-2 model: .*top_k=5"):
        TrainConfig(top_k=5)
    with pytest.raises(ValueError, match=r"invalid phase-1 model: .*head_dim=3 must be even"):
        TrainConfig(d_model=12, n_heads=4)


def test_stack_scale_belongs_to_stack_mode_and_lies_in_0_1():
    assert TrainConfig(depth_mode="stack", stack_scale=0.25).stack_scale == 0.25
    assert cli("--depth-mode", "stack", "--stack-scale", "0").stack_scale == 0.0
    with pytest.raises(ValueError, match="stack_scale=0.5 applies to depth_mode 'stack' only"):
        TrainConfig(stack_scale=0.5)
    with pytest.raises(ValueError, match=r"TrainConfig\.stack_scale must be a finite number >= 0 and <= 1"):
        TrainConfig(depth_mode="stack", stack_scale=1.5)


def test_checks_run_after_tyro_parses_and_always_outside_it():
    cli("--d-model", "96")  # parsing defers the checks, and puts them back after
    with pytest.raises(ValueError, match="TrainConfig.batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(TypeError, match="TrainConfig.seq_len"):
        TrainConfig(seq_len=True)
    assert TrainConfig(d_model=64.0).d_model == 64 and isinstance(TrainConfig(rope_theta=10).rope_theta, float)


# ---------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------

def test_resume_flags_may_change_only_the_overridable_fields():
    stored = preset_config("tiny", steps_phase1=5)
    assert parse_command_line(["--threads", "1", "--no-progress", "--steps-phase1", "5"],
                              stored).cfg.threads == 1
    with pytest.raises(ValueError, match=r"--resume cannot change \['phase1.lr', 'seed'\]"):
        parse_command_line(["--lr-phase1", "0.5", "--seed", "3"], stored)
    with pytest.raises(ValueError, match="drop --preset/--config"):
        parse_command_line(["--preset", "tiny"], stored)
    assert "threads" in RESUME_OVERRIDABLE


def test_config_hash_of_checkpoints_from_before_the_nesting_still_matches():
    """A checkpoint written before the phases were nested hashed the flat keys: a resumed
    run's nested config hashes to the same value over those keys, and a change is named
    by its nested field."""
    cfg = preset_config("tiny")
    flat_old = {**{k: v for k, v in flatten_config(cfg.to_dict()).items() if "." not in k},
                **{legacy: flatten_config(cfg.to_dict())[new] for legacy, new in LEGACY_KEYS.items()}}
    exempt = RESUME_OVERRIDABLE | {"run_dir", "out_dir", "name", "data", "val_data"}
    old_fields = sorted(k for k in flat_old if k not in exempt)
    # the hash as the earlier version computed it
    old_hash = hashlib.sha256(json.dumps({k: flat_old[k] for k in old_fields}, sort_keys=True,
                                         allow_nan=True).encode()).hexdigest()
    assert run_config_hash(cfg.to_dict(), old_fields) == old_hash
    edited = TrainConfig.from_dict({"phase1": {"lr": 1e-3}}, base=cfg)
    assert run_config_hash(edited.to_dict(), old_fields) != old_hash
    assert config_changes(flat_old, edited.to_dict()) == ["phase1.lr: 0.003 -> 0.001"]
    # New checkpoints hash the dotted keys.
    assert run_config_hash(cfg.to_dict()) != run_config_hash(edited.to_dict())
