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
        out = torch.empty(shape, dtype=dtype)
        buf = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else bytearray()
        self.f.seek(self.start + begin)
        if out.numel() and self.f.readinto(memoryview(buf)) != buf.nbytes:
            raise ValueError(f"{self.path}: {name!r} is truncated")
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

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardWriter:
    """Writes one safetensors file header first, then tensor by tensor (see the module NOTE)."""

    def __init__(self, path: Path, specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None) -> None:
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
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)

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
            self.write_bytes(t)
            written += t.numel() * t.element_size()
        if written != spec.nbytes:  # pragma: no cover - a plan bug
            raise RuntimeError(f"{name}: wrote {written} bytes, planned {spec.nbytes}")
        self._next += 1

    def write_bytes(self, t: torch.Tensor) -> None:
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self.f.write(memoryview(data))

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
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
        # the output, and (through the chain) at most the original tensors it derives from
        sources = _original_inputs(plans, o)
        # one copy of the output per chained step (and one more to fuse along dim > 0)
        copies = len(plans) + (0 if o.dim == 0 else 1)
        need = o.spec.nbytes * copies + sum(in_specs[s].nbytes for s in sources if s in in_specs)
        if need > peak:
            peak, largest = need, o.name
    return Estimate(len(outputs), params_in, params_out, bytes_out, peak, largest)


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

        def get(name: str) -> torch.Tensor:
            if name in index:
                return reader.load_held(index[name])
            real = PART.match(name).group(1)  # a part of a fused tensor held whole
            return adapter.split(reader.config, {real: reader.load_held(index[real])})[name]

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
            for file, group in zip(files, shards):
                writer = ShardWriter(tmp / file, {d: spec for o in group for d, spec, _ in o.disk})
                try:
                    for o in group:
                        _write_output(writer, last, o, getter)
                        weight_map.update({d: file for d, _, _ in o.disk})
                        bar.update(o.spec.nbytes)
                finally:
                    writer.close()
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
