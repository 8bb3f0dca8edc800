"""Streaming pieces of `growkit grow` / `growkit verify --layerwise`: twin statistics taken
in chunks of rows equal the whole-tensor ones (up to float rounding); layerwise verification
with its embeddings, LM head and gradients in small chunks gives the in-memory verdicts and
still fails a model grown without noise; rows read from a checkpoint; a failed background
write leaves nothing behind."""

from __future__ import annotations

import json
import math

import pytest
import torch

from growkit.cli import main
from growkit.growth.stream import CheckpointReader, ShardWriter
from growkit.verify import layerwise, symmetry
from growkit.verify.stats import twin_layout
from hf_zoo import tiny_model


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("GROWKIT_BACKEND", "torch")


def _reference(t: torch.Tensor, axes) -> tuple[float, float, float]:
    """(max |B_g - B_0|, relative divergence, mean |B_0|) in float64, from the definition."""
    view, rows, inner = twin_layout(t.double(), axes)
    groups = math.prod(g for _, g in axes)
    blocks = view.reshape(rows, groups, inner)
    diff = (blocks[:, 1:] - blocks[:, :1]).abs()
    mag = blocks[:, 0].abs().mean().item()
    mean = diff.mean().item()
    return diff.max().item(), symmetry.relative(mean, mag), mag


def _twins(shape, axes, noise: float, dtype, gen) -> torch.Tensor:
    """A tensor whose twin blocks along ``axes`` are copies of one block, plus noise."""
    small = list(shape)
    for d, g in axes:
        small[d] //= g
    t = torch.randn(small, generator=gen)
    for d, g in axes:
        t = torch.cat([t] * g, dim=d)
    return (t + noise * torch.randn(shape, generator=gen)).to(dtype)


CASES = [
    # (shape, axes): odd sizes, so the last chunk is a partial one
    ((37, 2 * 13), [(1, 2)]),                   # an LM head [V, s*d]
    ((3 * 11, 3 * 7), [(0, 3), (1, 3)]),         # q_proj-like: twins along both dims
    ((2 * 9, 5), [(0, 2)]),                      # twins along dim 0 only
    ((4, 2 * 5, 2 * 3), [(1, 2), (2, 2), (0, 4)]),  # stacked experts, compared along experts too
    ((2 * 29,), [(0, 2)]),                       # a norm gain: 1-d, one chunk
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,axes", CASES)
def test_chunked_statistics_equal_unchunked(monkeypatch, shape, axes, dtype):
    gen = torch.Generator().manual_seed(7)
    tensors = [_twins(shape, axes, 1e-3, dtype, gen), _twins(shape, axes, 0.0, dtype, gen),
               torch.randn(shape, generator=gen).to(dtype)]
    monkeypatch.setitem(symmetry.STATS_CHUNK_BYTES, "cpu", 1 << 30)
    whole = symmetry._measure(tensors, axes)
    assert not symmetry._row_chunks(shape, axes, tensors[0].element_size(), "cpu")[2]
    # chunks of a few rows (smaller than every tensor with rows), and at most a few per launch
    monkeypatch.setitem(symmetry.STATS_CHUNK_BYTES, "cpu", 3 * math.prod(shape[1:]) * tensors[0].element_size())
    if len(shape) >= 2:
        assert symmetry._row_chunks(shape, axes, tensors[0].element_size(), "cpu")[2]
    chunked = symmetry._measure(tensors, axes)
    alone = [symmetry._measure([t], axes) for t in tensors]
    # a tensor made in chunks (a gradient never held whole) gives what the tensor gives
    sources = [symmetry._RowSource(t.shape, t.dtype, t.device,
                                   lambda a, b, t=t: t[symmetry._block_rows(t.shape, axes, a, b)])
               for t in tensors]
    made = symmetry._measure(sources, axes)
    for i, t in enumerate(tensors):
        ref = _reference(t, axes)
        assert chunked[0][i] == whole[0][i] == pytest.approx(ref[0], rel=1e-6)  # max: exact
        for k in (1, 2):
            assert chunked[k][i] == pytest.approx(whole[k][i], rel=1e-5, abs=1e-12)
            assert chunked[k][i] == pytest.approx(ref[k], rel=1e-5, abs=1e-12)
        # batching never changes a tensor's figures
        assert [chunked[k][i] for k in range(3)] == [alone[i][k][0] for k in range(3)]
        if symmetry._row_chunks(shape, axes, t.element_size(), "cpu")[0] == 0:  # cut the same way
            assert [made[k][i] for k in range(3)] == [chunked[k][i] for k in range(3)]
        else:  # stacked experts: made whole
            assert [made[k][i] for k in range(3)] == pytest.approx([chunked[k][i] for k in range(3)], rel=1e-5)
    assert chunked[1][1] == 0.0  # exact twins: no divergence


def test_group_slot_equals_the_stacked_tensors(monkeypatch):
    """Unjudged tensors of one shape make one slot: combined from each tensor's sums."""
    gen = torch.Generator().manual_seed(3)
    axes = [(0, 2)]
    tensors = [_twins((2 * 23,), axes, 1e-2, torch.float32, gen) for _ in range(5)]
    monkeypatch.setitem(symmetry.STATS_CHUNK_BYTES, "cpu", 64)
    combined = symmetry._TwinSums.figures(symmetry._twin_sums(tensors, axes))
    ref = _reference(torch.stack(tensors), [(1, 2)])
    assert combined[0] == pytest.approx(ref[0], rel=1e-6)
    assert combined[1] == pytest.approx(ref[1], rel=1e-5)
    assert combined[2] == pytest.approx(ref[2], rel=1e-5)
    # a missing gradient counts as zeros, a measured one as it is
    zero, kept = symmetry._twin_sums([None, symmetry._twin_sums(tensors[:1], axes)[0]], axes)
    assert symmetry._TwinSums.figures([zero]) == (0.0, 0.0, 0.0)
    assert symmetry._TwinSums.figures([kept]) == symmetry._TwinSums.figures(symmetry._twin_sums(tensors[:1], axes))


def _small_chunks(monkeypatch):
    """Every embedding, LM head and statistic of the tiny models in many chunks."""
    monkeypatch.setitem(symmetry.STATS_CHUNK_BYTES, "cpu", 1024)
    monkeypatch.setitem(layerwise.READ_CHUNK_BYTES, "cpu", 1024)


def _verify(src, dst, tmp_path, mode, extra=()):
    path = tmp_path / f"{mode}.json"
    rc = main(["verify", str(src), str(dst), "--seq-len", "16", "--json", str(path), *extra]
              + (["--layerwise"] if mode == "layerwise" else []))
    data = json.loads(path.read_text())
    return rc, data, {c["name"]: c for c in data["checks"]}


@pytest.mark.parametrize("family,args", [
    ("llama", ["--width", "2", "--depth", "1"]),   # untied head
    ("gemma", ["--width", "2"]),                   # tied head, padding row, embedding scale
    ("phi3", ["--width", "2"]),                    # fused q/k/v and gate/up along dim 0
    ("mixtral", ["--width", "2"]),                 # stacked experts (autograd's gradients)
    ("qwen2_moe", ["--width", "2"]),               # biases, shared expert, router
])
def test_layerwise_in_small_chunks_equals_in_memory(tmp_path, monkeypatch, family, args):
    m = tiny_model(family)
    src, dst = tmp_path / "src", tmp_path / "dst"
    m.save_pretrained(src)
    assert main(["grow", str(src), str(dst), *args, "--no-progress"]) == 0
    _small_chunks(monkeypatch)
    rc_m, _, mem = _verify(src, dst, tmp_path, "memory")
    rc_l, _, lw = _verify(src, dst, tmp_path, "layerwise")
    assert rc_m == rc_l == 0
    assert [(c, mem[c]["status"]) for c in mem] == [(c, lw[c]["status"]) for c in lw]
    a, b = mem["symmetry_breaking"], lw["symmetry_breaking"]
    assert a["figures"]["tensors_judged"] == b["figures"]["tensors_judged"]
    assert a["figures"]["least_diverged"]["role"] == b["figures"]["least_diverged"]["role"]
    rows_a = {r["name"]: r for r in a["details"] if r["judged"]}
    rows_b = {r["name"]: r for r in b["details"] if r["judged"]}
    assert rows_a.keys() == rows_b.keys()
    for name, ra in rows_a.items():
        for key in ("weight_rel_div", "weight_max_div", "weight_block0_mean_abs", "grad_block0_mean_abs"):
            assert rows_b[name][key] == pytest.approx(ra[key], rel=1e-5, abs=1e-12), (name, key)
        # the clone swaps of the weights, measured chunk by chunk too
        assert ra["swap_rel_div"] and rows_b[name]["swap_rel_div"].keys() == ra["swap_rel_div"].keys()
        for key, v in ra["swap_rel_div"].items():
            assert rows_b[name]["swap_rel_div"][key] == pytest.approx(v, rel=1e-5, abs=1e-12), (name, key)
        # twin differences of gradients are tiny next to the gradients, so their rounding
        # shows more (twins equal but for rounding differ by ~1e-7 relative either way)
        rel_a, rel_b = ra["grad_rel_div"], rows_b[name]["grad_rel_div"]
        assert (rel_a <= 1e-6) == (rel_b <= 1e-6), name
        if rel_a > 1e-5:
            assert rel_b == pytest.approx(rel_a, rel=1e-2), name
        assert rows_b[name]["grad_max_div"] == pytest.approx(ra["grad_max_div"], rel=1e-2, abs=1e-7), name
    for key in ("max_rel_diff_hidden", "logits_rel_diff"):
        fa, fb = mem["functional_identity"]["figures"], lw["functional_identity"]["figures"]
        if key in fa:
            assert fb[key] == pytest.approx(fa[key], rel=1e-4, abs=1e-7), key


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_clone_without_noise_still_fails_layerwise(tmp_path, monkeypatch, family):
    """Exact clones (no noise) fail symmetry breaking with the chunked statistics too, the
    same tensors as in memory; one tensor planted without noise in a noisy model shows
    identical twin weights."""
    m = tiny_model(family)
    src, dst = tmp_path / "src", tmp_path / "dst"
    m.save_pretrained(src)
    assert main(["grow", str(src), str(dst), "--width", "2", "--noise-std", "0", "--no-progress"]) == 0
    _small_chunks(monkeypatch)
    rc_m, _, mem = _verify(src, dst, tmp_path, "memory")
    rc_l, _, lw = _verify(src, dst, tmp_path, "layerwise")
    assert rc_m == rc_l == 1
    a, b = mem["symmetry_breaking"], lw["symmetry_breaking"]
    assert a["status"] == b["status"] == "FAILED"
    assert b["figures"]["tensors_failing"] == b["figures"]["tensors_judged"] == a["figures"]["tensors_failing"]
    failing = [sorted(r["name"] for r in c["details"] if r["fails"]) for c in (a, b)]
    assert failing[0] == failing[1]
    # every clone pair exchangeable: the residual stream and each layer's heads and FFN units
    assert a["figures"]["exchangeable_clones"] == b["figures"]["exchangeable_clones"]
    assert len(b["figures"]["exchangeable_clones"]) == 1 + 2 * m.config.num_hidden_layers

    # one tensor of a noisy model replaced by its exact clone
    from safetensors.torch import load_file, save_file

    noisy = tmp_path / "noisy"
    assert main(["grow", str(src), str(noisy), "--width", "2", "--no-progress"]) == 0
    weights = load_file(noisy / "model.safetensors")
    planted = "model.layers.1.mlp.up_proj.weight"
    old = m.state_dict()[planted]
    weights[planted] = old.repeat(2, 2) / 2  # tiled, input side divided by s: no noise
    save_file(weights, noisy / "model.safetensors", metadata={"format": "pt"})
    _, _, lw = _verify(src, noisy, tmp_path, "layerwise")
    rows = {r["name"]: r for r in lw["symmetry_breaking"]["details"]}
    assert rows[planted]["weight_rel_div"] == 0.0 and rows[planted]["identical_weights"]
    assert not rows["model.layers.1.mlp.gate_proj.weight"]["identical_weights"]


def test_reader_rows_equal_slices(tmp_path):
    m = tiny_model("llama")
    m.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    with CheckpointReader(tmp_path / "src") as reader:
        name = "model.embed_tokens.weight"
        full = reader.get(name)
        assert torch.equal(reader.get_rows(name, 5, 17), full[5:17])
        assert reader.get_rows(name, 3, 3).shape == (0, full.shape[1])
        rows = torch.tensor([0, 1, 2, 9, 40, 41, full.shape[0] - 1])
        assert torch.equal(reader.get_index(name, rows), full[rows])
        with pytest.raises(ValueError):
            reader.get_rows(name, 0, full.shape[0] + 1)


def test_failed_background_write_leaves_nothing(tmp_path, monkeypatch):
    m = tiny_model("llama")
    m.save_pretrained(tmp_path / "src")
    calls = []
    real = ShardWriter._write_tensor

    def failing(self, t):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        real(self, t)

    monkeypatch.setattr(ShardWriter, "_write_tensor", failing)
    with pytest.raises(OSError, match="No space left"):
        main(["grow", str(tmp_path / "src"), str(tmp_path / "dst"), "--width", "2", "--no-progress"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_background_writes_keep_memory_within_the_budget():
    """A tensor about to be made waits for the writes in flight when both would not fit;
    a storage several writes share counts once; writes run in order."""
    import threading

    from growkit.growth.stream import BackgroundWrites

    done, order, gate = [], [], threading.Event()

    def job(name):
        gate.wait(5)
        order.append(name)
        done.append(name)

    bg = BackgroundWrites(budget=100)
    bg.submit(job, "a", key=1, nbytes=60)
    bg.submit(job, "b", key=1, nbytes=60)  # the same storage (two experts of one tensor)
    assert bg.in_flight == 60
    bg.make_room(40)  # fits: nothing waited for
    assert not done
    gate.set()
    bg.make_room(50)  # 60 + 50 > 100: waits for the writes holding the storage
    assert done == ["a", "b"] and bg.in_flight == 0
    bg.submit(job, "c", nbytes=10)
    bg.close()
    assert order == ["a", "b", "c"]


@pytest.mark.parametrize("scale", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clone_exchanges_equal_the_exchanged_tensor(monkeypatch, scale, dtype):
    """The exchange figures (``swap_rel_div``), taken on pairs of block views chunk by chunk,
    equal mean|X - X'| / mean|B_0| with X' the whole tensor gathered with clones g and h
    exchanged; a tensor made exchangeable gives 0 for that exchange only."""
    gen = torch.Generator().manual_seed(11)
    s = scale
    cases = [  # (shape, axes, swaps): q-like [heads, model], o-like [model, heads], stacked experts
        ((s * 6, s * 10), [(0, s), (1, s)], {"model": (1,), "unit": (0,), "both": (1, 0)}),
        ((s * 10, s * 6), [(0, s), (1, s)], {"model": (0,), "unit": (1,), "both": (0, 1)}),
        ((3, s * 4, s * 10), [(1, s), (2, s), (0, 3)], {"model": (1,), "unit": (0,), "both": (1, 0)}),
    ]
    for shape, axes_list, swaps in cases:
        axes = symmetry.TwinAxes(axes_list, swaps, s)
        t = torch.randn(shape, generator=gen).to(dtype)
        # exchanged along the residual dim only, then symmetrized: that exchange leaves it as it is
        d = axes_list[swaps["model"][0]][0]
        idx = torch.arange(shape[d]).view(s, -1)
        idx[[s - 2, s - 1]] = idx[[s - 1, s - 2]]
        sym = ((t.float() + t.float().index_select(d, idx.reshape(-1))) / 2).to(dtype)
        for x in (t, sym):
            monkeypatch.setitem(symmetry.STATS_CHUNK_BYTES, "cpu", 3 * math.prod(shape[1:]) * x.element_size())
            got = symmetry._twin_sums([x], axes)[0].swap_rel()
            mag = x.float().narrow(axes_list[0][0], 0, shape[axes_list[0][0]] // s)
            for a, n in axes_list[1:]:
                mag = mag.narrow(a, 0, shape[a] // n)
            mag = mag.abs().mean().item()
            assert set(got) == {f"{k}:{g}-{h}" for k in swaps for g in range(s) for h in range(g + 1, s)}
            for key, value in got.items():
                kind, pair = key.split(":")
                g, h = map(int, pair.split("-"))
                want = x.float()
                for i in swaps[kind]:
                    dim, n = axes_list[i]
                    perm = torch.arange(shape[dim]).view(n, -1)
                    perm[[g, h]] = perm[[h, g]]
                    want = want.index_select(dim, perm.reshape(-1))
                want = (x.float() - want).abs().mean().item() / mag
                # bf16: the difference is taken in the tensor's dtype (equal entries still give 0)
                assert value == pytest.approx(want, rel=1e-4 if dtype == torch.float32 else 1e-2, abs=1e-7), (shape, key)
        exchanged = symmetry._twin_sums([sym], axes)[0].swap_rel()
        assert exchanged[f"model:{s - 2}-{s - 1}"] == 0.0
        assert min(v for k, v in exchanged.items() if k != f"model:{s - 2}-{s - 1}") > 1e-3
