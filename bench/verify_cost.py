"""What verification costs: detailed_growth_check vs the passes it needs, and GrowthMonitor.

    python bench/verify_cost.py            # 12 layers, d_model 512, grown x2 in width; probe [8, 256]
    python bench/verify_cost.py --quick    # a small model, for a smoke run

Two figures, each measured side by side in one run on one device:

* check ratio: ``detailed_growth_check(old, new, probe, device, 2)`` (report printed to a
  buffer) over the passes it cannot avoid: the old model's forward pass (no grad) plus the
  grown model's forward and backward pass on the same probe. Runs alternate (baseline,
  check, baseline, check, ...) and the ratio is the median of the paired ratios, so a load
  change on the machine hits both sides.
* monitor overhead: a training step of the grown model (forward, backward, AdamW step)
  against ``GrowthMonitor(model, every=N)``: (one measuring tick + (N - 1) skipped calls)
  / (N training steps).

Without CUDA everything runs on the CPU through the torch reference paths of the kernels
(``TRITON_INTERPRET`` is unset: the interpreter is a correctness tool). Results:
``bench/results/verify_cost_<device>.json`` (and ``.csv``), written atomically.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before growkit (and triton.jit) is imported

import contextlib  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_label, parse_cli, time_fn, write_results  # noqa: E402

from growkit.growth import grow_width  # noqa: E402
from growkit.models import ModelConfig, Transformer, causal_lm_loss  # noqa: E402
from growkit.verify import GrowthMonitor, detailed_growth_check  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


@dataclass
class Args:
    layers: int = 12
    d_model: int = 512
    heads: int = 8
    vocab: int = 8192
    batch: int = 8
    seq: int = 256
    scale: int = 2
    repeat: int = 3
    """timed (baseline, check) pairs"""
    train_steps: int = 3
    """timed training steps"""
    every: int = 100
    quick: bool = False
    """4 layers, d_model 128, probe [4, 64]"""


def main() -> None:
    args = parse_cli(Args, description=__doc__)
    if args.quick:
        args.layers, args.d_model, args.heads, args.vocab, args.batch, args.seq = 4, 128, 4, 1024, 4, 64

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label = device_label(device)
    print(f"device: {label}")
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      max_seq_len=args.seq)
    old = Transformer(cfg)
    old.init_weights(seed=0)
    old.to(device)
    t0 = time.perf_counter()
    new = grow_width(old, args.scale)
    grow_s = time.perf_counter() - t0
    n_old = sum(p.numel() for p in old.parameters())
    n_new = sum(p.numel() for p in new.parameters())
    print(f"old: {args.layers} layers, d_model {args.d_model}, {n_old / 1e6:.1f}M params; grown x{args.scale} "
          f"in width: d_model {new.config.d_model}, {n_new / 1e6:.1f}M params (grow_width {grow_s:.1f} s)")
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)

    # ------------------------------------------------------------ check vs its passes
    def passes():
        with torch.no_grad():
            old(probe)
        loss = causal_lm_loss(new(probe)[:, :-1], probe[:, 1:])
        loss.backward()
        for p in new.parameters():
            p.grad = None

    verdicts, texts = [], []

    def check():
        with contextlib.redirect_stdout(io.StringIO()) as buf:
            verdicts.append(detailed_growth_check(old, new, probe, device, args.scale))
        texts.append(buf.getvalue())

    passes()  # warm-up, both sides
    check()
    base_t, check_t = [], []
    for i in range(args.repeat):
        base_t.append(_timed(passes, device))
        check_t.append(_timed(check, device))
        print(f"  pair {i}: passes {base_t[-1]:.2f} s, detailed_growth_check {check_t[-1]:.2f} s "
              f"(x{check_t[-1] / base_t[-1]:.3f})")
    paired = [c / b for b, c in zip(base_t, check_t)]
    check_ratio = statistics.median(paired)
    print(f"detailed_growth_check / (old forward + new forward + backward): x{check_ratio:.3f} "
          f"(median of {args.repeat} paired runs; target <= 1.5); verdict {'PASSED' if all(verdicts) else 'FAILED'}")
    report_text = texts[-1]
    seconds = [line for line in report_text.splitlines() if line.startswith("seconds:")]
    if seconds:
        print("  last check's own breakdown, " + seconds[0])
    summary = report_text.split("=== Summary ===")[-1].strip()
    print("  " + summary.replace("\n", "\n  "))

    # ------------------------------------------------------------ monitor overhead
    new.train()
    opt = torch.optim.AdamW(new.parameters(), lr=1e-4)

    def train_step():
        loss = new.loss(probe[:, :-1], probe[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    monitor = GrowthMonitor(new, every=args.every, warn=False)
    train_step()  # warm-up (allocates the Adam state)
    step_times = [_timed(train_step, device) for _ in range(args.train_steps)]
    step_s = statistics.median(step_times)
    tick_s = time_fn(lambda: monitor.measure(0), device, warmup=1, repeat=3)
    n_calls = 10000
    skip_s = _timed(lambda: [monitor.step(1) for _ in range(n_calls)], device) / n_calls
    overhead = (tick_s + (args.every - 1) * skip_s) / (args.every * step_s)
    print(f"training step {step_s:.2f} s; monitor tick {tick_s * 1e3:.1f} ms, skipped call {skip_s * 1e6:.2f} us; "
          f"GrowthMonitor(every={args.every}) adds {overhead:.3%} (target < 1%)")

    meta = dict(
        device=label,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        model=f"{args.layers} layers, d_model {args.d_model} -> {new.config.d_model} (grow_width x{args.scale}), "
              f"vocab {args.vocab}",
        params_old=n_old,
        params_new=n_new,
        probe=[args.batch, args.seq],
        command="python bench/verify_cost.py" + (" --quick" if args.quick else ""),
        kernel_path="torch reference (CPU)" if device.type == "cpu" else "Triton",
    )
    rows = [
        dict(figure="detailed_growth_check / passes", ratio=check_ratio, target="<= 1.5",
             baseline_s=statistics.median(base_t), measured_s=statistics.median(check_t),
             samples=";".join(f"{r:.4f}" for r in paired),
             baseline="old forward (no grad) + new forward + backward on the same probe"),
        dict(figure=f"GrowthMonitor(every={args.every}) overhead", ratio=overhead, target="< 0.01",
             baseline_s=step_s, measured_s=tick_s, skipped_call_s=skip_s,
             samples=";".join(f"{t:.3f}" for t in step_times),
             baseline="training step: forward + backward + AdamW step of the grown model"),
    ]
    json_path, _ = write_results("verify_cost", device, meta, rows)
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
