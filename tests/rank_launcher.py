"""Starts a test's worker script as N ranks with torchrun's environment, on 127.0.0.1.

The distributed tests (``test_distributed_monitor.py``, ``test_distributed_pipeline.py``)
run their scenarios in one group of processes: each is ``python SCRIPT --worker OUT`` with
RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT set as torchrun sets them, its output
going to ``OUT/log<r>.txt`` (a file: no pipe can fill up and block a rank).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(script: str, out: str | os.PathLike, world: int, timeout: float) -> tuple[list[int | None], str]:
    """Runs the ranks and waits (killing them all past ``timeout`` seconds); returns (exit
    codes, the ranks' logs)."""
    out = Path(out)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1")
    # the kernels' torch reference unless asked otherwise: the Triton interpreter makes the
    # workers 3x slower (18 s instead of 6 s) and its kernels are tested on their own
    env.setdefault("GROWKIT_BACKEND", "torch")
    procs = []
    for r in range(world):
        with open(out / f"log{r}.txt", "w") as log:
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(script), "--worker", str(out)],
                                          env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                          stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
                    q.wait()
    logs = "\n".join(f"--- rank {r}:\n" + (out / f"log{r}.txt").read_text() for r in range(world))
    return [p.returncode for p in procs], logs


def run_scenarios(out_dir: str | os.PathLike, scenarios: dict) -> NoReturn:
    """The worker's side: joins the gloo group, runs ``scenarios`` (name -> callable(rank) ->
    JSON-able dict) in order, writes ``OUT/rank<r>.json`` (each result, ``<name>_seconds``,
    and the traceback of a failure) and ends the process with the exit status. After a
    failure the remaining scenarios are not run: their collectives would wait for a rank
    that has left them."""
    import json
    import traceback
    from datetime import timedelta

    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    results, code = {}, 0
    try:
        for name, fn in scenarios.items():
            t0 = time.perf_counter()
            try:
                results[name] = fn(rank)
            except Exception:  # noqa: BLE001 - recorded for the test to show
                results[name] = {"error": traceback.format_exc()}
                code = 1
                break
            results[name + "_seconds"] = time.perf_counter() - t0
    finally:
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
        if code == 0:
            # Every rank past its last collective before any tears the group down.
            dist.barrier()
            dist.destroy_process_group()
    # NOTE: a plain exit runs torch's C++ teardown, which once aborted a rank ("terminate
    # called without an active exception", exit status -6) after every result was written
    # and the group destroyed (CI, both cores busy with other work): the results are all
    # in rank<r>.json by now, so leave without that teardown, keeping the exit status.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_ranks(script: str, out: str | os.PathLike, world: int, timeout: float) -> tuple[list[dict], str]:
    """:func:`spawn_ranks` (once more if the free port was taken meanwhile), then each rank's
    ``rank<r>.json``; fails the calling test, with the logs, if a rank failed."""
    import json

    codes, logs = spawn_ranks(script, out, world, timeout)
    if any(codes) and "address already in use" in logs.lower():
        codes, logs = spawn_ranks(script, out, world, timeout)
    results = []
    for r in range(world):
        path = Path(out) / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote nothing:\n{logs}"
        results.append(json.loads(path.read_text()))
    for r, res in enumerate(results):
        errors = {k: v["error"] for k, v in res.items() if isinstance(v, dict) and "error" in v}
        assert not errors, f"rank {r}: {errors}\n{logs}"
    assert codes == [0] * world, logs
    return results, logs
