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
    """The device of the model's first parameter (or buffer) that is not on meta: a model
    whose layers are loaded while they run (``verify.layerwise``) computes there. Meta for
    a model wholly on meta; CPU for an empty model."""
    tensors = list(model.parameters()) + list(model.buffers())
    for t in tensors:
        if not t.is_meta:
            return t.device
    return tensors[0].device if tensors else torch.device("cpu")


def _devices(model: nn.Module) -> set[torch.device]:
    return {t.device for t in model.parameters()} | {t.device for t in model.buffers() if t.numel()}


def check_device(device, what: str = "device") -> torch.device | None:
    """``device`` as a ``torch.device`` a check can run on, or None; ValueError otherwise.

    Refused up front, before any model is moved: strings torch does not know, ``"meta"``
    (it holds no values: moving a model there and back would lose its weights), and
    devices this machine does not have (``"cuda"`` without CUDA, ``"cuda:3"`` with two
    GPUs, ``"mps"`` off a Mac).
    """
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, torch.device)):
        raise ValueError(f"{what} must be a device string such as 'cpu' or 'cuda', a torch.device "
                         f"or None (the new model's device), got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{what}={device!r} is not a device torch knows; use 'cpu', 'cuda', "
                         "'cuda:N' or None (the new model's device)") from None
    if dev.type == "meta":
        raise ValueError(f"{what}={device!r}: the meta device holds no values, so the checks "
                         "cannot run there (and moving the models there would lose their "
                         "weights); use 'cpu' or 'cuda'")
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}={device!r} but CUDA is not available here; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what}={device!r} but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"{what}={device!r}: no {dev.type} device is available here; use 'cpu'")
    return dev


@contextmanager
def on_device(models: list[nn.Module], device: torch.device | str | None) -> Iterator[torch.device]:
    """Move ``models`` to ``device`` for the block, then back to where each was.

    ``device=None`` uses the last model's device (the grown model, in the checks).
    Yields the device used. Refuses (ValueError naming ``device``, before moving anything)
    devices the checks cannot run on (:func:`check_device`), models on the meta device,
    and models spread over several devices that would have to move. Every model is back
    on its device afterwards, whatever raised in the block or in a move.
    """
    unique = list({id(m): m for m in models}.values())
    homes = [model_device(m) for m in unique]
    target = check_device(device)
    if target is None:
        target = check_device(homes[-1], "device (None: the new model's device)")
    for m, home in zip(unique, homes):
        spread = _devices(m)
        if any(d.type == "meta" for d in spread):
            raise ValueError(f"a {type(m).__name__} to verify has tensors on the meta device (no "
                             "values); load its weights first")
        if home != target and len(spread) > 1:
            raise ValueError(
                f"device={str(target)!r}: a {type(m).__name__} to verify is spread over "
                f"{sorted(map(str, spread))}; it cannot be moved and restored as one: pass "
                "device=None with both models on one device")
    try:
        for m, home in zip(unique, homes):
            if home != target:
                m.to(target)
        yield target
    finally:
        errors = []
        for m, home in zip(unique, homes):
            try:
                if any(d != home for d in _devices(m)):
                    m.to(home)
            except Exception as e:  # noqa: BLE001 - restore the others, then report
                errors.append(e)
        if errors:
            raise errors[0]
