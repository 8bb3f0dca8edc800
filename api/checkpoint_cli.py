"""``growkit grow`` and ``growkit verify``: grow Hugging Face checkpoints on disk, and check them.

    growkit grow SRC DST --width 2 --depth 4                  # x2 wider, 4 identity layers
    growkit grow SRC DST --moe 8 --top-k 2                    # upcycle to the MoE sibling
    growkit grow SRC DST --config recipe.yaml --plan          # what would be written
    growkit verify SRC DST --json report.json                 # exit 0 pass, 1 fail, 2 bad input

Settings come from :class:`GrowArgs` / :class:`VerifyArgs` through tyro: defaults, then a
YAML/JSON recipe (``--config``, keys = option names; an unknown key is an error), then flags. Several
operations in one run apply in the order upcycle, widen, deepen, as the pipeline does
(dense -> MoE -> wider and deeper); the output is bitwise the in-memory result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Literal, Optional, Sequence

UNSET = Path("\0unset")  # a positional the user must give (here or in the recipe)


def tyro_positional(t):
    """``tyro.conf.Positional[t]`` when tyro is installed (it is the cli extra)."""
    try:
        import tyro

        return tyro.conf.Positional[t]
    except ImportError:  # pragma: no cover - `run` says how to install it
        return t

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
# Probe text when the checkpoint has a tokenizer and no --probe-text is given.
SAMPLE_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
    "One day, she saw a big red ball in the park. She ran to get it, but a dog took it first. "
    "Lily was sad, but then the dog brought the ball back and they played together all day."
)


class BadInput(ValueError):
    """A user error: printed as one line, exit status 2."""


@dataclasses.dataclass
class GrowArgs:
    """Grow the Hugging Face checkpoint SRC into DST, tensor by tensor (bitwise the in-memory result)."""

    src: tyro_positional(Path) = UNSET
    """checkpoint directory (config.json + safetensors, sharded or not)"""
    dst: tyro_positional(Path) = UNSET
    """output directory (written under a temporary name, renamed into place at the end)"""
    width: int = 1
    """width multiple (HyperCloning); 1 keeps the width"""
    depth: int = 0
    """layers to add, like extra_layers"""
    depth_mode: Literal["identity", "stack"] = "identity"
    """identity (function-preserving) or stack (G_stack)"""
    positions: Optional[list[int]] = None
    """source layers after which the new layers go (default: spread evenly)"""
    stack_scale: Optional[float] = None
    """depth_mode stack only: the copies' residual writers times this, in [0, 1] (default 1; 0: identity layers)"""
    moe: int = 0
    """experts per layer to upcycle the dense MLPs into (0: no upcycling)"""
    top_k: int = 2
    """experts per token after upcycling"""
    router_std: float = 0.02
    """std of the fresh routers"""
    moe_layers: Optional[str] = None
    """which layers to upcycle (default: every layer): every:K (layer i iff (i+1) % K == 0),
    first:N, last:N, or indices such as 0,2,5; only into a family that can express it
    (qwen2 -> qwen2_moe, qwen3 -> qwen3_moe)"""
    router_init: Literal["normal", "orthogonal", "zero", "hidden_pca"] = "normal"
    """normal (N(0, router_std^2)), orthogonal or zero; hidden_pca needs a forward pass of the
    model and is only in Python (upcycle_to_moe)"""
    moe_reinit: float = 0.0
    """Drop-Upcycling: the share in [0, 1] of each expert's FFN units re-drawn from the dense
    weights' mean and std, a different set per expert (not function-preserving by design:
    growkit verify reports the drift, it does not judge it; 0: exact)"""
    noise_std: float = 1e-5
    """zero-sum symmetry-breaking noise of the width step"""
    noise: Literal["zero_sum", "independent"] = "zero_sum"
    """zero_sum (function-preserving) or independent"""
    seed: int = 0
    """noise and router seed"""
    dtype: Literal["keep", "float32", "bfloat16", "float16"] = "keep"
    """cast the weights (keep: as stored)"""
    max_shard_size: str = "5GB"
    """largest output shard, e.g. 5GB or 500MB"""
    device: Literal["cpu", "cuda"] = "cpu"
    """where tensors are grown (cuda: the Triton kernels)"""
    plan: bool = False
    """print what would be written (shapes, counts, bytes, peak memory) and write nothing"""
    overwrite: bool = False
    """replace an existing DST"""
    progress: bool = True
    """show a progress bar over bytes"""


def grow(args: GrowArgs) -> int:
    """``growkit grow``: see :class:`GrowArgs`."""
    src, dst, width, depth, depth_mode, positions = args.src, args.dst, args.width, args.depth, args.depth_mode, args.positions
    moe, top_k, router_std, noise_std, noise, seed = args.moe, args.top_k, args.router_std, args.noise_std, args.noise, args.seed
    dtype, max_shard_size, device, plan, overwrite, progress = (
        args.dtype, args.max_shard_size, args.device, args.plan, args.overwrite, args.progress)
    import torch

    from growkit.growth.depth import check_depth_args, check_stack_scale, plan_depth
    from growkit.growth.moe import check_expert_reinit, check_moe_args, plan_moe, resolve_moe_layers, target_adapter
    from growkit.growth.stream import grow_checkpoint
    from growkit.growth.width import check_width_args, plan_width

    # width 1 means "no width growth"
    _, noise_std, seed = check_width_args(None if width == 1 else width, noise_std, noise, seed, scale_name="width",
                                          optional=True)
    stack_scale = check_stack_scale(args.stack_scale, depth_mode, mode_name="depth_mode")
    moe_layers, router_init = args.moe_layers, args.router_init
    if router_init == "hidden_pca":
        raise BadInput("--router-init hidden_pca needs a forward pass of the dense model on calibration tokens, "
                       "which growkit grow (tensor by tensor, never the whole model) does not run: use "
                       "upcycle_to_moe(model, ..., router_init='hidden_pca', calibration=ids) in Python, then "
                       "growkit.growth.save_grown; here choose normal, orthogonal or zero")
    if moe:
        moe, top_k, router_std, _, _ = check_moe_args(moe, top_k, router_std, 0.0, seed, True, router_init=router_init)
        moe_reinit = check_expert_reinit(args.moe_reinit, "moe_reinit")
    elif moe_layers is not None or router_init != "normal" or args.moe_reinit != 0:
        raise BadInput("--moe-layers, --router-init and --moe-reinit apply to upcycling: give --moe E as well")
    if width == 1 and depth == 0 and not moe:
        raise BadInput("nothing to do: give --width S (>= 2), --depth N (>= 1) or --moe E")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: CUDA is not available here; use --device cpu")

    source_family = []

    def make_plans(adapter, config, specs, tied):
        source_family.append(adapter.name)
        plans = []
        if moe:
            target = target_adapter(adapter)
            if adapter.is_moe(config):
                raise BadInput("--moe: SRC is already a mixture of experts")
            always = "renormalized_topk" in target.family.quirks
            chosen = resolve_moe_layers(adapter, target, config, moe_layers, moe, router_init, name="moe_layers")
            plans.append(plan_moe(adapter, target, config, specs, tied, moe, top_k, router_std=router_std,
                                  expert_noise_std=0.0, seed=seed, norm_topk_prob=True if always or target.has("norm_topk_prob") else False,
                                  layers=None if moe_layers is None else chosen, router_init=router_init,
                                  expert_reinit=moe_reinit))
            adapter, config, specs, tied = target, plans[-1].config, plans[-1].specs(), plans[-1].tied
        if width != 1:
            plans.append(plan_width(adapter, config, specs, tied, width, noise_std=noise_std, noise=noise, seed=seed))
            config, specs, tied = plans[-1].config, plans[-1].specs(), plans[-1].tied
        if depth:
            n_layers = int(adapter.cfg(config, "n_layers"))
            pos = check_depth_args(depth, depth_mode, positions, n_layers, mode_name="depth_mode")
            plans.append(plan_depth(adapter, config, specs, tied, depth, depth_mode, pos, stack_scale))
        return plans

    torch_dtype = None if dtype == "keep" else getattr(torch, DTYPES[dtype])
    plans, outputs, est, seconds = grow_checkpoint(
        src, dst, make_plans, dtype=torch_dtype, device=device, max_shard_size=max_shard_size,
        overwrite=overwrite, dry_run=plan, progress=progress and not plan)
    if plan:
        print(render_plan(plans, outputs, est, source_family[0]))
        return EXIT_OK
    gb = est.bytes_out / 1e9
    print(f"grew {src} -> {dst}: {est.params_in / 1e6:.1f}M -> {est.params_out / 1e6:.1f}M parameters, "
          f"{gb:.3f} GB in {seconds:.1f} s ({gb / max(seconds, 1e-9):.2f} GB/s); "
          + "; ".join(p.record.summary() for p in plans))
    print(f"check it: growkit verify {src} {dst}")
    return EXIT_OK


def render_plan(plans, outputs, est, source_family: str) -> str:
    from growkit.growth.adapters import PART

    lines = ["steps: " + "; ".join(p.record.summary() for p in plans), ""]
    sources = {}
    for p in plans:
        for name, t in p.tensors.items():
            sources.setdefault(name, t.source)
    width = max(len(o.name) for o in outputs)
    lines.append(f"{'tensor'.ljust(width)}  {'from':>22}  {'new shape':>22}  {'MB':>9}")
    for o in outputs:
        src = sources.get(o.parts[0])
        old = "-"
        if src is not None and src.name is not None:
            real = PART.match(src.name).group(1) if PART.match(src.name) else src.name
            old = src.kind + (f" {real.rsplit('.', 2)[-2]}" if real != o.name else "")
        lines.append(f"{o.name.ljust(width)}  {old:>22}  {str(list(o.spec.shape)):>22}  {o.spec.nbytes / 1e6:9.2f}")
    lines += [
        "",
        f"family: {source_family} -> {plans[-1].adapter.name}",
        f"tensors: {est.tensors}; parameters {est.params_in:,} -> {est.params_out:,}",
        f"bytes written: {est.bytes_out / 1e9:.3f} GB",
        f"estimated peak memory: {est.peak_bytes / 1e9:.3f} GB (the largest output, {est.largest}, and what it is made from)",
        f"estimated time on this disk: about {max(est.bytes_out / 0.5e9, 0.1):.0f} s at 0.5 GB/s (measure: bench/grow_checkpoint.py)",
    ]
    return "\n".join(lines)


@dataclasses.dataclass
class VerifyArgs:
    """Run the growth checks on two checkpoints: exit 0 all passed, 1 one failed, 2 bad input."""

    src: tyro_positional(Path) = UNSET
    """the source checkpoint directory"""
    dst: tyro_positional(Path) = UNSET
    """the grown checkpoint (its growth.json, when present, pairs the layers)"""
    probe_text: Optional[Path] = None
    """a text file to tokenize as the probe (default: a built-in sample text through the
    checkpoint's tokenizer, or random token ids when it has none)"""
    json: Optional[Path] = None
    """write the report as JSON here"""
    scale: Optional[int] = None
    """the expected width multiple (default: from the growth records, else the models)"""
    tolerance: Optional[float] = None
    """relative tolerance (default: by dtype)"""
    seq_len: int = 64
    """probe length in tokens"""
    batch: int = 2
    """probe rows"""
    seed: int = 0
    """seed of a random probe"""
    device: Literal["cpu", "cuda"] = "cpu"
    """where the checks run"""
    layerwise: bool = False
    """load one module's weights of each model at a time (checkpoints bigger than memory)"""
    save_report: bool = False
    """also store the report in DST's growth.json and model card"""


def verify(args: VerifyArgs) -> int:
    """``growkit verify``: see :class:`VerifyArgs`."""
    src, dst, probe_text, json_path, scale, tolerance = args.src, args.dst, args.probe_text, args.json, args.scale, args.tolerance
    seq_len, batch, seed, device, layerwise, save_report = args.seq_len, args.batch, args.seed, args.device, args.layerwise, args.save_report
    import torch

    from growkit.growth.saving import GROWTH_FILE, load_growth_records, update_report
    from growkit.growth.stream import CheckpointReader
    from growkit.files import atomic_write_text
    from growkit.verify import quick_sanity_check, run_growth_checks

    for name, d in (("SRC", src), ("DST", dst)):
        CheckpointReader(d).close()  # a clear message for a path that is not a checkpoint
    if seq_len < 2 or batch < 1:
        raise BadInput("--seq-len must be >= 2 and --batch >= 1")
    if probe_text is not None and not Path(probe_text).is_file():
        raise BadInput(f"--probe-text {str(probe_text)!r} is not a file")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: CUDA is not available here; use --device cpu")
    records = load_growth_records(dst) if (Path(dst) / GROWTH_FILE).is_file() else None
    if scale is None and records is not None:
        scale = math.prod(int(r.settings.get("scale_factor", 1)) for r in records if r.op == "width")
    probe = make_probe_ids(src, dst, probe_text, seq_len, batch, seed)
    if layerwise:
        from growkit.verify.layerwise import run_growth_checks_layerwise

        report = run_growth_checks_layerwise(src, dst, probe, records, device=device, scale_factor=scale,
                                             tolerance=tolerance)
    else:
        from transformers import AutoModelForCausalLM

        old = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager")
        new = AutoModelForCausalLM.from_pretrained(dst, attn_implementation="eager")
        if records is not None:
            new.growth_records = records
        report = run_growth_checks(old, new, probe, device=device, scale_factor=scale, tolerance=tolerance)
        report.checks.append(quick_sanity_check(new.to(device), probe.to(device)))
    print(report)
    if json_path is not None:
        atomic_write_text(json_path, report.to_json())
    if save_report:
        update_report(dst, report)
    return EXIT_OK if report.passed else EXIT_FAILED


def make_probe_ids(src: Path, dst: Path, probe_text: Path | None, seq_len: int, batch: int, seed: int):
    """[batch, seq_len] token ids: the text through the checkpoint's tokenizer, else random ids."""
    import torch
    from transformers import AutoConfig

    vocab = int(AutoConfig.from_pretrained(src).vocab_size)
    tokenizer = None
    for d in (dst, src):
        if any((Path(d) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(d)
            except Exception:  # noqa: BLE001 - a broken tokenizer: fall back to random ids
                tokenizer = None
            break
    text = Path(probe_text).read_text(encoding="utf-8", errors="replace") if probe_text else SAMPLE_TEXT
    ids = list(tokenizer(text)["input_ids"]) if tokenizer is not None else []
    if not ids:
        if probe_text is not None:
            raise BadInput(f"--probe-text {str(probe_text)!r} gives no tokens: it needs text and a "
                           "working tokenizer in DST or SRC")
        print("probe: random token ids (no usable tokenizer in DST or SRC)")
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (batch, seq_len), generator=gen)
    while len(ids) < batch * seq_len:
        ids = ids + ids
    ids = torch.tensor(ids[: batch * seq_len]).reshape(batch, seq_len)
    if int(ids.max()) >= vocab:
        raise BadInput(f"the tokenizer gives ids up to {int(ids.max())}, past the model's vocab_size {vocab}")
    return ids


def _load_recipe(argv: list[str], cls) -> tuple[dict, list[str]]:
    """Take ``--config FILE`` out of ``argv``: its keys (option names, - or _) as field values."""
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return {}, argv
    rest, path = [], None
    it = iter(argv)
    for a in it:
        if a == "--config":
            path = next(it, None)
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
    if not path or not Path(path).is_file():
        raise BadInput(f"--config {path!r} is not a file")
    text = Path(path).read_text(encoding="utf-8")
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml and json raise their own error types
        raise BadInput(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadInput(f"--config {path}: expected a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(cls)}
    recipe = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise BadInput(f"--config {path}: unknown keys {unknown}; known: {sorted(known)}")
    if any(isinstance(recipe.get(k), str) for k in ("src", "dst")):
        recipe.update({k: Path(recipe[k]) for k in ("src", "dst") if isinstance(recipe.get(k), str)})
    return recipe, rest


def run(command: str, argv: Sequence[str]) -> int:
    """``growkit grow|verify ARGS``: the exit status (2 on bad input, with one line saying why)."""
    try:
        import tyro
    except ImportError:
        print(f"growkit {command} needs the cli extra: pip install 'growkit[cli,hf]'", file=sys.stderr)
        return EXIT_BAD_INPUT
    cls, function = {"grow": (GrowArgs, grow), "verify": (VerifyArgs, verify)}[command]
    from growkit.kernels.memory import stream_friendly_malloc

    stream_friendly_malloc()  # one tensor or layer at a time: give freed memory back
    try:
        recipe, rest = _load_recipe(list(argv), cls)
        default = cls(**recipe) if recipe else None
        try:
            args = tyro.cli(cls, args=rest, default=default, prog=f"growkit {command}", description=cls.__doc__)
        except SystemExit as exc:  # tyro printed the problem (or the help)
            return EXIT_BAD_INPUT if exc.code not in (0, None) else EXIT_OK
        for name in ("src", "dst"):
            if getattr(args, name) is UNSET:
                raise BadInput(f"{name.upper()} is required: growkit {command} SRC DST [options]")
        return function(args)
    except (BadInput, ValueError, TypeError, KeyError) as exc:
        print(f"growkit {command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
