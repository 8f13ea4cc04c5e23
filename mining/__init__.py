"""mining — a pure-torch library for hard example mining in metric learning.

Cross-batch memory (CB-HEM), in-batch and cross-batch miners, metric losses (triplet,
quadruplet, MPS), the pseudo large batch (PLB) and margin heads. Nothing here knows about files,
the CLI or the harness: use it in your own training loop.

Names are imported lazily so that ``import mining`` stays cheap and one module's import error
does not hide the others.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [  # noqa: RUF022 - grouped by topic
    "CrossBatchMemory",
    "hardest_negatives",
    "MINERS",
    "LOSSES",
    "MetricObjective",
    "PseudoLargeBatch",
    "HEADS",
]

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "CrossBatchMemory": "mining.memory",
    "hardest_negatives": "mining.negatives",
    "MINERS": "mining.miners",
    "LOSSES": "mining.losses",
    "MetricObjective": "mining.objective",
    "PseudoLargeBatch": "mining.plb",
    "HEADS": "mining.heads",
}


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'mining' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
