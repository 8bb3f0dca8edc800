"""The ``growkit`` console command.

    growkit train --preset tiny            # the three-phase TinyStories pipeline
    growkit train --help                   # every TrainConfig field as a flag (tyro)
    growkit grow SRC DST --width 2         # grow a Hugging Face checkpoint on disk
    growkit verify SRC DST                 # the growth checks on two checkpoints

``growkit train`` takes exactly the arguments of ``python train_tinystories.py``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatches ``growkit <command> ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="growkit",
        description="Grow trained transformer LMs (HyperCloning, depth, MoE upcycling) and "
        "verify the grown model computes what the small one did.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", add_help=False,
                   help="three-phase TinyStories training: dense -> MoE -> wider and deeper")
    sub.add_parser("grow", add_help=False,
                   help="grow a Hugging Face checkpoint on disk (wider, deeper, MoE), tensor by tensor")
    sub.add_parser("verify", add_help=False,
                   help="run the growth checks on a source and a grown checkpoint (exit 0/1/2)")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        from growkit import __version__

        print(f"growkit {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        # The pipeline owns its parser, so `growkit train -h` lists every field.
        from growkit.train.pipeline import main as train_main

        return train_main(rest, prog="growkit train")
    if command in ("grow", "verify"):
        from growkit.checkpoint_cli import run

        return run(command, rest)
    parser.error(f"unknown command {command!r}; choose from: train, grow, verify")
    return 2  # pragma: no cover - parser.error exits


if __name__ == "__main__":
    sys.exit(main())
