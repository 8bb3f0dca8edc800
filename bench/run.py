"""Kernel benchmark: Triton vs eager PyTorch vs torch.compile, as GB/s and % of copy bandwidth.

    python bench/run.py            # full sweep
    python bench/run.py --quick    # a short run

Every figure of one run is measured side by side on one device, and the device-to-device
copy bandwidth is measured in the same run, so ratios are comparable. Without CUDA the
torch paths are timed on the CPU (labelled so); Triton timings need a GPU (the interpreter
is a correctness tool, orders of magnitude slower). Results: ``bench/results/kernels_<device>.json``
and ``.csv``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_label, parse_cli, print_table, time_fn, usage_error, write_results  # noqa: E402

from growkit.kernels import (  # noqa: E402
    block_divergence,
    hyperclone,
    layer_diff_stats,
    naive_block_divergence,
    naive_layer_diff_stats,
)
from growkit.kernels.backend import interpreter_enabled  # noqa: E402
from growkit.kernels.hyperclone import _hyperclone_cpu  # noqa: E402
from growkit.kernels.noise import noise_divisor, seed_keys, uniform_int_torch  # noqa: E402


# --------------------------------------------------------------------------------------
# Eager PyTorch baselines: what a user would write without growkit
# --------------------------------------------------------------------------------------
def eager_hyperclone(w, r_o, r_i):
    return (w / r_i).repeat(r_o, r_i)


def eager_hyperclone_noise(w, r_o, r_i, noise_div, k0, k1):
    """Unchunked zero-sum noise, the same values as growkit's (for torch.compile to fuse)."""
    O, I = w.shape
    g = torch.arange(r_o * O * r_i * I, device=w.device).view(r_o, O, r_i, I)
    if r_i == 2:  # the pair gets +c and -c, drawn at block 0's index
        c = uniform_int_torch(g[:, :, :1], k0, k1)
        c = torch.cat([c, -c], dim=2)
    else:
        c = uniform_int_torch(g, k0, k1)
        c = r_i * c - c.sum(dim=2, keepdim=True)
    out = (w.float() / r_i).view(1, O, 1, I) + c.float() / noise_div
    return out.to(w.dtype).view(r_o * O, r_i * I)


def eager_layer_loop(old, new):
    """The per-layer loop a check would otherwise run: several small ops per layer."""
    s = new.shape[-1] // old.shape[-1]
    maxes, means = [], []
    for o, n in zip(old, new):
        d = (n.view(*n.shape[:-1], s, -1) - o.unsqueeze(-2)).abs()
        maxes.append(d.max())
        means.append(d.float().mean())
    return torch.stack(maxes), torch.stack(means)


def eager_block_divergence(x, groups):
    x3 = x.reshape(groups, -1).float()
    d = (x3 - x3[:1]).abs()
    return d.amax(1), d.mean(1), x3.abs().mean(1)


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def maybe_compile(fn, enabled):
    if not enabled:
        return None
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as exc:  # pragma: no cover - depends on the toolchain
        print(f"torch.compile unavailable: {exc}")
        return None


def run_case(rows, *, kernel, size, nbytes, device, fns, copy_gbps, repeat, save=None):
    """Time each available implementation, add one row per implementation, then ``save()``."""
    times = {}
    for impl, fn in fns.items():
        if fn is None:
            continue
        try:
            times[impl] = time_fn(fn, device, repeat=repeat)
        except Exception as exc:  # a compile failure must not hide the other figures
            print(f"  {kernel} {size} {impl}: failed ({type(exc).__name__}: {exc})")
    ref = times.get("eager")
    for impl, t in times.items():
        gbps = nbytes / t / 1e9
        rows.append(
            dict(
                kernel=kernel, size=size, impl=impl, ms=t * 1e3, GBps=gbps,
                pct_copy_bw=100 * gbps / copy_gbps,
                speedup_vs_eager=(ref / t) if ref else None,
                speedup_vs_compile=(times["compile"] / t) if "compile" in times else None,
            )
        )
        print(f"  {kernel:18s} {size:38s} {impl:14s} {t * 1e3:9.3f} ms {gbps:8.1f} GB/s", flush=True)
    if save is not None:
        save()  # NOTE: after every case, so a run stopped by a time limit keeps what it measured


@dataclass
class Args:
    quick: bool = False
    """few sizes, few repeats"""
    no_compile: bool = False
    """skip torch.compile (slow to build on a CPU)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


def main(argv=None):
    args = parse_cli(Args, argv, description=__doc__)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if interpreter_enabled():
        usage_error("unset TRITON_INTERPRET: the interpreter is for tests, not timings")
    dtype = getattr(torch, args.dtype)
    esize = torch.tensor([], dtype=dtype).element_size()
    repeat = 3 if args.quick else 7
    use_compile = not args.no_compile
    label = device_label(device)
    print(f"device: {label}" + ("" if on_gpu else "  (CPU: torch paths only; Triton timings need a GPU)"))

    # Copy bandwidth (read + write) on this device, the ceiling of every memory-bound kernel.
    n_copy = (1 << 26) if on_gpu else (1 << 24)
    src = torch.randn(n_copy, device=device)
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() * 4 / time_fn(lambda: dst.copy_(src), device, repeat=repeat) / 1e9
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s")
    del src, dst

    rows = []
    meta = dict(device=label, device_type=device.type, dtype=args.dtype, quick=args.quick,
                copy_GBps=copy_gbps, torch=torch.__version__, triton=_triton_version(), compile=use_compile,
                triton_timed=on_gpu,
                note=None if on_gpu else "CPU run: torch paths only; Triton timings need a GPU")
    name = "kernels" if args.dtype == "float32" else f"kernels-{args.dtype}"

    def save():
        return write_results(name, device, meta, rows)

    # hyperclone: [n, n] -> [2n, 2n]; output sizes 16 MB .. 1 GB in fp32 on a GPU
    sizes = ([1024, 2048] if args.quick else [1024, 2048, 4096]) if not on_gpu else (
        [2048, 8192] if args.quick else [1024, 2048, 4096, 8192])
    compiled_clone = maybe_compile(eager_hyperclone, use_compile)
    compiled_noise = maybe_compile(eager_hyperclone_noise, use_compile)
    for n in sizes:
        w = torch.randn(n, n, device=device).to(dtype)
        nbytes = (w.numel() + 4 * w.numel()) * esize
        size = f"{n}x{n}->x2 ({4 * w.numel() * esize / 2**20:.0f} MB out)"
        fns = {
            "eager": lambda: eager_hyperclone(w, 2, 2),
            "compile": (lambda: compiled_clone(w, 2, 2)) if compiled_clone else None,
            "growkit-torch": lambda: hyperclone(w, 2, 2, backend="torch"),
            "repeat-only": lambda: w.repeat(2, 2),
        }
        if on_gpu:
            fns["triton"] = lambda: hyperclone(w, 2, 2, backend="triton")
        run_case(rows, kernel="hyperclone", size=size, nbytes=nbytes, device=device, fns=fns,
                 copy_gbps=copy_gbps, repeat=repeat, save=save)
        if n <= (4096 if on_gpu else 2048):
            nd = noise_divisor(1e-5, 2, True)
            k0, k1 = seed_keys(0)
            fns = {
                "eager": lambda: eager_hyperclone_noise(w, 2, 2, nd, k0, k1),
                "compile": (lambda: compiled_noise(w, 2, 2, nd, k0, k1)) if compiled_noise else None,
                "growkit-torch": lambda: hyperclone(w, 2, 2, noise_std=1e-5, backend="torch"),
            }
            if on_gpu:
                fns["triton"] = lambda: hyperclone(w, 2, 2, noise_std=1e-5, backend="triton")
            else:  # the C library's path (growkit-torch) against the numpy path it replaced
                fns["growkit-numpy"] = lambda: _hyperclone_cpu(w, 2, 2, noise_std=1e-5, noise="zero_sum", seed=0,
                                                               divide=True, use_ext=False)
            run_case(rows, kernel="hyperclone+noise", size=size, nbytes=nbytes, device=device, fns=fns,
                     copy_gbps=copy_gbps, repeat=repeat, save=save)
        del w

    # layer_diff_stats: L layers of hidden states [B*T, d] vs [B*T, 2d]
    compiled_stats = maybe_compile(naive_layer_diff_stats, use_compile)
    ld_sizes = [(12, 2048, 512)] if args.quick else [(12, 2048, 512), (24, 8192, 1024)]
    if on_gpu:
        ld_sizes.append((32, 16384, 2048))
    for L, rows_per_layer, d in ld_sizes:
        old = torch.randn(L, rows_per_layer, d, device=device).to(dtype)
        new = old.repeat(1, 1, 2)
        nbytes = (old.numel() + new.numel()) * esize
        size = f"L={L} [{rows_per_layer}, {d}] x2 ({nbytes / 2**20:.0f} MB read)"
        fns = {
            "eager": lambda: eager_layer_loop(old, new),
            "compile": (lambda: compiled_stats(old, new)) if compiled_stats else None,
            "growkit-torch": lambda: layer_diff_stats(old, new, backend="torch"),
        }
        if on_gpu:
            fns["triton"] = lambda: layer_diff_stats(old, new, backend="triton")
        run_case(rows, kernel="layer_diff_stats", size=size, nbytes=nbytes, device=device, fns=fns,
                 copy_gbps=copy_gbps, repeat=repeat, save=save)
        del old, new

    # block_divergence: a [2n, n] weight of two clones
    compiled_div = maybe_compile(eager_block_divergence, use_compile)
    for n in ([2048] if args.quick else [2048, 4096]):
        x = torch.randn(2 * n, n, device=device).to(dtype)
        nbytes = x.numel() * esize
        size = f"[{2 * n}, {n}] groups=2"
        fns = {
            "eager": lambda: eager_block_divergence(x, 2),
            "compile": (lambda: compiled_div(x, 2)) if compiled_div else None,
            "growkit-torch": lambda: naive_block_divergence(x, 2),
        }
        if on_gpu:
            fns["triton"] = lambda: block_divergence(x, 2, backend="triton")
        run_case(rows, kernel="block_divergence", size=size, nbytes=nbytes, device=device, fns=fns,
                 copy_gbps=copy_gbps, repeat=repeat, save=save)
        del x

    print()
    print_table(rows, ["kernel", "size", "impl", "ms", "GBps", "pct_copy_bw", "speedup_vs_eager", "speedup_vs_compile"])

    # The CPU acceptance ratio: growkit's torch hyperclone vs weight.repeat of the same output size.
    ratios = []
    for r in rows:
        if r["kernel"] == "hyperclone" and r["impl"] == "growkit-torch":
            rep = next(x for x in rows if x["kernel"] == "hyperclone" and x["size"] == r["size"] and x["impl"] == "repeat-only")
            ratios.append((r["size"], r["ms"] / rep["ms"]))
    print()
    for size, ratio in ratios:
        print(f"hyperclone torch path / weight.repeat: {ratio:.2f}x  ({size})")

    json_path, csv_path = save()
    print(f"\nwrote {json_path} and {csv_path}")


if __name__ == "__main__":
    main()
