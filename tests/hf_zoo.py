"""Tiny random Hugging Face causal LMs, one per supported family, for the growth tests.

Every floating parameter is drawn at random (norm gains and biases too), so a growth bug
cannot hide behind a gain of ones or a bias of zeros. Sizes are tiny so the whole family
matrix runs on a CPU in seconds.

    from hf_zoo import FAMILIES, MOE_SIBLING, tiny_config, tiny_model, probe, logits

Notes on transformers (5.x) quirks handled here:

* Mixtral and Qwen3-MoE name the expert count ``num_local_experts`` (``num_experts`` is an
  alias in their ``attribute_map``); Qwen2-MoE's field is ``num_experts`` itself.
* Gemma-family RMSNorms compute ``x * (1 + w)`` (weight initialized to zeros); the others
  compute ``x * w``. The kind is found by behaviour (see :func:`norm_offset`).
* Gemma families tie the LM head to the input embedding by default.
* Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE drop ``sliding_window`` unless
  ``use_sliding_window=True``; the tiny configs here leave their sliding off.
"""

from __future__ import annotations

import torch
import transformers

FAMILIES = [
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
    "mixtral", "qwen2_moe", "qwen3_moe",
]
DENSE_FAMILIES = [f for f in FAMILIES if f not in ("mixtral", "qwen2_moe", "qwen3_moe")]
MOE_SIBLING = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3_text")

VOCAB = 96
SLIDING_WINDOW = 8
LAYER_TYPES_3 = ["sliding_attention", "full_attention", "sliding_attention"]

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILY_OVERRIDES: dict[str, dict] = {
    "mistral": dict(sliding_window=SLIDING_WINDOW),
    # query_pre_attn_scalar defaults to 256 (a 256-dim head): with 12-dim heads that flattens
    # attention to near-uniform, which would hide attention bugs; use the head dim.
    "gemma2": dict(sliding_window=SLIDING_WINDOW, layer_types=list(LAYER_TYPES_3), query_pre_attn_scalar=12),
    "gemma3_text": dict(sliding_window=SLIDING_WINDOW, layer_types=list(LAYER_TYPES_3), query_pre_attn_scalar=12),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                      shared_expert_intermediate_size=40),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
}


def tiny_config(family: str, **overrides) -> transformers.PretrainedConfig:
    """A tiny config of ``family`` (a transformers ``model_type``); keywords override."""
    kw = dict(BASE)
    kw.update(FAMILY_OVERRIDES.get(family, {}))
    kw.update(overrides)
    return transformers.AutoConfig.for_model(family, **kw)


def norm_offset(module: torch.nn.Module, dim: int) -> bool:
    """True if the norm computes ``x * (1 + w)`` (Gemma style), False if ``x * w``.

    Found by behaviour: with the weight zeroed, an offset norm still passes the normalized
    input through, a plain one returns zeros.
    """
    w = module.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.zero_()
        x = torch.randn(2, dim, generator=torch.Generator().manual_seed(0), dtype=w.dtype)
        y = module(x)
        w.copy_(saved)
    return bool(y.abs().max() > 0)


def _is_norm(module: torch.nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), torch.nn.Parameter)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Redraw every floating parameter in place (ties survive: each tensor is drawn once).

    Weights ~ N(0, std); norm gains 1 + std*N (or std*N for ``1 + w`` norms); biases 0.1*N.
    """
    gen = torch.Generator().manual_seed(seed)
    done: set[int] = set()

    def draw(p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=gen, dtype=torch.float32)

    # norms first, each found by module so the offset kind is known
    for _, module in model.named_modules():
        if not _is_norm(module) or id(module.weight) in done:
            continue
        w = module.weight
        offset = norm_offset(module, w.shape[-1])
        noise = draw(w)
        w.copy_(((0.0 if offset else 1.0) + std * noise).to(w.dtype))
        done.add(id(w))
        b = getattr(module, "bias", None)
        if isinstance(b, torch.nn.Parameter) and id(b) not in done:
            b.copy_((0.1 * draw(b)).to(b.dtype))
            done.add(id(b))
    for name, p in model.named_parameters():  # dedups tied parameters
        if id(p) in done or not p.is_floating_point():
            continue
        noise = draw(p)
        if name.endswith("bias"):
            p.copy_((0.1 * noise).to(p.dtype))
        else:
            p.copy_((std * noise).to(p.dtype))
        done.add(id(p))
    return model


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random causal LM of ``family`` (eager attention), in eval mode."""
    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    if cfg.tie_word_embeddings:
        assert is_tied(model), f"{family}: tied embeddings came untied"
    return model.to(dtype).eval()


def is_tied(model) -> bool:
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    return out is not None and (out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr())


def probe(model, batch: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """[batch, seq_len] random token ids in [3, vocab) (skipping pad / bos / eos)."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq_len), generator=gen)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids`` in float32 (no KV cache)."""
    return model(input_ids=ids, use_cache=False).logits.float()
