"""Checkpoints of a training run: weights, AdamW state, RNG states and progress, no pickle.

A checkpoint is a folder ``<run_dir>/checkpoints/step-<global step>[-phase<p>-end]``::

    model.safetensors   config.json      the current model (growkit.models.save_model);
                                         after a growth it is the grown model and config
    optimizer.safetensors                AdamW state tensors, key "<param name>::<key>"
    optimizer.json                       param groups (by parameter name), scalar state
    rng.safetensors                      torch CPU / CUDA generator states, the batch
                                         generator state, numpy's MT19937 key (uint8/int64)
    rng.json                             python ``random`` state, numpy's scalars
    state.json                           phase, step, global step, tokens, FLOPs, wall
                                         time, metrics records covered, check results
    manifest.json                        written last: size and sha256 of every file
                                         above, and the hash of the run's config

A run under ``torchrun`` writes a *sharded* checkpoint instead (:mod:`growkit.train.distributed`):
``dcp/`` (``torch.distributed.checkpoint``: the model's and AdamW's tensors, each rank its
shards) replaces ``model.safetensors`` and ``optimizer.safetensors``; ``optimizer.json``
holds the param groups; ``config.json``, ``rng.*``, ``state.json`` and the manifest (which
lists every file under ``dcp/`` too) are as above. Either kind resumes at any world size.

Nothing is pickled by growkit: tensors go to safetensors (or DCP), everything else to JSON,
so loading a checkpoint never runs code from the file (DCP's own ``dcp/.metadata`` is a
pickle torch writes: its sha256 is checked against the manifest, and it is read by an
unpickler that admits only DCP's metadata records, ``distributed._dcp_reader``). Each file is written to a temporary file and
renamed (:func:`atomic_write`); the folder itself is assembled under a temporary name and
renamed into place, and only then does ``<run_dir>/latest.json`` (also replaced
atomically) point to it. A run killed at any moment therefore leaves ``latest.json``
naming a complete checkpoint (or no ``latest.json`` at all).

Resuming (:func:`select_checkpoint`) trusts nothing it reads: ``latest.json`` may only
name a folder inside ``<run_dir>/checkpoints``; each candidate is verified against its
manifest (and its ``state.json`` against ``metrics.jsonl``) before anything is built from
it; a damaged newest checkpoint is skipped, with a note, for the newest one that verifies.
Failures raise :class:`ResumeError` (the run directory cannot be resumed) or
:class:`ResumeRefused` (it could, but its config no longer matches the checkpoint), each
with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from growkit.files import atomic_write

__all__ = [
    "CHECKPOINTS_DIR",
    "LATEST_FILE",
    "atomic_write",
    "atomic_write_json",
    "save_optimizer",
    "load_optimizer",
    "capture_rng",
    "restore_rng",
    "save_checkpoint",
    "finish_checkpoint",
    "latest_checkpoint",
    "load_checkpoint_state",
    "prune_checkpoints",
    "MANIFEST_FILE",
    "ResumeError",
    "ResumeRefused",
    "run_config_hash",
    "config_changes",
    "verify_checkpoint",
    "write_manifest",
    "select_checkpoint",
    "clean_orphans",
    "check_resume_config",
    "is_sharded_checkpoint",
    "DCP_DIR",
    "SHARDED_FILES",
]

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest.json"
MANIFEST_FILE = "manifest.json"
#: The files of a complete checkpoint (the manifest lists them with size and sha256).
CHECKPOINT_FILES = ("model.safetensors", "config.json", "optimizer.safetensors", "optimizer.json",
                    "rng.safetensors", "rng.json", "state.json")
#: The files of a sharded checkpoint besides those under ``dcp/`` (:mod:`growkit.train.distributed`).
SHARDED_FILES = ("config.json", "optimizer.json", "rng.safetensors", "rng.json", "state.json")
DCP_DIR = "dcp"
_SEP = "::"
_NAME = re.compile(r"^step-(\d+)(?:-phase(\d+)-end)?$")


class ResumeError(Exception):
    """A run directory cannot be resumed (damaged or missing files); one-line message."""


class ResumeRefused(ResumeError):
    """A run could be resumed, but its config or data no longer match the checkpoint."""


class _OutsideRun(ResumeError):
    """``latest.json`` names a folder that is not one of the run's checkpoints."""


# ---------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------

def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------

def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _json_value(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_json_value(x) for x in v]
    if torch.is_tensor(v):
        return v.item()
    return v


def save_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                   directory: str | os.PathLike) -> None:
    """Writes ``optimizer.safetensors`` and ``optimizer.json`` into ``directory``.

    Parameters are named by ``model.named_parameters()``, so the state can be loaded
    into any optimizer over a model with the same parameter names, whatever their order.
    """
    directory = Path(directory)
    names = _param_names(model)
    groups = []
    for g in optimizer.param_groups:
        entry = {k: _json_value(v) for k, v in g.items() if k != "params"}
        try:
            entry["params"] = [names[id(p)] for p in g["params"]]
        except KeyError:
            raise ValueError("the optimizer holds a parameter that is not in the model") from None
        groups.append(entry)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for p, st in optimizer.state.items():
        name = names[id(p)]
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{name}{_SEP}{k}"] = v
            else:
                scalars.setdefault(name, {})[k] = _json_value(v)
    _save_tensors(directory / "optimizer.safetensors", tensors)
    atomic_write_json(directory / "optimizer.json", {
        "type": type(optimizer).__name__,
        "param_groups": groups,
        "scalars": scalars,
    })


def load_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                   directory: str | os.PathLike) -> None:
    """Loads what :func:`save_optimizer` wrote into ``optimizer`` (built over ``model``).

    Raises:
        ValueError: If the optimizer type, the groups or the parameter names differ.
    """
    directory = Path(directory)
    meta = _read_json(directory / "optimizer.json")
    if meta.get("type") != type(optimizer).__name__:
        raise ValueError(f"{directory}: optimizer is {meta.get('type')}, expected "
                         f"{type(optimizer).__name__}")
    tensors = load_file(str(directory / "optimizer.safetensors"))
    names = _param_names(model)
    saved_groups = meta["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"{directory}: {len(saved_groups)} param groups stored, the "
                         f"optimizer has {len(optimizer.param_groups)}")
    index: dict[str, int] = {}
    groups = []
    for saved, live in zip(saved_groups, optimizer.param_groups):
        live_names = [names[id(p)] for p in live["params"]]
        if live_names != saved["params"]:
            raise ValueError(f"{directory}: stored parameter groups do not match the model")
        g = dict(saved)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        g["params"] = []
        for n in live_names:
            index[n] = len(index)
            g["params"].append(index[n])
        groups.append(g)
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, k = key.rsplit(_SEP, 1)
        if name not in index:
            raise ValueError(f"{directory}: optimizer state for unknown parameter {name!r}")
        state.setdefault(index[name], {})[k] = t
    for name, entries in meta.get("scalars", {}).items():
        state.setdefault(index[name], {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------

def capture_rng(batch_generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Every random state a run touches: torch (CPU, CUDA), the batch generator, python,
    numpy. Returns ``(tensors, json_values)``."""
    tensors = {
        "torch_cpu": torch.get_rng_state(),
        "batch_generator": batch_generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    values = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    }
    return tensors, values


def restore_rng(tensors: dict[str, torch.Tensor], values: dict,
                batch_generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    batch_generator.set_state(tensors["batch_generator"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    n = values["numpy"]
    np.random.set_state((n["kind"], tensors["numpy_keys"].numpy().astype(np.uint32),
                         n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = values["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# ---------------------------------------------------------------------------
# Checkpoint folders
# ---------------------------------------------------------------------------

def checkpoint_name(global_step: int, phase_end: int | None = None) -> str:
    return f"step-{global_step:08d}" + (f"-phase{phase_end}-end" if phase_end else "")


def save_checkpoint(
    run_dir: str | os.PathLike,
    name: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_generator: torch.Generator,
    state: dict[str, Any],
) -> Path:
    """Writes a complete checkpoint folder, then points ``latest.json`` at it.

    Returns:
        The checkpoint folder.
    """
    from growkit.models import save_model

    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        save_model(model, tmp)
        save_optimizer(optimizer, model, tmp)
        rng_tensors, rng_values = capture_rng(batch_generator)
        _save_tensors(tmp / "rng.safetensors", rng_tensors)
        atomic_write_json(tmp / "rng.json", rng_values)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_checkpoint(run_dir, tmp, name, state)


def finish_checkpoint(run_dir: str | os.PathLike, tmp: Path, name: str, state: dict[str, Any]) -> Path:
    """Writes ``state.json`` and the manifest into the assembled folder ``tmp`` (inside
    ``<run_dir>/checkpoints``), renames it to ``name`` and points ``latest.json`` at it;
    removes ``tmp`` on failure. Returns the checkpoint folder."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    final = root / name
    try:
        atomic_write_json(tmp / "state.json", state)
        write_manifest(tmp, state.get("train_config"))
        if final.exists():
            # Left by a run killed after writing it but before updating latest.json; a
            # resumed run has just recomputed the same step.
            trash = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=root))
            os.replace(final, trash / name)
            shutil.rmtree(trash)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(run_dir / LATEST_FILE, {"checkpoint": f"{CHECKPOINTS_DIR}/{name}",
                                              "global_step": state.get("global_step"),
                                              "phase": state.get("phase")})
    return final


def _latest_target(run_dir: Path) -> Path | None:
    """The folder ``latest.json`` names (not checked to exist), or None without the file.

    Raises:
        ResumeError: If ``latest.json`` cannot be read, or names a folder that is not a
            checkpoint folder directly inside ``<run_dir>/checkpoints``.
    """
    p = run_dir / LATEST_FILE
    if not p.exists():
        return None
    try:
        entry = _read_json(p)
        name = entry["checkpoint"]
        if not isinstance(name, str):
            raise TypeError(f"'checkpoint' is {type(name).__name__}, not a string")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResumeError(f"{LATEST_FILE} is damaged ({_one_line(e)})") from None
    root = (run_dir / CHECKPOINTS_DIR).resolve()
    target = (run_dir / name).resolve()
    if target.parent != root or not _NAME.match(target.name):
        raise _OutsideRun(
            f"{LATEST_FILE} names {name!r}, which is not a checkpoint folder inside "
            f"{run_dir / CHECKPOINTS_DIR}; a run only loads its own checkpoints (restore "
            f"{LATEST_FILE}, or delete it to resume from the newest checkpoint that verifies)")
    return target


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder ``latest.json`` names, or None when the run has no checkpoint yet.

    Raises:
        ValueError: If ``latest.json`` is damaged, names a folder outside
            ``<run_dir>/checkpoints``, or names an incomplete checkpoint.
    """
    run_dir = Path(run_dir)
    try:
        ckpt = _latest_target(run_dir)
    except ResumeError as e:
        raise ValueError(f"{run_dir / LATEST_FILE}: {e}") from None
    if ckpt is None:
        return None
    if not (ckpt / "state.json").is_file():
        raise ValueError(f"{run_dir / LATEST_FILE} names {ckpt}, which is not a complete checkpoint")
    return ckpt


def load_checkpoint_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    return _read_json(Path(ckpt) / "state.json")


def load_rng(ckpt: str | os.PathLike, batch_generator: torch.Generator) -> None:
    ckpt = Path(ckpt)
    restore_rng(load_file(str(ckpt / "rng.safetensors")), _read_json(ckpt / "rng.json"),
                batch_generator)


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[str]:
    """Deletes all but the newest ``keep`` periodic checkpoints.

    Phase-end checkpoints (the models before each growth, and the final one) and the
    one ``latest.json`` names are never deleted. Returns the deleted names.
    """
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    try:
        latest = _latest_target(run_dir)
    except ResumeError:
        latest = None
    periodic = sorted(p for p in root.iterdir()
                      if p.is_dir() and p.name.startswith("step-") and not p.name.endswith("-end"))
    removed = []
    for p in periodic[:max(0, len(periodic) - keep)]:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        shutil.rmtree(p)
        removed.append(p.name)
    return removed


# ---------------------------------------------------------------------------
# Integrity: manifest, run-config hash, resume selection
# ---------------------------------------------------------------------------

def _one_line(e: BaseException | str) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, BaseException) and not text:
        text = type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash_exempt() -> frozenset[str]:
    from .config import RESUME_OVERRIDABLE

    # RESUME_OVERRIDABLE: what a resumed run may change. run_dir, out_dir and name only
    # say where the run lives (a moved run directory resumes); data and val_data name
    # where the stories are (a moved file resumes): the data themselves are compared by
    # their token fingerprint (state["data"]).
    return frozenset(RESUME_OVERRIDABLE) | {"run_dir", "out_dir", "name", "data", "val_data"}


def _flat(train_config: dict[str, Any]) -> dict[str, Any]:
    """The config with dotted phase keys (``phase1.steps``), from the nested
    ``TrainConfig.to_dict()`` or the flat dict (``steps_phase1``) of earlier versions."""
    from .config import flatten_config

    return flatten_config(train_config)


def _canonical(key: str) -> str:
    from .config import LEGACY_KEYS

    return LEGACY_KEYS.get(key, key)


def run_config_hash(train_config: dict[str, Any], fields: list[str] | None = None) -> str:
    """sha256 of the run-defining fields of a resolved ``TrainConfig.to_dict()``.

    The hash is over the flattened config (``{"phase1.steps": ..., "d_model": ...}``).
    The fields a resumed run may change (``RESUME_OVERRIDABLE``) and those that only
    locate things (``run_dir``, ``out_dir``, ``name``; ``data`` and ``val_data``, whose
    content is fingerprinted separately) are left out. ``fields`` restricts the hash to those keys
    (the ones a checkpoint hashed; fields added to TrainConfig later are not compared). A
    checkpoint of an earlier version names the phase fields flat (``steps_phase1``): such a
    key hashes the value of its nested field under its own name, so its hash still matches.
    """
    exempt, flat = _hash_exempt(), _flat(train_config)
    keys = sorted(k for k in (flat if fields is None else fields) if k not in exempt)
    payload = json.dumps({k: flat.get(_canonical(k)) for k in keys}, sort_keys=True,
                         allow_nan=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Run-defining fields whose value differs, as ``"name: stored -> current"`` (phase
    fields dotted: ``"phase1.lr: 0.003 -> 0.001"``)."""
    exempt, stored, current = _hash_exempt(), _flat(stored), _flat(current)
    return [f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in sorted(stored)
            if k not in exempt and stored.get(k) != current.get(k)]


def is_sharded_checkpoint(ckpt: str | os.PathLike) -> bool:
    """True for a checkpoint written under torchrun (a ``dcp/`` folder, no safetensors model)."""
    return (Path(ckpt) / DCP_DIR).is_dir()


def _checkpoint_files(directory: Path) -> list[str]:
    """The files a checkpoint folder must hold: :data:`CHECKPOINT_FILES`, or for a sharded
    one :data:`SHARDED_FILES` and every file under ``dcp/`` (relative, ``/``-separated)."""
    if not is_sharded_checkpoint(directory):
        return list(CHECKPOINT_FILES)
    shards = sorted(p.relative_to(directory).as_posix() for p in (directory / DCP_DIR).rglob("*")
                    if p.is_file())
    return list(SHARDED_FILES) + shards


def write_manifest(directory: Path, train_config: dict[str, Any] | None) -> None:
    """``manifest.json``: size and sha256 of every checkpoint file, and the config hash."""
    files = {}
    for name in _checkpoint_files(directory):
        p = directory / name
        files[name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    manifest: dict[str, Any] = {"format": 1, "files": files}
    if is_sharded_checkpoint(directory):
        manifest["layout"] = "sharded"
    if train_config is not None:
        fields = sorted(k for k in _flat(train_config) if k not in _hash_exempt())
        manifest["config_sha256"] = run_config_hash(train_config, fields)
        manifest["config_fields"] = fields
    atomic_write_json(directory / MANIFEST_FILE, manifest)


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # checks the header covers the file
        f.keys()


def verify_checkpoint(ckpt: str | os.PathLike, metrics_records: int | None = None) -> dict[str, Any]:
    """Checks a checkpoint folder before anything is built from it; returns its state.

    With a ``manifest.json``: every file must have the size and sha256 it lists. Without
    one (a checkpoint written before manifests existed): every file must be present, its
    JSON must parse and its safetensors header must cover the file. Then ``state.json``
    must hold the progress fields, and cover at most ``metrics_records`` records of
    ``metrics.jsonl`` (when given).

    Raises:
        ResumeError: Naming the first damaged file and what is wrong with it.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise ResumeError("no such folder")
    manifest_path = ckpt / MANIFEST_FILE
    if manifest_path.exists():
        try:
            manifest = _read_json(manifest_path)
            listed = manifest["files"]
            if not isinstance(listed, dict):
                raise TypeError("'files' is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ResumeError(f"{MANIFEST_FILE} is damaged ({_one_line(e)})") from None
        required = list(CHECKPOINT_FILES)
        if manifest.get("layout") == "sharded":
            # every listed file (the DCP shards: their number depends on the world size),
            # and at least the fixed ones and DCP's index
            required = list(SHARDED_FILES) + [f"{DCP_DIR}/.metadata"]
            required += sorted(n for n in listed if n not in required)
            for name in required:  # a listed path must stay inside the checkpoint
                if not isinstance(name, str) or name.startswith("/") or ".." in name.split("/"):
                    raise ResumeError(f"{MANIFEST_FILE} lists {name!r}, a path outside the checkpoint")
        elif is_sharded_checkpoint(ckpt):
            raise ResumeError(f"{MANIFEST_FILE} does not describe the sharded files under {DCP_DIR}/")
        for name in required:
            entry = listed.get(name)
            p = ckpt / name
            if not isinstance(entry, dict):
                raise ResumeError(f"{MANIFEST_FILE} does not list {name}")
            if not p.is_file():
                raise ResumeError(f"{name} is missing")
            size = p.stat().st_size
            if size != entry.get("bytes"):
                raise ResumeError(f"{name} has {size} bytes, the manifest lists {entry.get('bytes')} "
                                  "(truncated or rewritten)")
            if _sha256(p) != entry.get("sha256"):
                raise ResumeError(f"{name} does not match its sha256 in the manifest")
    elif is_sharded_checkpoint(ckpt):
        raise ResumeError(f"{MANIFEST_FILE} is missing (a sharded checkpoint is only trusted "
                          "with its manifest)")
    else:
        for name in CHECKPOINT_FILES:
            p = ckpt / name
            if not p.is_file():
                raise ResumeError(f"{name} is missing")
            try:
                if name.endswith(".json"):
                    _read_json(p)
                else:
                    _check_safetensors(p)
            except Exception as e:  # noqa: BLE001 - any parse failure is damage
                raise ResumeError(f"{name} is damaged ({_one_line(e)})") from None
    try:
        state = _read_json(ckpt / "state.json")
    except (OSError, ValueError) as e:
        raise ResumeError(f"state.json is damaged ({_one_line(e)})") from None
    need = ("phase", "phase_step", "phase_done", "global_step", "metrics_records", "elapsed_s")
    missing = [k for k in need if not isinstance(state, dict) or k not in state]
    if missing:
        raise ResumeError(f"state.json lacks {missing}")
    if metrics_records is not None and state["metrics_records"] > metrics_records:
        raise ResumeError(f"{'metrics.jsonl'} holds {metrics_records} records but the checkpoint "
                          f"covers {state['metrics_records']} (the log was truncated)")
    return state


def _candidates(root: Path) -> list[Path]:
    """Checkpoint folders in ``root``, newest first (global step, then phase end)."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and not p.is_symlink():
            found.append(((int(m.group(1)), int(m.group(2) or 0)), p))
    return [p for _, p in sorted(found, reverse=True)]


def select_checkpoint(run_dir: str | os.PathLike, say=print) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a resumed run starts from, and its verified state.

    The folder ``latest.json`` names is tried first, then every other checkpoint folder,
    newest first; the first that verifies (:func:`verify_checkpoint`, against the records
    ``metrics.jsonl`` holds) is returned, and ``say`` is told about each one skipped.
    Returns None when the run has neither ``latest.json`` nor a checkpoint folder (it
    never reached its first checkpoint).

    Raises:
        ResumeError: If ``latest.json`` names a folder outside ``<run_dir>/checkpoints``,
            or checkpoints exist (or ``latest.json`` does) but none verifies.
    """
    from .metrics import read_metrics

    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    skipped: list[str] = []
    try:
        latest = _latest_target(run_dir)
    except _OutsideRun:
        raise
    except ResumeError as e:
        say(f"resume: {e}; looking for the newest checkpoint that verifies")
        latest, skipped = None, [f"{LATEST_FILE}: damaged"]
    candidates = _candidates(root)
    if latest is not None:
        if latest.is_dir():
            candidates = [latest] + [p for p in candidates if p.resolve() != latest]
        else:
            say(f"resume: {LATEST_FILE} names {CHECKPOINTS_DIR}/{latest.name}, which does not "
                "exist; looking for the newest checkpoint that verifies")
            skipped.append(f"{latest.name}: missing")
    elif not (run_dir / LATEST_FILE).exists() and candidates:
        say(f"resume: no {LATEST_FILE}; looking for the newest checkpoint that verifies")
    if not candidates:
        if skipped:
            raise ResumeError(f"no checkpoint to resume from in {root} ({'; '.join(skipped)}); "
                              "start a new run")
        return None
    n_records = len(read_metrics(run_dir / "metrics.jsonl"))
    for ckpt in candidates:
        try:
            state = verify_checkpoint(ckpt, n_records)
        except ResumeError as e:
            say(f"resume: {CHECKPOINTS_DIR}/{ckpt.name} is damaged: {e}; skipping it")
            skipped.append(f"{ckpt.name}: {e}")
            continue
        if skipped:
            say(f"resume: falling back to {CHECKPOINTS_DIR}/{ckpt.name}, the newest checkpoint "
                f"that verifies (global step {state['global_step']})")
        return ckpt, state
    first = skipped[0] if len(skipped) == 1 else f"{skipped[0]}; and {len(skipped) - 1} more"
    raise ResumeError(f"none of the {len(candidates)} checkpoints in {root} verifies ({first}); "
                      "start a new run")


def clean_orphans(run_dir: str | os.PathLike) -> list[str]:
    """Removes the temporary folders an interrupted :func:`save_checkpoint` left behind
    (``checkpoints/.step-*.tmp`` and ``.step-*.old``); returns their names."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    removed = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name.startswith(".step-") and p.name.endswith((".tmp", ".old")) and p.is_dir() \
                    and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def check_resume_config(current: dict[str, Any], ckpt: str | os.PathLike, state: dict[str, Any]) -> None:
    """Refuses to resume ``ckpt`` with a run config other than the one it was taken with.

    ``current`` is the resolved ``TrainConfig.to_dict()`` the resumed run would use (the
    run's ``config.json`` plus the allowed command-line changes). Its hash over the fields
    the checkpoint hashed must equal the manifest's ``config_sha256``; a checkpoint
    without a manifest is compared field by field with its ``state["train_config"]``.

    Raises:
        ResumeRefused: Naming each changed field, its stored and its current value.
    """
    ckpt = Path(ckpt)
    stored = state.get("train_config")
    expected = fields = None
    manifest_path = ckpt / MANIFEST_FILE
    if manifest_path.exists():
        manifest = _read_json(manifest_path)  # verified by verify_checkpoint
        expected, fields = manifest.get("config_sha256"), manifest.get("config_fields")
    if expected is not None and fields is not None:
        if run_config_hash(current, fields) == expected:
            return
    elif not isinstance(stored, dict) or not config_changes(stored, current):
        return
    changes = config_changes(stored, current) if isinstance(stored, dict) else []
    what = "; ".join(changes) if changes else "the stored config is not readable"
    raise ResumeRefused(
        f"the run's config.json differs from the one {CHECKPOINTS_DIR}/{ckpt.name} was taken "
        f"with ({what}); restore those values, or start a new run to change them")
