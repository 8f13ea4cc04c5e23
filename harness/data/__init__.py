"""IvS datasets for the harness: `build_data(cfg, seed) -> IvSData` and the P×K batch sampler.

`cfg` is the suite's `[data]` table: `kind` (a key of DATA_KINDS) plus that kind's parameters
(see the kind's module for keys and defaults). Bad keys or values raise ValueError naming the
key (`data.<key>`) and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from harness.data.features import build_features
from harness.data.image_folder import build_image_folder
from harness.data.ivs import IvSData, Split
from harness.data.sampler import PairBatchSampler
from harness.data.synthetic import build_synthetic_ivs

DATA_KINDS: dict[str, Callable[[Mapping[str, Any], int], IvSData]] = {
    "synthetic_ivs": build_synthetic_ivs,
    "image_folder": build_image_folder,
    "features": build_features,
}

__all__ = ["DATA_KINDS", "IvSData", "PairBatchSampler", "Split", "build_data"]


def build_data(cfg: Mapping[str, Any], seed: int) -> IvSData:
    """Build the dataset described by `cfg` (kind defaults to "synthetic_ivs") for `seed`."""
    kind = cfg.get("kind", "synthetic_ivs")
    if kind not in DATA_KINDS:
        raise ValueError(
            f"data.kind must be one of {', '.join(map(repr, DATA_KINDS))}; got {kind!r}"
        )
    return DATA_KINDS[kind](cfg, seed)
