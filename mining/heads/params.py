"""Parameter checking shared by all heads.

The harness builds heads from TOML as ``HEADS[name](embedding_dim, num_classes, **params)``, so a
misspelt key must fail with a ValueError that names the valid keys, not with Python's TypeError
about an "unexpected keyword argument". `CheckedParams` wraps every subclass ``__init__`` so that
this holds for every head without repeating the check in each one.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable
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


def _reject_unknown_params(init: Callable[..., None]) -> Callable[..., None]:
    signature = inspect.signature(init)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())

    @functools.wraps(init)
    def checked_init(self, *args: Any, **params: Any) -> None:
        if not accepts_any:
            valid = [
                p.name
                for p in signature.parameters.values()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
            ]
            unknown = sorted(set(params) - set(valid))
            if unknown:
                raise ValueError(
                    f"{type(self).__name__}: unknown parameter(s) {', '.join(unknown)}; "
                    f"valid parameters: {', '.join(valid)}"
                )
        init(self, *args, **params)

    return checked_init


class CheckedParams:
    """Mixin: unknown keyword arguments to any subclass constructor raise a ValueError.

    The message names the valid parameters (those of the most derived ``__init__``). A
    constructor that takes ``**params`` itself (e.g. UNPG forwarding to its base head) is left
    alone: the head it forwards to does the check.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _reject_unknown_params(cls.__init__)  # type: ignore[method-assign]
