"""Leave the models as they were: what a check touches is snapshotted and restored.

A check runs forward passes (which overwrite the per-forward attributes of MoE layers,
``last_router_logits`` and ``last_aux_loss``), may switch modes, enable gradients and run
a backward pass. :class:`ModelGuard` records the train/eval flag of every module, the
``requires_grad`` flag and the ``.grad`` tensor of every parameter and those attributes,
and puts them all back, so a training loop around a check sees no difference (its
accumulated gradients are the same tensor objects with the same values).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

# Attributes a forward pass overwrites (MoE layers of growkit.models.Transformer).
TRANSIENT_ATTRS = ("last_router_logits", "last_aux_loss")


class ModelGuard:
    """Snapshot of one model's mutable state; ``restore()`` puts it back.

    Usable as a context manager. Parameter values are not copied: checks never write
    them (the tests compare them).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]
        self.params = list(model.parameters())
        self.requires_grad = [p.requires_grad for p in self.params]
        self.grads = [p.grad for p in self.params]
        self.attrs = [
            (m, a, getattr(m, a)) for m in model.modules() for a in TRANSIENT_ATTRS if hasattr(m, a)
        ]

    def restore(self) -> None:
        for m, mode in self.modes:
            m.training = mode
        for p, rg, g in zip(self.params, self.requires_grad, self.grads):
            p.grad = g
            p.requires_grad_(rg)
        for m, a, v in self.attrs:
            setattr(m, a, v)

    def __enter__(self) -> "ModelGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for an empty model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextmanager
def on_device(models: list[nn.Module], device: torch.device | str | None) -> Iterator[torch.device]:
    """Move ``models`` to ``device`` for the block, then back to where each was.

    ``device=None`` uses the last model's device (the grown model, in the checks).
    Yields the device used.
    """
    unique = list({id(m): m for m in models}.values())
    homes = [model_device(m) for m in unique]
    target = torch.device(device) if device is not None else homes[-1]
    try:
        for m, home in zip(unique, homes):
            if home != target:
                m.to(target)
        yield target
    finally:
        for m, home in zip(unique, homes):
            if model_device(m) != home:
                m.to(home)
