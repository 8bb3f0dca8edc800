#!/usr/bin/env python
"""Three-phase TinyStories training: dense -> upcycled MoE -> wider and deeper MoE.

    python train_tinystories.py --preset tiny        # < 5 min on a 2-core CPU
    python train_tinystories.py --preset tiny --phase1.steps 300 --phase2.lr 1e-3
    python train_tinystories.py --config run.yaml    # keys: field names, e.g. phase1: {steps: 300}
    python train_tinystories.py --help               # every setting (the flags come from tyro)
    torchrun --nproc-per-node 2 train_tinystories.py --preset tiny --threads 1   # data parallel

Same as ``growkit train``; the pipeline lives in ``growkit.train.pipeline`` (under torchrun:
FSDP2 or ``--parallel ddp``, sharded checkpoints; see ``growkit.train.distributed``).
"""

import sys

from growkit.train.pipeline import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="train_tinystories.py"))
