"""Fine-tune a width-grown Hugging Face Llama with ``transformers.Trainer``, GrowthMonitor watching.

A tiny random Llama (``LlamaConfig``) is grown 2x wider with HyperCloning
(``growkit.growth.grow_width``, symmetry-breaking noise 1e-3), then fine-tuned for a few
steps on the text embedded below (bytes as tokens: no tokenizer, nothing downloaded).
``add_growth_monitor`` puts a ``GrowthMonitorCallback`` in the Trainer: every ``--every``
steps it measures how far the cloned weights have drifted apart and logs it through the
Trainer's own logging (``growth/*`` keys in ``trainer.state.log_history`` and in whatever
``report_to`` names), printing one line per tick. With ``--noise-std 0`` the clones are
identical and stay so: the monitor warns.

    python examples/finetune_grown_hf.py                 # offline, CPU, about 10 s
    python examples/finetune_grown_hf.py --noise-std 0   # the planted bug: it warns

Needs ``pip install 'growkit[hf]' accelerate`` (the Trainer requires accelerate).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch
import tyro

T0 = time.perf_counter()

from growkit.growth import grow_width
from growkit.verify.hf_callback import add_growth_monitor

TEXT = (
    "Once upon a time there was a little fox who lived at the edge of a quiet wood. Every "
    "morning the fox ran to the river to look at the fish, and every evening it ran home to "
    "count the stars. One day a small bird fell from its nest near the river. The fox carried "
    "the bird home, gave it water and seeds, and kept it warm through the night. When the sun "
    "came up the bird sang a song so sweet that the whole wood woke up to listen. From that "
    "day on the fox and the bird were friends, and they went to the river together. "
) * 4


class ByteText(torch.utils.data.Dataset):
    """The text as byte tokens, cut into windows of ``seq_len`` (labels = inputs: the model shifts)."""

    def __init__(self, text: str, seq_len: int) -> None:
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        n = (len(ids) - 1) // seq_len
        self.rows = ids[: n * seq_len].reshape(n, seq_len)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


@dataclass
class Args:
    steps: int = 30
    every: int = 5
    """monitor every this many steps"""
    noise_std: float = 1e-3
    """grow_width's symmetry-breaking noise"""
    seq_len: int = 64
    threads: int = 1
    """torch threads (a tiny model: more only spin on a busy 2-core machine, 16 s instead of 2)"""


def main() -> None:
    args = tyro.cli(Args, description=__doc__.split("\n")[0])
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len)
    small = LlamaForCausalLM(config)
    grown = grow_width(small, 2, noise_std=args.noise_std)
    print(f"grown {small.config.hidden_size} -> {grown.config.hidden_size} wide: "
          f"{sum(p.numel() for p in small.parameters()):,} -> {sum(p.numel() for p in grown.parameters()):,} parameters")

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=8,
                                  learning_rate=3e-3, logging_steps=10, report_to="none", use_cpu=True,
                                  save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=grown, args=targs, train_dataset=ByteText(TEXT, args.seq_len))
        add_growth_monitor(trainer, every=args.every, log_fn=print)
        trainer.train()

    print("\ngrowth/* entries of trainer.state.log_history:")
    for entry in trainer.state.log_history:
        figures = {k: round(v, 6) for k, v in entry.items() if k.startswith("growth/")}
        if figures:
            print(f"  step {entry['step']:>3}  loss {entry.get('loss', float('nan')):.3f}  {figures}")
    print(f"done in {time.perf_counter() - T0:.1f} s (imports included)")


if __name__ == "__main__":
    main()
