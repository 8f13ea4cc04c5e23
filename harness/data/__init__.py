"""IvS datasets for the harness: `build_data(cfg, seed) -> IvSData` and the P×K batch sampler.

`cfg` is the suite's `[data]` table: `kind` (a key of DATA_KINDS) plus that kind's parameters
(see the kind's module for keys and defaults). Bad keys or values raise ValueError naming the
key (`data.<key>`) and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from harness.data import features, image_folder
from harness.data.features import build_features
from harness.data.image_folder import build_image_folder
from harness.data.ivs import IvSData, Split
from harness.data.params import resolve
from harness.data.sampler import PairBatchSampler
from harness.data.synthetic import SyntheticIvS, build_synthetic_ivs

DATA_KINDS: dict[str, Callable[[Mapping[str, Any], int], IvSData]] = {
    "synthetic_ivs": build_synthetic_ivs,
    "image_folder": build_image_folder,
    "features": build_features,
}

__all__ = ["DATA_KINDS", "IvSData", "PairBatchSampler", "Split", "build_data", "validate_data"]


def _kind(cfg: Mapping[str, Any]) -> str:
    kind = cfg.get("kind", "synthetic_ivs")
    if kind not in DATA_KINDS:
        raise ValueError(
            f"data.kind must be one of {', '.join(map(repr, DATA_KINDS))}; got {kind!r}"
        )
    return kind


def build_data(cfg: Mapping[str, Any], seed: int) -> IvSData:
    """Build the dataset described by `cfg` (kind defaults to "synthetic_ivs") for `seed`."""
    return DATA_KINDS[_kind(cfg)](cfg, seed)


def validate_data(cfg: Mapping[str, Any]) -> None:
    """Reject a bad `[data]` table without building the data (suite validation, before a run).

    synthetic_ivs: every key, type and range (its generative model is cheap to set up).
    image_folder / features: unknown keys only; paths and files are checked when the trial
    loads them.
    """
    kind = _kind(cfg)
    if kind == "synthetic_ivs":
        SyntheticIvS.from_config(cfg, 0)
    else:
        resolve(kind, cfg, {"image_folder": image_folder, "features": features}[kind].DEFAULTS)
