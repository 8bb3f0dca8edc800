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
returning a silently shifted model. Softmax before top-k with renormalization (Mixtral,
Qwen-MoE with ``norm_topk_prob=True``, the reference model) and softmax over the top-k
logits give the same weights, so where the softmax sits only matters without
renormalization. The target config always states ``norm_topk_prob`` (Qwen-MoE; Mixtral has
no such field and always renormalizes), so a change of transformers' default (False
today) cannot flip it; tests/test_router_init.py runs each target class's own forward.

Partial upcycling (``layers=``): only the chosen layers become MoE, the others keep their
dense MLP, copied. The output config says which: Qwen2-MoE / Qwen3-MoE through
``decoder_sparse_step = 1`` and ``mlp_only_layers`` (the other layers; always this one
form, also for ``"every:K"``, which ``decoder_sparse_step = K`` could express: one field
then says everything, the form depth growth writes too), the reference model through
``ModelConfig.dense_layers``. Mixtral (the sibling of Llama and Mistral) has no per-layer
field: a partial choice into it is refused before anything is allocated.

Router initializations (``router_init``). Since any router is exact here (renormalized
top-k over identical experts), they all preserve the function exactly; they differ in
how tokens are routed at the start, and so in what the experts learn first:

* ``normal`` (default): i.i.d. N(0, router_std^2), router_std 0.02 (OLMoE's choice): logits
  of std ~ 0.02 * sqrt(d_model) on normalized inputs, so routing starts near-uniform and
  random. N(0, 1) (mergekit's ``random`` gate) gives logits of std ~ sqrt(d_model): routing
  starts one-hot on whichever expert happens to win.
* ``orthogonal``: orthonormal rows (QR of a seeded Gaussian; needs n_experts <= d_model)
  scaled to the norm of an average ``normal`` row, ``router_std * sqrt(d_model)``. The
  experts' logits are uncorrelated and no two rows point the same way, which spreads the
  routing and is the remedy against early router collapse proposed in mergekit PR #664.
* ``zero``: all logits equal, routing weights uniform. top-k of equal values is decided by
  ``torch.topk``'s tie-breaking, which is the same for every token: every token goes to
  the same top_k experts (measured with torch 2.13 on the CPU, in the reference MoE and in
  transformers' Mixtral, Qwen2-MoE and Qwen3-MoE alike, which all call ``torch.topk`` on
  the softmax: E=4, k=2 -> experts {2, 3}; E=8, k=2 -> {5, 6}; E=16, k=4 -> {9..12}: not
  the lowest indices, and not guaranteed across versions or devices). So routing starts
  fully collapsed (``router_scaling`` reports it), the chosen experts get identical
  gradients and the others none, and only the load-balancing loss, through the
  softmax's gradient, separates the experts. For ablations; not a good start.
* ``hidden_pca``: rows along the top n_experts principal directions of each layer's MLP
  input (post-norm hidden states) on ``calibration`` token ids: one forward pass of the
  dense model, then the top right singular vectors of the centered states; scaled as
  ``orthogonal``. The logits then vary along the directions the inputs actually vary
  most, so tokens are spread by what distinguishes them. The data-driven counterpart of
  mergekit-moe's ``hidden`` gates (issue #116: random gates vs gates from hidden-state
  representations); unlike those it needs no per-expert prompts.

Every random draw is keyed by (seed, tensor name) (``derive_seed``); the router init is
recorded in the growth record's settings (``router_init``), with ``layers``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from growkit.kernels.memory import check_memory
from growkit.validate import ArgumentKindError, choice, flag, real_number, whole_number
from growkit.validate import seed as check_seed

from .adapters import ADAPTERS, PART, get_adapter
from .families import FAMILIES
from .plan import GrowthPlan, TensorPlan, TensorSpec, build_from_plan, copy_of, source_specs, zeros_like_source
from .records import GrowthRecord, Source
from .width import derive_seed
from .roles import ROLE_RULES, Role

DEFAULT_ROUTER_STD = 0.02
ROUTER_INITS = ("normal", "orthogonal", "zero", "hidden_pca")
LAYER_SPECS = "None (every layer), a list or range of layer indices, 'every:K', 'first:N', 'last:N' or '0,2,5'"


def check_moe_args(n_experts, top_k, router_std=DEFAULT_ROUTER_STD, expert_noise_std=0.0, seed=0,
                   norm_topk_prob=True, *, router_init="normal") -> tuple[int, int, float, float, int]:
    """Validate the upcycling settings that do not depend on the model (ValueError or
    ``ArgumentKindError`` naming the argument); returns ``(n_experts, top_k, router_std,
    expert_noise_std, seed)`` normalized. ``norm_topk_prob``: the target's resolved setting
    (True, or False for a target that does not renormalize)."""
    n_experts = whole_number(n_experts, "n_experts", min=2)
    top_k = whole_number(top_k, "top_k", min=1)
    if top_k > n_experts:
        raise ValueError(f"top_k ({top_k}) must not exceed n_experts ({n_experts})")
    router_std = real_number(router_std, "router_std", min=0.0)
    expert_noise_std = real_number(expert_noise_std, "expert_noise_std", min=0.0)
    seed = check_seed(seed)
    choice(router_init, "router_init", ROUTER_INITS)
    norm_topk_prob = flag(norm_topk_prob, "norm_topk_prob")
    if not norm_topk_prob and top_k != n_experts:
        raise ValueError(
            f"norm_topk_prob=False with top_k={top_k} < n_experts={n_experts} cannot be "
            "function-preserving: the output would be scaled by the chosen experts' routing "
            "mass. Use norm_topk_prob=True (renormalize the top-k weights, Mixtral style) or "
            "top_k=n_experts."
        )
    return n_experts, top_k, router_std, expert_noise_std, seed


def check_expert_reinit(expert_reinit, name: str = "expert_reinit") -> float:
    """The Drop-Upcycling fraction, a real number in [0, 1] (ValueError / ArgumentKindError
    naming ``name``)."""
    return real_number(expert_reinit, name, min=0.0, max=1.0,
                       hint="the share of each expert's FFN units re-drawn: 0 (exact) to 1, e.g. 0.5")


def parse_moe_layers(layers, n_layers: int, name: str = "layers") -> list[int]:
    """The sorted indices of the layers to upcycle, from ``layers``:

    * ``None``: every layer;
    * a list / tuple / range of layer indices (from 0; distinct, at least one);
    * ``"every:K"``: every K-th layer in Qwen-MoE's ``decoder_sparse_step`` convention,
      layer i is MoE iff ``(i + 1) % K == 0`` (``every:2`` of 4 layers: 1 and 3);
    * ``"first:N"`` / ``"last:N"``: the first / last N layers;
    * ``"0,2,5"``: a comma-separated list (the command line's form).

    ValueError (ArgumentKindError for the wrong kind of value) naming ``name``.
    """
    if layers is None:
        return list(range(n_layers))
    hint = f"layers are numbered from 0 to n_layers - 1 = {n_layers - 1}"
    if isinstance(layers, str):
        spec = layers.strip()
        kind, sep, arg = spec.partition(":")
        if sep and kind in ("every", "first", "last"):
            try:
                count = int(arg)
            except ValueError:
                raise ValueError(f"{name}={layers!r}: {kind}:N needs a whole number N, got {arg!r}") from None
            if kind == "every":
                count = whole_number(count, f"{name} ({kind}:K)", min=1)
                chosen = [i for i in range(n_layers) if (i + 1) % count == 0]
                if not chosen:
                    raise ValueError(f"{name}={layers!r} selects no layer of {n_layers}: K must be <= n_layers")
                return chosen
            count = whole_number(count, f"{name} ({kind}:N)", min=1, max=n_layers, hint=f"the model has {n_layers} layers")
            return list(range(count)) if kind == "first" else list(range(n_layers - count, n_layers))
        parts = [p.strip() for p in spec.split(",")]
        if not spec or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(f"{name} must be {LAYER_SPECS}, got {layers!r}")
        layers = [int(p) for p in parts]
    if isinstance(layers, (bytes, bool)) or not hasattr(layers, "__iter__") or isinstance(layers, dict):
        raise ArgumentKindError(f"{name} must be {LAYER_SPECS}, got {layers!r}")
    chosen = [whole_number(i, f"{name}[i]", min=0, max=n_layers - 1, hint=hint) for i in layers]
    if not chosen:
        raise ValueError(f"{name} is empty: name at least one layer to upcycle (None: every layer)")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{name} lists layers {sorted({i for i in chosen if chosen.count(i) > 1})} more than once")
    return sorted(chosen)


def partial_upcycling_targets() -> list[str]:
    """The ``"dense -> moe"`` pairs whose MoE config can make some layers MoE and others
    dense, and growkit's reference model."""
    can = [f"{f.name} -> {f.moe_sibling}" for f in FAMILIES.values()
           if f.kind == "hf" and f.moe_sibling in FAMILIES and _adapter_named(f.moe_sibling).per_layer_moe]
    return can + ["growkit's reference model (ModelConfig.dense_layers)"]


def _adapter_named(name: str):
    return next(a for a in ADAPTERS if a.name == name)


def resolve_moe_layers(adapter, target, config, layers, n_experts: int, router_init: str,
                       name: str = "layers") -> list[int]:
    """``layers`` (see :func:`parse_moe_layers`) checked against the source config and the
    target family, before anything is allocated: the target must be able to express the
    choice, and an ``orthogonal`` / ``hidden_pca`` router needs ``n_experts <= d_model``."""
    n_layers = int(adapter.cfg(config, "n_layers"))
    chosen = parse_moe_layers(layers, n_layers, name)
    if len(chosen) < n_layers and not target.per_layer_moe:
        raise ValueError(
            f"{name}={layers!r}: {adapter.name} upcycles into {target.name}, whose config cannot make "
            f"some layers MoE and others dense (every layer of a {target.name} model is a mixture of "
            f"experts). Partial upcycling works into: {'; '.join(partial_upcycling_targets())}. "
            f"Use {name}=None to upcycle every layer."
        )
    d_model = int(adapter.cfg(config, "d_model"))
    if router_init in ("orthogonal", "hidden_pca") and n_experts > d_model:
        raise ValueError(
            f"router_init={router_init!r} gives each expert an orthonormal router row: n_experts "
            f"({n_experts}) must be <= d_model ({d_model}); use router_init='normal'"
        )
    return chosen


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
    return adapter if sibling == adapter.name else _adapter_named(sibling)


def moe_config(adapter, target, config, n_experts: int, top_k: int, norm_topk_prob: bool,
               moe_layers: list[int] | None = None):
    """The target family's config for the upcycled model: the source's settings that the
    target's config knows, carried over untouched, plus the MoE fields.

    ``moe_layers``: the upcycled layers (None: every layer). A family with per-layer choice
    gets ``decoder_sparse_step = 1`` (where it has the field) and the other layers listed
    in ``dense_layers`` (``mlp_only_layers``), always in that one form, even when a step
    would express the set (``every:K``): one field then says everything, and depth growth
    writes the same form. ``norm_topk_prob`` is always written (where the target has it),
    so a change of transformers' default cannot flip it."""
    n_layers = int(adapter.cfg(config, "n_layers"))
    chosen = set(range(n_layers) if moe_layers is None else moe_layers)
    fields = dict(n_experts=n_experts, top_k=top_k, norm_topk_prob=norm_topk_prob,
                  moe_d_ff=adapter.cfg(config, "d_ff"), shared_d_ff=adapter.cfg(config, "d_ff"),
                  sparse_step=1, dense_layers=[i for i in range(n_layers) if i not in chosen])
    fields = {k: v for k, v in fields.items() if target.has(k)}
    if len(chosen) < n_layers and "dense_layers" not in fields:  # pragma: no cover - resolve_moe_layers refuses it
        raise ValueError(f"{target.name} cannot express a partial choice of MoE layers")
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
    expert_reinit: float = 0.0,
    seed: int = 0,
    norm_topk_prob: bool | None = None,
    layers=None,
    router_init: str = "normal",
    calibration: torch.Tensor | None = None,
) -> nn.Module:
    """Turn the dense MLPs into ``n_experts`` copies behind a fresh top-``top_k`` router.

    A ``transformers`` model becomes its family's MoE sibling (Llama and Mistral ->
    Mixtral, Qwen2 -> Qwen2-MoE, Qwen3 -> Qwen3-MoE; ``upcycling_pairs()``); the reference
    model stays a ``growkit.models.Transformer``. A Qwen2-MoE shared expert starts as a copy
    of the dense MLP with its down projection and its gate zeroed: it adds exactly 0.

    Args:
        model: a dense model (left untouched; nothing is shared with it).
        n_experts: experts per layer, >= 2.
        top_k: experts per token, 1 <= top_k <= n_experts.
        router_std: scale of the fresh routers (default 0.02): the std of a ``normal``
            router's entries; ``orthogonal`` and ``hidden_pca`` rows get the norm
            ``router_std * sqrt(d_model)`` of an average ``normal`` row; ``zero`` ignores it,
            and ``router_std=0`` gives a zero router whatever ``router_init``.
        expert_noise_std: i.i.d. noise added to each expert copy so experts differ from
            the start. Any value > 0 changes the function slightly (default 0: exact).
        expert_reinit: Drop-Upcycling (Nakamura et al. 2025), a fraction in [0, 1]: in every
            expert, that share of the FFN units (gate and up rows, down columns, their
            gate/up biases) is re-drawn from N(mean, std^2) of the dense tensor, a different
            random set per expert (``reinit_units``), so that the experts start apart.
            Changes the function by design (default 0: exact); 1 re-draws every unit.
        seed: seeds the router, the expert noise and the re-drawn units (each draw keyed by
            (seed, tensor name); the units by (seed, layer)).
        norm_topk_prob: renormalize the top-k weights; None: the model config's (reference
            model), else True. A target that always renormalizes (Mixtral) refuses False.
        layers: which layers to upcycle (the others keep their dense MLP): None (every
            layer), a list or range of indices, ``"every:K"`` (layer i iff ``(i + 1) % K
            == 0``, Qwen's ``decoder_sparse_step``), ``"first:N"``, ``"last:N"``. Only
            into a family that can express it (Qwen2-MoE, Qwen3-MoE, the reference model);
            a Mixtral target (Llama, Mistral) refuses a partial choice.
        router_init: ``"normal"``, ``"orthogonal"``, ``"zero"`` or ``"hidden_pca"`` (see
            the module docstring).
        calibration: [B, T] token ids, required by (and only by) ``hidden_pca``; at least
            ``n_experts + 1`` tokens.

    Returns:
        The MoE model; exact for ``norm_topk_prob=True`` (or ``top_k == n_experts``),
        ``expert_noise_std == 0`` and ``expert_reinit == 0``, whatever the router.
    """
    adapter = get_adapter(model, "MoE upcycling")
    target = target_adapter(adapter)
    always = "renormalized_topk" in target.family.quirks
    if norm_topk_prob is not None:
        flag(norm_topk_prob, "norm_topk_prob")
    if norm_topk_prob is None:
        norm_topk_prob = bool(adapter.cfg(model, "norm_topk_prob", True)) if not always else True
    elif always and norm_topk_prob is not True:
        raise ValueError(f"norm_topk_prob=False: {target.name} always renormalizes its top-k weights; pass None or True")
    if not always and not target.has("norm_topk_prob"):
        norm_topk_prob = False  # a target that never renormalizes
    n_experts, top_k, router_std, expert_noise_std, seed = check_moe_args(
        n_experts, top_k, router_std, expert_noise_std, seed, norm_topk_prob, router_init=router_init)
    expert_reinit = check_expert_reinit(expert_reinit)
    if adapter.is_moe(model):
        raise ValueError("model is already a mixture of experts: upcycle_to_moe takes a dense model")
    moe_layers = resolve_moe_layers(adapter, target, model.config, layers, n_experts, router_init)
    if router_init == "hidden_pca":
        calibration = check_calibration(calibration, int(adapter.cfg(model, "vocab_size")), n_experts)
    elif calibration is not None:
        raise ValueError(f"calibration is only used by router_init='hidden_pca', not {router_init!r}: leave it None")
    specs, state, tied = source_specs(adapter, model)
    # The upcycled model's size (every upcycled MLP tensor n_experts times) against the free memory.
    roles = adapter.roles_for_names(specs)
    sparse = set(moe_layers)
    check_memory(sum(s.nbytes * (n_experts if roles[n].rule.expert_role is not None and roles[n].layer in sparse else 1)
                     for n, s in specs.items()),
                 next(iter(state.values())).device, f"n_experts={n_experts}")
    directions = hidden_pca_directions(model, adapter, calibration, moe_layers, n_experts) \
        if router_init == "hidden_pca" else None
    plan = plan_moe(adapter, target, model.config, specs, tied, n_experts, top_k, router_std=router_std,
                    expert_noise_std=expert_noise_std, seed=seed, norm_topk_prob=norm_topk_prob,
                    layers=moe_layers, router_init=router_init, directions=directions,
                    expert_reinit=expert_reinit)
    return build_from_plan(plan, plan.execute(state.__getitem__), like=model)


def plan_moe(adapter, target, config, specs: dict[str, TensorSpec], tied: bool, n_experts: int, top_k: int, *,
             router_std: float, expert_noise_std: float, seed: int, norm_topk_prob: bool,
             layers: list[int] | None = None, router_init: str = "normal",
             directions: dict[int, torch.Tensor] | None = None, expert_reinit: float = 0.0) -> GrowthPlan:
    """The upcycling plan of a dense source described by its config and tensor specs (role
    names; arguments already checked: ``check_moe_args``, ``resolve_moe_layers``). See
    :func:`upcycle_to_moe`.

    ``layers``: the upcycled layers (None: every layer); the others keep their MLP, copied.
    ``directions``: layer -> [n_experts, d_model] unit rows (``hidden_pca`` only).
    ``expert_reinit``: the Drop-Upcycling fraction (checked: ``check_expert_reinit``).

    Every random draw (router, expert noise) comes from a generator seeded by (seed, the
    new tensor's name), on the CPU in float32: one seed gives one model on any device,
    dtype, or order of making the tensors."""
    roles = adapter.roles_for_names(specs)
    shared = "shared_expert" in target.family.quirks
    n_layers = int(adapter.cfg(config, "n_layers"))
    sparse = set(range(n_layers) if layers is None else layers)
    partial = len(sparse) < n_layers
    if router_init == "hidden_pca" and (directions is None or not sparse <= set(directions)):
        raise ValueError("router_init='hidden_pca' needs the calibration directions of every upcycled layer: "
                         "use upcycle_to_moe(..., calibration=ids); the streaming `growkit grow` cannot run the model")
    # every tensor's new name, checked before anything is made
    tensors = {}
    for name, pr in roles.items():
        expert_role = pr.rule.expert_role if pr.layer in sparse else None
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
        dims = pr.rule.dims
        tensors[new_name] = TensorPlan(spec, Source("experts", expert_role, name, n_experts=n_experts),
                                       _experts(name, n_experts, expert_noise_std, derive_seed(seed, new_name),
                                                expert_reinit, dims.index("ff") if "ff" in dims else None,
                                                derive_seed(seed, f"expert_reinit.layer{pr.layer}")), (name,))
        if shared and pr.role in SHARED:
            shared_name = target.tensor_name(SHARED[pr.role], pr.layer)
            writes = ROLE_RULES[SHARED[pr.role]].writes_residual
            tensors[shared_name] = TensorPlan(specs[name], Source("zero" if writes else "copy", SHARED[pr.role], name),
                                              zeros_like_source(name) if writes else copy_of(name), (name,))
    for name, pr in roles.items():
        if pr.role is not Role.MLP_GATE or pr.layer not in sparse:
            continue
        d_model, dtype = specs[name].shape[-1], specs[name].dtype
        router = target.tensor_name(Role.ROUTER, pr.layer)
        rows = None if directions is None else directions[pr.layer]
        tensors[router] = TensorPlan(TensorSpec((n_experts, d_model), dtype), Source("fresh", Role.ROUTER, None, shape=(n_experts, d_model)),
                                     _router(name, n_experts, router_std, derive_seed(seed, router), router_init, rows), (name,))
        if shared:
            gate = target.tensor_name(Role.SHARED_EXPERT_GATE, pr.layer)
            tensors[gate] = TensorPlan(TensorSpec((1, d_model), dtype), Source("fresh", Role.SHARED_EXPERT_GATE, None, shape=(1, d_model)),
                                       _router(name, 1, 0.0, 0), (name,))
    notes = ["shared expert: dense MLP copied, down projection and gate zeroed (adds 0 at first)"] if shared else []
    if partial:
        notes.append(f"partial upcycling: layers {sorted(sparse)} are mixtures of experts, layers "
                     f"{[i for i in range(n_layers) if i not in sparse]} keep their dense MLP")
    if router_init == "zero":
        notes.append("zero router: all logits equal, so torch.topk's tie-breaking sends every token to the same "
                     f"{top_k} experts until the load-balancing loss separates them")
    if expert_reinit > 0:
        notes.append(f"Drop-Upcycling: {100 * expert_reinit:g}% of each expert's FFN units re-drawn from the dense "
                     "weights' mean and std, a different set per expert (not function-preserving by design)")
    settings = dict(n_experts=n_experts, top_k=top_k, router_std=router_std, expert_noise_std=expert_noise_std,
                    expert_reinit=expert_reinit, seed=seed, norm_topk_prob=norm_topk_prob, family=target.name, router_init=router_init,
                    layers=sorted(sparse) if partial else None)
    record = GrowthRecord(
        "moe",
        settings,
        {n: t.source for n, t in tensors.items()},
        function_preserving=expert_noise_std == 0 and expert_reinit == 0,
        notes=notes,
    )
    new_config = moe_config(adapter, target, config, n_experts, top_k, norm_topk_prob,
                            sorted(sparse) if partial else None)
    return GrowthPlan(target, new_config, tensors, record, tied)


def _experts(name, n_experts, noise_std, seed, reinit=0.0, ff_axis=None, unit_seed=0):
    """[n_experts, *dense shape]: the dense tensor ``name`` in every expert slot, plus
    i.i.d. N(0, noise_std^2) noise, then, with ``reinit`` > 0, Drop-Upcycling: in each
    expert the FFN units of :func:`reinit_units` (along ``ff_axis`` of the dense shape)
    re-drawn from N(mean, std^2) of the dense tensor. ``unit_seed`` is the layer's, so
    the gate and up rows and the down columns of one unit are re-drawn together."""
    def make(get):
        t = get(name)
        stacked = t.unsqueeze(0).expand(n_experts, *t.shape).clone()
        if noise_std > 0:
            gen = torch.Generator().manual_seed(seed)
            stacked += (torch.randn(stacked.shape, generator=gen) * noise_std).to(stacked.dtype).to(stacked.device)
        if reinit > 0 and ff_axis is not None:
            mean, std = _mean_std(t)
            gen = torch.Generator().manual_seed(seed ^ 0x5DEECE66D)
            for e, units in enumerate(reinit_units(t.shape[ff_axis], n_experts, reinit, unit_seed)):
                shape = list(t.shape)
                shape[ff_axis] = len(units)
                fresh = torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean
                stacked[e].index_copy_(ff_axis, units.to(stacked.device), fresh.to(stacked.dtype).to(stacked.device))
        return stacked

    return make


def _mean_std(t: torch.Tensor, chunk: int = 1 << 22) -> tuple[float, float]:
    """Mean and (unbiased) std of ``t``, summed in float64 a chunk at a time on its device.

    NOTE: float64 so that one seed gives the same re-drawn units on any device and from any
    dtype (the sums differ by float64 rounding, far below the float32 the draws are made
    in); in chunks because ``t.double()``, or even ``t.sum(dtype=torch.float64)``, makes a
    float64 copy of the whole tensor (measured on the CPU: 513 MB more for a 256 MB bf16
    matrix), where the upcycling otherwise holds the source and its output."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    s1 = s2 = 0.0
    for a in range(0, n, chunk):
        c = flat[a:a + chunk].double()
        s1 += float(c.sum())
        s2 += float(c.square().sum())
    mean = s1 / n if n else 0.0
    var = (s2 - n * mean * mean) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(max(var, 0.0))


def reinit_units(d_ff: int, n_experts: int, fraction: float, seed: int) -> list[torch.Tensor]:
    """The FFN units Drop-Upcycling re-draws in each expert of one layer: for expert e, the
    first ``round(fraction * d_ff)`` entries of the e-th random permutation of
    ``range(d_ff)`` (a generator seeded by ``seed``), sorted. Each expert gets its own set,
    so the experts differ from the start (Nakamura et al. 2025)."""
    gen = torch.Generator().manual_seed(seed)
    n = round(fraction * d_ff)
    return [torch.randperm(d_ff, generator=gen)[:n].sort().values for _ in range(n_experts)]


def _router(gate_name, rows, std, seed, init="normal", directions=None):
    """A fresh [rows, d] router on the dense gate's device and dtype (see the module
    docstring): ``normal`` N(0, std^2) (zeros for std 0), ``orthogonal`` / ``hidden_pca``
    orthonormal rows times ``std * sqrt(d)``, ``zero`` zeros."""
    def make(get):
        gate = get(gate_name)
        d_model = gate.shape[-1]
        if std == 0 or init == "zero":
            return torch.zeros(rows, d_model, dtype=gate.dtype, device=gate.device)
        if init == "normal":
            gen = torch.Generator().manual_seed(seed)
            return (torch.randn(rows, d_model, generator=gen) * std).to(gate.dtype).to(gate.device)
        if init == "orthogonal":
            unit = orthonormal_rows(rows, d_model, seed)
        elif init == "hidden_pca":
            unit = directions.to(torch.float64)
        else:  # pragma: no cover - checked by check_moe_args
            raise ValueError(f"unknown router_init {init!r}")
        return (unit * (std * math.sqrt(d_model))).to(torch.float32).to(gate.dtype).to(gate.device)

    return make


def orthonormal_rows(rows: int, d_model: int, seed: int) -> torch.Tensor:
    """[rows, d_model] float64 orthonormal rows (rows <= d_model): the Q of a QR of a seeded
    float32 Gaussian [d_model, rows], signs fixed by R's diagonal (a Haar-random frame)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(d_model, rows, generator=gen).to(torch.float64)
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).T.contiguous()


def check_calibration(calibration, vocab_size: int, n_experts: int) -> torch.Tensor:
    """The ``hidden_pca`` calibration ids: a [B, T] integer tensor of ids in [0, vocab_size)
    with at least ``n_experts + 1`` tokens (the centered states must span n_experts directions)."""
    if calibration is None:
        raise ValueError("router_init='hidden_pca' needs calibration: a [B, T] LongTensor of token ids "
                         "the dense model is run on once")
    if not isinstance(calibration, torch.Tensor):
        raise ArgumentKindError(f"calibration must be a [B, T] tensor of token ids, got {type(calibration).__name__}")
    if calibration.dim() != 2 or calibration.is_floating_point() or calibration.is_complex() \
            or calibration.dtype == torch.bool:
        raise ArgumentKindError(f"calibration must be a [B, T] integer tensor of token ids, got "
                                f"{calibration.dtype} of shape {tuple(calibration.shape)}")
    if calibration.numel() < n_experts + 1:
        raise ValueError(f"calibration has {calibration.numel()} tokens: hidden_pca needs at least "
                         f"n_experts + 1 = {n_experts + 1} to find {n_experts} principal directions")
    lo, hi = int(calibration.min()), int(calibration.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"calibration token ids must be in [0, {vocab_size}), got ids in [{lo}, {hi}]")
    return calibration.long()


@torch.no_grad()
def hidden_pca_directions(model: nn.Module, adapter, calibration: torch.Tensor, layers: list[int],
                          n_experts: int) -> dict[int, torch.Tensor]:
    """layer -> [n_experts, d_model] float64 unit rows: the top right singular vectors of the
    centered MLP inputs (post-norm hidden states) of that layer on ``calibration``.

    One forward pass of the dense model, a forward pre-hook on the module of each layer's
    MLP gate projection (its input is the MLP input); each layer's states are reduced to
    their directions in the hook, so only one layer's [tokens, d_model] is held at a time.
    The sign of each direction is fixed (largest |entry| positive) so the result does not
    depend on the SVD routine's sign choice."""
    wanted = set(layers)
    modules = {}
    for name, pr in adapter.param_roles(model).items():
        if pr.role is Role.MLP_GATE and pr.layer in wanted:
            m = PART.match(name)
            real = m.group(1) if m else name
            modules[pr.layer] = model.get_submodule(real.rsplit(".", 1)[0])
    out: dict[int, torch.Tensor] = {}

    def hook(layer):
        def pre(_module, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            x = x - x.mean(dim=0, keepdim=True)
            v = torch.linalg.svd(x, full_matrices=False).Vh[:n_experts]
            pick = v.abs().argmax(dim=1, keepdim=True)
            signs = torch.sign(v.gather(1, pick))
            signs[signs == 0] = 1.0
            out[layer] = (v * signs).cpu()

        return pre

    handles = [mod.register_forward_pre_hook(hook(layer), with_kwargs=True) for layer, mod in modules.items()]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = calibration.to(device)
        if adapter.is_hf:
            model(input_ids=ids, use_cache=False)
        else:
            model(ids)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = sorted(wanted - set(out))
    if missing:  # pragma: no cover - a layer that did not run
        raise RuntimeError(f"hidden_pca: the MLPs of layers {missing} did not run on the calibration ids")
    return out
