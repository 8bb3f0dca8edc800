"""Grow a Hugging Face checkpoint on disk into another, one tensor at a time.

``grow_checkpoint(src, dst, steps)`` reads ``src`` lazily (``safetensors.safe_open``),
makes each output tensor through the same plans as the in-memory operators (``plan.py``),
and writes it straight into the output shard, so peak memory is about the largest grown
tensor plus what it is made from, whatever the checkpoint's size. The result is bitwise
the model the in-memory operators give for the same settings and seed.

NOTE: safetensors' Python API writes a file from a dict of tensors held in memory at once
(``save_file``), which would hold a whole shard; :class:`ShardWriter` writes the same
format (8-byte little-endian header size, JSON header with dtype/shape/data_offsets,
padded to 8 bytes, then the raw little-endian data) header first, tensor by tensor. The
tests read every written file back with ``safetensors.safe_open``.

Everything goes into a temporary directory beside ``dst`` that is renamed into place at
the end: an interrupted run never leaves a directory that loads as a model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from growkit.kernels.memory import empty_cpu

from .adapters import PART, get_family_adapter
from .plan import GrowthPlan, TensorSpec, chain
from growkit.files import read_json

from .saving import publish_directory, write_growth_files

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
# files of a checkpoint that travel unchanged (tokenizer, generation settings, templates)
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
          "generation_config.json", "merges.txt", "vocab.json", "vocab.txt", "tokenizer.model",
          "chat_template.json", "chat_template.jinja")
MAX_JSON_BYTES = 64 * 2**20


class SafetensorsFile:
    """One safetensors file read with plain reads, one tensor at a time.

    NOTE: ``safetensors.safe_open`` maps the file; every tensor read leaves its pages
    mapped and counted in the process's resident memory until the file is closed, so
    growing a 2 GB checkpoint measured a peak RSS that grew with the bytes read. Reading
    each tensor into its own buffer keeps only the live tensors resident. The header is
    parsed with its sizes checked against the file's real size.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        self.f = open(self.path, "rb")
        raw = self.f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{self.path} is not a safetensors file (shorter than its header size)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 * 2**20):
            raise ValueError(f"{self.path}: header size {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(self.f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.path}: unreadable safetensors header: {exc}") from None
        header.pop("__metadata__", None)
        self.start = 8 + n
        self.entries = {}
        for name, e in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[e["dtype"]]
                shape = tuple(int(x) for x in e["shape"])
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: malformed header entry for {name!r}") from None
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if begin < 0 or end - begin != nbytes or self.start + end > size or min(shape, default=1) < 0:
                raise ValueError(f"{self.path}: {name!r} does not fit the file (offsets {begin}..{end}, {size} bytes)")
            self.entries[name] = (dtype, shape, begin)

    def keys(self):
        return self.entries.keys()

    def spec(self, name: str) -> TensorSpec:
        dtype, shape, _ = self.entries[name]
        return TensorSpec(shape, dtype)

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin = self.entries[name]
        out = empty_cpu(shape, dtype)  # read into huge pages: fewer page faults (kernels/memory.py)
        self._read_into(out, self.start + begin, name)
        return out

    def _read_into(self, out: torch.Tensor, offset: int, name: str) -> None:
        """Fill ``out`` with the file's bytes from ``offset`` (positioned reads: no shared file
        position, so threads may read one file at once)."""
        if not out.numel():
            return
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done, fd = 0, self.f.fileno()
        while done < len(view):
            n = os.preadv(fd, [view[done:done + (1 << 30)]], offset + done)
            if n <= 0:
                raise ValueError(f"{self.path}: {name!r} is truncated")
            done += n

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` along dim 0 (consecutive bytes: one read)."""
        dtype, shape, begin = self.entries[name]
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"{self.path}: rows {start}:{stop} of {name!r} {list(shape)}")
        out = empty_cpu((stop - start, *shape[1:]), dtype)
        if out.numel():
            row_bytes = out.numel() * out.element_size() // (stop - start)
            self._read_into(out, self.start + begin + start * row_bytes, name)
        return out

    def close(self) -> None:
        self.f.close()


class CheckpointReader:
    """A Hugging Face checkpoint directory read lazily: config, tensor specs, tensors on demand.

    Sizes come from the safetensors headers, so nothing larger than one tensor is read.
    """

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ValueError(f"SRC {str(directory)!r} is not a directory (expected a Hugging Face checkpoint)")
        if not (self.directory / "config.json").is_file():
            raise ValueError(f"SRC {str(directory)!r} has no config.json: not a Hugging Face checkpoint")
        index = self.directory / INDEX_NAME
        if index.is_file():
            weight_map = read_json(index, MAX_JSON_BYTES, "a checkpoint index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no weight_map")
            files = sorted(set(weight_map.values()))
        elif (self.directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            found = sorted(p.name for p in self.directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            raise ValueError(
                f"SRC {str(directory)!r} has no model.safetensors or {INDEX_NAME}"
                + (f" ({found} are pickles, which growkit never loads: convert them to safetensors)" if found else "")
            )
        for f in files:
            p = (self.directory / f).resolve()
            if p.parent != self.directory.resolve() or not p.is_file():
                raise ValueError(f"the checkpoint index names {f!r}, which is not a file in {str(directory)!r}")
        from transformers import AutoConfig

        try:
            self.config = AutoConfig.from_pretrained(self.directory)
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"SRC config.json cannot be read by transformers: {exc}") from None
        self.dtype, self.device = dtype, torch.device(device)
        self._handles: dict[str, SafetensorsFile] = {}
        self.file_of: dict[str, str] = {}
        self.specs: dict[str, TensorSpec] = {}
        try:
            for f in files:
                h = self._handles[f] = SafetensorsFile(self.directory / f)
                for name in h.keys():
                    spec = h.spec(name)
                    if dtype is not None and spec.dtype.is_floating_point:
                        spec = TensorSpec(spec.shape, dtype)
                    self.file_of[name] = f
                    self.specs[name] = spec
        except (ValueError, OSError) as exc:
            self.close()
            raise ValueError(f"{str(directory)!r}: {exc}") from None

    def held_spec(self, items: list[tuple[int | None, str]]) -> TensorSpec:
        """The spec of a held tensor made of checkpoint tensors ``items`` (``FamilyAdapter.from_disk``)."""
        first = self.specs[items[0][1]]
        return first if items[0][0] is None else TensorSpec((len(items), *first.shape), first.dtype)

    def load_held(self, items: list[tuple[int | None, str]]) -> torch.Tensor:
        """A held tensor: one checkpoint tensor, or the per-expert ones stacked in order."""
        if items[0][0] is None:
            return self.get(items[0][1])
        return torch.stack([self.get(disk) for _, disk in items])

    def get(self, name: str) -> torch.Tensor:
        t = self._handles[self.file_of[name]].get(name)
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (dim 0) of checkpoint tensor ``name``, read alone."""
        t = self._handles[self.file_of[name]].get_rows(name, start, stop)
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device)

    def get_index(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (sorted, distinct) of checkpoint tensor ``name``: one read per run
        of consecutive rows."""
        ids = rows.tolist()
        runs, start = [], 0
        for k in range(1, len(ids) + 1):
            if k == len(ids) or ids[k] != ids[k - 1] + 1:
                runs.append(self.get_rows(name, ids[start], ids[k - 1] + 1))
                start = k
        if not runs:
            spec = self.specs[name]
            return torch.empty((0, *spec.shape[1:]), dtype=spec.dtype, device=self.device)
        return runs[0] if len(runs) == 1 else torch.cat(runs)

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


WRITE_CHUNK = 64 * 2**20  # bytes per write call (Linux caps one write at about 2 GiB)


class BackgroundWrites:
    """One thread that writes the grown tensors, in order, while the next ones are made.

    NOTE: writing is most of ``growkit grow``'s time on a CPU (the page cache fills at
    the disk's speed), and making a tensor (reading, tiling, noise) is the rest; done one
    after the other they added up (34.4 s against 18.0 s for ``cp`` of the grown files on
    the bench's 2 GB checkpoint, bench/grow_checkpoint.py). The write releases the GIL, so
    the next tensors are made meanwhile: 17.8-24.9 s on the same 2-core machine shared with
    other jobs, of which about 4.8 s are imports and the config, and the rest mostly the
    noise of the width step (kernels/hyperclone.py) on two threads; the writes now overlap
    it. A read-ahead of the next tensor's sources in a third thread measured no faster
    (20.0-24.9 s against 17.8-18.5 s without, alternating runs).

    Memory: a tensor stays alive until written, so :meth:`make_room` first waits for the
    oldest writes whenever those in flight and the tensor about to be made would need more
    than ``budget`` (the streaming run's peak, the largest single tensor's need): the peak
    memory stays that of one tensor at a time. Several small tensors may be in flight, so
    that neither side waits for the other's slow moments (a burst of slow disk, a large
    tensor to make): 20.3-22.5 s against 22.9-23.9 s with one at a time.
    """

    def __init__(self, budget: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.budget = budget
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="growkit-write")
        self._pending: list = []  # (future, storage key or None, bytes), oldest first

    @property
    def in_flight(self) -> int:
        """Bytes the writes not done yet hold (a storage shared by several counted once)."""
        self._prune()
        held = {}
        for k, (_, key, nbytes) in enumerate(self._pending):
            held[("storage", key) if key is not None else ("job", k)] = nbytes
        return sum(held.values())

    def _prune(self) -> None:
        while self._pending and self._pending[0][0].done():
            self._pending.pop(0)[0].result()  # a failed write raises here

    def wait(self) -> None:
        """Until every write submitted is done (the first error raised here)."""
        while self._pending:
            self._pending.pop(0)[0].result()

    def make_room(self, need: int) -> None:
        """Before making something of ``need`` bytes: wait for the oldest writes until it fits."""
        while self._pending and self.in_flight + need > self.budget:
            self._pending.pop(0)[0].result()

    def submit(self, fn, *args, key=None, nbytes: int = 0) -> None:
        """Run ``fn(*args)`` in the thread after the writes submitted before; ``nbytes``:
        the memory it holds until done (``key``: its storage)."""
        self._prune()
        self._pending.append((self._pool.submit(fn, *args), key, nbytes))

    def close(self) -> None:
        """Wait for the last write (its error raised here) and stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def close_quietly(self) -> None:
        """After an error elsewhere: stop the thread, its own error (if any) dropped."""
        try:
            self.close()
        except BaseException:  # noqa: BLE001 - the error being handled is the caller's
            pass


class ShardWriter:
    """Writes one safetensors file header first, then tensor by tensor (see the module NOTE).

    ``background``: write the tensors' bytes (and close the file) in that thread
    (:class:`BackgroundWrites`); each tensor is then held until it is written.
    """

    def __init__(self, path: Path, specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None,
                 background: BackgroundWrites | None = None) -> None:
        header, offset = {}, 0
        for name, spec in specs.items():
            header[name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        header["__metadata__"] = metadata or {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.order = list(specs)
        self.specs = specs
        self._next = 0
        self.background = background
        # unbuffered: tensors are written straight from their memory, no copy into a buffer
        self.f = open(path, "wb", buffering=0)
        self._write_all(memoryview(struct.pack("<Q", len(raw)) + raw))

    def write(self, name: str, t: torch.Tensor) -> None:
        if self.order[self._next] != name:  # pragma: no cover - a caller bug
            raise RuntimeError(f"expected {self.order[self._next]}, got {name}")
        spec = self.specs[name]
        if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:  # pragma: no cover - a plan bug
            raise RuntimeError(f"{name}: {tuple(t.shape)} {t.dtype}, planned {spec.shape} {spec.dtype}")
        self.write_bytes(t)
        self._next += 1

    def write_parts(self, name: str, parts) -> None:
        """Write tensor ``name`` as consecutive parts (a tensor fused along dim 0)."""
        if self.order[self._next] != name:  # pragma: no cover - a caller bug
            raise RuntimeError(f"expected {self.order[self._next]}, got {name}")
        spec, written = self.specs[name], 0
        for t in parts:
            if t.dtype != spec.dtype:  # pragma: no cover - a plan bug
                raise RuntimeError(f"{name}: a part of dtype {t.dtype}, planned {spec.dtype}")
            written += t.numel() * t.element_size()
            self.write_bytes(t)
            del t
        if written != spec.nbytes:  # pragma: no cover - a plan bug
            raise RuntimeError(f"{name}: wrote {written} bytes, planned {spec.nbytes}")
        self._next += 1

    def write_bytes(self, t: torch.Tensor) -> None:
        # a CPU tensor's own memory as bytes: a view, copied only if not contiguous
        t = t.detach().to("cpu").contiguous()
        if self.background is None:
            self._write_tensor(t)
        else:
            # held until written: all of its storage (an expert is a view of all the experts)
            storage = t.untyped_storage()
            self.background.submit(self._write_held, [t], key=storage.data_ptr(), nbytes=storage.nbytes())

    def _write_held(self, held: list) -> None:
        # the thread drops the tensor itself, before the wait for it returns (the executor
        # would keep its arguments a little longer)
        t = held.pop()
        self._write_tensor(t)

    def _write_tensor(self, t: torch.Tensor) -> None:
        if t.numel():
            self._write_all(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

    def _write_all(self, data: memoryview) -> None:
        for i in range(0, len(data), WRITE_CHUNK):
            part = data[i:i + WRITE_CHUNK]
            while len(part):  # a write may take less than asked
                part = part[self.f.write(part):]

    def _close(self) -> None:
        try:
            os.fsync(self.f.fileno())
        finally:
            self.f.close()

    def close(self) -> None:
        """Flush the file to disk and close it (in the background thread, after its writes)."""
        if self.background is None:
            self._close()
        else:
            self.background.submit(self._close)

    def abort(self) -> None:
        """Close without syncing (after an error; the background writes are waited for first)."""
        if self.background is not None:
            while True:
                try:
                    self.background.wait()
                    break
                except BaseException:  # noqa: BLE001 - the error being handled is the caller's
                    continue
        self.f.close()


@dataclass
class OutputTensor:
    """One held output tensor and the checkpoint tensors it is written as.

    ``parts``: the role names made for it (several for a tensor fused along ``dim``);
    ``disk``: (checkpoint name, spec, expert index or None) in write order: one entry for a
    tensor stored as held, one per expert for experts stored one tensor each.
    """

    name: str
    spec: TensorSpec
    parts: list[str]
    dim: int = 0
    inputs: set = field(default_factory=set)
    disk: list = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.spec.nbytes


def output_tensors(plan: GrowthPlan) -> list[OutputTensor]:
    """The plan's tensors as they are written: fused tensors re-assembled, experts split
    into the per-expert tensors of the family's checkpoint layout."""
    out: dict[str, OutputTensor] = {}
    adapter = plan.adapter
    for name, t in plan.tensors.items():
        disk = adapter.to_disk(name, t.spec.shape[0])
        if disk is not None:  # stored on its own (an expert part, or renamed)
            specs = [(d, TensorSpec(t.spec.shape[1:] if e is not None else t.spec.shape, t.spec.dtype), e) for d, e in disk]
            out[name] = OutputTensor(name, t.spec, [name], 0, set(t.inputs), specs)
            continue
        m = PART.match(name)
        real = m.group(1) if m else name
        if real not in out:
            dim = adapter.fused_dim(real) if m else 0
            out[real] = OutputTensor(real, t.spec, [name], dim, set(t.inputs))
        else:
            o = out[real]
            shape = list(o.spec.shape)
            shape[o.dim] += t.spec.shape[o.dim]
            o.spec = TensorSpec(tuple(shape), o.spec.dtype)
            o.parts.append(name)
            o.inputs |= set(t.inputs)
    for o in out.values():
        if not o.disk:
            o.disk = [(o.name, o.spec, None)]
    return list(out.values())


def parse_size(size: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``1000`` -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    s = str(size).strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            try:
                value = float(s[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return int(value * factor)
            break
    raise ValueError(f"max_shard_size must be a size like '5GB', '500MB' or a number of bytes, got {size!r}")


def shard(tensors: list[OutputTensor], max_bytes: int) -> list[list[OutputTensor]]:
    """Consecutive groups of at most ``max_bytes`` (a tensor larger than that gets its own)."""
    shards, current, size = [], [], 0
    for t in tensors:
        if current and size + t.spec.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.spec.nbytes
    if current:
        shards.append(current)
    return shards


@dataclass
class Estimate:
    tensors: int
    params_in: int
    params_out: int
    bytes_out: int
    peak_bytes: int
    largest: str


def estimate(reader: CheckpointReader, plans: list[GrowthPlan], outputs: list[OutputTensor]) -> Estimate:
    """Parameter counts, bytes written and the peak memory of the streaming run: the largest
    output tensor plus the source tensors it is made from (parts of fused ones included)."""
    in_specs = reader.specs
    params_in = sum(math.prod(s.shape) for s in in_specs.values())
    params_out = sum(math.prod(o.spec.shape) for o in outputs)
    bytes_out = sum(o.spec.nbytes for o in outputs)
    peak, largest = 0, "-"
    for o in outputs:
        need = _need(reader, plans, o)
        if need > peak:
            peak, largest = need, o.name
    return Estimate(len(outputs), params_in, params_out, bytes_out, peak, largest)


def _need(reader: CheckpointReader, plans: list[GrowthPlan], o: OutputTensor) -> int:
    """Bytes held while making output ``o``: the output, and (through the chain) at most
    the original tensors it derives from."""
    sources = _original_inputs(plans, o)
    # one copy of the output per chained step (and one more to fuse along dim > 0)
    copies = len(plans) + (0 if o.dim == 0 else 1)
    return o.spec.nbytes * copies + sum(reader.specs[s].nbytes for s in sources if s in reader.specs)


def source_getter(adapter, config, load_held, held_names):
    """``get(name)``: the source tensor a plan input names, read by ``load_held(held name)``:
    a tensor held as it is (``name`` in ``held_names``), or a part of a fused one held whole
    (``<fused>::<part>``), split off by the family adapter."""
    def get(name: str) -> torch.Tensor:
        if name in held_names:
            return load_held(name)
        real = PART.match(name).group(1)  # a part of a fused tensor held whole
        return adapter.split(config, {real: load_held(real)})[name]

    return get


def _original_inputs(plans: list[GrowthPlan], o: OutputTensor) -> set[str]:
    names = set(o.inputs)
    for plan in reversed(plans[:-1]):
        names = {i for n in names if n in plan.tensors for i in plan.tensors[n].inputs}
    return {PART.match(n).group(1) if PART.match(n) else n for n in names}


def grow_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    make_plans,
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    report=None,
):
    """Grow the checkpoint ``src`` into ``dst`` tensor by tensor.

    Args:
        src: a Hugging Face checkpoint directory (config.json and safetensors, sharded or not).
        dst: the directory to create (refused if it exists, unless ``overwrite``).
        make_plans: ``f(adapter, config, specs, tied) -> list[GrowthPlan]``, the growth
            steps in order (see ``growkit.growth.cli``).
        dtype: cast floating tensors on load (None keeps them).
        device: where tensors are grown (``"cuda"``: the Triton kernels).
        max_shard_size: the largest output shard.
        overwrite: replace an existing ``dst``.
        dry_run: plan and estimate only; nothing is written.

    Returns:
        ``(plans, outputs, estimate, seconds)``.
    """
    max_bytes = parse_size(max_shard_size)
    dst = Path(dst)
    if dst.exists() and not overwrite and not dry_run:
        raise ValueError(f"DST {str(dst)!r} exists: pass --overwrite to replace it")
    with CheckpointReader(src, dtype=dtype, device=device) as reader:
        adapter = get_family_adapter(reader.config)
        from .roles import Role

        roles = adapter.roles_for_names(adapter.from_disk(reader.specs))  # unknown names raise here

        tied = bool(adapter.cfg(reader.config, "tie_embeddings", False)) and not any(
            pr.role is Role.LM_HEAD for pr in roles.values())
        if not tied and not any(pr.role is Role.LM_HEAD for pr in roles.values()):
            raise ValueError("SRC has no output embedding (lm_head) and its config does not tie embeddings")
        index = adapter.from_disk(reader.specs)  # held names -> the checkpoint tensors they are made of
        metas = {}
        for held, items in index.items():
            spec = reader.held_spec(items)
            metas[held] = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
        specs = {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in adapter.split(reader.config, metas).items()}
        plans = make_plans(adapter, reader.config, specs, tied)
        outputs = output_tensors(plans[-1])
        est = estimate(reader, plans, outputs)
        if dry_run:
            return plans, outputs, est, 0.0

        get = source_getter(adapter, reader.config, lambda held: reader.load_held(index[held]), index)
        last = plans[-1]
        getter = chain(get, plans)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
        t0 = time.perf_counter()
        try:
            shards = shard(outputs, max_bytes)
            n = len(shards)
            files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            bar = _progress(est.bytes_out, progress)
            weight_map: dict[str, str] = {}
            # the tensors before are written while the next is made, within the peak's memory
            background = BackgroundWrites(est.peak_bytes)
            writer = None
            try:
                for file, group in zip(files, shards):
                    writer = ShardWriter(tmp / file, {d: spec for o in group for d, spec, _ in o.disk},
                                         background=background)
                    for o in group:
                        background.make_room(_need(reader, plans, o))
                        _write_output(writer, last, o, getter)
                        weight_map.update({d: file for d, _, _ in o.disk})
                        bar.update(o.spec.nbytes)
                    writer.close()  # synced to disk in the background, while the next shard starts
                    writer = None
                background.close()
            except BaseException:
                if writer is not None:
                    writer.abort()
                background.close_quietly()
                raise
            bar.close()
            if n > 1:
                index = {"metadata": {"total_size": est.bytes_out}, "weight_map": weight_map}
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
            if dtype is not None:  # what from_pretrained(dtype="auto") will build
                last.config.dtype = dtype
            last.config.save_pretrained(tmp)
            for name in COPIED:
                if (Path(src) / name).is_file() and not (tmp / name).exists():
                    shutil.copyfile(Path(src) / name, tmp / name)
            model_class = (getattr(last.config, "architectures", None) or ["?"])[0]
            if last.adapter.name != adapter.name or not getattr(last.config, "architectures", None):
                model_class = _model_class_name(last.config)
                last.config.architectures = [model_class]
                last.config.save_pretrained(tmp)
            write_growth_files(tmp, last.adapter.name, model_class, [p.record for p in plans], report)
            publish_directory(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return plans, outputs, est, time.perf_counter() - t0


def _model_class_name(config) -> str:
    """The causal-LM class transformers builds for ``config`` (built on the meta device: free)."""
    import warnings

    from transformers import AutoModelForCausalLM

    try:  # the name the Auto class maps the model type to, without importing the model's code
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    except ImportError:  # pragma: no cover - another transformers layout
        name = None
    if isinstance(name, str):
        return name
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(AutoModelForCausalLM.from_config(config)).__name__


def _write_output(writer: ShardWriter, plan: GrowthPlan, o: OutputTensor, get) -> None:
    if len(o.parts) == 1 and (o.disk[0][0] != o.name or not PART.match(o.parts[0])):
        t = plan.make(o.parts[0], get)
        for disk, _, expert in o.disk:  # as held, or one tensor per expert
            writer.write(disk, t if expert is None else t[expert])
        return
    if o.dim == 0:
        # parts fused along dim 0 are consecutive bytes: written one after the other
        writer.write_parts(o.name, (plan.make(p, get) for p in o.parts))
        return
    writer.write(o.name, torch.cat([plan.make(p, get) for p in o.parts], dim=o.dim))


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="growing", disable=not enabled)
