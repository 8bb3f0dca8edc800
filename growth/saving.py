"""Grown checkpoints that carry their growth records and check report.

``save_grown(model, d, report)`` writes what ``model.save_pretrained(d)`` writes (or, for
growkit's reference model, ``growkit.models.save_model``), plus

* ``growth.json``: the growth records (where every tensor came from, the layer map) and,
  when given, the check report; JSON only, never pickle;
* ``README.md``: a model card with a "Growth" section saying how the model was grown and
  which checks passed (an existing card of the source is not copied).

Everything is written into a temporary directory beside ``d`` and renamed into place at
the end, so an interrupted save never leaves a directory that loads as a model.
``load_grown(d)`` loads the model (``AutoModelForCausalLM.from_pretrained``) and attaches
the records, so the checks pair layers from them instead of inferring the pairing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from growkit.files import _umask, atomic_write_text, read_json

from .adapters import get_adapter
from .records import GrowthRecord, attach_records

GROWTH_FILE = "growth.json"
CARD_FILE = "README.md"
FORMAT = "growkit-growth/1"
# growth.json holds one record per tensor and step: generous, but bounded before parsing
MAX_GROWTH_FILE_BYTES = 256 * 2**20


def _report_dict(report) -> dict | None:
    if report is None:
        return None
    if isinstance(report, dict):
        return report
    if hasattr(report, "to_json"):
        return json.loads(report.to_json())
    raise TypeError(f"report must be a GrowthReport, a CheckResult or a dict, got {type(report).__name__}")


def _card(model_class: str, family: str, records: list[GrowthRecord], report: dict | None) -> str:
    lines = [
        "---",
        "tags:",
        "- growkit",
        "- model-growth",
        "---",
        "",
        f"# {model_class} grown with growkit",
        "",
        "## Growth",
        "",
        f"Family `{family}`. Steps, in order:",
        "",
    ]
    for i, r in enumerate(records, 1):
        kind = "function-preserving" if r.function_preserving else "changes the function by design"
        settings = ", ".join(f"{k}={v}" for k, v in r.settings.items())
        lines.append(f"{i}. `{r.op}` ({settings}): {kind}.")
        lines += [f"   {n}" for n in r.notes]
    lines.append("")
    if report is None:
        lines.append("No check report was saved with this model: run `growkit.verify.run_growth_checks` on it.")
    else:
        checks = report.get("checks", [])
        verdict = "passed" if report.get("passed") else "FAILED"
        lines.append(f"Growth checks {verdict} (growkit.verify):")
        lines.append("")
        lines.append("| check | status | summary |")
        lines.append("|---|---|---|")
        for c in checks:
            summary = str(c.get("summary", "")).replace("|", "/")
            lines.append(f"| {c.get('title', c.get('name'))} | {c.get('status')} | {summary} |")
    lines += ["", f"`{GROWTH_FILE}` holds where every tensor came from; `growkit.growth.load_grown` reads it back.", ""]
    return "\n".join(lines)


def write_growth_files(directory: Path, family: str, model_class: str, records: list[GrowthRecord], report=None) -> None:
    """Write ``growth.json`` and the model card into a checkpoint directory."""
    report_dict = _report_dict(report)
    payload = dict(format=FORMAT, family=family, model_class=model_class,
                   records=[r.to_dict() for r in records], report=report_dict)
    atomic_write_text(Path(directory) / GROWTH_FILE, json.dumps(payload, indent=1, allow_nan=True))
    atomic_write_text(Path(directory) / CARD_FILE, _card(model_class, family, records, report_dict))


def update_report(directory: str | os.PathLike, report) -> None:
    """Store a check report in a saved checkpoint's ``growth.json`` and model card."""
    data = read_growth_file(directory)
    records = _records(data)
    write_growth_files(Path(directory), data["family"], data.get("model_class", "?"), records, report)


def save_grown(
    model: nn.Module,
    directory: str | os.PathLike,
    report=None,
    *,
    overwrite: bool = False,
    **save_kwargs,
) -> Path:
    """Save a grown model with its growth records (and check report) in ``directory``.

    Args:
        model: a model returned by a growkit growth operator (it carries ``growth_records``).
        directory: the checkpoint directory to create.
        report: optional ``GrowthReport`` / ``CheckResult`` (or its dict) to store beside it.
        overwrite: replace an existing non-empty ``directory`` (refused otherwise).
        save_kwargs: passed to ``save_pretrained`` (e.g. ``max_shard_size="2GB"``).

    Returns:
        The directory.
    """
    records = getattr(model, "growth_records", None)
    if not records:
        raise ValueError("model has no growth_records: save_grown takes a model a growkit growth operator returned")
    adapter = get_adapter(model, "saving")
    report_dict = _report_dict(report)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory {str(directory)!r} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise ValueError(f"directory {str(directory)!r} is not empty: pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        if adapter.is_hf:
            model.save_pretrained(tmp, **save_kwargs)
        else:
            from growkit.models import save_model

            save_model(model, tmp)
        write_growth_files(tmp, adapter.name, type(model).__name__, records, report_dict)
        publish_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def publish_directory(tmp: Path, final: Path) -> None:
    """Move a finished directory into place (replacing ``final``, which must be allowed by
    the caller): a reader sees the old directory or the new one, never a partial one."""
    os.chmod(tmp, 0o777 & ~_umask())
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, old / "d")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def read_growth_file(directory: str | os.PathLike) -> dict:
    """The parsed ``growth.json`` of a checkpoint (ValueError when missing or malformed)."""
    path = Path(directory) / GROWTH_FILE
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} has no {GROWTH_FILE}: it was not saved by growkit.growth.save_grown")
    data = read_json(path, MAX_GROWTH_FILE_BYTES, "a growth file")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("records"), list):
        raise ValueError(f"{path} is not a {FORMAT} file")
    return data


def load_growth_records(directory: str | os.PathLike) -> list[GrowthRecord]:
    """The growth records saved with a checkpoint."""
    return _records(read_growth_file(directory))


def _records(data: dict) -> list[GrowthRecord]:
    return [GrowthRecord.from_dict(r) for r in data["records"]]


def load_grown(directory: str | os.PathLike, **load_kwargs) -> nn.Module:
    """Load a checkpoint written by :func:`save_grown`, with ``growth_records`` attached.

    ``load_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype=``), or
    to ``growkit.models.load_model`` for the reference model.
    """
    data = read_growth_file(directory)
    records = _records(data)
    if data.get("family") == "growkit-reference":
        from growkit.models import load_model

        model = load_model(directory, **load_kwargs)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(directory, **load_kwargs)
    attach_records(model, records)
    return model
