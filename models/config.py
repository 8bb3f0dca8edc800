"""Configuration of the reference Llama-style transformer."""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from growkit.files import atomic_write_text
from growkit.validate import ArgumentKindError, real_number, whole_number


def _default_d_ff(d_model: int) -> int:
    """SwiGLU hidden size: 8/3 * d_model (same FLOPs as a 4x GELU MLP), rounded up to 8."""
    base = (8 * d_model) // 3
    return ((base + 7) // 8) * 8


@dataclass
class ModelConfig:
    """Hyperparameters of :class:`growkit.models.Transformer`.

    ``None`` fields are resolved in ``__post_init__``, so a constructed config is always
    fully explicit and ``to_dict()`` round-trips without depending on the defaults.

    Attributes:
        vocab_size: Number of token ids.
        d_model: Residual stream width.
        n_layers: Number of decoder blocks.
        n_heads: Number of query heads.
        n_kv_heads: Number of key/value heads (``None`` -> ``n_heads``). Must divide
            ``n_heads``; 1 gives multi-query attention.
        head_dim: Per-head width (``None`` -> ``d_model // n_heads``). May be set
            explicitly so that ``n_heads * head_dim != d_model``: width growth keeps
            ``head_dim`` while multiplying ``n_heads`` and ``d_model``.
        d_ff: MLP (or per-expert) hidden size (``None`` -> ``8 * d_model / 3`` rounded up
            to a multiple of 8).
        n_experts: 0 for a dense SwiGLU MLP, otherwise the number of experts (>= 2).
        top_k: Experts per token; ignored when ``n_experts == 0``.
        norm_topk_prob: Renormalize the top-k routing weights to sum to 1.
        dense_layers: Layers (indices from 0) that keep a dense MLP in a mixture-of-experts
            model (Hugging Face Qwen-MoE's ``mlp_only_layers``); every other layer is MoE.
            Stored sorted; empty (every layer MoE) unless ``n_experts > 0``. A partially
            upcycled model (``upcycle_to_moe(..., layers=...)``) sets it.
        tie_embeddings: Use ``embed.weight`` as the output projection.
        rope_theta: RoPE base frequency.
        norm_eps: RMSNorm epsilon.
        max_seq_len: Length of the cached RoPE tables (longer inputs still work).
        attn_bias: Bias in the q/k/v/o projections.
        mlp_bias: Bias in the MLP / expert projections.
        logit_scale: Multiplies the final logits; width growth of a tied model uses it
            to keep the output function exact.
        aux_loss_coef: Weight of the MoE load-balancing loss in ``Transformer.loss``.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int | None = None
    n_experts: int = 0
    top_k: int = 2
    norm_topk_prob: bool = True
    dense_layers: tuple[int, ...] = ()
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 512
    attn_bias: bool = False
    mlp_bias: bool = False
    logit_scale: float = 1.0
    aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        # Check the user-given sizes before deriving anything from them, so the error
        # names the field the user actually set.
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            self._check_positive_int(name)
        for name in ("n_kv_heads", "head_dim", "d_ff"):
            if getattr(self, name) is not None:
                self._check_positive_int(name)
        for name in ("n_experts", "top_k"):
            self._check_int(name)
        for name in ("norm_topk_prob", "tie_embeddings", "attn_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentKindError(
                    f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}"
                )
        for name, lower in (("rope_theta", "above"), ("norm_eps", "above"), ("logit_scale", "above"),
                            ("aux_loss_coef", "min")):
            setattr(self, name, real_number(getattr(self, name), f"ModelConfig.{name}", **{lower: 0.0}))

        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads != 0:
                raise ValueError(
                    f"ModelConfig.d_model={self.d_model} is not divisible by "
                    f"n_heads={self.n_heads}; choose n_heads dividing d_model or set "
                    f"head_dim explicitly"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff is None:
            self.d_ff = _default_d_ff(self.d_model)

        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} must be a multiple of "
                f"n_kv_heads={self.n_kv_heads}; choose n_kv_heads dividing n_heads"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"ModelConfig.head_dim={self.head_dim} must be even because RoPE rotates "
                f"pairs of dimensions; pick an even head_dim"
            )
        if self.n_experts < 0:
            raise ValueError(
                f"ModelConfig.n_experts={self.n_experts} must be >= 0 "
                f"(0 = dense MLP, >= 2 = mixture of experts)"
            )
        if self.n_experts == 1:
            raise ValueError(
                "ModelConfig.n_experts=1 is not a mixture; use n_experts=0 for a dense MLP "
                "or n_experts >= 2"
            )
        if self.n_experts > 0 and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"ModelConfig.top_k={self.top_k} must satisfy 1 <= top_k <= "
                f"n_experts={self.n_experts}"
            )
        self._check_dense_layers()

    def _check_int(self, name: str, min: int | None = None) -> None:
        value = getattr(self, name)
        # A stored field holds an int: bools (True as a layer count is always a bug) and
        # floats, even whole ones, are refused rather than converted.
        if not isinstance(value, numbers.Integral):
            raise ArgumentKindError(f"ModelConfig.{name} must be an int, got {value!r}")
        setattr(self, name, whole_number(value, f"ModelConfig.{name}", min=min))

    def _check_positive_int(self, name: str) -> None:
        self._check_int(name, min=1)

    def _check_dense_layers(self) -> None:
        """``dense_layers``: distinct layer indices in [0, n_layers), stored as a sorted tuple."""
        value = self.dense_layers
        name = "ModelConfig.dense_layers"
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ArgumentKindError(f"{name} must be a list of layer indices, got {value!r}")
        hint = f"layers are numbered from 0 to n_layers - 1 = {self.n_layers - 1}"
        layers = []
        for i in value:
            if not isinstance(i, numbers.Integral):  # a stored index is an int, like the sizes
                raise ArgumentKindError(f"{name} must hold int layer indices ({hint}), got {i!r} in {value!r}")
            layers.append(whole_number(i, f"{name}[i]", min=0, max=self.n_layers - 1, hint=hint))
        if len(set(layers)) != len(layers):
            dup = sorted({i for i in layers if layers.count(i) > 1})
            raise ValueError(f"{name} lists layers {dup} more than once, got {list(value)!r}")
        if layers and self.n_experts == 0:
            raise ValueError(
                f"{name}={sorted(layers)} only applies to a mixture of experts (n_experts > 0): "
                "with n_experts=0 every layer is dense; leave it empty")
        if layers and len(layers) == self.n_layers:
            raise ValueError(
                f"{name} lists every layer ({self.n_layers}): no layer is a mixture of experts; "
                "use n_experts=0 for a dense model")
        self.dense_layers = tuple(sorted(layers))

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` (from 0) has a mixture of experts rather than a dense MLP."""
        return self.n_experts > 0 and layer not in self.dense_layers

    @property
    def moe_layer_indices(self) -> list[int]:
        """The layers with a mixture of experts, in order (empty for a dense model)."""
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    @property
    def is_moe(self) -> bool:
        """Whether the MLPs are mixtures of experts."""
        return self.n_experts > 0

    def to_dict(self) -> dict[str, Any]:
        """Returns all fields (resolved, never ``None``) as a plain dict."""
        d = asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from a dict, rejecting keys that are not fields.

        Raises:
            ValueError: If ``d`` has unknown keys (a typo would otherwise silently fall
                back to a default) or the values fail validation.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"Unknown ModelConfig keys {unknown}; valid keys are {sorted(known)}"
            )
        return cls(**dict(d))

    def to_json(self, path: str | os.PathLike) -> None:
        """Writes the config as JSON to ``path``, atomically (a temporary file renamed over it)."""
        atomic_write_text(path, self.to_json_str())

    def to_json_str(self) -> str:
        """Returns the config as a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        """Reads a config written by :meth:`to_json`.

        Such a file lists every field; one that lacks a field that shapes the model or its
        function (all but :data:`OPTIONAL_IN_FILE`) is refused rather than completed with
        the default, which could silently build a different model.

        Raises:
            ValueError: If the file is not valid JSON, not an object, lacks a field, or
                fails validation.
        """
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
        missing = [f.name for f in fields(cls) if f.name not in d and f.name not in OPTIONAL_IN_FILE]
        if missing:
            raise ValueError(
                f"{path}: missing ModelConfig fields {missing}; a saved config lists every field "
                "(ModelConfig.to_json), and a default could build a different model than the "
                "weights were trained in")
        return cls.from_dict(d)


#: Fields a config file may leave out: the RoPE cache length (the tables grow on demand),
#: the MoE load-balancing weight (training only) and ``dense_layers``, whose default (every
#: layer MoE, none for a dense model) is what every file written before the field existed
#: meant. Every other field is required.
OPTIONAL_IN_FILE = ("max_seq_len", "aux_loss_coef", "dense_layers")
