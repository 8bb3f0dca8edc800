"""Fused Triton kernels with eager torch references and fallbacks.

Every public function dispatches to its Triton kernel for CUDA tensors (or CPU tensors under
``TRITON_INTERPRET=1``) and to its torch reference otherwise; ``GROWKIT_BACKEND`` overrides.
"""

from .backend import interpreter_enabled, requested_backend, use_triton
from .block_divergence import BlockDivergence, block_divergence, naive_block_divergence
from .hyperclone import hyperclone, naive_hyperclone
from .layer_diff import LayerDiffStats, layer_diff_stats, naive_layer_diff_stats

__all__ = [
    "BlockDivergence",
    "LayerDiffStats",
    "block_divergence",
    "hyperclone",
    "interpreter_enabled",
    "layer_diff_stats",
    "naive_block_divergence",
    "naive_hyperclone",
    "naive_layer_diff_stats",
    "requested_backend",
    "use_triton",
]
