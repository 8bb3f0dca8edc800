"""Every bench script's flags parse (tyro, through bench/common.parse_cli): ``--help`` works,
the switches are plain ``--flag`` (no ``--no-flag`` partner: ``--no-compile`` keeps its name),
and a list flag given no value is refused as argparse's ``nargs="+"`` refused it."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if "parse_cli(" in p.read_text() and p.name != "common.py")


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=BENCH.parent, capture_output=True, text=True, timeout=300)


def test_every_flag_parsing_script_is_covered():
    assert {"run.py", "gpu_check.py", "growth_vs_scratch.py", "grow_e2e.py", "verify_cost.py"} <= set(SCRIPTS)
    assert not [p.name for p in BENCH.glob("*.py") if "import argparse" in p.read_text()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    done = _run(f"bench/{script}", "--help")
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]
    assert "--no-quick" not in done.stdout and "--no-no-" not in done.stdout


def test_switch_and_list_flags_keep_their_argparse_forms():
    assert "--no-compile" in _run("bench/run.py", "--help").stdout
    refused = _run("bench/head_start_bound.py", "--ratios")
    assert refused.returncode == 2 and "--ratios: expected at least one argument" in refused.stderr
    done = _run("bench/head_start_bound.py", "--ratios", "10", "--n-small", "1e8")
    assert done.returncode == 0 and done.stdout.count("\n") >= 2, done.stderr[-2000:]
