"""The C library behind the CPU's noisy HyperClone (kernels/csrc/hyperclone_cpu.c).

It must give the torch reference's bits (test_kernels.py compares whole tensors through
``_hyperclone_cpu``, with and without it), be found and used where a C compiler is,
refuse itself when its bits differ, and fall back to the numpy path, warned, when it
cannot be built.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from growkit.kernels import cpu_ext
from growkit.kernels.hyperclone import _hyperclone_cpu, naive_hyperclone
from growkit.kernels.noise import noise_divisor, seed_keys

HAS_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """library() rebuilt into an empty cache directory; the cached one restored afterwards."""
    monkeypatch.setenv("GROWKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("GROWKIT_CPU_EXT", raising=False)
    cpu_ext.library.cache_clear()
    yield tmp_path
    cpu_ext.library.cache_clear()


def test_the_library_is_built_and_used_where_a_compiler_is(fresh_library, monkeypatch):
    if not HAS_CC:
        pytest.skip("no C compiler on this machine: growkit uses the numpy path (tested in test_kernels.py)")
    lib = cpu_ext.library()
    assert lib is not None, "a C compiler is here but the library was not built"
    built = list((fresh_library / "cpu_ext").glob("hyperclone_cpu-*.so"))
    assert len(built) == 1 and not list((fresh_library / "cpu_ext").glob(".*tmp"))  # atomic: no leftovers
    mtime = built[0].stat().st_mtime_ns
    cpu_ext.library.cache_clear()
    assert cpu_ext.library() is not None and built[0].stat().st_mtime_ns == mtime  # cached, not rebuilt
    for dtype in (torch.float32, torch.bfloat16):
        assert cpu_ext.supports(dtype)

    calls = []
    real = cpu_ext.noise_rows
    monkeypatch.setattr(cpu_ext, "noise_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = torch.randn(20, 12)
    out = _hyperclone_cpu(w, 2, 2, noise_std=1e-2, noise="zero_sum", seed=5, divide=True)
    assert calls, "the noisy CPU path did not call the library"
    assert torch.equal(out, naive_hyperclone(w, 2, 2, noise_std=1e-2, noise="zero_sum", seed=5))


@pytest.mark.parametrize("mode,s", [("pair", 2), ("independent", 1), ("independent", 3), ("zero_sum", 3),
                                    ("zero_sum", 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("start", [0, 6, (1 << 34) - 30, (1 << 40) + 3])
@pytest.mark.parametrize("divisor", [1, 3])
@pytest.mark.parametrize("row_blocks", [1, 3])
def test_rows_match_the_spec_at_any_global_index(mode, s, dtype, start, divisor, row_blocks):
    """Row groups that start unaligned and cross a change of the hash's high word (2**34),
    from strided source rows, divided (by 3: not a power of two) or not, into one row of
    blocks or three, 2 rows further apart than they fill (as in a taller output)."""
    lib = cpu_ext.library()
    if lib is None or not cpu_ext.supports(dtype):
        pytest.skip("no C library here (no compiler, or no _Float16): the numpy path is tested instead")
    gen = torch.Generator().manual_seed(start % 1000 + s)
    rows, I = 4, 9
    src = (torch.randn(rows, I + 3, generator=gen) * 3).to(dtype)[:, 1:I + 1]
    assert not src.is_contiguous() and src.stride(1) == 1
    k0, k1 = seed_keys(2**40 + 17)
    nd = noise_divisor(0.05, s, mode == "zero_sum")
    got = torch.full((row_blocks, rows + 2, s, I), float("nan"), dtype=dtype)[:, :rows]
    want = torch.stack([cpu_ext.reference_rows(src, divisor, s, mode, start + a * got.stride(0), k0, k1, nd)
                        for a in range(row_blocks)])
    cpu_ext.noise_rows(lib, src, divisor, s, mode, start, k0, k1, nd, got)
    assert torch.equal(got, want)


def test_a_library_with_other_bits_is_refused(fresh_library, monkeypatch, tmp_path):
    """A planted bug in the C source (draws off by one) fails the load-time check: warned, not used."""
    if not HAS_CC:
        pytest.skip("no C compiler on this machine")
    bad = tmp_path / "bad.c"
    bad.write_text(cpu_ext.SOURCE.read_text().replace("2 * (int32_t)u[i] - 255", "2 * (int32_t)u[i] - 253"))
    assert bad.read_text() != cpu_ext.SOURCE.read_text()
    monkeypatch.setattr(cpu_ext, "SOURCE", bad)
    with pytest.warns(RuntimeWarning, match="differs from the reference"):
        assert cpu_ext.library() is None
    assert not cpu_ext.supports(torch.float32)
    w = torch.randn(6, 8)  # and growth still gives the reference's bits, through numpy
    kw = dict(noise_std=1e-2, noise="zero_sum", seed=2, divide=True)
    assert torch.equal(_hyperclone_cpu(w, 2, 2, **kw), naive_hyperclone(w, 2, 2, **kw))


def test_no_compiler_or_switched_off_falls_back_to_numpy(fresh_library, monkeypatch):
    monkeypatch.setenv("GROWKIT_CPU_EXT", "0")
    assert cpu_ext.library() is None
    cpu_ext.library.cache_clear()
    monkeypatch.delenv("GROWKIT_CPU_EXT")
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(cpu_ext.shutil, "which", lambda name: "/bin/false" if name == "false" else None)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert cpu_ext.library() is None
    assert not list(fresh_library.rglob("*.so"))  # nothing half-written left behind
    w = torch.randn(7, 12, dtype=torch.bfloat16)
    kw = dict(noise_std=1e-2, noise="independent", seed=9, divide=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not per call
        assert torch.equal(_hyperclone_cpu(w, 3, 2, **kw), naive_hyperclone(w, 3, 2, **kw))


def test_noise_rows_refuses_buffers_of_the_wrong_layout():
    lib = cpu_ext.library()
    if lib is None:
        pytest.skip("no C library here")
    w = torch.randn(4, 6)
    with pytest.raises(ValueError, match="contiguous"):  # columns not contiguous
        cpu_ext.noise_rows(lib, w.t().contiguous().t(), 2, 2, "pair", 0, 1, 2, 3.0, torch.empty(4, 2, 6))
    with pytest.raises(ValueError, match="contiguous"):  # the wrong output size
        cpu_ext.noise_rows(lib, w, 2, 2, "pair", 0, 1, 2, 3.0, torch.empty(4, 2, 5))
    with pytest.raises(ValueError, match="one dtype"):
        cpu_ext.noise_rows(lib, w, 2, 2, "pair", 0, 1, 2, 3.0, torch.empty(4, 2, 6, dtype=torch.bfloat16))
    overlapping = torch.empty(72).as_strided((2, 4, 2, 6), (24, 12, 6, 1))  # rows of blocks 24 apart, 48 long
    with pytest.raises(ValueError, match="non-overlapping"):
        cpu_ext.noise_rows(lib, w, 2, 2, "pair", 0, 1, 2, 3.0, overlapping)
