"""The argument checks of growkit's public API, in one place and one wording.

Every public function checks its arguments once, where they enter, with these helpers, and
then calls unchecked internals: a value is never re-checked on its way down. Each helper
returns the value normalized (``int``, ``float``, ``str``) or raises before anything is
allocated, with a message that names the argument, what is accepted and what was given:

- :class:`ArgumentKindError`: the kind of value is wrong (a string, a bool where a number
  belongs, a fraction where a whole number belongs). It is both a ``TypeError`` and a
  ``ValueError`` (as NumPy's ``AxisError`` is both a ``ValueError`` and an ``IndexError``),
  so a caller that catches either sees it;
- ``ValueError``: the kind is right but the value is out of range.

``bool`` is refused wherever a number belongs (``True`` is an ``int`` to Python, and
``noise_std=True`` is always a mistake). NumPy scalars are accepted.

This module imports nothing of growkit's, so every layer (kernels, models, growth, verify,
train) can use it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

__all__ = ["ArgumentKindError", "choice", "flag", "real_number", "seed", "whole_number"]

SEED_LIMIT = 2**64


class ArgumentKindError(TypeError, ValueError):
    """An argument of the wrong kind (a TypeError that is also a ValueError)."""


def _hint(hint: str) -> str:
    return f" ({hint})" if hint else ""


def whole_number(value, name: str, *, min: int | None = None, max: int | None = None, hint: str = "") -> int:
    """``value`` as an ``int`` in ``[min, max]``; whole floats (``2.0``) are accepted.

    Raises:
        ArgumentKindError: a bool, a non-number, or a fraction (``1.5``).
        ValueError: out of ``[min, max]``.
    """
    want = "a whole number" + (f" >= {min}" if min is not None else "") + (f" <= {max}" if max is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentKindError(f"{name} must be {want}{_hint(hint)}, got {value!r}")
    if not isinstance(value, numbers.Integral):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise ArgumentKindError(f"{name} must be {want}{_hint(hint)}, got {value!r}")
    value = int(value)
    if (min is not None and value < min) or (max is not None and value > max):
        raise ValueError(f"{name} must be {want}{_hint(hint)}, got {value}")
    return value


def real_number(value, name: str, *, min: float | None = None, max: float | None = None,
                above: float | None = None, below: float | None = None, hint: str = "") -> float:
    """``value`` as a finite ``float`` with ``min <= value <= max``, ``value > above`` and
    ``value < below``.

    Raises:
        ArgumentKindError: a bool or a non-number.
        ValueError: NaN, infinite, or out of range.
    """
    parts = [f">= {min}" if min is not None else "", f"> {above}" if above is not None else "",
             f"<= {max}" if max is not None else "", f"< {below}" if below is not None else ""]
    want = "a finite number " + " and ".join(p for p in parts if p) if any(parts) else "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentKindError(f"{name} must be {want.rstrip()}{_hint(hint)}, got {value!r}")
    value = float(value)
    if (not math.isfinite(value) or (min is not None and value < min) or (max is not None and value > max)
            or (above is not None and value <= above) or (below is not None and value >= below)):
        raise ValueError(f"{name} must be {want.rstrip()}{_hint(hint)}, got {value!r}")
    return value


def flag(value, name: str) -> bool:
    """``value`` if it is a ``bool`` (``1`` or ``"yes"`` are refused: ArgumentKindError)."""
    if not isinstance(value, bool):
        raise ArgumentKindError(f"{name} must be true or false, got {value!r}")
    return value


def seed(value, name: str = "seed") -> int:
    """A random seed: a whole number in ``[0, 2**64)`` (bools and fractions refused:
    ArgumentKindError; out of range: ValueError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentKindError(f"{name} must be a whole number in [0, 2**64), got {value!r}")
    value = int(value)
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name} must be a whole number in [0, 2**64), got {value}")
    return value


def choice(value, name: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices`` (strings); ValueError listing them otherwise."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value
