"""Plain parameter checks for the heads' constructors: each returns the value or raises a
ValueError that names the parameter and its valid range (the harness shows the message)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def check_range(
    name: str,
    value: float,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``float(value)`` if it lies in the interval, else raise a ValueError naming it.

    ``low_open`` / ``high_open`` exclude the end points. NaN and non-numbers are always rejected.
    """
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    below = x <= low if low_open else x < low
    above = x >= high if high_open else x > high
    if math.isnan(x) or below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return x


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError listing them."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def check_size(name: str, value: Any) -> int:
    """Return ``value`` if it is a positive int (bools excluded), else raise a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
