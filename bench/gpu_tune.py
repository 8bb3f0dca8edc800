"""Sweep the launch shapes of the Triton kernels on a GPU (what the defaults are chosen from).

    python bench/gpu_tune.py       # needs CUDA; prints one table, writes bench/results/gpu_tune_<device>.json

hyperclone: tile shape (BLOCK_O x BLOCK_I) and warps, without and with noise, fp32 and bf16.
paired_diff (layer_diff_stats, block_divergence): row tiles reduced per program.
Every variant is checked against the default's output before it is timed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_label, print_table, time_fn, write_results  # noqa: E402

from growkit.kernels.hyperclone import _hyperclone_triton, _launch_shape  # noqa: E402
from growkit.kernels.paired_diff import paired_diff_triton  # noqa: E402


def main() -> None:
    device = torch.device("cuda")
    src = torch.randn(1 << 27, device=device)
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() * 4 / time_fn(lambda: dst.copy_(src), device, repeat=10) / 1e9
    src = dst = None
    rows = []

    def add(kernel, case, variant, fn, nbytes, default):
        t = time_fn(fn, device, repeat=10)
        gbps = nbytes / t / 1e9
        rows.append(dict(kernel=kernel, case=case, variant=variant, default=default, ms=t * 1e3, GBps=gbps,
                         pct_copy_bw=100 * gbps / copy_gbps))

    # (BLOCK_O, BLOCK_I, warps, one hash per 4 elements)
    variants = [(16, 256, 4, True), (16, 256, 8, True), (8, 512, 4, True), (8, 512, 8, True), (8, 512, 8, False),
                (4, 1024, 8, True), (4, 1024, 8, False), (32, 128, 4, True), (64, 64, 4, True)]
    for dtype, n, noise_std in [(torch.float32, 8192, 0.0), (torch.bfloat16, 8192, 0.0),
                                (torch.float32, 4096, 1e-5), (torch.bfloat16, 8192, 1e-5)]:
        w = torch.randn(n, n, device=device).to(dtype)
        kw = dict(noise_std=noise_std, noise="zero_sum", seed=0, divide=True)
        ref = _hyperclone_triton(w, 2, 2, **kw)
        nbytes = 5 * w.numel() * w.element_size()
        case = f"{str(dtype)[6:]} {n}^2 x2 noise={noise_std:g}"
        default = _launch_shape(n, n, noise_std > 0)
        for bo, bi, nw, a4 in variants:
            if noise_std == 0 and not a4:
                continue  # the hash is not used
            out = _hyperclone_triton(w, 2, 2, block_o=bo, block_i=bi, num_warps=nw, aligned4=a4, **kw)
            if not torch.equal(out, ref):
                raise SystemExit(f"hyperclone variant {bo}x{bi} w{nw} aligned4={a4} differs from the default")
            add("hyperclone", case, f"{bo}x{bi} w{nw}" + ("" if a4 else " hash/elem"),
                lambda: _hyperclone_triton(w, 2, 2, block_o=bo, block_i=bi, num_warps=nw, aligned4=a4, **kw),
                nbytes, (bo, bi, nw) == default and a4)
        w = ref = None

    for name, a, b, reps, n_slots, P, D, strides in [
        ("layer_diff L=32 [16384, 2048] x2", None, None, 2, 32, 16384, 2048, None),
        ("block_divergence [8192, 4096] g=2", None, None, 1, 2, 8192 * 4096 // 1024, 1024, None),
    ]:
        if name.startswith("layer"):
            b = torch.randn(32, 16384, 2048, device=device)
            a = b.repeat(1, 1, 2)
            a_s, b_s = a.stride(), b.stride()
        else:
            a = b = torch.randn(2, 8192 * 4096, device=device)
            a_s, b_s = (a.stride(0), 1024, 1), (0, 1024, 1)
        nbytes = (a.numel() + (b.numel() if name.startswith("layer") else 0)) * 4
        ref = paired_diff_triton(a, b, reps, a_strides=a_s, b_strides=b_s, n_slots=n_slots, P=P, D=D,
                                 with_magnitude=True)
        for tiles in (None, 1, 8, 64):
            got = paired_diff_triton(a, b, reps, a_strides=a_s, b_strides=b_s, n_slots=n_slots, P=P, D=D,
                                     with_magnitude=True, tiles_per_prog=tiles)
            if not torch.allclose(got[1], ref[1], rtol=1e-4) or not torch.equal(got[0], ref[0]):
                raise SystemExit(f"paired_diff tiles={tiles} differs")
            add("paired_diff", name, f"tiles={tiles or 'auto'}",
                lambda: paired_diff_triton(a, b, reps, a_strides=a_s, b_strides=b_s, n_slots=n_slots, P=P, D=D,
                                           with_magnitude=True, tiles_per_prog=tiles), nbytes, tiles is None)
        a = b = None

    print(f"device: {device_label(device)}; copy bandwidth {copy_gbps:.0f} GB/s")
    print_table(rows, ["kernel", "case", "variant", "default", "ms", "GBps", "pct_copy_bw"])
    path, _ = write_results("gpu_tune", device, dict(device=device_label(device), copy_GBps=copy_gbps,
                                                     torch=torch.__version__), rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
