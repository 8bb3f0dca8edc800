"""Dense -> mixture-of-experts upcycling (Komatsuzaki et al. 2022).

Every expert starts as a copy of the layer's dense MLP and a fresh router picks top_k of
them. When the chosen experts' weights sum to 1 (top-k, then renormalized: Mixtral,
``norm_topk_prob=True``) the output is ``sum_k w_k * MLP(x) = MLP(x)`` for ANY router, so
the upcycled model computes the dense function exactly::

    dense:  x -> MLP(x)
    MoE:    x -> sum_{e in topk(router(x))} w_e * MLP_e(x),   MLP_e = MLP,  sum w_e = 1

Without renormalization (Qwen-MoE style, ``norm_topk_prob=False``) the output is scaled by
the chosen experts' probability mass, which depends on the input; that is exact only
when ``top_k == n_experts`` (the mass is 1). Other settings are refused rather than
returning a silently shifted model.

The router starts small: N(0, router_std^2), default 0.02 (OLMoE's choice). N(0, 1) (e.g.
mergekit's ``random`` gate) gives logits of std ~ sqrt(d_model) on normalized inputs, so
routing starts one-hot on whichever expert happens to win.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapters import get_adapter
from .records import GrowthRecord, Source, attach_records
from .roles import ROLE_RULES, Role

DEFAULT_ROUTER_STD = 0.02


def _check(n_experts, top_k, router_std, expert_noise_std, seed, norm_topk_prob):
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 2:
        raise ValueError(f"n_experts must be a whole number >= 2, got {n_experts!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a whole number >= 1, got {top_k!r}")
    if top_k > n_experts:
        raise ValueError(f"top_k ({top_k}) must not exceed n_experts ({n_experts})")
    for name, v in (("router_std", router_std), ("expert_noise_std", expert_noise_std)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite float >= 0, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not norm_topk_prob and top_k != n_experts:
        raise ValueError(
            f"norm_topk_prob=False with top_k={top_k} < n_experts={n_experts} cannot be "
            "function-preserving: the output would be scaled by the chosen experts' routing "
            "mass. Use norm_topk_prob=True (renormalize the top-k weights, Mixtral style) or "
            "top_k=n_experts."
        )


@torch.no_grad()
def upcycle_to_moe(
    model: nn.Module,
    n_experts: int,
    top_k: int,
    *,
    router_std: float = DEFAULT_ROUTER_STD,
    expert_noise_std: float = 0.0,
    seed: int = 0,
    norm_topk_prob: bool | None = None,
) -> nn.Module:
    """Turn every dense MLP into ``n_experts`` copies behind a fresh top-``top_k`` router.

    Args:
        model: a dense model (left untouched; nothing is shared with it).
        n_experts: experts per layer, >= 2.
        top_k: experts per token, 1 <= top_k <= n_experts.
        router_std: std of the fresh router weights (default 0.02; see module docstring).
        expert_noise_std: i.i.d. noise added to each expert copy so experts differ from
            the start. Any value > 0 changes the function slightly (default 0: exact).
        seed: seeds the router and the expert noise.
        norm_topk_prob: renormalize the top-k weights; None keeps the model config's.

    Returns:
        The MoE model; exact for ``norm_topk_prob=True`` (or ``top_k == n_experts``)
        and ``expert_noise_std == 0``.
    """
    adapter = get_adapter(model, "MoE upcycling")
    if norm_topk_prob is None:
        norm_topk_prob = getattr(model.config, "norm_topk_prob", True)
    _check(n_experts, top_k, router_std, expert_noise_std, seed, norm_topk_prob)
    if adapter.is_moe(model):
        raise ValueError("model is already a mixture of experts: upcycle_to_moe takes a dense model")
    roles = adapter.param_roles(model)
    new_config = adapter.moe_config(model, n_experts, top_k, norm_topk_prob)

    # Random draws on the CPU in float32, so one seed gives one model on any device/dtype.
    gen = torch.Generator().manual_seed(seed)
    state, sources = {}, {}
    routers: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        pr = roles[name]
        expert_role = ROLE_RULES[pr.role].expert_role
        if expert_role is None:
            state[name] = tensor.clone()
            sources[name] = Source("copy", pr.role, name)
            continue
        stacked = tensor.unsqueeze(0).expand(n_experts, *tensor.shape).clone()
        if expert_noise_std > 0:
            noise = torch.randn(stacked.shape, generator=gen) * expert_noise_std
            stacked += noise.to(stacked.dtype).to(stacked.device)
        new_name = adapter.expert_name(name)
        state[new_name] = stacked
        sources[new_name] = Source("experts", expert_role, name, n_experts=n_experts)
        if pr.role is Role.MLP_GATE:
            routers[pr.layer] = new_name
    for layer, gate_name in sorted(routers.items()):
        gate = state[gate_name]
        d_model = gate.shape[-1]
        router = (torch.randn(n_experts, d_model, generator=gen) * router_std).to(gate.dtype).to(gate.device)
        name = adapter.router_name(layer)
        state[name] = router
        sources[name] = Source("fresh", Role.ROUTER, None, shape=tuple(router.shape))
    moe = adapter.build(new_config, state)
    moe.train(model.training)
    attach_records(moe, [GrowthRecord(
        "moe",
        dict(n_experts=n_experts, top_k=top_k, router_std=router_std,
             expert_noise_std=expert_noise_std, seed=seed, norm_topk_prob=norm_topk_prob),
        sources,
        function_preserving=expert_noise_std == 0,
    )])
    return moe
