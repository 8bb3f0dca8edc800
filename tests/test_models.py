"""Tests of the reference transformer in growkit.models (tiny configs, CPU, fast)."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import growkit.models.io as models_io
from growkit.models import (
    MLP,
    Attention,
    Block,
    Experts,
    ModelConfig,
    MoE,
    RMSNorm,
    Transformer,
    apply_rope,
    causal_lm_loss,
    load_model,
    rope_cos_sin,
    save_model,
)

ATTN_KINDS = {"mha": 4, "gqa": 2, "mqa": 1}  # n_kv_heads for n_heads=4


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16)
    base.update(overrides)
    return ModelConfig(**base)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Gives every parameter (norms and biases too) a non-trivial random value.

    Default init has zero biases and unit norms, which would hide a forgotten bias or a
    norm applied in the wrong place; these values make every parameter matter.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * r
        elif "bias" in name:
            value = 0.1 * r
        elif name == "embed.weight":
            value = r
        elif p.dim() >= 2:
            value = r / math.sqrt(p.shape[-1])  # fan_in of an [.., out, in] weight
        else:
            value = r
        p.copy_(value.to(p.dtype))
    return model


def ids(cfg: ModelConfig, B: int = 2, T: int = 7, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=gen)


# --------------------------------------------------------------------- references


def ref_rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_rope(x, theta):
    """Pairwise rotation written out per dimension pair (i, i + D/2), no rotate_half."""
    B, T, H, D = x.shape
    half = D // 2
    out = torch.empty_like(x)
    for i in range(half):
        freq = theta ** (-2.0 * i / D)
        ang = torch.arange(T, dtype=x.dtype) * freq
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * c - b * s
        out[..., i + half] = b * c + a * s
    return out


def ref_attention(sd, prefix, x, cfg):
    """Per-head attention with explicit repeat_interleave of kv heads and a causal mask."""
    B, T, _ = x.shape
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def lin(name, inp):
        return F.linear(inp, sd[f"{prefix}.{name}.weight"], sd.get(f"{prefix}.{name}.bias"))

    q = lin("q_proj", x).view(B, T, H, D)
    k = lin("k_proj", x).view(B, T, K, D)
    v = lin("v_proj", x).view(B, T, K, D)
    q, k = ref_rope(q, cfg.rope_theta), ref_rope(k, cfg.rope_theta)
    k = k.repeat_interleave(H // K, dim=2)  # query head i -> kv head i // (H // K)
    v = v.repeat_interleave(H // K, dim=2)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for h in range(H):
        scores = q[:, :, h] @ k[:, :, h].transpose(-1, -2) / math.sqrt(D)  # [B, T, T]
        scores = scores.masked_fill(~mask, float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, :, h])  # [B, T, D]
    return lin("o_proj", torch.cat(heads, dim=-1))


def ref_swiglu(x, wg, wu, wd, bg=None, bu=None, bd=None):
    return F.linear(F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)


def ref_moe(sd, prefix, x, cfg):
    """Runs every expert on every token and combines with a dense top-k weight matrix."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    probs = F.linear(x, sd[f"{prefix}.router.weight"]).softmax(-1)  # [N, E]
    top_w, top_i = probs.topk(cfg.top_k, dim=-1)
    if cfg.norm_topk_prob:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    dense_w = torch.zeros_like(probs).scatter(1, top_i, top_w)  # [N, E]
    out = torch.zeros_like(x)
    for e in range(cfg.n_experts):
        g = lambda n: sd.get(f"{prefix}.experts.{n}")  # noqa: E731
        y = ref_swiglu(
            x,
            g("gate_proj")[e],
            g("up_proj")[e],
            g("down_proj")[e],
            None if g("gate_bias") is None else g("gate_bias")[e],
            None if g("up_bias") is None else g("up_bias")[e],
            None if g("down_bias") is None else g("down_bias")[e],
        )
        out = out + dense_w[:, e : e + 1] * y
    return out.reshape(shape)


def ref_forward(model: Transformer, input_ids):
    """Independent forward written from the parameter names alone."""
    cfg = model.config
    sd = model.state_dict()
    h = sd["embed.weight"][input_ids]
    hidden = [h]
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        a = ref_rms(h, sd[f"{p}.attn_norm.weight"], cfg.norm_eps)
        h = h + ref_attention(sd, f"{p}.attn", a, cfg)
        x = ref_rms(h, sd[f"{p}.mlp_norm.weight"], cfg.norm_eps)
        if cfg.n_experts:
            h = h + ref_moe(sd, f"{p}.mlp", x, cfg)
        else:
            h = h + ref_swiglu(
                x,
                sd[f"{p}.mlp.gate_proj.weight"],
                sd[f"{p}.mlp.up_proj.weight"],
                sd[f"{p}.mlp.down_proj.weight"],
                sd.get(f"{p}.mlp.gate_proj.bias"),
                sd.get(f"{p}.mlp.up_proj.bias"),
                sd.get(f"{p}.mlp.down_proj.bias"),
            )
        hidden.append(h)
    w_out = sd["embed.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    logits = F.linear(ref_rms(h, sd["norm.weight"], cfg.norm_eps), w_out) * cfg.logit_scale
    return logits, hidden


# --------------------------------------------------------------------- shapes / names


@pytest.mark.parametrize("attn", list(ATTN_KINDS))
@pytest.mark.parametrize("n_experts", [0, 4])
@pytest.mark.parametrize("tied", [False, True])
def test_shapes(attn, n_experts, tied):
    cfg = tiny_config(n_kv_heads=ATTN_KINDS[attn], n_experts=n_experts, tie_embeddings=tied)
    model = Transformer(cfg)
    x = ids(cfg, B=3, T=5)
    logits, hidden = model(x, return_hidden_states=True)
    assert logits.shape == (3, 5, cfg.vocab_size)
    assert isinstance(hidden, tuple) and len(hidden) == cfg.n_layers + 1
    assert all(h.shape == (3, 5, cfg.d_model) for h in hidden)
    assert torch.equal(hidden[0], model.embed(x))
    assert torch.equal(model(x), logits)
    assert hasattr(model, "lm_head") != tied
    names = dict(model.named_parameters())
    assert ("lm_head.weight" in names) != tied
    kv = cfg.n_kv_heads * cfg.head_dim
    assert names["layers.1.attn.k_proj.weight"].shape == (kv, cfg.d_model)
    if n_experts:
        assert isinstance(model.layers[0].mlp, MoE)
        assert names["layers.1.mlp.router.weight"].shape == (4, cfg.d_model)
        assert names["layers.1.mlp.experts.down_proj"].shape == (4, cfg.d_model, cfg.d_ff)
        assert len(model.router_logits()) == cfg.n_layers
        assert all(r.shape == (15, 4) and r.dtype == torch.float32 for r in model.router_logits())
    else:
        assert names["layers.0.mlp.gate_proj.weight"].shape == (cfg.d_ff, cfg.d_model)
        assert model.router_logits() == []
        assert model.aux_loss().item() == 0.0


def test_parameter_names_and_counts():
    cfg = tiny_config(n_kv_heads=2, attn_bias=True, mlp_bias=True, n_experts=3, top_k=1)
    names = {n: tuple(p.shape) for n, p in Transformer(cfg).named_parameters()}
    E, d, f = 3, cfg.d_model, cfg.d_ff
    assert names["embed.weight"] == (cfg.vocab_size, d)
    assert names["norm.weight"] == (d,)
    assert names["lm_head.weight"] == (cfg.vocab_size, d)
    assert names["layers.0.attn.q_proj.weight"] == (cfg.n_heads * cfg.head_dim, d)
    assert names["layers.0.attn.o_proj.weight"] == (d, cfg.n_heads * cfg.head_dim)
    assert names["layers.0.attn.q_proj.bias"] == (cfg.n_heads * cfg.head_dim,)
    assert names["layers.1.mlp.experts.gate_proj"] == (E, f, d)
    assert names["layers.1.mlp.experts.up_proj"] == (E, f, d)
    assert names["layers.1.mlp.experts.gate_bias"] == (E, f)
    assert names["layers.1.mlp.experts.down_bias"] == (E, d)
    assert "layers.1.mlp.router.bias" not in names
    tied = Transformer(tiny_config(tie_embeddings=True))
    untied = Transformer(tiny_config())
    assert untied.num_parameters() - tied.num_parameters() == 37 * 32
    assert tied.num_parameters() == sum(p.numel() for p in tied.parameters())


def test_explicit_head_dim_decoupled_from_d_model():
    # Width growth keeps head_dim while scaling n_heads and d_model independently.
    cfg = tiny_config(d_model=32, n_heads=6, n_kv_heads=3, head_dim=8)
    model = randomize_(Transformer(cfg))
    assert model.layers[0].attn.q_proj.weight.shape == (48, 32)
    x = ids(cfg)
    with torch.no_grad():
        ref, _ = ref_forward(model.double(), x)
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------- full reference


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_kv_heads=4),
        dict(n_kv_heads=2, attn_bias=True, mlp_bias=True),
        dict(n_kv_heads=1, tie_embeddings=True, logit_scale=0.5),
        dict(n_kv_heads=2, n_experts=4, top_k=2, mlp_bias=True, attn_bias=True),
        dict(n_kv_heads=1, n_experts=3, top_k=1, norm_topk_prob=False, tie_embeddings=True),
    ],
    ids=["mha", "gqa-bias", "mqa-tied-scale", "gqa-moe-bias", "mqa-moe-top1"],
)
def test_matches_independent_reference(overrides):
    cfg = tiny_config(rope_theta=500.0, **overrides)  # small theta: every pair rotates
    model = randomize_(Transformer(cfg)).double()
    x = ids(cfg, T=9)
    with torch.no_grad():
        logits, hidden = model(x, return_hidden_states=True)
        ref_logits, ref_hidden = ref_forward(model, x)
    # float64 everywhere except the float32 RoPE tables, hence 1e-6 rather than 1e-12.
    for h, r in zip(hidden, ref_hidden):
        torch.testing.assert_close(h, r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------- attention / RoPE


@pytest.mark.parametrize("n_experts", [0, 4])
def test_causal_masking(n_experts):
    cfg = tiny_config(n_kv_heads=2, n_experts=n_experts)
    model = randomize_(Transformer(cfg))
    x = ids(cfg, B=2, T=10)
    t = 6
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(x), model(y)
    # MoE regroups tokens per expert, so batch composition (and BLAS blocking) may change.
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-5)
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-4


def test_rope_matches_pairwise_rotation():
    x = torch.randn(2, 11, 3, 8, dtype=torch.float64)
    cos, sin = rope_cos_sin(11, 8, theta=100.0)
    assert cos.dtype == torch.float32 and cos.shape == (11, 8)
    out = apply_rope(x, cos.double(), sin.double())
    torch.testing.assert_close(out, ref_rope(x, 100.0), rtol=1e-6, atol=1e-6)
    # Position 0 is the identity and rotations preserve the norm.
    torch.testing.assert_close(out[:, 0], x[:, 0])
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))


def test_rope_scores_depend_only_on_relative_position():
    D, T = 16, 24
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(D, generator=gen)
    k = torch.randn(D, generator=gen)
    cos, sin = rope_cos_sin(T, D, theta=10000.0)
    # The same q and k vectors at every position: [1, T, 1, D].
    rq = apply_rope(q.expand(1, T, 1, D), cos, sin)[0, :, 0]
    rk = apply_rope(k.expand(1, T, 1, D), cos, sin)[0, :, 0]
    scores = rq @ rk.T  # scores[i, j] = <R_i q, R_j k>
    for offset in range(-T + 1, T):
        diag = torch.diagonal(scores, offset=offset)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-4, atol=1e-4)
    # And the score really does vary with i - j (the test is not vacuous).
    assert abs(float(scores.diagonal(0)[0]) - float(scores.diagonal(3)[0])) > 1e-3


def test_rope_bf16_input_keeps_dtype():
    x = torch.randn(1, 5, 2, 8).bfloat16()
    cos, sin = rope_cos_sin(5, 8)
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), apply_rope(x.float(), cos, sin), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_gqa_head_mapping(n_kv_heads):
    cfg = tiny_config(n_heads=4, n_kv_heads=n_kv_heads, attn_bias=True, rope_theta=100.0)
    attn = randomize_(Attention(cfg), seed=n_kv_heads)
    x = torch.randn(2, 6, cfg.d_model)
    with torch.no_grad():
        out = attn(x)
        sd = {f"a.{k}": v for k, v in attn.state_dict().items()}
        ref = ref_attention(sd, "a", x, cfg)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if 1 < n_kv_heads < cfg.n_heads:
        # The other plausible mapping (head i -> kv head i % K) must give something else,
        # otherwise this test could not tell them apart.
        wrong = dict(sd)
        H, K, D = cfg.n_heads, n_kv_heads, cfg.head_dim
        perm = torch.tensor([(i % K) * (H // K) + i // K for i in range(H)])
        idx = (perm[:, None] * D + torch.arange(D)).reshape(-1)
        wrong["a.q_proj.weight"] = sd["a.q_proj.weight"][idx]
        wrong["a.q_proj.bias"] = sd["a.q_proj.bias"][idx]
        assert not torch.allclose(ref_attention(wrong, "a", x, cfg), out, atol=1e-3)


def test_sequence_longer_than_max_seq_len():
    cfg_short = tiny_config(max_seq_len=4)
    cfg_long = tiny_config(max_seq_len=64)
    a = randomize_(Transformer(cfg_short))
    b = Transformer(cfg_long)
    b.load_state_dict(a.state_dict())
    x = ids(cfg_short, T=12)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-6)


# --------------------------------------------------------------------- MLP / MoE


def test_rmsnorm():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(8))
    x = torch.randn(3, 8)
    torch.testing.assert_close(norm(x), ref_rms(x, norm.weight, 1e-6))
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def upcycled_moe(cfg: ModelConfig, mlp: MLP) -> MoE:
    """An MoE whose experts are all copies of ``mlp`` (what upcycling does)."""
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)  # non-uniform routing
        for e in range(cfg.n_experts):
            moe.experts.gate_proj[e].copy_(mlp.gate_proj.weight)
            moe.experts.up_proj[e].copy_(mlp.up_proj.weight)
            moe.experts.down_proj[e].copy_(mlp.down_proj.weight)
            if cfg.mlp_bias:
                moe.experts.gate_bias[e].copy_(mlp.gate_proj.bias)
                moe.experts.up_bias[e].copy_(mlp.up_proj.bias)
                moe.experts.down_bias[e].copy_(mlp.down_proj.bias)
    return moe


@pytest.mark.parametrize(
    "top_k,norm_topk_prob", [(1, True), (2, True), (4, False)], ids=["top1", "top2", "all-nonorm"]
)
def test_moe_with_identical_experts_equals_dense(top_k, norm_topk_prob):
    cfg = tiny_config(n_experts=4, top_k=top_k, norm_topk_prob=norm_topk_prob, mlp_bias=True)
    mlp = randomize_(MLP(cfg))
    moe = upcycled_moe(cfg, mlp)
    x = torch.randn(3, 5, cfg.d_model)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), mlp(x), rtol=1e-5, atol=1e-5)
        # Routing really is spread over several experts.
        assert moe.last_router_logits.argmax(-1).unique().numel() > 1


def test_upcycled_model_equals_dense_model():
    """Copying dense MLP weights into every expert slice by name preserves the model."""
    dense_cfg = tiny_config(n_kv_heads=2, mlp_bias=True)
    moe_cfg = tiny_config(n_kv_heads=2, mlp_bias=True, n_experts=4, top_k=2)
    dense = randomize_(Transformer(dense_cfg))
    moe = randomize_(Transformer(moe_cfg), seed=1)
    sd = dense.state_dict()
    new = {}
    for name, p in moe.state_dict().items():
        if ".mlp.experts." in name:
            layer, param = name.split(".mlp.experts.")
            proj, kind = param.rsplit("_", 1)  # gate_proj -> (gate, proj); gate_bias
            src = f"{layer}.mlp.{proj}_proj.{'weight' if kind == 'proj' else 'bias'}"
            new[name] = sd[src].unsqueeze(0).expand_as(p).clone()
        elif ".mlp.router." in name:
            new[name] = p
        else:
            new[name] = sd[name]
    moe.load_state_dict(new)
    x = ids(dense_cfg)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)


def test_moe_matches_all_experts_reference():
    cfg = tiny_config(n_experts=5, top_k=2, mlp_bias=True)
    moe = randomize_(MoE(cfg))
    x = torch.randn(4, 6, cfg.d_model)
    sd = {f"m.{k}": v for k, v in moe.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(moe(x), ref_moe(sd, "m", x, cfg), rtol=1e-5, atol=1e-5)


def test_moe_backward_reaches_router_and_experts():
    cfg = tiny_config(n_experts=4, top_k=2)
    model = randomize_(Transformer(cfg))
    x = ids(cfg, B=4, T=8)
    loss = model.loss(x, torch.roll(x, -1, dims=1))
    assert loss.dtype == torch.float32
    loss.backward()
    for layer in model.layers:
        assert layer.mlp.router.weight.grad.abs().sum() > 0
        assert layer.mlp.experts.gate_proj.grad.abs().sum() > 0
        assert layer.mlp.last_router_logits.requires_grad


def test_aux_loss_uniform_routing_is_one():
    cfg = tiny_config(n_experts=4, top_k=2)
    model = Transformer(cfg)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.weight.zero_()
        model(ids(cfg, B=2, T=8))
    for moe in model.moe_layers():
        assert moe.last_aux_loss.dtype == torch.float32 and moe.last_aux_loss.dim() == 0
        assert moe.last_aux_loss.item() == pytest.approx(1.0, abs=1e-5)
    assert model.aux_loss().item() == pytest.approx(cfg.n_layers, abs=1e-5)


def test_aux_loss_random_routing_finite_and_in_loss():
    cfg = tiny_config(n_experts=4, top_k=1, aux_loss_coef=0.5)
    model = randomize_(Transformer(cfg))
    x = ids(cfg, B=2, T=8)
    targets = torch.roll(x, -1, dims=1)
    logits = model(x)
    aux = model.aux_loss()
    assert torch.isfinite(aux) and aux.item() >= 0.99 * cfg.n_layers  # minimum is 1 per layer
    ce = causal_lm_loss(logits, targets)
    with torch.no_grad():
        total = model.loss(x, targets)
        plain = model.loss(x, targets, include_aux=False)
    torch.testing.assert_close(total, ce + 0.5 * aux)
    torch.testing.assert_close(plain, ce)


def test_causal_lm_loss():
    logits = torch.randn(2, 3, 11).bfloat16()
    targets = torch.randint(0, 11, (2, 3))
    targets[0, 0] = -100
    loss = causal_lm_loss(logits, targets)
    assert loss.dtype == torch.float32
    mask = targets != -100
    ref = F.cross_entropy(logits.float()[mask], targets[mask])
    torch.testing.assert_close(loss, ref)


def test_block_and_experts_standalone():
    cfg = tiny_config(n_experts=2, top_k=1)
    block = Block(cfg)
    assert isinstance(block.mlp, MoE) and isinstance(block.mlp.experts, Experts)
    x = torch.randn(2, 4, cfg.d_model)
    assert block(x).shape == x.shape


# --------------------------------------------------------------------- init


def test_init_weights_seeded_and_scaled():
    cfg = tiny_config(d_model=64, n_layers=8, n_experts=2, d_ff=256, attn_bias=True)
    a, b = Transformer(cfg), Transformer(cfg)
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    sd = a.state_dict()
    assert torch.all(sd["layers.0.attn_norm.weight"] == 1)
    assert torch.all(sd["layers.0.attn.q_proj.bias"] == 0)
    assert sd["layers.0.attn.q_proj.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    scaled = 0.02 / math.sqrt(16)
    assert sd["layers.0.attn.o_proj.weight"].std().item() == pytest.approx(scaled, rel=0.1)
    assert sd["layers.0.mlp.experts.down_proj"].std().item() == pytest.approx(scaled, rel=0.1)
    assert sd["layers.0.mlp.experts.up_proj"].std().item() == pytest.approx(0.02, rel=0.1)
    a.init_weights(seed=4)
    assert not torch.equal(a.embed.weight, b.embed.weight)


# --------------------------------------------------------------------- dtype


def test_bf16_forward_close_to_fp32():
    cfg = tiny_config(n_kv_heads=2)
    model = randomize_(Transformer(cfg))
    x = ids(cfg, T=9)
    with torch.no_grad():
        ref = model(x)
        model.to(torch.bfloat16)
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert model.rope_cos.dtype == torch.float32  # healed after .to(bf16)
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05


def test_bf16_moe_forward_runs():
    cfg = tiny_config(n_experts=4, top_k=2, tie_embeddings=True, mlp_bias=True)
    model = randomize_(Transformer(cfg)).to(torch.bfloat16)
    logits, hidden = model(ids(cfg), return_hidden_states=True)
    assert logits.dtype == torch.bfloat16 and hidden[-1].dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()
    assert model.aux_loss().dtype == torch.float32


# --------------------------------------------------------------------- config


def test_config_defaults_resolved():
    cfg = ModelConfig()
    assert cfg.n_kv_heads == 4 and cfg.head_dim == 16
    assert cfg.d_ff == 176  # int(8 * 64 / 3) = 170 -> next multiple of 8
    assert cfg.d_ff % 8 == 0
    assert ModelConfig(d_model=48, n_heads=4).d_ff == 128


def test_config_round_trip(tmp_path):
    cfg = tiny_config(n_kv_heads=1, n_experts=3, top_k=1, tie_embeddings=True, logit_scale=2.0)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert ModelConfig.from_json(path) == cfg
    assert json.loads(path.read_text())["head_dim"] == 8


def test_config_to_json_is_atomic(tmp_path, monkeypatch):
    """A write that fails midway leaves the file as it was and no temporary beside it."""
    cfg = tiny_config()
    path = tmp_path / "c.json"
    cfg.to_json(path)
    before = path.read_bytes()
    real_open = open

    def failing_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            f.write('{"d_model": ')  # half a config, then the disk fills
            raise OSError(28, "No space left on device")
        return f

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(OSError):
        dataclasses.replace(cfg, d_model=2 * cfg.d_model).to_json(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(d_model=30, n_heads=4), "d_model"),
        (dict(n_heads=4, n_kv_heads=3), "n_heads"),
        (dict(d_model=24, n_heads=8), "head_dim"),  # head_dim 3 is odd
        (dict(head_dim=7), "head_dim"),
        (dict(n_experts=1), "n_experts"),
        (dict(n_experts=-2), "n_experts"),
        (dict(n_experts=4, top_k=5), "top_k"),
        (dict(n_experts=4, top_k=0), "top_k"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layers=-1), "n_layers"),
        (dict(d_ff=0), "d_ff"),
        (dict(n_kv_heads=0), "n_kv_heads"),
        (dict(n_layers=2.0), "n_layers"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(logit_scale=float("nan")), "logit_scale"),
        (dict(tie_embeddings=1), "tie_embeddings"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_config_top_k_ignored_for_dense():
    assert ModelConfig(n_experts=0, top_k=7).top_k == 7


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="n_head"):
        ModelConfig.from_dict({"n_head": 4})


# --------------------------------------------------------------------- save / load


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(tie_embeddings=True, logit_scale=0.25),
        dict(n_kv_heads=2, n_experts=4, top_k=2, mlp_bias=True, attn_bias=True),
    ],
    ids=["untied", "tied", "moe"],
)
def test_save_load_round_trip(tmp_path, overrides):
    cfg = tiny_config(**overrides)
    model = randomize_(Transformer(cfg))
    save_model(model, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == cfg
    assert all(p.requires_grad for p in loaded.parameters())
    x = ids(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(model.state_dict())
    assert ("lm_head.weight" in keys) != cfg.tie_embeddings
    assert not any(k.startswith("rope") for k in keys)


def test_save_load_dtype(tmp_path):
    cfg = tiny_config(n_experts=2, top_k=1)
    model = randomize_(Transformer(cfg)).to(torch.bfloat16)
    save_model(model, tmp_path)
    same = load_model(tmp_path)
    assert same.embed.weight.dtype == torch.bfloat16
    x = ids(cfg)
    with torch.no_grad():
        assert torch.equal(same(x), model(x))
    up = load_model(tmp_path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in up.parameters())
    assert up.rope_cos.dtype == torch.float32 and up.rope_cos.device.type == "cpu"


def test_save_overwrites_atomically(tmp_path, monkeypatch):
    cfg = tiny_config()
    first = randomize_(Transformer(cfg), seed=0)
    save_model(first, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(models_io, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_model(randomize_(Transformer(cfg), seed=1), tmp_path)
    # The failed write left the old checkpoint intact and no temporary files behind.
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == before
    monkeypatch.undo()

    second = randomize_(Transformer(cfg), seed=1)
    save_model(second, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    x = ids(cfg)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(x), second(x))


def test_load_rejects_mismatched_keys(tmp_path):
    cfg = tiny_config()
    model = Transformer(cfg)
    save_model(model, tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}

    extra = dict(state, **{"layers.0.attn.q_proj.bias": torch.zeros(cfg.d_model)})
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys \['layers.0.attn.q_proj.bias'\]"):
        load_model(tmp_path)

    missing = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['lm_head.weight'\]"):
        load_model(tmp_path)

    wrong = dict(state, **{"norm.weight": torch.ones(cfg.d_model + 1)})
    save_file(wrong, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="norm.weight"):
        load_model(tmp_path)


def test_load_rejects_lm_head_for_tied_config(tmp_path):
    untied = Transformer(tiny_config())
    save_model(untied, tmp_path)
    (tmp_path / "config.json").write_text(tiny_config(tie_embeddings=True).to_json_str())
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(tmp_path)
