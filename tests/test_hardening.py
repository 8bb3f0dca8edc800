"""Regression tests of issue 11 ("Hardening"): every bad input gets a clear error or a
correct result, none is silent and none destroys anything.

Defects 2 to 6: a damaged newest checkpoint (resume falls back, one-line messages and
their own exit statuses), devices the checks cannot run on (refused, the caller's models
untouched), crafted sizes (refused before allocating), an edited run config (refused,
naming the fields), and the smaller items. One tiny pipeline run is shared by the
resume tests; most of them stop before any training.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import growkit.growth as growth
from growkit.kernels import hyperclone
from growkit.models import ModelConfig, Transformer, load_model, save_model
from growkit.train import pipeline
from growkit.train.checkpoint import (
    CHECKPOINT_FILES,
    MANIFEST_FILE,
    ResumeError,
    select_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from growkit.train.metrics import read_metrics
from growkit.verify import (
    GrowthMonitor,
    GrowthWarning,
    check_functional_identity_layerwise,
    check_rope_integrity,
    detailed_growth_check,
    quick_sanity_check,
    run_growth_checks,
    verify_functional_equivalence,
)

# Phase 1: 6 steps (global 1-6), phase 2: 4 (7-10), phase 3: 4 (11-14); checkpoints at
# 6 (phase-1 end), 10 (phase-2 end), 12 (periodic) and 14 (phase-3 end).
from model_factory import TINY_PIPELINE as TINY  # noqa: E402
NEWEST = "step-00000014-phase3-end"
EXACT_KEYS = ("kind", "phase", "step", "global_step", "loss", "val_loss", "lr", "tokens_seen")


@pytest.fixture(scope="module", autouse=True)
def torch_kernels():
    """The growth kernels' torch paths: the Triton interpreter (conftest.py) would make the
    pipeline runs here take minutes; the kernels are tested in test_kernels.py."""
    threads = torch.get_num_threads()  # the runs below set 1 (--threads 1): put it back
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GROWKIT_BACKEND", "torch")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("hardening") / "base"
    assert pipeline.main([*TINY, "--run-dir", str(run_dir)]) == 0
    return run_dir


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    """A fresh copy of the finished base run, to damage."""
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def resume(run_dir: Path, capsys, *extra: str) -> tuple[int, str]:
    code = pipeline.main(["--resume", str(run_dir), *extra])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The stderr of a failed resume: no traceback, exactly one line saying error."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------
# 2: damaged checkpoints, resume failures
# ---------------------------------------------------------------------------

def test_checkpoints_carry_a_manifest_with_a_checksum_per_file(base_run):
    ckpt = base_run / "checkpoints" / NEWEST
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == set(CHECKPOINT_FILES)
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert len(manifest["config_sha256"]) == 64
    assert verify_checkpoint(ckpt)["global_step"] == 14


@pytest.mark.parametrize("name", [*CHECKPOINT_FILES, MANIFEST_FILE])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_that_verifies(run, name):
    truncate(run / "checkpoints" / NEWEST / name)
    said: list[str] = []
    ckpt, state = select_checkpoint(run, say=said.append)
    assert ckpt.name == "step-00000012" and state["global_step"] == 12
    assert any(NEWEST in m and name in m for m in said), said
    assert any("falling back" in m for m in said), said


def test_a_damaged_checkpoint_without_manifest_is_caught_too(run):
    """Checkpoints written before manifests existed: the files are parsed instead."""
    ckpt = run / "checkpoints" / NEWEST
    (ckpt / MANIFEST_FILE).unlink()
    verify_checkpoint(ckpt)  # intact: accepted
    truncate(ckpt / "rng.safetensors")
    with pytest.raises(ResumeError, match="rng.safetensors is damaged"):
        verify_checkpoint(ckpt)


def test_resume_falls_back_past_a_truncated_model_and_says_so(run, base_run, capsys):
    truncate(run / "checkpoints" / NEWEST / "model.safetensors")
    code, err = resume(run, capsys)
    assert code == pipeline.EXIT_OK, err
    assert "falling back to checkpoints/step-00000012" in err
    # the two steps redone from checkpoint 12 give the uninterrupted run's losses
    exact = [[{k: r[k] for k in EXACT_KEYS} for r in read_metrics(d / "metrics.jsonl")]
             for d in (base_run, run)]
    assert exact[0] == exact[1]
    assert json.loads((run / "latest.json").read_text())["global_step"] == 14
    assert verify_checkpoint(run / "checkpoints" / NEWEST)["global_step"] == 14  # rewritten


def test_damaged_or_dangling_latest_json_falls_back(run):
    said: list[str] = []
    truncate(run / "latest.json")
    assert select_checkpoint(run, say=said.append)[0].name == NEWEST
    assert "latest.json is damaged" in said[0]
    shutil.rmtree(run / "checkpoints" / NEWEST)
    (run / "latest.json").write_text(json.dumps({"checkpoint": f"checkpoints/{NEWEST}"}))
    said.clear()
    assert select_checkpoint(run, say=said.append)[0].name == "step-00000012"
    assert "does not exist" in said[0]


def test_truncated_metrics_fall_back_to_a_checkpoint_they_cover(run):
    recs = read_metrics(run / "metrics.jsonl")
    covered = json.loads((run / "checkpoints" / "step-00000010-phase2-end" / "state.json")
                         .read_text())["metrics_records"]
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:covered]) + lines[covered][:5])
    assert len(recs) > covered
    said: list[str] = []
    ckpt, _ = select_checkpoint(run, say=said.append)
    assert ckpt.name == "step-00000010-phase2-end"
    assert any("metrics.jsonl holds" in m for m in said)


@pytest.mark.parametrize("case", ["outside", "absolute", "all_damaged", "run_config",
                                  "tokenizer", "no_run_dir", "file"])
def test_resume_failures_end_in_one_line_and_exit_4(run, tmp_path, capsys, case):
    target = run
    if case == "outside":
        (run / "latest.json").write_text(json.dumps({"checkpoint": "../elsewhere/step-00000014"}))
    elif case == "absolute":
        other = tmp_path / "other"
        shutil.copytree(run / "checkpoints" / NEWEST, other / NEWEST)
        (run / "latest.json").write_text(json.dumps({"checkpoint": str(other / NEWEST)}))
    elif case == "all_damaged":
        for ckpt in (run / "checkpoints").iterdir():
            truncate(ckpt / "optimizer.safetensors")
    elif case == "run_config":
        truncate(run / "config.json")
    elif case == "tokenizer":
        truncate(run / "tokenizer.json")
    elif case == "no_run_dir":
        target = tmp_path / "missing"
    elif case == "file":
        target = tmp_path / "a_file"
        target.write_text("x")
    code, err = resume(target, capsys)
    assert code == pipeline.EXIT_RESUME_FAILED == 4
    line = one_error_line(err)
    expected = {"outside": "not a checkpoint folder inside", "absolute": "not a checkpoint folder inside",
                "all_damaged": "verifies", "run_config": "config.json is damaged",
                "tokenizer": "tokenizer.json is damaged", "no_run_dir": "does not exist",
                "file": "is a file"}[case]
    assert expected in line


def test_a_crafted_checkpoint_with_a_matching_manifest_is_still_bounded(run, capsys):
    """An attacker who rewrites config.json and the manifest gets past the checksums, not
    past load_model's check of the config against the tensors in the file."""
    ckpt = run / "checkpoints" / NEWEST
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["n_layers"] = 10**5
    (ckpt / "config.json").write_text(json.dumps(cfg))
    write_manifest(ckpt, json.loads((ckpt / "state.json").read_text())["train_config"])
    t = time.perf_counter()
    code, err = resume(run, capsys)
    assert code == pipeline.EXIT_RESUME_FAILED
    assert "n_layers=100000" in one_error_line(err)
    assert time.perf_counter() - t < 10


def test_orphaned_tmp_folders_are_removed_on_resume(run, capsys):
    orphan = run / "checkpoints" / ".step-00000016.x1y2.tmp"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"partial")
    old = run / "checkpoints" / ".step-00000012.a.old"
    old.mkdir()
    # a field the pipeline lets a resumed run change is not a config change
    code, err = resume(run, capsys, "--threads", "1")
    assert code == 0, err
    assert not orphan.exists() and not old.exists()
    assert "removed 2 unfinished checkpoint folder(s)" in err


def test_exit_statuses_are_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 completed; 1 a growth check failed" in out
    assert "4 --resume cannot resume" in out and "5 --resume refused" in out
    assert "4    ``--resume RUN_DIR`` cannot resume" in pipeline.__doc__


# ---------------------------------------------------------------------------
# 5: an edited run config is refused on --resume
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("edit,names", [
    ({"phase1": {"lr": 0.001}}, ["phase1.lr: 0.003 -> 0.001"]),
    ({"d_model": 64, "n_heads": 4}, ["d_model: 32 -> 64", "n_heads: 2 -> 4"]),
    ({"seed": 3}, ["seed: 0 -> 3"]),
])
def test_an_edited_run_config_is_refused_naming_the_fields(run, capsys, edit, names):
    cfg = json.loads((run / "config.json").read_text())
    for key, value in edit.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    (run / "config.json").write_text(json.dumps(cfg))
    code, err = resume(run, capsys)
    assert code == pipeline.EXIT_RESUME_REFUSED == 5
    line = one_error_line(err)
    for n in names:
        assert n in line


def test_an_edited_run_config_is_refused_by_a_checkpoint_without_manifest(run, capsys):
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / MANIFEST_FILE).unlink()
    cfg = json.loads((run / "config.json").read_text())
    cfg["batch_size"] = 8
    (run / "config.json").write_text(json.dumps(cfg))
    code, err = resume(run, capsys)
    assert code == pipeline.EXIT_RESUME_REFUSED
    assert "batch_size: 4 -> 8" in one_error_line(err)


def test_resume_overridable_fields_may_change_in_the_config_file(run, capsys):
    cfg = json.loads((run / "config.json").read_text())
    cfg.update(keep_checkpoints=3, progress=False)  # both in RESUME_OVERRIDABLE
    (run / "config.json").write_text(json.dumps(cfg))
    code, err = resume(run, capsys)
    assert code == 0, err


# ---------------------------------------------------------------------------
# 3: devices the checks cannot run on
# ---------------------------------------------------------------------------

def small(vocab: int = 64, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, **kw))


def snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])


def assert_unchanged(model: nn.Module, snap) -> None:
    state, modes, grads = snap
    now = model.state_dict()
    for k, v in state.items():
        assert now[k].device.type == "cpu", k
        assert torch.equal(now[k], v), k
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads


BAD_DEVICES = ["meta", "bogus", "cuda:7" if torch.cuda.is_available() else "cuda", 3]


@pytest.mark.parametrize("device", BAD_DEVICES)
@pytest.mark.parametrize("entry", ["run", "detailed", "equivalence"])
def test_bad_devices_are_refused_up_front_and_models_stay(device, entry):
    old = small()
    old.eval()
    new = growth.upcycle_to_moe(old, 4, 2) if entry == "equivalence" else growth.grow_width(old, 2)
    snaps = snapshot(old), snapshot(new)
    probe = torch.randint(0, 64, (2, 8))
    fn = {"run": run_growth_checks, "detailed": detailed_growth_check,
          "equivalence": verify_functional_equivalence}[entry]
    with pytest.raises(ValueError, match="device"):
        fn(old, new, probe, device)
    assert_unchanged(old, snaps[0])
    assert_unchanged(new, snaps[1])


def test_models_on_meta_are_refused():
    with torch.device("meta"):
        old = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2))
    with pytest.raises(ValueError, match="meta"):
        run_growth_checks(old, small(), torch.randint(0, 64, (2, 8)), "cpu")


# ---------------------------------------------------------------------------
# 4: crafted sizes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("patch,match", [
    ({"n_layers": 10**5}, "n_layers=100000"),
    ({"max_seq_len": 10**7}, "max_seq_len=10000000"),
    ({"vocab_size": 10**9}, "vocab_size=1000000000"),
    ({"n_experts": 10**6, "top_k": 2}, "n_experts=1000000"),
])
def test_crafted_checkpoint_configs_are_refused_before_building(tmp_path, patch, match):
    save_model(small(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(patch)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    t = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        load_model(tmp_path)
    assert time.perf_counter() - t < 1.0


def test_a_checkpoint_config_missing_a_field_is_an_error(tmp_path):
    save_model(small(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["n_layers"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing ModelConfig fields \['n_layers'\]"):
        load_model(tmp_path)
    del cfg["max_seq_len"]  # the RoPE cache length may be left out
    cfg["n_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(tmp_path).config.max_seq_len == ModelConfig().max_seq_len


@pytest.mark.parametrize("call,arg", [
    (lambda m: growth.grow_depth(m, 10**6), "extra_layers=1000000"),
    (lambda m: growth.upcycle_to_moe(m, 10**6, 2), "n_experts=1000000"),
    (lambda m: hyperclone(m.layers[0].attn.q_proj.weight.detach(), 10**6, 10**6), "out_repeat=1000000"),
    (lambda m: hyperclone(torch.zeros(512, 512), 1, 10**6), "in_repeat=1000000"),
])
def test_huge_growth_fails_fast_naming_the_argument_and_the_memory(call, arg):
    t = time.perf_counter()
    with pytest.raises(ValueError, match=arg) as info:
        call(small())
    assert "needs about" in str(info.value) and "available on cpu" in str(info.value)
    assert time.perf_counter() - t < 2.0


# ---------------------------------------------------------------------------
# 6: smaller items
# ---------------------------------------------------------------------------

def test_transfer_adam_state_refuses_an_optimizer_of_other_parameters():
    old = small()
    new = growth.grow_width(old, 2)
    stranger = torch.optim.AdamW(nn.Linear(3, 3).parameters())
    new_opt = torch.optim.AdamW(new.parameters())
    with pytest.raises(ValueError, match="old_optimizer holds none of old_model's parameters"):
        growth.transfer_adam_state(old, new, stranger, new_opt)
    with pytest.raises(ValueError, match="new_optimizer holds none of new_model's parameters"):
        growth.transfer_adam_state(old, new, torch.optim.AdamW(old.parameters()), stranger)
    # the right optimizers before any step: nothing to carry, no error
    assert growth.transfer_adam_state(old, new, torch.optim.AdamW(old.parameters()), new_opt) == 0


def test_growth_monitor_on_an_ungrown_model_says_there_is_nothing_to_monitor():
    with pytest.warns(GrowthWarning, match="nothing to monitor"):
        GrowthMonitor(small())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GrowthMonitor(growth.grow_width(small(), 2)).close()


def test_vocabulary_mismatch_is_named_before_any_kernel():
    old, new = small(vocab=128), growth.grow_width(small(vocab=64), 2)
    probe = torch.randint(0, 64, (2, 8))
    for fn in (run_growth_checks, check_functional_identity_layerwise, check_rope_integrity):
        with pytest.raises(ValueError, match="vocabulary of 128 tokens and new_model one of 64"):
            fn(old, new, probe)


@pytest.mark.parametrize("bad", [nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4))])
def test_modules_growkit_cannot_read_are_refused_saying_what_is_accepted(bad):
    m = small()
    probe = torch.randint(0, 64, (2, 8))
    with pytest.raises(ValueError, match="old_model: .*Supported: growkit.models.Transformer"):
        run_growth_checks(bad, m, probe, "cpu")
    with pytest.raises(ValueError, match="new_model: .*Supported"):
        check_rope_integrity(m, bad, probe)
    with pytest.raises(ValueError, match="Supported"):
        quick_sanity_check(bad, probe)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        run_growth_checks("model", m, probe)


@pytest.mark.parametrize("args", [["--lr-phase2", "-1e-3"], ["--lr-phase2=-1e-3"],
                                  ["--phase2.lr", "-1e-3"], ["--seed", "-1"]])
def test_negative_numbers_reach_the_field_check(capsys, args):
    assert pipeline.main([*args, "--print-config"]) == pipeline.EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert "expected one argument" not in err and "expected 1 argument" not in err
    line = one_error_line(err)
    if "lr" in args[0]:
        assert "TrainConfig.phase2.lr must be a finite number > 0" in line and "got -0.001" in line
    else:
        assert "TrainConfig.seed must be a whole number in [0, 2**64), got -1" in line


def test_bpe_with_a_too_long_seq_len_leaves_nothing_behind(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    out = tmp_path / "runs"
    code = pipeline.main(["--tokenizer", "bpe", "--bpe-vocab-size", "300", "--max-stories", "50",
                          "--seq-len", "100000", "--out-dir", str(out), "--no-progress"])
    assert code == pipeline.EXIT_BAD_CONFIG
    assert "seq_len" in capsys.readouterr().err
    assert not out.exists()
    (out / ".tokenizer-cache").mkdir(parents=True)  # a cache that was there before stays
    pipeline.main(["--tokenizer", "bpe", "--bpe-vocab-size", "300", "--max-stories", "50",
                   "--seq-len", "100000", "--out-dir", str(out), "--no-progress"])
    assert (out / ".tokenizer-cache").is_dir()


def test_run_dir_that_is_a_file_gets_a_clear_message(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert pipeline.main([*TINY, "--run-dir", str(f)]) == pipeline.EXIT_BAD_CONFIG
    assert "is a file, not a folder" in one_error_line(capsys.readouterr().err)
    assert f.read_text() == "mine"


def test_scale_bilaterally_quotes_a_bad_seed():
    with pytest.raises(ValueError, match=r"seed must be a whole number in \[0, 2\*\*64\), got 1.5"):
        growth.scale_bilaterally(small(), 2, 1, seed=1.5)


def test_grow_width_quotes_a_bad_seed():
    with pytest.raises(ValueError, match=r"got 1\.5"):
        growth.grow_width(small(), 2, seed=1.5)


class _RunsACommand:
    """A pickle that, unpickled by ``pickle.load``, would run ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_dcp_metadata_is_read_without_running_code(tmp_path):
    """A sharded checkpoint's ``dcp/.metadata`` is a pickle torch writes. growkit reads it with
    an unpickler that admits only DCP's metadata records: a real checkpoint loads bit for
    bit, and a ``.metadata`` replaced by a pickle that calls a function is refused, naming
    that function, without calling it."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from growkit.train.distributed import _dcp_load, _dcp_reader

    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                                    d_ff=48, max_seq_len=16))
    state = {"model": model.state_dict(), "step": torch.tensor(3.0)}
    folder = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to ... in a single process"
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
        loaded = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}, "step": torch.zeros(())}
        dcp.load(loaded, storage_reader=_dcp_reader(folder), no_dist=True)
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    assert loaded["step"].item() == 3.0

    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_RunsACommand(marker)))
    refused = r"not DCP metadata: .*system is not part of a DCP checkpoint"
    with pytest.raises(ValueError, match=refused):
        _dcp_reader(folder).read_metadata()
    with pytest.raises(ValueError, match=refused):  # DCP's CheckpointException, made a ValueError
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _dcp_load(loaded, folder, no_dist=True)
    assert not marker.exists()
    pickle.loads((folder / ".metadata").read_bytes())  # the control: DCP's own reader would run it
    assert marker.exists()
    (folder / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(ValueError, match="holds a dict, not DCP metadata"):
        _dcp_reader(folder).read_metadata()
