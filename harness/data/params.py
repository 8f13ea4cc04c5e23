"""Validation of the `[data]` table: defaults, unknown keys, ranges and choices.

Every error is a ValueError naming the key (`data.<key>`) and what is allowed, so that a bad
suite fails before anything runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def resolve(kind: str, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`defaults` overridden by `given` (without `kind`); unknown keys raise ValueError."""
    unknown = sorted(set(given) - set(defaults) - {"kind"})
    if unknown:
        raise ValueError(
            f"unknown key(s) for data kind {kind!r}: {', '.join('data.' + k for k in unknown)}; "
            f"allowed: {', '.join(sorted(defaults))}"
        )
    out = dict(defaults)
    out.update({k: v for k, v in given.items() if k != "kind"})
    return out


def check_int(p: Mapping[str, Any], key: str, low: int, high: int | None = None) -> int:
    """p[key] as an int in [low, high] (high None = unbounded)."""
    v = p[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
        bound = f"[{low}, {high}]" if high is not None else f"≥ {low}"
        raise ValueError(f"data.{key} must be an integer {bound}; got {v!r}")
    return v


def check_float(p: Mapping[str, Any], key: str, low: float, high: float | None = None) -> float:
    """p[key] as a float in [low, high] (high None = unbounded)."""
    v = p[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"data.{key} must be a number; got {v!r}")
    if v < low or (high is not None and v > high):
        bound = f"[{low}, {high}]" if high is not None else f"≥ {low}"
        raise ValueError(f"data.{key} must be in {bound}; got {v!r}")
    return float(v)


def check_choice(p: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    """p[key] as one of `allowed`."""
    v = p[key]
    if v not in allowed:
        raise ValueError(f"data.{key} must be one of {', '.join(map(repr, allowed))}; got {v!r}")
    return v
