"""From mined terms to the loss and its statistics, through additive sums (docs/methods.md §2, §4).

One call of :class:`mining.objective.MetricObjective` mines terms t with losses ℓ_t; T_b are the
terms whose negative is a batch row, T_m those whose negative came from the memory, and

    L = L_batch + w · L_mem,   L_batch = Σ_{t∈T_b} ℓ_t / D,   L_mem = Σ_{t∈T_m} ℓ_t / D

with D the number of terms (``mean_all``) or of terms with ℓ_t > 0 (``mean_nonzero``).
Everything D and ``last_stats`` need is a sum over terms (:data:`SUMS`), so in data-parallel
training, where each rank holds the terms of its own anchors, the ranks' sums add up to the
single process's: one all-reduce of a ``(len(SUMS),)`` vector gives every rank the global D and
statistics, and each rank's L_r (its terms over the global D) satisfies Σ_r L_r = L.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SUMS = ("terms", "active", "from_memory", "age", "active_anchors", "batch", "memory", "straddling")
"""Order of :func:`term_sums`: number of terms, of active terms (ℓ > 0), of memory negatives;
the summed age of the memory negatives; the number of anchors with an active term; Σ ℓ over
T_b and over T_m; "straddling": terms that need a row's other direction on another rank
(see :meth:`mining.objective.MetricObjective.local_loss`)."""


@dataclass(frozen=True)
class Terms:
    """The mined terms of one call, each ``(T,)``: ``anchor`` and ``negative`` (indices as in
    :class:`mining.miners.Mined`) and ``term`` (ℓ_t, with gradient); ``f (N, d)`` is the
    normalised batch (with gradient), ``ages (T_m,)`` the ages of the memory negatives."""

    f: Tensor
    anchor: Tensor
    negative: Tensor
    term: Tensor
    ages: Tensor
    straddling: int = 0


def term_sums(t: Terms) -> Tensor:
    """``(len(SUMS),) float64``: the additive counts and sums of the terms, in :data:`SUMS`
    order (anchors are disjoint across ranks, so even the count of active anchors adds up)."""
    from_memory = t.negative >= t.f.shape[0]
    term = t.term.detach()
    active = term > 0
    values = [
        term.numel(),
        active.sum(),
        from_memory.sum(),
        t.ages.sum(),
        t.anchor[active].unique().numel(),
        term[~from_memory].sum(),
        term[from_memory].sum(),
        t.straddling,
    ]
    return torch.stack([torch.as_tensor(v, device=term.device).to(torch.float64) for v in values])


def denominator(sums: Tensor, reduction: str) -> int:
    """D of the reduction: all terms (``mean_all``) or those with ℓ > 0 (``mean_nonzero``)."""
    return int(sums[SUMS.index("terms" if reduction == "mean_all" else "active")])


def reduced_loss(t: Terms, count: int, memory_weight: float) -> Tensor:
    """L_batch + w·L_mem of the terms ``t`` over the denominator D = ``count``."""
    from_memory = t.negative >= t.f.shape[0]
    if count == 0:
        return t.f.sum() * 0.0  # keeps the graph connected: an all-zero gradient, never NaN
    loss_batch = t.term[~from_memory].sum() / count
    loss_mem = t.term[from_memory].sum() / count
    return loss_batch + memory_weight * loss_mem


def last_stats(sums: Tensor, num_batch: int, count: int) -> dict[str, float]:
    """``last_stats`` of :class:`mining.objective.MetricObjective` from the sums of every term
    of the batch (all ranks' under data parallelism) and D = ``count``."""
    terms, _, from_memory, age, anchors, batch, memory, _ = sums.tolist()
    return {
        "memory_share": from_memory / terms if terms else 0.0,
        "neg_age": age / from_memory if from_memory else math.nan,
        "active_frac": anchors / num_batch if num_batch else 0.0,
        "num_terms": terms,
        "loss_batch": batch / count if count else 0.0,
        "loss_mem": memory / count if count else 0.0,
    }
