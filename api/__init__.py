"""growkit: grow trained transformer language models and verify the grown model."""

__version__ = "0.1.0"
