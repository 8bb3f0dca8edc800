"""The CPU's noisy HyperClone as a tiny C library, compiled on first use and cached.

``csrc/hyperclone_cpu.c`` does per row what ``hyperclone._hyperclone_cpu``'s numpy path
does in six passes (hash, noise, add, round, store): one pass, in cache. It is built with
the system's C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into
``$GROWKIT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/growkit``, else ``~/.cache/growkit``),
under a name keyed by the source, the flags, the compiler and the CPU, and loaded with
``ctypes`` (whose foreign calls release the GIL, so the caller's threads run chunks side
by side). Nothing is needed at install time; with no compiler, or ``GROWKIT_CPU_EXT=0``,
growkit keeps the numpy path, whose bits are the same.

NOTE: a plain C library through ctypes, not a torch C++ extension
(``torch.utils.cpp_extension.load_inline``): the kernel needs no torch headers, it
compiles in about 0.3 s instead of a minute of torch's headers on this 2-core machine,
and one file needs no ninja. ``-march=native`` lets the compiler vectorize the hash and
the division; the bits do not depend on the vector width (integer ops, IEEE division and
add), and a library is checked against the torch reference on a grid of every mode and
output dtype each time it is loaded (a compiler told ``-ffast-math`` by ``$CFLAGS`` would
fail that check: this module never passes ``$CFLAGS``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from growkit.files import atomic_write

SOURCE = Path(__file__).with_name("csrc") / "hyperclone_cpu.c"
FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off")
MODES = {"pair": 0, "independent": 1, "zero_sum": 2}
OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def cache_dir() -> Path:
    if os.environ.get("GROWKIT_CACHE_DIR"):
        return Path(os.environ["GROWKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "growkit"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build(cc: str, target: Path) -> None:
    def compile_to(tmp: str) -> None:
        for arch in (("-march=native",), ()):  # some compilers (or CPUs) have no -march=native
            cmd = [cc, *FLAGS, *arch, str(SOURCE), "-o", tmp]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode == 0:
                return
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()[-500:]}")

    atomic_write(target, compile_to)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    fn = lib.growkit_hyperclone_noise_rows
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint32,
                   ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    lib.growkit_supports_f16.restype = ctypes.c_int
    lib.growkit_supports_f16.argtypes = []
    return lib


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded library, or None where it cannot be built or fails its check (warned once)."""
    if os.environ.get("GROWKIT_CPU_EXT", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256("\0".join(
            [SOURCE.read_text(encoding="utf-8"), " ".join(FLAGS), cc, version, platform.machine(), _cpu_flags()]
        ).encode()).hexdigest()[:20]
        path = cache_dir() / "cpu_ext" / f"hyperclone_cpu-{key}.so"
        if not path.exists():
            _build(cc, path)
        lib = _load(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"growkit: the C library for the CPU's noisy HyperClone could not be built ({e}); "
                      "using the numpy path (same bits, slower)", RuntimeWarning, stacklevel=2)
        return None
    mismatch = _self_check(lib)
    if mismatch:
        warnings.warn(f"growkit: the C library {path} differs from the reference ({mismatch}); "
                      "using the numpy path", RuntimeWarning, stacklevel=2)
        return None
    return lib


def supports(dtype: torch.dtype) -> bool:
    lib = library()
    if lib is None or dtype not in OUT_KINDS:
        return False
    return dtype != torch.float16 or bool(lib.growkit_supports_f16())


def noise_rows(lib: ctypes.CDLL, src: torch.Tensor, divisor: int, s: int, mode: str, start: int, k0: int, k1: int,
               noise_div: float, out: torch.Tensor) -> None:
    """Writes ``out`` [R, rows, s, I] (or [rows, s, I]: R = 1) from the source rows ``src``
    [rows, I] (of ``out``'s dtype, each row contiguous, any row stride), each read once:
    ``out[a, r, b] = src[r] / divisor + noise`` of the elements whose global output indices
    are ``start + a * out.stride(0) + r * s * I + b * I + i``, the division and the add in
    float32 as in ``naive_hyperclone``. ``out[a]`` must be contiguous and the R rows of
    blocks must not overlap: they are the rows of blocks of one contiguous output, whose
    element offsets are their global indices."""
    rows, I = src.shape
    if out.dim() == 3:
        out = out.unsqueeze(0)
    R = out.shape[0]
    if not (src.dtype == out.dtype and (src.stride(1) == 1 or I == 1) and out.dim() == 4 and out[0].is_contiguous()
            and out[0].numel() == rows * s * I and (R == 1 or out.stride(0) >= rows * s * I)):
        raise ValueError("noise_rows: src must be [rows, I] with contiguous rows and out [R, rows, s, I] with "
                         "contiguous, non-overlapping rows of blocks, both of one dtype")
    rc = lib.growkit_hyperclone_noise_rows(src.data_ptr(), src.stride(0), float(divisor), rows, I, s, MODES[mode],
                                           start, R, out.stride(0), k0, k1, noise_div, out.data_ptr(),
                                           OUT_KINDS[out.dtype])
    if rc != 0:
        raise MemoryError("growkit_hyperclone_noise_rows failed (arguments refused or out of memory)")


def reference_rows(src: torch.Tensor, divisor: int, s: int, mode: str, start: int, k0: int, k1: int,
                   noise_div: float) -> torch.Tensor:
    """What :func:`noise_rows` writes, in torch ([rows, s, I] of ``src``'s dtype): the spec of
    ``naive_hyperclone``'s noisy rows, one element index at a time."""
    from .noise import uniform_int_torch

    rows, I = src.shape
    w = src.to(torch.float32)
    if divisor != 1:
        w = w / torch.tensor(float(divisor), dtype=torch.float32)
    d = start + torch.arange(rows)[:, None, None] * (s * I) + torch.arange(s)[:, None] * I + torch.arange(I)
    c = uniform_int_torch(d, k0, k1)
    if mode == "pair":  # block 1 gets minus the draw at block 0's index
        c = torch.cat([c[:, :1], -c[:, :1]], dim=1)
    elif mode == "zero_sum":
        c = s * c - c.sum(dim=1, keepdim=True)
    return (w[:, None, :] + c.to(torch.float32) / torch.tensor(noise_div, dtype=torch.float32)).to(src.dtype)


def _self_check(lib: ctypes.CDLL) -> str | None:
    """Compares the library with the torch reference on small grids; None when every bit agrees.

    The grids start past 2**34 elements (where the hash's high word changes mid-row) and at
    an index that is not a multiple of 4, for each mode and dtype, with the source divided
    (by 3: not a power of two) and not, its rows strided, into two rows of blocks a row
    apart more than they fill.
    """
    gen = torch.Generator().manual_seed(0)
    k0, k1 = 0x12345678, 0x9ABCDEF0
    for mode, s in (("pair", 2), ("independent", 3), ("zero_sum", 3)):
        for dtype in OUT_KINDS:
            if dtype == torch.float16 and not lib.growkit_supports_f16():
                continue
            for divisor in (1, 3):
                rows, I, start = 3, 7, (1 << 34) - 22  # row 1 crosses 2**34; start % 4 == 2
                src = torch.randn(rows, I + 5, generator=gen).to(dtype)[:, 2:I + 2]  # strided rows
                got = torch.full((2, rows + 1, s, I), float("nan"), dtype=dtype)[:, :rows]
                step = got.stride(0)
                want = torch.stack([reference_rows(src, divisor, s, mode, start + a * step, k0, k1, 37.5)
                                    for a in range(2)])
                noise_rows(lib, src, divisor, s, mode, start, k0, k1, 37.5, got)
                bits = torch.int16 if dtype != torch.float32 else torch.int32
                if not torch.equal(got.view(bits), want.view(bits)):
                    return f"mode {mode}, {dtype}, divisor {divisor}"
    return None
