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

    test_id_x (n, *input_shape), test_spot_x (m, *input_shape): held-out photos of identities
    disjoint from the training ones. Without labels (both None, the default) n = m and row i of
    both = test identity i. With `test_id_labels` (n,) / `test_spot_labels` (m,) int64, genuine
    pairs are those with equal labels, any number per identity. `test_symmetric` (needs labels):
    the two sides are the same samples (test_spot_x is test_id_x) and each unordered pair {i, j},
    i < j, is one pair — no self-pairs (the "all_pairs" protocol). These three fields are passed
    as they are to `harness.metrics.ivs_verification`. num_classes = number of training
    identities. `info` holds counts worth reporting (e.g. skipped images), never anything needed
    to train.
    """

    train: Split
    test_id_x: torch.Tensor
    test_spot_x: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)
    test_id_labels: torch.Tensor | None = None
    test_spot_labels: torch.Tensor | None = None
    test_symmetric: bool = False

    def __post_init__(self) -> None:
        if (self.test_id_labels is None) != (self.test_spot_labels is None):
            raise ValueError("IvSData: give both test_id_labels and test_spot_labels, or neither")
        if self.test_id_labels is None:
            if self.test_symmetric:
                raise ValueError("IvSData: test_symmetric needs test labels")
            if self.test_id_x.shape[0] != self.test_spot_x.shape[0]:
                raise ValueError(
                    f"IvSData: unlabelled test sides must be row-aligned; got "
                    f"{self.test_id_x.shape[0]} ID and {self.test_spot_x.shape[0]} spot rows"
                )
            return
        for name, lab, x in (
            ("test_id_labels", self.test_id_labels, self.test_id_x),
            ("test_spot_labels", self.test_spot_labels, self.test_spot_x),
        ):
            if lab.shape != (x.shape[0],):
                raise ValueError(f"IvSData: {name} must be ({x.shape[0]},); got {tuple(lab.shape)}")


def split_identities(
    x: torch.Tensor,
    labels: torch.Tensor,
    domain: torch.Tensor,
    test_fraction: float,
    seed: int,
    info: dict[str, Any] | None = None,
    all_pairs: bool = False,
) -> IvSData:
    """Identity-disjoint train/test split of samples (x (n,...), labels (n,) any int ids,
    domain (n,) 0 = ID / 1 = spot).

    Identities with fewer than 2 samples are dropped (counted in info["dropped_identities"]).
    A seeded permutation of the sorted identity ids puts round(test_fraction·#ids) identities in
    the test set (at least 1 and leaving at least 2 for training); each contributes one pair:
    its first domain-0 sample as ID and its first domain-1 sample as spot (the first two samples
    when it lacks one of the domains). With `all_pairs`, every sample of a test identity is kept
    instead, on both sides (the same tensor), labelled 0..m−1 in id order, with
    `test_symmetric=True`: every unordered pair of test samples is one verification pair.
    Training labels are re-numbered 0..C−1 in id order.
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

    train_mask = ~is_test[inverse]
    relabel = torch.cumsum(~is_test, 0) - 1
    train = Split(x[train_mask], relabel[inverse[train_mask]], domain[train_mask])
    common = {"train": train, "input_shape": tuple(x.shape[1:]), "num_classes": k - n_test}
    if all_pairs:
        test_x = x[~train_mask]
        test_labels = (torch.cumsum(is_test, 0) - 1)[inverse[~train_mask]]
        return IvSData(
            **common,
            test_id_x=test_x,
            test_spot_x=test_x,
            info=info,
            test_id_labels=test_labels,
            test_spot_labels=test_labels,
            test_symmetric=True,
        )
    id_rows, spot_rows = _one_pair_per_identity(inverse, domain, k, is_test)
    return IvSData(**common, test_id_x=x[id_rows], test_spot_x=x[spot_rows], info=info)


def _one_pair_per_identity(
    inverse: torch.Tensor, domain: torch.Tensor, k: int, is_test: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (ID photo, spot photo) of each test identity, in id order: its first domain-0
    and first domain-1 sample, or its first two samples when it lacks one of the domains.
    inverse (n,): dense identity id 0..k−1 of each row; is_test (k,)."""
    n = inverse.numel()
    rows = torch.arange(n)

    def first_row(mask: torch.Tensor) -> torch.Tensor:
        """Per identity, the smallest row index among `mask` rows (n when none)."""
        out = torch.full((k,), n, dtype=torch.int64)
        return out.scatter_reduce(0, inverse[mask], rows[mask], "amin")

    first_id, first_spot = first_row(domain == 0), first_row(domain == 1)
    first_any = first_row(torch.ones(n, dtype=torch.bool))
    second_any = first_row(rows != first_any[inverse])
    both = (first_id < n) & (first_spot < n)
    test_ids = torch.nonzero(is_test).squeeze(1)
    return (
        torch.where(both, first_id, first_any)[test_ids],
        torch.where(both, first_spot, second_any)[test_ids],
    )
