"""The one table that drives growth for every architecture: parameter roles.

A role says what each dimension of a tensor *is* (vocabulary, model width, query heads,
KV heads, FFN width, experts), which dimension a linear map contracts over (its input),
and whether it writes into the residual stream. Every growth operator reads only this
table; an adapter (``adapters.py``) maps a model's parameter names to roles.

Width growth by s follows from the dims alone (Samragh et al. 2024)::

    dim kind        grown       why
    -----------     -------     -----------------------------------------------------
    vocab, experts  kept        the token set and the expert count do not change
    model, ff       x s, tiled  every hidden vector becomes [h, h, ..., h]
    heads, kv_heads x s, tiled  whole heads repeat in order [h1..hH, h1..hH]: head_dim
                                and RoPE are untouched, and query head H+i still meets
                                KV head KV + i // (H/KV), the copy of its own KV head
    input dim       / s         a tiled input sums s equal copies: W/s per block

So a q projection [H*hd, d] becomes [s*H*hd, s*d] of blocks W/s; the LM head [V, d]
becomes [V, s*d] = [W/s, ..., W/s] (logits unchanged); the router likewise (copying it
undivided would multiply the logits by s and collapse routing); an embedding [V, d]
becomes [V, s*d] tiled, not divided (it has no input dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

WIDENED_DIMS = frozenset({"model", "heads", "kv_heads", "ff"})
# kept under width growth: the token set, the expert count, the per-head width (RoPE's
# domain), and a dim of size one (Qwen2-MoE's shared-expert gate has one output)
DIM_KINDS = WIDENED_DIMS | {"vocab", "experts", "head_dim", "one"}


class Role(str, Enum):
    EMBEDDING = "embedding"
    NORM = "norm"
    Q = "q_proj"
    K = "k_proj"
    V = "v_proj"
    O = "o_proj"
    Q_BIAS = "q_bias"
    K_BIAS = "k_bias"
    V_BIAS = "v_bias"
    O_BIAS = "o_bias"
    MLP_GATE = "mlp_gate"
    MLP_UP = "mlp_up"
    MLP_DOWN = "mlp_down"
    MLP_GATE_BIAS = "mlp_gate_bias"
    MLP_UP_BIAS = "mlp_up_bias"
    MLP_DOWN_BIAS = "mlp_down_bias"
    ROUTER = "router"
    EXPERT_GATE = "expert_gate"
    EXPERT_UP = "expert_up"
    EXPERT_DOWN = "expert_down"
    EXPERT_GATE_BIAS = "expert_gate_bias"
    EXPERT_UP_BIAS = "expert_up_bias"
    EXPERT_DOWN_BIAS = "expert_down_bias"
    LM_HEAD = "lm_head"
    # q/k norms over head_dim (Qwen3, Gemma3): kept, since head_dim is kept
    Q_HEAD_NORM = "q_head_norm"
    K_HEAD_NORM = "k_head_norm"
    # q/k norms over the whole projection (OLMo2): the RMS of [q, q] is that of q: tiled
    Q_NORM = "q_norm"
    K_NORM = "k_norm"
    # a shared expert beside the routed ones (Qwen2-MoE) and its sigmoid gate [1, d]
    SHARED_GATE = "shared_gate"
    SHARED_UP = "shared_up"
    SHARED_DOWN = "shared_down"
    SHARED_EXPERT_GATE = "shared_expert_gate"
    # norms on a sublayer's output, before the residual add (OLMo2's post norms, Gemma2's and
    # Gemma3's post_attention / post_feedforward norms): tiled like any norm; an identity
    # layer zeroes their gain instead of the projections (see depth.py)
    ATTN_OUT_NORM = "attn_out_norm"
    MLP_OUT_NORM = "mlp_out_norm"


@dataclass(frozen=True)
class RoleRule:
    """How one role's tensor is laid out and grown.

    Attributes:
        dims: the kind of each dim, in tensor order (nn.Linear layout: [out, in]).
        input_dim: the dim a linear map contracts over (divided by s when widened);
            None for embeddings, norms and biases. Always the last dim when present.
        writes_residual: adds into the residual stream; zeroed in an identity layer
            (unless the layer has output norms).
        output_norm: a norm on a sublayer's output, before the residual add; an identity
            layer of a family with these zeroes their gain, and only theirs.
        noise: receives symmetry-breaking noise when widened. The router gets none: its
            experts are not cloned, and any noise can only move a token across a top-k
            boundary.
        expert_role: the role this dense-MLP role becomes in a mixture of experts.
    """

    dims: tuple[str, ...]
    input_dim: int | None = None
    writes_residual: bool = False
    output_norm: bool = False
    noise: bool = True
    expert_role: Role | None = None

    @property
    def zero_sum_noise(self) -> bool:
        """Whether width growth gives this tensor zero-sum noise across its input blocks: a
        linear map (every input dim in the table widens) whose role takes noise (see
        tiling.tile_for_role)."""
        return self.noise and self.input_dim is not None

    def repeats(self, scale: int) -> tuple[int, ...]:
        """The tiling factor of each dim under width growth by ``scale``."""
        return tuple(scale if kind in WIDENED_DIMS else 1 for kind in self.dims)

    def gradient_factor(self, scale: int) -> float:
        """How a grown block's gradient relates to the source gradient (symmetric clones).

        A block whose output is tiled receives 1/s of the source gradient (the s output
        copies share it); one whose only widened dim is its input (LM head, router)
        receives all of it. Used to map optimizer moments (see ``optimizer.py``).
        """
        widened = [i for i, kind in enumerate(self.dims) if kind in WIDENED_DIMS]
        if not widened or widened == [self.input_dim]:
            return 1.0
        return 1.0 / scale


ROLE_RULES: dict[Role, RoleRule] = {
    Role.EMBEDDING: RoleRule(("vocab", "model")),
    Role.NORM: RoleRule(("model",)),
    Role.Q: RoleRule(("heads", "model"), input_dim=1),
    Role.K: RoleRule(("kv_heads", "model"), input_dim=1),
    Role.V: RoleRule(("kv_heads", "model"), input_dim=1),
    Role.O: RoleRule(("model", "heads"), input_dim=1, writes_residual=True),
    Role.Q_BIAS: RoleRule(("heads",)),
    Role.K_BIAS: RoleRule(("kv_heads",)),
    Role.V_BIAS: RoleRule(("kv_heads",)),
    Role.O_BIAS: RoleRule(("model",), writes_residual=True),
    Role.MLP_GATE: RoleRule(("ff", "model"), input_dim=1, expert_role=Role.EXPERT_GATE),
    Role.MLP_UP: RoleRule(("ff", "model"), input_dim=1, expert_role=Role.EXPERT_UP),
    Role.MLP_DOWN: RoleRule(("model", "ff"), input_dim=1, writes_residual=True, expert_role=Role.EXPERT_DOWN),
    Role.MLP_GATE_BIAS: RoleRule(("ff",), expert_role=Role.EXPERT_GATE_BIAS),
    Role.MLP_UP_BIAS: RoleRule(("ff",), expert_role=Role.EXPERT_UP_BIAS),
    Role.MLP_DOWN_BIAS: RoleRule(("model",), writes_residual=True, expert_role=Role.EXPERT_DOWN_BIAS),
    Role.ROUTER: RoleRule(("experts", "model"), input_dim=1, noise=False),
    Role.EXPERT_GATE: RoleRule(("experts", "ff", "model"), input_dim=2),
    Role.EXPERT_UP: RoleRule(("experts", "ff", "model"), input_dim=2),
    Role.EXPERT_DOWN: RoleRule(("experts", "model", "ff"), input_dim=2, writes_residual=True),
    Role.EXPERT_GATE_BIAS: RoleRule(("experts", "ff")),
    Role.EXPERT_UP_BIAS: RoleRule(("experts", "ff")),
    Role.EXPERT_DOWN_BIAS: RoleRule(("experts", "model"), writes_residual=True),
    Role.LM_HEAD: RoleRule(("vocab", "model"), input_dim=1),
    Role.Q_HEAD_NORM: RoleRule(("head_dim",)),
    Role.K_HEAD_NORM: RoleRule(("head_dim",)),
    Role.Q_NORM: RoleRule(("heads",)),
    Role.K_NORM: RoleRule(("kv_heads",)),
    Role.SHARED_GATE: RoleRule(("ff", "model"), input_dim=1),
    Role.SHARED_UP: RoleRule(("ff", "model"), input_dim=1),
    Role.SHARED_DOWN: RoleRule(("model", "ff"), input_dim=1, writes_residual=True),
    # its one logit must stay the same: divided like the router, and no noise
    Role.SHARED_EXPERT_GATE: RoleRule(("one", "model"), input_dim=1, noise=False),
    Role.ATTN_OUT_NORM: RoleRule(("model",), output_norm=True),
    Role.MLP_OUT_NORM: RoleRule(("model",), output_norm=True),
}


def _validate_table() -> None:
    for role, rule in ROLE_RULES.items():
        assert set(rule.dims) <= DIM_KINDS, role
        assert rule.input_dim is None or rule.input_dim == len(rule.dims) - 1, role
        # only a leading experts dim may stay unwidened in a 3-D tensor (it is a batch dim)
        assert len(rule.dims) < 3 or rule.dims[0] == "experts", role


_validate_table()


@dataclass(frozen=True)
class ParamRole:
    """What an adapter says about one parameter: its role and its layer (None: global)."""

    role: Role
    layer: int | None = None

    @property
    def rule(self) -> RoleRule:
        return ROLE_RULES[self.role]
