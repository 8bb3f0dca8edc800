"""Reference Llama-style transformer (dense SwiGLU or MoE) and its checkpoint I/O."""

from .config import ModelConfig
from .io import load_model, model_from_state_dict, save_model
from .transformer import (
    MLP,
    Attention,
    Block,
    Experts,
    MoE,
    RMSNorm,
    Transformer,
    apply_rope,
    causal_lm_loss,
    rope_cos_sin,
    rotate_half,
)

__all__ = [
    "ModelConfig",
    "Transformer",
    "RMSNorm",
    "Attention",
    "MLP",
    "MoE",
    "Experts",
    "Block",
    "save_model",
    "load_model",
    "model_from_state_dict",
    "causal_lm_loss",
    "apply_rope",
    "rope_cos_sin",
    "rotate_half",
]
