"""Metric losses on the similarities of mined triples (docs/methods.md §4).

A loss gets :class:`TermSims` — per mined triple ``t`` the cosine similarities ``ap (T,)``,
``an (T,)`` (and ``nn (T,)``, s(n1, n2), for the quadruplet), all with gradient — and returns the
per-term losses ``(T,)``. Reduction (mean over all terms / over non-zero terms) and the CB-HEM
memory weight are applied by :class:`mining.objective.MetricObjective`. Embeddings are unit
vectors, so the squared Euclidean distance is ``d² = 2 − 2s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TermSims:
    """Similarities of the mined terms, each ``(T,)``; ``nn`` only for losses that need it."""

    ap: Tensor
    an: Tensor
    nn: Tensor | None = None


def _sq_dist(s: Tensor) -> Tensor:
    return 2.0 - 2.0 * s


def _check_margin(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


class TripletLoss:
    """Cosine triplet: ``[s(a,n) − s(a,p) + m]_+`` (default m = 0.2)."""

    needs_second_negative = False
    max_per_pair = False

    def __init__(self, margin: float = 0.2) -> None:
        self.margin = _check_margin("margin", margin)

    def __call__(self, sims: TermSims) -> Tensor:
        return torch.relu(sims.an - sims.ap + self.margin)


class TripletL2Loss(TripletLoss):
    """Squared-L2 triplet: ``[d(a,p)² − d(a,n)² + m]_+`` with ``d² = 2 − 2s``."""

    def __call__(self, sims: TermSims) -> Tensor:
        return torch.relu(_sq_dist(sims.ap) - _sq_dist(sims.an) + self.margin)


class QuadrupletLoss:
    """``[d(a,p)² − d(a,n1)² + α1]_+ + [d(a,p)² − d(n1,n2)² + α2]_+`` (α1 = 0.2, α2 = 0.1 [recon]).

    n2 ≠ n1 is a negative of another identity than both a and n1: the objective mines it as n1's
    hardest such candidate (:attr:`needs_second_negative`).
    """

    needs_second_negative = True
    max_per_pair = False

    def __init__(self, alpha1: float = 0.2, alpha2: float = 0.1) -> None:
        self.alpha1 = _check_margin("alpha1", alpha1)
        self.alpha2 = _check_margin("alpha2", alpha2)
        if self.alpha2 >= self.alpha1:
            raise ValueError(f"alpha2 must be < alpha1, got alpha1={self.alpha1}, alpha2={alpha2}")

    def __call__(self, sims: TermSims) -> Tensor:
        if sims.nn is None:
            raise ValueError("quadruplet loss needs sims.nn = s(n1, n2)")
        d_ap = _sq_dist(sims.ap)
        return torch.relu(d_ap - _sq_dist(sims.an) + self.alpha1) + torch.relu(
            d_ap - _sq_dist(sims.nn) + self.alpha2
        )


class MPSLoss(TripletLoss):
    """DocFace+ max-margin pairwise score: per genuine pair i, ``[m + h_i − S_ii]_+`` with h_i the
    hardest negative over row i and column i of the ID×spot score matrix.

    Per term it is the cosine triplet hinge; :attr:`max_per_pair` tells the objective to keep,
    per positive pair, only the larger of its two directions (ID→spot, spot→ID) — with the
    bidirectional miner that is exactly the max over the row and the column.
    """

    max_per_pair = True


LOSSES: dict[str, type] = {
    "triplet": TripletLoss,
    "triplet_l2": TripletL2Loss,
    "quadruplet": QuadrupletLoss,
    "mps": MPSLoss,
}
