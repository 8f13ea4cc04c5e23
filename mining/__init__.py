"""mining — a pure-torch library for hard example mining in metric learning.

Cross-batch memory (CB-HEM), in-batch and cross-batch miners, metric losses (triplet,
quadruplet, MPS), the pseudo large batch (PLB) and margin heads. Nothing here knows about files,
the CLI or the harness: use it in your own training loop. See docs/methods.md.
"""

from __future__ import annotations

from mining.heads import HEADS, make_head
from mining.losses import LOSSES
from mining.memory import CrossBatchMemory
from mining.miners import MINERS
from mining.negatives import hardest_negatives
from mining.objective import MetricObjective
from mining.plb import PseudoLargeBatch

__all__ = [  # noqa: RUF022 - grouped by topic
    "CrossBatchMemory",
    "hardest_negatives",
    "MINERS",
    "LOSSES",
    "MetricObjective",
    "PseudoLargeBatch",
    "HEADS",
    "make_head",
]
