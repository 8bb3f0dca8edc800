"""growkit: grow trained transformer LMs (width, depth, MoE) and verify the grown model.

The repository folders install under one namespace (never as top-level ``kernels``,
``growth`` or ``verify``, names that other PyPI packages own):

    api/      -> growkit            (top-level API, console command)
    kernels/  -> growkit.kernels    (Triton kernels with torch references)
    models/   -> growkit.models     (reference Llama-style transformer)
    growth/   -> growkit.growth     (width, depth, MoE, bilateral growth)
    verify/   -> growkit.verify     (the growth checks and reports)
    train/    -> growkit.train      (the TinyStories pipeline)
"""
import sys

from setuptools import setup

PACKAGE_DIRS = {
    "growkit": "api",
    "growkit.kernels": "kernels",
    "growkit.models": "models",
    "growkit.growth": "growth",
    "growkit.verify": "verify",
    "growkit.train": "train",
}

install_requires = [
    "torch>=2.5",
    "einops>=0.7",
    "numpy>=1.24",
    "safetensors>=0.4",
    "tqdm>=4.60",
]
if sys.platform.startswith("linux"):
    install_requires.append("triton>=3.0")

setup(
    name="growkit",
    version="0.1.0",
    description="Grow trained transformer language models (HyperCloning, G_stack, "
    "MoE upcycling) and verify that the grown model computes what the small one did.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    # The offline default data: a TinyStories sample (xz) and its license notice;
    # and the C source of the CPU's noisy HyperClone, compiled on first use (kernels/cpu_ext.py).
    package_data={"growkit.train": ["assets/*.txt.xz", "assets/*.txt"], "growkit.kernels": ["csrc/*.c"]},
    install_requires=install_requires,
    extras_require={
        "test": ["pytest>=7"],
        "plot": ["matplotlib>=3.5"],
        "hf": ["transformers>=5.0", "tokenizers>=0.15", "accelerate>=1.1"],  # accelerate: transformers.Trainer
        "yaml": ["pyyaml>=6"],
        # growkit grow / growkit verify (with the hf extra)
        "cli": ["tyro>=0.9", "pyyaml>=6"],
    },
    entry_points={"console_scripts": ["growkit=growkit.cli:main"]},
)
