"""Adapters: map a model's parameter names to roles, and its config to grown configs.

The growth rules (``roles.py``) never see a parameter name; an adapter translates. The
reference model (``growkit.models.Transformer``) is the first adapter; a Hugging Face
Llama/Qwen/Mixtral adapter needs only its own name patterns and config fields.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Protocol

import torch
from torch import nn

from .roles import ParamRole, Role


class Adapter(Protocol):
    """What the growth operators need to know about one architecture."""

    name: str

    def matches(self, model: nn.Module) -> bool: ...

    def param_roles(self, model: nn.Module) -> dict[str, ParamRole]:
        """Every parameter of ``model.state_dict()`` -> its role (ValueError if unknown)."""

    def n_layers(self, model: nn.Module) -> int: ...

    def rename_layer(self, name: str, new_layer: int) -> str:
        """The name of the same parameter in layer ``new_layer``."""

    def widen_config(self, model: nn.Module, scale: int): ...

    def deepen_config(self, model: nn.Module, n_layers: int): ...

    def moe_config(self, model: nn.Module, n_experts: int, top_k: int, norm_topk_prob: bool): ...

    def is_moe(self, model: nn.Module) -> bool: ...

    def build(self, config, state: dict[str, torch.Tensor]) -> nn.Module:
        """A model of ``config`` around ``state`` (tensors assigned, not copied)."""


class ReferenceAdapter:
    """``growkit.models.Transformer``."""

    name = "growkit-reference"

    _LAYER = r"layers\.(\d+)\."
    PATTERNS: list[tuple[str, Role]] = [
        (r"embed\.weight", Role.EMBEDDING),
        (r"norm\.weight", Role.NORM),
        (r"lm_head\.weight", Role.LM_HEAD),
        (_LAYER + r"(attn_norm|mlp_norm)\.weight", Role.NORM),
        (_LAYER + r"attn\.q_proj\.weight", Role.Q),
        (_LAYER + r"attn\.k_proj\.weight", Role.K),
        (_LAYER + r"attn\.v_proj\.weight", Role.V),
        (_LAYER + r"attn\.o_proj\.weight", Role.O),
        (_LAYER + r"attn\.q_proj\.bias", Role.Q_BIAS),
        (_LAYER + r"attn\.k_proj\.bias", Role.K_BIAS),
        (_LAYER + r"attn\.v_proj\.bias", Role.V_BIAS),
        (_LAYER + r"attn\.o_proj\.bias", Role.O_BIAS),
        (_LAYER + r"mlp\.gate_proj\.weight", Role.MLP_GATE),
        (_LAYER + r"mlp\.up_proj\.weight", Role.MLP_UP),
        (_LAYER + r"mlp\.down_proj\.weight", Role.MLP_DOWN),
        (_LAYER + r"mlp\.gate_proj\.bias", Role.MLP_GATE_BIAS),
        (_LAYER + r"mlp\.up_proj\.bias", Role.MLP_UP_BIAS),
        (_LAYER + r"mlp\.down_proj\.bias", Role.MLP_DOWN_BIAS),
        (_LAYER + r"mlp\.router\.weight", Role.ROUTER),
        (_LAYER + r"mlp\.experts\.gate_proj", Role.EXPERT_GATE),
        (_LAYER + r"mlp\.experts\.up_proj", Role.EXPERT_UP),
        (_LAYER + r"mlp\.experts\.down_proj", Role.EXPERT_DOWN),
        (_LAYER + r"mlp\.experts\.gate_bias", Role.EXPERT_GATE_BIAS),
        (_LAYER + r"mlp\.experts\.up_bias", Role.EXPERT_UP_BIAS),
        (_LAYER + r"mlp\.experts\.down_bias", Role.EXPERT_DOWN_BIAS),
    ]
    # dense MLP name -> expert name, for upcycling
    EXPERT_NAMES = {
        "mlp.gate_proj.weight": "mlp.experts.gate_proj",
        "mlp.up_proj.weight": "mlp.experts.up_proj",
        "mlp.down_proj.weight": "mlp.experts.down_proj",
        "mlp.gate_proj.bias": "mlp.experts.gate_bias",
        "mlp.up_proj.bias": "mlp.experts.up_bias",
        "mlp.down_proj.bias": "mlp.experts.down_bias",
    }

    def __init__(self) -> None:
        self._compiled = [(re.compile(p + r"$"), role) for p, role in self.PATTERNS]

    def matches(self, model: nn.Module) -> bool:
        from growkit.models import Transformer

        return isinstance(model, Transformer)

    def param_roles(self, model: nn.Module) -> dict[str, ParamRole]:
        roles = {}
        for name in model.state_dict():
            for pattern, role in self._compiled:
                m = pattern.match(name)
                if m:
                    roles[name] = ParamRole(role, int(m.group(1)) if m.groups() else None)
                    break
            else:
                raise ValueError(
                    f"parameter {name!r} has no growth role in adapter {self.name!r}: "
                    "add a pattern for it, or growth would leave it unscaled"
                )
        return roles

    def n_layers(self, model: nn.Module) -> int:
        return model.config.n_layers

    def rename_layer(self, name: str, new_layer: int) -> str:
        return re.sub(r"^layers\.\d+\.", f"layers.{new_layer}.", name, count=1)

    def expert_name(self, dense_name: str) -> str:
        m = re.match(r"^(layers\.\d+\.)(.*)$", dense_name)
        return m.group(1) + self.EXPERT_NAMES[m.group(2)]

    def router_name(self, layer: int) -> str:
        return f"layers.{layer}.mlp.router.weight"

    def widen_config(self, model: nn.Module, scale: int):
        cfg = model.config
        return dataclasses.replace(
            cfg,
            d_model=cfg.d_model * scale,
            n_heads=cfg.n_heads * scale,
            n_kv_heads=cfg.n_kv_heads * scale,
            head_dim=cfg.head_dim,
            d_ff=cfg.d_ff * scale,
            # Tied embeddings stay tied: the input side needs tile(E), the output side
            # tile(E)/s, so the 1/s moves into the saved logit scale.
            logit_scale=cfg.logit_scale / scale if cfg.tie_embeddings else cfg.logit_scale,
        )

    def deepen_config(self, model: nn.Module, n_layers: int):
        return dataclasses.replace(model.config, n_layers=n_layers)

    def moe_config(self, model: nn.Module, n_experts: int, top_k: int, norm_topk_prob: bool):
        return dataclasses.replace(model.config, n_experts=n_experts, top_k=top_k, norm_topk_prob=norm_topk_prob)

    def is_moe(self, model: nn.Module) -> bool:
        return model.config.n_experts > 0

    def build(self, config, state: dict[str, torch.Tensor]) -> nn.Module:
        from growkit.models import model_from_state_dict

        return model_from_state_dict(config, state)


ADAPTERS: list = [ReferenceAdapter()]


def register_adapter(adapter, *, first: bool = True) -> None:
    """Make growth work on another architecture (tried before the built-in ones)."""
    if first:
        ADAPTERS.insert(0, adapter)
    else:
        ADAPTERS.append(adapter)


def get_adapter(model: nn.Module, what: str = "growth"):
    """The adapter for ``model``; ValueError naming the fix when there is none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise ValueError(
        f"{what} of an unknown architecture {type(model).__name__}: no adapter maps its "
        "parameter names to growth roles. Use growkit.models.Transformer, or register "
        "one with growkit.growth.register_adapter()."
    )
