"""Saving and loading :class:`Transformer` checkpoints (safetensors + JSON, no pickle).

A checkpoint directory holds ``model.safetensors`` and ``config.json``. Each file is
written to a temporary file in the same directory and moved into place with
``os.replace``, so a reader never sees a half-written file. The two files are replaced
one after the other (weights first), so a crash in between can pair new weights with the
previous config; write to a fresh directory when that matters.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .transformer import Transformer

__all__ = ["save_model", "load_model", "model_from_state_dict", "atomic_write", "atomic_write_text", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp)`` for a temporary file beside ``path``, then renames it to ``path``.

    The one atomic writer of the project (checkpoints, reports, tokenizers, benchmark
    results). The temporary file is in the destination folder because ``os.replace`` is
    atomic only within one filesystem; it is fsynced before the rename so a power loss
    cannot leave an empty file under the final name.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file 0600 (and a writer may recreate it): give the result
        # the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def save_model(model: Transformer, directory: str | os.PathLike) -> None:
    """Writes ``model.safetensors`` and ``config.json`` into ``directory``.

    Tied models have no ``lm_head`` module, so only ``embed.weight`` is stored. Tensors
    are saved in the model's current dtype.

    Args:
        model: The model to save.
        directory: Created if missing.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = {
        name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()
    }
    if model.config.tie_embeddings:
        # Defensive: a tied output matrix must never be written twice.
        state.pop("lm_head.weight", None)

    def write_weights(tmp: str) -> None:
        save_file(state, tmp, metadata={"format": "pt"})

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(model.config.to_json_str())

    atomic_write(os.path.join(directory, WEIGHTS_NAME), write_weights)
    atomic_write(os.path.join(directory, CONFIG_NAME), write_config)


def load_model(
    directory: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Transformer:
    """Reads a checkpoint written by :func:`save_model`.

    The model skeleton is built on the meta device (no wasted random init) and the
    stored tensors are assigned into it.

    Args:
        directory: Checkpoint directory.
        device: Device of the returned model.
        dtype: Cast floating tensors to this dtype; ``None`` keeps the stored dtypes.

    Returns:
        The model in train mode, as ``Transformer(cfg)`` would be.

    Raises:
        ValueError: If the stored keys or shapes do not match the config's model.
    """
    directory = os.fspath(directory)
    cfg = ModelConfig.from_json(os.path.join(directory, CONFIG_NAME))
    state = load_file(os.path.join(directory, WEIGHTS_NAME), device=str(device))

    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        return model_from_state_dict(cfg, state)
    except ValueError as exc:
        raise ValueError(f"{directory}: {exc}") from None


def model_from_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """Builds ``Transformer(cfg)`` around the given tensors, without a random init.

    The skeleton is built on the meta device and ``state``'s tensors are assigned into it
    (no copy), so growing a model allocates each grown tensor once.

    Raises:
        ValueError: If the keys or shapes do not match the config's model.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match its config: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    bad_shapes = [
        f"{k}: stored {tuple(state[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad_shapes:
        raise ValueError("shape mismatch: " + "; ".join(bad_shapes))
    model.load_state_dict(state, strict=True, assign=True)
    # RoPE tables are non-persistent, so they are still on the meta device.
    model._build_rope(cfg.max_seq_len, model.embed.weight.device)
    return model
