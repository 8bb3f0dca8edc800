"""Width growth by HyperCloning (Samragh et al. 2024): every hidden vector becomes [h, ..., h].

For scale s, each parameter is tiled by its role's rule (``roles.py``); a linear map's
input dim is divided by s; zero-sum noise breaks the symmetry between clones without
changing the function. A q projection with s = 2::

        d           d                    source W: [H*hd, d]
    +-------+-------+
    | W/2+N | W/2-N |  H*hd    heads h1..hH          input  [x, x]
    +-------+-------+                                output [Wx, Wx]: heads h1..hH, h1..hH
    | W/2+N'| W/2-N'|  H*hd    heads h1..hH again
    +-------+-------+

head_dim stays, so RoPE and the 1/sqrt(hd) softmax scale are untouched; n_heads and
n_kv_heads double together, so query head H+i meets KV head KV + i // (H/KV), the copy of
its own KV head (interleaving the copies instead would break that pairing).
"""

from __future__ import annotations

import math
import warnings
import zlib

import torch
from torch import nn

from growkit.kernels.memory import check_memory
from growkit.kernels.hyperclone import NOISE_MODES
from growkit.validate import choice, real_number, whole_number
from growkit.validate import seed as check_seed

from .adapters import get_adapter
from .plan import GrowthPlan, TensorPlan, TensorSpec, build_from_plan, source_specs
from .records import GrowthRecord, Source
from .roles import ROLE_RULES, Role
from .tiling import tile_for_role


def check_width_args(scale_factor, noise_std, noise, seed, *, scale_name: str = "scale_factor",
                     optional: bool = False) -> tuple[int | None, float, int]:
    """The width-growth arguments checked once (growkit.validate): (scale, noise_std, seed).
    ``optional=True`` takes ``scale_factor=None`` as "no width growth" (``growkit grow``
    without ``--width``), the noise settings checked all the same."""
    scale = None if optional and scale_factor is None else whole_number(
        scale_factor, scale_name, min=2, hint="HyperCloning tiles whole copies: 2, 3, 4, ...")
    noise_std = real_number(noise_std, "noise_std", min=0)
    choice(noise, "noise", NOISE_MODES)
    return scale, noise_std, check_seed(seed)


def derive_seed(seed: int, name: str) -> int:
    """A per-parameter seed, so that no two tensors get the same noise stream."""
    return (seed * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) % (2**63)


def hyperclone_weight(
    weight: torch.Tensor,
    scale_factor: int,
    role: Role | str = Role.Q,
    *,
    noise_std: float = 0.0,
    noise: str = "zero_sum",
    seed: int = 0,
) -> torch.Tensor:
    """What width growth does to one weight of a given role.

    Args:
        weight: the source tensor, laid out as the role says (nn.Linear [out, in]).
        scale_factor: whole number >= 2.
        role: a :class:`Role` or its name (``"q_proj"``, ``"lm_head"``, ``"router"``...).
        noise_std, noise, seed: symmetry-breaking noise (linear maps with a tiled input).

    Example:
        ``hyperclone_weight(W, 2, "q_proj")`` for W [H*hd, d] gives [2*H*hd, 2*d] of blocks W/2.
    """
    scale, noise_std, seed = check_width_args(scale_factor, noise_std, noise, seed)
    try:
        role = Role(role)
    except ValueError:
        raise ValueError(f"role must be one of {[r.value for r in Role]}, got {role!r}") from None
    return tile_for_role(weight, role, scale, noise_std=noise_std, noise=noise, seed=seed)


def scale_norm(weight: torch.Tensor, factor: float, offset: bool) -> torch.Tensor:
    """A norm gain that multiplies the norm's output by ``factor``: ``w * c``, or for a norm
    that applies ``(1 + w)`` (quirk ``norm_offset``) ``(1 + w) * c - 1``; computed in float32."""
    w = weight.float()
    out = (1.0 + w) * factor - 1.0 if offset else w * factor
    return out.to(weight.dtype)


def widened_fields(adapter, config, scale: int) -> dict:
    """The canonical config fields width growth multiplies (head_dim is kept, and written)."""
    updates = {
        f: adapter.cfg(config, f) * scale
        for f in ("d_model", "n_heads", "n_kv_heads", "d_ff", "moe_d_ff", "shared_d_ff")
        if adapter.cfg(config, f) is not None
    }
    updates["head_dim"] = adapter.cfg(config, "head_dim")
    return updates


def widened_shape(role: Role, shape: tuple[int, ...], scale: int) -> tuple[int, ...]:
    return tuple(n * r for n, r in zip(shape, ROLE_RULES[role].repeats(scale)))


def plan_width(adapter, config, specs: dict[str, TensorSpec], tied: bool, scale: int, *,
               noise_std: float, noise: str, seed: int) -> GrowthPlan:
    """The width-growth plan of a source described by its config and tensor specs (role
    names; a tied source lists no output embedding). See :func:`grow_width`."""
    family = adapter.family
    roles = adapter.roles_for_names(specs)
    names_of: dict[Role, list[str]] = {}
    for name, pr in roles.items():
        names_of.setdefault(pr.role, []).append(name)
    embeds = names_of.get(Role.EMBEDDING, [])
    final_norms = [n for n in names_of.get(Role.NORM, []) if roles[n].layer is None]
    updates = widened_fields(adapter, config, scale)
    notes = []
    # Per-tensor post-scales from the quirks: the embedding (normalizer) and the final norm (ties).
    embed_factor = 1.0 / math.sqrt(scale) if "embedding_normalizer" in family.quirks else 1.0
    if embed_factor != 1.0:
        notes.append(f"embedding divided by sqrt({scale}): the model multiplies it by sqrt(hidden_size)")
    norm_factor, untie = None, False
    if tied:
        # a tied head reads the tiled (and normalizer-divided) embedding: logits come out
        # `too_large` times too large, unless the final norm (or logit scale) absorbs it
        too_large = scale * embed_factor
        if "tied_logit_scale" in family.quirks:
            updates["logit_scale"] = adapter.cfg(config, "logit_scale") / too_large
        elif len(final_norms) == 1 and len(embeds) == 1:
            norm_factor = 1.0 / too_large
            notes.append(f"tied embeddings kept tied: final norm gain scaled by 1/{too_large:g}")
        else:
            untie = True
            updates["tie_embeddings"] = False
            notes.append("tied embeddings untied: no single final norm to absorb the output side's 1/s")

    def maker(name: str, role: Role):
        def make(get):
            t = tile_for_role(get(name), role, scale, noise_std=noise_std, noise=noise, seed=derive_seed(seed, name))
            if role is Role.EMBEDDING and embed_factor != 1.0:
                t = (t.float() * embed_factor).to(t.dtype)
            if norm_factor is not None and name in final_norms:
                t = scale_norm(t, norm_factor, "norm_offset" in family.quirks)
            return t

        return make

    tensors = {}
    for name, pr in roles.items():
        spec = specs[name]
        tensors[name] = TensorPlan(TensorSpec(widened_shape(pr.role, spec.shape, scale), spec.dtype),
                                   Source("widen", pr.role, name, scale=scale), maker(name, pr.role), (name,))
    if untie:
        head = adapter.tensor_name(Role.LM_HEAD, None)
        spec = specs[embeds[0]]
        tensors[head] = TensorPlan(
            TensorSpec(widened_shape(Role.LM_HEAD, spec.shape, scale), spec.dtype),
            Source("widen", Role.LM_HEAD, embeds[0], scale=scale),
            lambda get: tile_for_role(get(embeds[0]), Role.LM_HEAD, scale), (embeds[0],))
    record = GrowthRecord(
        "width", dict(scale_factor=scale, noise_std=noise_std, noise=noise, seed=seed),
        {n: t.source for n, t in tensors.items()}, function_preserving=noise == "zero_sum", notes=notes)
    return GrowthPlan(adapter, adapter.config_with(config, **updates), tensors, record, tied and not untie)


@torch.no_grad()
def grow_width(
    model: nn.Module,
    scale_factor: int,
    *,
    noise_std: float = 1e-5,
    noise: str = "zero_sum",
    seed: int = 0,
) -> nn.Module:
    """HyperClone ``model`` to ``scale_factor`` times its width.

    d_model, n_heads, n_kv_heads and the FFN sizes are multiplied; head_dim, vocab and the
    expert count stay. Works on growkit's reference model and on every ``transformers``
    family of ``growkit.growth.FAMILIES``; the family's quirks are applied:

    * embedding normalizer (Gemma, ``h0 = E[x] * sqrt(d)``): the tiled embedding is
      divided by sqrt(s), since the grown model multiplies by sqrt(s*d);
    * tied embeddings stay tied: the output side of a tiled embedding gives logits
      s / (embedding factor) times too large, so the final norm's gain is scaled by the
      inverse ((1 + w) * c - 1 for a norm with offset); the reference model puts the
      factor into ``config.logit_scale`` instead. A family with no final norm is untied,
      with a warning.

    Args:
        model: the source model (left untouched; nothing is shared with it).
        scale_factor: whole number >= 2.
        noise_std: std of the zero-sum symmetry-breaking noise on linear maps with a tiled
            input (0 = exact clones, which then never diverge in training).
        noise: ``"zero_sum"`` (function-preserving) or ``"independent"``.
        seed: noise seed (each parameter derives its own stream from it).

    Returns:
        The grown model (same class), on the source's device and dtype, in its train/eval
        mode, with ``growth_records`` describing where each parameter came from.
    """
    scale, noise_std, seed = check_width_args(scale_factor, noise_std, noise, seed)
    return widen(model, scale, noise_std, noise, seed)


def widen(model: nn.Module, scale: int, noise_std: float, noise: str, seed: int) -> nn.Module:
    """:func:`grow_width` on arguments already checked (``check_width_args``)."""
    adapter = get_adapter(model, "width growth")
    specs, state, tied = source_specs(adapter, model)
    plan = plan_width(adapter, model.config, specs, tied, scale, noise_std=noise_std, noise=noise, seed=seed)
    # the plan knows every output's size: refuse before the first allocation
    device = next(iter(state.values())).device if state else "cpu"
    check_memory(sum(t.spec.nbytes for t in plan.tensors.values()), device, f"scale_factor={scale}")
    if tied and not plan.tied:
        warnings.warn(f"{adapter.name}: tied embeddings cannot stay tied and exact without one final norm "
                      "to absorb the 1/s of the output side; the grown model's LM head is untied", stacklevel=2)
    return build_from_plan(plan, plan.execute(state.__getitem__), like=model)
