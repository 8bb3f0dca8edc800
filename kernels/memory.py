"""CPU output buffers backed by transparent huge pages where the kernel offers them.

(The figures below are an earlier session's; on the same VM in THP mode ``always`` the
advice later cost up to 3.4x, and once saved 20%: see :func:`empty_cpu`, which now asks
only in mode ``madvise``.)

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
import functools
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


THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.lru_cache(maxsize=1)
def thp_mode() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or None;
    read once (every growth output is allocated through :func:`empty_cpu`)."""
    try:
        with open(THP_ENABLED, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def empty_cpu(shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, with huge pages where the kernel
    gives them only when asked (THP mode ``madvise``).

    NOTE: in mode ``always`` the kernel already backs large buffers with huge pages when it
    has them at hand, and advising them as well only adds the synchronous defrag that
    ``defrag=madvise`` (the usual default) applies to advised regions: measured with
    ``python bench/growth_speed.py`` on this project's VM (THP ``always``, defrag
    ``madvise``), allocating and writing the 6.5 GiB of a 1B-parameter model grown x2
    took 2.16 s plain and 7.64 s advised (``grow_width`` itself moved within the noise:
    4.86 s advised, 4.94 s not, one run each); two runs later the same day, 4.13 s plain
    and 3.36 s advised, then 3.83 s and 4.76 s: the VM's memory state decides more than
    the advice does. The module docstring's 2x gain
    was measured on the same VM an earlier day, in THP mode ``madvise`` or with a fresher
    memory map; which one, that session did not record.
    """
    out = torch.empty(shape, dtype=dtype)
    if thp_mode() == "madvise":
        advise_huge_pages(out)
    return out


# --------------------------------------------------------------------------------------
# How much memory there is, before allocating (the growth operators' size checks)
# --------------------------------------------------------------------------------------
def _meminfo_available() -> int | None:
    """MemAvailable of /proc/meminfo, capped by a cgroup v2/v1 memory limit (containers)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_file, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            avail = min(avail, max(0, int(limit) - usage))
        break
    return avail


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device``; None when it cannot be told.

    CPU: ``MemAvailable`` from ``/proc/meminfo`` (no psutil needed), within the cgroup's
    limit; CUDA: ``torch.cuda.mem_get_info`` (free bytes). Other devices and other
    operating systems: None (no check).
    """
    dev = torch.device(device)
    if dev.type == "cpu":
        return _meminfo_available()
    if dev.type == "cuda" and torch.cuda.is_available():
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except Exception:  # noqa: BLE001 - an unusable device: let the allocation report it
            return None
    return None


def format_bytes(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


SMALL_BYTES = 64 << 20  # results up to this size are not checked


def check_memory(nbytes: int, device: torch.device | str, what: str) -> None:
    """ValueError when a result of ``nbytes`` cannot fit in ``device``'s free memory.

    Args:
        nbytes: estimated size of what is about to be allocated.
        device: where it would go.
        what: the argument responsible, e.g. ``"extra_layers=1000000"``; the message
            starts with it.
    """
    if nbytes <= SMALL_BYTES:
        return  # not worth a look at /proc/meminfo (growth makes many small tensors)
    avail = available_memory(device)
    if avail is not None and nbytes > avail:
        raise ValueError(
            f"{what}: the result needs about {format_bytes(nbytes)} but only "
            f"{format_bytes(avail)} is available on {torch.device(device)}; use a smaller value "
            "(or free memory / use a larger machine)")


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def stream_friendly_malloc(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold, so that freed tensors go back to the OS at once.

    NOTE: glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed,
    after which tensors below it come from the heap, where freed space stays resident and
    fragments. Streaming growth and layerwise verification allocate and free a tensor or a
    layer at a time: on a 12-layer checkpoint (0.25B parameters grown x2) the resident
    memory after the two forward passes of ``verify --layerwise`` was 1.48 GB with the
    dynamic threshold and 0.58 GB with a fixed 1 MiB one. Process-wide; for the command
    line tools (``growkit grow``, ``growkit verify``). Returns whether it took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # not glibc
        return False


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim``).

    NOTE: tensors under the mmap threshold (activations of a short probe: a [2, 32, 2048]
    float32 hidden state is 0.5 MB) come from the heap, where freed space interleaved with
    live blocks stays resident: after the two forward passes of ``verify --layerwise`` on
    the bench checkpoint (bench/grow_checkpoint.py) about 100 MB of the resident memory was
    such free space, released by this call. Cheap (milliseconds); called after each
    decoder layer and between the phases of the layerwise checks. Returns whether it ran
    (glibc only).
    """
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            try:
                _malloc_trim = ctypes.CDLL(None).malloc_trim
            except (OSError, AttributeError):  # not glibc
                pass
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True


_malloc_trim = None
