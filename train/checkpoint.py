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

Nothing is pickled: tensors go to safetensors, everything else to JSON, so loading a
checkpoint never runs code from the file. Each file is written to a temporary file and
renamed (:func:`atomic_write`); the folder itself is assembled under a temporary name and
renamed into place, and only then does ``<run_dir>/latest.json`` (also replaced
atomically) point to it. A run killed at any moment therefore leaves ``latest.json``
naming a complete checkpoint (or no ``latest.json`` at all).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from growkit.models.io import atomic_write

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
    "latest_checkpoint",
    "load_checkpoint_state",
    "prune_checkpoints",
]

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest.json"
_SEP = "::"


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
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        save_model(model, tmp)
        save_optimizer(optimizer, model, tmp)
        rng_tensors, rng_values = capture_rng(batch_generator)
        _save_tensors(tmp / "rng.safetensors", rng_tensors)
        atomic_write_json(tmp / "rng.json", rng_values)
        atomic_write_json(tmp / "state.json", state)
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


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder ``latest.json`` names, or None when the run has no checkpoint yet."""
    run_dir = Path(run_dir)
    p = run_dir / LATEST_FILE
    if not p.is_file():
        return None
    ckpt = run_dir / _read_json(p)["checkpoint"]
    if not (ckpt / "state.json").is_file():
        raise ValueError(f"{p} names {ckpt}, which is not a complete checkpoint")
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
    latest = latest_checkpoint(run_dir)
    periodic = sorted(p for p in root.iterdir()
                      if p.is_dir() and p.name.startswith("step-") and not p.name.endswith("-end"))
    removed = []
    for p in periodic[:max(0, len(periodic) - keep)]:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        shutil.rmtree(p)
        removed.append(p.name)
    return removed
