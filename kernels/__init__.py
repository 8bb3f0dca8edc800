"""Fused Triton kernels with eager torch references and fallbacks.

Every public function dispatches to its Triton kernel for CUDA tensors (or CPU tensors under
``TRITON_INTERPRET=1``) and to its torch reference otherwise; ``GROWKIT_BACKEND`` overrides.
"""

if __name__ == "kernels":
    # NOTE: this folder installs as ``growkit.kernels``; it is imported as top-level ``kernels``
    # only when the repository root is on sys.path (``python -m pytest``, a script or a REPL
    # started in the clone). That name belongs to Hugging Face's ``kernels`` package, which
    # transformers >= 5.25 requires and imports (``from kernels import CUDAProperties``); the
    # folder shadowed it and every transformers model failed to build (CI, 2026-12-03). So hand
    # the name to whatever else on sys.path owns it, or, where nothing does, stay an empty
    # namespace, as a folder that is not a package would be (transformers then reads it as absent).
    import os
    import sys
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    _repo_root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != _repo_root]
    _spec = PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        __file__ = None
        __path__ = []
    else:
        _owner = module_from_spec(_spec)
        sys.modules["kernels"] = _owner  # what ``import kernels`` returns once this body ends
        _spec.loader.exec_module(_owner)
else:
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
