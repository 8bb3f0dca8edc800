"""The one validation boundary (growkit.validate) and the one registry of growth checks."""

import inspect
import sys

import numpy as np
import pytest
import torch

from growkit.growth import grow_width, scale_bilaterally
from growkit.models import ModelConfig, Transformer
from growkit.validate import ArgumentKindError, choice, real_number, seed, whole_number
from growkit.verify import (
    GROWTH_CHECKS,
    check_functional_identity_layerwise,
    check_rope_integrity,
    check_router_scaling,
    check_symmetry_breaking,
    run_growth_checks,
)


# ---------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("value,kw,expect", [
    (3, {}, 3), (2.0, {}, 2), (np.int64(4), {}, 4), (0, dict(min=0), 0), (5, dict(max=5), 5),
])
def test_whole_number_accepts(value, kw, expect):
    out = whole_number(value, "n", **kw)
    assert out == expect and type(out) is int


@pytest.mark.parametrize("value,kw,exc", [
    (True, {}, ArgumentKindError), ("3", {}, ArgumentKindError), (1.5, {}, ArgumentKindError),
    (float("nan"), {}, ArgumentKindError), (None, {}, ArgumentKindError),
    (1, dict(min=2), ValueError), (7, dict(max=5), ValueError),
])
def test_whole_number_refuses_and_names_the_argument(value, kw, exc):
    with pytest.raises(exc, match="^n_layers must be a whole number"):
        whole_number(value, "n_layers", **kw)


def test_kind_errors_are_both_type_and_value_errors():
    # callers that catch either see a wrong kind of value
    with pytest.raises(TypeError):
        real_number("x", "lr")
    with pytest.raises(ValueError):
        real_number("x", "lr")


@pytest.mark.parametrize("value,kw,ok", [
    (0.0, dict(min=0), True), (-1e-9, dict(min=0), False), (0.0, dict(above=0), False),
    (1.0, dict(above=0, max=1), True), (1.01, dict(above=0, max=1), False),
    (float("inf"), {}, False), (float("nan"), {}, False), (True, {}, False), (3, {}, True),
])
def test_real_number(value, kw, ok):
    if ok:
        assert real_number(value, "x", **kw) == float(value)
    else:
        with pytest.raises(ValueError, match="^x must be a finite number"):
            real_number(value, "x", **kw)


def test_seed_and_choice():
    assert seed(2**64 - 1) == 2**64 - 1
    for bad in (-1, 2**64, 1.5, True, "0"):
        with pytest.raises(ValueError, match="seed must be a whole number in"):
            seed(bad)
    # a fraction is quoted as given, not as some derived number (issue 11, defect 6)
    with pytest.raises(ValueError, match=r"got 1\.5$"):
        seed(1.5)
    assert choice("b", "mode", ("a", "b")) == "b"
    with pytest.raises(ValueError, match="mode must be one of 'a', 'b', got 'c'"):
        choice("c", "mode", ("a", "b"))


def tiny():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms randomized too
    return m


def test_growth_arguments_checked_once_at_the_entry(monkeypatch):
    """scale_bilaterally -> grow_width -> hyperclone used to check noise_std three times;
    now the entry checks and the layers below run unchecked."""
    import growkit.validate as validate

    calls = []
    real = validate.real_number

    def counting(value, name, **kw):
        calls.append(name)
        return real(value, name, **kw)

    for mod in ("growkit.growth.width", "growkit.kernels.hyperclone"):
        monkeypatch.setattr(sys.modules[mod], "real_number", counting)
    scale_bilaterally(tiny(), 2, 1, noise_std=1e-3)
    assert calls.count("noise_std") == 1


@pytest.mark.parametrize("call,name", [
    (lambda m: grow_width(m, 2, seed=1.5), "seed"),
    (lambda m: grow_width(m, 2, noise_std=True), "noise_std"),
    (lambda m: grow_width(m, 2.5), "scale_factor"),
    (lambda m: scale_bilaterally(m, 2, 1, positions=[5]), "positions"),
    (lambda m: scale_bilaterally(m, 2, -1), "extra_layers"),
])
def test_bad_growth_arguments_name_themselves(call, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        call(tiny())


# ---------------------------------------------------------------------------- registry
def test_the_four_checks_share_one_signature():
    sigs = [inspect.signature(f) for f in (check_rope_integrity, check_router_scaling,
                                           check_symmetry_breaking, check_functional_identity_layerwise)]
    assert all(s == sigs[0] for s in sigs)
    # ... which is run_growth_checks' own, less its check selection
    full = inspect.signature(run_growth_checks).parameters
    assert list(sigs[0].parameters) == [p for p in full if p != "checks"]
    assert set(GROWTH_CHECKS) == {"rope_integrity", "router_scaling", "symmetry_breaking", "functional_identity"}


def test_single_checks_equal_their_part_of_the_full_report():
    src = tiny()
    grown = grow_width(src, 2, noise_std=1e-3)
    probe = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    full = run_growth_checks(src, grown, probe, "cpu", scale_factor=2)
    for name, fn in [("rope_integrity", check_rope_integrity), ("router_scaling", check_router_scaling),
                     ("symmetry_breaking", check_symmetry_breaking),
                     ("functional_identity", check_functional_identity_layerwise)]:
        one = fn(src, grown, probe, "cpu", scale_factor=2)
        assert one.name == name and one.status == full[name].status
        assert one.figures == full[name].figures
    only = run_growth_checks(src, grown, probe, checks=["functional_identity"])
    assert [c.name for c in only.checks] == ["functional_identity"]


def test_single_checks_refuse_bad_settings_before_running():
    src = tiny()
    grown = grow_width(src, 2, noise_std=1e-3)
    with pytest.raises(ValueError, match="checks must name some of"):
        run_growth_checks(src, grown, checks=["symmetry"])
    with pytest.raises(ValueError, match="collapse_share"):
        check_router_scaling(src, grown, collapse_share=1.5)
    with pytest.raises(ValueError, match="min_divergence"):
        check_symmetry_breaking(src, grown, min_divergence=-1)
    with pytest.raises(ValueError, match="meta"):
        check_rope_integrity(src, grown, device="meta")
    assert all(p.device.type == "cpu" for p in src.parameters())
