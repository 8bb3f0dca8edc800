"""GrowthMonitor's cost per tick against one training step, on one process or on FSDP2 ranks.

    python examples/monitor_overhead.py                                  # one process
    torchrun --nproc_per_node 2 examples/monitor_overhead.py             # FSDP2, gloo, CPU
    torchrun --nproc_per_node 2 examples/monitor_overhead.py --ddp       # DDP, gloo, CPU

A widened growkit reference model (``--d-model`` grown ``--scale`` x) is trained with AdamW;
the script prints the median time of a training step (forward, backward, optimizer step),
of a monitoring tick (``GrowthMonitor.measure``: the twin reductions, the exchange of
twin rows between FSDP2 ranks and the all-reduces), and, under FSDP2, of the two ways of
giving each rank the rows it compares: the monitor's ``all_to_all`` of its twin row sets
against ``full_tensor()`` of every tracked parameter, with the bytes each receives.

Measured on the 2-core CPU machine shared with other jobs (load 3-4; torch 2.13, gloo;
medians of 20, three runs; the defaults: d_model 64 grown to 128, 4 layers, vocab 512,
722,048 parameters, batch 8x128):

    one process:     step 118-145 ms, tick 3.5-5.0 ms   (2.4-3.8 % of a step)
    FSDP2, 2 ranks:  step 185-348 ms, tick 8.6-13 ms    (3.8-4.6 % of a step)
                     exchange of the twin rows 2-7 ms (1.25 MiB of rows reduced per rank);
                     full_tensor() of the same tensors 29-62 ms (2.5 MiB on every rank)
    DDP, 2 ranks:    step 126-224 ms, tick 5.6-12.5 ms  (4.5-5.6 % of a step)

At ``every=100`` a tick costs at most 0.06 % of the training time. On the tests' model
(``--d-model 32 --layers 3 --vocab 97 --batch 2 --seq 13``), FSDP2: step 59-85 ms, tick
9-13 ms (12-16 %: at that size a tick is the latency of its three collectives).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import tyro

from growkit.growth import grow_width
from growkit.models import ModelConfig, Transformer
from growkit.verify import GrowthMonitor


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@dataclass
class Args:
    d_model: int = 64
    layers: int = 4
    vocab: int = 512
    scale: int = 2
    batch: int = 8
    seq: int = 128
    repeats: int = 20
    ddp: bool = False
    """DistributedDataParallel instead of FSDP2"""


def main() -> None:
    args = tyro.cli(Args, description=__doc__.split("\n")[0], config=(tyro.conf.FlagCreatePairsOff,))

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=4,
                      n_kv_heads=2, d_ff=2 * args.d_model)
    small = Transformer(cfg)
    small.init_weights(seed=0)
    model = grow_width(small, args.scale, noise_std=1e-3).train()
    kind = "one process"
    if world > 1 and args.ddp:
        from torch.nn.parallel import DistributedDataParallel

        trained, kind = DistributedDataParallel(model), f"DDP, {world} ranks"
    elif world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        trained, kind = fully_shard(model, mesh=mesh), f"FSDP2, {world} ranks"
    else:
        trained = model
    monitor = GrowthMonitor(trained, every=1)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)

    def step():
        logits = trained(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):  # warm up
        step()
        monitor.measure()
    step_ms = median_ms(step, args.repeats)
    tick_ms = median_ms(monitor.measure, args.repeats)
    lines = [f"{kind}: {sum(p.numel() for p in model.parameters()):,} parameters, batch {args.batch}x{args.seq}",
             f"  training step {step_ms:.1f} ms, monitor tick {tick_ms:.2f} ms "
             f"({tick_ms / step_ms:.1%} of a step; {tick_ms / (100 * step_ms):.3%} of training at every=100)"]

    if world > 1 and not args.ddp:  # the twin rows' exchange against gathering whole tensors
        from torch.distributed.tensor import DTensor

        params = dict(model.named_parameters())
        reducer = monitor._reducer
        groups = monitor._groups
        pieces = [g["members"] for g in groups]
        received = sum(t.numel() * t.element_size() for ts in reducer.local_parts(pieces, params) for t in ts)
        exchange_ms = median_ms(lambda: reducer.local_parts(pieces, params), args.repeats)
        names = [m.param for g in groups for m in g["members"]]
        full = sum(params[n].numel() * params[n].element_size() for n in names)
        gather_ms = median_ms(lambda: [params[n].full_tensor() for n in names if isinstance(params[n], DTensor)],
                              args.repeats)
        lines.append(f"  twin rows this rank reduces: all_to_all {exchange_ms:.2f} ms, {received / 2**20:.2f} MiB held; "
                     f"full_tensor() of the same tensors {gather_ms:.2f} ms, {full / 2**20:.2f} MiB")
    if rank == 0:
        print("\n".join(lines), flush=True)
    monitor.close()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
