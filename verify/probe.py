"""Probe inputs and the forward (and backward) pass every check reads from.

One :func:`run_probe` call captures, in a single forward pass, everything the checks
compare: the logits, the residual stream after the embedding and after every layer, each
layer's attention output (the output of the module holding its ``o_proj`` weight) and
each MoE layer's router logits (the output of the module holding its router weight).
With ``backward=True`` it also runs one backward pass of the next-token loss on the probe
and keeps the gradients. The modules to hook are found through the role table
(``growkit.growth`` adapters), never by parameter name. The model's state is restored
afterwards (see :mod:`growkit.verify.state`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from growkit.growth.adapters import PART, get_adapter
from growkit.growth.roles import Role
from growkit.models.transformer import causal_lm_loss

from .state import ModelGuard


def vocab_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "vocab_size", None):
        return int(cfg.vocab_size)
    return int(model.get_input_embeddings().weight.shape[0])  # pragma: no cover


def make_probe(
    model: nn.Module,
    batch: int = 2,
    seq_len: int = 16,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A reproducible random probe [batch, seq_len] of token ids in the model's vocabulary.

    Random tokens are enough: the checks compare two models on the same input, and a RoPE
    break shows at every position > 0 whatever the tokens are.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size(model), (batch, seq_len), generator=gen)
    return ids.to(device) if device is not None else ids


def check_probe(probe: torch.Tensor, models: list[nn.Module], min_len: int = 2) -> torch.Tensor:
    """Validate a probe [B, T] of token ids for every model; returns it as int64."""
    if not isinstance(probe, torch.Tensor):
        raise TypeError(f"probe must be a [B, T] tensor of token ids, got {type(probe).__name__}")
    if probe.dim() != 2 or probe.numel() == 0:
        raise ValueError(f"probe must be a non-empty [B, T] tensor of token ids, got shape {tuple(probe.shape)}")
    if probe.is_floating_point() or probe.is_complex() or probe.dtype == torch.bool:
        raise TypeError(f"probe must hold integer token ids, got {probe.dtype}")
    if probe.shape[1] < min_len:
        raise ValueError(
            f"probe has {probe.shape[1]} positions; the checks need at least {min_len} (the "
            "next-token loss needs 2, and a RoPE break only shows at positions > 0)"
        )
    vmin, vmax = int(probe.min()), int(probe.max())
    for m in models:
        V = vocab_size(m)
        if vmin < 0 or vmax >= V:
            raise ValueError(f"probe token ids must be in [0, {V}), got ids in [{vmin}, {vmax}]")
    return probe.long()


def hook_modules(model: nn.Module, role: Role) -> dict[int, nn.Module]:
    """layer -> the module that owns that layer's parameter of ``role``."""
    roles = get_adapter(model, "verification").param_roles(model)
    out = {}
    for name, pr in roles.items():
        # a part of a fused tensor has no module of its own: its module's output mixes parts
        if pr.role is role and pr.layer is not None and not PART.match(name):
            out[pr.layer] = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return out


@dataclass
class ProbeRun:
    """What one forward (and optional backward) pass on the probe produced; all detached.

    Attributes:
        logits: [B, T, V].
        hidden: n_layers + 1 tensors [B, T, d] (embedding output, then each layer's output).
        attn: layer -> attention output [B, T, d] (output of its o_proj, or of the norm
            on it in a family with output norms).
        router: layer -> router logits [N, E] float32 (MoE layers only).
        qk: (role name "q_proj" / "k_proj", layer) -> that projection's output [B, T, H*hd]
            (before RoPE); read only to tell a projection bug from a rotation bug.
        loss: next-token cross entropy on the probe (float).
        grads: parameter name -> gradient (None where a parameter got none); only with
            ``backward=True``.
    """

    logits: torch.Tensor
    hidden: list[torch.Tensor]
    attn: dict[int, torch.Tensor]
    router: dict[int, torch.Tensor]
    loss: float
    grads: dict[str, torch.Tensor | None] | None = None
    qk: dict[tuple[str, int], torch.Tensor] | None = None


def _next_token_loss(logits: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of predicting token t+1 from position t (needs T >= 2)."""
    if probe.shape[1] < 2:
        raise ValueError("a probe of at least 2 tokens is needed for a next-token loss")
    return causal_lm_loss(logits[:, :-1], probe[:, 1:])


def run_probe(
    model: nn.Module,
    probe: torch.Tensor,
    *,
    attention: bool = True,
    routers: bool = True,
    backward: bool = False,
) -> ProbeRun:
    """One forward pass on ``probe`` (and a backward pass when asked); model left as it was."""
    captured_attn: dict[int, torch.Tensor] = {}
    captured_router: dict[int, torch.Tensor] = {}
    captured_qk: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def capture(store, layer, as_float):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):  # a router module: (logits, weights, indices)
                output = output[0]
            out = output.detach()
            if as_float:  # router logits: [tokens, experts]
                out = out.float().reshape(-1, out.shape[-1])
            store[layer] = out

        return hook

    adapter = get_adapter(model, "verification")
    with ModelGuard(model):
        try:
            if attention:
                # what the attention adds to the residual stream: its output norm's output
                # where the family has one (OLMo2, Gemma2/3), else the o_proj output
                attn_out = hook_modules(model, Role.ATTN_OUT_NORM) or hook_modules(model, Role.O)
                for layer, mod in attn_out.items():
                    handles.append(mod.register_forward_hook(capture(captured_attn, layer, False)))
                for role in (Role.Q, Role.K):
                    for layer, mod in hook_modules(model, role).items():
                        handles.append(mod.register_forward_hook(capture(captured_qk, (role.value, layer), False)))
            if routers:
                for layer, mod in hook_modules(model, Role.ROUTER).items():
                    handles.append(mod.register_forward_hook(capture(captured_router, layer, True)))
            model.eval()
            grads = None
            if backward:
                params = list(model.parameters())
                for p in params:
                    p.grad = None
                    p.requires_grad_(True)
                with torch.enable_grad():
                    logits, hidden = adapter.forward_hidden(model, probe)
                    loss = _next_token_loss(logits, probe)
                    loss.backward()
                grads = {name: p.grad for name, p in model.named_parameters()}
                logits = logits.detach()
                hidden = [h.detach() for h in hidden]
            else:
                with torch.no_grad():
                    logits, hidden = adapter.forward_hidden(model, probe)
                    loss = _next_token_loss(logits, probe)
                hidden = list(hidden)
        finally:
            for h in handles:
                h.remove()
    return ProbeRun(logits, hidden, captured_attn, captured_router, float(loss.detach()), grads, captured_qk)
