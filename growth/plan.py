"""Growth as a plan: every output tensor, its shape, and how to make it from source tensors.

Each operator (width, depth, MoE) first builds a :class:`GrowthPlan` from the source's
config and tensor *shapes* alone, then executes it. Executing in memory (the operators)
and tensor by tensor from a checkpoint on disk (``growkit grow``, ``stream.py``) call the
same ``make`` functions on the same source tensors, so both give bitwise the same model;
every random draw is keyed by (seed, tensor name), never by the order tensors are made.

Plans chain: the plan of a depth step on top of a width step reads the width step's
outputs, made on demand (:func:`chain`), so a checkpoint grown wider and deeper in one
pass never holds more than the tensor being written and what it is made from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .records import GrowthRecord, Source

Getter = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor that is not loaded (yet)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor (by role name): its spec, provenance and maker."""

    spec: TensorSpec
    source: Source
    make: Callable[[Getter], torch.Tensor]
    inputs: tuple[str, ...] = ()  # role names of the source tensors it reads


@dataclass
class GrowthPlan:
    """A growth step before any tensor is made.

    Attributes:
        adapter: the family adapter of the *output* (the MoE sibling after upcycling).
        config: the output config.
        tensors: role name -> :class:`TensorPlan`, in output order. A tied model lists its
            embedding only; the output embedding is tied again when the model is built.
        record: the growth record the output carries.
        tied: the output's embeddings are tied.
    """

    adapter: object
    config: object
    tensors: dict[str, TensorPlan]
    record: GrowthRecord
    tied: bool = False

    def specs(self) -> dict[str, TensorSpec]:
        return {name: t.spec for name, t in self.tensors.items()}

    def make(self, name: str, get: Getter) -> torch.Tensor:
        t = self.tensors[name].make(get)
        if tuple(t.shape) != self.tensors[name].spec.shape:  # pragma: no cover - a plan bug
            raise RuntimeError(f"{name}: made {tuple(t.shape)}, planned {self.tensors[name].spec.shape}")
        return t

    def execute(self, get: Getter) -> dict[str, torch.Tensor]:
        """Every output tensor, made in order (in memory)."""
        return {name: self.make(name, get) for name in self.tensors}


def copy_of(name: str) -> Callable[[Getter], torch.Tensor]:
    """A maker: a copy of source tensor ``name`` (sharing no storage with it)."""
    return lambda get: get(name).clone()


def scaled_copy_of(name: str, factor: float, zero: float = 0.0) -> Callable[[Getter], torch.Tensor]:
    """A maker: ``factor * (t - zero) + zero`` of source tensor ``name`` (a gain whose zero
    value is ``zero``, -1 for a ``(1 + w)`` norm, scaled in effect; its dtype kept)."""
    if zero == 0.0:
        return lambda get: get(name) * factor
    return lambda get: (get(name) - zero) * factor + zero


def zeros_like_source(name: str, value: float = 0.0) -> Callable[[Getter], torch.Tensor]:
    """A maker: zeros (or ``value``) shaped like source tensor ``name`` (its device and dtype)."""
    if value == 0.0:
        return lambda get: torch.zeros_like(get(name))
    return lambda get: torch.full_like(get(name), value)


def chain(first_get: Getter, plans: list[GrowthPlan]) -> Getter:
    """The getter of ``plans[-1]``'s inputs: ``first_get`` reads the original source
    tensors, and every earlier plan's outputs are made from it on demand (nothing kept)."""
    get = first_get
    for plan in plans[:-1]:
        get = (lambda p, g: (lambda name: p.make(name, g)))(plan, get)
    return get


def source_specs(adapter, model) -> tuple[dict[str, TensorSpec], dict[str, torch.Tensor], bool]:
    """(specs, tensors, tied) of an in-memory model, by role name; a tied model's output
    embedding is left out (it is the input embedding)."""
    from .roles import Role

    tied = adapter.tied(model)
    roles = adapter.param_roles(model)
    state = adapter.role_state(model)
    if tied:
        state = {n: t for n, t in state.items() if roles[n].role is not Role.LM_HEAD}
    specs = {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in state.items()}
    return specs, state, tied


def build_from_plan(plan: GrowthPlan, state: dict[str, torch.Tensor], like) -> torch.nn.Module:
    """The in-memory model of a plan's output tensors (ties restored), records attached."""
    from .records import attach_records

    if plan.tied and plan.adapter.is_hf:
        from .roles import Role

        state = dict(state)
        head = plan.adapter.tensor_name(Role.LM_HEAD, None)
        embed = plan.adapter.tensor_name(Role.EMBEDDING, None)
        state[head] = state[embed]
    model = plan.adapter.build(plan.config, state, like=like)
    attach_records(model, [plan.record], like=like)
    return model
