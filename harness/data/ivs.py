"""The IvS data containers: `Split` (training samples) and `IvSData` (the one data interface).

`IvSData` is the one interface the training loop and the evaluation use, for every data kind:

    data.train_batches(n, k, seed, workers=…, pin_memory=…)  # endless (x, y) P×K batches
    data.probe_x(n)                                           # first n training samples
    data.test_embeddings(embed, block)                        # (id_emb, spot_emb)
    data.train.labels, data.train.domain, data.num_classes, data.input_shape,
    data.test_id_labels, data.test_spot_labels, data.test_symmetric, data.quality

In-memory kinds (synthetic_ivs, features from .npz/.parquet) hold tensors (`train.x`,
`test_id_x`, `test_spot_x`); streaming kinds (image_folder, recordio, features from a memory
mapped .npy) hold a `StreamSource` instead and those three are None.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.data.sampler import PairBatchSampler
from harness.data.stream import StreamSource

#: data-quality counts every kind reports (zeros where a kind cannot have them); they become
#: columns of the trial's row
QUALITY_KEYS = ("bad_images", "single_image_identities", "no_id_photo_identities")


@dataclass(frozen=True)
class Split:
    """Training samples: x (n, *input_shape) float32 — None for streaming kinds, whose samples
    are read batch by batch (`IvSData.train_batches`) —, labels (n,) int64 in [0, num_classes),
    domain (n,) int64 with 0 = ID photo, 1 = spot photo."""

    x: torch.Tensor | None
    labels: torch.Tensor
    domain: torch.Tensor

    def __post_init__(self) -> None:
        n = self.labels.shape[0] if self.x is None else self.x.shape[0]
        if self.labels.shape != (n,) or self.domain.shape != (n,):
            raise ValueError(
                f"Split: labels and domain must be ({n},); got {tuple(self.labels.shape)} and "
                f"{tuple(self.domain.shape)}"
            )

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass(frozen=True)
class IvSData:
    """A training split and the held-out IvS test pairs.

    test_id_x (n, *input_shape), test_spot_x (m, *input_shape): held-out photos of identities
    disjoint from the training ones (None for streaming kinds: `source` reads them). Without
    labels (both None, the default) n = m and row i of both = test identity i. With
    `test_id_labels` (n,) / `test_spot_labels` (m,) int64, genuine pairs are those with equal
    labels, any number per identity. `test_symmetric` (needs labels): the two sides are the same
    samples (test_spot_x is test_id_x) and each unordered pair {i, j}, i < j, is one pair — no
    self-pairs (the "all_pairs" protocol). These three fields are passed as they are to
    `harness.ivs_eval.ivs_verification`. num_classes = number of training identities.
    `quality`: data-quality counts (`QUALITY_KEYS`, ints) meant as row columns; `info` holds
    other counts worth reporting, never anything needed to train.
    """

    train: Split
    test_id_x: torch.Tensor | None
    test_spot_x: torch.Tensor | None
    input_shape: tuple[int, ...]
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)
    test_id_labels: torch.Tensor | None = None
    test_spot_labels: torch.Tensor | None = None
    test_symmetric: bool = False
    quality: dict[str, int] = field(default_factory=dict)
    source: StreamSource | None = None

    def __post_init__(self) -> None:
        q = {k: 0 for k in QUALITY_KEYS}
        q.update({k: int(v) for k, v in self.quality.items()})
        object.__setattr__(self, "quality", q)
        if self.source is None and (self.train.x is None or self.test_id_x is None):
            raise ValueError("IvSData: without a source, train.x and the test sides are needed")
        n_id, n_spot = self._sizes()
        if (self.test_id_labels is None) != (self.test_spot_labels is None):
            raise ValueError("IvSData: give both test_id_labels and test_spot_labels, or neither")
        if self.test_id_labels is None:
            if self.test_symmetric:
                raise ValueError("IvSData: test_symmetric needs test labels")
            if n_id != n_spot:
                raise ValueError(
                    f"IvSData: unlabelled test sides must be row-aligned; got "
                    f"{n_id} ID and {n_spot} spot rows"
                )
            return
        for name, lab, n in (
            ("test_id_labels", self.test_id_labels, n_id),
            ("test_spot_labels", self.test_spot_labels, n_spot),
        ):
            if lab.shape != (n,):
                raise ValueError(f"IvSData: {name} must be ({n},); got {tuple(lab.shape)}")

    def _sizes(self) -> tuple[int, int]:
        if self.source is not None:
            return len(self.source.test_id_rows), len(self.source.test_spot_rows)
        assert self.test_id_x is not None and self.test_spot_x is not None
        return self.test_id_x.shape[0], self.test_spot_x.shape[0]

    # --- the interface of the training loop -------------------------------------------------

    def train_batches(
        self,
        n: int,
        k: int,
        seed: int,
        *,
        workers: int = 0,
        pin_memory: bool = False,
        start: int = 0,
        uint8: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless training batches (x float32 (n, *input_shape) on the CPU, y int64 (n,)):
        P = n // k identities × k photos each, grouped by identity, the ID photo (domain 0)
        first where the identity has one (`PairBatchSampler`, epoch after epoch).

        Deterministic given `seed` (the sampler's generator is `torch.Generator().manual_seed(
        seed)`; flips of batch b come from a stream seeded by (seed, b)), and the same batches
        whatever `workers` is. Streaming kinds decode in a `DataLoader` with `workers` processes
        (0 = in this process), `pin_memory` (ignored without CUDA) and prefetch; a horizontal
        flip is applied at random to training images when the source says so (`data.flip`).
        In-memory kinds index their tensors (`workers` unused).

        `start` skips the first `start` batches at the index level, without decoding them (a
        trial resumed from a checkpoint continues with the batch it would have drawn next, flips
        included: the flips of batch b are drawn from a generator seeded by (seed, b)).

        `uint8` (image kinds only; others ignore it): x is yielded as uint8 pixels (n, C, H,
        W), a quarter of the bytes, to be normalised where it is used (e.g. on the GPU) with
        `harness.data.stream.normalize` — the same float32 values as without it.

        Raises ValueError (at the call, before any batch) when n is not a positive multiple of
        k, or fewer than P training identities have ≥ k samples.
        """
        sampler = self._sampler(n, k, seed)

        def epochs() -> Iterator[torch.Tensor]:
            drawn = 0
            while True:
                for idx in sampler:
                    drawn += 1
                    if drawn > start:
                        yield idx

        labels = self.train.labels
        if self.source is not None:
            return self.source.train_batches(
                epochs(), labels, seed, workers, pin_memory, start=start, uint8=uint8
            )
        x = self.train.x
        assert x is not None

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            pin = pin_memory and torch.cuda.is_available()
            for idx in epochs():
                xb, yb = x[idx], labels[idx]
                yield (xb.pin_memory(), yb.pin_memory()) if pin else (xb, yb)

        return batches()

    def _sampler(self, n: int, k: int, seed: int) -> PairBatchSampler:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"samples per identity must be an integer ≥ 1; got {k!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < k or n % k:
            raise ValueError(
                f"batch size {n!r} must be a positive multiple of the samples per identity "
                f"k={k} (P identities × {k} photos)"
            )
        p = n // k
        _, counts = torch.unique(self.train.labels, return_counts=True)
        eligible = int((counts >= k).sum())
        if eligible < p:
            raise ValueError(
                f"a batch of {n} = {p} identities × {k} photos needs {p} training identities "
                f"with ≥ {k} photos; the training split has {eligible} (of {counts.numel()})"
            )
        gen = torch.Generator().manual_seed(seed)
        return PairBatchSampler(self.train.labels, n, gen, k=k, domain=self.train.domain)

    def probe_x(self, n: int) -> torch.Tensor:
        """The first n training samples (fewer if the split is smaller), float32 on the CPU,
        unflipped (the drift probe's fixed inputs)."""
        n = min(n, len(self.train))
        if self.source is None:
            assert self.train.x is not None
            return self.train.x[:n]
        return self.source.take(self.source.train_rows[:n])

    def test_embeddings(
        self, embed: Callable[[torch.Tensor], torch.Tensor], block: int = 1024, *, workers: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(id_emb, spot_emb): `embed` applied to the test ID and spot samples, in blocks of at
        most `block` float32 CPU samples (streamed from disk for streaming kinds, decoded by
        `workers` processes), results concatenated on the CPU (`torch.cat` of what `embed`
        returns, moved to the CPU). When the two sides are the same samples (`test_symmetric`)
        they are embedded once and the same tensor is returned twice."""

        def run(blocks: Iterator[torch.Tensor]) -> torch.Tensor:
            return torch.cat([embed(b).cpu() for b in blocks])

        if self.source is not None:
            src = self.source
            id_emb = run(src.blocks(src.test_id_rows, block, workers))
            if self.test_symmetric:
                return id_emb, id_emb
            return id_emb, run(src.blocks(src.test_spot_rows, block, workers))
        assert self.test_id_x is not None and self.test_spot_x is not None
        ids, spots = self.test_id_x, self.test_spot_x
        id_emb = run(ids[i : i + block] for i in range(0, len(ids), block))
        if self.test_symmetric or spots is ids:
            return id_emb, id_emb
        return id_emb, run(spots[i : i + block] for i in range(0, len(spots), block))

    def quality_summary(self) -> str:
        """One line for the trial's log, e.g. "data quality: bad_images=0 …"."""
        return "data quality: " + " ".join(f"{k}={v}" for k, v in self.quality.items())
