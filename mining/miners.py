"""Mining rules over the current batch ∪ a cross-batch memory (docs/methods.md §2).

A miner sees :class:`Candidates` (detached, L2-normalised embeddings of the batch and of the
memory) and returns :class:`Mined` index triples ``(anchor, positive, negative)``: anchors and
positives are batch rows, and a negative ``n`` is batch row ``n`` when ``n < B`` and memory row
``n - B`` otherwise. Losses recompute the similarities of the mined triples with gradient, so a
miner never builds a graph. Triplets are never enumerated: every rule is a chunked GEMM scan
(:mod:`mining.negatives`).

Positive (all rules): the least similar other batch sample of the same identity ("batch-hard"
positive). In an IvS batch (two images per identity) it is the pair partner. A memory entry of
the anchor's identity is never a negative (labels are compared), nor is it used as a positive.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .negatives import default_chunk, hardest_negatives, merge_topk, random_negatives


@dataclass(frozen=True)
class Mined:
    """Index triples, each ``(T,)`` int64; see the module docstring for the negative's index."""

    anchor: Tensor
    positive: Tensor
    negative: Tensor

    def __len__(self) -> int:
        return self.anchor.shape[0]


@dataclass(frozen=True)
class Candidates:
    """Detached, L2-normalised batch ``(B, d)`` and memory ``(M, d)`` with int64 labels.

    ``use_batch=False`` keeps the batch as anchors/positives but not as negatives (CB-HEM with
    the in-batch term off). ``memory_mask (M,)`` bool drops memory rows from every search (False
    = never a negative). ``memory_domains (M,)`` integer is each memory row's image domain
    (IvS: 0 = ID photo, 1 = spot photo, -1 = unknown); only :class:`BidirectionalMiner` reads it,
    through :meth:`for_anchor_domain`.
    """

    batch: Tensor
    batch_labels: Tensor
    memory: Tensor
    memory_labels: Tensor
    use_batch: bool = True
    chunk: int | None = None
    memory_mask: Tensor | None = None
    memory_domains: Tensor | None = None

    @staticmethod
    def in_batch(batch: Tensor, labels: Tensor) -> Candidates:
        empty = batch.new_zeros(0, batch.shape[1])
        return Candidates(batch, labels, empty, labels.new_zeros(0))

    def for_anchor_domain(self, domain: int) -> Candidates:
        """These candidates with the memory rows of ``domain`` masked out (rows of unknown
        domain, -1, stay): what anchors of ``domain`` may mine when only cross-domain pairs are
        compared, as in IvS verification (ID photo against spot photo)."""
        if self.memory_domains is None:
            return self
        other = self.memory_domains != domain
        return replace(
            self, memory_mask=other if self.memory_mask is None else other & self.memory_mask
        )

    @property
    def num_batch(self) -> int:
        return self.batch.shape[0]

    def _sources(self, batch_rows: Tensor | None):
        """(embeddings, labels, mask, index offset, row map) of each candidate block."""
        if self.use_batch:
            rows = batch_rows
            emb = self.batch if rows is None else self.batch[rows]
            lab = self.batch_labels if rows is None else self.batch_labels[rows]
            yield emb, lab, None, 0, rows
        yield self.memory, self.memory_labels, self.memory_mask, self.num_batch, None

    def _merged(self, search, batch_rows: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
        best_s = best_i = None
        for emb, lab, mask, offset, rows in self._sources(batch_rows):
            s, i = search(emb, lab, mask)
            mapped = i if rows is None or rows.numel() == 0 else rows[i.clamp(min=0)]
            i = torch.where(i >= 0, mapped + offset, i)
            if best_s is None:
                best_s, best_i = s, i
            else:  # batch block first: it wins ties, so an in-batch negative keeps its gradient
                best_s, best_i = merge_topk(best_s, best_i, s, i, k)
        return best_s, best_i

    def hardest(
        self,
        anchors: Tensor,
        labels: Tensor,
        k: int = 1,
        *,
        below: Tensor | None = None,
        batch_rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:func:`hardest_negatives` over batch (rows ``batch_rows`` only, if given) ∪ memory."""

        def search(emb, lab, mask):
            return hardest_negatives(
                anchors, labels, emb, lab, k, chunk=self.chunk, below=below, cand_mask=mask
            )

        return self._merged(search, batch_rows, k)

    def random(self, labels: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """:func:`random_negatives` over batch ∪ memory, uniform over the union."""

        def search(emb, lab, mask):
            return random_negatives(
                labels, lab, k, generator=generator, chunk=self.chunk, cand_mask=mask
            )

        return self._merged(search, None, k)

    def within(self, anchors: Tensor, labels: Tensor, lower: Tensor) -> tuple[Tensor, Tensor]:
        """All (anchor row, candidate index) with a different label and ``sim > lower[anchor]``.

        Output size is the number of such pairs (the active ones for a margin loss); scanned in
        chunks so that no ``(B, M)`` matrix is built.
        """
        found_a = [labels.new_zeros(0)]
        found_n = [labels.new_zeros(0)]
        for emb, lab, mask, offset, _ in self._sources(None):
            chunk = self.chunk or default_chunk(anchors.shape[0], emb.shape[0])
            for start in range(0, emb.shape[0], chunk):
                block = emb[start : start + chunk].to(anchors.dtype)
                hit = (anchors @ block.T > lower[:, None]) & (
                    labels[:, None] != lab[None, start : start + chunk]
                )
                if mask is not None:
                    hit &= mask[None, start : start + chunk]
                a, n = hit.nonzero(as_tuple=True)
                found_a.append(a)
                found_n.append(n + (start + offset))
        return torch.cat(found_a), torch.cat(found_n)

    def rows(self, index: Tensor, batch: Tensor | None = None) -> Tensor:
        """``(T, d)`` candidate embeddings for indices as in :class:`Mined` (batch or memory).

        ``batch`` replaces the detached batch (the objective passes the embeddings that carry
        the gradient); memory rows are constants cast to the batch's dtype.
        """
        batch = self.batch if batch is None else batch
        from_memory = index >= self.num_batch
        out = batch[index.clamp(max=self.num_batch - 1)]
        if from_memory.any():
            mem_rows = self.memory[(index - self.num_batch).clamp(min=0)].to(batch.dtype)
            out = torch.where(from_memory[:, None], mem_rows, out)
        return out

    def labels_of(self, index: Tensor) -> Tensor:
        """``(T,)`` labels of candidates indexed as in :class:`Mined`."""
        from_memory = index >= self.num_batch
        out = self.batch_labels[index.clamp(max=self.num_batch - 1)]
        if from_memory.any():
            mem_labels = self.memory_labels[(index - self.num_batch).clamp(min=0)]
            out = torch.where(from_memory, mem_labels, out)
        return out


def hardest_positives(emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per batch row: ``(sim (B,), idx (B,))`` of the least similar other row of the same label;
    ``idx = -1`` (and ``sim = +inf``) for a row without one. The batch is small: B×B is fine."""
    sims = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    sims = sims.masked_fill(~same, float("inf"))
    s, idx = sims.min(dim=1)
    return s, idx.masked_fill(~same.any(dim=1), -1)


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


def _per_anchor(pos: Tensor, neg: Tensor) -> Mined:
    """Triples from per-anchor positives ``(B,)`` and negatives ``(B, k)``."""
    rows = torch.arange(neg.shape[0], device=neg.device)[:, None].expand_as(neg)
    return _triples(rows.reshape(-1), pos[:, None].expand_as(neg).reshape(-1), neg.reshape(-1))


class BatchHardMiner:
    """Hardest positive and hardest negative (max similarity) per anchor."""

    def __call__(self, cands: Candidates) -> Mined:
        _, pos = hardest_positives(cands.batch, cands.batch_labels)
        _, neg = cands.hardest(cands.batch, cands.batch_labels, 1)
        return _per_anchor(pos, neg)


class TopKMiner:
    """Hardest positive and the ``k`` hardest negatives per anchor (k triples per anchor)."""

    def __init__(self, k: int = 5) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        self.k = k

    def __call__(self, cands: Candidates) -> Mined:
        _, pos = hardest_positives(cands.batch, cands.batch_labels)
        _, neg = cands.hardest(cands.batch, cands.batch_labels, self.k)
        return _per_anchor(pos, neg)


class SemiHardMiner:
    """Hardest negative that is still less similar than the positive: max s(a,n) s.t.
    s(a,n) < s(a,p) (FaceNet's semi-hard; avoids collapse from the very hardest negatives)."""

    def __call__(self, cands: Candidates) -> Mined:
        s_ap, pos = hardest_positives(cands.batch, cands.batch_labels)
        _, neg = cands.hardest(cands.batch, cands.batch_labels, 1, below=s_ap)
        return _per_anchor(pos, neg)


class ThresholdMiner:
    """Every negative within the margin: all n with s(a,n) > s(a,p) − margin (the triples
    with a non-zero cosine triplet loss)."""

    def __init__(self, margin: float = 0.2) -> None:
        self.margin = float(margin)

    def __call__(self, cands: Candidates) -> Mined:
        s_ap, pos = hardest_positives(cands.batch, cands.batch_labels)
        has_pos = pos >= 0
        lower = torch.where(has_pos, s_ap - self.margin, torch.full_like(s_ap, float("inf")))
        anchor, neg = cands.within(cands.batch, cands.batch_labels, lower)
        return _triples(anchor, pos[anchor], neg)


class RandomMiner:
    """Control: hardest positive and ``k`` negatives drawn uniformly (without replacement)
    from batch ∪ memory. ``seed`` makes a call reproducible: the objective reseeds per step so
    that repeated calls within one step mine the same negatives."""

    def __init__(self, k: int = 1, seed: int = 0) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        self.k = k
        self.seed = seed

    def __call__(self, cands: Candidates) -> Mined:
        _, pos = hardest_positives(cands.batch, cands.batch_labels)
        gen = torch.Generator(device=cands.batch.device).manual_seed(self.seed)
        _, neg = cands.random(cands.batch_labels, self.k, gen)
        return _per_anchor(pos, neg)


class BidirectionalMiner:
    """IvS rule (DocFace+ MPS style): ID anchors take their hardest negative among spot photos,
    spot anchors among ID photos; the positive is the pair partner.

    Domain of a batch row = :func:`ivs_domains` (first row of an identity = ID photo). Memory rows
    are offered by :meth:`Candidates.for_anchor_domain`: rows of the anchor's own domain are never
    candidates; rows of unknown domain (-1, or no ``memory_domains``) are candidates for both
    directions.
    """

    def __call__(self, cands: Candidates) -> Mined:
        _, pos = hardest_positives(cands.batch, cands.batch_labels)
        domains = ivs_domains(cands.batch_labels)
        neg = torch.full_like(pos, -1)
        for domain in (0, 1):
            is_anchor = domains == domain
            anchors = is_anchor.nonzero(as_tuple=True)[0]
            other = (~is_anchor).nonzero(as_tuple=True)[0]
            _, n = cands.for_anchor_domain(domain).hardest(
                cands.batch[anchors], cands.batch_labels[anchors], 1, batch_rows=other
            )
            neg[anchors] = n[:, 0]
        return _triples(torch.arange(pos.shape[0], device=pos.device), pos, neg)


MINERS: dict[str, type] = {
    "batch_hard": BatchHardMiner,
    "top_k": TopKMiner,
    "semi_hard": SemiHardMiner,
    "threshold": ThresholdMiner,
    "random": RandomMiner,
    "bidirectional": BidirectionalMiner,
}
