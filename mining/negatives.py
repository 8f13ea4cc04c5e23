"""Chunked search for negatives: the k most similar (or k random) candidates of another identity.

Cost rule (docs/methods.md §2): never materialise the B×M similarity matrix of a large memory.
The candidates are scanned in chunks of ``chunk`` rows: one GEMM ``(B, d) @ (d, chunk)`` per
chunk, a broadcast label compare ``(B, chunk)`` to mask same-identity entries, then a max (k = 1)
or a top-k merged into a running top-k. Peak extra memory is O(B·chunk), independent of M.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Default chunk: about this many similarity entries per chunk (4 MiB in float32), which is small
# next to any memory worth chunking yet wide enough that the GEMM runs near its peak rate.
_CHUNK_ENTRIES = 1 << 20
_MIN_CHUNK = 1024


def default_chunk(num_anchors: int, num_cands: int) -> int:
    """Chunk width used when ``chunk=None``: ≈ 2**20 / B columns, at least 1024, at most M."""
    return max(1, min(num_cands, max(_MIN_CHUNK, _CHUNK_ENTRIES // max(num_anchors, 1))))


def merge_topk(
    sims_a: Tensor, idx_a: Tensor, sims_b: Tensor, idx_b: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Merge two per-row top lists ``(B, ka)``, ``(B, kb)`` into the top ``k`` by similarity.

    On equal similarities entries of ``a`` come first (a stable sort, since ``topk`` does not
    promise an order among ties), so merging in candidate order prefers earlier candidates.
    Rows padded with ``-inf`` / ``-1`` stay so.
    """
    if k == 1 and sims_a.shape[1] == 1 and sims_b.shape[1] == 1:
        take_b = sims_b > sims_a  # strict: a wins ties
        return torch.where(take_b, sims_b, sims_a), torch.where(take_b, idx_b, idx_a)
    sims = torch.cat([sims_a, sims_b], dim=1)
    idx = torch.cat([idx_a, idx_b], dim=1)
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, order), idx.gather(1, order)


def _check_inputs(
    anchor_labels: Tensor, cand_labels: Tensor, num_anchors: int, num_cands: int, k: int
) -> Tensor:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if anchor_labels.ndim == 1:
        anchor_labels = anchor_labels[:, None]
    if anchor_labels.ndim != 2 or anchor_labels.shape[0] != num_anchors:
        raise ValueError(
            f"anchor_labels must have shape ({num_anchors},) or ({num_anchors}, L), "
            f"got {tuple(anchor_labels.shape)}"
        )
    if cand_labels.shape != (num_cands,):
        raise ValueError(
            f"cand_labels must have shape ({num_cands},), got {tuple(cand_labels.shape)}"
        )
    return anchor_labels


def _scan_topk(
    score: Callable[[int, int], Tensor],
    anchor_labels: Tensor,
    cand_labels: Tensor,
    k: int,
    exclude_self: Tensor | None,
    chunk: int,
    below: Tensor | None,
    cand_mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Running top-k of ``score(start, stop) (B, stop-start)`` over admissible candidates.

    A candidate j is admissible for anchor i when its label differs from every label in
    ``anchor_labels[i]`` (shape (B, L)), ``j != exclude_self[i]``, ``score < below[i]`` and
    ``cand_mask[j]`` (if given).
    """
    num_anchors, num_cands = anchor_labels.shape[0], cand_labels.shape[0]
    device = anchor_labels.device
    rows = torch.arange(num_anchors, device=device)
    best_s: Tensor | None = None
    best_i: Tensor | None = None
    for start in range(0, num_cands, chunk):
        stop = min(start + chunk, num_cands)
        s = score(start, stop)
        same = anchor_labels[:, :1] == cand_labels[None, start:stop]
        for extra in range(1, anchor_labels.shape[1]):
            same |= anchor_labels[:, extra : extra + 1] == cand_labels[None, start:stop]
        s.masked_fill_(same, float("-inf"))  # s is this chunk's own buffer: fill in place
        if cand_mask is not None:
            # Masked-out columns are few (e.g. one batch of stale copies): touch only them.
            dropped = ~cand_mask[start:stop]
            if dropped.any():
                s[:, dropped] = float("-inf")
        if below is not None:
            s.masked_fill_(s >= below[:, None], float("-inf"))
        if exclude_self is not None:
            local = exclude_self - start
            hit = (local >= 0) & (local < stop - start)
            s[rows[hit], local[hit]] = float("-inf")
        if k == 1:
            cs, ci = s.max(dim=1, keepdim=True)
        else:
            cs, ci = s.topk(min(k, stop - start), dim=1)
        ci = ci + start
        if best_s is None:
            best_s, best_i = cs, ci
        else:
            best_s, best_i = merge_topk(best_s, best_i, cs, ci, k)
    if best_s is None:  # no candidates at all
        best_s = torch.empty(num_anchors, 0, device=device)
        best_i = torch.empty(num_anchors, 0, dtype=torch.int64, device=device)
    if best_s.shape[1] < k:  # fewer than k candidates in total
        pad = k - best_s.shape[1]
        best_s = torch.nn.functional.pad(best_s, (0, pad), value=float("-inf"))
        best_i = torch.nn.functional.pad(best_i, (0, pad), value=-1)
    best_i = best_i.masked_fill(best_s == float("-inf"), -1)
    return best_s, best_i


def hardest_negatives(
    anchors: Tensor,
    anchor_labels: Tensor,
    cands: Tensor,
    cand_labels: Tensor,
    k: int = 1,
    exclude_self: Tensor | None = None,
    chunk: int | None = None,
    *,
    below: Tensor | None = None,
    cand_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per anchor, the ``k`` candidates of another identity with the largest ``anchor · cand``.

    Args:
        anchors: ``(B, d)`` floating; cosine similarity if rows are L2-normalised.
        anchor_labels: ``(B,)`` integer, or ``(B, L)``: a candidate whose label equals any of the
            anchor's labels is never a negative (quadruplet uses L = 2).
        cands: ``(M, d)``; may have another floating dtype (e.g. an fp16 memory): each chunk is
            cast to ``anchors.dtype`` before its GEMM.
        cand_labels: ``(M,)`` integer.
        k: number of negatives per anchor (``>= 1``).
        exclude_self: optional ``(B,)`` int64 index into ``cands`` to exclude per anchor
            (-1 = none), for an anchor that is itself a candidate under another label.
        chunk: candidates per GEMM; default :func:`default_chunk`.
        below: optional ``(B,)`` strict upper bound on the similarity (semi-hard mining).
        cand_mask: optional ``(M,)`` bool; candidates marked False are never returned (e.g.
            memory rows that are stale copies of the current batch).

    Returns:
        ``(sims (B, k), idx (B, k) int64)``, most similar first; ``-inf`` / ``-1`` where fewer
        than ``k`` admissible candidates exist. Peak extra memory O(B·chunk).
    """
    if anchors.ndim != 2 or cands.ndim != 2 or anchors.shape[1] != cands.shape[1]:
        raise ValueError(
            f"anchors (B, d) and cands (M, d) must share d, got {tuple(anchors.shape)} "
            f"and {tuple(cands.shape)}"
        )
    labels2d = _check_inputs(anchor_labels, cand_labels, anchors.shape[0], cands.shape[0], k)
    chunk = default_chunk(anchors.shape[0], cands.shape[0]) if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 or None, got {chunk!r}")

    def score(start: int, stop: int) -> Tensor:
        return anchors @ cands[start:stop].to(anchors.dtype).T

    return _scan_topk(score, labels2d, cand_labels, k, exclude_self, chunk, below, cand_mask)


def random_negatives(
    anchor_labels: Tensor,
    cand_labels: Tensor,
    k: int = 1,
    *,
    generator: torch.Generator | None = None,
    chunk: int | None = None,
    cand_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(keys (B, k), idx (B, k))``: candidates drawn uniformly without replacement among those
    whose label differs from the anchor's (``-inf`` / -1 where fewer than ``k`` exist).

    Uniform because each admissible candidate gets an i.i.d. uniform key and the top-k keys win
    (the control miner: same masking and chunking as :func:`hardest_negatives`, random scores).
    The keys are returned so that draws over disjoint candidate sets can be merged with
    :func:`merge_topk` and stay uniform over the union.
    """
    num_anchors, num_cands = anchor_labels.shape[0], cand_labels.shape[0]
    labels2d = _check_inputs(anchor_labels, cand_labels, num_anchors, num_cands, k)
    chunk = default_chunk(num_anchors, num_cands) if chunk is None else chunk

    def score(start: int, stop: int) -> Tensor:
        device = anchor_labels.device if generator is None else generator.device
        keys = torch.rand(num_anchors, stop - start, generator=generator, device=device)
        return keys.to(anchor_labels.device)

    return _scan_topk(score, labels2d, cand_labels, k, None, chunk, None, cand_mask)
