"""Files written atomically: the one writer every part of growkit uses.

A reader never sees a half-written file: each file is written to a temporary file in the
destination folder and moved into place with ``os.replace`` (atomic within a filesystem),
after an fsync. The ground floor of the package: it imports nothing from growkit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import tempfile
from typing import Callable

__all__ = ["atomic_write", "atomic_write_text", "read_json"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp)`` for a temporary file beside ``path``, then renames it to ``path``.

    The one atomic writer of the project (checkpoints, reports, tokenizers, benchmark
    results). The temporary file is in the destination folder because ``os.replace`` is
    atomic only within one filesystem; it is fsynced before the rename so a power loss
    cannot leave an empty file under the final name.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file 0600 (and a writer may recreate it): give the result
        # the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def read_json(path: str | os.PathLike, max_bytes: int, what: str):
    """Parse a JSON file no larger than ``max_bytes`` (a size read from disk is bounded by
    what is really there); ValueError naming the file otherwise. ``what`` names the kind
    of file the message says it is not."""
    path = Path(path)
    if path.stat().st_size > max_bytes:
        raise ValueError(f"{path} is larger than {max_bytes} bytes: not {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
