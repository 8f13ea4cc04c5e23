"""What a miner searches: the batch ∪ a cross-batch memory, and which batch rows are anchors.

:class:`Candidates` holds detached, L2-normalised embeddings of the batch ``(B, d)`` and of the
memory ``(M, d)`` with their labels. Candidate index ``n`` (the convention of
:class:`mining.miners.Mined`) is batch row ``n`` when ``n < B`` and memory row ``n - B``
otherwise. Every search is a chunked GEMM scan (:mod:`mining.negatives`); none builds a graph.

Anchor subset. ``anchor_rows = slice(s, e)`` makes only batch rows s … e−1 anchors, while
positives and negatives are still searched over the whole batch (and the memory). In
data-parallel training (:mod:`mining.distributed`) the batch is the gathered global batch and the
anchors are this rank's own rows, so each rank scans (e − s) × (B + M) similarities instead of
B × (B + M); the union of the ranks' terms is the single-process set of terms, with the same
global indices.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .negatives import default_chunk, hardest_negatives, merge_topk, random_negatives


def _checked_rows(rows: slice, num_batch: int) -> slice:
    """``rows`` as ``slice(start, stop)`` with ints 0 <= start <= stop <= B; else ValueError."""
    start = 0 if rows.start is None else rows.start
    stop = num_batch if rows.stop is None else rows.stop
    ok = rows.step in (None, 1) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in (start, stop)
    )
    if not ok or not 0 <= start <= stop <= num_batch:
        raise ValueError(
            f"anchor_rows must be a slice(start, stop) with 0 <= start <= stop <= B = "
            f"{num_batch} and step 1, got {rows!r}"
        )
    return slice(start, stop)


@dataclass(frozen=True)
class Candidates:
    """Detached, L2-normalised batch ``(B, d)`` and memory ``(M, d)`` with int64 labels.

    ``use_batch=False`` keeps the batch as anchors/positives but not as negatives (CB-HEM with
    the in-batch term off). ``memory_mask (M,)`` bool drops memory rows from every search (False
    = never a negative). ``memory_domains (M,)`` integer is each memory row's image domain
    (IvS: 0 = ID photo, 1 = spot photo, -1 = unknown); only the bidirectional miner reads it,
    through :meth:`for_anchor_domain`. ``anchor_rows`` (a ``slice`` of batch rows, default
    every row) are the rows that anchor terms (module docstring); the miners return global
    batch indices either way.
    """

    batch: Tensor
    batch_labels: Tensor
    memory: Tensor
    memory_labels: Tensor
    use_batch: bool = True
    chunk: int | None = None
    memory_mask: Tensor | None = None
    memory_domains: Tensor | None = None
    anchor_rows: slice | None = None

    def __post_init__(self) -> None:
        if self.anchor_rows is not None:
            object.__setattr__(self, "anchor_rows", _checked_rows(self.anchor_rows, self.num_batch))

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

    # -- the anchors ----------------------------------------------------------------------------
    @property
    def anchor_slice(self) -> slice:
        """The anchors' batch rows as ``slice(start, stop)`` (every row without a subset)."""
        return slice(0, self.num_batch) if self.anchor_rows is None else self.anchor_rows

    @property
    def anchors(self) -> Tensor:
        """``(A, d)`` embeddings of the anchors (the batch itself without a subset)."""
        return self.batch if self.anchor_rows is None else self.batch[self.anchor_rows]

    @property
    def anchor_labels(self) -> Tensor:
        """``(A,)`` labels of the anchors."""
        return (
            self.batch_labels if self.anchor_rows is None else self.batch_labels[self.anchor_rows]
        )

    def positives(self) -> tuple[Tensor, Tensor]:
        """:func:`hardest_positives` of the anchors: ``(sim (A,), batch row (A,))``."""
        return hardest_positives(self.batch, self.batch_labels, self.anchor_rows)

    # -- searches -------------------------------------------------------------------------------
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
        """:func:`hardest_negatives` of ``anchors (A, d)`` over batch (rows ``batch_rows`` only,
        if given) ∪ memory."""

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
        """All (anchor row, candidate index) with a different label and ``sim > lower[anchor]``;
        the anchor row indexes ``anchors (A, d)``.

        Output size is the number of such pairs (the active ones for a margin loss); scanned in
        chunks so that no ``(A, M)`` matrix is built.
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

    # -- lookups --------------------------------------------------------------------------------
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


def hardest_positives(
    emb: Tensor, labels: Tensor, anchors: slice | None = None
) -> tuple[Tensor, Tensor]:
    """Per anchor row: ``(sim (A,), idx (A,))`` of the least similar other row of ``emb (B, d)``
    with the same label; ``idx = -1`` (and ``sim = +inf``) for an anchor without one.

    ``anchors = slice(s, e)`` takes rows s … e−1 as anchors (A = e − s; default every row,
    A = B) against all B rows; ``idx`` is a row of ``emb``. A × B is small (B is a batch)."""
    anchors = _checked_rows(slice(None) if anchors is None else anchors, emb.shape[0])
    sims = emb[anchors] @ emb.T
    same = labels[anchors][:, None] == labels[None, :]
    own = torch.arange(sims.shape[0], device=emb.device)
    same[own, own + anchors.start] = False  # an anchor is not its own positive
    sims = sims.masked_fill(~same, float("inf"))
    s, idx = sims.min(dim=1)
    return s, idx.masked_fill(~same.any(dim=1), -1)
