"""Mining rules over the current batch ∪ a cross-batch memory (docs/methods.md §2).

A miner sees :class:`Candidates` (detached, L2-normalised embeddings of the batch and of the
memory, :mod:`mining.candidates`) and returns :class:`Mined` index triples ``(anchor, positive,
negative)``: anchors and positives are batch rows, and a negative ``n`` is batch row ``n`` when
``n < B`` and memory row ``n - B`` otherwise. Losses recompute the similarities of the mined
triples with gradient, so a miner never builds a graph. Triplets are never enumerated: every rule
is a chunked GEMM scan (:mod:`mining.negatives`).

Anchors are the rows of ``cands.anchor_rows`` (every batch row by default). Under an anchor
subset a rule scans only the subset's rows against all candidates and returns exactly the
triples it returns without a subset whose anchor lies in the subset (global batch indices).

Positive (all rules): the least similar other batch sample of the same identity ("batch-hard"
positive). In an IvS batch (two images per identity) it is the pair partner. A memory entry of
the anchor's identity is never a negative (labels are compared), nor is it used as a positive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .candidates import Candidates, hardest_positives

__all__ = [
    "MINERS",
    "BatchHardMiner",
    "BidirectionalMiner",
    "Candidates",
    "Mined",
    "RandomMiner",
    "SemiHardMiner",
    "ThresholdMiner",
    "TopKMiner",
    "hardest_positives",
    "ivs_domains",
    "occurrence_rank",
]


@dataclass(frozen=True)
class Mined:
    """Index triples, each ``(T,)`` int64; see the module docstring for the negative's index."""

    anchor: Tensor
    positive: Tensor
    negative: Tensor

    def __len__(self) -> int:
        return self.anchor.shape[0]


def occurrence_rank(labels: Tensor) -> Tensor:
    """``(B,)``: how many earlier rows share each row's label (0 for the first occurrence).

    O(B log B): a stable sort groups equal labels in row order, so a row's rank is its position
    within its group.
    """
    order = torch.sort(labels, stable=True).indices
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    group_start = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(labels.shape[0], device=labels.device) - group_start
    return rank


def ivs_domains(labels: Tensor) -> Tensor:
    """``(B,) int8`` IvS domain of each batch row by the order rule: the first row of an
    identity is its ID photo (domain 0), any later row a spot photo (domain 1)."""
    return (occurrence_rank(labels) > 0).to(torch.int8)


def _triples(anchor: Tensor, positive: Tensor, negative: Tensor) -> Mined:
    """Keep the triples whose positive and negative both exist."""
    keep = (positive >= 0) & (negative >= 0)
    return Mined(anchor[keep], positive[keep], negative[keep])


def _anchor_index(cands: Candidates) -> Tensor:
    """``(A,)`` batch rows of the anchors (global rows under an anchor subset)."""
    rows = cands.anchor_slice
    return torch.arange(rows.start, rows.stop, device=cands.batch.device)


def _per_anchor(cands: Candidates, pos: Tensor, neg: Tensor) -> Mined:
    """Triples from per-anchor positives ``(A,)`` and negatives ``(A, k)``."""
    rows = _anchor_index(cands)[:, None].expand_as(neg)
    return _triples(rows.reshape(-1), pos[:, None].expand_as(neg).reshape(-1), neg.reshape(-1))


class BatchHardMiner:
    """Hardest positive and hardest negative (max similarity) per anchor."""

    def __call__(self, cands: Candidates) -> Mined:
        _, pos = cands.positives()
        _, neg = cands.hardest(cands.anchors, cands.anchor_labels, 1)
        return _per_anchor(cands, pos, neg)


class TopKMiner:
    """Hardest positive and the ``k`` hardest negatives per anchor (k triples per anchor)."""

    def __init__(self, k: int = 5) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        self.k = k

    def __call__(self, cands: Candidates) -> Mined:
        _, pos = cands.positives()
        _, neg = cands.hardest(cands.anchors, cands.anchor_labels, self.k)
        return _per_anchor(cands, pos, neg)


class SemiHardMiner:
    """Hardest negative that is still less similar than the positive: max s(a,n) s.t.
    s(a,n) < s(a,p) (FaceNet's semi-hard; avoids collapse from the very hardest negatives)."""

    def __call__(self, cands: Candidates) -> Mined:
        s_ap, pos = cands.positives()
        _, neg = cands.hardest(cands.anchors, cands.anchor_labels, 1, below=s_ap)
        return _per_anchor(cands, pos, neg)


class ThresholdMiner:
    """Every negative within the margin: all n with s(a,n) > s(a,p) − margin (the triples
    with a non-zero cosine triplet loss)."""

    def __init__(self, margin: float = 0.2) -> None:
        self.margin = float(margin)

    def __call__(self, cands: Candidates) -> Mined:
        s_ap, pos = cands.positives()
        has_pos = pos >= 0
        lower = torch.where(has_pos, s_ap - self.margin, torch.full_like(s_ap, float("inf")))
        anchor, neg = cands.within(cands.anchors, cands.anchor_labels, lower)
        return _triples(anchor + cands.anchor_slice.start, pos[anchor], neg)


class RandomMiner:
    """Control: hardest positive and ``k`` negatives drawn uniformly (without replacement)
    from batch ∪ memory. ``seed`` makes a call reproducible: the objective reseeds per step so
    that repeated calls within one step mine the same negatives.

    The draws are made for every batch row whatever the anchor subset (the generator's stream
    is laid out by anchor row), and the anchors' rows are kept: an anchor gets the negatives it
    gets without a subset. Drawing is a label compare per candidate, no GEMM.
    """

    def __init__(self, k: int = 1, seed: int = 0) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        self.k = k
        self.seed = seed

    def __call__(self, cands: Candidates) -> Mined:
        _, pos = cands.positives()
        gen = torch.Generator(device=cands.batch.device).manual_seed(self.seed)
        _, neg = cands.random(cands.batch_labels, self.k, gen)
        return _per_anchor(cands, pos, neg[cands.anchor_slice])


class BidirectionalMiner:
    """IvS rule (DocFace+ MPS style): ID anchors take their hardest negative among spot photos,
    spot anchors among ID photos; the positive is the pair partner.

    Domain of a batch row = :func:`ivs_domains` of the whole batch (first row of an identity =
    ID photo; under an anchor subset too, so that a row's domain does not depend on which rows
    are anchors). Memory rows are offered by :meth:`Candidates.for_anchor_domain`: rows of the
    anchor's own domain are never candidates; rows of unknown domain (-1, or no
    ``memory_domains``) are candidates for both directions.
    """

    def __call__(self, cands: Candidates) -> Mined:
        _, pos = cands.positives()
        domains = ivs_domains(cands.batch_labels)
        anchor_rows = _anchor_index(cands)
        neg = torch.full_like(pos, -1)
        for domain in (0, 1):
            is_anchor = domains[anchor_rows] == domain
            anchors = anchor_rows[is_anchor]
            other = (domains != domain).nonzero(as_tuple=True)[0]
            _, n = cands.for_anchor_domain(domain).hardest(
                cands.batch[anchors], cands.batch_labels[anchors], 1, batch_rows=other
            )
            neg[is_anchor] = n[:, 0]
        return _triples(anchor_rows, pos, neg)


MINERS: dict[str, type] = {
    "batch_hard": BatchHardMiner,
    "top_k": TopKMiner,
    "semi_hard": SemiHardMiner,
    "threshold": ThresholdMiner,
    "random": RandomMiner,
    "bidirectional": BidirectionalMiner,
}
