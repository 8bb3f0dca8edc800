"""Too much zero-sum noise is told apart from a tiling bug (growkit/verify/noise.py).

Zero-sum noise is exact in mathematics; in floats each projection multiplies the rounding
differences between clones by its noise, so past a gain of about 1 they grow with depth and
the checks see the symptoms of a tiling bug. The premise is measured here first (exactly
zero-sum weights on a float grid: float64 matches far closer than float32), then that the
diagnosis says so, and that real bugs under the same noise keep their diagnosis.
"""

from __future__ import annotations

import pytest
import torch

import growkit.growth as growth
from growkit.verify import FAILED, PASSED, TROUBLESHOOTING, run_growth_checks
from growkit.verify.noise import clone_deviation_std, denoised_copy, noisy_blocks, recorded_noise

from model_factory import random_model, random_ids

LOUD = 0.3  # the weights' std is 0.2: every projection's noise gain is well above 1


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("GROWKIT_BACKEND", "torch")


@pytest.fixture(scope="module")
def source():
    return random_model(0, n_layers=3, n_experts=4, d_ff=16)


def _grow(model, noise_std):
    return growth.grow_width(model, 2, noise_std=noise_std, seed=0).eval()


def _ten_times_the_noise(w: torch.Tensor, seed: int) -> torch.Tensor:
    """Zero-sum deviations across w's two input blocks, 10x the recorded noise: the denoised
    model is unchanged by them, but they are not the noise_std's doing."""
    extra = 10 * LOUD * torch.randn(w.shape[0], w.shape[1] // 2, generator=torch.Generator().manual_seed(seed))
    return torch.cat([extra, -extra], dim=1)


def _logits_rel(old, new, ids, dtype):
    with torch.no_grad():
        a, b = old.to(dtype)(ids), new.to(dtype)(ids)
    old.float(), new.float()
    return float((a - b).abs().max() / a.abs().max())


def test_premise_loud_noise_is_exact_in_mathematics_not_in_float32():
    """With the weights put on a grid where every clone block sums exactly to the source,
    the float32 mismatch is huge and the float64 one orders of magnitude smaller: rounding
    amplified, no tensor wrong."""
    ids = random_ids()
    grid = 2.0 ** -12
    old = random_model(0, n_layers=3, n_experts=4, d_ff=16)
    with torch.no_grad():
        for p in old.parameters():
            p.copy_((p / grid).round() * grid)
    new = _grow(old, LOUD)
    with torch.no_grad():
        for _, _, blocks in noisy_blocks(new, 2):
            total = (blocks.sum(-2) / (grid / 2)).round() * (grid / 2)   # the source, exactly
            blocks[..., 0, :] = (blocks[..., 0, :] / grid).round() * grid
            blocks[..., 1, :] = total - blocks[..., 0, :]                 # exact in float32
    rel32 = _logits_rel(old, new, ids, torch.float32)
    rel64 = _logits_rel(old, new, ids, torch.float64)
    assert rel32 > 1e-4 and rel64 < 1e-12, (rel32, rel64)  # float32 over the checks' tolerance


@pytest.mark.parametrize("extra_layers", [0, 2])
def test_loud_noise_is_diagnosed_as_such(source, extra_layers):
    """Widened alone, or with identity layers (whose zeroed writers carry no noise)."""
    new = (growth.scale_bilaterally(source, 2, extra_layers, LOUD, seed=0).eval() if extra_layers
           else _grow(source, LOUD))
    assert recorded_noise(new) == (LOUD, 2)
    devs = clone_deviation_std(new, 2)
    assert sum(v == 0 for v in devs.values()) == 2 * extra_layers  # o_proj and the experts' down_proj
    assert devs and all(0.5 * LOUD < v < 2 * LOUD for v in devs.values() if v)
    report = run_growth_checks(source, new, random_ids(), "cpu", scale_factor=2)
    fi = report["functional_identity"]
    assert fi.status == FAILED and fi.diagnosis == "noise_amplified"
    assert fi.figures["denoised_functional_identity"] == PASSED
    assert "noise_std 0.3" in fi.cause and "averaged out the model matches" in fi.cause
    assert fi.fix == TROUBLESHOOTING["noise_amplified"].fix
    for c in report.checks:  # no check failing on the noise keeps a tiling-bug diagnosis
        assert c.status != FAILED or c.diagnosis == "noise_amplified", (c.name, c.diagnosis)
    # the fix it gives works: the same growth with a small noise passes
    assert run_growth_checks(source, _grow(source, 1e-3), random_ids(), "cpu", scale_factor=2).passed


def test_without_a_width_record_the_median_deviation_stands_in(source):
    """A model widened elsewhere has no width record: its deviations' median takes the place of
    the recorded noise_std. A width record that says there is no noise means every deviation
    is a bug, so the same deviations then keep the tiling-bug diagnosis."""
    new = _grow(source, LOUD)
    new.growth_records = []
    fi = run_growth_checks(source, new, random_ids(), "cpu", scale_factor=2)["functional_identity"]
    assert fi.status == FAILED and fi.diagnosis == "noise_amplified", fi.diagnosis
    assert "no width record" in fi.cause and fi.figures["denoised_functional_identity"] == PASSED
    with torch.no_grad():  # one tensor with 10x the others' deviations: not one noise
        w = new.layers[1].attn.k_proj.weight
        w += _ten_times_the_noise(w, seed=3)
    fi = run_growth_checks(source, new, random_ids(), "cpu", scale_factor=2)["functional_identity"]
    assert fi.status == FAILED and fi.diagnosis == "weight_expansion_bug", fi.diagnosis

    quiet = _grow(source, 0.0)  # recorded: no noise
    loud = _grow(source, LOUD)
    with torch.no_grad():
        for (_, t, _), (_, t_loud, _) in zip(noisy_blocks(quiet, 2), noisy_blocks(loud, 2)):
            t.copy_(t_loud)
    assert recorded_noise(quiet) is None and any(r.op == "width" for r in quiet.growth_records)
    fi = run_growth_checks(source, quiet, random_ids(), "cpu", scale_factor=2)["functional_identity"]
    assert fi.status == FAILED and fi.diagnosis == "weight_expansion_bug", fi.diagnosis


def test_a_tiling_bug_under_loud_noise_keeps_its_diagnosis(source):
    """A missing 1/s (every clone block holds W/2 too much): the noise is the recorded one,
    but the model with it averaged out still fails."""
    new = _grow(source, LOUD)
    with torch.no_grad():
        w = new.layers[1].attn.v_proj.weight
        w[:, : w.shape[1] // 2] += source.layers[1].attn.v_proj.weight.repeat(2, 1) / 2
        w[:, w.shape[1] // 2:] += source.layers[1].attn.v_proj.weight.repeat(2, 1) / 2
    fi = run_growth_checks(source, new, random_ids(), "cpu", scale_factor=2)["functional_identity"]
    assert fi.status == FAILED and fi.diagnosis == "weight_expansion_bug"


def test_a_corrupted_block_under_loud_noise_keeps_its_diagnosis(source):
    """One tensor's clone block redrawn: its deviations are not the recorded noise's."""
    new = _grow(source, LOUD)
    with torch.no_grad():
        w = new.layers[0].attn.o_proj.weight
        w[:, w.shape[1] // 2:] = 3.0 * torch.randn_like(w[:, w.shape[1] // 2:])
    fi = run_growth_checks(source, new, random_ids(), "cpu", scale_factor=2)["functional_identity"]
    assert fi.status == FAILED and fi.diagnosis == "weight_expansion_bug"


def test_denoised_copy_leaves_the_model_alone_and_removes_only_the_noise(source):
    new = _grow(source, LOUD)
    before = {k: v.clone() for k, v in new.state_dict().items()}
    quiet = denoised_copy(new, 2)
    assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())
    assert max(clone_deviation_std(quiet, 2).values()) < 1e-6
    exact = _grow(source, 0.0)
    for (k, a), b in zip(quiet.state_dict().items(), exact.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)


def test_zero_sum_deviations_other_than_the_recorded_noise_keep_the_diagnosis(source):
    """A tensor whose clone blocks differ by far more than the recorded noise (zero-sum, so
    the model without deviations passes) is not the noise_std's doing: the advice to lower
    noise_std would not fix it, so the diagnosis stays a tiling bug."""
    new = _grow(source, LOUD)
    with torch.no_grad():
        w = new.layers[1].attn.k_proj.weight
        w += _ten_times_the_noise(w, seed=3)
    assert run_growth_checks(source, denoised_copy(new, 2), random_ids(), "cpu", scale_factor=2)["functional_identity"].passed
    report = run_growth_checks(source, new, random_ids(), "cpu", scale_factor=2)
    failed = [c for c in report.checks if c.status == FAILED]
    assert failed and all(c.diagnosis != "noise_amplified" for c in failed), [(c.name, c.diagnosis) for c in failed]


@pytest.mark.parametrize("record", [True, False], ids=["growth.json", "no-record"])
@pytest.mark.parametrize("family", ["llama", "mixtral"])  # plain; stacked experts, fused gate_up on disk
def test_checkpoints_in_memory_and_layerwise_say_the_same(tmp_path, family, record):
    """`growkit verify`, in memory or --layerwise (which reads every layer a second time, its
    noise averaged out as it loads), names the loud noise; a planted missing 1/s, or one tensor
    with far more than the others' deviations, stays a bug. Without growth.json (a checkpoint
    widened by another tool) the deviations' median stands in for the recorded noise_std."""
    import json

    from growkit.cli import main
    from hf_zoo import tiny_model
    from safetensors.torch import load_file, save_file

    m = tiny_model(family)
    src, dst = tmp_path / "src", tmp_path / "dst"
    m.save_pretrained(src)
    assert main(["grow", str(src), str(dst), "--width", "2", "--noise-std", str(LOUD), "--no-progress"]) == 0
    if not record:
        (dst / "growth.json").unlink()

    def verify(path, *extra):
        out = tmp_path / "report.json"
        rc = main(["verify", str(src), str(path), "--seq-len", "16", "--json", str(out), *extra])
        return rc, {c["name"]: c for c in json.loads(out.read_text())["checks"]}

    for extra in ([], ["--layerwise"]):
        rc, checks = verify(dst, *extra)
        fi = checks["functional_identity"]
        assert rc == 1 and fi["diagnosis"] == "noise_amplified", (extra, fi["diagnosis"], fi["summary"])
        assert fi["figures"]["denoised_functional_identity"] == PASSED
        lo, hi = fi["figures"]["clone_deviation_std"]
        assert 0.5 * LOUD < lo <= hi < 2 * LOUD
        assert ("no width record" in fi["cause"]) != record, fi["cause"]
    clean = load_file(dst / "model.safetensors")

    def planted(name, change):
        weights = dict(clean)
        weights[name] = change(weights[name])
        save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
        for extra in ([], ["--layerwise"]):
            rc, checks = verify(dst, *extra)
            assert rc == 1 and checks["functional_identity"]["diagnosis"] == "weight_expansion_bug", (name, extra)

    name = "model.layers.0.self_attn.v_proj.weight"
    planted(name, lambda w: w + m.state_dict()[name].repeat(2, 2) / 2)  # a missing 1/s

    def head_too_noisy(w):
        """Zero-sum deviations 10x the recorded noise on the LM head, which --layerwise reads in
        chunks of rows (its own loader): they must be measured there too."""
        return w + _ten_times_the_noise(w, seed=5)

    planted("lm_head.weight", head_too_noisy)


def test_layerwise_head_read_in_chunks_is_denoised_whole(tmp_path, monkeypatch):
    """--layerwise reads the LM head in chunks of rows: averaged out chunk by chunk, its logits
    and its deviation std are those of the whole tensor denoised at once."""
    from growkit.cli import main
    from growkit.verify import layerwise
    from growkit.verify.noise import denoise_tensor
    from hf_zoo import tiny_model
    from safetensors.torch import load_file

    src, dst = tmp_path / "src", tmp_path / "dst"
    tiny_model("llama").save_pretrained(src)
    assert main(["grow", str(src), str(dst), "--width", "2", "--noise-std", str(LOUD), "--no-progress"]) == 0
    w = load_file(dst / "model.safetensors")["lm_head.weight"]
    monkeypatch.setitem(layerwise.READ_CHUNK_BYTES, "cpu", 7 * w.shape[1] * w.element_size())  # 7 rows
    off = layerwise.OffloadedModel(dst)
    try:
        head = off.disk_head
        assert len(head.chunks) > 2 and head.chunks[-1][1] - head.chunks[-1][0] < 7  # a partial last one
        off.denoise_scale = 2
        x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))
        quiet, std = denoise_tensor(w, 2)
        torch.testing.assert_close(head.logits(x, None), torch.nn.functional.linear(x, quiet))
        assert off.deviations["lm_head.weight"] == pytest.approx(std, rel=1e-5)
        head.logits(x, None)  # the rows read again: the same figure
        assert off.deviations["lm_head.weight"] == pytest.approx(std, rel=1e-5)
        assert 0.5 * LOUD < std < 2 * LOUD
    finally:
        off.close()
