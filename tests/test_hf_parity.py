"""The reference model computes what transformers' LlamaForCausalLM computes.

The same random weights (norm gains and biases too) are loaded into both; logits must
agree to float32 rounding, for MHA, GQA and MQA, with and without biases. This pins the
RoPE convention, the GQA head mapping and the RMSNorm placement to Llama's.
"""

import re

import pytest
import torch

from model_factory import random_ids, random_model, rel_err

pytest.importorskip("transformers", reason="the hf extra is needed: pip install -e '.[hf]'")

NAME_MAP = [
    (r"^embed\.weight$", "model.embed_tokens.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^layers\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"^layers\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
]


def hf_name(name: str) -> str:
    for pattern, repl in NAME_MAP:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(name)


def hf_twin(model):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False, attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias,
    )
    hf_cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(hf_cfg).eval()
    state = {hf_name(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("bias", [False, True])
def test_logits_match_llama(n_kv_heads, bias):
    model = random_model(seed=n_kv_heads, n_kv_heads=n_kv_heads, bias=bias)
    hf = hf_twin(model)
    ids = random_ids(shape=(2, 17))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert rel_err(ours, theirs) < 1e-5


def test_a_planted_difference_is_seen():
    model = random_model(seed=1, n_kv_heads=2)
    hf = hf_twin(model)
    with torch.no_grad():
        hf.model.layers[1].self_attn.k_proj.weight[3, 0] += 0.5
        ids = random_ids(shape=(2, 17))
        assert rel_err(model(ids), hf(ids).logits) > 1e-4
