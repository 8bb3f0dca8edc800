"""The three fused kernels against their torch references, through the Triton interpreter."""

import math
import os

import pytest
import torch

from growkit.kernels import (
    block_divergence,
    hyperclone,
    layer_diff_stats,
    naive_block_divergence,
    naive_hyperclone,
    naive_layer_diff_stats,
)
from growkit.kernels import backend as backend_mod
from growkit.kernels import memory
from growkit.kernels.hyperclone import _hyperclone_cpu, _hyperclone_triton
from growkit.kernels.noise import STD_C, seed_keys, uniform_bytes_grid_np, uniform_int_torch
from growkit.kernels.paired_diff import paired_diff_triton

INTERPRET = backend_mod.interpreter_enabled() and backend_mod.HAS_TRITON
needs_triton = pytest.mark.skipif(not INTERPRET, reason="needs triton with TRITON_INTERPRET=1 (set by conftest)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

if INTERPRET:
    import triton
    import triton.language as tl

    from growkit.kernels.noise import uniform_int

    @triton.jit
    def _eval_uniform_int(g_ptr, out_ptr, n, k0, k1, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(g_ptr + offs, mask=m)
        tl.store(out_ptr + offs, uniform_int(g, k0, k1), mask=m)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern view, so that equality is bitwise (and NaN != anything)."""
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert not torch.isnan(a.float()).any(), "unwritten (NaN-poisoned) or NaN elements"
    assert torch.equal(bits(a.contiguous()), bits(b.contiguous()))


def rand_weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.5 + 0.1).to(dtype)


# --------------------------------------------------------------------------------------
# hyperclone
# --------------------------------------------------------------------------------------
SHAPES_REPEATS = [
    ((37, 53), 2, 3),
    ((37, 53), 3, 2),
    ((37, 53), 1, 1),
    ((37,), 3, 1),
    ((3, 7, 9), 2, 2),
    ((5, 300), 2, 4),  # wider than one 256-column tile
]
NOISES = [(0.0, "zero_sum"), (1e-2, "zero_sum"), (1e-2, "independent")]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,r_o,r_i", SHAPES_REPEATS)
@pytest.mark.parametrize("noise_std,noise", NOISES)
def test_hyperclone_triton_matches_reference_bitwise(poison_empty, dtype, shape, r_o, r_i, noise_std, noise):
    w = rand_weight(shape, dtype)
    kw = dict(noise_std=noise_std, noise=noise, seed=11)
    out = hyperclone(w, r_o, r_i, backend="triton", **kw)
    ref = naive_hyperclone(w, r_o, r_i, **kw)
    assert_bitwise_equal(out, ref)


# rows of 4-aligned length take the numpy byte path; the others the spec's slow path
CPU_SHAPES_REPEATS = SHAPES_REPEATS + [((33, 48), 2, 2), ((5, 9, 64), 2, 3), ((21, 36), 3, 2), ((16, 40), 1, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,r_o,r_i", CPU_SHAPES_REPEATS)
@pytest.mark.parametrize("noise_std,noise", NOISES)
def test_hyperclone_cpu_path_matches_reference_bitwise(poison_empty, dtype, shape, r_o, r_i, noise_std, noise):
    w = rand_weight(shape, dtype)
    before = w.clone()
    kw = dict(noise_std=noise_std, noise=noise, seed=11, divide=True)
    ref = naive_hyperclone(w, r_o, r_i, **kw)
    # default chunks and threads, one row a chunk on one thread, 5-row chunks on 3 threads;
    # the C library (kernels/csrc, see test_cpu_ext.py) and the numpy path it replaces
    for rows, workers in [(None, None), (1, 1), (5, 3)]:
        for use_ext in (True, False):
            out = _hyperclone_cpu(w, r_o, r_i, rows_per_chunk=rows, workers=workers, use_ext=use_ext, **kw)
            assert_bitwise_equal(out, ref)
    assert_bitwise_equal(w, before)  # the source is never written (float32's .float() is itself)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("noise_std", [0.0, 1e-3])
def test_hyperclone_of_a_parameter_is_a_plain_tensor(backend, noise_std):
    p = torch.nn.Parameter(rand_weight((24, 32), torch.float32))
    out = hyperclone(p, 2, 2, noise_std=noise_std, seed=1, backend=backend)
    assert not out.requires_grad
    assert_bitwise_equal(out, naive_hyperclone(p.detach(), 2, 2, noise_std=noise_std, seed=1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_hyperclone_cpu_path_noncontiguous_views(poison_empty, dtype):
    base = rand_weight((52, 76), dtype)
    for w in [base.t(), base[::2, 4::3], rand_weight((4, 8, 12), dtype).permute(0, 2, 1)]:
        assert not w.is_contiguous()
        kw = dict(noise_std=1e-2, noise="zero_sum", seed=3)
        assert_bitwise_equal(hyperclone(w, 2, 2, backend="torch", **kw), naive_hyperclone(w.contiguous(), 2, 2, **kw))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_hyperclone_noncontiguous_views(poison_empty, dtype):
    base = rand_weight((53, 74), dtype)
    views = [base.t(), base[::2, 1::3], rand_weight((4, 9, 13), dtype).permute(0, 2, 1), base[:, 5]]
    for w in views:
        assert not w.is_contiguous()
        r_i = 1 if w.dim() == 1 else 2
        kw = dict(noise_std=1e-2, noise="zero_sum" if r_i > 1 else "independent", seed=3)
        out = hyperclone(w, 2, r_i, backend="triton", **kw)
        assert_bitwise_equal(out, naive_hyperclone(w.contiguous(), 2, r_i, **kw))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r_o,r_i", [(2, 2), (3, 3), (1, 4)])
def test_hyperclone_without_noise_is_tiled_weight_divided(dtype, r_o, r_i):
    w = rand_weight((37, 53), dtype)
    expected = (w.float() / r_i).to(dtype).repeat(r_o, r_i)
    assert_bitwise_equal(hyperclone(w, r_o, r_i, backend="torch"), expected)
    e3 = rand_weight((3, 5, 7), dtype)
    assert_bitwise_equal(hyperclone(e3, r_o, r_i, backend="torch"), (e3.float() / r_i).to(dtype).repeat(1, r_o, r_i))
    b = rand_weight((37,), dtype)
    assert_bitwise_equal(hyperclone(b, r_o, 1, backend="torch"), b.repeat(r_o))
    # divide=False tiles an embedding table along d unchanged
    assert_bitwise_equal(hyperclone(w, 1, r_i, divide=False, backend="torch"), w.repeat(1, r_i))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("r_i", [2, 3, 4])
def test_zero_sum_noise_preserves_the_function(backend, r_i):
    torch.manual_seed(0)
    w = rand_weight((64, 48), torch.float32)
    x = torch.randn(48, 16, dtype=torch.float64)
    x_tiled = x.repeat(r_i, 1)
    exact = (w.double() @ x).repeat(2, 1)
    zs = hyperclone(w, 2, r_i, noise_std=1e-2, noise="zero_sum", seed=1, backend=backend)
    ind = hyperclone(w, 2, r_i, noise_std=1e-2, noise="independent", seed=1, backend=backend)
    base = hyperclone(w, 2, r_i, backend=backend)
    # the noise is really there
    assert (zs - base).abs().max() > 1e-3
    # and sums to zero within each row of blocks, up to float32 rounding of the weights
    noise_sum = (zs.double() - base.double()).view(128, r_i, 48).sum(dim=1)
    assert noise_sum.abs().max() < r_i * 4 * torch.finfo(torch.float32).eps * w.abs().max()
    err_zs = (zs.double() @ x_tiled - exact).abs().max()
    err_ind = (ind.double() @ x_tiled - exact).abs().max()
    assert err_zs < 1e-5 * exact.abs().max()
    assert err_ind > 100 * err_zs  # independent noise really changes the function


@pytest.mark.parametrize("noise", ["zero_sum", "independent"])
@pytest.mark.parametrize("r_i", [2, 3, 5])
@pytest.mark.parametrize("noise_std", [1e-5, 1e-2])
def test_noise_std_is_delivered(noise, r_i, noise_std):
    w = rand_weight((128, 96), torch.float32)
    out = hyperclone(w, 2, r_i, noise_std=noise_std, noise=noise, seed=7, backend="torch")
    base = hyperclone(w, 2, r_i, backend="torch")
    measured = (out.double() - base.double()).std().item()
    assert abs(measured / noise_std - 1) < 0.10, measured


def test_zero_sum_noise_is_zero_when_in_repeat_is_one():
    w = rand_weight((20, 30), torch.float32)
    assert torch.equal(hyperclone(w, 3, 1, noise_std=0.1, noise="zero_sum"), hyperclone(w, 3, 1))
    assert not torch.equal(hyperclone(w, 3, 1, noise_std=0.1, noise="independent"), hyperclone(w, 3, 1))


def test_noise_depends_on_seed_only_through_the_seed():
    w = rand_weight((20, 30), torch.float32)
    a = hyperclone(w, 2, 2, noise_std=0.1, seed=1, backend="torch")
    assert torch.equal(a, hyperclone(w, 2, 2, noise_std=0.1, seed=1, backend="torch"))
    assert not torch.equal(a, hyperclone(w, 2, 2, noise_std=0.1, seed=2, backend="torch"))
    assert not torch.equal(a, hyperclone(w, 2, 2, noise_std=0.1, seed=2**40 + 1, backend="torch"))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hyperclone_independent_of_block_size(poison_empty, dtype):
    w = rand_weight((37, 56), dtype)
    kw = dict(noise_std=1e-2, noise="zero_sum", seed=5, divide=True)
    # tile shapes, and one hash per 4 elements (4-aligned rows) or one per element
    outs = [
        _hyperclone_triton(w, 2, 3, block_o=bo, block_i=bi, aligned4=a4, **kw)
        for bo, bi, a4 in [(4, 16, True), (8, 32, False), (16, 64, True), (64, 64, False), (2, 256, True), (8, 8, True)]
    ]
    # the torch reference in chunks of 1 and 5 rows
    outs += [naive_hyperclone(w, 2, 3, rows_per_chunk=r, noise_std=1e-2, noise="zero_sum", seed=5) for r in (1, 5)]
    outs += [_hyperclone_triton(w, 2, 2, block_o=8, block_i=32, aligned4=a4, **kw) for a4 in (True, False)]
    assert_bitwise_equal(outs[-1], outs[-2])  # the pair rule, both ways of hashing
    outs = outs[:-2]
    for o in outs[1:]:
        assert_bitwise_equal(o, outs[0])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("noise_std", [0.0, 3e-3])
def test_bfloat16_rounds_to_nearest_even(poison_empty, backend, noise_std):
    # w / 3 in float32 is rarely a bfloat16: the cast decides. The interpreter's own cast
    # truncates, so the kernel rounds by hand; both backends must round to nearest even.
    wb = rand_weight((64, 64), torch.bfloat16)
    out = hyperclone(wb, 1, 3, noise_std=noise_std, seed=9, backend=backend)
    y = naive_hyperclone(wb.float(), 1, 3, noise_std=noise_std, seed=9)  # float32 values
    rne = y.to(torch.bfloat16)
    truncated = (y.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    assert not torch.equal(bits(rne), bits(truncated))  # the test can tell them apart
    assert_bitwise_equal(out, rne)


@needs_triton
def test_noise_hash_matches_for_indices_past_2_to_the_34():
    # one hash serves 4 elements, so the hash index's high word changes at 2**34
    g = torch.tensor([0, 1, 2, 3, 2**31 - 1, 2**32 + 5, 2**34 - 1, 2**34, 2**34 + 3, 2**40 + 123, 2**62 + 7])
    for seed in (0, 12345, 2**40 + 3):
        k0, k1 = seed_keys(seed)
        out = torch.full_like(g, -1000)
        _eval_uniform_int[(1,)](g, out, g.numel(), k0, k1, BLOCK=16)
        assert torch.equal(out, uniform_int_torch(g, k0, k1))
    # the high word matters: index 2**34 + i is not a copy of index i
    c = uniform_int_torch(torch.arange(2**34, 2**34 + 1000), *seed_keys(0))
    assert not torch.equal(c, uniform_int_torch(torch.arange(1000), *seed_keys(0)))
    assert abs(c.double().std().item() / STD_C - 1) < 0.1


@pytest.mark.parametrize(
    "start,rows,cols,stride",
    [
        (0, 7, 48, 96),
        (4 * 12345, 3, 64, 64),
        (2**34 + 8, 4, 16, 32),  # past the high-word change, aligned: the fast path
        (2**34 - 200, 5, 40, 80),  # straddles it: the spec's path
        (6, 3, 10, 13),  # not 4-aligned: the spec's path
    ],
)
def test_numpy_draws_match_the_spec(start, rows, cols, stride):
    k0, k1 = seed_keys(2**40 + 3)
    u = uniform_bytes_grid_np(start, rows, cols, stride, k0, k1)
    d = start + torch.arange(rows)[:, None] * stride + torch.arange(cols)
    assert u.dtype.name == "uint8" and u.shape == (rows, cols)
    assert torch.equal(torch.from_numpy(u).long() * 2 - 255, uniform_int_torch(d, k0, k1))


def test_draws_are_uniform_and_uncorrelated():
    c = uniform_int_torch(torch.arange(1 << 18), *seed_keys(9)).double()
    u = ((c + 255) / 2).long()
    counts = torch.bincount(u, minlength=256).double()
    expected = c.numel() / 256
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 255 + 6 * math.sqrt(2 * 255)  # 255 degrees of freedom, 6 sigma
    assert abs(c.mean().item()) < 5 * STD_C / math.sqrt(c.numel())
    assert abs(c.std().item() / STD_C - 1) < 0.01
    for lag in (1, 2, 3, 4, 5):  # the four bytes of one hash, and neighbouring hashes
        r = torch.corrcoef(torch.stack([c[:-lag], c[lag:]]))[0, 1].item()
        assert abs(r) < 0.01, (lag, r)


def test_huge_page_advice_only_for_large_cpu_buffers():
    assert not memory.advise_huge_pages(torch.empty(1024))
    big = memory.empty_cpu((3, 1 << 21), torch.float32)  # 24 MiB
    assert big.shape == (3, 1 << 21) and big.dtype == torch.float32
    big.fill_(1.5)
    assert big.sum().item() == 1.5 * big.numel()
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if memory._madvise is not None and os.path.exists(thp) and "[never]" not in open(thp).read():
        assert memory.advise_huge_pages(torch.empty(1 << 23))
        assert memory.thp_mode() in ("always", "madvise")


@pytest.mark.parametrize("mode,advised", [("madvise", True), ("always", False), ("never", False), (None, False)])
def test_empty_cpu_advises_huge_pages_only_where_the_kernel_waits_to_be_asked(monkeypatch, mode, advised):
    calls = []
    monkeypatch.setattr(memory, "thp_mode", lambda: mode)
    monkeypatch.setattr(memory, "advise_huge_pages", lambda t: calls.append(t.numel()) or True)
    out = memory.empty_cpu((4, 1 << 20), torch.bfloat16)
    assert out.shape == (4, 1 << 20) and out.dtype == torch.bfloat16
    assert calls == ([4 << 20] if advised else [])


@needs_triton
@pytest.mark.slow
def test_hyperclone_output_past_2_to_the_31_elements(poison_empty):
    """int64 offsets: an fp16 output of 2**31 + 2**20 elements (4 GB), written in full."""
    O, I = 2**11 + 64, 2**14
    w = rand_weight((O, I), torch.float16)
    out = _hyperclone_triton(w, 32, 2, noise_std=0.0, noise="zero_sum", seed=0, divide=True,
                             block_o=64, block_i=2**14)  # large tiles: few interpreted programs
    assert out.numel() > 2**31
    expected = (w.float() / 2).half()
    o4 = out.view(32, O, 2, I)
    for a in (0, 15, 31):  # block 31 lies wholly past 2**31 elements
        for b in (0, 1):
            assert_bitwise_equal(o4[a, :, b], expected)
    assert not torch.isnan(out.view(-1)[2**31:]).any()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(weight=[[1.0]], out_repeat=2, in_repeat=2), TypeError, "weight"),
        (dict(weight=torch.ones(2, 2, 2, 2), out_repeat=2, in_repeat=2), ValueError, "weight"),
        (dict(weight=torch.ones(2, 2, dtype=torch.float64), out_repeat=2, in_repeat=2), TypeError, "dtype"),
        (dict(weight=torch.ones(2, 2), out_repeat=0, in_repeat=2), ValueError, "out_repeat"),
        (dict(weight=torch.ones(2, 2), out_repeat=2, in_repeat=1.5), TypeError, "in_repeat"),
        (dict(weight=torch.ones(2, 2), out_repeat=True, in_repeat=2), TypeError, "out_repeat"),
        (dict(weight=torch.ones(2), out_repeat=2, in_repeat=2), ValueError, "in_repeat"),
        (dict(weight=torch.ones(2, 2), out_repeat=2, in_repeat=2, noise="gaussian"), ValueError, "noise"),
        (dict(weight=torch.ones(2, 2), out_repeat=2, in_repeat=2, noise_std=-1.0), ValueError, "noise_std"),
        (dict(weight=torch.ones(2, 2), out_repeat=2, in_repeat=2, seed=-1), ValueError, "seed"),
    ],
)
def test_hyperclone_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        hyperclone(**kwargs)


def test_hyperclone_accepts_whole_float_repeats():
    w = rand_weight((3, 4), torch.float32)
    assert torch.equal(hyperclone(w, 2.0, 2.0), hyperclone(w, 2, 2))


# --------------------------------------------------------------------------------------
# layer_diff_stats
# --------------------------------------------------------------------------------------
def grown_pair(L, mid, d, s, dtype, noise=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(L, *mid, d, generator=g).to(dtype)
    new = (old.float().repeat(*([1] * (1 + len(mid))), s) + noise * torch.randn(L, *mid, s * d, generator=g)).to(dtype)
    return old, new


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,mid,d,s", [(3, (5,), 37, 2), (4, (2, 3), 53, 3), (2, (), 300, 1), (5, (7,), 1, 4)])
def test_layer_diff_stats_matches_reference(poison_empty, dtype, L, mid, d, s):
    old, new = grown_pair(L, mid, d, s, dtype)
    got = layer_diff_stats(old, new, backend="triton")
    ref = naive_layer_diff_stats(old, new)
    assert not torch.isnan(got.max_diff).any() and not torch.isnan(got.mean_diff).any()
    assert torch.equal(got.max_diff, ref.max_diff)  # a max is exact in any order
    torch.testing.assert_close(got.mean_diff, ref.mean_diff, rtol=1e-5, atol=0)


@needs_triton
def test_layer_diff_stats_list_and_noncontiguous(poison_empty):
    old, new = grown_pair(4, (6,), 40, 2, torch.float32)
    ref = naive_layer_diff_stats(old, new)
    got_list = layer_diff_stats(list(old), list(new), backend="triton")
    torch.testing.assert_close(got_list.max_diff, ref.max_diff, rtol=0, atol=0)
    # a non-contiguous stacked view: layers interleaved in a bigger buffer, middle dim strided
    big_old = torch.zeros(8, 12, 40)
    big_old[::2, ::2] = old
    big_new = torch.zeros(8, 12, 80)
    big_new[::2, ::2] = new
    got = layer_diff_stats(big_old[::2, ::2], big_new[::2, ::2], backend="triton")
    torch.testing.assert_close(got.max_diff, ref.max_diff, rtol=0, atol=0)
    torch.testing.assert_close(got.mean_diff, ref.mean_diff, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_layer_diff_stats_finds_the_corrupted_layer_and_replica(backend):
    old, _ = grown_pair(5, (4,), 16, 3, torch.float32, noise=0.0)
    new = old.repeat(1, 1, 3)
    assert layer_diff_stats(old, new, backend=backend).max_diff.abs().max() == 0
    new[3, 2, 2 * 16 + 5] += 0.5  # replica 2 of layer 3
    stats = layer_diff_stats(old, new, backend=backend)
    assert stats.max_diff.argmax().item() == 3
    assert stats.max_diff[3].item() == pytest.approx(0.5, rel=1e-6)
    assert stats.mean_diff[3].item() == pytest.approx(0.5 / (4 * 16 * 3), rel=1e-5)
    new[1, 0, 0] = float("nan")
    stats = layer_diff_stats(old, new, backend=backend)
    assert math.isinf(stats.max_diff[1].item()) and math.isinf(stats.mean_diff[1].item())
    assert not torch.isinf(stats.max_diff[[0, 2, 4]]).any()  # the other layers keep finite figures


@needs_triton
def test_layer_diff_stats_independent_of_block_size():
    old, new = grown_pair(3, (33,), 70, 2, torch.float32)
    ref = naive_layer_diff_stats(old, new)
    o3, n3 = old.reshape(3, -1, 70), new.reshape(3, -1, 140)
    # tile shapes, and programs that reduce 1, 3 or all row tiles of a column
    for bp, bd, tiles in [(1, 16, 1), (8, 32, 1), (64, 128, 1), (4, 32, 3), (1, 64, 33), (8, 16, 5)]:
        mx, mean, _ = paired_diff_triton(n3, o3, 2, a_strides=n3.stride(), b_strides=o3.stride(),
                                         n_slots=3, P=33, D=70, with_magnitude=False, block_p=bp, block_d=bd,
                                         tiles_per_prog=tiles)
        assert torch.equal(mx, ref.max_diff)
        torch.testing.assert_close(mean, ref.mean_diff, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "old,new,exc,match",
    [
        (torch.ones(3, 4), torch.ones(2, 8), ValueError, "layers"),
        (torch.ones(3, 4), torch.ones(3, 6), ValueError, "multiple"),
        (torch.ones(3, 2, 4), torch.ones(3, 3, 8), ValueError, "every dim"),
        (torch.ones(3, 4), torch.ones(3, 2, 8), ValueError, "rank"),
        ("x", torch.ones(3, 8), TypeError, "old"),
        ([torch.ones(4), torch.ones(5)], torch.ones(2, 8), ValueError, "one shape"),
    ],
)
def test_layer_diff_stats_bad_input(old, new, exc, match):
    with pytest.raises(exc, match=match):
        layer_diff_stats(old, new)


# --------------------------------------------------------------------------------------
# block_divergence
# --------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups,dim", [((37, 53), 1, 0), ((36, 53), 3, 0), ((64, 48), 2, 0), ((37, 54), 2, 1), ((4, 6, 5), 3, 1), ((2, 3, 8), 4, -1)])
def test_block_divergence_matches_reference(poison_empty, dtype, shape, groups, dim):
    x = rand_weight(shape, dtype)
    got = block_divergence(x, groups, dim, backend="triton")
    ref = naive_block_divergence(x, groups, dim)
    for a, b in zip(got, ref):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_block_divergence_tells_clones_from_diverged(backend):
    w = rand_weight((8, 10), torch.float32)
    clones = w.repeat(3, 1)
    res = block_divergence(clones, 3, 0, backend=backend)
    assert torch.equal(res.max_diff, torch.zeros(3)) and torch.equal(res.mean_diff, torch.zeros(3))
    torch.testing.assert_close(res.magnitude, w.abs().mean().repeat(3))
    clones[8 + 2, 4] += 0.25  # block 1 diverges by one element
    res = block_divergence(clones.t(), 3, 1, backend=backend)  # non-contiguous view, dim 1
    assert res.max_diff[0] == 0 and res.max_diff[2] == 0
    assert res.max_diff[1].item() == pytest.approx(0.25)
    assert res.mean_diff[1].item() == pytest.approx(0.25 / 80)
    clones[16 + 1, 3] = float("nan")  # a NaN in block 2 counts as an infinite difference
    res = block_divergence(clones, 3, 0, backend=backend)
    assert math.isinf(res.max_diff[2].item()) and math.isinf(res.mean_diff[2].item())
    assert math.isfinite(res.max_diff[1].item()) and res.max_diff[0] == 0


def test_block_divergence_bad_input():
    with pytest.raises(ValueError, match="groups"):
        block_divergence(torch.ones(6, 2), 4)
    with pytest.raises(ValueError, match="groups"):
        block_divergence(torch.ones(6, 2), 0)
    with pytest.raises(ValueError, match="dim"):
        block_divergence(torch.ones(6, 2), 2, dim=2)
    with pytest.raises(TypeError, match="x"):
        block_divergence(torch.ones(6, 2, dtype=torch.int64), 2)


# --------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------
def test_backend_env_override(monkeypatch):
    w = rand_weight((4, 4), torch.float32)
    monkeypatch.setenv("GROWKIT_BACKEND", "torch")
    assert not backend_mod.use_triton(w.device)
    monkeypatch.setenv("GROWKIT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GROWKIT_BACKEND"):
        hyperclone(w, 2, 2)
    monkeypatch.setenv("GROWKIT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="cannot run"):
        hyperclone(w, 2, 2)
    monkeypatch.setenv("GROWKIT_BACKEND", "auto")
    assert backend_mod.use_triton(w.device) is False  # CPU tensor, no interpreter: torch path
    assert torch.equal(hyperclone(w, 2, 2), naive_hyperclone(w, 2, 2))
    if backend_mod.HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backend_mod.use_triton(w.device) is True
    assert os.environ["GROWKIT_BACKEND"] == "auto"
