"""Configuration of the three-phase TinyStories pipeline: one dataclass, presets, files, CLI.

A run's settings are resolved in this order, each layer overriding the one before:

1. the :class:`TrainConfig` defaults,
2. a preset (``--preset tiny|small|gpu``, see :data:`PRESETS`),
3. a JSON or YAML file (``--config run.yaml``; keys are field names),
4. command-line flags, one per field (``--steps-phase1 100`` or ``--steps_phase1 100``).

Every value is checked when the config is built (:meth:`TrainConfig.__post_init__`); a
bad value raises ``ValueError`` naming the field and what to use instead. Checks that
depend on the machine or the filesystem (CUDA present, data file exists, optional
packages installed) are in :meth:`TrainConfig.check_runtime`, which the pipeline calls
before it writes anything, so a config can be built and inspected anywhere (the ``gpu``
preset on a laptop, for instance).

Example:
    >>> from growkit.train.config import TrainConfig, preset_config
    >>> cfg = preset_config("tiny", steps_phase1=10)
    >>> cfg.steps_phase1, cfg.d_model
    (10, 64)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "TrainConfig",
    "PRESETS",
    "RESUME_OVERRIDABLE",
    "preset_config",
    "load_config_file",
    "add_config_arguments",
    "config_from_namespace",
    "resume_overrides",
    "build_parser",
    "coerce_field",
]

_SCHEDULES = ("cosine", "constant")
_DEVICES = ("auto", "cpu", "cuda")
_DTYPES = ("float32", "bfloat16")
_TOKENIZERS = ("byte", "bpe")
_DEPTH_MODES = ("identity", "stack")
_CHOICES = {"tokenizer": _TOKENIZERS, "schedule": _SCHEDULES, "device": _DEVICES,
            "dtype": _DTYPES, "depth_mode": _DEPTH_MODES}


def _f(default: Any, help: str) -> Any:  # noqa: A002 - "help" mirrors argparse
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a three-phase run (dense -> MoE -> wider and deeper MoE).

    The model's vocabulary size is not a field: it comes from the tokenizer. Phase 1
    trains a dense model of the given sizes; phase 2 upcycles it into ``n_experts``
    experts (top ``top_k``); phase 3 widens it ``scale_factor`` times and adds
    ``extra_layers`` layers.
    """

    # ---- data
    data: str = _f("embedded", "training stories: 'embedded' (the packaged sample of 5,979 "
                   "real TinyStories stories, offline), 'hf' (Hugging Face "
                   "roneneldan/TinyStories train split, validation on its validation "
                   "split; needs `datasets`), or the path of a TinyStories .txt file")
    val_data: str | None = _f(None, "validation stories: the path of a separate TinyStories "
                              ".txt file (None: hold out val_fraction of the training "
                              "stories, whole stories only; 'hf' uses its validation split)")
    max_stories: int | None = _f(None, "use only the first this many stories of --data "
                                 "(None: all)")
    val_fraction: float = _f(0.05, "fraction of stories held out for validation, in (0, 1) "
                             "(without --val-data)")
    token_cache_dir: str | None = _f(None, "folder of the memory-mapped token caches of file "
                                     "and hub sources, tokenized once (None: "
                                     "<out_dir>/.token-cache)")
    tokenizer: str = _f("byte", "'byte' (257 ids, no extra package) or 'bpe' (needs the "
                        "`tokenizers` package)")
    bpe_vocab_size: int = _f(4096, "BPE vocabulary size (tokenizer=bpe only), > 257")

    # ---- phase-1 (dense) model
    d_model: int = _f(64, "residual width of the phase-1 dense model")
    n_layers: int = _f(2, "layers of the phase-1 dense model")
    n_heads: int = _f(4, "attention heads (must divide d_model)")
    n_kv_heads: int | None = _f(None, "key/value heads, dividing n_heads (None: n_heads)")
    d_ff: int | None = _f(None, "MLP hidden size (None: 8/3 d_model rounded up to 8)")
    tie_embeddings: bool = _f(False, "share the input embedding and the output matrix")
    rope_theta: float = _f(10000.0, "RoPE base frequency")

    # ---- growth
    n_experts: int = _f(4, "phase 2: experts per MoE layer, >= 2")
    top_k: int = _f(2, "phase 2: experts per token, 1 <= top_k <= n_experts")
    aux_loss_coef: float = _f(0.01, "weight of the MoE load-balancing loss in training")
    scale_factor: int = _f(2, "phase 3: width multiple (HyperCloning), a whole number >= 2")
    extra_layers: int = _f(2, "phase 3: layers added after widening, >= 0")
    depth_mode: str = _f("identity", "phase 3 depth growth: 'identity' (function-"
                         "preserving) or 'stack' (G_stack; changes the function, so its "
                         "check fails by design)")
    noise_std: float = _f(1e-5, "phase 3: std of the zero-sum symmetry-breaking noise")
    check_tolerance: float = _f(1e-4, "relative tolerance of the growth checks: max|diff| <= "
                                "tolerance * max|reference| per layer")
    val_tolerance: float = _f(0.02, "largest relative change of the validation loss across "
                              "a growth (first eval after vs last before)")
    probe_batch_size: int = _f(4, "validation windows in the probe batch the growth "
                               "checks run on")
    continue_on_failed_check: bool = _f(False, "keep training when a growth check fails "
                                        "(the failure is still recorded)")
    reset_optimizer: bool = _f(False, "start each grown model with a fresh AdamW instead of "
                               "carrying the Adam moments over (transfer_adam_state)")

    # ---- optimization
    steps_phase1: int = _f(1200, "training steps of phase 1 (dense)")
    steps_phase2: int = _f(300, "training steps of phase 2 (MoE)")
    steps_phase3: int = _f(300, "training steps of phase 3 (grown MoE)")
    lr_phase1: float = _f(3e-3, "peak learning rate of phase 1")
    lr_phase2: float = _f(5e-4, "peak learning rate of phase 2 (the MoE)")
    lr_phase3: float = _f(3e-4, "peak learning rate of phase 3; a model widened s times "
                          "moves s times further in function space per Adam step, so "
                          "it wants a lower rate")
    warmup_frac_phase1: float = _f(0.08, "linear warmup of phase 1, as a fraction of its steps")
    warmup_frac_phase2: float = _f(0.05, "linear warmup of phase 2, as a fraction of its steps")
    warmup_frac_phase3: float = _f(0.05, "linear warmup of phase 3, as a fraction of its steps")
    schedule: str = _f("cosine", "LR schedule within each phase after warmup: 'cosine' "
                       "(decays to min_lr_ratio * peak) or 'constant'")
    min_lr_ratio: float = _f(0.1, "cosine floor as a fraction of the phase's peak LR")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only; norms and biases "
                             "get none)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: no clipping)")
    batch_size: int = _f(16, "sequences per training step")
    seq_len: int = _f(64, "tokens per sequence")

    # ---- evaluation, logging, checkpoints
    eval_interval: int = _f(100, "validate every this many steps of a phase (and at "
                            "every phase end and right before/after each growth)")
    eval_batches: int = _f(8, "validation batches per evaluation (spread over the split)")
    post_growth_evals: int = _f(4, "extra validations spread over the first quarter of each "
                                "phase after a growth, to measure the loss spike there "
                                "(summary: post_growth_spike); 0: none")
    log_interval: int = _f(10, "write a training record to metrics.jsonl every this many "
                           "steps")
    checkpoint_every: int = _f(500, "checkpoint every this many global steps (0: only at "
                               "phase ends)")
    keep_checkpoints: int = _f(2, "periodic checkpoints to keep (phase-end ones are "
                               "always kept)")

    # ---- runtime
    seed: int = _f(0, "seed of the init, the data split, the batches and the growth")
    device: str = _f("auto", "'cpu', 'cuda' or 'auto' (cuda when available)")
    dtype: str = _f("float32", "'float32', or 'bfloat16' (autocast; weights and Adam "
                    "state stay float32)")
    threads: int = _f(0, "CPU threads for torch (0: torch's default)")
    out_dir: str = _f("runs", "parent folder of new run directories")
    run_dir: str | None = _f(None, "run directory (None: <out_dir>/<name>-<timestamp>)")
    name: str = _f("run", "name prefix of the generated run directory")
    progress: bool = _f(True, "show tqdm progress bars")
    plot: bool = _f(True, "write loss_curve.png (needs matplotlib)")

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, coerce_field(f.name, getattr(self, f.name)))
        self._validate()

    # ------------------------------------------------------------------ checks

    def _validate(self) -> None:
        def need(cond: bool, name: str, fix: str) -> None:
            if not cond:
                raise ValueError(
                    f"TrainConfig.{name}={getattr(self, name)!r} is invalid: {fix}")

        positive = ("bpe_vocab_size", "d_model", "n_layers", "n_heads",
                    "probe_batch_size", "batch_size", "seq_len", "eval_interval",
                    "eval_batches", "log_interval", "keep_checkpoints")
        for name in positive:
            need(getattr(self, name) >= 1, name, "use a whole number >= 1")
        for name in ("max_stories", "n_kv_heads", "d_ff"):
            v = getattr(self, name)
            need(v is None or v >= 1, name, "use a whole number >= 1 or None")
        for name in ("steps_phase1", "steps_phase2", "steps_phase3", "checkpoint_every", "threads",
                     "extra_layers", "seed", "post_growth_evals"):
            need(getattr(self, name) >= 0, name, "use a whole number >= 0")
        for name in ("lr_phase1", "lr_phase2", "lr_phase3"):
            need(0 < getattr(self, name) < 1, name,
                 "use a learning rate in (0, 1), e.g. 1e-3")
        need(0 < self.val_fraction < 1, "val_fraction", "use a fraction in (0, 1), e.g. 0.05")
        need(self.rope_theta > 0, "rope_theta", "use a positive base, e.g. 10000")
        need(self.aux_loss_coef >= 0, "aux_loss_coef", "use a weight >= 0, e.g. 0.01")
        need(self.noise_std >= 0, "noise_std", "use a std >= 0, e.g. 1e-5")
        need(self.check_tolerance > 0, "check_tolerance", "use a tolerance > 0, e.g. 1e-4")
        need(self.val_tolerance > 0, "val_tolerance", "use a fraction > 0, e.g. 0.02")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "use a fraction in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay", "use a decay >= 0, e.g. 0.1")
        need(0 <= self.beta1 < 1, "beta1", "use a value in [0, 1), e.g. 0.9")
        need(0 <= self.beta2 < 1, "beta2", "use a value in [0, 1), e.g. 0.95")
        need(self.adam_eps > 0, "adam_eps", "use a small positive value, e.g. 1e-8")
        need(self.grad_clip >= 0, "grad_clip", "use a norm > 0, or 0 to turn clipping off")

        need(self.data.strip() != "", "data",
             "pass 'embedded', 'hf' or the path of a TinyStories .txt file")
        for name in ("val_data", "token_cache_dir"):
            v = getattr(self, name)
            need(v is None or v.strip() != "", name, "name a file/folder or leave it None")
        need(self.tokenizer in _TOKENIZERS, "tokenizer", f"use one of {_TOKENIZERS}")
        need(self.tokenizer != "bpe" or self.bpe_vocab_size > 257, "bpe_vocab_size",
             "a BPE vocabulary must exceed 257 (256 bytes + end-of-text); use e.g. 4096")
        need(self.schedule in _SCHEDULES, "schedule", f"use one of {_SCHEDULES}")
        need(self.device in _DEVICES, "device", f"use one of {_DEVICES}")
        need(self.dtype in _DTYPES, "dtype", f"use one of {_DTYPES}")
        need(self.depth_mode in _DEPTH_MODES, "depth_mode", f"use one of {_DEPTH_MODES}")
        need(self.out_dir.strip() != "", "out_dir", "name a folder, e.g. 'runs'")
        need(self.name.strip() != "" and os.sep not in self.name and "/" not in self.name,
             "name", "use a plain name without path separators, e.g. 'tiny'")

        # Model shape: the same rules ModelConfig enforces, but named after our fields.
        need(self.d_model % self.n_heads == 0, "n_heads",
             f"n_heads must divide d_model={self.d_model}; e.g. n_heads="
             f"{_largest_divisor_at_most(self.d_model, self.n_heads)}")
        head_dim = self.d_model // self.n_heads
        need(head_dim % 2 == 0, "n_heads",
             f"d_model / n_heads = {head_dim} must be even (RoPE rotates pairs); "
             "use fewer heads or a larger d_model")
        if self.n_kv_heads is not None:
            need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
                 f"n_kv_heads must divide n_heads={self.n_heads}")
        need(self.n_experts >= 2, "n_experts",
             "phase 2 upcycles into a mixture: use a whole number >= 2, e.g. 4")
        need(1 <= self.top_k <= self.n_experts, "top_k",
             f"use 1 <= top_k <= n_experts={self.n_experts}, e.g. 2")
        need(self.scale_factor >= 2, "scale_factor",
             "HyperCloning tiles whole copies: use a whole number >= 2, e.g. 2")
        for p in (1, 2, 3):
            need(0 <= getattr(self, f"warmup_frac_phase{p}") < 1, f"warmup_frac_phase{p}",
                 "use a fraction of the phase's steps in [0, 1), e.g. 0.05")
        if self.run_dir is not None:
            need(self.run_dir.strip() != "", "run_dir", "name a folder or leave it None")

    def check_runtime(self) -> None:
        """Checks what depends on this machine; raises ValueError naming the field.

        Called by the pipeline before anything is written: CUDA for ``device='cuda'``,
        bfloat16 support, the data file, optional packages.
        """
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "TrainConfig.device='cuda' but CUDA is not available here; use "
                "--device cpu or --device auto")
        if self.dtype == "bfloat16" and self.resolved_device() == "cuda" \
                and not torch.cuda.is_bf16_supported():
            raise ValueError(
                "TrainConfig.dtype='bfloat16' but this GPU has no bfloat16 support; "
                "use --dtype float32")
        from .data import check_source

        key = self.data.strip()
        if key == "hf" or key == "roneneldan/TinyStories":
            try:
                import datasets  # noqa: F401
            except ImportError:
                raise ValueError(
                    "TrainConfig.data='hf' needs the `datasets` package: pip install "
                    "datasets, or pass the path of a TinyStories .txt file, or "
                    "use --data embedded (the packaged sample)") from None
        else:
            check_source(self.data, "TrainConfig.data")
        if self.val_data is not None:
            check_source(self.val_data, "TrainConfig.val_data")
        if self.tokenizer == "bpe":
            try:
                import tokenizers  # noqa: F401
            except ImportError:
                raise ValueError(
                    "TrainConfig.tokenizer='bpe' needs the `tokenizers` package: pip "
                    "install tokenizers, or use --tokenizer byte") from None

    # ------------------------------------------------------------------ derived

    def resolved_device(self) -> str:
        """'cuda' or 'cpu' (``auto`` picks CUDA when available)."""
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def steps(self, phase: int) -> int:
        return int(getattr(self, f"steps_phase{phase}"))

    def lr(self, phase: int) -> float:
        return float(getattr(self, f"lr_phase{phase}"))

    def warmup(self, phase: int) -> int:
        """Warmup steps of ``phase``: its fraction of the phase's steps, rounded."""
        return int(round(getattr(self, f"warmup_frac_phase{phase}") * self.steps(phase)))

    def model_config(self, vocab_size: int):
        """The phase-1 dense :class:`growkit.models.ModelConfig`."""
        from growkit.models import ModelConfig

        return ModelConfig(
            vocab_size=int(vocab_size),
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            d_ff=self.d_ff,
            n_experts=0,
            top_k=self.top_k,
            tie_embeddings=self.tie_embeddings,
            rope_theta=self.rope_theta,
            max_seq_len=self.seq_len,
            aux_loss_coef=self.aux_loss_coef,
        )

    # ------------------------------------------------------------------ I/O

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_str(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base: "TrainConfig | None" = None) -> "TrainConfig":
        """``base`` (default: the defaults) with the keys of ``d`` replaced.

        Raises:
            ValueError: On unknown keys (a typo would otherwise be ignored) or bad values.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            hints = []
            for k in unknown:
                alt = str(k).replace("-", "_")
                if alt in known:
                    hints.append(f"{k!r} -> use {alt!r}")
            hint = f" ({'; '.join(hints)})" if hints else ""
            raise ValueError(
                f"unknown TrainConfig keys {unknown}{hint}; valid keys are {sorted(known)}")
        merged = (base or cls()).to_dict()
        merged.update(d)
        return cls(**merged)

    @classmethod
    def from_file(cls, path: str | os.PathLike, base: "TrainConfig | None" = None) -> "TrainConfig":
        return cls.from_dict(load_config_file(path), base=base)


def _largest_divisor_at_most(n: int, k: int) -> int:
    for c in range(min(n, k), 0, -1):
        if n % c == 0 and (n // c) % 2 == 0:
            return c
    return 1


# ---------------------------------------------------------------------------
# Field types and value coercion (shared by files and the command line)
# ---------------------------------------------------------------------------

_HINTS: dict[str, Any] | None = None


def _field_types() -> dict[str, tuple[type, bool]]:
    """field name -> (base type, optional)."""
    global _HINTS
    if _HINTS is None:
        hints = typing.get_type_hints(TrainConfig)
        out = {}
        for name, hint in hints.items():
            args = typing.get_args(hint)
            if args and type(None) in args:
                base = next(a for a in args if a is not type(None))
                out[name] = (base, True)
            else:
                out[name] = (hint, False)
        _HINTS = out
    return _HINTS


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def coerce_field(name: str, value: Any) -> Any:
    """Converts ``value`` to field ``name``'s type, or raises ValueError naming the field.

    Accepts what files and the command line produce: strings for any type
    (``"1e-3"``, which YAML 1.1 reads as a string, ``"true"``, ``"none"``), ints for
    floats, and floats with an integral value for ints. Never accepts a bool where a
    number is expected.
    """
    types = _field_types()
    if name not in types:
        raise ValueError(f"unknown TrainConfig field {name!r}")
    base, optional = types[name]
    if value is None or (optional and isinstance(value, str)
                         and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"TrainConfig.{name} must not be None; give a {base.__name__}")

    def bad(why: str = "") -> ValueError:
        return ValueError(
            f"TrainConfig.{name}={value!r} is invalid: expected "
            f"{'a ' + base.__name__}{' or None' if optional else ''}{why}")

    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad(" (true/false)")
    if base is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            if math.isfinite(value) and value.is_integer():
                return int(value)
            raise bad(" (a whole number)")
        if isinstance(value, str):
            s = value.strip().replace("_", "")
            try:
                return int(s)
            except ValueError:
                try:
                    fv = float(s)
                except ValueError:
                    raise bad() from None
                if math.isfinite(fv) and fv.is_integer():
                    return int(fv)
                raise bad(" (a whole number)") from None
        raise bad()
    if base is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            fv = float(value)
        elif isinstance(value, str):
            try:
                fv = float(value.strip())
            except ValueError:
                raise bad() from None
        else:
            raise bad()
        if not math.isfinite(fv):
            raise bad(" (finite)")
        return fv
    if base is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise bad()
        return value
    raise bad()  # pragma: no cover - every field type is handled above


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # The README's main job: end to end on a 2-core CPU in well under 5 minutes,
    # growth checks included (measured ~2 min; see the report in summary.json).
    "tiny": dict(
        name="tiny", d_model=64, n_layers=2, n_heads=4, seq_len=64, batch_size=16,
        n_experts=4, top_k=2, scale_factor=2, extra_layers=2,
        steps_phase1=1200, steps_phase2=300, steps_phase3=300,
        lr_phase1=3e-3, lr_phase2=5e-4, lr_phase3=3e-4,
        warmup_frac_phase1=0.08, warmup_frac_phase2=0.05, warmup_frac_phase3=0.05,
        eval_interval=100, eval_batches=8, log_interval=10, checkpoint_every=500,
        device="cpu", dtype="float32",
    ),
    # A longer CPU run (tens of minutes on a laptop) or a quick GPU one.
    "small": dict(
        name="small", d_model=128, n_layers=4, n_heads=4, seq_len=128, batch_size=32,
        n_experts=4, top_k=2, scale_factor=2, extra_layers=4,
        steps_phase1=4000, steps_phase2=1000, steps_phase3=1000,
        lr_phase1=2e-3, lr_phase2=5e-4, lr_phase3=3e-4,
        warmup_frac_phase1=0.05, warmup_frac_phase2=0.05, warmup_frac_phase3=0.05,
        eval_interval=250, eval_batches=16, log_interval=10, checkpoint_every=1000,
        device="auto", dtype="float32",
    ),
    # One GPU, bf16 autocast. Pass --data PATH (or hf) for real stories.
    "gpu": dict(
        name="gpu", d_model=256, n_layers=6, n_heads=8, seq_len=256, batch_size=64,
        n_experts=8, top_k=2, scale_factor=2, extra_layers=6,
        steps_phase1=10000, steps_phase2=3000, steps_phase3=3000,
        lr_phase1=1e-3, lr_phase2=3e-4, lr_phase3=2e-4,
        warmup_frac_phase1=0.05, warmup_frac_phase2=0.03, warmup_frac_phase3=0.03,
        eval_interval=500, eval_batches=32, log_interval=20, checkpoint_every=2000,
        device="cuda", dtype="bfloat16",
    ),
}


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    """The preset ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}")
    return TrainConfig.from_dict({**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------

def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a JSON (``.json``) or YAML (``.yaml``/``.yml``) mapping of field values.

    Raises:
        ValueError: If the file is missing, unreadable, or not a mapping.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"--config {str(path)!r}: no such file")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"--config {str(path)!r} is YAML, which needs PyYAML: pip install pyyaml "
                "(or write the config as JSON)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {str(path)!r} is not valid YAML: {e}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {str(path)!r} is not valid JSON: {e}") from None
    else:
        raise ValueError(
            f"--config {str(path)!r}: unknown extension {suffix!r}; use .json, .yaml or .yml")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(
            f"--config {str(path)!r} must hold a mapping of field names to values, got "
            f"{type(data).__name__}")
    return data


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

#: Fields a resumed run may change; every other field must match the stored config,
#: because changing it would make the resumed run differ from an uninterrupted one.
RESUME_OVERRIDABLE = frozenset({
    "device", "progress", "plot", "continue_on_failed_check", "checkpoint_every",
    "keep_checkpoints", "threads", "token_cache_dir",
})


def _parse_for(name: str):
    def parse(s: str) -> Any:
        try:
            return coerce_field(name, s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name  # argparse shows it in "invalid <name> value"
    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--config``, ``--preset``, ``--resume`` and one flag per TrainConfig field.

    Each field ``steps_phase1`` is accepted as ``--steps-phase1`` and ``--steps_phase1``;
    bool fields also get a ``--no-`` form. Unset flags are absent from the namespace
    (``argparse.SUPPRESS``), so only what the user typed overrides the file and preset.
    """
    run = parser.add_argument_group("run")
    run.add_argument("--config", metavar="FILE", default=None,
                     help="JSON or YAML file of field values (applied after --preset)")
    run.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help="start from a preset: tiny (CPU, < 5 min), small, gpu")
    run.add_argument("--resume", metavar="RUN_DIR", default=None,
                     help="continue the run in RUN_DIR from its latest checkpoint")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved config as JSON and exit")
    group = parser.add_argument_group("TrainConfig fields")
    types = _field_types()
    for f in fields(TrainConfig):
        base, optional = types[f.name]
        dashed, under = "--" + f.name.replace("_", "-"), "--" + f.name
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if base is bool:
            kw = dict(action=argparse.BooleanOptionalAction)
        else:
            choices = _CHOICES.get(f.name)
            metavar = "{" + ",".join(choices) + "}" if choices else \
                {int: "INT", float: "FLOAT", str: "STR"}[base]
            kw = dict(type=_parse_for(f.name), choices=choices, metavar=metavar)
        group.add_argument(dashed, dest=f.name, default=argparse.SUPPRESS, help=help_text, **kw)
        if under != dashed:  # the underscore spelling works too, unlisted in --help
            group.add_argument(under, dest=f.name, default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS, **kw)


def _explicit_fields(ns: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in vars(ns).items() if k in names}


def config_from_namespace(ns: argparse.Namespace) -> TrainConfig:
    """Defaults, then ``--preset``, then ``--config``, then the flags the user typed."""
    base = preset_config(ns.preset) if getattr(ns, "preset", None) else TrainConfig()
    if getattr(ns, "config", None):
        base = TrainConfig.from_file(ns.config, base=base)
    return TrainConfig.from_dict(_explicit_fields(ns), base=base)


def resume_overrides(ns: argparse.Namespace, stored: TrainConfig) -> TrainConfig:
    """The stored config of a resumed run with the allowed command-line changes.

    Raises:
        ValueError: If ``--preset``/``--config`` is given, or a flag changes a field
            outside :data:`RESUME_OVERRIDABLE` to a different value.
    """
    if getattr(ns, "preset", None) or getattr(ns, "config", None):
        raise ValueError(
            "--resume continues a run with its stored config.json; drop --preset/--config")
    explicit = _explicit_fields(ns)
    changed = sorted(k for k, v in explicit.items()
                     if k not in RESUME_OVERRIDABLE and getattr(stored, k) != v)
    if changed:
        raise ValueError(
            f"--resume cannot change {changed} (the resumed run would no longer match the "
            f"interrupted one); only {sorted(RESUME_OVERRIDABLE)} may change. Start a new "
            "run to change the others")
    return TrainConfig.from_dict(explicit, base=stored)


def build_parser(prog: str = "train_tinystories.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Three-phase TinyStories training: a dense model, upcycled to a "
        "mixture of experts, then grown wider and deeper; every growth is verified. "
        "Settings apply in the order defaults < --preset < --config < flags; every flag "
        "also accepts underscores (--steps_phase1).",
    )
    add_config_arguments(parser)
    return parser
