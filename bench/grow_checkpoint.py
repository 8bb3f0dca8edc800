"""`growkit grow` and `growkit verify --layerwise` on a checkpoint larger than they may hold.

Generates a Llama-shaped float32 checkpoint on disk (default 0.5B parameters, 2.05 GB, in
shards; written tensor by tensor, never whole in memory), then, each in its own process:

* ``growkit grow SRC DST --width 2``: peak RSS against the bound
  1.3 x (largest grown tensor + its source) + 300 MB, and wall time against ``cp`` of the
  grown files on the same disk, in the same run;
* ``growkit verify SRC DST --layerwise``: peak RSS against the same bound;
* a bare ``import`` of the same modules: the interpreter's own share of those figures
  (for ``verify`` also transformers' model code, which it builds the models from).

    python bench/grow_checkpoint.py                 # ~2 GB source, ~8 GB grown
    python bench/grow_checkpoint.py --layers 4      # smaller, for a quick look
    python bench/grow_checkpoint.py --layers 12 --dir /dev/shm/gk --name grow_checkpoint_tmpfs
                                                    # in RAM: the CPU's share, without the disk

Results: bench/results/grow_checkpoint_<device>.json.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import atomic_write_text, device_label, parse_cli, write_results  # noqa: E402

from growkit.growth.plan import TensorSpec  # noqa: E402
from growkit.growth.stream import ShardWriter  # noqa: E402

# NOTE: peak RSS is read from VmHWM in /proc/self/status: getrusage's ru_maxrss survives
# fork + exec on Linux, so a child would report this (checkpoint-making) parent's peak.
CHILD = """
import sys, time
t0 = time.perf_counter()
{code}
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("RESULT", int(hwm) * 1024, time.perf_counter() - t0, rc)
"""


def make_checkpoint(path: Path, hidden: int, inter: int, layers: int, vocab: int, heads: int, shard_bytes: int) -> dict:
    """A random Llama-shaped float32 checkpoint, written one tensor at a time."""
    from transformers import LlamaConfig

    path.mkdir(parents=True)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // 4, head_dim=hidden // heads,
                      tie_word_embeddings=False)
    cfg.save_pretrained(path)
    kv = heads // 4 * (hidden // heads)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    groups, current, size = [], {}, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 4
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = {}, 0
        current[name] = shape
        size += nbytes
    groups.append(current)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        w = ShardWriter(path / file, {n: TensorSpec(s, torch.float32) for n, s in group.items()})
        for name, shape in group.items():
            t = torch.randn(shape, generator=gen) * (0.02 if len(shape) == 2 else 1.0)
            if len(shape) == 1:
                t = 1.0 + 0.1 * t
            w.write(name, t)
            weight_map[name] = file
        w.close()
    total = sum(math.prod(s) * 4 for s in shapes.values())
    atomic_write_text(path / "model.safetensors.index.json",
                      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    params = sum(math.prod(s) for s in shapes.values())
    largest = max(shapes.items(), key=lambda kv: math.prod(kv[1]))
    return dict(params=params, bytes=total, largest=largest[0], largest_shape=list(largest[1]))


def child(code: str, env: dict[str, str] | None = None) -> tuple[int, float, int]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(code=code)], capture_output=True, text=True,
                         env=None if env is None else {**os.environ, **env})
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
    if not line:
        raise RuntimeError(f"child failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    _, rss, seconds, rc = line[0].split()
    return int(rss), float(seconds), int(rc)


@dataclass
class Args:
    hidden: int = 1024
    intermediate: int = 4096
    layers: int = 29
    vocab: int = 32000
    heads: int = 16
    dir: str | None = None
    """work directory (default: a temporary one, removed)"""
    name: str = "grow_checkpoint"
    """results file stem, e.g. grow_checkpoint_tmpfs for a run with --dir on a tmpfs"""
    repeats: int = 3
    """rounds of (grow, grow with the numpy noise path, cp), interleaved; medians reported"""


def main() -> None:
    args = parse_cli(Args, description=__doc__.splitlines()[0])
    work = Path(args.dir or tempfile.mkdtemp(prefix="growkit-bench-"))
    src, dst, copy = work / "src", work / "dst", work / "copy"
    for p in (src, dst, copy):
        shutil.rmtree(p, ignore_errors=True)
    try:
        t = time.perf_counter()
        info = make_checkpoint(src, args.hidden, args.intermediate, args.layers, args.vocab, args.heads, 500 * 2**20)
        gen_s = time.perf_counter() - t
        # the largest grown tensor at x2: a [V, d] embedding/head grows to [V, 2d]; a [f, d] MLP weight to [2f, 2d]
        grown_largest = max(args.vocab * args.hidden * 2, args.intermediate * args.hidden * 4) * 4
        source_of_it = grown_largest // (2 if grown_largest == args.vocab * args.hidden * 8 else 4)
        bound = 1.3 * (grown_largest + source_of_it) + 300 * 2**20
        base_rss, _, _ = child("import growkit.checkpoint_cli, growkit.growth.stream, transformers\nrc = 0")
        verify_base_rss, _, _ = child("import torch, growkit.checkpoint_cli, growkit.verify.layerwise\n"
                                      "from transformers import AutoConfig, AutoModelForCausalLM\n"
                                      "with torch.device('meta'):\n"
                                      f"    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained({str(src)!r}))\n"
                                      "rc = 0")
        grow_code = f"from growkit.cli import main\nrc = main(['grow', {str(src)!r}, {str(dst)!r}, '--width', '2', '--no-progress'])"
        # NOTE: cp + sync of the same bytes on this VM's disk varied from 8.5 s to 20.9 s between
        # two runs an hour apart, so one grow against one cp says little: the rounds interleave
        # the three commands and the ratio is of medians. The numpy row is the same grow with
        # the C library off (GROWKIT_CPU_EXT=0): what the library buys, measured side by side.
        samples = {"grow": [], "grow_numpy": [], "cp": []}
        grow_rss = 0
        for _ in range(max(1, args.repeats)):
            for key, env in (("grow", None), ("grow_numpy", {"GROWKIT_CPU_EXT": "0"})):
                shutil.rmtree(dst, ignore_errors=True)
                rss, seconds, rc = child(grow_code, env)
                assert rc == 0, "growkit grow failed"
                samples[key].append(round(seconds, 2))
                if key == "grow":
                    grow_rss = max(grow_rss, rss)
            t = time.perf_counter()
            copy.mkdir()
            subprocess.run(["bash", "-c", f"cp {dst}/*.safetensors {copy}/ && sync"], check=True)
            samples["cp"].append(round(time.perf_counter() - t, 2))
            shutil.rmtree(copy)
        grown_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
        grow_s, numpy_s, cp_s = (statistics.median(samples[k]) for k in ("grow", "grow_numpy", "cp"))
        verify_rss, verify_s, vrc = child(
            f"from growkit.cli import main\nrc = main(['verify', {str(src)!r}, {str(dst)!r}, '--layerwise', '--seq-len', '32'])")
        results = {
            "device": device_label(torch.device("cpu")),
            "work_dir_filesystem": subprocess.run(["df", "--output=fstype", str(work)], capture_output=True,
                                                  text=True).stdout.split()[-1:],
            "source": dict(info, generate_seconds=round(gen_s, 1)),
            "grown_bytes": grown_bytes,
            "largest_grown_tensor_bytes": grown_largest,
            "its_source_bytes": source_of_it,
            "rss_bound_bytes": int(bound),
            "import_only_rss_bytes": base_rss,
            "verify_import_only_rss_bytes": verify_base_rss,
            "grow": dict(peak_rss_bytes=grow_rss, seconds=round(grow_s, 2), within_bound=grow_rss <= bound),
            "grow_numpy_noise_seconds": round(numpy_s, 2),
            "cp_of_grown_files_seconds": round(cp_s, 2),
            "grow_over_cp": round(grow_s / cp_s, 3),
            "samples_seconds": samples,
            "verify_layerwise": dict(peak_rss_bytes=verify_rss, seconds=round(verify_s, 2), exit_status=vrc,
                                     within_bound=verify_rss <= bound),
        }
        print(json.dumps(results, indent=2))
        rows = [dict(command="growkit grow --width 2", peak_rss_mb=round(grow_rss / 2**20), bound_mb=round(bound / 2**20),
                     seconds=round(grow_s, 2), cp_seconds=round(cp_s, 2), ratio_to_cp=round(grow_s / cp_s, 3)),
                dict(command="growkit grow --width 2 (numpy noise, GROWKIT_CPU_EXT=0)", seconds=round(numpy_s, 2),
                     cp_seconds=round(cp_s, 2), ratio_to_cp=round(numpy_s / cp_s, 3)),
                dict(command="growkit verify --layerwise", peak_rss_mb=round(verify_rss / 2**20), bound_mb=round(bound / 2**20),
                     seconds=round(verify_s, 2)),
                dict(command="import only", peak_rss_mb=round(base_rss / 2**20)),
                dict(command="import only (verify: + model code)", peak_rss_mb=round(verify_base_rss / 2**20))]
        print(write_results(args.name, torch.device("cpu"), results, rows)[0])
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
