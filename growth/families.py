"""Architecture families as data: parameter names -> roles, config fields, named quirks.

Every growth operator and every check reads a model through one :class:`Family` entry of
:data:`FAMILIES` (via ``adapters.FamilyAdapter``); none names a parameter. Adding a family
is adding an entry: its parameter-name templates (``{i}`` stands for the layer index),
the config attributes behind growkit's canonical fields, and quirks from the closed list
:data:`QUIRKS`. Only a new *kind* of quirk needs code.

A fused tensor (Phi3 ``qkv_proj``, ``gate_up_proj``; transformers-5 MoE experts
``gate_up_proj`` [E, 2*I, d]) is a :class:`Fused` entry: its parts along ``dim``, in
order, each with its own role. Growth splits it, grows every part by the part's rule and
re-fuses it (tiling the fused tensor whole would give [g, u, g, u] and pair the wrong
halves)::

    qkv_proj [(H + 2*KV)*hd, d]          ->  q [H*hd, d] | k [KV*hd, d] | v [KV*hd, d]
    width x2: [(2H + 4KV)*hd, 2d]        <-  2q          | 2k           | 2v      (re-fused)

Canonical config fields (the reference model's names; ``FAMILY.config`` maps each to the
family's attribute): ``d_model``, ``n_heads``, ``n_kv_heads``, ``head_dim``, ``d_ff``,
``n_layers``, ``vocab_size``, ``tie_embeddings``, ``rope`` (what RoPE depends on besides
head_dim: carried over untouched), and where present ``layer_types`` (one entry per
layer), ``n_experts``, ``top_k``, ``moe_d_ff``, ``shared_d_ff``, ``norm_topk_prob``,
``sparse_step``, ``dense_layers``, ``logit_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .roles import Role

# The closed list of quirks (each is handled once, in the operator it affects).
QUIRKS = {
    # h0 = E[x] * sqrt(hidden_size) (Gemma): after widening sqrt(s*d), so the tiled
    # embedding is divided by sqrt(s)
    "embedding_normalizer",
    # RMSNorm applies (1 + w) (Gemma): scaling a norm by c stores (1 + w) * c - 1
    "norm_offset",
    # tied embeddings keep exact logits through a saved config.logit_scale (reference
    # model) instead of scaling the final norm (every Hugging Face family)
    "tied_logit_scale",
    # a shared expert beside the routed ones (Qwen2-MoE): upcycling copies the dense MLP
    # into it with its down projection and its sigmoid gate zeroed (it adds 0 at first)
    "shared_expert",
    # which layers are MoE comes from decoder_sparse_step / mlp_only_layers (Qwen MoE;
    # the reference model's dense_layers): depth growth rewrites them so every new layer
    # keeps its source layer's kind, and partial upcycling (upcycle_to_moe(layers=...))
    # writes them; a family without it has every layer MoE or none
    "sparse_layer_list",
    # top-k weights are always renormalized to sum to 1 (Mixtral): no norm_topk_prob field
    "renormalized_topk",
}


@dataclass(frozen=True)
class Fused:
    """A tensor that holds several roles' tensors concatenated along ``dim``.

    ``parts``: (role, units) in order; a part's size is ``units / sum(units)`` of the
    fused size, where units is a number or a canonical config field (``"n_heads"``).
    """

    dim: int
    parts: tuple[tuple[Role, int | str], ...]


@dataclass(frozen=True)
class OnDisk:
    """How a checkpoint stores a tensor that the model holds otherwise.

    transformers 5 holds MoE experts fused and 3-D but ``save_pretrained`` writes (and the
    hub's checkpoints hold) one 2-D tensor per expert under older names; the family's
    ``disk`` entry maps each such name template (``{i}`` layer, ``{e}`` expert) to the
    in-memory tensor it belongs to (``tensor``, a ``params`` template) and, for a fused
    tensor, the part (``part``). Names not in ``disk`` are stored as they are held.
    """

    tensor: str
    part: Role | None = None


@dataclass(frozen=True)
class Family:
    """One architecture family.

    Attributes:
        name: the family's name (for Hugging Face models, its ``config.model_type``).
        params: parameter-name template -> Role or Fused (``{i}``: layer index).
        config: canonical field -> config attribute (see the module docstring).
        layers: module path of the decoder layer list.
        quirks: names from :data:`QUIRKS`.
        model_types: the ``config.model_type`` values it covers (default: ``(name,)``).
        disk: checkpoint name template -> :class:`OnDisk` (only where a checkpoint stores a
            tensor under another name or split per expert).
        moe_sibling: the family a dense model of this one is upcycled into.
        kind: ``"hf"`` (a ``transformers`` causal LM) or ``"reference"``.
    """

    name: str
    params: dict
    config: dict
    layers: str = "model.layers"
    quirks: frozenset = frozenset()
    model_types: tuple = ()
    moe_sibling: str | None = None
    kind: str = "hf"
    disk: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.quirks) - QUIRKS
        if unknown:
            raise ValueError(f"family {self.name!r}: unknown quirks {sorted(unknown)}; known: {sorted(QUIRKS)}")
        for template, what in self.params.items():
            if not isinstance(what, (Role, Fused)):
                raise TypeError(f"family {self.name!r}: {template!r} must map to a Role or Fused, got {what!r}")
        if not self.model_types:
            object.__setattr__(self, "model_types", (self.name,))


# ---------------------------------------------------------------------------- parts
# Shared pieces of Llama-style layouts, composed below (data, not code).
L = "model.layers.{i}."
EMBED_HEAD = {"model.embed_tokens.weight": Role.EMBEDDING, "model.norm.weight": Role.NORM, "lm_head.weight": Role.LM_HEAD}
PRE_NORMS = {L + "input_layernorm.weight": Role.NORM, L + "post_attention_layernorm.weight": Role.NORM}
ATTN = {
    L + "self_attn.q_proj.weight": Role.Q,
    L + "self_attn.k_proj.weight": Role.K,
    L + "self_attn.v_proj.weight": Role.V,
    L + "self_attn.o_proj.weight": Role.O,
}
ATTN_BIAS = {
    L + "self_attn.q_proj.bias": Role.Q_BIAS,
    L + "self_attn.k_proj.bias": Role.K_BIAS,
    L + "self_attn.v_proj.bias": Role.V_BIAS,
    L + "self_attn.o_proj.bias": Role.O_BIAS,
}
HEAD_NORMS = {L + "self_attn.q_norm.weight": Role.Q_HEAD_NORM, L + "self_attn.k_norm.weight": Role.K_HEAD_NORM}
MLP = {L + "mlp.gate_proj.weight": Role.MLP_GATE, L + "mlp.up_proj.weight": Role.MLP_UP, L + "mlp.down_proj.weight": Role.MLP_DOWN}
MLP_BIAS = {L + "mlp.gate_proj.bias": Role.MLP_GATE_BIAS, L + "mlp.up_proj.bias": Role.MLP_UP_BIAS, L + "mlp.down_proj.bias": Role.MLP_DOWN_BIAS}
GEMMA_NORMS = {
    **PRE_NORMS,
    L + "post_attention_layernorm.weight": Role.ATTN_OUT_NORM,  # a pre-MLP norm in Llama, not here
    L + "pre_feedforward_layernorm.weight": Role.NORM,
    L + "post_feedforward_layernorm.weight": Role.MLP_OUT_NORM,
}
# transformers 5 stores experts fused and 3-D: gate_up [E, 2*I, d] (gate first), down [E, d, I]
EXPERTS = {
    L + "mlp.gate.weight": Role.ROUTER,
    L + "mlp.experts.gate_up_proj": Fused(1, ((Role.EXPERT_GATE, 1), (Role.EXPERT_UP, 1))),
    L + "mlp.experts.down_proj": Role.EXPERT_DOWN,
}
# ...and save_pretrained writes them (hub checkpoints hold them) one tensor per expert
EXPERTS_ON_DISK = {
    L + "mlp.experts.{e}.gate_proj.weight": OnDisk(L + "mlp.experts.gate_up_proj", Role.EXPERT_GATE),
    L + "mlp.experts.{e}.up_proj.weight": OnDisk(L + "mlp.experts.gate_up_proj", Role.EXPERT_UP),
    L + "mlp.experts.{e}.down_proj.weight": OnDisk(L + "mlp.experts.down_proj"),
}
MIXTRAL_ON_DISK = {
    L + "block_sparse_moe.gate.weight": OnDisk(L + "mlp.gate.weight"),
    L + "block_sparse_moe.experts.{e}.w1.weight": OnDisk(L + "mlp.experts.gate_up_proj", Role.EXPERT_GATE),
    L + "block_sparse_moe.experts.{e}.w3.weight": OnDisk(L + "mlp.experts.gate_up_proj", Role.EXPERT_UP),
    L + "block_sparse_moe.experts.{e}.w2.weight": OnDisk(L + "mlp.experts.down_proj"),
}
SHARED_EXPERT = {
    L + "mlp.shared_expert.gate_proj.weight": Role.SHARED_GATE,
    L + "mlp.shared_expert.up_proj.weight": Role.SHARED_UP,
    L + "mlp.shared_expert.down_proj.weight": Role.SHARED_DOWN,
    L + "mlp.shared_expert_gate.weight": Role.SHARED_EXPERT_GATE,
}

HF_CONFIG = {
    "d_model": "hidden_size",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "d_ff": "intermediate_size",
    "n_layers": "num_hidden_layers",
    "vocab_size": "vocab_size",
    "tie_embeddings": "tie_word_embeddings",
    "rope": "rope_parameters",
}
LAYER_TYPES = {"layer_types": "layer_types"}
MIXTRAL_CONFIG = {**HF_CONFIG, "n_experts": "num_local_experts", "top_k": "num_experts_per_tok"}
QWEN_MOE_CONFIG = {
    **HF_CONFIG,
    **LAYER_TYPES,
    "n_experts": "num_experts",
    "top_k": "num_experts_per_tok",
    "moe_d_ff": "moe_intermediate_size",
    "norm_topk_prob": "norm_topk_prob",
    "sparse_step": "decoder_sparse_step",
    "dense_layers": "mlp_only_layers",
}
GEMMA = frozenset({"embedding_normalizer", "norm_offset"})

REFERENCE_LAYER = "layers.{i}."
REFERENCE = Family(
    name="growkit-reference",
    kind="reference",
    layers="layers",
    quirks=frozenset({"tied_logit_scale", "sparse_layer_list"}),
    params={
        "embed.weight": Role.EMBEDDING,
        "norm.weight": Role.NORM,
        "lm_head.weight": Role.LM_HEAD,
        **{REFERENCE_LAYER + k: r for k, r in {
            "attn_norm.weight": Role.NORM,
            "mlp_norm.weight": Role.NORM,
            "attn.q_proj.weight": Role.Q,
            "attn.k_proj.weight": Role.K,
            "attn.v_proj.weight": Role.V,
            "attn.o_proj.weight": Role.O,
            "attn.q_proj.bias": Role.Q_BIAS,
            "attn.k_proj.bias": Role.K_BIAS,
            "attn.v_proj.bias": Role.V_BIAS,
            "attn.o_proj.bias": Role.O_BIAS,
            "mlp.gate_proj.weight": Role.MLP_GATE,
            "mlp.up_proj.weight": Role.MLP_UP,
            "mlp.down_proj.weight": Role.MLP_DOWN,
            "mlp.gate_proj.bias": Role.MLP_GATE_BIAS,
            "mlp.up_proj.bias": Role.MLP_UP_BIAS,
            "mlp.down_proj.bias": Role.MLP_DOWN_BIAS,
            "mlp.router.weight": Role.ROUTER,
            "mlp.experts.gate_proj": Role.EXPERT_GATE,
            "mlp.experts.up_proj": Role.EXPERT_UP,
            "mlp.experts.down_proj": Role.EXPERT_DOWN,
            "mlp.experts.gate_bias": Role.EXPERT_GATE_BIAS,
            "mlp.experts.up_bias": Role.EXPERT_UP_BIAS,
            "mlp.experts.down_bias": Role.EXPERT_DOWN_BIAS,
        }.items()},
    },
    config={
        "d_model": "d_model", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads", "head_dim": "head_dim",
        "d_ff": "d_ff", "n_layers": "n_layers", "vocab_size": "vocab_size", "tie_embeddings": "tie_embeddings",
        "rope": "rope_theta", "n_experts": "n_experts", "top_k": "top_k", "norm_topk_prob": "norm_topk_prob",
        "logit_scale": "logit_scale", "dense_layers": "dense_layers",
    },
    moe_sibling="growkit-reference",
)

FAMILIES: dict[str, Family] = {f.name: f for f in [
    REFERENCE,
    Family("llama", {**EMBED_HEAD, **PRE_NORMS, **ATTN, **ATTN_BIAS, **MLP, **MLP_BIAS}, HF_CONFIG, moe_sibling="mixtral"),
    Family("mistral", {**EMBED_HEAD, **PRE_NORMS, **ATTN, **MLP}, HF_CONFIG, moe_sibling="mixtral"),
    Family("qwen2", {**EMBED_HEAD, **PRE_NORMS, **ATTN, **ATTN_BIAS, **MLP}, {**HF_CONFIG, **LAYER_TYPES},
           moe_sibling="qwen2_moe"),
    Family("qwen3", {**EMBED_HEAD, **PRE_NORMS, **ATTN, **ATTN_BIAS, **HEAD_NORMS, **MLP}, {**HF_CONFIG, **LAYER_TYPES},
           moe_sibling="qwen3_moe"),
    Family("gemma", {**EMBED_HEAD, **PRE_NORMS, **ATTN, **ATTN_BIAS, **MLP}, HF_CONFIG, quirks=GEMMA),
    Family("gemma2", {**EMBED_HEAD, **GEMMA_NORMS, **ATTN, **ATTN_BIAS, **MLP}, {**HF_CONFIG, **LAYER_TYPES}, quirks=GEMMA),
    Family("gemma3_text", {**EMBED_HEAD, **GEMMA_NORMS, **ATTN, **ATTN_BIAS, **HEAD_NORMS, **MLP},
           {**HF_CONFIG, **LAYER_TYPES}, quirks=GEMMA),
    Family("phi3", {
        **EMBED_HEAD, **PRE_NORMS,
        L + "self_attn.qkv_proj.weight": Fused(0, ((Role.Q, "n_heads"), (Role.K, "n_kv_heads"), (Role.V, "n_kv_heads"))),
        L + "self_attn.o_proj.weight": Role.O,
        L + "mlp.gate_up_proj.weight": Fused(0, ((Role.MLP_GATE, 1), (Role.MLP_UP, 1))),
        L + "mlp.down_proj.weight": Role.MLP_DOWN,
    }, HF_CONFIG),
    Family("olmo2", {
        **EMBED_HEAD, **ATTN, **ATTN_BIAS, **MLP,
        L + "post_attention_layernorm.weight": Role.ATTN_OUT_NORM,
        L + "post_feedforward_layernorm.weight": Role.MLP_OUT_NORM,
        L + "self_attn.q_norm.weight": Role.Q_NORM,
        L + "self_attn.k_norm.weight": Role.K_NORM,
    }, HF_CONFIG),
    Family("mixtral", {**EMBED_HEAD, **PRE_NORMS, **ATTN, **EXPERTS}, MIXTRAL_CONFIG,
           quirks=frozenset({"renormalized_topk"}), disk=MIXTRAL_ON_DISK),
    Family("qwen2_moe", {**EMBED_HEAD, **PRE_NORMS, **ATTN, **ATTN_BIAS, **MLP, **EXPERTS, **SHARED_EXPERT},
           {**QWEN_MOE_CONFIG, "shared_d_ff": "shared_expert_intermediate_size"},
           quirks=frozenset({"shared_expert", "sparse_layer_list"}), disk=EXPERTS_ON_DISK),
    Family("qwen3_moe", {**EMBED_HEAD, **PRE_NORMS, **ATTN, **ATTN_BIAS, **HEAD_NORMS, **MLP, **EXPERTS},
           QWEN_MOE_CONFIG, quirks=frozenset({"sparse_layer_list"}), disk=EXPERTS_ON_DISK),
]}
