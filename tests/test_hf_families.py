"""Growth of Hugging Face causal LMs, family by family: function preservation and round trips.

For every family in ``hf_zoo.FAMILIES`` and every growth operation, a tiny random model
(every parameter random, norm gains and biases too) is grown and the grown model must

1. leave the source untouched (state dict and config),
2. compute the source's logits (function-preserving operations),
3. survive ``save_grown`` -> ``AutoModelForCausalLM.from_pretrained`` unchanged, with a
   config that says what was grown and keeps what was not (head_dim, RoPE, sliding window,
   Gemma2's soft-capping),
4. come back from ``load_grown`` with its growth records,
5. pass the growth checks (``run_growth_checks``),
6. in bfloat16, stay within twice the source's own bfloat16-vs-float32 error.

Depth growth in ``stack`` mode changes the function by design; it is checked for its
structure and its round trip only.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import transformers

import growkit.growth as growth
import growkit.verify as verify
from hf_zoo import FAMILIES, MOE_SIBLING, is_tied, logits, probe, tiny_model

OPS = ["width2", "width3", "width2_noise", "depth_identity", "depth_stack", "bilateral", "upcycle"]
BF16_OPS = ["width2", "depth_identity", "upcycle"]

# relative logit tolerance (max|diff| <= tol * max|reference|) of the in-memory grown model
TOL = {"width2_noise": 1e-4}
DEFAULT_TOL = 1e-5
RELOAD_TOL = 1e-6
LOAD_GROWN_TOL = 1e-5

WIDTH_SCALE = {"width2": 2, "width3": 3, "width2_noise": 2, "bilateral": 2}
EXTRA_LAYERS = {"depth_identity": 2, "depth_stack": 2, "bilateral": 2}
EXPECTED_OPS = {
    "width2": ["width"], "width3": ["width"], "width2_noise": ["width"],
    "depth_identity": ["depth"], "depth_stack": ["depth"],
    "bilateral": ["width", "depth"], "upcycle": ["moe"],
}
# noise_std=0 width growth leaves exact twins: the symmetry-breaking check fails by design
EXACT_TWINS = {"width2", "width3", "bilateral"}

@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """growkit's torch kernels: the family matrix tests the HF adapters, not the Triton
    kernels (tests/test_kernels.py does, and test_interpreted_kernels below runs them on
    HF models once); under the interpreter they would take minutes here."""
    monkeypatch.setenv("GROWKIT_BACKEND", "torch")


def grow(model, op: str):
    if op == "width2":
        return growth.grow_width(model, 2, noise_std=0)
    if op == "width3":
        return growth.grow_width(model, 3, noise_std=0)
    if op == "width2_noise":
        return growth.grow_width(model, 2)
    if op == "depth_identity":
        return growth.grow_depth(model, 2, mode="identity")
    if op == "depth_stack":
        return growth.grow_depth(model, 2, mode="stack")
    if op == "bilateral":
        return growth.scale_bilaterally(model, 2, 2, noise_std=0)
    if op == "upcycle":
        return growth.upcycle_to_moe(model, 4, 2)
    raise KeyError(op)


def max_rel(new: torch.Tensor, ref: torch.Tensor) -> float:
    """max |new - ref| / max |ref|, in float64."""
    return ((new.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def snapshot(model) -> tuple[dict, dict]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, copy.deepcopy(model.config.to_dict())


def assert_unchanged(model, snap, what: str = "source") -> None:
    state, cfg = snap
    now = model.state_dict()
    assert now.keys() == state.keys(), f"{what}: parameter names changed"
    changed = [k for k, v in state.items() if now[k].dtype != v.dtype or not torch.equal(now[k], v)]
    assert not changed, f"{what} modified by growth: {changed[:5]}"
    assert model.config.to_dict() == cfg, f"{what} config modified by growth"


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def n_experts(cfg):
    return getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)


@functools.lru_cache(maxsize=None)
def expected_class(family: str, op: str):
    fam = MOE_SIBLING[family] if op == "upcycle" else family
    return type(tiny_model(fam))


def assert_config(src, new, family: str, op: str) -> None:
    scale = WIDTH_SCALE.get(op, 1)
    extra = EXTRA_LAYERS.get(op, 0)
    assert new.hidden_size == src.hidden_size * scale
    assert new.num_attention_heads == src.num_attention_heads * scale
    assert new.num_key_value_heads == src.num_key_value_heads * scale
    assert head_dim(new) == head_dim(src)
    assert new.num_hidden_layers == src.num_hidden_layers + extra
    assert new.vocab_size == src.vocab_size
    assert new.rope_parameters == src.rope_parameters
    # Qwen MoE configs store "no sliding window" as 0, the dense Qwen ones as None
    assert (getattr(new, "sliding_window", None) or None) == (getattr(src, "sliding_window", None) or None)
    assert bool(new.tie_word_embeddings) == bool(src.tie_word_embeddings)
    for field in ("final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar"):
        if hasattr(src, field):
            assert getattr(new, field) == getattr(src, field), field
    if op == "upcycle":
        assert new.model_type == MOE_SIBLING[family]
        assert n_experts(new) == 4
        assert new.num_experts_per_tok == 2
    else:
        assert new.model_type == src.model_type
        assert new.intermediate_size == src.intermediate_size * scale
        if n_experts(src):
            assert n_experts(new) == n_experts(src)
            assert new.num_experts_per_tok == src.num_experts_per_tok
        for field in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            if getattr(src, field, None):
                assert getattr(new, field) == getattr(src, field) * scale, field


def assert_layer_types(src_cfg, new_cfg, layer_map) -> None:
    """Every layer keeps the attention type of the source layer it came from."""
    src_types = getattr(src_cfg, "layer_types", None)
    if src_types is None:
        return
    new_types = new_cfg.layer_types
    assert len(new_types) == new_cfg.num_hidden_layers
    assert layer_map is not None and len(layer_map) == len(new_types)
    for j, (src_layer, _kind) in enumerate(layer_map):
        assert new_types[j] == src_types[src_layer], (j, src_layer, new_types, src_types)


def assert_checks_pass(report, op: str) -> None:
    text = str(report)
    if op in EXACT_TWINS:
        # exact clones (noise_std=0) stay identical in training: the check must say so
        others = [c for c in report.checks if c.name != "symmetry_breaking"]
        assert all(c.passed for c in others), text
        assert report["symmetry_breaking"].status == verify.FAILED, text
    else:
        assert report.passed, text
    assert report["functional_identity"].status == verify.PASSED, text


def reload(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("family", FAMILIES)
def test_grow_family(family, op, tmp_path):
    source = tiny_model(family)
    ids = probe(source)
    ref = logits(source, ids)
    snap = snapshot(source)

    if op == "upcycle" and family not in MOE_SIBLING:
        with pytest.raises(ValueError) as err:
            grow(source, op)
        msg = str(err.value).lower()
        assert "mixtral" in msg, msg  # the supported pairs are named
        assert_unchanged(source, snap)
        return

    grown = grow(source, op)
    assert_unchanged(source, snap)
    assert type(grown) is expected_class(family, op)
    assert [r.op for r in grown.growth_records] == EXPECTED_OPS[op]
    assert_config(source.config, grown.config, family, op)
    if source.config.tie_word_embeddings:
        assert is_tied(grown), "tied embeddings came untied"
    if op.startswith("depth") or op == "bilateral":
        assert_layer_types(source.config, grown.config, grown.growth_records[-1].layer_map)

    out = logits(grown, ids)
    assert torch.isfinite(out).all()
    preserving = op != "depth_stack"
    if preserving:
        tol = TOL.get(op, DEFAULT_TOL)
        err = max_rel(out, ref)
        assert err <= tol, f"{family} {op}: grown logits differ from the source's by {err:.3g} (relative)"
    else:
        assert grown.growth_records[-1].function_preserving is False

    # The attention implementation is a runtime choice, not part of the checkpoint: the
    # upcycled model of another class gets transformers' default. Run it eager like the
    # source (public API), so the reload comparisons compare weights, not attention kernels.
    grown.set_attn_implementation("eager")
    out = logits(grown, ids)

    # save_pretrained output + growth.json; transformers reloads it as the same model
    path = tmp_path / "g"
    growth.save_grown(grown, path)
    assert (path / "growth.json").is_file()
    reloaded = reload(path)
    assert type(reloaded) is expected_class(family, op)
    assert_config(source.config, reloaded.config, family, op)
    if op.startswith("depth") or op == "bilateral":
        assert_layer_types(source.config, reloaded.config, grown.growth_records[-1].layer_map)
    if source.config.tie_word_embeddings:
        assert reloaded.config.tie_word_embeddings and is_tied(reloaded)
    err = max_rel(logits(reloaded, ids), out)
    assert err <= RELOAD_TOL, f"{family} {op}: reloaded logits differ from the in-memory model's by {err:.3g}"

    # load_grown loads with transformers' default attention (sdpa), whose rounding differs
    # from eager's by ~1e-6: same weights, so within the growth tolerance
    loaded = growth.load_grown(path)
    assert type(loaded) is expected_class(family, op)
    assert [r.op for r in loaded.growth_records] == [r.op for r in grown.growth_records]
    err = max_rel(logits(loaded.eval(), ids), out)
    assert err <= LOAD_GROWN_TOL, f"{family} {op}: load_grown logits differ by {err:.3g}"

    if preserving:
        report = verify.run_growth_checks(source, grown, ids, device="cpu", scale_factor=WIDTH_SCALE.get(op, 1))
        assert_checks_pass(report, op)
        assert_unchanged(source, snap)
    else:
        sanity = verify.quick_sanity_check(grown, ids)
        assert sanity.passed, str(sanity)


BF16_CASES = [(f, op) for op in BF16_OPS for f in FAMILIES if op != "upcycle" or f in MOE_SIBLING]


@pytest.mark.parametrize("family,op", BF16_CASES, ids=[f"{f}-{op}" for f, op in BF16_CASES])
def test_grow_bfloat16(family, op):
    """A bf16 model grows to within 2x the source's own bf16-vs-fp32 logit error."""
    fp32 = tiny_model(family)
    ids = probe(fp32)
    ref = logits(fp32, ids)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    src_err = (logits(bf16, ids) - ref).abs().max().item()

    grown = grow(bf16, op)
    assert next(grown.parameters()).dtype == torch.bfloat16
    grown_err = (logits(grown, ids) - ref).abs().max().item()
    bound = 2 * src_err + 1e-6 * ref.abs().max().item()
    assert grown_err <= bound, (
        f"{family} {op} in bf16: error {grown_err:.3g} vs the source's own bf16 error {src_err:.3g}"
    )


def test_tied_llama_width_stays_tied(tmp_path):
    source = tiny_model("llama", tie_word_embeddings=True)
    assert is_tied(source)
    ids = probe(source)
    ref = logits(source, ids)
    snap = snapshot(source)

    grown = growth.grow_width(source, 2, noise_std=0)
    assert_unchanged(source, snap)
    assert grown.config.tie_word_embeddings and is_tied(grown)
    out = logits(grown, ids)
    assert max_rel(out, ref) <= DEFAULT_TOL

    growth.save_grown(grown, tmp_path / "g")
    reloaded = reload(tmp_path / "g")
    assert reloaded.config.tie_word_embeddings is True
    assert is_tied(reloaded)
    assert max_rel(logits(reloaded, ids), out) <= RELOAD_TOL
    assert max_rel(logits(reloaded, ids), ref) <= DEFAULT_TOL


def tiny_gpt2():
    cfg = transformers.AutoConfig.for_model(
        "gpt2", vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=1, eos_token_id=2,
    )
    assert cfg.model_type not in FAMILIES
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize("op", ["width", "depth"])
def test_unknown_family_names_register_family(op):
    model = tiny_gpt2()
    with pytest.raises(ValueError) as err:
        if op == "width":
            growth.grow_width(model, 2)
        else:
            growth.grow_depth(model, 1)
    msg = str(err.value)
    assert "gpt2" in msg and "register_family" in msg, msg


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_interpreted_kernels(family, monkeypatch):
    """The default backend (Triton kernels, interpreted on the CPU under the test setup) grows
    and verifies an HF model just as the torch reference does."""
    monkeypatch.setenv("GROWKIT_BACKEND", "auto")
    source = tiny_model(family)
    ids = probe(source)
    ref = logits(source, ids)
    grown = growth.grow_width(source, 2)
    assert max_rel(logits(grown, ids), ref) <= TOL["width2_noise"]
    report = verify.run_growth_checks(source, grown, ids, device="cpu", scale_factor=2)
    assert report.passed, str(report)


# ---------------------------------------------------------------------------- output norms
@pytest.mark.parametrize("family", ["olmo2", "gemma2", "gemma3_text", "llama"])
def test_identity_blocks_stay_small_after_a_training_step(family):
    """OLMo2 and Gemma2/3 normalize each sublayer's output before the residual add: an
    identity block there zeroes the output norms' gains (RMSNorm is scale invariant, so a
    zeroed projection would be normalized back to full size after one small step). After
    one SGD step at lr 1e-4 the new block adds O(lr) to the residual stream."""
    from growkit.growth import grow_depth

    m = tiny_model(family)
    deep = grow_depth(m, 1, mode="identity", positions=[0])
    ids = probe(m)
    assert torch.allclose(logits(deep, ids), logits(m, ids), rtol=1e-5, atol=1e-5)

    def block_share():
        with torch.no_grad():
            out = deep(ids, output_hidden_states=True)
        h_in, h_out = out.hidden_states[1], out.hidden_states[2]
        return float((h_out - h_in).norm() / h_in.norm())

    assert block_share() == 0.0
    deep.train()
    deep(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean().backward()  # any loss
    with torch.no_grad():
        for p in deep.model.layers[1].parameters():
            if p.grad is not None:
                p -= 1e-4 * p.grad
    share = block_share()
    assert 0 < share < 1e-2, share
    # and the layer pairing infers it from the weights alone (no growth records)
    from growkit.verify.pairing import zero_writer_layers

    fresh = grow_depth(m, 1, mode="identity", positions=[0])
    assert zero_writer_layers(fresh) == [False, True, False, False]


@pytest.mark.parametrize("depth_mode", ["identity", "stack"])
@pytest.mark.parametrize("family", FAMILIES)
def test_deepen_widened_is_scale_bilaterally_in_two_calls(family, depth_mode):
    """Widening, then deepen_widened (the pipeline checks the widening in between when it
    stacks): the same weights, config and growth records as scale_bilaterally in one call."""
    model = tiny_model(family)
    one = growth.scale_bilaterally(model, 2, 2, noise_std=1e-2, depth_mode=depth_mode, seed=3)
    wide = growth.grow_width(model, 2, noise_std=1e-2, seed=3)
    two = growth.deepen_widened(wide, 2, depth_mode)
    assert type(two) is type(one) and two.config.to_dict() == one.config.to_dict()
    assert [r.op for r in two.growth_records] == [r.op for r in one.growth_records] == ["width", "depth"]
    a, b = one.state_dict(), two.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="depth_mode"):
        growth.deepen_widened(wide, 2, "copy")


@pytest.mark.parametrize("family", FAMILIES)
def test_stack_scale_on_every_family(family):
    """stack_scale 0: identity blocks in G_stack's places, function-preserving and verified;
    0.5: every tensor of a stacked copy as in G_stack, except what writes to the residual
    stream (projections, or the output norms' effective gains, (1 + w) for Gemma), halved."""
    model = tiny_model(family)
    ids = probe(model)
    zero = growth.grow_depth(model, 2, mode="stack", stack_scale=0)
    assert max_rel(logits(zero, ids), logits(model, ids)) <= DEFAULT_TOL
    report = verify.run_growth_checks(model, zero, ids, device="cpu", scale_factor=1)
    assert report.passed, str(report)

    full = growth.grow_depth(model, 2, mode="stack")
    half = growth.grow_depth(model, 2, mode="stack", stack_scale=0.5)
    offset = 1.0 if "norm_offset" in growth.get_adapter(model).family.quirks else 0.0
    n_old = len(model.config.layer_types) if getattr(model.config, "layer_types", None) else model.config.num_hidden_layers
    f, h = full.state_dict(), half.state_dict()
    damped = [k for k in f if not torch.equal(f[k], h[k])]
    assert damped, "no tensor was damped"
    for k in damped:
        assert any(f".{i}." in k for i in range(n_old, n_old + 2)), f"{k}: not in a stacked layer"
        z = -offset if "norm" in k else 0.0
        assert torch.allclose(h[k] - z, 0.5 * (f[k] - z), rtol=1e-6, atol=1e-7), k
    # two residual writers per stacked layer at least (attention, MLP)
    for i in range(n_old, n_old + 2):
        assert sum(f".{i}." in k for k in damped) >= 2, (i, damped)
