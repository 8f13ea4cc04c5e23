"""The IvS data containers and the identity-disjoint split of a labelled sample set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Split:
    """Training samples: x (n, *input_shape) float32, labels (n,) int64 in [0, num_classes),
    domain (n,) int64 with 0 = ID photo, 1 = spot photo."""

    x: torch.Tensor
    labels: torch.Tensor
    domain: torch.Tensor

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.labels.shape != (n,) or self.domain.shape != (n,):
            raise ValueError(
                f"Split: labels and domain must be ({n},); got {tuple(self.labels.shape)} and "
                f"{tuple(self.domain.shape)}"
            )


@dataclass(frozen=True)
class IvSData:
    """A training split and the held-out IvS test pairs.

    test_id_x, test_spot_x: (m, *input_shape); row i of both = test identity i (disjoint from the
    training identities). num_classes = number of training identities. `info` holds counts worth
    reporting (e.g. skipped images), never anything needed to train.
    """

    train: Split
    test_id_x: torch.Tensor
    test_spot_x: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)


def split_identities(
    x: torch.Tensor,
    labels: torch.Tensor,
    domain: torch.Tensor,
    test_fraction: float,
    seed: int,
    info: dict[str, Any] | None = None,
) -> IvSData:
    """Identity-disjoint train/test split of samples (x (n,...), labels (n,) any int ids,
    domain (n,) 0 = ID / 1 = spot).

    Identities with fewer than 2 samples are dropped (counted in info["dropped_identities"]).
    A seeded permutation of the sorted identity ids puts round(test_fraction·#ids) identities in
    the test set (at least 1 and leaving at least 2 for training); each contributes one pair:
    its first domain-0 sample as ID and its first domain-1 sample as spot (the first two samples
    when it lacks one of the domains). Training labels are re-numbered 0..C−1 in id order.
    """
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    keep_ids = counts >= 2
    info = dict(info or {})
    info["dropped_identities"] = int((~keep_ids).sum())
    keep = keep_ids[inverse]
    x, domain = x[keep], domain[keep]
    # dense ids 0..k-1 over the identities that are kept, in id order
    inverse = torch.cumsum(keep_ids, 0)[inverse[keep]] - 1
    k = int(keep_ids.sum())
    n_test = round(test_fraction * k)
    if k < 3 or not 1 <= n_test <= k - 2:
        raise ValueError(
            f"cannot split {k} identities with ≥ 2 samples into train and test with "
            f"test_fraction={test_fraction}: need ≥ 1 test and ≥ 2 train identities"
        )
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    is_test = torch.zeros(k, dtype=torch.bool)
    is_test[perm[:n_test]] = True
    test_ids = torch.sort(perm[:n_test]).values

    rows = torch.arange(x.shape[0])

    def first_row(mask: torch.Tensor) -> torch.Tensor:
        """Per identity, the smallest row index among `mask` rows (x.shape[0] when none)."""
        out = torch.full((k,), x.shape[0], dtype=torch.int64)
        return out.scatter_reduce(0, inverse[mask], rows[mask], "amin")

    first_id, first_spot = first_row(domain == 0), first_row(domain == 1)
    first_any = first_row(torch.ones_like(keep[keep]))
    second_any = first_row(rows != first_any[inverse])
    both = (first_id < x.shape[0]) & (first_spot < x.shape[0])
    id_rows = torch.where(both, first_id, first_any)[test_ids]
    spot_rows = torch.where(both, first_spot, second_any)[test_ids]
    train_mask = ~is_test[inverse]
    train_old = inverse[train_mask]
    relabel = torch.cumsum(~is_test, 0) - 1
    train = Split(x[train_mask], relabel[train_old], domain[train_mask])
    return IvSData(
        train=train,
        test_id_x=x[id_rows],
        test_spot_x=x[spot_rows],
        input_shape=tuple(x.shape[1:]),
        num_classes=k - n_test,
        info=info,
    )
