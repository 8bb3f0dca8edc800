"""Adapters: one generic reader of a model through its family's table entry.

The growth rules (``roles.py``) never see a parameter name, and the operators and checks
never see a family: a :class:`FamilyAdapter` (one per :class:`~.families.Family`)
translates. It gives

* the role of every tensor, by *role name*: a fused tensor (``qkv_proj``) appears as its
  parts, ``"<param>[q_proj]"`` etc. (:meth:`FamilyAdapter.param_roles`), with
  :meth:`~FamilyAdapter.split` / :meth:`~FamilyAdapter.fuse` between the two namings;
* the config through canonical fields (:meth:`~FamilyAdapter.cfg`) and grown configs;
* a model of a config around given tensors (:meth:`~FamilyAdapter.build`);
* the small model interface the checks need (:meth:`~FamilyAdapter.forward_hidden`:
  logits, the embedding output and every layer's output, by forward hooks on the decoder
  layers, so the same code serves the reference model and every ``transformers`` family).

Hugging Face configs are read and written through their public attributes only.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings

import torch
from torch import nn

from .families import FAMILIES, Family, Fused
from .roles import ParamRole, Role

PART = re.compile(r"^(.*)\[([a-z_]+)\]$")


def part_name(param: str, role: Role) -> str:
    """The role name of one part of a fused parameter."""
    return f"{param}[{role.value}]"


def is_hf_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is an extra
        return False
    return isinstance(model, PreTrainedModel)


class FamilyAdapter:
    """Everything the operators and checks need of one :class:`Family`."""

    def __init__(self, family: Family) -> None:
        self.family = family
        self.name = family.name
        self._patterns = []  # (compiled regex, template, Role | Fused)
        for template, what in family.params.items():
            rx = re.escape(template).replace(re.escape("{i}"), r"(\d+)")
            self._patterns.append((re.compile(rx + "$"), template, what))
        self._layer_rx = re.compile("^" + re.escape(family.layers) + r"\.(\d+)\.")
        # checkpoint names that differ from the held ones: (disk regex, disk template, held regex, OnDisk)
        self._disk = []
        for template, on_disk in family.disk.items():
            disk_rx = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)").replace(re.escape("{e}"), r"(?P<e>\d+)")
            held_rx = re.escape(on_disk.tensor).replace(re.escape("{i}"), r"(?P<i>\d+)")
            self._disk.append((re.compile(disk_rx + "$"), template, re.compile(held_rx + "$"), on_disk))
        # role -> the one template holding it (for naming tensors a growth creates)
        by_role: dict[Role, list[tuple[str, Fused | None]]] = {}
        for template, what in family.params.items():
            if isinstance(what, Fused):
                for role, _ in what.parts:
                    by_role.setdefault(role, []).append((template, what))
            else:
                by_role.setdefault(what, []).append((template, None))
        self._templates = {r: v[0] for r, v in by_role.items() if len(v) == 1}

    def __repr__(self) -> str:
        return f"FamilyAdapter({self.name!r})"

    # ------------------------------------------------------------------ matching
    def matches(self, model: nn.Module) -> bool:
        if self.family.kind == "reference":
            from growkit.models import Transformer

            return isinstance(model, Transformer)
        return is_hf_model(model) and getattr(model.config, "model_type", None) in self.family.model_types

    @property
    def is_hf(self) -> bool:
        return self.family.kind == "hf"

    # ------------------------------------------------------------------ config
    def cfg(self, model_or_config, field: str, default=None):
        """A canonical config field (see ``families.py``); ``default`` where the family lacks it."""
        config = getattr(model_or_config, "config", model_or_config)
        attr = self.family.config.get(field)
        if attr is None:
            return default
        value = getattr(config, attr, None)
        if value is None and field == "head_dim":
            value = self.cfg(config, "d_model") // self.cfg(config, "n_heads")
        return default if value is None else value

    def has(self, field: str) -> bool:
        return field in self.family.config

    def config_with(self, config, **updates):
        """A copy of ``config`` with canonical fields replaced (the original is untouched)."""
        attrs = {}
        for field, value in updates.items():
            if field not in self.family.config:
                raise KeyError(f"family {self.name!r} has no config field {field!r}")
            attrs[self.family.config[field]] = value
        if self.family.kind == "reference":
            return dataclasses.replace(config, **attrs)
        new = copy.deepcopy(config)
        for attr, value in attrs.items():
            setattr(new, attr, value)
        return new

    def n_layers(self, model: nn.Module) -> int:
        return int(self.cfg(model, "n_layers"))

    def is_moe(self, model: nn.Module) -> bool:
        return int(self.cfg(model, "n_experts", 0) or 0) > 0

    def top_k(self, model: nn.Module) -> int:
        return int(self.cfg(model, "top_k", 1) or 1)

    def tied(self, model: nn.Module) -> bool:
        """Input and output embeddings are one tensor."""
        if self.family.kind == "reference":
            return bool(model.config.tie_embeddings)
        out = model.get_output_embeddings()
        return bool(self.cfg(model, "tie_embeddings", False)) and out is not None and (
            out.weight is model.get_input_embeddings().weight
        )

    @property
    def per_layer_moe(self) -> bool:
        """Whether the family's config can make some layers MoE and others dense (quirk
        ``sparse_layer_list``: Qwen-MoE's ``mlp_only_layers``, the reference model's
        ``dense_layers``)."""
        return "sparse_layer_list" in self.family.quirks and self.has("dense_layers")

    def sparse_layers(self, config) -> list[bool] | None:
        """Per layer: is it an MoE layer? (None for a family without per-layer choice).

        Qwen-MoE's rule: layer i is MoE iff ``n_experts > 0``, i is not in ``dense_layers``
        (``mlp_only_layers``) and ``(i + 1) % sparse_step == 0`` (``decoder_sparse_step``;
        1 for a family without the field, the reference model)."""
        if "sparse_layer_list" not in self.family.quirks:
            return None
        n = int(self.cfg(config, "n_layers"))
        step = int(self.cfg(config, "sparse_step", 1) or 1)
        dense = set(self.cfg(config, "dense_layers", []) or [])
        experts = int(self.cfg(config, "n_experts", 0) or 0)
        return [experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(n)]

    def moe_layers(self, config) -> list[int]:
        """The indices of the MoE layers, for any family (every layer or none where the
        family has no per-layer choice)."""
        config = getattr(config, "config", config)
        sparse = self.sparse_layers(config)
        if sparse is None:
            return list(range(int(self.cfg(config, "n_layers")))) if self.is_moe(config) else []
        return [i for i, s in enumerate(sparse) if s]

    # ------------------------------------------------------------------ names and roles
    def _match(self, name: str):
        for rx, template, what in self._patterns:
            m = rx.match(name)
            if m:
                return what, (int(m.group(1)) if m.groups() else None)
        return None, None

    def _unmatched(self, name: str) -> ValueError:
        return ValueError(
            f"parameter {name!r} of a {self.name!r} model has no growth role: growth would leave it "
            f"unscaled. Add its name template to the family's table entry "
            f"(growkit.growth.FAMILIES[{self.name!r}].params, or register_family(Family(...)) with "
            "it), mapping it to a Role or a Fused(dim, parts)."
        )

    def param_roles(self, model: nn.Module) -> dict[str, ParamRole]:
        """Every tensor of ``model.state_dict()`` by role name -> its role (ValueError if unknown).

        A fused parameter gives one entry per part, ``"<param>[<role>]"``, in order.
        """
        return self.roles_for_names(model.state_dict())

    def roles_for_names(self, names) -> dict[str, ParamRole]:
        """:meth:`param_roles` of a list of parameter names (e.g. a checkpoint's)."""
        roles = {}
        for name in names:
            part = PART.match(name)
            if part:  # already a role name: one part of a fused tensor
                what, layer = self._match(part.group(1))
                if isinstance(what, Fused) and part.group(2) in [r.value for r, _ in what.parts]:
                    roles[name] = ParamRole(Role(part.group(2)), layer)
                    continue
                raise self._unmatched(name)
            what, layer = self._match(name)
            if what is None:
                raise self._unmatched(name)
            if isinstance(what, Fused):
                for role, _ in what.parts:
                    roles[part_name(name, role)] = ParamRole(role, layer)
            else:
                roles[name] = ParamRole(what, layer)
        return roles

    def _part_sizes(self, config, fused: Fused, total: int, name: str) -> list[int]:
        units = [int(self.cfg(config, u)) if isinstance(u, str) else u for _, u in fused.parts]
        whole = sum(units)
        if total % whole:
            raise ValueError(f"{name}: size {total} along dim {fused.dim} does not split into parts {units}")
        return [total // whole * u for u in units]

    def split(self, config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Real parameter names -> role names: fused tensors become views of their parts."""
        config = getattr(config, "config", config)
        out = {}
        for name, t in tensors.items():
            what, _ = self._match(name)
            if isinstance(what, Fused):
                if t is None:
                    for role, _ in what.parts:
                        out[part_name(name, role)] = None
                    continue
                sizes = self._part_sizes(config, what, t.shape[what.dim], name)
                for (role, _), part in zip(what.parts, torch.split(t, sizes, dim=what.dim)):
                    out[part_name(name, role)] = part
            else:
                out[name] = t
        return out

    def fuse(self, tensors: dict[str, torch.Tensor], *, skip_incomplete: bool = False) -> dict[str, torch.Tensor]:
        """Role names -> real parameter names: the parts of a fused tensor concatenated in order.

        ``skip_incomplete``: leave out a fused tensor some of whose parts are missing
        (ValueError otherwise)."""
        out, parts = {}, {}
        for name, t in tensors.items():
            m = PART.match(name)
            if m:
                parts.setdefault(m.group(1), {})[Role(m.group(2))] = t
            else:
                out[name] = t
        for name, by_role in parts.items():
            what, _ = self._match(name)
            if not isinstance(what, Fused):
                raise self._unmatched(name)
            missing = [r.value for r, _ in what.parts if r not in by_role]
            if missing and skip_incomplete:
                continue
            if missing:
                raise ValueError(f"fused parameter {name!r} is missing parts {missing}")
            out[name] = torch.cat([by_role[r] for r, _ in what.parts], dim=what.dim)
        return out

    def role_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` by role name (parts of fused tensors are views)."""
        return self.split(model, model.state_dict())

    def role_params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.named_parameters()`` by role name (parts are views of the parameters)."""
        return self.split(model, dict(model.named_parameters()))

    def rename_layer(self, name: str, new_layer: int) -> str:
        """The name of the same tensor in layer ``new_layer``."""
        return self._layer_rx.sub(f"{self.family.layers}.{new_layer}.", name, count=1)

    def tensor_name(self, role: Role, layer: int | None) -> str:
        """The role name of this family's ``role`` tensor in ``layer`` (for tensors a growth creates)."""
        if role not in self._templates:
            raise ValueError(f"family {self.name!r} has no single {role.value} tensor per layer")
        template, fused = self._templates[role]
        name = template.replace("{i}", str(layer))
        return part_name(name, role) if fused is not None else name

    def role_of(self, name: str) -> Role | None:
        """The role of a role name (a parameter, or a part ``"<param>[<role>]"``) in this family."""
        m = PART.match(name)
        what, _ = self._match(m.group(1) if m else name)
        if isinstance(what, Fused):
            roles = [r for r, _ in what.parts]
            return Role(m.group(2)) if m and Role(m.group(2)) in roles else None
        return None if m else what

    @staticmethod
    def retie(roles: dict[str, ParamRole], state: dict[str, torch.Tensor]) -> None:
        """Make the output embedding the input embedding's tensor again (tied models)."""
        embeds = [n for n, pr in roles.items() if pr.role is Role.EMBEDDING]
        for name, pr in roles.items():
            if pr.role is Role.LM_HEAD and embeds:
                state[name] = state[embeds[0]]

    # ------------------------------------------------------------------ checkpoints on disk
    def from_disk(self, disk_names) -> dict[str, list[tuple[int | None, str]]]:
        """Checkpoint tensor names -> held names (a role name for a part stored on its own):
        each with the checkpoint tensors it is made of, ``(expert, name)`` in expert order
        (``(None, name)``: one tensor as it is). ValueError for an incomplete expert set."""
        out: dict[str, list[tuple[int | None, str]]] = {}
        for name in disk_names:
            for disk_rx, _, _, on_disk in self._disk:
                m = disk_rx.match(name)
                if m:
                    groups = m.groupdict()
                    held = on_disk.tensor.replace("{i}", groups["i"]) if groups.get("i") is not None else on_disk.tensor
                    key = part_name(held, on_disk.part) if on_disk.part is not None else held
                    out.setdefault(key, []).append((int(groups["e"]) if groups.get("e") is not None else None, name))
                    break
            else:
                out.setdefault(name, []).append((None, name))
        for key, items in out.items():
            items.sort(key=lambda x: -1 if x[0] is None else x[0])
            experts = [e for e, _ in items]
            if len(items) > 1 and experts != list(range(len(items))):
                raise ValueError(f"{key}: the checkpoint holds experts {experts}, not 0..{len(items) - 1}")
        return out

    def to_disk(self, name: str, n_experts: int) -> list[tuple[str, int | None]] | None:
        """The checkpoint names a held tensor (role name) is written under, with the expert
        index each holds (None: the whole tensor); None when it is stored as held."""
        m = PART.match(name)
        held, part = (m.group(1), Role(m.group(2))) if m else (name, None)
        for _, template, held_rx, on_disk in self._disk:
            hm = held_rx.match(held)
            if hm and on_disk.part == part:
                disk = template.replace("{i}", hm.group("i")) if hm.groupdict().get("i") is not None else template
                if "{e}" in disk:
                    return [(disk.replace("{e}", str(e)), e) for e in range(n_experts)]
                return [(disk, None)]
        return None

    def fused_dim(self, name: str) -> int:
        """The dim a fused parameter concatenates its parts along."""
        what, _ = self._match(name)
        if not isinstance(what, Fused):
            raise ValueError(f"{name!r} is not a fused parameter of {self.name!r}")
        return what.dim

    def has_role(self, role: Role) -> bool:
        return any(
            what == role or (isinstance(what, Fused) and role in [r for r, _ in what.parts])
            for what in self.family.params.values()
        )

    # ------------------------------------------------------------------ building
    def build(self, config, state: dict[str, torch.Tensor], like: nn.Module | None = None) -> nn.Module:
        """A model of ``config`` around ``state`` (role names; tensors assigned, not copied).

        ``like``: the source model, whose train/eval mode (and for Hugging Face models,
        generation config) the new model takes.
        """
        state = self.fuse(state)
        if self.family.kind == "reference":
            from growkit.models import model_from_state_dict

            model = model_from_state_dict(config, state)
        else:
            model = _build_hf(config, state)
            if like is not None and getattr(like, "generation_config", None) is not None:
                model.generation_config = copy.deepcopy(like.generation_config)
        if like is not None:
            model.train(like.training)
        return model

    # ------------------------------------------------------------------ running
    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(model.get_submodule(self.family.layers))

    def forward_hidden(self, model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits [B, T, V], hidden states): the embedding output (the first layer's input)
        and every layer's output, n_layers + 1 tensors [B, T, d], before the final norm."""
        if self.family.kind == "reference":
            logits, hidden = model(ids, return_hidden_states=True)
            return logits, list(hidden)
        layers = self.layer_modules(model)
        hidden: list[torch.Tensor | None] = [None] * (len(layers) + 1)

        def first_input(_module, args, kwargs):
            hidden[0] = args[0] if args else kwargs["hidden_states"]

        def output(i):
            def hook(_module, _args, _kwargs, out):
                hidden[i + 1] = out[0] if isinstance(out, (tuple, list)) else out

            return hook

        handles = [layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
        handles += [layer.register_forward_hook(output(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            logits = model(input_ids=ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        if any(h is None for h in hidden):  # pragma: no cover - a layer was skipped
            raise RuntimeError(f"{self.name}: not every decoder layer ran on the probe")
        return logits, hidden


def _build_hf(config, state: dict[str, torch.Tensor]) -> nn.Module:
    from transformers import AutoModelForCausalLM

    floats = [t for t in state.values() if t.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.float32
    device = floats[0].device if floats else torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"the grown tensors do not fit {type(model).__name__}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}: the family table and the installed transformers disagree"
        )
    model.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.to(device)


# ---------------------------------------------------------------------------- registry
ADAPTERS: list = [FamilyAdapter(f) for f in FAMILIES.values()]


def register_family(family: Family, *, replace: bool = False) -> FamilyAdapter:
    """Make growth and the checks work on another family (one table entry; see ``families.py``)."""
    if not isinstance(family, Family):
        raise TypeError(f"family must be a growkit.growth.Family, got {type(family).__name__}")
    if family.name in FAMILIES and not replace:
        raise ValueError(f"family {family.name!r} is already registered: pass replace=True to replace it")
    FAMILIES[family.name] = family
    ADAPTERS[:] = [a for a in ADAPTERS if a.name != family.name]
    adapter = FamilyAdapter(family)
    ADAPTERS.insert(0, adapter)
    return adapter


def register_adapter(adapter, *, first: bool = True) -> None:
    """Register a hand-written adapter (an object with FamilyAdapter's methods)."""
    if first:
        ADAPTERS.insert(0, adapter)
    else:
        ADAPTERS.append(adapter)


def supported_families() -> list[str]:
    return [a.name for a in ADAPTERS if getattr(a, "is_hf", False)]


def get_family_adapter(config) -> FamilyAdapter:
    """The adapter of a Hugging Face config's family (``config.model_type``); ValueError naming
    the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if getattr(adapter, "is_hf", False) and model_type in adapter.family.model_types:
            return adapter
    raise ValueError(
        f"unsupported family: model_type {model_type!r}. Supported: {supported_families()}. To add one, "
        "describe it with growkit.growth.register_family(Family(name=..., params={name template: Role}, config={...}))."
    )


def get_adapter(model: nn.Module, what: str = "growth"):
    """The adapter for ``model``; ValueError naming the fix when there is none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    kind = f"model_type {model_type!r} ({type(model).__name__})" if model_type else type(model).__name__
    raise ValueError(
        f"{what} of an unknown architecture, {kind}: no family table entry maps its parameter "
        f"names to growth roles. Supported: growkit.models.Transformer and the transformers "
        f"families {supported_families()}. To add one, describe it with "
        "growkit.growth.register_family(Family(name=..., params={name template: Role}, config={...}))."
    )
