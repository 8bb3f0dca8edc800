"""The growth checks on checkpoints bigger than memory: one weight of each model at a time.

Each model is built on the meta device; its small global tensors (final norm) and buffers
are materialized. Every module of a decoder layer loads its own parameters from the
checkpoint when it runs (a forward pre-hook) and drops them back to meta right after (a
forward hook); the input embedding reads only the rows of the ids it is given; the LM head
computes its logits reading its weight in chunks of rows (:class:`_DiskHead`). A forward
pass thus holds one weight at a time besides the activations, and the forward-pass checks
(RoPE integrity, router scaling, functional identity, the sanity check) run unchanged.
They run first; their stored activations are dropped before the symmetry check.

The symmetry check needs gradients: a second forward pass takes the gradient at the last
layer's output (and the LM head's inputs and output gradients: its weight gradient is made
in chunks of rows when measured); then, from the top layer down, each layer is run again
on the input it saw (with the arguments the model passed it) and back-propagated, module
by module as in the forward passes (:class:`_LayerBackward`), and its twins are measured.
The embeddings' tables are measured in chunks read from disk. No [V, d] tensor, and no
whole decoder layer, is ever held: peak memory is one weight (or chunk) and the probe's
activations. The verdicts equal the in-memory check's, the figures up to float rounding
(tests/test_grow_cli.py, tests/test_streaming_stats.py compare them).

NOTE: measured with bench/grow_checkpoint.py (a 0.5B-parameter float32 Llama grown x2 to
7.6 GB, seq-len 32): the peak RSS of ``growkit verify --layerwise`` went from 1.86 GB, when
a decoder layer (243 MB) and the LM head (262 MB) were loaded whole with autograd's
gradients and the statistics' stacked copies, to about 0.7 GB, of which 0.49 GB is the
interpreter with torch and transformers' model code imported.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from growkit.growth.adapters import PART, get_family_adapter
from growkit.growth.stream import CheckpointReader
from growkit.kernels.memory import release_freed_memory

from . import noise, symmetry
from .api import _meta
from .context import Comparison
from .identity import identity_check
from .probe import _next_token_loss
from .report import SKIPPED, CheckResult, GrowthReport
from .rope import rope_check
from .router import router_check
from .sanity import quick_sanity_check
from .symmetry import has_upcycled_experts, measure_twins, symmetry_check

# rows of an embedding read from disk at a time (the LM head's forward pass)
READ_CHUNK_BYTES = {"cpu": 16 * 2**20, "cuda": 256 * 2**20}


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with their parameters on the meta device and their buffers real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _plain_linear(module: nn.Module) -> bool:
    """A ``torch.nn.Linear`` computing ``x @ W^T + b`` (no subclass forward, no parametrization)."""
    from torch.nn.utils import parametrize

    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and not parametrize.is_parametrized(module))


def _gatherable(module: nn.Module) -> bool:
    """An embedding whose output for some ids needs only those rows of its table."""
    return isinstance(module, nn.Embedding) and module.max_norm is None and not module.sparse


class OffloadedModel:
    """A Hugging Face checkpoint as a model whose weights live on disk until they are used
    (see the module doc)."""

    def __init__(self, directory, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        # set: every tensor with zero-sum clone noise is loaded with it averaged out, and the
        # std of what was removed is kept by name (verify/noise.py, :attr:`deviations`)
        self.denoise_scale: int | None = None
        # name -> rows read (None: all) -> (sum of squared deviations, their count)
        self._removed: dict[str, dict[tuple[int, int] | None, tuple[float, int]]] = {}
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
        # real parameter name -> the held names it is made of (parts of a fused one stored apart)
        self.held_of: dict[str, list[str]] = {}
        for name in self.index:
            layer = next(iter(adapter.roles_for_names([name]).values())).layer
            self.by_layer.setdefault(layer, []).append(name)
            m = PART.match(name)
            self.held_of.setdefault(m.group(1) if m else name, []).append(name)
        self._buffers = self._real_buffers(config, dtype)
        self._materialize_globals()
        for p in model.parameters():
            p.requires_grad_(False)
        prefix = adapter.family.layers
        for i, layer in enumerate(self.layers):
            for module_name, module in layer.named_modules():
                own = {n: f"{prefix}.{i}." + (f"{module_name}." if module_name else "") + n
                       for n, p in module._parameters.items() if p is not None}
                if own:
                    module.register_forward_pre_hook(self._module_loader(i, module, own))
                    module.register_forward_hook(self._module_unloader(i, module))
            layer.register_forward_hook(self._unloader(i))
        self.keep_loaded: int | None = None  # a layer held loaded (load_layer)
        self.backward: _LayerBackward | None = None  # the layer the symmetry check back-propagates

    # ------------------------------------------------------------------ loading
    def _load(self, names: list[str]) -> dict[str, torch.Tensor]:
        state = self.adapter.fuse({name: self.reader.load_held(self.index[name]) for name in names})
        if self.denoise_scale:
            state = {name: self._denoised(name, t) for name, t in state.items()}
        return state

    def _denoised(self, name: str, t: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """``t`` (rows ``rows`` of the tensor ``name``, or all of it) with its zero-sum clone
        noise averaged out; ``t`` itself where its role takes none."""
        s = self.denoise_scale
        roles = list(self.adapter.roles_for_names([name]).values())  # a fused tensor: all its parts
        if not noise.carries_noise(roles, t, s):
            return t
        quiet, std = noise.denoise_tensor(t, s)
        self._removed.setdefault(name, {})[rows] = (std * std * t.numel(), t.numel())
        return quiet

    @property
    def deviations(self) -> dict[str, float]:
        """Per tensor loaded denoised: the std of the clone deviations removed from it (over
        the rows read, for the LM head read in chunks)."""
        return {name: math.sqrt(sum(q for q, _ in parts.values()) / sum(n for _, n in parts.values()))
                for name, parts in self._removed.items()}

    def _real_buffers(self, config, dtype) -> dict[str, torch.Tensor]:
        """The non-persistent buffers (RoPE frequencies, embedding scales) of this config, from
        a one-layer copy of it with a tiny vocabulary (they depend on neither), built with its
        parameters on meta (one real layer of a large model is hundreds of MB)."""
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
        with warnings.catch_warnings(), _parameters_on_meta():
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
        """Small global tensors (final norm) stay loaded. The embeddings, the largest tensors
        of the model, are read when their module runs: the rows of the ids given (the input
        embedding), in chunks of rows (the LM head, :class:`_DiskHead`); a module of another
        kind is loaded whole while it runs (:meth:`load_embedding`)."""
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
        self.keep_embeddings: set[str] = set()  # embeddings (by name) that stay loaded after they run
        self.disk_head: _DiskHead | None = None
        self._swapped: dict = {}
        head = model.get_output_embeddings()
        for module in self.embeddings:
            single = len(self.index.get(self.embedding_names[module], [])) == 1
            if module is head and single and _plain_linear(module):
                self.disk_head = _DiskHead(self, module, self.embedding_names[module])
            elif module is not head and single and _gatherable(module):
                module.register_forward_pre_hook(self._gather_rows, with_kwargs=True)
                module.register_forward_hook(self._gathered)
            else:
                module.register_forward_pre_hook(self._embedding_loader)
                module.register_forward_hook(self._embedding_unloader)
        missing = [n for n, p in model.named_parameters() if p.is_meta and self.adapter.family.layers + "." not in n
                   and id(p) not in big]
        if missing:
            raise ValueError(f"the checkpoint lacks {missing[:5]}")

    def disk_name(self, module) -> str:
        """The checkpoint tensor of an embedding module."""
        return self.index[self.embedding_names[module]][0][1]

    def embedding_rows(self, module, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (sorted, distinct) of an embedding's table, read from disk unless loaded."""
        if not module.weight.is_meta:
            return module.weight.detach()[rows].clone()
        return self.reader.get_index(self.disk_name(module), rows)

    def weight_source(self, module) -> symmetry._RowSource:
        """An embedding's table read from disk in chunks of rows (for its statistics)."""
        disk = self.disk_name(module)
        spec = self.reader.specs[disk]
        return symmetry._RowSource(spec.shape, spec.dtype, self.device,
                                   lambda a, b: self.reader.get_rows(disk, a, b))

    def _gather_rows(self, module, args, kwargs):
        """Before the input embedding runs: its table is the rows of the ids given only."""
        if not module.weight.is_meta:
            return None
        ids = args[0] if args else kwargs["input"]
        rows, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        self._swapped[module] = (module.weight, module.padding_idx)
        # padding_idx only stops gradients (none flow here) and must index the full table
        module.weight = nn.Parameter(self.embedding_rows(module, rows), requires_grad=False)
        module.padding_idx = None
        inverse = inverse.reshape(ids.shape)
        return ((inverse, *args[1:]), kwargs) if args else (args, dict(kwargs, input=inverse))

    def _gathered(self, module, _args, _out) -> None:
        if module in self._swapped:
            module.weight, module.padding_idx = self._swapped.pop(module)

    def _embedding_loader(self, module, _args) -> None:
        self.load_embedding(module)

    def _embedding_unloader(self, module, _args, _out) -> None:
        if self.embedding_names[module] not in self.keep_embeddings:
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
            self._unload_module(module)

    @staticmethod
    def _unload_module(module: nn.Module) -> None:
        for name, p in list(module._parameters.items()):
            if p is not None and not p.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)

    def _module_loader(self, i: int, module: nn.Module, own: dict[str, str]):
        def hook(_module, _args):
            backward = self.backward if self.backward is not None and self.backward.index == i else None
            wanted = {n: full for n, full in own.items() if backward is None or full not in backward.streamed}
            if all(not module._parameters[n].is_meta for n in wanted):
                return  # loaded already (or read by the module itself)
            state = self._load([h for full in wanted.values() for h in self.held_of.get(full, [])])
            for n, full in wanted.items():
                if full not in state:
                    raise ValueError(f"the checkpoint lacks {full!r}")
                p = nn.Parameter(state[full], requires_grad=backward is not None)
                module._parameters[n] = p
                if backward is not None:
                    backward.loaded(full, p)

        return hook

    def _holds(self, i: int) -> bool:
        """Layer ``i``'s parameters stay loaded after its modules run."""
        return self.keep_loaded == i or (self.backward is not None and self.backward.index == i)

    def _module_unloader(self, i: int, module: nn.Module):
        def hook(_module, _args, _out):
            if not self._holds(i):
                self._unload_module(module)

        return hook

    def _unloader(self, i: int):
        def hook(_module, _args, _out):
            if not self._holds(i):
                self.unload_layer(i)
                release_freed_memory()  # the layer's activations were freed into the heap

        return hook

    def close(self) -> None:
        self.reader.close()


def _read_chunks(rows: int, row_bytes: int, device: torch.device) -> list[tuple[int, int]]:
    step = max(1, READ_CHUNK_BYTES.get(device.type, READ_CHUNK_BYTES["cpu"]) // max(1, row_bytes))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)] or [(0, 0)]


class _DiskHeadFunction(torch.autograd.Function):
    """The LM head's logits and input gradient, its weight read in chunks of rows."""

    @staticmethod
    def forward(ctx, x, bias, head):
        ctx.head = head
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x)
        return head.logits(x, bias)

    @staticmethod
    def backward(ctx, g):
        head = ctx.head
        (x,) = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        if head.capture is not None:  # for the weight gradient, made in chunks when measured
            head.capture.append((x.detach().reshape(-1, x.shape[-1]), g2))
        dx = head.input_grad(g2).reshape(x.shape) if ctx.needs_input_grad[0] else None
        db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return dx, db, None


class _DiskHead:
    """An LM head (a plain linear map) whose weight stays on disk: the logits, the gradient
    at its input and its weight's statistics are computed reading the weight in chunks of
    rows; its weight gradient is made in chunks from the inputs and output gradients it saw
    (``capture``, set by the symmetry check).

    NOTE: the head, [V, s*d], is the largest tensor of a grown model (262 MB for the bench's
    32000 x 2048 float32 one, bench/grow_checkpoint.py); loaded whole with its gradient, and
    the statistics' copies, it was most of ``verify --layerwise``'s peak memory (1.86 GB).
    Where the weight is one chunk the products are those F.linear and autograd compute
    (bitwise); chunks differ by float rounding at most.
    """

    def __init__(self, off: OffloadedModel, module: nn.Linear, name: str) -> None:
        self.off, self.module, self.name = off, module, name
        self.disk = off.index[name][0][1]
        spec = off.reader.specs[self.disk]
        self.shape, self.dtype = spec.shape, spec.dtype
        self.capture: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        row_bytes = spec.nbytes // max(1, spec.shape[0])
        self.chunks = _read_chunks(spec.shape[0], row_bytes, off.device)
        module.forward = self.forward  # an instance attribute: the module's hooks still run

    def rows(self, a: int, b: int) -> torch.Tensor:
        t = self.off.reader.get_rows(self.disk, a, b)
        return self.off._denoised(self.name, t, (a, b)) if self.off.denoise_scale else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DiskHeadFunction.apply(x, self.module.bias, self)

    def logits(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if len(self.chunks) == 1:
            return F.linear(x, self.rows(0, self.shape[0]), bias)
        out = x.new_empty((*x.shape[:-1], self.shape[0]))
        for a, b in self.chunks:
            out[..., a:b] = F.linear(x, self.rows(a, b), None if bias is None else bias[a:b])
        return out

    def input_grad(self, g: torch.Tensor) -> torch.Tensor:
        out = None
        for a, b in self.chunks:
            part = g[:, a:b].mm(self.rows(a, b))
            out = part if out is None else out.add_(part)
        return out

    def grad_rows(self, a: int, b: int) -> torch.Tensor:
        """Rows a..b of the weight gradient: grad_out[:, a:b]^T @ input (as autograd)."""
        return _linear_grad(self.capture or [], slice(a, b), (b - a, *self.shape[1:]), self.dtype, self.off.device)

    def grad_source(self) -> symmetry._RowSource:
        return symmetry._RowSource(self.shape, self.dtype, self.off.device, self.grad_rows)


def _linear_grad(parts, cols, shape, dtype, device) -> torch.Tensor:
    """Rows ``cols`` of a linear map's weight gradient from its (input, output gradient) pairs."""
    out = None
    for x, g in parts:
        part = g[:, cols if isinstance(cols, slice) else cols.to(g.device)].t().mm(x)
        out = part if out is None else out.add_(part)
    if out is None:  # it did not run into the loss: no gradient
        return torch.zeros(shape, dtype=dtype, device=device)
    return out.to(dtype)


def _embedding_backward(off: OffloadedModel, embed: nn.Module, probe: torch.Tensor,
                        g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input side's gradient of the embedding: the rows the probe uses, and theirs.

    NOTE: the embedding module is run on the rows the probe uses only (a [U, d] table read
    from disk, the ids remapped): autograd's dense embedding backward on the CPU measured
    about five [V, d] temporaries (1.3 GB for a 32000 x 2048 float32 table), and the [V, d]
    gradient is made in chunks of rows when measured (:func:`_embedding_gradient`). The
    module's own forward runs, so a scale it applies (Gemma's normalizer) is in the
    gradient; ``padding_idx`` rows get none, as in autograd.
    """
    rows, inverse = torch.unique(probe.reshape(-1), return_inverse=True)
    small = nn.Parameter(off.embedding_rows(embed, rows))
    weight, pad = embed.weight, getattr(embed, "padding_idx", None)
    try:
        embed.weight = small
        if pad is not None:
            embed.padding_idx = None
        with torch.enable_grad():
            e = embed.forward(inverse.reshape(probe.shape))  # not through the hooks: the table is set
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
    return rows, part


def _embedding_gradient(shape, dtype, device, used: torch.Tensor, part: torch.Tensor, head_rows=None,
                        dense: torch.Tensor | None = None) -> symmetry._RowSource:
    """The embedding's gradient in chunks of rows: the output side's (a tied head's chunk,
    or the ``.grad`` autograd left), plus the input side's rows ``used``."""

    def rows(a: int, b: int) -> torch.Tensor:
        if head_rows is not None:
            out = head_rows(a, b)
        elif dense is not None:
            out = dense[a:b].clone()
        else:
            out = torch.zeros((b - a, *shape[1:]), dtype=dtype, device=device)
        inside = ((used >= a) & (used < b)).nonzero().reshape(-1)
        if inside.numel():
            out.index_add_(0, used[inside] - a, part[inside].to(out.dtype))
        return out

    return symmetry._RowSource(shape, dtype, device, rows)


def _linear_rows(adapter, model, name: str, weight: torch.Tensor) -> dict[str, int] | None:
    """Role name -> first row in the weight, for a linear map's weight (its parts, when
    fused along dim 0); None for one fused along another dim."""
    parts = adapter.split(model, {name: weight})
    if len(parts) == 1:
        return {next(iter(parts)): 0}
    if adapter.fused_dim(name) != 0:
        return None
    base, step = weight.storage_offset(), weight.stride(0)
    return {role: (t.storage_offset() - base) // step for role, t in parts.items()}


class _StreamedLinearFunction(torch.autograd.Function):
    """A linear map whose weight is read for its forward pass and again for its backward."""

    @staticmethod
    def forward(ctx, x, bias, lin):
        w = lin.weight()
        lin.measure_weight(w)
        ctx.lin, ctx.has_bias = lin, bias is not None
        ctx.save_for_backward(x)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, g):
        lin = ctx.lin
        (x,) = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        lin.captured.append((x.detach().reshape(-1, x.shape[-1]), g2))
        dx = g2.mm(lin.weight()).reshape(x.shape) if ctx.needs_input_grad[0] else None
        db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return dx, db, None


class _StreamedLinear:
    """A linear map of the layer being back-propagated whose weight the module never holds:
    read from disk for its forward pass (its statistics taken then) and for its backward
    pass, its weight gradient made in chunks from its inputs and output gradients."""

    def __init__(self, backward: "_LayerBackward", module: nn.Linear, name: str, rows: dict[str, int]) -> None:
        self.backward, self.module, self.name, self.rows = backward, module, name, rows
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        module.forward = self.forward  # an instance attribute: the module's hooks still run

    def weight(self) -> torch.Tensor:
        off = self.backward.off
        return off._load(off.held_of[self.name])[self.name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not x.requires_grad:  # the gradient at the output is needed
            x = x.detach().requires_grad_(True)
        return _StreamedLinearFunction.apply(x, self.module.bias, self)

    def measure_weight(self, w: torch.Tensor) -> None:
        b = self.backward
        parts = b.off.adapter.split(b.off.model, {self.name: w})
        for role in self.rows:
            if role in b.axes and role not in b.weights:
                b.weights[role] = symmetry._twin_sums([parts[role]], b.axes[role])[0]

    def restore(self) -> None:
        self.module.__dict__.pop("forward", None)

    def grad_sources(self) -> dict[str, symmetry._RowSource]:
        b, w = self.backward, self.module.weight  # meta: the shapes
        parts = b.off.adapter.split(b.off.model, {self.name: w})
        return {role: _linear_grad_source(self.captured, first, tuple(parts[role].shape), b.axes[role], w.dtype,
                                          b.off.device)
                for role, first in self.rows.items() if role in b.axes}


class _LayerBackward:
    """Decoder layer ``index`` run again on the input it saw and back-propagated, its twins
    measured.

    NOTE: a whole decoder layer of the bench's model grown x2 is 243 MB of float32 weights,
    and as much again in gradients: held together next to the interpreter and the probe's
    activations they were the peak memory once the embeddings were streamed. Here the layer
    is run module by module as in the forward passes: a linear map's weight is read when
    its forward and its backward need it (:class:`_StreamedLinear`) and gets no gradient
    from autograd (its gradient is made in chunks of rows when measured, as the LM head's);
    the other parameters (norms, biases, routers, stacked experts) stay loaded until the
    backward pass is done, each gradient measured and freed as soon as autograd has
    accumulated it (a post-accumulate-grad hook). Every weight's statistics are taken while
    it is loaded. Peak: one weight, the small parameters and the activations of one layer.
    """

    def __init__(self, off: OffloadedModel, index: int, scale: int, expert_twins: bool) -> None:
        self.off, self.index, self.scale, self.expert_twins = off, index, scale, expert_twins
        model, adapter = off.model, off.adapter
        layer = off.layers[index]
        prefix = f"{adapter.family.layers}.{index}."
        self.names = set(adapter.split(model, {prefix + k: None for k, _ in layer.named_parameters()}))
        self.axes = {item[0]: item[2] for item in symmetry._items(model, scale, expert_twins) if item[0] in self.names}
        self.weights: dict[str, symmetry._TwinSums] = {}
        self.grads: dict = {}
        self.handles = []
        self.streamed: dict[str, _StreamedLinear] = {}
        for module_name, module in layer.named_modules():
            if not _plain_linear(module):
                continue
            name = prefix + (f"{module_name}." if module_name else "") + "weight"
            rows = _linear_rows(adapter, model, name, module.weight)
            if rows is not None and any(role in self.axes for role in rows) and name in off.held_of:
                self.streamed[name] = _StreamedLinear(self, module, name, rows)

    def loaded(self, name: str, p: nn.Parameter) -> None:
        """A parameter its module loaded: its statistics now, its gradient's when made."""
        adapter, model = self.off.adapter, self.off.model
        for role, part in adapter.split(model, {name: p.detach()}).items():
            if role in self.axes and role not in self.weights:
                self.weights[role] = symmetry._twin_sums([part], self.axes[role])[0]

        def measured(param):
            with torch.no_grad():
                for role, grad in adapter.split(model, {name: param.grad}).items():
                    if role in self.axes:
                        self.grads[role] = symmetry._twin_sums([grad], self.axes[role], swap_slots=0)[0]
            param.grad = None

        self.handles.append(p.register_post_accumulate_grad_hook(measured))

    def run(self, args: tuple, kwargs: dict, g: torch.Tensor) -> None:
        """The layer's forward pass on ``args``/``kwargs`` again, and the backward pass of ``g``."""
        off = self.off
        off.backward = self
        try:
            with torch.enable_grad():
                out = off.layers[self.index](*args, **kwargs)
                h = out[0] if isinstance(out, (tuple, list)) else out
                h.backward(g)
            del out, h
        finally:
            off.backward = None
            for lin in self.streamed.values():
                lin.restore()
            for handle in self.handles:
                handle.remove()
            off.unload_layer(self.index)

    def rows(self) -> list[dict]:
        model = self.off.model
        # a parameter no module loaded (an expert no token reached): measured from disk
        disk = _disk_roles(self.off)
        for role in self.axes:  # the parts of a fused parameter come together: one read
            if role not in self.weights:
                self.weights[role] = symmetry._twin_sums([disk(role)], self.axes[role])[0]
        del disk
        grads = dict(self.grads)
        for lin in self.streamed.values():
            grads.update(lin.grad_sources())
        try:
            return measure_twins(model, grads, self.scale, self.expert_twins, names=self.names, weights=self.weights)
        finally:
            # what the layer's backward pass kept goes now, not at the next cyclic garbage
            # collection (the streamed maps and this object refer to each other)
            del grads
            self.streamed, self.grads, self.weights = {}, {}, {}


def _linear_grad_source(captured: list, first: int, shape: tuple, axes, dtype, device) -> symmetry._RowSource:
    """The weight gradient of (a dim-0 part, from row ``first``, of) a linear map, in chunks."""

    def rows(a: int, b: int) -> torch.Tensor:
        idx = symmetry._block_rows(shape, axes, a, b)
        cols = slice(first + idx.start, first + idx.stop) if isinstance(idx, slice) else idx + first
        n = idx.stop - idx.start if isinstance(idx, slice) else idx.numel()
        return _linear_grad(captured, cols, (n, *shape[1:]), dtype, device)

    return symmetry._RowSource(shape, dtype, device, rows)


def _measure_embedding(off: OffloadedModel, module: nn.Module, grad, scale: int, expert_twins: bool) -> list[dict]:
    """Twin rows of an embedding (its table read from disk in chunks unless loaded)."""
    name = off.embedding_names[module]
    weights = {name: off.weight_source(module)} if module.weight.is_meta else None
    return measure_twins(off.model, {name: grad}, scale, expert_twins, names={name}, weights=weights)


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
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = len({off.embedding_names[m] for m in off.embeddings}) < len(off.embeddings)
    disk_head = off.disk_head
    if disk_head is None:  # a head loaded whole: autograd's gradient, held until measured
        off.keep_embeddings = {off.embedding_names[head]}
        off.load_embedding(head, requires_grad=True)
    else:  # its weight gradient made in chunks from what it saw
        disk_head.capture = []
    globals_ = [p for p in model.parameters() if not p.is_meta]
    for p in globals_:
        p.requires_grad_(True)
        p.grad = None
    try:
        with torch.enable_grad():
            logits = model(input_ids=probe, use_cache=False).logits
            _next_token_loss(logits, probe).backward()
        del logits
    finally:
        for h in handles:
            h.remove()
    rows = []
    dense = None  # a tied head's gradient from autograd
    if not tied:  # the LM head has all its gradient now: measure it and let it go
        if disk_head is not None:
            name = off.embedding_names[head]
            rows += measure_twins(model, {name: disk_head.grad_source()}, scale, expert_twins, names={name},
                                  weights={name: off.weight_source(head)})
            disk_head.capture = None
        else:
            rows += _measure_embedding(off, head, head.weight.grad, scale, expert_twins)
            head.weight.grad = None
            off.unload_embedding(head)
    elif disk_head is None:
        dense = head.weight.grad
    g = top.pop("h").grad
    release_freed_memory()
    for i in reversed(range(n)):
        args, kwargs = inputs.pop(i)
        x = args[0].detach().requires_grad_(True) if args else kwargs["hidden_states"].detach().requires_grad_(True)
        if args:
            args = (x, *args[1:])
        else:
            kwargs = dict(kwargs, hidden_states=x)
        backward = _LayerBackward(off, i, scale, expert_twins)
        backward.run(args, kwargs, g)
        del args, kwargs
        rows += backward.rows()
        del backward
        g = x.grad
        release_freed_memory()
    used, part = _embedding_backward(off, embed, probe, g)
    weight = embed.weight
    grad = _embedding_gradient(weight.shape, weight.dtype, off.device, used, part,
                               disk_head.grad_rows if tied and disk_head is not None else None, dense)
    rows = _measure_embedding(off, embed, grad, scale, expert_twins) + rows
    del grad, dense
    if disk_head is not None:
        disk_head.capture = None
    off.keep_embeddings = set()
    for module in off.embeddings:
        module.weight.grad = None
        if not module.weight.is_meta:
            off.unload_embedding(module)
    small = [p for p in model.parameters() if not p.is_meta]
    grads = {name: p.grad for name, p in model.named_parameters() if not p.is_meta}
    rows = measure_twins(model, grads, scale, expert_twins, names=set(adapter.split(model, grads))) + rows
    for p in small:
        p.requires_grad_(False)
        p.grad = None
    experts = symmetry.exchangeable_experts(model, _disk_roles(off), min_divergence) if expert_twins else []
    return symmetry_check(model, None, scale, expert_twins=expert_twins, min_divergence=min_divergence, rows=rows,
                          experts=experts)


def _disk_roles(off: OffloadedModel):
    """role name -> its tensor read from the checkpoint, one parameter held at a time (the
    parts of a fused one come from one read)."""
    held: dict[str, dict[str, torch.Tensor]] = {}

    def get(role: str) -> torch.Tensor:
        m = PART.match(role)
        name = m.group(1) if m else role
        if name not in held:
            held.clear()
            if name not in off.held_of:
                raise ValueError(f"the checkpoint lacks {name!r}")
            w = off._load(off.held_of[name])[name]
            held[name] = off.adapter.split(off.model, {name: w})
        return held[name][role]

    return get


def _denoised_identity(src, dst, probe, records, device, scale_factor, tolerance, scale: int):
    """explain_noise's measurement, layerwise: the clone deviations of every noisy tensor of
    DST and the functional-identity check with them averaged out (a second forward pass of
    both checkpoints, run only when a check failed)."""
    old, quiet = OffloadedModel(src, device), OffloadedModel(dst, device)
    try:
        quiet.denoise_scale = scale
        if records is not None:
            quiet.model.growth_records = noise.without_noise_record(records)
        ctx = Comparison(old.model, quiet.model, probe, scale_factor=scale_factor, tolerance=tolerance)
        ctx.old_run()
        ctx.new_run(backward=False)
        return quiet.deviations, identity_check(ctx)
    finally:
        old.close()
        quiet.close()


def run_growth_checks_layerwise(src, dst, probe: torch.Tensor, records=None, *, device: str = "cpu",
                                scale_factor: int | None = None, tolerance: float | None = None,
                                min_divergence: float = 1e-6) -> GrowthReport:
    """The four checks and the sanity check on two checkpoints, one weight at a time.

    The checks on the stored forward passes (RoPE, routers, functional identity) run
    first, and the passes are dropped before the symmetry check's backward pass, which
    holds one decoder layer; the report lists the checks in the usual order.
    """
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
        identity = identity_check(ctx)
        scale = ctx.twin_scale
        seconds: dict = {}
        meta = _meta(ctx, torch.device(device), seconds)
        del ctx  # the stored activations of both models' forward passes
        release_freed_memory()
        expert_twins = has_upcycled_experts(new.model)
        if scale <= 1 and not expert_twins:
            checks.append(CheckResult(symmetry.NAME, symmetry.TITLE, SKIPPED,
                                      "not widened (scale 1) and no upcycled experts: no clones",
                                      min_divergence, symmetry.RULE))
        else:
            checks.append(layerwise_symmetry(new, probe, scale, expert_twins, min_divergence))
        noise.explain_noise(checks + [identity], new.model, lambda s: _denoised_identity(
            src, dst, probe, records, device, scale_factor, tolerance, s), scale)
        checks.append(identity)
        checks.append(quick_sanity_check(new.model, probe))
        seconds["total"] = time.perf_counter() - t0
        meta["mode"] = "layerwise (one weight of each model in memory at a time)"
        return GrowthReport("Growth verification", checks, meta)
    finally:
        old.close()
        new.close()
