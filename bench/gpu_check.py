"""Correctness of the Triton kernels compiled for a real GPU (the tests use the interpreter).

    python bench/gpu_check.py          # needs CUDA; exits 1 on any failure
    TRITON_INTERPRET=1 python bench/gpu_check.py --device cpu --quick   # a dry run of this script

What it checks, on CUDA tensors with the native Triton kernels:
- ``hyperclone``: bitwise equal to the torch reference (``naive_hyperclone`` on the same
  GPU) for fp32/fp16/bf16, odd shapes, a non-contiguous view, 3-D experts, both noise
  modes, and scales 2, 3 and 4. The noise is integer arithmetic plus one ``div_rn``, so any
  difference is a bug, not rounding.
- the same noise on the GPU and on the CPU: one weight grown on both is bitwise equal.
- ``layer_diff_stats`` and ``block_divergence`` against their references (float32 sums
  in a different order: relative 1e-5).
- ``grow_width`` of a random model through Triton equals the torch path bitwise, and the
  four growth checks pass on the GPU.

Outputs are filled with NaN before each launch, so unwritten elements fail.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_cli  # noqa: E402


@dataclass
class Args:
    device: Literal["cuda", "cpu"] = "cuda"
    """cpu: a dry run through the Triton interpreter (TRITON_INTERPRET=1)"""
    quick: bool = False
    """small shapes only"""


def main(argv=None) -> int:
    args = parse_cli(Args, argv, description=__doc__)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available")
        return 1
    if (args.device == "cuda") == interpret:
        print("gpu_check: use TRITON_INTERPRET=1 with --device cpu, and neither for the GPU")
        return 1
    from growkit.kernels import (
        block_divergence,
        hyperclone,
        layer_diff_stats,
        naive_block_divergence,
        naive_hyperclone,
        naive_layer_diff_stats,
    )

    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}, torch {torch.__version__}")
    real_empty = torch.empty

    def poisoned_empty(*a, **k):
        t = real_empty(*a, **k)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int16, torch.int32):
            t.fill_(-1)
        return t

    failures: list[str] = []
    counts = {"hyperclone": 0, "cpu-gpu": 0, "reductions": 0, "growth": 0}

    def check(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)
            print(f"FAIL {what}")

    def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.shape != b.shape or a.dtype != b.dtype or torch.isnan(a.float()).any():
            return False
        view = torch.int16 if a.element_size() == 2 else torch.int32
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))

    t0 = time.perf_counter()
    g = torch.Generator(device="cpu").manual_seed(0)
    cases = [((37, 53), 2, 3), ((37, 53), 3, 2), ((37,), 3, 1), ((3, 7, 9), 2, 2), ((5, 300), 2, 4),
             ((1000, 2048), 2, 2), ((513, 1031), 4, 4)]
    if args.quick:
        cases = cases[:5]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape, r_o, r_i in cases:
            w = (torch.randn(shape, generator=g) * 0.5 + 0.1).to(dtype).to(dev)
            for noise_std, noise in ((0.0, "zero_sum"), (1e-2, "zero_sum"), (1e-2, "independent")):
                if w.dim() == 1 and r_i != 1:
                    continue
                kw = dict(noise_std=noise_std, noise=noise, seed=11)
                torch.empty = poisoned_empty
                try:
                    out = hyperclone(w, r_o, r_i, backend="triton", **kw)
                finally:
                    torch.empty = real_empty
                check(bitwise(out, naive_hyperclone(w, r_o, r_i, **kw)),
                      f"hyperclone {dtype} {shape} x({r_o},{r_i}) {noise} {noise_std}")
                counts["hyperclone"] += 1
        base = (torch.randn(53, 74, generator=g)).to(dtype).to(dev)
        view = base.t()[:, ::2]
        out = hyperclone(view, 2, 2, noise_std=1e-2, seed=3, backend="triton")
        check(bitwise(out, naive_hyperclone(view.contiguous(), 2, 2, noise_std=1e-2, seed=3)),
              f"hyperclone non-contiguous {dtype}")
        counts["hyperclone"] += 1
        w_cpu = (torch.randn(300, 256, generator=g)).to(dtype)
        gpu = hyperclone(w_cpu.to(dev), 2, 2, noise_std=1e-3, seed=5, backend="triton").cpu()
        cpu = hyperclone(w_cpu, 2, 2, noise_std=1e-3, seed=5, backend="torch")
        check(bitwise(gpu, cpu), f"hyperclone GPU == CPU {dtype}")
        counts["cpu-gpu"] += 1

    for dtype in (torch.float32, torch.bfloat16):
        old = torch.randn(6, 4, 33, 48, generator=g).to(dtype).to(dev)
        new = (old.float().repeat(1, 1, 1, 2) + 1e-3 * torch.randn(6, 4, 33, 96, generator=g).to(dev)).to(dtype)
        got, ref = layer_diff_stats(old, new, backend="triton"), naive_layer_diff_stats(old, new)
        for name in ("max_diff", "mean_diff"):
            a, b = getattr(got, name), getattr(ref, name)
            check(torch.allclose(a, b, rtol=1e-5, atol=0), f"layer_diff_stats {name} {dtype}")
        x = torch.randn(3 * 257, 129, generator=g).to(dtype).to(dev)
        got, ref = block_divergence(x, 3, backend="triton"), naive_block_divergence(x, 3)
        for name in ("max_diff", "mean_diff", "magnitude"):
            check(torch.allclose(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=0),
                  f"block_divergence {name} {dtype}")
        counts["reductions"] += 5

    from model_factory import random_ids, random_model

    from growkit.growth import grow_width, upcycle_to_moe
    from growkit.verify import run_growth_checks

    for n_experts, scale in ((0, 2), (4, 2), (4, 3)):
        src = random_model(1, n_kv_heads=2, d_model=64, n_heads=4, d_ff=96)
        if n_experts:
            src = upcycle_to_moe(src, n_experts, 2)
        src = src.to(dev)
        os.environ["GROWKIT_BACKEND"] = "triton"
        grown_t = grow_width(src, scale, noise_std=1e-4, seed=3)
        os.environ["GROWKIT_BACKEND"] = "torch"
        grown_n = grow_width(src, scale, noise_std=1e-4, seed=3)
        os.environ.pop("GROWKIT_BACKEND")
        sd_t, sd_n = grown_t.state_dict(), grown_n.state_dict()
        check(sd_t.keys() == sd_n.keys() and all(bitwise(sd_t[k], sd_n[k]) for k in sd_t),
              f"grow_width x{scale} triton == torch (n_experts={n_experts})")
        report = run_growth_checks(src, grown_t, probe=random_ids(97, (2, 16), seed=1).to(dev), scale_factor=scale)
        check(report.passed, f"growth checks on the GPU (x{scale}, n_experts={n_experts})")
        if not report.passed:
            print(report)
        counts["growth"] += 2

    seconds = time.perf_counter() - t0
    print("\n| group | checks |\n|---|---|")
    for k, v in counts.items():
        print(f"| {k} | {v} |")
    print(f"\n{sum(counts.values())} checks, {len(failures)} failed, {seconds:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
