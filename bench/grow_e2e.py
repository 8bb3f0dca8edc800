"""End to end on one GPU: grow a Llama-3-8B-shaped model (bf16, random weights) to x2 width,
from CPU memory to the GPU and back, against the copy bandwidth of the same path.

    python bench/grow_e2e.py                        # Llama-3-8B shapes on CUDA: 16 GB in, ~60 GB out
    python bench/grow_e2e.py --layers 4             # fewer layers (results get a shape suffix)
    python bench/grow_e2e.py --device cpu --layers 1 --hidden 256 --intermediate 512 --vocab 1024 \\
        --results-dir /tmp/grow_e2e                 # a dry run on the CPU (CPU kernels, memcpy "copies")
    TRITON_INTERPRET=1 python bench/grow_e2e.py --device cpu --layers 1 --hidden 256 \\
        --intermediate 512 --vocab 1024 --results-dir /tmp/grow_e2e   # the Triton kernels, interpreted

What is grown is growkit's own path: the tensor names and shapes come from a
``transformers.LlamaConfig`` (a model built on the meta device), the per-tensor growth from
``plan_width`` of the Llama family adapter, i.e. the roles, operators and noise that
``growkit grow --width 2`` uses (its defaults: zero-sum noise 1e-5, seed 0, read from
``GrowArgs``), executed tensor by tensor as ``growth/stream.py`` does, with CUDA tensors, so
the Triton kernels run.

Measured in one run, passes interleaved (growkit, copy, growkit, copy, ...), medians over ``--repeat``:

* ``growkit serial``: per output tensor, H2D of its source tensor(s), growth on the GPU, D2H of
  the grown tensor, all on one stream (CUDA events split the time into h2d / grow / d2h; the
  grow part is the GPU kernel time alone);
* ``copy serial``: the same loop with the growth replaced by an (unwritten) allocation of the
  grown shape: the same H2D bytes and D2H bytes, no compute;
* ``growkit overlap`` / ``copy overlap`` (CUDA only): the same two loops pipelined on three
  streams (H2D, compute, D2H) with at most ``--window`` tensors in flight, so the uploads of
  the next tensors and the compute overlap the download of earlier ones (PCIe is full duplex).

Reported: seconds, GB/s (H2D + D2H bytes over the wall time) and the ratio growkit / copy of
the same mode (the median of paired ratios). The kernels' share: ``grow_s``, and GB/s of
(source + grown bytes) over it, against the device-to-device copy bandwidth.

Correctness: a sample of output tensors (default: the embedding, every tensor of layer 0, the
final norm and lm_head; ``--check``) is grown on the CPU with growkit's CPU kernels
(``GROWKIT_BACKEND=torch``) once, and every timed growkit pass's result of them is compared
bitwise (the noise is integer hashing, bit-identical across backends). Their destinations are
poisoned (NaN) before each growkit pass.

Memory (decided so the peak stays far under the GPU machine's 128 GiB): the source model lives
in one pinned buffer (16.1 GB for the 8B shape; torch's pinned allocator rounds a block up to a
power of two: 17.2 GB). Grown tensors are *not* all kept: each is written into one of
``--window`` reusable pinned slots (largest grown tensor each, 2.1 GB for the 8B vocab: 6.3 GB,
8.6 GB rounded), except the sampled ones, which get their own pinned buffers (5.1 GB, 8.6 GB
rounded) and a CPU reference each (5.1 GB): about 40 GB in all. ``--keep-grown`` instead writes
every grown tensor into its own place in one pinned buffer (the whole grown model in CPU
memory: 60 GB, 68.7 GB rounded; about 91 GB in all), refused above ``--max-host-gb``. On the
GPU only the tensors in flight are held.

On the CPU (``--device cpu``, a dry run): "H2D" and "D2H" are plain memcpys of the same bytes
(into a fresh tensor, and into the slot), the growth uses the CPU kernels (or, under
``TRITON_INTERPRET=1``, the Triton kernels interpreted), and there is no overlap mode.
Results: ``write_results("grow_e2e", ...)`` into ``--results-dir`` (default bench/results), with
a shape suffix when the shape is not the 8B default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import device_label, parse_cli, print_table, time_fn, usage_error, write_results  # noqa: E402

from growkit.checkpoint_cli import GrowArgs  # noqa: E402
from growkit.growth.adapters import PART, get_family_adapter  # noqa: E402
from growkit.growth.plan import TensorSpec  # noqa: E402
from growkit.growth.roles import Role  # noqa: E402
from growkit.growth.stream import output_tensors, source_getter  # noqa: E402
from growkit.growth.width import check_width_args, plan_width  # noqa: E402
from growkit.kernels.backend import HAS_TRITON, interpreter_enabled, use_triton  # noqa: E402

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json)
LLAMA3_8B = dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
ALIGN = 4096  # byte alignment of every tensor inside a pinned buffer


# --------------------------------------------------------------------------------------
# The model: shapes from transformers, the growth plan from growkit
# --------------------------------------------------------------------------------------
def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )


def checkpoint_specs(cfg, dtype: torch.dtype) -> dict[str, TensorSpec]:
    """The checkpoint's tensor names and shapes: the state dict of the model transformers
    builds for ``cfg`` (on the meta device: nothing allocated)."""
    import warnings

    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg)
    return {n: TensorSpec(tuple(t.shape), dtype) for n, t in model.state_dict().items()}


def width_plan(cfg, disk: dict[str, TensorSpec], scale: int, noise_std: float, noise: str, seed: int):
    """(adapter, held index, plan, outputs) as ``growkit grow --width scale`` makes them
    (growth/stream.py: grow_checkpoint and api/checkpoint_cli.py: make_plans)."""
    adapter = get_family_adapter(cfg)
    index = adapter.from_disk(disk)  # held name -> the checkpoint tensors it is made of
    metas = {}
    for held, items in index.items():
        spec = disk[items[0][1]]
        shape = spec.shape if items[0][0] is None else (len(items), *spec.shape)
        metas[held] = torch.empty(shape, dtype=spec.dtype, device="meta")
    specs = {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in adapter.split(cfg, metas).items()}
    roles = adapter.roles_for_names(specs)
    tied = bool(adapter.cfg(cfg, "tie_embeddings", False)) and not any(
        pr.role is Role.LM_HEAD for pr in roles.values())
    plan = plan_width(adapter, cfg, specs, tied, scale, noise_std=noise_std, noise=noise, seed=seed)
    return adapter, index, plan, output_tensors(plan)


# --------------------------------------------------------------------------------------
# Host buffers
# --------------------------------------------------------------------------------------
def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)


def pinned_footprint(nbytes: int, pin: bool) -> int:
    """What torch's pinned allocator takes for one block: a power of two (CachingHostAllocator)."""
    return 1 << max(nbytes - 1, 1).bit_length() if pin else nbytes


def carve(buf: torch.Tensor, specs: dict[str, TensorSpec]) -> dict[str, torch.Tensor]:
    """Views of ``buf`` for ``specs``, each at an aligned offset (sizes from :func:`arena_bytes`)."""
    views, off = {}, 0
    for name, spec in specs.items():
        n = spec.nbytes
        views[name] = buf[off:off + n].view(spec.dtype).view(spec.shape)
        off += _aligned(n)
    return views


def arena_bytes(specs) -> int:
    return sum(_aligned(s.nbytes) for s in specs)


def slot_view(slot: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    return slot[:spec.nbytes].view(spec.dtype).view(spec.shape)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def poison(t: torch.Tensor) -> None:
    t.view(torch.uint8).fill_(0xFF)  # all-ones bytes: a NaN in every float dtype


def peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def growkit_backend(name: str):
    old = os.environ.get("GROWKIT_BACKEND")
    os.environ["GROWKIT_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GROWKIT_BACKEND", None)
        else:
            os.environ["GROWKIT_BACKEND"] = old


# --------------------------------------------------------------------------------------
# Clocks: CUDA events on a GPU, perf_counter on the CPU
# --------------------------------------------------------------------------------------
class Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    device: torch.device
    cfg: object
    adapter: object
    index: dict
    plan: object
    outputs: list
    needs: dict  # output name -> held source names
    sources: dict  # held name -> CPU (pinned) tensor
    dest: dict  # output index -> its own CPU destination (sampled / --keep-grown), else None
    slots: list  # reusable CPU destinations (bytes)
    window: int
    clock: Clock


def held_of(index: dict, name: str) -> str:
    """The held source tensor a role name is (or is a part of)."""
    if name in index:
        return name
    m = PART.match(name)
    if m and m.group(1) in index:
        return m.group(1)
    raise KeyError(name)


def grow_one(s: Setup, o, srcs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Output tensor ``o`` made by growkit's plan from ``srcs`` (on their device)."""
    get = source_getter(s.adapter, s.cfg, srcs.__getitem__, srcs)
    if len(o.parts) == 1:
        return s.plan.make(o.parts[0], get)
    return torch.cat([s.plan.make(p, get) for p in o.parts], dim=o.dim)


def upload(src: torch.Tensor, device: torch.device) -> torch.Tensor:
    """H2D (on the CPU: a memcpy into a fresh tensor, as the GPU path allocates one)."""
    t = torch.empty(src.shape, dtype=src.dtype, device=device)
    t.copy_(src, non_blocking=True)
    return t


def destination(s: Setup, i: int, o) -> torch.Tensor:
    own = s.dest.get(i)
    return own if own is not None else slot_view(s.slots[i % len(s.slots)], o.spec)


def run_serial(s: Setup, compute: bool) -> dict:
    """Every output tensor in turn on one stream: H2D, grow (or allocate only), D2H."""
    clock, dev = s.clock, s.device
    marks = []
    clock.sync()
    t0 = time.perf_counter()
    for i, o in enumerate(s.outputs):
        a = clock.mark()
        srcs = {h: upload(s.sources[h], dev) for h in s.needs[o.name]}
        b = clock.mark()
        out = grow_one(s, o, srcs) if compute else torch.empty(o.spec.shape, dtype=o.spec.dtype, device=dev)
        c = clock.mark()
        destination(s, i, o).copy_(out, non_blocking=True)
        d = clock.mark()
        marks.append((a, b, c, d))
        del srcs, out
    clock.sync()
    wall = time.perf_counter() - t0
    h2d = sum(clock.seconds(a, b) for a, b, _, _ in marks)
    grow = sum(clock.seconds(b, c) for _, b, c, _ in marks)
    d2h = sum(clock.seconds(c, d) for _, _, c, d in marks)
    return dict(wall_s=wall, h2d_s=h2d, grow_s=grow, d2h_s=d2h)


def run_overlap(s: Setup, compute: bool) -> dict:
    """The same, pipelined: H2D on one stream, growth on the current one, D2H on a third.

    At most ``window`` tensors are in flight: before tensor i is started, tensor i - window's
    D2H is waited for on the host, and only then are its GPU tensors released (so the
    caching allocator never hands memory still read by another stream to a new tensor) and
    its ring slot (i % window) reused.
    """
    dev = s.device
    comp = torch.cuda.current_stream(dev)
    h2d_stream, d2h_stream = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    inflight: deque = deque()
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for i, o in enumerate(s.outputs):
        while len(inflight) >= s.window:
            done, _held = inflight.popleft()
            done.synchronize()
            del _held
        with torch.cuda.stream(h2d_stream):
            srcs = {h: upload(s.sources[h], dev) for h in s.needs[o.name]}
            uploaded = torch.cuda.Event()
            uploaded.record(h2d_stream)
        comp.wait_event(uploaded)
        out = grow_one(s, o, srcs) if compute else torch.empty(o.spec.shape, dtype=o.spec.dtype, device=dev)
        made = torch.cuda.Event()
        made.record(comp)
        d2h_stream.wait_event(made)
        with torch.cuda.stream(d2h_stream):
            destination(s, i, o).copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record(d2h_stream)
        inflight.append((done, (srcs, out)))
        del srcs, out
    while inflight:
        done, _held = inflight.popleft()
        done.synchronize()
        del _held
    torch.cuda.synchronize(dev)
    return dict(wall_s=time.perf_counter() - t0)


@dataclasses.dataclass
class Args:
    device: Literal["cuda", "cpu"] = "cuda"
    layers: int = LLAMA3_8B["layers"]
    hidden: int = LLAMA3_8B["hidden"]
    intermediate: int = LLAMA3_8B["intermediate"]
    vocab: int = LLAMA3_8B["vocab"]
    heads: int = LLAMA3_8B["heads"]
    kv_heads: int = LLAMA3_8B["kv_heads"]
    scale: int = 2
    """width multiple"""
    repeat: int = 3
    """timed passes of each kind (interleaved)"""
    warmup: int = 1
    """untimed passes of each kind first (Triton compiles)"""
    window: int = 3
    """tensors in flight (and reusable pinned output slots)"""
    no_overlap: bool = False
    """serial passes only"""
    check: str = "default"
    """tensors compared bitwise with the CPU growth: default (embedding, layer 0, final norm, lm_head), all, none,
    or comma-separated checkpoint names"""
    keep_grown: bool = False
    """keep every grown tensor in one pinned CPU buffer (the whole grown model) instead of reusable slots"""
    max_host_gb: float = 100.0
    """refuse to start above this host memory estimate"""
    seed: int = 0
    """random source weights"""
    results_dir: str | None = None
    """default: bench/results (use /tmp for dry runs)"""


def parse_args(argv=None) -> Args:
    args = parse_cli(Args, argv, description=__doc__)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        usage_error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    if args.device == "cuda" and not torch.cuda.is_available():
        usage_error("CUDA is not available here: use --device cpu (a dry run)")
    if args.device == "cuda" and interpreter_enabled():
        usage_error("unset TRITON_INTERPRET for --device cuda (the interpreter runs CPU tensors)")
    if args.window < 1 or args.repeat < 1 or args.warmup < 0:
        usage_error("--window and --repeat must be >= 1, --warmup >= 0")
    return args


def choose_checks(arg: str, outputs) -> list[int]:
    names = [o.name for o in outputs]
    if arg == "none":
        return []
    if arg == "all":
        return list(range(len(outputs)))
    if arg == "default":  # layer 0, and the tensors outside the layers: embedding, final norm, lm_head
        return [i for i, n in enumerate(names) if ".layers.0." in n or ".layers." not in n]
    wanted = [n.strip() for n in arg.split(",") if n.strip()]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise SystemExit(f"--check: no output tensor named {missing}; e.g. {names[:3]}")
    return [names.index(n) for n in wanted]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    label = device_label(device)
    defaults = GrowArgs()  # growkit grow's defaults: the noise it adds
    scale, noise_std, seed = check_width_args(args.scale, defaults.noise_std, defaults.noise, defaults.seed)
    noise = defaults.noise
    kernel_path = ("Triton" if use_triton(device) else "torch/CPU") + (" (interpreted)" if interpreter_enabled() else "")
    print(f"device: {label}; torch {torch.__version__}; growth kernels: {kernel_path}")

    t_setup = time.perf_counter()
    cfg = llama_config(args)
    disk = checkpoint_specs(cfg, torch.bfloat16)
    adapter, index, plan, outputs = width_plan(cfg, disk, scale, noise_std, noise, seed)
    for o in outputs:
        if len(o.disk) != 1 or o.disk[0][2] is not None:  # pragma: no cover - not for a dense Llama
            raise SystemExit(f"{o.name}: stored as several checkpoint tensors; this bench grows dense models")
    needs = {o.name: sorted({held_of(index, n) for n in o.inputs}) for o in outputs}
    held_specs = {}
    for held, items in index.items():
        spec = disk[items[0][1]]
        held_specs[held] = spec if items[0][0] is None else TensorSpec((len(items), *spec.shape), spec.dtype)
    src_bytes = sum(s.nbytes for s in held_specs.values())
    out_bytes = sum(o.spec.nbytes for o in outputs)
    h2d_bytes = sum(held_specs[h].nbytes for o in outputs for h in needs[o.name])
    checks = choose_checks(args.check, outputs)
    check_specs = {i: outputs[i].spec for i in checks}
    largest = max(o.spec.nbytes for o in outputs)
    pin = on_gpu
    window = args.window if on_gpu else 1

    # host memory plan (pinned blocks are rounded up to a power of two by torch)
    src_arena = arena_bytes(held_specs.values())
    if args.keep_grown:
        keep_arena = arena_bytes(o.spec for o in outputs)
        host = pinned_footprint(src_arena, pin) + pinned_footprint(keep_arena, pin)
    else:
        check_arena = arena_bytes(check_specs.values())
        host = (pinned_footprint(src_arena, pin) + pinned_footprint(window * _aligned(largest), pin)
                + (pinned_footprint(check_arena, pin) if checks else 0))
    ref_bytes = sum(s.nbytes for s in check_specs.values())
    host_estimate = host + ref_bytes
    n_in = sum(math.prod(s.shape) for s in held_specs.values())
    n_out = sum(math.prod(o.spec.shape) for o in outputs)
    print(f"Llama {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}, "
          f"heads {args.heads}/{args.kv_heads}: {n_in / 1e9:.3f}B parameters ({src_bytes / 1e9:.2f} GB bf16) -> "
          f"x{scale} width: {n_out / 1e9:.3f}B ({out_bytes / 1e9:.2f} GB), {len(outputs)} tensors; noise "
          f"{noise} {noise_std:g}, seed {seed}")
    print(f"host memory estimate: {host_estimate / 1e9:.1f} GB ({'pinned, ' if pin else ''}"
          f"{'all grown tensors kept' if args.keep_grown else f'{window} reusable output slots'}, "
          f"{len(checks)} sampled tensors + their CPU references)")
    if host_estimate > args.max_host_gb * 1e9:
        raise SystemExit(f"host memory estimate {host_estimate / 1e9:.1f} GB > --max-host-gb {args.max_host_gb}")

    # sources: random bf16, tensor by tensor, into one (pinned) buffer
    t = time.perf_counter()
    src_buf = host_buffer(src_arena, pin)
    sources = carve(src_buf, held_specs)
    pin_s = time.perf_counter() - t
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t = time.perf_counter()
    for name, view in sources.items():
        w = torch.empty(view.shape, dtype=view.dtype, device=device)
        if w.dim() == 1:
            w.normal_(1.0, 0.1, generator=gen)  # a norm gain
        else:
            w.normal_(0.0, 0.02, generator=gen)
        view.copy_(w)
        del w
    if on_gpu:
        torch.cuda.synchronize(device)
    gen_s = time.perf_counter() - t

    # destinations
    t = time.perf_counter()
    dest: dict[int, torch.Tensor] = {}
    slots: list[torch.Tensor] = []
    if args.keep_grown:
        keep_buf = host_buffer(arena_bytes(o.spec for o in outputs), pin)
        views = carve(keep_buf, {i: o.spec for i, o in enumerate(outputs)})
        dest = dict(views)
    else:
        ring = host_buffer(window * _aligned(largest), pin)
        slots = [ring[k * _aligned(largest):(k + 1) * _aligned(largest)] for k in range(window)]
        if checks:
            check_buf = host_buffer(arena_bytes(check_specs.values()), pin)
            dest = dict(carve(check_buf, check_specs))
    dest_s = time.perf_counter() - t

    # the CPU references of the sampled tensors: growkit's CPU kernels (C library / numpy)
    t = time.perf_counter()
    s = Setup(device, cfg, adapter, index, plan, outputs, needs, sources, dest, slots, window, Clock(device))
    refs = {}
    with growkit_backend("torch"):
        for i in checks:
            o = outputs[i]  # grown from the CPU sources themselves
            refs[i] = grow_one(s, o, {h: sources[h] for h in needs[o.name]}).contiguous()
    ref_s = time.perf_counter() - t
    setup_s = time.perf_counter() - t_setup
    print(f"setup {setup_s:.1f} s: host buffers {pin_s + dest_s:.1f} s, random sources {gen_s:.1f} s, "
          f"CPU references of {len(checks)} tensors {ref_s:.1f} s")

    dev_copy_gbps = None
    if on_gpu:
        a = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB
        b = torch.empty_like(a)
        dev_copy_gbps = 2 * a.numel() / time_fn(lambda: b.copy_(a), device, repeat=10) / 1e9
        del a, b

    failures: list[str] = []

    def verify(what: str) -> bool:
        bad = [outputs[i].name for i in checks if not bitwise_equal(dest[i], refs[i])]
        for name in bad:
            failures.append(f"{what}: {name}")
        return not bad

    def growkit_pass(run, what: str) -> dict:
        for i in checks:
            poison(dest[i])
        r = run(s, True)
        r["check"] = verify(what)
        return r

    modes = [("serial", run_serial)] + ([] if (args.no_overlap or not on_gpu) else [("overlap", run_overlap)])
    t = time.perf_counter()
    for _ in range(args.warmup):
        for mode, run in modes:
            growkit_pass(run, f"warm-up {mode}")
            run(s, False)
    warm_s = time.perf_counter() - t
    print(f"warm-up {warm_s:.1f} s" + (f"; checks: {len(failures)} failed" if checks else ""))

    samples = {(m, k): [] for m, _ in modes for k in ("growkit", "copy")}
    for r in range(args.repeat):
        for mode, run in modes:
            g = growkit_pass(run, f"{mode} pass {r}")
            c = run(s, False)
            samples[(mode, "growkit")].append(g)
            samples[(mode, "copy")].append(c)
            print(f"  {mode:8s} pass {r}: growkit {g['wall_s']:.3f} s, copy {c['wall_s']:.3f} s "
                  f"(x{g['wall_s'] / c['wall_s']:.3f})" + ("" if g["check"] else "  CHECK FAILED"), flush=True)

    moved = h2d_bytes + out_bytes
    rows = []
    for mode, _ in modes:
        copy_med = statistics.median(x["wall_s"] for x in samples[(mode, "copy")])
        paired = [g["wall_s"] / c["wall_s"] for g, c in zip(samples[(mode, "growkit")], samples[(mode, "copy")])]
        for kind in ("growkit", "copy"):
            xs = samples[(mode, kind)]
            wall = statistics.median(x["wall_s"] for x in xs)
            row = dict(path=f"{kind} {mode}", seconds=wall, best_s=min(x["wall_s"] for x in xs),
                       GBps=moved / wall / 1e9, ratio_to_copy=statistics.median(paired) if kind == "growkit" else 1.0,
                       vs_copy_median=wall / copy_med, h2d_GB=h2d_bytes / 1e9, d2h_GB=out_bytes / 1e9)
            if mode == "serial":
                for k in ("h2d_s", "grow_s", "d2h_s"):
                    row[k] = statistics.median(x[k] for x in xs)
                row["h2d_GBps"] = h2d_bytes / row["h2d_s"] / 1e9
                row["d2h_GBps"] = out_bytes / row["d2h_s"] / 1e9
            if kind == "growkit":
                row["checks_passed"] = all(x["check"] for x in xs)
            row["samples_s"] = ";".join(f"{x['wall_s']:.4f}" for x in xs)
            rows.append(row)
    g_serial = next(r for r in rows if r["path"] == "growkit serial")
    kernel_s = g_serial["grow_s"]
    rows.append(dict(path="growth kernels alone (serial pass, events)", seconds=kernel_s,
                     GBps=(h2d_bytes + out_bytes) / kernel_s / 1e9,
                     pct_device_copy_bw=(100 * (h2d_bytes + out_bytes) / kernel_s / 1e9 / dev_copy_gbps)
                     if dev_copy_gbps else None,
                     note="bytes read + written by the growth over its time; GBps of the other rows: H2D + D2H bytes"))

    print()
    print_table(rows, ["path", "seconds", "best_s", "GBps", "ratio_to_copy", "h2d_s", "grow_s", "d2h_s",
                       "h2d_GBps", "d2h_GBps", "checks_passed"])
    for mode, _ in modes:
        g = next(r for r in rows if r["path"] == f"growkit {mode}")
        print(f"growkit / copy ({mode}): x{g['ratio_to_copy']:.3f}  ({g['seconds']:.3f} s against "
              f"{next(r for r in rows if r['path'] == f'copy {mode}')['seconds']:.3f} s)")
    if dev_copy_gbps:
        print(f"device-to-device copy: {dev_copy_gbps:.0f} GB/s; growth kernels alone {kernel_s:.3f} s")

    rss = peak_rss_bytes()
    print(f"peak RSS {rss / 1e9:.1f} GB" if rss else "peak RSS: unknown", end="")
    print(f"; peak GPU memory allocated {torch.cuda.max_memory_allocated(device) / 1e9:.1f} GB" if on_gpu else "")
    n_checks = len(checks) * (args.warmup + args.repeat) * len(modes)
    print(f"bitwise checks against the CPU growth: {n_checks - len(failures)}/{n_checks} passed"
          + ("" if use_triton(device) else " (the measured path is the CPU kernels too: a dry run of the script)"))
    for f in failures[:20]:
        print(f"FAIL {f}")

    default_shape = all(getattr(args, k) == v for k, v in LLAMA3_8B.items()) and scale == 2
    name = "grow_e2e" if default_shape else (
        f"grow_e2e_L{args.layers}_d{args.hidden}_f{args.intermediate}_v{args.vocab}_x{scale}")
    meta = dict(
        device=label, device_type=device.type, torch=torch.__version__,
        triton=__import__("triton").__version__ if HAS_TRITON else None, kernel_path=kernel_path,
        command="python bench/grow_e2e.py " + " ".join(sys.argv[1:] if argv is None else argv),
        model=dict(family="llama", layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                   vocab=args.vocab, heads=args.heads, kv_heads=args.kv_heads, tie_word_embeddings=False,
                   dtype="bfloat16", params_in=n_in, params_out=n_out),
        growth=dict(scale=scale, noise=noise, noise_std=noise_std, seed=seed, tensors=len(outputs),
                    source="growkit plan_width of the llama adapter (growkit grow --width 2 defaults)"),
        bytes=dict(source=src_bytes, grown=out_bytes, h2d=h2d_bytes, d2h=out_bytes),
        host=dict(pinned=pin, keep_grown=args.keep_grown, window=window, estimate_bytes=host_estimate,
                  peak_rss_bytes=rss),
        peak_gpu_allocated_bytes=torch.cuda.max_memory_allocated(device) if on_gpu else None,
        device_copy_GBps=dev_copy_gbps,
        setup_s=dict(total=setup_s, host_buffers=pin_s + dest_s, random_sources=gen_s, cpu_references=ref_s,
                     warmup=warm_s),
        repeat=args.repeat, warmup=args.warmup,
        checks=dict(tensors=[outputs[i].name for i in checks], compared=n_checks, failed=len(failures),
                    reference="growkit CPU kernels (GROWKIT_BACKEND=torch), bitwise"),
        note=None if on_gpu else "CPU dry run: H2D/D2H are memcpys; timings are not GPU figures",
    )
    if args.results_dir:
        common.RESULTS_DIR = Path(args.results_dir)
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = write_results(name, device, meta, rows)
    print(f"wrote {json_path} and {csv_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
