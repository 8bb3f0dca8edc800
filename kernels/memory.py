"""CPU output buffers backed by transparent huge pages where the kernel offers them.

Writing a freshly allocated tensor makes the kernel fault in and zero every 4 KiB page,
and on a virtual machine each fault is expensive. Measured with ``python
bench/growth_speed.py`` on this project's 2-core VM: allocating and writing the 6.5 GiB
of a 1B-parameter model grown x2 (bf16) took 4.55 s with plain ``torch.empty`` and 2.31 s
with ``madvise(MADV_HUGEPAGE)`` on each buffer first (2 MiB pages: 512 times fewer
faults); best of 3 each, and single runs varied by up to 2x. Growth writes every byte of
the grown model once, so this is much of its time on a CPU. ``THP_MEM_ALLOC_ENABLE=1``
does the same for every torch allocation, but torch reads it once at startup; this asks
for the growth outputs alone.
"""

from __future__ import annotations

import ctypes
import sys

import torch

MADV_HUGEPAGE = 14
HUGE_PAGE = 1 << 21
MIN_BYTES = 4 * HUGE_PAGE  # smaller buffers gain little and may not span one huge page


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask for huge pages behind the whole 2 MiB pages of a CPU tensor's memory.

    Only useful before the memory is first written. Returns whether the kernel accepted
    it; any failure (another OS, THP disabled, an old kernel) leaves the tensor as it was.
    """
    nbytes = tensor.numel() * tensor.element_size()
    if _madvise is None or tensor.device.type != "cpu" or nbytes < MIN_BYTES:
        return False
    begin = tensor.data_ptr()
    first = (begin + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    last = (begin + nbytes) // HUGE_PAGE * HUGE_PAGE
    return last > first and _madvise(first, last - first, MADV_HUGEPAGE) == 0


def empty_cpu(shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, with huge pages where available."""
    out = torch.empty(shape, dtype=dtype)
    advise_huge_pages(out)
    return out
