"""The identity-disjoint train/test split of a labelled sample set (`split_rows`), and the
`IvSData` it becomes for in-memory tensors (`split_identities`) or a streaming source
(`split_source`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from harness.data.ivs import IvSData, Split
from harness.data.stream import StreamSource


@dataclass(frozen=True)
class RowSplit:
    """`split_rows`' answer: positions (int64) into the arrays it was given."""

    train_rows: torch.Tensor
    train_labels: torch.Tensor  # 0..num_classes−1
    train_domain: torch.Tensor
    test_id_rows: torch.Tensor
    test_spot_rows: torch.Tensor
    test_labels: torch.Tensor | None  # all_pairs: labels of test_id_rows (= test_spot_rows)
    num_classes: int
    dropped_identities: int


def split_rows(
    labels: torch.Tensor,
    domain: torch.Tensor,
    test_fraction: float,
    seed: int,
    all_pairs: bool = False,
) -> RowSplit:
    """Identity-disjoint train/test split of samples given by their labels (n,) (any int ids)
    and domain (n,) (0 = ID / 1 = spot), as row positions (see `split_identities`)."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    keep_ids = counts >= 2
    keep = keep_ids[inverse]
    kept_rows = torch.nonzero(keep).squeeze(1)
    domain = domain[keep]
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
    common = {
        "train_rows": kept_rows[train_mask],
        "train_labels": relabel[inverse[train_mask]],
        "train_domain": domain[train_mask],
        "num_classes": k - n_test,
        "dropped_identities": int((~keep_ids).sum()),
    }
    if all_pairs:
        test_rows = kept_rows[~train_mask]
        test_labels = (torch.cumsum(is_test, 0) - 1)[inverse[~train_mask]]
        return RowSplit(
            **common, test_id_rows=test_rows, test_spot_rows=test_rows, test_labels=test_labels
        )
    id_rows, spot_rows = _one_pair_per_identity(inverse, domain, k, is_test)
    return RowSplit(
        **common,
        test_id_rows=kept_rows[id_rows],
        test_spot_rows=kept_rows[spot_rows],
        test_labels=None,
    )


def split_identities(
    x: torch.Tensor,
    labels: torch.Tensor,
    domain: torch.Tensor,
    test_fraction: float,
    seed: int,
    info: dict[str, Any] | None = None,
    all_pairs: bool = False,
    quality: dict[str, int] | None = None,
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
    s = split_rows(labels, domain, test_fraction, seed, all_pairs)
    info = dict(info or {}) | {"dropped_identities": s.dropped_identities}
    train = Split(x[s.train_rows], s.train_labels, s.train_domain)
    common = {
        "train": train,
        "input_shape": tuple(x.shape[1:]),
        "num_classes": s.num_classes,
        "info": info,
        "quality": quality or {},
    }
    if all_pairs:
        test_x = x[s.test_id_rows]
        return IvSData(
            **common,
            test_id_x=test_x,
            test_spot_x=test_x,
            test_id_labels=s.test_labels,
            test_spot_labels=s.test_labels,
            test_symmetric=True,
        )
    return IvSData(**common, test_id_x=x[s.test_id_rows], test_spot_x=x[s.test_spot_rows])


def split_source(
    store_rows: np.ndarray,
    labels: torch.Tensor,
    domain: torch.Tensor,
    test_fraction: float,
    seed: int,
    make_source: Callable[[np.ndarray, np.ndarray, np.ndarray], StreamSource],
    input_shape: tuple[int, ...],
    info: dict[str, Any] | None = None,
    all_pairs: bool = False,
    quality: dict[str, int] | None = None,
) -> IvSData:
    """`split_identities` for a streaming kind: samples are rows `store_rows` (n,) of a store,
    and `make_source(train_rows, test_id_rows, test_spot_rows)` (store rows) builds the
    `StreamSource` that reads them; nothing is decoded."""
    s = split_rows(labels, domain, test_fraction, seed, all_pairs)
    info = dict(info or {}) | {"dropped_identities": s.dropped_identities}
    store_rows = np.asarray(store_rows, dtype=np.int64)
    source = make_source(
        store_rows[s.train_rows.numpy()],
        store_rows[s.test_id_rows.numpy()],
        store_rows[s.test_spot_rows.numpy()],
    )
    return IvSData(
        train=Split(None, s.train_labels, s.train_domain),
        test_id_x=None,
        test_spot_x=None,
        input_shape=input_shape,
        num_classes=s.num_classes,
        info=info,
        test_id_labels=s.test_labels,
        test_spot_labels=s.test_labels,
        test_symmetric=all_pairs,
        quality=quality or {},
        source=source,
    )


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
