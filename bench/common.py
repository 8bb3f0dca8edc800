"""Timing, device naming and result writing shared by the benchmarks."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

import torch

from growkit.files import atomic_write_text  # noqa: F401  (re-exported for the benchmarks)

RESULTS_DIR = Path(__file__).resolve().parent / "results"

T = TypeVar("T")


def parse_cli(args_type: type[T], argv=None, description: str | None = None) -> T:
    """The script's flags as ``args_type`` (a dataclass; each field a flag, its docstring the
    help) through tyro, the project's CLI library (the ``cli`` extra). ``argv``: None for
    sys.argv; ``description``: the script's docstring, shown by ``--help``. A ``bool`` field
    is a plain switch (``--quick``; no ``--no-quick`` partner, so ``no_compile`` stays
    ``--no-compile``). A list flag (``tuple[T, ...]``) given with no value is a usage error, as
    argparse's ``nargs="+"`` made it (tyro's lists take zero values too): one whose value ends
    empty while its default is not."""
    import tyro

    args = tyro.cli(args_type, args=None if argv is None else list(argv), description=description,
                    config=(tyro.conf.FlagCreatePairsOff,))
    for f in dataclasses.fields(args_type):
        if getattr(args, f.name) == () and f.default != ():
            usage_error(f"argument --{f.name.replace('_', '-')}: expected at least one argument")
    return args


def usage_error(message: str) -> NoReturn:
    """A flag value the parser accepted but the script cannot use: the message on stderr and
    exit status 2, as for a flag the parser refused."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_label(device).lower()).strip("-")[:60]


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_results(name: str, device: torch.device, meta: dict, rows: list[dict]) -> tuple[Path, Path]:
    """``bench/results/<name>_<device>.json`` and ``.csv``."""
    stem = f"{name}_{device_slug(device)}"
    json_path = RESULTS_DIR / f"{stem}.json"
    csv_path = RESULTS_DIR / f"{stem}.csv"
    atomic_write_text(json_path, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_path, buf.getvalue())
    return json_path, csv_path


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    table = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))
