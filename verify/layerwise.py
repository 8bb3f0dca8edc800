"""The growth checks on checkpoints bigger than memory: one layer of each model at a time.

Each model is built on the meta device; its global tensors (embeddings, final norm, LM
head) and buffers are materialized, and every decoder layer is loaded from the checkpoint
by a forward pre-hook and dropped back to meta by a forward hook. The forward-pass checks
(RoPE integrity, router scaling, functional identity, the sanity check) then run unchanged.

The symmetry check needs gradients: a second forward pass takes the gradient at the last
layer's output; then, from the top layer down, each layer is loaded, run again on the
input it saw (with the arguments the model passed it), and back-propagated; its twins are
measured and it is dropped. Peak memory: the global tensors, one layer of each model with
its gradients, and the activations of the probe. The verdicts equal the in-memory check's
(tests/test_grow_cli.py compares them).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from growkit.growth.adapters import get_family_adapter
from growkit.growth.stream import CheckpointReader

from . import symmetry
from .api import _meta
from .context import Comparison
from .identity import identity_check
from .probe import _next_token_loss
from .report import SKIPPED, CheckResult, GrowthReport
from .rope import rope_check
from .router import router_check
from .sanity import quick_sanity_check
from .symmetry import has_upcycled_experts, measure_twins, symmetry_check


class OffloadedModel:
    """A Hugging Face checkpoint as a model whose decoder layers live on disk until they run."""

    def __init__(self, directory, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        self.reader = CheckpointReader(directory, device=device)
        self.device = torch.device(device)
        config = self.reader.config
        self.adapter = adapter = get_family_adapter(config)
        self.index = adapter.from_disk(self.reader.specs)
        floats = [s.dtype for s in self.reader.specs.values() if s.dtype.is_floating_point]
        dtype = floats[0] if floats else torch.float32
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
        self.model = model.eval()
        self.layers = adapter.layer_modules(model)
        # held parameter name -> its layer (None: global), from the checkpoint's names
        self.by_layer: dict[int | None, list[str]] = {}
        for name in self.index:
            layer = next(iter(adapter.roles_for_names([name]).values())).layer
            self.by_layer.setdefault(layer, []).append(name)
        self._buffers = self._real_buffers(config, dtype)
        self._materialize_globals()
        for p in model.parameters():
            p.requires_grad_(False)
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._loader(i))
            layer.register_forward_hook(self._unloader(i))
        self.keep_loaded: int | None = None  # a layer the backward pass holds

    # ------------------------------------------------------------------ loading
    def _load(self, names: list[str]) -> dict[str, torch.Tensor]:
        return self.adapter.fuse({name: self.reader.load_held(self.index[name]) for name in names})

    def _real_buffers(self, config, dtype) -> dict[str, torch.Tensor]:
        """The non-persistent buffers (RoPE frequencies, embedding scales) of this config, from
        a one-layer copy of it with a tiny vocabulary (they depend on neither)."""
        from transformers import AutoModelForCausalLM

        small = copy.deepcopy(config)
        updates = {"n_layers": 1, "vocab_size": 8}
        layer_types = self.adapter.cfg(config, "layer_types")
        if layer_types is not None:
            updates["layer_types"] = list(layer_types[:1])
        if self.adapter.has("dense_layers"):
            updates["dense_layers"] = []
        small = self.adapter.config_with(small, **updates)
        for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(small, attr, None) is not None:
                setattr(small, attr, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mini = AutoModelForCausalLM.from_config(small, attn_implementation="eager", dtype=dtype)
        prefix = self.adapter.family.layers + "."
        out = {}
        for name, buf in mini.named_buffers():
            if name.startswith(prefix + "0."):
                for i in range(len(self.layers)):
                    out[name.replace(prefix + "0.", f"{prefix}{i}.", 1)] = buf.to(self.device)
            else:
                out[name] = buf.to(self.device)
        return out

    def _set_buffers(self, prefix: str = "") -> None:
        for name, buf in self._buffers.items():
            if name.startswith(prefix):
                module_name, _, attr = name.rpartition(".")
                self.model.get_submodule(module_name)._buffers[attr] = buf

    def _materialize_globals(self) -> None:
        """Small global tensors (final norm) stay loaded; the embeddings, the largest tensors
        of the model, are loaded when their module runs (:meth:`load_embedding`)."""
        model = self.model
        self.embeddings = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
        big = {id(m.weight) for m in self.embeddings}
        names = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
        self.embedding_names = {}
        for module in self.embeddings:
            name = [n for n, p in names.items() if p is module.weight][0]
            if name not in self.index:  # a tied head is not stored: it is the input embedding
                name = [n for n, p in names.items() if p is model.get_input_embeddings().weight][0]
            self.embedding_names[module] = name
        small = [n for n in self.by_layer.get(None, []) if id(names.get(n)) not in big]
        model.load_state_dict(self._load(small), strict=False, assign=True)
        self._set_buffers()
        self.keep_embeddings = False
        for module in self.embeddings:
            module.register_forward_pre_hook(self._embedding_loader)
            module.register_forward_hook(self._embedding_unloader)
        missing = [n for n, p in model.named_parameters() if p.is_meta and self.adapter.family.layers + "." not in n
                   and id(p) not in big]
        if missing:
            raise ValueError(f"the checkpoint lacks {missing[:5]}")

    def _embedding_loader(self, module, _args) -> None:
        self.load_embedding(module)

    def _embedding_unloader(self, module, _args, _out) -> None:
        if not self.keep_embeddings:
            self.unload_embedding(module)

    def _tied_modules(self, module) -> list[nn.Module]:
        return [m for m in self.embeddings if self.embedding_names[m] == self.embedding_names[module]]

    def load_embedding(self, module, requires_grad: bool = False) -> nn.Parameter:
        if not module.weight.is_meta:
            return module.weight
        name = self.embedding_names[module]
        p = nn.Parameter(self._load([name])[name], requires_grad=requires_grad)
        for m in self._tied_modules(module):
            m.weight = p
        return p

    def unload_embedding(self, module) -> None:
        p = nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)
        for m in self._tied_modules(module):
            m.weight = p

    def load_layer(self, i: int, requires_grad: bool = False) -> nn.Module:
        layer = self.layers[i]
        prefix = f"{self.adapter.family.layers}.{i}."
        state = {k[len(prefix):]: v for k, v in self._load(self.by_layer.get(i, [])).items()}
        layer.load_state_dict(state, strict=True, assign=True)
        self._set_buffers(prefix)
        for p in layer.parameters():
            p.requires_grad_(requires_grad)
        return layer

    def unload_layer(self, i: int) -> None:
        layer = self.layers[i]
        for module in layer.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)

    def _loader(self, i: int):
        def hook(_module, _args):
            if self.keep_loaded != i:
                self.load_layer(i)

        return hook

    def _unloader(self, i: int):
        def hook(_module, _args, _out):
            if self.keep_loaded != i:
                self.unload_layer(i)

        return hook

    def close(self) -> None:
        self.reader.close()


def _measure_one(model, param: nn.Parameter, scale: int, expert_twins: bool) -> list[dict]:
    """Twin rows of one loaded parameter (its gradient is freed afterwards)."""
    name = [n for n, p in model.named_parameters() if p is param][0]
    rows = measure_twins(model, {name: param.grad}, scale, expert_twins, names={name})
    param.grad = None
    return rows


def _embedding_backward(off: OffloadedModel, embed: nn.Module, probe: torch.Tensor, g: torch.Tensor) -> None:
    """Add the input side's gradient to the embedding's ``.grad`` (the head side's may be there).

    NOTE: the embedding module is run on the rows the probe uses only (a [U, d] copy with the
    ids remapped), and the result added into a [V, d] gradient: autograd's dense embedding
    backward on the CPU measured about five [V, d] temporaries (1.3 GB for a 32000 x 2048
    float32 table). The module itself runs, so a scale it applies (Gemma's normalizer) is in
    the gradient; ``padding_idx`` rows get none, as in autograd.
    """
    weight = off.load_embedding(embed)
    rows, inverse = torch.unique(probe.reshape(-1), return_inverse=True)
    small = nn.Parameter(weight.detach()[rows].clone())
    pad = getattr(embed, "padding_idx", None)
    try:
        embed.weight, embed.padding_idx = small, None
        with torch.enable_grad():
            e = embed(inverse.reshape(probe.shape))
            if e.shape != g.shape:  # pragma: no cover - a family whose first layer input is not the embedding
                raise ValueError(f"{off.adapter.name}: the first layer's input is not the embedding output")
            e.backward(g)
    finally:
        embed.weight = weight
        if pad is not None:
            embed.padding_idx = pad
    part = small.grad
    if pad is not None:
        part[rows == pad] = 0
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    weight.grad.index_add_(0, rows, part)


def layerwise_symmetry(off: OffloadedModel, probe: torch.Tensor, scale: int, expert_twins: bool,
                       min_divergence: float) -> CheckResult:
    """The symmetry check with gradients computed one layer at a time (see the module doc)."""
    model, adapter = off.model, off.adapter
    n = len(off.layers)
    inputs: dict[int, tuple] = {}
    handles = []

    def capture(i):
        def hook(_module, args, kwargs):
            inputs[i] = (args, dict(kwargs))

        return hook

    top: dict[str, torch.Tensor] = {}

    def leaf(_module, _args, _kwargs, out):
        h = out[0] if isinstance(out, (tuple, list)) else out
        h = h.detach().requires_grad_(True)
        top["h"] = h
        return (h, *out[1:]) if isinstance(out, (tuple, list)) else h

    def cut(_module, args, kwargs):
        # no autograd graph through the layers: it would hold every layer's weights
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=kwargs["hidden_states"].detach())

    handles.append(off.layers[0].register_forward_pre_hook(cut, with_kwargs=True))
    for i, layer in enumerate(off.layers):
        handles.append(layer.register_forward_pre_hook(capture(i), with_kwargs=True))
    handles.append(off.layers[-1].register_forward_hook(leaf, with_kwargs=True))
    # the LM head stays loaded (with its gradient) until measured; the input embedding only
    # when it is the same tensor (tied)
    off.keep_embeddings = True
    head = model.get_output_embeddings()
    off.load_embedding(head, requires_grad=True)
    tied = len({off.embedding_names[m] for m in off.embeddings}) < len(off.embeddings)
    globals_ = [p for p in model.parameters() if not p.is_meta]
    for p in globals_:
        p.requires_grad_(True)
        p.grad = None
    try:
        with torch.enable_grad():
            logits = model(input_ids=probe, use_cache=False).logits
            _next_token_loss(logits, probe).backward()
    finally:
        for h in handles:
            h.remove()
    rows = []
    input_embedding = model.get_input_embeddings()
    if not tied:  # the LM head has all its gradient now: measure it and let it go
        rows += _measure_one(model, head.weight, scale, expert_twins)
        off.unload_embedding(head)
        off.unload_embedding(input_embedding)
    g = top["h"].grad
    for i in reversed(range(n)):
        off.keep_loaded = i
        layer = off.load_layer(i, requires_grad=True)
        args, kwargs = inputs[i]
        x = args[0].detach().requires_grad_(True) if args else kwargs["hidden_states"].detach().requires_grad_(True)
        if args:
            args = (x, *args[1:])
        else:
            kwargs = dict(kwargs, hidden_states=x)
        with torch.enable_grad():
            out = layer(*args, **kwargs)
            h = out[0] if isinstance(out, (tuple, list)) else out
            h.backward(g)
        prefix = f"{adapter.family.layers}.{i}."
        grads = {prefix + k: p.grad for k, p in layer.named_parameters()}
        names = set(adapter.split(model, grads))
        rows += measure_twins(model, grads, scale, expert_twins, names=names)
        del grads, out, h  # the layer's gradients go with it
        g = x.grad
        off.keep_loaded = None
        off.unload_layer(i)
    embed = input_embedding
    _embedding_backward(off, embed, probe, g)
    rows = _measure_one(model, embed.weight, scale, expert_twins) + rows
    off.keep_embeddings = False
    for module in off.embeddings:
        off.unload_embedding(module)
    small = [p for p in model.parameters() if not p.is_meta]
    grads = {name: p.grad for name, p in model.named_parameters() if not p.is_meta}
    rows = measure_twins(model, grads, scale, expert_twins, names=set(adapter.split(model, grads))) + rows
    for p in small:
        p.requires_grad_(False)
        p.grad = None
    return symmetry_check(model, None, scale, expert_twins=expert_twins, min_divergence=min_divergence, rows=rows)


def run_growth_checks_layerwise(src, dst, probe: torch.Tensor, records=None, *, device: str = "cpu",
                                scale_factor: int | None = None, tolerance: float | None = None,
                                min_divergence: float = 1e-6) -> GrowthReport:
    """The four checks and the sanity check on two checkpoints, one layer at a time."""
    import time

    t0 = time.perf_counter()
    old, new = OffloadedModel(src, device), OffloadedModel(dst, device)
    try:
        if records is not None:
            new.model.growth_records = records
        if len(old.layers) != len(new.layers) and not any(r.op == "depth" for r in records or []):
            raise ValueError("layerwise verification of a deeper model needs DST's growth.json (growkit grow writes it)")
        probe = probe.to(device)
        ctx = Comparison(old.model, new.model, probe, scale_factor=scale_factor, tolerance=tolerance)
        ctx.old_run()
        ctx._new_run = None
        ctx.new_run(backward=False)
        checks = [rope_check(ctx), router_check(ctx)]
        scale = ctx.twin_scale
        expert_twins = has_upcycled_experts(new.model)
        if scale <= 1 and not expert_twins:
            checks.append(CheckResult(symmetry.NAME, symmetry.TITLE, SKIPPED,
                                      "not widened (scale 1) and no upcycled experts: no clones",
                                      min_divergence, symmetry.RULE))
        else:
            checks.append(layerwise_symmetry(new, probe, scale, expert_twins, min_divergence))
        checks.append(identity_check(ctx))
        checks.append(quick_sanity_check(new.model, probe))
        seconds = {"total": time.perf_counter() - t0}
        meta = _meta(ctx, torch.device(device), seconds)
        meta["mode"] = "layerwise (one layer of each model in memory at a time)"
        return GrowthReport("Growth verification", checks, meta)
    finally:
        old.close()
        new.close()
