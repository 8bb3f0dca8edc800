"""Reference Llama-style decoder-only transformer (dense SwiGLU or mixture of experts).

Shape legend: B batch, T sequence length, H query heads, K key/value heads, D head_dim,
d d_model, F d_ff, E n_experts, N = B * T tokens, V vocab_size.

Parameter names are part of the public contract: growth code maps names such as
``layers.0.attn.q_proj.weight`` or ``layers.3.mlp.experts.down_proj`` to growth roles.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

__all__ = [
    "RMSNorm",
    "rotate_half",
    "rope_cos_sin",
    "apply_rope",
    "Attention",
    "MLP",
    "Experts",
    "MoE",
    "Block",
    "Transformer",
    "causal_lm_loss",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types; float64 stays float64 so exactness tests keep precision."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x * rsqrt(mean(x^2) + eps) * weight``.

    Computed in (at least) float32 and cast back, so bf16 models normalize with fp32
    statistics.

    Args:
        dim: Size of the last (normalized) dimension.
        eps: Added to the mean square before the rsqrt.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalizes ``x`` [..., dim] over its last dimension; returns x's dtype."""
        dtype = _compute_dtype(x.dtype)
        xf = x.to(dtype)
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama ``rotate_half``: splits the last dim into halves (x1, x2), returns (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(
    seq_len: int,
    head_dim: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for positions ``0 .. seq_len - 1`` in float32.

    Uses the Llama / HF layout: frequency ``i`` applies to dims ``i`` and ``i + D/2``.

    Args:
        seq_len: Number of positions T.
        head_dim: Per-head width D (even).
        theta: Base frequency.
        device: Device of the returned tables.

    Returns:
        ``(cos, sin)``, each [T, D] float32.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` [B, T, H, D] by position; ``cos``/``sin`` are [T, D] (or longer).

    The rotation runs in (at least) float32, because bf16 rotations visibly break the
    relative-position property, and the result is cast back to ``x.dtype``.
    """
    T = x.shape[1]
    cos = cos[:T, None, :]  # [T, 1, D], broadcast over B and H
    sin = sin[:T, None, :]
    dtype = _compute_dtype(x.dtype)
    xf = x.to(dtype)
    return (xf * cos.to(dtype) + rotate_half(xf) * sin.to(dtype)).to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with RoPE; MHA, GQA and MQA via ``n_kv_heads``.

    Query head ``i`` attends with key/value head ``i // (n_heads // n_kv_heads)``.

    Args:
        cfg: Model config (uses d_model, n_heads, n_kv_heads, head_dim, attn_bias,
            rope_theta).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        q_dim = cfg.n_heads * cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.attn_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attends causally over ``x``.

        Args:
            x: [B, T, d].
            cos: [>=T, D] float32 RoPE table; computed here when ``None`` (standalone use).
            sin: Same as ``cos``.

        Returns:
            [B, T, d].
        """
        B, T, _ = x.shape
        if cos is None or sin is None:
            cos, sin = rope_cos_sin(T, self.head_dim, self.rope_theta, device=x.device)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        # SDPA wants [B, heads, T, D]; enable_gqa maps query head i to kv head
        # i // (H // K), the same as repeat_interleave of k/v along the head dim.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``.

    Args:
        cfg: Model config (uses d_model, d_ff, mlp_bias).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps [..., d] -> [..., d]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """Stacked SwiGLU experts with nn.Linear-style ``[out, in]`` weights.

    Parameters: ``gate_proj`` [E, F, d], ``up_proj`` [E, F, d], ``down_proj`` [E, d, F]
    and, with ``cfg.mlp_bias``, ``gate_bias`` [E, F], ``up_bias`` [E, F],
    ``down_bias`` [E, d]. Slice ``e`` of each is exactly an :class:`MLP`'s weight/bias,
    which is what upcycling copies.

    Args:
        cfg: Model config (uses n_experts, d_model, d_ff, mlp_bias).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, d, f = cfg.n_experts, cfg.d_model, cfg.d_ff
        self.n_experts = E
        self.gate_proj = nn.Parameter(torch.empty(E, f, d))
        self.up_proj = nn.Parameter(torch.empty(E, f, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, f))
        if cfg.mlp_bias:
            self.gate_bias = nn.Parameter(torch.zeros(E, f))
            self.up_bias = nn.Parameter(torch.zeros(E, f))
            self.down_bias = nn.Parameter(torch.zeros(E, d))
        else:
            self.register_parameter("gate_bias", None)
            self.register_parameter("up_bias", None)
            self.register_parameter("down_bias", None)

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Runs expert ``expert`` on the tokens routed to it.

        Args:
            x: [n, d] tokens.
            expert: Expert index in ``[0, E)``.

        Returns:
            [n, d].
        """

        def bias(b: torch.Tensor | None) -> torch.Tensor | None:
            return None if b is None else b[expert]

        gate = F.linear(x, self.gate_proj[expert], bias(self.gate_bias))
        up = F.linear(x, self.up_proj[expert], bias(self.up_bias))
        return F.linear(F.silu(gate) * up, self.down_proj[expert], bias(self.down_bias))

    def extra_repr(self) -> str:
        E, f, d = self.gate_proj.shape
        return f"n_experts={E}, d_model={d}, d_ff={f}, bias={self.gate_bias is not None}"


class MoE(nn.Module):
    """Top-k routed mixture of SwiGLU experts.

    ``probs = softmax(router(x))`` in float32; the top-k probabilities (renormalized to
    sum to 1 when ``norm_topk_prob``) weight the chosen experts' outputs. Each expert
    only runs on the tokens routed to it.

    After every forward, ``last_router_logits`` ([N, E] float32, still in the autograd
    graph) and ``last_aux_loss`` (0-d float32 Switch load-balancing loss
    ``E * sum_e f_e * P_e``) hold the values of that call.

    Args:
        cfg: Model config (uses n_experts, top_k, norm_topk_prob, d_model, d_ff,
            mlp_bias).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.norm_topk_prob = cfg.norm_topk_prob
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = Experts(cfg)
        self.last_router_logits: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps [..., d] -> [..., d]."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # [N, d]
        N = xf.shape[0]
        E, k = self.n_experts, self.top_k

        logits = self.router(xf).float()  # [N, E]
        probs = logits.softmax(dim=-1)
        top_w, top_i = probs.topk(k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)

        # Group the N*k token-slots by expert so each expert sees one contiguous batch.
        slot_expert = top_i.reshape(-1)  # [N*k]
        slot_weight = top_w.reshape(-1)
        slot_token = torch.arange(N, device=x.device).repeat_interleave(k)
        order = torch.argsort(slot_expert, stable=True)
        counts = torch.bincount(slot_expert, minlength=E)
        counts_list = counts.tolist()

        # Accumulate in float32: summing k weighted bf16 outputs in bf16 would lose the
        # exactness upcycling relies on (weights summing to 1 times identical experts).
        out = torch.zeros(N, shape[-1], device=x.device, dtype=torch.float32)
        start = 0
        for e, n in enumerate(counts_list):
            if n == 0:
                continue
            idx = order[start : start + n]
            start += n
            tok = slot_token.index_select(0, idx)
            y = self.experts(xf.index_select(0, tok), e)  # [n, d]
            w = slot_weight.index_select(0, idx).unsqueeze(-1)
            out.index_add_(0, tok, y.float() * w)

        # Switch Transformer load balancing: f_e is not differentiable (hard counts),
        # the gradient flows through the mean router probabilities P_e.
        f = counts.to(torch.float32) / float(max(N * k, 1))
        P = probs.mean(dim=0)
        self.last_router_logits = logits
        self.last_aux_loss = E * torch.sum(f * P)
        return out.to(x.dtype).reshape(shape)


class Block(nn.Module):
    """Pre-norm decoder block: ``h += attn(attn_norm(h)); h += mlp(mlp_norm(h))``.

    Args:
        cfg: Model config.
        layer: The block's index (from 0). ``mlp`` is an :class:`MoE` when
            ``cfg.is_moe_layer(layer)`` (``n_experts > 0`` and ``layer`` not in
            ``cfg.dense_layers``), a dense :class:`MLP` otherwise. ``None`` (a block on its
            own): an :class:`MoE` whenever ``cfg.n_experts > 0``.
    """

    def __init__(self, cfg: ModelConfig, layer: int | None = None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        sparse = cfg.n_experts > 0 if layer is None else cfg.is_moe_layer(layer)
        self.mlp: MLP | MoE = MoE(cfg) if sparse else MLP(cfg)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Maps the residual stream [B, T, d] -> [B, T, d]."""
        h = h + self.attn(self.attn_norm(h), cos, sin)
        return h + self.mlp(self.mlp_norm(h))


def causal_lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean next-token cross entropy in float32.

    ``targets`` must already be aligned with ``logits`` (``targets[:, t]`` is the token
    that follows ``input_ids[:, t]``); this function does not shift.

    Args:
        logits: [B, T, V].
        targets: [B, T] token ids; ``ignore_index`` entries are skipped.
        ignore_index: Target value to skip.

    Returns:
        0-d float32 tensor.
    """
    V = logits.shape[-1]
    return F.cross_entropy(
        logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index
    )


class Transformer(nn.Module):
    """Llama-style decoder-only language model.

    Submodules: ``embed`` (nn.Embedding), ``layers`` (nn.ModuleList of :class:`Block`),
    ``norm`` (:class:`RMSNorm`) and, unless ``cfg.tie_embeddings``, ``lm_head``
    (nn.Linear without bias). Tied models use ``embed.weight`` as the output matrix and
    have no ``lm_head`` module at all, so the state dict holds the matrix once.

    Args:
        cfg: Model config.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Non-persistent: derived from the config, so never saved or loaded.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self._build_rope(cfg.max_seq_len, device=self.embed.weight.device)
        self.init_weights()

    # ----------------------------------------------------------------- RoPE tables

    def _build_rope(self, seq_len: int, device: torch.device | str | None) -> None:
        cos, sin = rope_cos_sin(seq_len, self.config.head_dim, self.config.rope_theta, device)
        self.rope_cos = cos
        self.rope_sin = sin

    def _rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns float32 [>=seq_len, D] tables on ``device``, rebuilding when stale.

        ``model.to(torch.bfloat16)`` casts every floating buffer, which would quantize
        the angles, and loading on the meta device leaves them empty; both are healed
        here rather than by overriding ``nn.Module._apply``.
        """
        cos = self.rope_cos
        if (
            cos.dtype != torch.float32
            or cos.device != device
            or cos.shape[0] < seq_len
            or cos.dim() != 2
        ):
            self._build_rope(max(seq_len, self.config.max_seq_len), device)
        return self.rope_cos, self.rope_sin

    # ----------------------------------------------------------------- init

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initializes all parameters.

        Linear and embedding weights ~ N(0, 0.02); ``o_proj`` / ``down_proj`` (including
        the stacked expert ``down_proj``) ~ N(0, 0.02 / sqrt(2 * n_layers)) so the
        residual stream variance does not grow with depth; router ~ N(0, 0.02); biases
        zero; norm weights one.

        Values are drawn on the CPU in float32 and copied in, so a given ``seed`` gives
        the same weights on every device and dtype. Meta tensors are skipped.

        Args:
            seed: Seed of a private generator; ``None`` uses torch's global CPU RNG.
        """
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
        std = 0.02
        scaled_std = 0.02 / math.sqrt(2 * self.config.n_layers)

        def normal_(p: torch.Tensor | None, s: float) -> None:
            if p is None or p.is_meta:
                return
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)

        def fill_(p: torch.Tensor | None, value: float) -> None:
            if p is None or p.is_meta:
                return
            p.fill_(value)

        for name, module in self.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Embedding):
                normal_(module.weight, std)
            elif isinstance(module, nn.Linear):
                normal_(module.weight, scaled_std if leaf in ("o_proj", "down_proj") else std)
                fill_(module.bias, 0.0)
            elif isinstance(module, RMSNorm):
                fill_(module.weight, 1.0)
            elif isinstance(module, Experts):
                normal_(module.gate_proj, std)
                normal_(module.up_proj, std)
                normal_(module.down_proj, scaled_std)
                fill_(module.gate_bias, 0.0)
                fill_(module.up_bias, 0.0)
                fill_(module.down_bias, 0.0)

    # ----------------------------------------------------------------- forward

    @property
    def output_weight(self) -> torch.Tensor:
        """The [V, d] output matrix: ``lm_head.weight``, or ``embed.weight`` when tied."""
        if self.config.tie_embeddings:
            return self.embed.weight
        return self.lm_head.weight

    def forward(
        self, input_ids: torch.Tensor, return_hidden_states: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Computes next-token logits.

        Args:
            input_ids: [B, T] integer token ids.
            return_hidden_states: Also return the residual stream after the embedding
                and after every layer.

        Returns:
            logits [B, T, V] in the model dtype, or ``(logits, hidden_states)`` where
            ``hidden_states`` is a tuple of ``n_layers + 1`` tensors [B, T, d]:
            index 0 is the embedding output, index ``i + 1`` the output of layer ``i``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        h = self.embed(input_ids)
        cos, sin = self._rope(T, h.device)
        hidden = [h] if return_hidden_states else None
        for layer in self.layers:
            h = layer(h, cos, sin)
            if hidden is not None:
                hidden.append(h)
        logits = F.linear(self.norm(h), self.output_weight)
        if self.config.logit_scale != 1.0:
            logits = logits * self.config.logit_scale
        if hidden is not None:
            return logits, tuple(hidden)
        return logits

    def loss(
        self, input_ids: torch.Tensor, targets: torch.Tensor, include_aux: bool = True,
        forward: nn.Module | None = None,
    ) -> torch.Tensor:
        """Cross entropy plus, for MoE models, ``aux_loss_coef * aux_loss()``.

        Args:
            input_ids: [B, T].
            targets: [B, T], already shifted (see :func:`causal_lm_loss`).
            include_aux: Add the weighted load-balancing loss (no-op for dense models).
            forward: a wrapper of this model to compute the logits through (e.g.
                ``DistributedDataParallel``, whose forward arms the gradient sync); None:
                this model.

        Returns:
            0-d float32 tensor.
        """
        loss = causal_lm_loss((self if forward is None else forward)(input_ids), targets)
        if include_aux and self.config.n_experts > 0 and self.config.aux_loss_coef != 0.0:
            loss = loss + self.config.aux_loss_coef * self.aux_loss()
        return loss

    def moe_layers(self) -> list[MoE]:
        """The MoE modules in layer order (empty for a dense model)."""
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' ``last_aux_loss`` from the latest forward (unweighted).

        Returns:
            0-d float32 tensor; zero for dense models or before any forward.
        """
        total = torch.zeros((), dtype=torch.float32, device=self.embed.weight.device)
        for moe in self.moe_layers():
            if moe.last_aux_loss is not None:
                total = total + moe.last_aux_loss
        return total

    def router_logits(self) -> list[torch.Tensor]:
        """Each MoE layer's ``last_router_logits`` ([N, E] float32) from the latest forward."""
        return [m.last_router_logits for m in self.moe_layers() if m.last_router_logits is not None]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameter elements (tied matrices counted once).

        Args:
            exclude_embeddings: Leave out ``embed.weight`` (the output matrix of an
                untied model is still counted).
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n
