"""P×K identity batches for metric learning (K = 2 for IvS: an ID photo and a spot photo)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class PairBatchSampler:
    """Yields index tensors (P·K,) of P identities × K samples, grouped by identity:
    [i₁k₁, i₁k₂, …, i₂k₁, …], P = batch_size / K. Within an identity the drawn samples keep
    the order of `domain` (then storage order): the ID photo (domain 0) comes before spot photos,
    which the bidirectional miner and the MPS loss rely on to tell ID from spot rows.

    One pass (`iter`) is an epoch: the identities with ≥ K samples are shuffled by `generator`
    and taken P at a time (an incomplete last batch is dropped); from each identity K distinct
    samples are drawn uniformly without replacement. Identities with fewer than K samples are
    never sampled. Usable as a DataLoader `batch_sampler`.

    labels: (n,) int64. batch_size: a multiple of k, with batch_size / k ≤ #eligible identities.
    domain: optional (n,) int (0 = ID photo, 1 = spot photo); without it, storage order.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
        k: int = 2,
        domain: torch.Tensor | None = None,
    ):
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D; got shape {tuple(labels.shape)}")
        if k < 1 or batch_size < k or batch_size % k:
            raise ValueError(
                f"batch_size must be a positive multiple of k={k}; got batch_size={batch_size}"
            )
        self.k, self.p, self.generator = k, batch_size // k, generator
        if domain is not None and domain.shape != labels.shape:
            raise ValueError(
                f"domain must have the shape of labels {tuple(labels.shape)}; "
                f"got {tuple(domain.shape)}"
            )
        # rows grouped by identity; inside an identity by domain, then storage order
        order = torch.arange(labels.numel())
        if domain is not None:
            order = torch.argsort(domain, stable=True)
        order = order[torch.argsort(labels[order], stable=True)]
        _, counts = torch.unique_consecutive(labels[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        eligible = counts >= k
        self._order, self._starts, self._counts = order, starts[eligible], counts[eligible]
        if self._counts.numel() < self.p:
            raise ValueError(
                f"batch_size={batch_size} needs {self.p} identities with ≥ {k} samples; "
                f"only {self._counts.numel()} exist"
            )

    def __len__(self) -> int:
        return self._counts.numel() // self.p

    def __iter__(self) -> Iterator[torch.Tensor]:
        perm = torch.randperm(self._counts.numel(), generator=self.generator)
        for b in range(len(self)):
            ids = perm[b * self.p : (b + 1) * self.p]
            counts = self._counts[ids]
            # K distinct offsets per identity: the K smallest of i.i.d. uniform keys (vectorised
            # sampling without replacement); masked positions beyond each count sort last
            keys = torch.rand(self.p, int(counts.max()), generator=self.generator)
            keys[torch.arange(keys.shape[1]) >= counts[:, None]] = 2.0
            offsets = keys.argsort(dim=1)[:, : self.k].sort(dim=1).values  # keep domain order
            yield self._order[(self._starts[ids, None] + offsets).reshape(-1)]
