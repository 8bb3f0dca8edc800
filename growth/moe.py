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

from growkit.kernels.memory import check_memory

from .adapters import ADAPTERS, get_adapter
from .families import FAMILIES
from .plan import GrowthPlan, TensorPlan, TensorSpec, build_from_plan, copy_of, source_specs, zeros_like_source
from .records import GrowthRecord, Source
from .width import derive_seed
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


# what a dense MLP tensor becomes in a shared expert (quirk "shared_expert"): its gate and
# up projections are copied, its down projection zeroed, so it adds 0 at first
SHARED = {Role.MLP_GATE: Role.SHARED_GATE, Role.MLP_UP: Role.SHARED_UP, Role.MLP_DOWN: Role.SHARED_DOWN}


def upcycling_pairs() -> list[str]:
    """``"dense -> moe"`` for every family with an MoE sibling."""
    return [f"{f.name} -> {f.moe_sibling}" for f in FAMILIES.values() if f.moe_sibling and f.kind == "hf"]


def target_adapter(adapter):
    """The adapter of the family a dense model of ``adapter``'s family is upcycled into."""
    sibling = adapter.family.moe_sibling
    if sibling is None or sibling not in FAMILIES:
        raise ValueError(
            f"MoE upcycling of a {adapter.name!r} model: its family has no MoE sibling in growkit's "
            f"table (moe_sibling). Supported pairs: {', '.join(upcycling_pairs())}, and growkit's "
            "reference model."
        )
    return adapter if sibling == adapter.name else next(a for a in ADAPTERS if a.name == sibling)


def moe_config(adapter, target, config, n_experts: int, top_k: int, norm_topk_prob: bool):
    """The target family's config for the upcycled model: the source's settings that the
    target's config knows, carried over untouched, plus the MoE fields."""
    fields = dict(n_experts=n_experts, top_k=top_k, norm_topk_prob=norm_topk_prob,
                  moe_d_ff=adapter.cfg(config, "d_ff"), shared_d_ff=adapter.cfg(config, "d_ff"),
                  sparse_step=1, dense_layers=[])
    fields = {k: v for k, v in fields.items() if target.has(k)}
    if not target.is_hf:
        return target.config_with(config, **fields)
    from transformers import AutoConfig

    known = AutoConfig.for_model(target.name).to_dict()
    skip = {"model_type", "architectures", "transformers_version", "_name_or_path"}
    kwargs = {k: v for k, v in config.to_dict().items() if k in known and k not in skip}
    kwargs.update({target.family.config[k]: v for k, v in fields.items()})
    return AutoConfig.for_model(target.name, **kwargs)


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

    A ``transformers`` model becomes its family's MoE sibling (Llama and Mistral ->
    Mixtral, Qwen2 -> Qwen2-MoE, Qwen3 -> Qwen3-MoE; ``upcycling_pairs()``); the reference
    model stays a ``growkit.models.Transformer``. A Qwen2-MoE shared expert starts as a copy
    of the dense MLP with its down projection and its gate zeroed: it adds exactly 0.

    Args:
        model: a dense model (left untouched; nothing is shared with it).
        n_experts: experts per layer, >= 2.
        top_k: experts per token, 1 <= top_k <= n_experts.
        router_std: std of the fresh router weights (default 0.02; see module docstring).
        expert_noise_std: i.i.d. noise added to each expert copy so experts differ from
            the start. Any value > 0 changes the function slightly (default 0: exact).
        seed: seeds the router and the expert noise.
        norm_topk_prob: renormalize the top-k weights; None: the model config's (reference
            model), else True. A target that always renormalizes (Mixtral) refuses False.

    Returns:
        The MoE model; exact for ``norm_topk_prob=True`` (or ``top_k == n_experts``)
        and ``expert_noise_std == 0``.
    """
    adapter = get_adapter(model, "MoE upcycling")
    target = target_adapter(adapter)
    always = "renormalized_topk" in target.family.quirks
    if norm_topk_prob is None:
        norm_topk_prob = bool(adapter.cfg(model, "norm_topk_prob", True)) if not always else True
    elif always and norm_topk_prob is not True:
        raise ValueError(f"norm_topk_prob=False: {target.name} always renormalizes its top-k weights; pass None or True")
    if not always and not target.has("norm_topk_prob"):
        norm_topk_prob = False  # a target that never renormalizes
    _check(n_experts, top_k, router_std, expert_noise_std, seed, norm_topk_prob)
    if adapter.is_moe(model):
        raise ValueError("model is already a mixture of experts: upcycle_to_moe takes a dense model")
    specs, state, tied = source_specs(adapter, model)
    # The upcycled model's size (every MLP tensor n_experts times) against the free memory.
    roles = adapter.roles_for_names(specs)
    check_memory(sum(s.nbytes * (n_experts if roles[n].rule.expert_role is not None else 1)
                     for n, s in specs.items()),
                 next(iter(state.values())).device, f"n_experts={n_experts}")
    plan = plan_moe(adapter, target, model.config, specs, tied, n_experts, top_k, router_std=router_std,
                    expert_noise_std=expert_noise_std, seed=seed, norm_topk_prob=norm_topk_prob)
    return build_from_plan(plan, plan.execute(state.__getitem__), like=model)


def plan_moe(adapter, target, config, specs: dict[str, TensorSpec], tied: bool, n_experts: int, top_k: int, *,
             router_std: float, expert_noise_std: float, seed: int, norm_topk_prob: bool) -> GrowthPlan:
    """The upcycling plan of a dense source described by its config and tensor specs (role
    names; arguments already checked). See :func:`upcycle_to_moe`.

    Every random draw (router, expert noise) comes from a generator seeded by (seed, the
    new tensor's name), on the CPU in float32: one seed gives one model on any device,
    dtype, or order of making the tensors."""
    roles = adapter.roles_for_names(specs)
    shared = "shared_expert" in target.family.quirks
    # every tensor's new name, checked before anything is made
    tensors = {}
    for name, pr in roles.items():
        expert_role = pr.rule.expert_role
        if expert_role is None:
            if target.role_of(name) is not pr.role:
                raise ValueError(
                    f"{name} ({pr.role.value}) has no counterpart in {target.name}: the {adapter.name} "
                    f"model uses a feature its MoE sibling lacks (e.g. attention or MLP biases)"
                )
            tensors[name] = TensorPlan(specs[name], Source("copy", pr.role, name), copy_of(name), (name,))
            continue
        if not target.has_role(expert_role):
            raise ValueError(
                f"{name} ({pr.role.value}) would become {expert_role.value}, which {target.name} "
                "lacks (e.g. expert biases): this model cannot be upcycled into it exactly"
            )
        new_name = target.tensor_name(expert_role, pr.layer)
        spec = TensorSpec((n_experts, *specs[name].shape), specs[name].dtype)
        tensors[new_name] = TensorPlan(spec, Source("experts", expert_role, name, n_experts=n_experts),
                                       _experts(name, n_experts, expert_noise_std, derive_seed(seed, new_name)), (name,))
        if shared and pr.role in SHARED:
            shared_name = target.tensor_name(SHARED[pr.role], pr.layer)
            writes = ROLE_RULES[SHARED[pr.role]].writes_residual
            tensors[shared_name] = TensorPlan(specs[name], Source("zero" if writes else "copy", SHARED[pr.role], name),
                                              zeros_like_source(name) if writes else copy_of(name), (name,))
    for name, pr in roles.items():
        if pr.role is not Role.MLP_GATE:
            continue
        d_model, dtype = specs[name].shape[-1], specs[name].dtype
        router = target.tensor_name(Role.ROUTER, pr.layer)
        tensors[router] = TensorPlan(TensorSpec((n_experts, d_model), dtype), Source("fresh", Role.ROUTER, None, shape=(n_experts, d_model)),
                                     _router(name, n_experts, router_std, derive_seed(seed, router)), (name,))
        if shared:
            gate = target.tensor_name(Role.SHARED_EXPERT_GATE, pr.layer)
            tensors[gate] = TensorPlan(TensorSpec((1, d_model), dtype), Source("fresh", Role.SHARED_EXPERT_GATE, None, shape=(1, d_model)),
                                       _router(name, 1, 0.0, 0), (name,))
    record = GrowthRecord(
        "moe",
        dict(n_experts=n_experts, top_k=top_k, router_std=router_std, expert_noise_std=expert_noise_std,
             seed=seed, norm_topk_prob=norm_topk_prob, family=target.name),
        {n: t.source for n, t in tensors.items()},
        function_preserving=expert_noise_std == 0,
        notes=["shared expert: dense MLP copied, down projection and gate zeroed (adds 0 at first)"] if shared else [],
    )
    new_config = moe_config(adapter, target, config, n_experts, top_k, norm_topk_prob)
    return GrowthPlan(target, new_config, tensors, record, tied)


def _experts(name, n_experts, noise_std, seed):
    def make(get):
        t = get(name)
        stacked = t.unsqueeze(0).expand(n_experts, *t.shape).clone()
        if noise_std > 0:
            gen = torch.Generator().manual_seed(seed)
            stacked += (torch.randn(stacked.shape, generator=gen) * noise_std).to(stacked.dtype).to(stacked.device)
        return stacked

    return make


def _router(gate_name, rows, std, seed):
    """A fresh [rows, d] router on the dense gate's device and dtype: N(0, std^2), or zeros."""
    def make(get):
        gate = get(gate_name)
        d_model = gate.shape[-1]
        if std == 0:
            return torch.zeros(rows, d_model, dtype=gate.dtype, device=gate.device)
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(rows, d_model, generator=gen) * std).to(gate.dtype).to(gate.device)

    return make
