"""Where every grown parameter came from, so per-parameter state can follow the weights.

Each growth operator attaches a :class:`GrowthRecord` to the model it returns
(``model.growth_records``, a list: ``scale_bilaterally`` leaves two). The record maps each
new parameter name to its :class:`Source`; :meth:`GrowthRecord.map_tensors` replays the
same structural change on any per-parameter tensors (Adam moments, gradient statistics).
The verification checks read ``layer_map`` to pair old layers with new ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .roles import ROLE_RULES, Role
from .tiling import tile_for_role


@dataclass(frozen=True)
class Source:
    """How one new parameter was made.

    kind:
        ``widen``: the source tiled by the role's repeats (``scale``);
        ``copy``: an exact copy of the source (kept layers, stacked layers);
        ``scaled_copy``: a stacked copy of a residual writer (or output-norm gain) damped
        by ``grow_depth``'s ``stack_scale`` (the depth record's settings hold the factor);
        ``zero``: zeros shaped like the source (projections of an identity layer that write
        to the residual stream; in a family with output norms, those norms' gain, whose
        zero is -1 for a ``(1 + w)`` norm);
        ``identity_copy``: a copy of the source kept as the input side of an identity layer;
        ``experts``: ``n_experts`` copies of a dense MLP tensor stacked on a new dim 0;
        ``fresh``: newly initialized (a router): no source.
    """

    kind: str
    role: Role
    name: str | None = None
    scale: int = 1
    n_experts: int = 0
    shape: tuple[int, ...] = ()


@dataclass
class GrowthRecord:
    """One growth step: its operator, settings and the provenance of every parameter."""

    op: str
    settings: dict
    sources: dict[str, Source]
    # depth growth: for each new layer, (source layer, "original" | "identity" | "copy")
    layer_map: list[tuple[int, str]] | None = None
    function_preserving: bool = True
    notes: list[str] = field(default_factory=list)

    def map_tensors(self, tensors: dict[str, torch.Tensor], moment: int = 1) -> dict[str, torch.Tensor]:
        """Replay this growth on per-parameter tensors keyed by source parameter name.

        Args:
            tensors: source name -> tensor shaped like that parameter (e.g. Adam ``exp_avg``).
            moment: 1 for first moments (scaled by the gradient factor), 2 for second
                moments (scaled by its square). Missing sources give zeros.

        Returns:
            new parameter name -> tensor shaped like the new parameter.
        """
        out = {}
        for new_name, src in self.sources.items():
            t = tensors.get(src.name) if src.name is not None else None
            if src.kind == "fresh" or t is None:
                out[new_name] = None if src.kind != "fresh" else torch.zeros(src.shape)
                continue
            if src.kind == "widen":
                factor = ROLE_RULES[src.role].gradient_factor(src.scale) ** moment
                grown = tile_for_role(t, src.role, src.scale, divide=False)
                out[new_name] = grown * factor if factor != 1.0 else grown
            elif src.kind in ("copy", "scaled_copy", "identity_copy"):
                # an identity layer's input side starts with zero gradient: fresh moments; a
                # damped copy keeps the source's (Adam's step does not depend on the scale)
                out[new_name] = torch.zeros_like(t) if src.kind == "identity_copy" else t.clone()
            elif src.kind == "zero":
                out[new_name] = torch.zeros_like(t)
            elif src.kind == "experts":
                # each expert sees about 1/E of the tokens' routing mass
                scaled = t * (1.0 / src.n_experts) ** moment
                out[new_name] = scaled.unsqueeze(0).expand(src.n_experts, *t.shape).clone()
            else:  # pragma: no cover - guarded by the operators
                raise ValueError(f"unknown source kind {src.kind!r}")
        return out

    def to_dict(self) -> dict:
        """A JSON-ready dict (``from_dict`` reads it back)."""
        return dict(
            op=self.op,
            settings=dict(self.settings),
            function_preserving=self.function_preserving,
            notes=list(self.notes),
            layer_map=None if self.layer_map is None else [[int(a), str(k)] for a, k in self.layer_map],
            sources={
                name: dict(kind=s.kind, role=s.role.value, name=s.name, scale=s.scale,
                           n_experts=s.n_experts, shape=list(s.shape))
                for name, s in self.sources.items()
            },
        )

    @classmethod
    def from_dict(cls, data: dict) -> "GrowthRecord":
        """Read a record written by :meth:`to_dict` (ValueError naming what is malformed)."""
        try:
            sources = {
                str(name): Source(
                    kind=str(s["kind"]), role=Role(s["role"]), name=None if s["name"] is None else str(s["name"]),
                    scale=int(s["scale"]), n_experts=int(s["n_experts"]), shape=tuple(int(x) for x in s["shape"]),
                )
                for name, s in data["sources"].items()
            }
            layer_map = data.get("layer_map")
            if layer_map is not None:
                layer_map = [(int(a), str(k)) for a, k in layer_map]
            return cls(str(data["op"]), dict(data["settings"]), sources, layer_map,
                       bool(data["function_preserving"]), [str(n) for n in data.get("notes", [])])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed growth record: {type(exc).__name__}: {exc}") from None

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for s in self.sources.values():
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        return f"{self.op}({self.settings}) -> " + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))


def attach_records(model, records: list[GrowthRecord], like=None) -> None:
    """Record how ``model`` was grown (attributes; ``save_grown`` writes ``growth_records``).

    ``growth_records``: this call's records (what the checks compare ``like`` with);
    ``growth_history``: every record since the last model that was not grown by growkit,
    oldest first: ``like``'s history (or its records), then this call's. The masks of
    ``masks.py`` read the history, so growth in separate calls composes."""
    model.growth_records = list(records)
    prior = getattr(like, "growth_history", None) or getattr(like, "growth_records", None) or []
    model.growth_history = list(prior) + list(records)
