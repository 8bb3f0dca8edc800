"""The pipeline under ``torchrun``: data-parallel phases (FSDP2 or DDP), growth, sharded checkpoints.

    torchrun --nproc-per-node 8 train_tinystories.py --preset gpu                 # 8 GPUs (NCCL)
    torchrun --nproc-per-node 2 train_tinystories.py --preset tiny --threads 1    # CPU (gloo)

With ``WORLD_SIZE`` set (torchrun sets it, with RANK, LOCAL_RANK, MASTER_ADDR/PORT) the
pipeline (:func:`growkit.train.pipeline.run`) builds a :class:`DistContext` and trains with
:class:`DistributedTrainer`; without it, :class:`SingleProcess` stands in and nothing here
runs. What the ranks do:

- **Data**: every rank draws the same global batch ``[batch_size, seq_len]`` from the
  batch generator (seeded by ``seed``, so the same on every rank) and trains on its rows,
  chunk ``rank`` of ``batch_size`` (``batch_size`` must be a multiple of the world size):
  the ranks see disjoint parts of each global batch, and the global batches are the ones
  a single process draws, whatever the world size. FSDP2 and DDP average the gradients,
  so a step's gradient is that of the mean loss over the global batch (the MoE balance
  loss is each rank's own, averaged). Validation splits each batch's rows the same way
  and all-reduces (sum of losses, token count).
- **Model**: ``parallel='fsdp'`` (default) shards each phase's model with FSDP2
  (``fully_shard`` on every block, then on the root: parameters, gradients and Adam
  moments are ``Shard(0)`` DTensors); ``'ddp'`` replicates it in
  ``DistributedDataParallel``.
- **Growth**: every rank gathers the whole model and Adam state
  (``get_model_state_dict`` / ``get_optimizer_state_dict`` with
  ``StateDictOptions(full_state_dict=True)``), grows it with the single-process code
  (``Trainer._grow``, ``transfer_adam_state``: same seed, same operators, so the grown
  weights equal a single-process growth of those weights bit for bit), runs the growth
  check on the whole probe (as one process would), and shards the grown model again
  (``fully_shard``, then ``set_optimizer_state_dict``).
- **Checks**: each rank's report, and a sha256 of its grown weights, are all-gathered; the
  verdict is computed from all of them on every rank, so every rank passes or fails
  together (a growth that produced different weights on two ranks fails too).
- **Files**: rank 0 alone prints, writes ``metrics.jsonl``, the reports, ``summary.json``
  and ``final/``. Checkpoints are sharded (:func:`save_sharded_checkpoint`).

NOTE (why the global batch is drawn whole on every rank, not one generator per rank):
drawing ``batch_size`` window offsets costs microseconds, and one shared generator makes
the data independent of the world size: a run resumed at another world size trains on
the same batches, and the checkpoint holds one generator state, not one per rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from growkit.models import ModelConfig, Transformer, save_model

from .checkpoint import (
    CHECKPOINTS_DIR,
    DCP_DIR,
    atomic_write_json,
    capture_rng,
    finish_checkpoint,
    is_sharded_checkpoint,
    prune_checkpoints,
    _save_tensors,
)
from .config import TrainConfig
from .trainer import Trainer, load_whole_checkpoint, make_optimizer

__all__ = ["launched", "DistContext", "SingleProcess", "context_from_env", "DistributedTrainer",
           "save_sharded_checkpoint", "load_sharded_whole", "NullMetrics"]

#: How long a rank waits for the others in a collective before it fails (a rank that
#: died leaves the others blocked: they stop after this instead of hanging).
TIMEOUT_S = 1800


def launched() -> bool:
    """True when started by torchrun (or another launcher that sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ


def _chunk(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of chunk ``rank`` of ``range(n)`` (``torch.chunk`` semantics)."""
    from growkit.verify.distributed import chunk_range

    return chunk_range(n, world, rank)


# ---------------------------------------------------------------------------
# The process context
# ---------------------------------------------------------------------------

class SingleProcess:
    """One process (``WORLD_SIZE`` unset): every collective is a no-op."""

    rank, world, is_main, distributed = 0, 1, True, False

    def barrier(self) -> None:
        pass

    def broadcast_json(self, obj: Any) -> Any:
        return obj

    def all_gather_json(self, obj: Any) -> list[Any]:
        return [obj]

    def rank0_first(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def rank0_only(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def check_config(self, cfg: TrainConfig) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class DistContext:
    """This rank in the default process group.

    Attributes:
        rank, world, local_rank: from the launcher's environment.
        device: this rank's device (``cuda:<local_rank>`` or ``cpu``).
        owns_group: the group was created here (and is destroyed by :meth:`close`).
    """

    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool
    distributed = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, cfg: TrainConfig) -> "DistContext":
        """Joins (or creates) the default group: gloo on the CPU, gloo and NCCL with CUDA
        (small control messages travel through gloo, the model's collectives through NCCL)."""
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = cfg.resolved_device() == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank)
        owns = False
        if not dist.is_initialized():
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                                    timeout=timedelta(seconds=TIMEOUT_S))
            owns = True
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """The sums over the ranks of ``values`` (float64, through gloo on the CPU)."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast_json(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (JSON-able) on every rank (the others pass anything)."""
        import torch.distributed as dist

        data = json.dumps(obj).encode("utf-8") if self.is_main else b""
        n = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(n, src=0)
        buf = torch.zeros(int(n), dtype=torch.uint8)
        if self.is_main:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, src=0)
        return json.loads(bytes(buf.tolist()).decode("utf-8"))

    def all_gather_json(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (JSON-able), in rank order, on every rank (no pickle)."""
        import torch.distributed as dist

        data = json.dumps(obj).encode("utf-8")
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64))
        longest = max(int(s) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
        bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(bufs, mine)
        return [json.loads(bytes(b[:int(s)].tolist()).decode("utf-8")) for b, s in zip(bufs, sizes)]

    def _on_rank0(self, fn: Callable[[], Any], share: bool) -> Any:
        """``fn()`` on rank 0 alone; its result (if ``share``: JSON-able) on every rank. A
        failure there is raised on every rank (``ValueError`` with rank 0's message on the
        others), so no rank goes on alone."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, after telling the others
                error = e
        got = self.broadcast_json({"result": result if share else None} if error is None else
                                  {"error": " ".join(str(error).split()) or type(error).__name__})
        if error is not None:
            raise error
        if "error" in got:
            raise ValueError(got["error"])
        return result if self.is_main else got["result"]

    def rank0_first(self, fn: Callable[[], Any]) -> Any:
        """Runs ``fn`` on rank 0, then (if it succeeded there) on the other ranks: what it
        writes (token caches, ...) is written once."""
        result = self._on_rank0(fn, share=False)
        return result if self.is_main else fn()

    def rank0_only(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` (JSON-able) run on rank 0 alone, its result on every rank."""
        return self._on_rank0(fn, share=True)

    def check_config(self, cfg: TrainConfig) -> None:
        """What this world size needs of the config (ValueError naming the field)."""
        W = self.world
        if cfg.batch_size % W:
            raise ValueError(
                f"TrainConfig.batch_size={cfg.batch_size} must be a multiple of the world size "
                f"{W} (each rank trains on batch_size / {W} rows of every global batch); e.g. "
                f"--batch-size {W * max(1, -(-cfg.batch_size // W))}")

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def context_from_env(cfg: TrainConfig) -> SingleProcess | DistContext:
    """:class:`DistContext` under torchrun (``WORLD_SIZE`` set), else :class:`SingleProcess`."""
    return DistContext.from_env(cfg) if launched() else SingleProcess()


class NullMetrics:
    """The metrics log of the ranks other than 0: records nothing, writes nothing."""

    def log(self, kind: str, **values: Any) -> None:
        return None

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __len__(self) -> int:
        return 0


# ---------------------------------------------------------------------------
# Whole <-> sharded
# ---------------------------------------------------------------------------

def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _state_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the parameters that have Adam state (AdamW creates it at a parameter's
    first step with a gradient: an expert no token reached has none yet)."""
    return [n for n, p in model.named_parameters() if optimizer.state.get(p)]


def _drop_state_except(model: torch.nn.Module, optimizer: torch.optim.Optimizer, names) -> None:
    """Removes the Adam state of every parameter not in ``names``.

    ``set_optimizer_state_dict`` first gives every parameter a state (a step at lr 0:
    step 1, zero moments); a parameter without state must start fresh at its first step,
    as in one process, not at step 2 (another bias correction).
    """
    keep = set(names)
    for n, p in model.named_parameters():
        if n not in keep:
            optimizer.state.pop(p, None)


def _groups_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups]


def whole_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """(weights, Adam state) of a sharded or replicated model, whole on every rank: dicts
    name -> tensor and name -> {step, exp_avg, exp_avg_sq} (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=_full_options())
    names = _state_names(model, optimizer)
    osd = get_optimizer_state_dict(model, optimizer, options=_full_options())
    state = {n: osd["state"][n] for n in names}
    return weights, state


def shard_(model: Transformer, mode: str, device: torch.device):
    """Shards ``model`` (whole, the same on every rank) in place with FSDP2, or wraps it in
    DDP. Returns (model, DDP wrapper or None): the model stays the ``Transformer`` (its
    ``config``, ``loss``); under DDP the wrapper is what the training step calls."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # an expert that no token of a rank's rows reaches gets no gradient there
        unused = model.config.n_experts > 0
        ids = [device.index] if device.type == "cuda" else None
        return model, DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import torch.distributed as dist

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, None


def _copy_records(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    for attr in ("growth_records", "growth_history"):
        if hasattr(src, attr):
            setattr(dst, attr, list(getattr(src, attr)))


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a whole model's parameter and buffer bytes, in ``state_dict`` order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint)
# ---------------------------------------------------------------------------

# What a DCP ``.metadata`` pickle may name: DCP's own metadata records and the few torch
# and pathlib values inside them (the set measured on what dcp.save writes here).
_DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by name, as torch.load(weights_only=True) admits
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file admitting only :data:`_DCP_METADATA_GLOBALS` and
    torch dtypes: anything else (a function to call, a class to build) is refused before
    it is looked up, so no code from the file runs."""

    def find_class(self, module: str, name: str):
        if name in _DCP_METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")


def _dcp_reader(path: Path):
    """A ``FileSystemReader`` of the DCP folder ``path`` whose metadata is read by
    :class:`_MetadataUnpickler`.

    NOTE: DCP writes its metadata as a pickle and reads it with ``pickle.load``, which runs
    whatever the file names; a run directory handed to ``--resume`` is user input. Its
    manifest's sha256 covers the file, but the manifest sits beside it. Restricting the
    globals, as the pickle documentation recommends, makes reading it data only.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            file = Path(self.path) / ".metadata"
            try:
                with open(file, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
                raise ValueError(f"{file} is not DCP metadata: {e}") from None
            if not isinstance(metadata, Metadata):
                raise ValueError(f"{file} holds a {type(metadata).__name__}, not DCP metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _dcp_load(tensors: dict[str, Any], path: Path, **kwargs: Any) -> None:
    """``dcp.load`` of the DCP folder ``path`` into ``tensors``, through :func:`_dcp_reader`.

    DCP reports a failure as a ``CheckpointException``, which derives from BaseException,
    not Exception (torch 2.13), so the resume's error handling would not see it: it is
    raised again as a ValueError: the metadata reader's own message, else DCP's last line
    (the failing rank's error)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(tensors, storage_reader=_dcp_reader(path), **kwargs)
    except CheckpointException as e:
        text = str(e)
        ours = re.search(r"\S+ (?:is not DCP metadata: [^;\n]+|holds a \w+, not DCP metadata)", text)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        raise ValueError(ours.group(0) if ours else f"{path}: {lines[-1] if lines else type(e).__name__}") from None


def _dcp_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, names) -> dict[str, Any]:
    """What DCP saves or loads in place: tensors only (no pickled objects in the shards)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer)
    return {"model": get_model_state_dict(model),
            "optim": {n: osd["state"][n] for n in names}}, osd


def save_sharded_checkpoint(ctx: DistContext, run_dir: Path, name: str, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, batch_generator: torch.Generator,
                            state: dict[str, Any]) -> Path:
    """Writes ``<run_dir>/checkpoints/<name>`` from every rank (a collective), atomically.

    Rank 0 makes an empty ``.<name>.sharded.tmp`` (``clean_orphans`` removes one an
    interrupted save left); every rank writes its shards into its ``dcp/`` (``dcp.save``);
    after a barrier rank 0 adds ``config.json``, ``optimizer.json`` (param groups by name,
    the names that have Adam state), the RNG states (rank 0's: every rank's generators
    are in the same state, see the module NOTE), ``state.json`` and the manifest, renames
    the folder into place and points ``latest.json`` at it; a second barrier ends the save.
    """
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / CHECKPOINTS_DIR
    tmp = root / f".{name}.sharded.tmp"
    ok = True
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    ctx.barrier()
    names = _state_names(model, optimizer)
    tensors, _ = _dcp_tensors(model, optimizer, names)
    dcp.save(tensors, checkpoint_id=str(tmp / DCP_DIR))
    ctx.barrier()
    path = root / name
    if ctx.is_main:
        try:
            atomic_write_json(tmp / "config.json", model.config.to_dict())
            atomic_write_json(tmp / "optimizer.json", {
                "type": type(optimizer).__name__, "param_groups": _groups_by_name(model, optimizer),
                "with_state": names, "world_size": ctx.world})
            rng_tensors, rng_values = capture_rng(batch_generator)
            _save_tensors(tmp / "rng.safetensors", rng_tensors)
            atomic_write_json(tmp / "rng.json", rng_values)
            path = finish_checkpoint(run_dir, tmp, name, state)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            ok = False
            raise
        finally:
            ctx.broadcast_json(ok)
    elif not ctx.broadcast_json(None):
        raise RuntimeError(f"rank 0 failed to write checkpoint {name}; see its error")
    return path


def _read_model_config(ckpt: Path) -> ModelConfig:
    return ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text(encoding="utf-8")))


def _check_optimizer_meta(ckpt: Path, model, optimizer) -> list[str]:
    meta = json.loads((ckpt / "optimizer.json").read_text(encoding="utf-8"))
    if meta.get("type") != type(optimizer).__name__:
        raise ValueError(f"optimizer is {meta.get('type')}, expected {type(optimizer).__name__}")
    stored = [g["params"] for g in meta["param_groups"]]
    live = [g["params"] for g in _groups_by_name(model, optimizer)]
    if stored != live:
        raise ValueError("stored parameter groups do not match the model")
    return list(meta["with_state"])


def load_sharded_whole(ckpt: Path, device: torch.device, cfg: TrainConfig):
    """(model, Adam state by name) of a sharded checkpoint, whole, in one process (a run
    resumed without torchrun: DCP reads every shard's part, whatever world size wrote it)."""

    model = Transformer(_read_model_config(ckpt)).to(device)
    optimizer = make_optimizer(model, cfg, cfg.phase1.lr)
    names = _check_optimizer_meta(ckpt, model, optimizer)
    with torch.no_grad():
        for p in model.parameters():  # the template's values are overwritten: only its shape counts
            p.zero_()
    tensors = {"model": model.state_dict(),
               "optim": {n: {"step": torch.zeros((), dtype=torch.float32),
                             "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                         for n, p in model.named_parameters() if n in set(names)}}
    import warnings

    import torch.distributed as dist

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process", category=UserWarning)
        _dcp_load(tensors, ckpt / DCP_DIR, no_dist=not dist.is_initialized())
    return model, tensors["optim"]


# ---------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------

def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: an FSDP2 shard's local tensor (it shares the storage), or
    ``t`` itself when it is replicated."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _local_part(p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """The part of ``whole`` (shaped like the parameter ``p``) that this rank holds of ``p``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):  # the same slicing as p's own: no communication
        return distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local()
    return whole


class ShardedFreeze:
    """``--train-after-growth new`` under torchrun: train only what the last growth added,
    on FSDP2 shards or DDP replicas, as :func:`growkit.growth.freeze_for_growth` does it in
    one process.

    NOTE: freeze_for_growth masks gradients with tensor hooks and makes wholly frozen
    parameters ``requires_grad=False``. FSDP2 sets its sharded parameters' ``.grad`` after
    the reduce-scatter, so hooks on them never run, and DDP made before the freeze would
    wait for a gradient the frozen parameter never gets. So this acts on the reduced
    gradients, each rank on its own part: after the backward pass a wholly frozen
    parameter's gradient is dropped (AdamW then skips it and its carried moments stay, as
    for a parameter without gradient in one process) and the frozen entries of a partly
    trainable one are zeroed (before clipping, so the norm is one process's); after each
    optimizer step those entries are put back (AdamW's decay and carried momentum moved
    them). tests/test_distributed_pipeline.py checks that every old entry ends bit-identical
    and that the losses match one process's.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        from growkit import growth

        masks = growth.trainable_mask(model, "new", records=model.growth_records)
        params = dict(model.named_parameters())
        self.which = "new"
        self.frozen: list[str] = []
        self.partial: list[str] = []
        self.n_trainable = self.n_total = 0
        self._frozen: list[torch.nn.Parameter] = []
        self._partial: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for name, trainable in masks.items():
                p = params[name]
                self.n_total += p.numel()
                if trainable is True:
                    self.n_trainable += p.numel()
                elif trainable is False:
                    self.frozen.append(name)
                    self._frozen.append(p)
                else:
                    self.n_trainable += int(trainable.sum())
                    frozen = ~_local_part(p, trainable)
                    self.partial.append(name)
                    self._partial.append((p, frozen, _local(p)[frozen].clone()))

    def after_backward(self) -> None:
        with torch.no_grad():
            for p in self._frozen:
                p.grad = None
            for p, frozen, _ in self._partial:
                if p.grad is not None:
                    _local(p.grad).masked_fill_(frozen, 0)

    def after_step(self) -> None:
        with torch.no_grad():
            for p, frozen, saved in self._partial:
                _local(p)[frozen] = saved

    def summary(self) -> str:
        from growkit.growth.masks import describe_freeze

        return describe_freeze(self)

    def remove(self) -> None:
        self._frozen, self._partial = [], []


class DistributedTrainer(Trainer):
    """:class:`~growkit.train.trainer.Trainer` on every rank of a torchrun job (see the
    module docstring). ``self.model`` is the ``Transformer`` (FSDP2-sharded, or the module
    DDP wraps); ``self.wrapper`` the DDP wrapper or None."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, dataset, tokenizer, data_description: str,
                 resume: bool, resume_from=None, *, ctx: DistContext) -> None:
        super().__init__(cfg, run_dir, dataset, tokenizer, data_description, resume, resume_from)
        self.ctx = ctx
        self.is_main = ctx.is_main
        self.device = ctx.device
        self.last_check_ranks: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ building, loading
    def _install(self, model, optimizer_state, lr):
        """Shards (or replicates) the whole ``model`` and loads ``optimizer_state`` (whole
        tensors by name) into the new AdamW: ``set_optimizer_state_dict`` keeps each rank's
        shard of every moment."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        model, self.wrapper = shard_(model, self.cfg.parallel, self.device)
        optimizer = make_optimizer(model, self.cfg, lr)
        if optimizer_state:
            osd = {"state": {n: dict(st) for n, st in optimizer_state.items()},
                   "param_groups": _groups_by_name(model, optimizer)}
            set_optimizer_state_dict(model, optimizer, osd, options=_full_options())
            _drop_state_except(model, optimizer, optimizer_state)
        return model, optimizer

    def _load_checkpoint(self, ckpt, state):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        lr = self.cfg.phase(state["phase"]).lr
        if not is_sharded_checkpoint(ckpt):
            # a single-process checkpoint: every rank reads it whole, then shards it
            model, plain = load_whole_checkpoint(ckpt, self.device, self.cfg, lr)
            named = {n: dict(plain.state[p]) for n, p in model.named_parameters() if plain.state.get(p)}
            return self._install(model, named, lr)
        model = Transformer(_read_model_config(ckpt)).to(self.device)
        model, optimizer = self._install(model, None, lr)
        names = _check_optimizer_meta(ckpt, model, optimizer)
        tensors, osd = _dcp_tensors(model, optimizer, names)  # initializes the Adam state
        _dcp_load(tensors, Path(ckpt) / DCP_DIR)  # reshards to this world size
        set_model_state_dict(model, tensors["model"])
        osd["state"] = tensors["optim"]
        set_optimizer_state_dict(model, optimizer, osd)
        _drop_state_except(model, optimizer, names)
        return model, optimizer

    def _open_metrics(self, keep):
        return super()._open_metrics(keep) if self.is_main else NullMetrics()

    def _monitor_args(self):
        import torch.distributed as dist

        return {"process_group": dist.group.WORLD}

    def _start_monitor(self, model, phase):
        # DDP: the monitor reads the wrapper (it unwraps it and hooks the module's routers)
        super()._start_monitor(self.wrapper if self.wrapper is not None else model, phase)

    # ------------------------------------------------------------------ data and steps
    def _freeze_new(self, model):
        return ShardedFreeze(model)

    def _after_backward(self):
        if self.freeze is not None:
            self.freeze.after_backward()

    def _after_optimizer_step(self):
        if self.freeze is not None:
            self.freeze.after_step()

    def _rows(self, n: int) -> tuple[int, int]:
        return _chunk(n, self.ctx.world, self.ctx.rank)

    def _next_batch(self, batch_size, seq_len):
        x, y = self.ds.get_batch("train", batch_size, seq_len, self.batch_gen)
        a, b = self._rows(batch_size)
        return x[a:b].to(self.device), y[a:b].to(self.device)

    def _logged(self, loss, ce, aux):
        vals = self.ctx.all_reduce_sum([float(loss), float(ce), 0.0 if aux is None else float(aux)])
        W = self.ctx.world
        return (torch.tensor(vals[0] / W), torch.tensor(vals[1] / W),
                None if aux is None else torch.tensor(vals[2] / W))

    def _val_share(self, x, y):
        """This rank's rows of a validation batch; a rank without rows of a (short, last)
        batch still runs the forward (FSDP2 gathers weights in it) on one row, weight 0."""
        a, b = self._rows(x.shape[0])
        return (x[a:b], y[a:b], 1) if b > a else (x[:1], y[:1], 0)

    def _val_mean(self, model, total, count):
        """The validation loss over every rank's rows (all-reduced: the same float on every rank)."""
        # NOTE: FSDP2 leaves the root's parameters (embedding, final norm, LM head) unsharded
        # after a forward, for the backward that follows in training; with no backward they
        # stay so, and the optimizer's (sharded) parameters are no longer the module's:
        # get_optimizer_state_dict then fails with KeyError (seen at a phase-end checkpoint
        # after the last evaluation). reshard() puts the sharded ones back.
        reshard = getattr(model, "reshard", None)
        if callable(reshard):
            reshard()
        total, count = self.ctx.all_reduce_sum([total, float(count)])
        return total / count

    # ------------------------------------------------------------------ growth
    def _whole_model(self):
        weights, state = whole_state(self.model, self.optimizer)
        whole = Transformer(self.model.config).to(self.device)
        whole.load_state_dict(weights)
        _copy_records(self.model, whole)
        state = {n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()} for n, st in state.items()}
        return Trainer._install(self, whole, state, self.optimizer.param_groups[0]["lr"])  # whole: not sharded

    def _reshard(self, model, optimizer):
        named = {n: dict(optimizer.state[p]) for n, p in model.named_parameters() if optimizer.state.get(p)}
        return self._install(model, named, optimizer.param_groups[0]["lr"])

    def _run_check(self, phase, old, new, probe):
        """The check on the whole probe, on every rank's whole copy of both models; the
        verdict from every rank's report and grown-weights digest (all-gathered), the same
        on every rank.

        NOTE: each rank checks the whole probe rather than its share of the rows: its
        figures and verdict are then a single process's (a router's load over 1/N of the
        tokens is noisier, and a collapse threshold would fail more often as N grows), and
        the duplicated work is small next to the growth, which every rank does whole too.
        What comes from the other ranks is their verdicts and digests: a rank whose grown
        weights or verdict differ fails every rank.
        """
        passed, report, full_text, short_text = super()._run_check(phase, old, new, probe)
        mine = {"rank": self.ctx.rank, "passed": passed, "probe_rows": [0, int(probe.shape[0])],
                "weights_sha256": weights_digest(new), "summary": short_text, "report": report}
        ranks = self.ctx.all_gather_json(mine)
        self.last_check_ranks = ranks
        digests = {r["weights_sha256"] for r in ranks}
        agree = len(digests) == 1
        failed = [r["rank"] for r in ranks if not r["passed"]]
        verdict = agree and not failed
        shown = ranks[failed[0]] if failed else ranks[0]  # the first failing rank's report
        combined = dict(shown["report"])
        combined["passed"] = verdict
        combined["ranks"] = [{k: r[k] for k in ("rank", "passed", "probe_rows", "weights_sha256", "summary")}
                             for r in ranks]
        combined["grown_weights_agree"] = agree
        lines = [full_text or short_text or ""]
        if failed:
            lines.append(f"  failed on rank(s) {failed} of {self.ctx.world} (report above: rank {failed[0]}'s)")
        if not agree:
            lines.append(f"  the grown weights differ between ranks ({len(digests)} distinct sha256): "
                         "the growth is not deterministic across processes")
        return verdict, combined, "\n".join(x for x in lines if x), short_text

    # ------------------------------------------------------------------ files
    def _save_checkpoint(self, name, state):
        state["world_size"], state["parallel"] = self.ctx.world, self.cfg.parallel
        path = save_sharded_checkpoint(self.ctx, self.run_dir, name, self.model, self.optimizer,
                                       self.batch_gen, state)
        if self.is_main:
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        self.ctx.barrier()
        return path

    def save_final(self) -> Path:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        weights = get_model_state_dict(self.model, options=_full_options(cpu_offload=True))
        out = self.run_dir / "final"
        if self.is_main:  # cpu_offload: rank 0 alone holds the whole weights
            whole = Transformer(self.model.config)
            whole.load_state_dict(weights)
            save_model(whole, out)
            self.tokenizer.save(out)
        self.ctx.barrier()
        return out
