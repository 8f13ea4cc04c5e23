"""IvS datasets for the harness: `build_data(cfg, seed) -> IvSData` and the P×K batch sampler.

`cfg` is the suite's `[data]` table: `kind` (a key of DATA_KINDS) plus that kind's parameters
(see the kind's module for keys and defaults; docs/data.md for the file layouts). Bad keys or
values raise ValueError naming the key (`data.<key>`) and what is allowed.

Kinds: "synthetic_ivs" (generated, in memory), "features" (.npy memory-mapped / .npz /
.parquet), "image_folder" (one directory per identity, streamed), "recordio" (insightface
.rec/.idx, streamed). Every kind answers the same `IvSData` interface (harness/data/ivs.py):
`train_batches`, `probe_x`, `test_embeddings`, `quality`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from harness.data import features, image_folder, recordio, synthetic
from harness.data.features import build_features
from harness.data.image_folder import build_image_folder
from harness.data.ivs import QUALITY_KEYS, IvSData, Split
from harness.data.recordio import build_recordio
from harness.data.sampler import PairBatchSampler
from harness.data.stream import default_workers
from harness.data.synthetic import build_synthetic_ivs

#: kind -> builder `(cfg, seed, *, cache_root=None, workers=None) -> IvSData`
DATA_KINDS: dict[str, Callable[..., IvSData]] = {
    "synthetic_ivs": build_synthetic_ivs,
    "image_folder": build_image_folder,
    "features": build_features,
    "recordio": build_recordio,
}

_VALIDATORS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "synthetic_ivs": synthetic.check_params,
    "image_folder": image_folder.validate,
    "features": features.validate,
    "recordio": recordio.validate,
}

__all__ = [
    "DATA_KINDS",
    "QUALITY_KEYS",
    "IvSData",
    "PairBatchSampler",
    "Split",
    "build_data",
    "default_workers",
    "validate_data",
]


def _kind(cfg: Mapping[str, Any]) -> str:
    kind = cfg.get("kind", "synthetic_ivs")
    if kind not in DATA_KINDS:
        raise ValueError(
            f"data.kind must be one of {', '.join(map(repr, DATA_KINDS))}; got {kind!r}"
        )
    return kind


def build_data(
    cfg: Mapping[str, Any],
    seed: int,
    *,
    cache_root: str | Path | None = None,
    workers: int | None = None,
) -> IvSData:
    """Build the dataset described by `cfg` (kind defaults to "synthetic_ivs") for `seed`.

    cache_root: the results root; a `data.cache = "uint8"` cache goes to
    `<cache_root>/.cache/data` unless `data.cache_dir` says otherwise (None: ./results).
    workers: processes that decode images when a cache is produced (None: `default_workers()`).
    Nothing large is decoded otherwise: image kinds stream (`IvSData.train_batches`).
    """
    return DATA_KINDS[_kind(cfg)](cfg, seed, cache_root=cache_root, workers=workers)


def validate_data(cfg: Mapping[str, Any]) -> None:
    """Reject a bad `[data]` table without building the data (suite validation, every trial).

    Cheap: keys, types and ranges are checked arithmetically (synthetic_ivs refuses a generator
    above its documented size, `harness.data.synthetic.MAX_DIM` / `MAX_BYTES`), and for the
    path-based kinds the paths must exist (a missing one is a ValueError naming the key and the
    path). Files are read only when a trial builds its data.
    """
    _VALIDATORS[_kind(cfg)](cfg)
