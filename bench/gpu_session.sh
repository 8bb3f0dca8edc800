#!/usr/bin/env bash
# Every GPU benchmark and check of growkit in one command, for one NVIDIA GPU (sized for an H200
# with a 10-minute command limit and 15 minutes of device time: about 5-6 minutes as a whole).
#
#   bash bench/gpu_session.sh              # on the GPU machine (from the repository root or anywhere)
#   bash bench/gpu_session.sh --full       # bench/run.py's full sweep (with torch.compile) instead of --quick
#   bash bench/gpu_session.sh --tests      # also tests/test_kernels.py (CPU + Triton interpreter: no CUDA)
#   bash bench/gpu_session.sh --dry-run    # the same steps on the CPU: tiny shapes, TRITON_INTERPRET=1
#                                          # where a script supports it (GPU_SESSION_DRY_RUN=1 does the same)
#   bash bench/gpu_session.sh --fetch-wheels   # HERE, before a session: tyro's wheels into .whl/ (below)
#
# Steps, each under its own `timeout` (and within GPU_SESSION_BUDGET_S, default 480 s, 570 s with --full,
# for the whole script: give the device tool timeout_s 600), a failure recorded and the next step run all the same:
#   env        nvidia-smi, python / torch / CUDA / triton / transformers versions, growkit importable
#   gpu_check  python bench/gpu_check.py                     (Triton on CUDA vs the references, bitwise)
#   grow_device  python bench/grow_device_check.py           (growkit grow --device cuda == --device cpu, bitwise)
#   grow_e2e   python bench/grow_e2e.py                      (Llama-3-8B shapes, bf16, x2 width, CPU->GPU->CPU)
#   kernels-bf16  python bench/run.py --quick --no-compile --dtype bfloat16
#   verify_cost   python bench/verify_cost.py
#   kernels    python bench/run.py --quick                   (fp32, with torch.compile; --full: the full sweep)
#   tests      python -m pytest tests/test_kernels.py -q -x  (only with --tests: no test uses CUDA)
#
# Results: every bench script's write_results goes to a session folder (common.RESULTS_DIR is pointed
# there by a small wrapper), never over the files in bench/results; gpu_check's output is saved as
# gpu_check_<device>.txt like the committed one. At the end (and after every step, so that a run cut
# short still brings something back) $OUT, if set, receives 3 files (the device tool brings back at
# most 8): gpu_session_summary.txt (each step's exit status and wall time), gpu_session_log.txt (the
# whole console output) and gpu_session_results.tar.gz (results/ with the bench result files, logs/
# with each step's output). Without $OUT they stay in the session folder printed at the end.
#
# Environment: the GPU machine's own python3 (torch with CUDA, triton, transformers, pytest); nothing
# can be downloaded there. growkit is made importable from this tree: already installed from here,
# else `pip install --no-index --no-deps --no-build-isolation -e .`, else a PYTHONPATH shim with the
# setup.py package layout. If torch is missing or has no CUDA, the script tries
# `pip install -e ".[test,hf,cli]"` (wheels carried in .whl/ first; the registry only where it can
# be reached) and, failing that, runs no GPU step. Every step parses its flags with tyro (the cli
# extra), which the H200 image lacks (device KINDS.md, 2026-11-17): `--fetch-wheels` downloads tyro,
# docstring-parser and typeguard (pure Python; typing-extensions is in the image), at the versions
# installed here, into .whl/ (git-ignored); carry .whl to the GPU machine and the env step installs
# them into the session folder (pip --target, no index) and puts that on PYTHONPATH.
set -u -o pipefail

DRY_RUN=${GPU_SESSION_DRY_RUN:-0}
FULL=0
TESTS=0
FETCH=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --full) FULL=1 ;;
    --tests) TESTS=1 ;;
    --fetch-wheels) FETCH=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument $arg (--dry-run, --full, --tests, --fetch-wheels)"; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
CLI_WHEELS=(tyro docstring-parser typeguard)  # tyro and its needs that the H200 image lacks

if [ "$FETCH" = 1 ]; then  # on this machine, not the GPU one: pure-Python wheels for any python 3
  pins=$("$PY" -c '
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)' "${CLI_WHEELS[@]}")
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl $pins || exit 1
  echo "in .whl/ (carry it to the GPU machine):"; ls .whl
  exit 0
fi
BUDGET=${GPU_SESSION_BUDGET_S:-$([ "$FULL" = 1 ] && echo 570 || echo 480)}
SESSION=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX")
RESULTS=$SESSION/results
LOGS=$SESSION/logs
mkdir -p "$RESULTS" "$LOGS"
SUMMARY=$SESSION/gpu_session_summary.txt
LOG=$SESSION/gpu_session_log.txt
OUTDIR=${OUT:-}
export PYTHONUNBUFFERED=1 GK_SESSION_RESULTS="$RESULTS"
unset TRITON_INTERPRET GROWKIT_BACKEND

exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
MODE=$([ "$DRY_RUN" = 1 ] && echo "dry run (CPU)" || echo "GPU")
{
  echo "gpu_session.sh: $MODE; started $(date -u '+%Y-%m-%d %H:%M:%S UTC'); budget ${BUDGET} s; full=$FULL tests=$TESTS"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $( [ -n "$(git status --porcelain 2>/dev/null)" ] && echo '(with uncommitted changes)')"
  printf '%-14s %6s %9s %9s  %s\n' step rc wall_s limit_s command
} >"$SUMMARY"

elapsed() { echo $(( $(date +%s) - START )); }

deliver() {  # copy what exists so far to $OUT (after every step: a run cut short still returns it)
  [ -n "$OUTDIR" ] || return 0
  mkdir -p "$OUTDIR"
  cp -f "$SUMMARY" "$OUTDIR/gpu_session_summary.txt" 2>/dev/null
  tar czf "$OUTDIR/gpu_session_results.tar.gz" -C "$SESSION" results logs 2>/dev/null
  return 0
}

FAILED=0
# step NAME LIMIT_S CMD...: run CMD under `timeout`, output to the console and logs/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - $(elapsed) - 20 ))
  if [ "$left" -lt 30 ]; then
    printf '%-14s %6s %9s %9s  %s\n' "$name" skip - - "skipped: session budget spent ($*)" >>"$SUMMARY"
    echo "=== $name: skipped (budget of ${BUDGET} s spent)"
    FAILED=1; deliver; return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo
  echo "=== $name (limit ${limit} s, $(elapsed) s into the session): $*"
  local t0 rc
  t0=$(date +%s.%N)
  if [ "$name" = env ]; then  # in this shell: it may export PYTHONPATH for the steps after it
    "$@" > >(tee "$LOGS/$name.log") 2>&1
    rc=$?
    sleep 0.2
  else  # functions too (exported below), under timeout in a child bash
    timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
  fi
  local wall
  wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "=== $name: TIMED OUT after ${limit} s"
  echo "=== $name: rc=$rc, ${wall} s"
  printf '%-14s %6s %9s %9s  %s\n' "$name" "$rc" "$wall" "$limit" "$*" >>"$SUMMARY"
  [ "$rc" = 0 ] || FAILED=1
  deliver
  return 0
}

# bench SCRIPT ARGS...: run bench/SCRIPT with its write_results pointed at $RESULTS
bench() {
  "$PY" -c '
import os, runpy, sys
from pathlib import Path
sys.path.insert(0, "bench")
import common
common.RESULTS_DIR = Path(os.environ["GK_SESSION_RESULTS"])
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
' "bench/$1" "${@:2}"
}

# ---------------------------------------------------------------- environment
env_report() {
  echo "host: $(uname -srm); $(nproc) CPUs; $(awk '/MemTotal/ {printf "%.0f GiB", $2/2^20}' /proc/meminfo) RAM (MemTotal)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi
    nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max,clocks.max.sm \
      --format=csv 2>/dev/null
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - <<'EOF'
import importlib, sys
print(f"python {sys.version.split()[0]} at {sys.executable}")
for name in ("torch", "triton", "transformers", "numpy", "safetensors", "pytest", "tyro", "yaml"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')}")
    except Exception as exc:  # report, never fail here
        print(f"  {name}: not importable ({type(exc).__name__}: {exc})")
try:
    import torch
    print(f"torch CUDA build {torch.version.cuda}; cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"  {p.name}: {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
except Exception as exc:
    print(f"torch: {exc}")
try:
    import growkit
    print(f"growkit {growkit.__version__} from {growkit.__file__}")
except Exception as exc:
    print(f"growkit: not importable ({exc})")
EOF
  return 0
}

growkit_here() {  # growkit imports from this tree
  "$PY" -c "import growkit.kernels, growkit.growth, sys, os; sys.exit(0 if os.path.realpath(growkit.__file__).startswith(os.path.realpath('$ROOT') + os.sep) else 1)" \
    >/dev/null 2>&1
}

shim_growkit() {  # the package layout of setup.py (growkit -> api/, growkit.X -> X/) by symlinks
  local shim=$SESSION/pythonpath
  mkdir -p "$shim/growkit"
  ln -sf "$ROOT"/api/* "$shim/growkit/"
  for p in kernels models growth verify train; do ln -sfn "$ROOT/$p" "$shim/growkit/$p"; done
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
}

cli_ok() {
  "$PY" -c "import tyro" >/dev/null 2>&1
}

torch_ok() {
  if [ "$DRY_RUN" = 1 ]; then "$PY" -c "import torch" >/dev/null 2>&1
  else "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; fi
}

prepare() {
  local ok=1
  if ! torch_ok; then
    echo "torch is missing or has no CUDA here: trying to install (torch not pinned to the CPU build)"
    if [ -d .whl ]; then
      timeout 300 "$PY" -m pip install -q --no-index --find-links .whl torch triton 2>&1 | tail -3
    fi
    torch_ok || PIP_DEFAULT_TIMEOUT=15 timeout 300 "$PY" -m pip install -q --retries 1 -e ".[test,hf,cli]" 2>&1 | tail -5
    torch_ok || { echo "no usable torch$([ "$DRY_RUN" = 1 ] || echo ' with CUDA'): the GPU steps cannot run"; ok=0; }
  fi
  if ! growkit_here; then
    echo "growkit is not installed from $ROOT: pip install -e . (offline, no dependencies)"
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
    if ! growkit_here; then
      echo "pip install -e . did not make it importable: using a PYTHONPATH shim of the package layout"
      shim_growkit
      growkit_here || { echo "growkit still not importable"; ok=0; }
    fi
  fi
  if ! cli_ok; then
    echo "tyro is not importable here: installing the carried wheels of ${CLI_WHEELS[*]} (.whl/)"
    local wheels=() name
    for name in "${CLI_WHEELS[@]}"; do
      wheels+=(.whl/"${name//-/_}"-*.whl)
    done
    if ls "${wheels[@]}" >/dev/null 2>&1; then
      timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SESSION/site" \
        "${wheels[@]}" 2>&1 | tail -3
      export PYTHONPATH="$SESSION/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    cli_ok || { echo "no tyro, so no step can parse its flags: run 'bash bench/gpu_session.sh --fetch-wheels' where pip works, and carry .whl"; ok=0; }
  fi
  env_report
  [ "$ok" = 1 ]
}

step env 240 prepare
ENV_RC=$(awk '$1 == "env" {print $2}' "$SUMMARY")
SLUG=$("$PY" -c '
import sys; sys.path.insert(0, "bench")
import torch
from common import device_slug
print(device_slug(torch.device("cuda" if torch.cuda.is_available() else "cpu")))' 2>/dev/null || echo unknown)

run_gpu_check() {  # its output saved like bench/results/gpu_check_<device>.txt
  local rc
  if [ "$DRY_RUN" = 1 ]; then
    TRITON_INTERPRET=1 "$PY" bench/gpu_check.py --device cpu --quick 2>&1 | tee "$SESSION/gpu_check.out"
  else
    "$PY" bench/gpu_check.py 2>&1 | tee "$SESSION/gpu_check.out"
  fi
  rc=${PIPESTATUS[0]}
  { echo "gpu_check rc=$rc"; cat "$SESSION/gpu_check.out"; } >"$RESULTS/gpu_check_${SLUG}.txt"
  return $rc
}

export PY RESULTS SESSION SLUG DRY_RUN
export -f bench run_gpu_check

if [ "$ENV_RC" != 0 ]; then
  echo "=== the environment is not usable: no benchmark runs (see above)"
elif [ "$DRY_RUN" = 1 ]; then
  step gpu_check 300 run_gpu_check
  step grow_device 120 "$PY" bench/grow_device_check.py --device cpu
  step grow_e2e 200 env TRITON_INTERPRET=1 "$PY" bench/grow_e2e.py --device cpu --layers 1 --hidden 256 \
    --intermediate 512 --vocab 1024 --repeat 1 --results-dir "$RESULTS"
  step verify_cost 200 bench verify_cost.py --quick
  step kernels 300 bench run.py --quick --no-compile
  [ "$TESTS" = 1 ] && step tests 300 "$PY" -m pytest tests/test_kernels.py -q -x
else
  # in order of what matters most and runs most predictably: torch.compile (kernels) last
  step gpu_check 180 run_gpu_check
  step grow_device 90 "$PY" bench/grow_device_check.py
  step grow_e2e 300 "$PY" bench/grow_e2e.py --results-dir "$RESULTS"
  step kernels-bf16 120 bench run.py --quick --no-compile --dtype bfloat16
  step verify_cost 150 bench verify_cost.py
  if [ "$FULL" = 1 ]; then
    step kernels 420 bench run.py
  else
    step kernels 240 bench run.py --quick
  fi
  # NOTE: no test uses CUDA (tests/conftest.py runs the Triton kernels through the interpreter on
  # CPU tensors); this only checks the interpreter path under the machine's torch/triton versions.
  [ "$TESTS" = 1 ] && step tests 240 "$PY" -m pytest tests/test_kernels.py -q -x
fi

{
  echo
  echo "total $(elapsed) s; $([ "$FAILED" = 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED OR WERE SKIPPED')"
  echo "headlines:"
  grep -h -E "checks, [0-9]+ failed|^growkit / copy|^bitwise checks|^device-to-device|^peak RSS|^detailed_growth_check /|GrowthMonitor\(every|^copy bandwidth|^device:" \
    "$LOGS"/*.log 2>/dev/null | sed 's/^/  /'
  echo "result files:"
  (cd "$RESULTS" && ls -l | tail -n +2)
} >>"$SUMMARY"
echo
cat "$SUMMARY"
sleep 1  # the console's tee into $LOG catches up
cp "$LOG" "$LOGS/gpu_session_log.txt" 2>/dev/null
deliver
if [ -n "$OUTDIR" ]; then
  cp -f "$LOG" "$OUTDIR/gpu_session_log.txt"
  echo "copied to \$OUT: $(ls "$OUTDIR" | tr '\n' ' ')"
else
  echo "session folder: $SESSION (results/, logs/, gpu_session_summary.txt, gpu_session_log.txt)"
fi
exit $FAILED
