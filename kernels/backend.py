"""Backend dispatch shared by every growkit kernel.

Which implementation runs for a call:

    GROWKIT_BACKEND   tensor on     TRITON_INTERPRET=1   ->  runs
    ---------------   ---------     ------------------       ----
    auto (default)    cuda          -                        Triton kernel (GPU)
    auto              cpu           yes                      Triton kernel (interpreter)
    auto              cpu           no                       torch reference
    triton            cuda / cpu    - / yes                  Triton kernel
    triton            cpu           no                       RuntimeError (cannot run)
    torch             any           -                        torch reference

The interpreter flag is read when a kernel module is imported (``triton.jit`` decides then
whether to build an interpreted function), so tests set it before importing growkit.
"""

from __future__ import annotations

import os

import torch

try:  # triton is a Linux-only dependency; everything has a torch path without it
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    """True when the Triton interpreter runs kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def requested_backend() -> str:
    """The backend named by ``GROWKIT_BACKEND`` (default ``auto``)."""
    value = os.environ.get("GROWKIT_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"GROWKIT_BACKEND={value!r} is not a backend: use one of {', '.join(BACKENDS)}"
        )
    return value


def triton_can_run(device: torch.device) -> bool:
    """Whether a Triton launch on tensors of ``device`` can run here."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def use_triton(device: torch.device, backend: str | None = None) -> bool:
    """Decide between the Triton kernel and the torch reference for one call.

    Args:
        device: device of the call's tensors.
        backend: ``auto``, ``triton`` or ``torch``; ``None`` reads ``GROWKIT_BACKEND``.

    Raises:
        RuntimeError: ``triton`` was asked for where it cannot run.
    """
    backend = requested_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a backend: use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    can_run = triton_can_run(device)
    if backend == "triton" and not can_run:
        why = (
            "triton is not installed (pip install triton, Linux only)"
            if not HAS_TRITON
            else f"tensors are on {device.type!r}; Triton needs CUDA tensors, or "
            "TRITON_INTERPRET=1 set before growkit is imported to run on the CPU"
        )
        raise RuntimeError(f"GROWKIT_BACKEND=triton cannot run: {why}. Use GROWKIT_BACKEND=torch or auto.")
    return can_run
