"""Tiny reference models with every parameter random (norm gains and biases too).

Function-preservation tests must not pass by accident: a norm gain of ones or a bias of
zeros tiles to itself whatever the tiling bug, so everything is drawn at random here.
"""

from __future__ import annotations

import torch

from growkit.models import ModelConfig, Transformer


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            p.copy_((1.0 + std * noise).to(p.dtype))
        elif "bias" in name:
            p.copy_((0.1 * noise).to(p.dtype))
        elif "router" in name:
            p.copy_((noise * 0.5).to(p.dtype))  # strongly routed: a router bug must show
        else:
            p.copy_((std * noise).to(p.dtype))
    return model


def random_model(seed: int = 0, *, vocab_size: int = 97, d_model: int = 32, n_layers: int = 3,
                 n_heads: int = 4, n_kv_heads: int | None = None, d_ff: int = 48, n_experts: int = 0,
                 top_k: int = 2, tie_embeddings: bool = False, bias: bool = True, **kw) -> Transformer:
    cfg = ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, d_ff=d_ff, n_experts=n_experts, top_k=top_k,
                      tie_embeddings=tie_embeddings, attn_bias=bias, mlp_bias=bias, **kw)
    return randomize_(Transformer(cfg), seed).eval()


def random_ids(vocab_size: int = 97, shape=(2, 13), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def rel_err(new: torch.Tensor, ref: torch.Tensor) -> float:
    """max |new - ref| / max |ref|, in float64."""
    return ((new.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# A pipeline run of seconds: phase 1: 6 steps (global 1-6), phase 2: 4 (7-10), phase 3: 4
# (11-14); checkpoints at 6 (phase-1 end), 10 (phase-2 end), 12 (periodic), 14 (phase-3 end).
TINY_PIPELINE = [
    "--max-stories", "200", "--d-model", "32", "--n-layers", "2", "--n-heads", "2",
    "--seq-len", "32", "--batch-size", "4", "--n-experts", "4", "--top-k", "2",
    "--scale-factor", "2", "--extra-layers", "1",
    "--steps-phase1", "6", "--steps-phase2", "4", "--steps-phase3", "4",
    "--eval-interval", "3", "--eval-batches", "2", "--log-interval", "1",
    "--checkpoint-every", "4", "--keep-checkpoints", "1", "--probe-batch-size", "2",
    "--device", "cpu", "--no-progress", "--no-plot",
    # one thread: with other processes on a 2-core machine, torch's thread pool spins
    # (measured: 3.4 s instead of 86 s for this run)
    "--threads", "1",
]
