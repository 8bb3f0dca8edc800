"""``growkit grow --device cuda`` equals ``growkit grow --device cpu``, file for file, bit for bit.

    python bench/grow_device_check.py                 # needs CUDA; exits 1 on a difference
    python bench/grow_device_check.py --device cpu    # a dry run of this script (cpu against cpu)

Writes a small random Llama checkpoint (2 safetensors shards, float32, norms randomized),
grows it x2 wide with one extra layer and 4 experts through the command line on each
device, and compares every tensor of the two outputs bitwise: the noise is an integer hash,
so the Triton kernels must give the CPU's bits.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_cli  # noqa: E402


@dataclass
class Args:
    device: Literal["cuda", "cpu"] = "cuda"


def main(argv=None) -> int:
    args = parse_cli(Args, argv, description=__doc__.splitlines()[0])
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    from growkit.cli import main as growkit

    with tempfile.TemporaryDirectory(prefix="growkit-device-check-") as tmp:
        src, grown = Path(tmp) / "src", []
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1 + 0.1 * torch.randn_like(p))
        model.save_pretrained(src, max_shard_size="400KB")
        for device in ("cpu", args.device):
            dst = Path(tmp) / f"dst-{device}-{len(grown)}"
            rc = growkit(["grow", str(src), str(dst), "--width", "2", "--depth", "1", "--moe", "4", "--top-k", "2",
                          "--device", device, "--no-progress"])
            if rc != 0:
                print(f"growkit grow --device {device} exited {rc}")
                return 1
            tensors = {}
            for f in sorted(dst.glob("*.safetensors")):
                with safe_open(str(f), "pt") as sf:
                    tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
            grown.append(tensors)
        a, b = grown
        bad = [k for k in a if k not in b or a[k].shape != b[k].shape
               or not torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))]
        bad += [k for k in b if k not in a]
        print(f"growkit grow --device {args.device} vs --device cpu: {len(a)} tensors, "
              f"{'all bitwise equal' if not bad else f'{len(bad)} differ: ' + ', '.join(bad[:8])}")
        return 0 if not bad and a else 1


if __name__ == "__main__":
    sys.exit(main())
