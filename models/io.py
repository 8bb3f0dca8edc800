"""Saving and loading :class:`Transformer` checkpoints (safetensors + JSON, no pickle).

A checkpoint directory holds ``model.safetensors`` and ``config.json``. Each file is
written to a temporary file in the same directory and moved into place with
``os.replace``, so a reader never sees a half-written file. The two files are replaced
one after the other (weights first), so a crash in between can pair new weights with the
previous config; write to a fresh directory when that matters.

``config.json`` lists every :class:`ModelConfig` field, ``dense_layers`` included (the
layers of a mixture-of-experts model that keep a dense MLP, e.g. after partial upcycling);
a file written before that field existed loads with it empty (every layer MoE), which is
what it meant, and the layers holding routers in the weights must be the config's MoE
layers (:func:`check_config_against_file`).
"""

from __future__ import annotations

import os
import re

import torch
from safetensors.torch import load_file, save_file

from growkit.files import atomic_write, atomic_write_text  # noqa: F401  (re-exported)

from .config import ModelConfig
from .transformer import Transformer

__all__ = ["save_model", "load_model", "model_from_state_dict", "atomic_write", "atomic_write_text", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


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

    atomic_write(os.path.join(directory, WEIGHTS_NAME), write_weights)
    model.config.to_json(os.path.join(directory, CONFIG_NAME))


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
        ValueError: If the config lacks a field, does not match the tensors in the file
            (checked from the file's header before anything is built:
            :func:`check_config_against_file`), or the stored keys or shapes do not match
            the config's model.
    """
    directory = os.fspath(directory)
    cfg = ModelConfig.from_json(os.path.join(directory, CONFIG_NAME))
    weights = os.path.join(directory, WEIGHTS_NAME)
    # Bound the config by the tensors in the file before building or allocating anything.
    check_config_against_file(cfg, weights)
    state = load_file(weights, device=str(device))

    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        return model_from_state_dict(cfg, state)
    except ValueError as exc:
        raise ValueError(f"{directory}: {exc}") from None


#: RoPE tables (cos and sin, float32) up to this size are always accepted; above it they
#: may not exceed the weights themselves (see :func:`check_config_against_file`).
ROPE_TABLES_FREE_BYTES = 64 << 20
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def check_config_against_file(cfg: ModelConfig, weights: str | os.PathLike) -> None:
    """Checks a checkpoint's config against the tensors its safetensors file holds.

    Reads only the file's header (names and shapes), so a crafted or damaged
    ``config.json`` is refused before anything is built from it: the layer count, the
    vocabulary and the width must be those of the stored tensors, the routers must sit in
    exactly the config's MoE layers (``n_experts``, ``dense_layers``), and the RoPE tables
    ``max_seq_len`` asks for (2 x max_seq_len x head_dim float32) may not exceed the
    weights' own size (beyond :data:`ROPE_TABLES_FREE_BYTES`).

    Raises:
        ValueError: Naming the field, its value and what the file holds.
    """
    from safetensors import safe_open

    weights = os.fspath(weights)
    try:
        with safe_open(weights, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    layers = {int(m.group(1)) for k in shapes if (m := _LAYER_KEY.match(k))}
    if layers != set(range(len(layers))):
        raise ValueError(f"{weights}: layer indices {sorted(layers)} are not 0..{len(layers) - 1}")
    if cfg.n_layers != len(layers):
        raise ValueError(
            f"config.json n_layers={cfg.n_layers}, but {WEIGHTS_NAME} holds {len(layers)} layers; "
            "the config does not belong to these weights")
    embed = shapes.get("embed.weight")
    if embed is not None and embed != (cfg.vocab_size, cfg.d_model):
        raise ValueError(
            f"config.json vocab_size={cfg.vocab_size}, d_model={cfg.d_model}, but {WEIGHTS_NAME} "
            f"holds an embedding of shape {list(embed)}")
    routers = [shape[0] for k, shape in shapes.items() if k.endswith(".mlp.router.weight") and shape]
    if (cfg.n_experts > 0) != bool(routers) or any(n != cfg.n_experts for n in routers):
        raise ValueError(
            f"config.json n_experts={cfg.n_experts}, but {WEIGHTS_NAME} holds "
            f"{'routers over ' + str(sorted(set(routers))) + ' experts' if routers else 'no MoE router'}")
    router_layers = sorted(int(m.group(1)) for k in shapes
                           if k.endswith(".mlp.router.weight") and (m := _LAYER_KEY.match(k)))
    if routers and router_layers != cfg.moe_layer_indices:
        raise ValueError(
            f"config.json dense_layers={list(cfg.dense_layers)} makes layers {cfg.moe_layer_indices} "
            f"mixtures of experts, but {WEIGHTS_NAME} holds routers in layers {router_layers}")
    rope = 2 * 4 * cfg.max_seq_len * cfg.head_dim
    size = os.path.getsize(weights)
    if rope > max(size, ROPE_TABLES_FREE_BYTES):
        raise ValueError(
            f"config.json max_seq_len={cfg.max_seq_len} asks for {_fmt_bytes(rope)} of RoPE tables, "
            f"more than the {_fmt_bytes(size)} of weights in {WEIGHTS_NAME}: refused as damaged or "
            "crafted. max_seq_len only sizes that cache (longer inputs still work, the tables "
            "grow on demand): lower it")


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
