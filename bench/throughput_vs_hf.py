"""Training throughput: growkit's reference model vs transformers' LlamaForCausalLM.

    pip install -e ".[hf]" && python bench/throughput_vs_hf.py

Both models get the same configuration (d_model, layers, heads, KV heads, d_ff, vocab,
untied embeddings, no biases) and the same batches; one training step is forward,
cross-entropy, backward and an AdamW step. Steps alternate between the two models so
that machine load affects both alike; the figure is the ratio of median step times from
one run. Results: ``bench/results/throughput_vs_hf_<device>.json``.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_label, parse_cli, print_table, write_results  # noqa: E402

from growkit.models import ModelConfig, Transformer  # noqa: E402


def hf_llama(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


@dataclass
class Args:
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    vocab: int = 4096
    batch: int = 8
    seq: int = 256
    steps: int = 12


def main(argv=None):
    args = parse_cli(Args, argv, description=__doc__)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers,
                      n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, max_seq_len=args.seq)
    torch.manual_seed(0)
    models = {"growkit": Transformer(cfg).to(device), "hf-llama": hf_llama(cfg).to(device)}
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen).to(device)
               for _ in range(args.steps)]

    def step(name, batch):
        model, opt = models[name], opts[name]
        x, y = batch[:, :-1], batch[:, 1:]
        out = model(x)
        logits = out if torch.is_tensor(out) else out.logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {k: [] for k in models}
    for i, batch in enumerate(batches):
        order = list(models) if i % 2 == 0 else list(models)[::-1]  # alternate who goes first
        for name in order:
            t0 = time.perf_counter()
            step(name, batch)
            if i >= 2:  # warm-up
                times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(model=name, params=n_params[name], step_ms=med * 1e3, tokens_per_s=tokens / med))
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    for r in rows:
        r["throughput_vs_hf"] = r["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"device: {device_label(device)}; batch {args.batch} x {args.seq} tokens")
    print_table(rows, ["model", "params", "step_ms", "tokens_per_s", "throughput_vs_hf"])
    print(f"\ngrowkit / transformers LlamaForCausalLM training throughput: {ratio:.2f}x")
    import transformers

    meta = dict(device=device_label(device), config=cfg.to_dict(), batch=args.batch, seq=args.seq,
                steps=args.steps, torch=torch.__version__, transformers=transformers.__version__)
    paths = write_results("throughput_vs_hf", device, meta, rows)
    print(f"wrote {paths[0]}")


if __name__ == "__main__":
    main()
