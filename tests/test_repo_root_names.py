"""The repository's folders install as ``growkit.*``, but with the repository root on sys.path
(``python -m pytest``, a script or a REPL started in the clone) they are importable under their
bare names too. Those names must not take the place of packages that other libraries import:
transformers >= 5.25 requires Hugging Face's ``kernels`` and imports it as it builds any model.
"""

import os
import subprocess
import sys
from importlib.machinery import PathFinder
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = sorted(d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file())


def _owner_elsewhere(name: str):
    """Where ``import name`` would land if the repository root were not on sys.path."""
    spec = PathFinder.find_spec(name, [p for p in sys.path if os.path.realpath(p or os.curdir) != str(ROOT)])
    return None if spec is None else spec.origin


def _in_repo_root(code: str, *flags: str) -> str:
    """Run ``python [flags] -c code`` in the repository root, where '' (the root) leads sys.path."""
    done = subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_transformers_builds_a_model_from_the_repo_root():
    """The failure CI met: `from kernels import CUDAProperties` found this repository's folder."""
    pytest.importorskip("transformers")
    out = _in_repo_root(
        "import transformers, kernels\n"
        "cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,\n"
        "    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)\n"
        "transformers.AutoModelForCausalLM.from_config(cfg)\n"
        "print(kernels.__file__)"
    )
    assert out == str(_owner_elsewhere("kernels"))  # the installed package, or an empty namespace ('None')


def test_without_another_owner_the_folder_is_an_empty_namespace():
    """`python -S` leaves site-packages off sys.path, so nothing else is called `kernels`: the folder
    must then look absent (no file, no submodules), not run growkit's kernels as `kernels.*`."""
    out = _in_repo_root(
        "import sys, kernels\n"
        "print(kernels.__file__, list(kernels.__path__), hasattr(kernels, 'hyperclone'),"
        " sorted(m for m in sys.modules if m.startswith('kernels.')))",
        "-S",
    )
    assert out == "None [] False []"


def test_no_folder_hides_an_installed_package():
    """Each folder whose bare name an installed distribution also provides must hand the name over.
    Today that is `kernels` (with transformers >= 5.25); a new dependency that brings, say, a
    top-level `models` fails here until that folder hands its name over too."""
    provided = packages_distributions()
    for name in (n for n in FOLDERS if n in provided):
        out = _in_repo_root(f"import {name}; print({name}.__file__)")
        assert out == str(_owner_elsewhere(name)), (name, provided[name])
        assert not out.startswith(str(ROOT) + os.sep), name
