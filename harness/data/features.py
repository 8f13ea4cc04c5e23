"""Precomputed inputs or embeddings from .npy / .npz / .parquet files (kind "features").

Keys (defaults in DEFAULTS):
- `path`: .npy (float array (n, ...) of inputs, opened as a read-only memory map
  (`mmap_mode="r"`): nothing is copied, batches read their rows; labels from `labels_path`,
  domain from the optional `domain_path`), .npz (arrays named `feature_column`, `label_column`, optionally
  `domain_column`) or .parquet (read with polars; `feature_column` a list/array column, or, when
  no such column exists, every column other than label and domain, as (n, #columns)).
- `label_column` / `domain_column`: identity ids (any ints) and 0 = ID / 1 = spot. Without a
  domain, the first sample of each identity (in file order) is its ID photo, the rest spot.
- `test_fraction`: share of identities held out for the IvS test pairs (identity-disjoint,
  seeded; see `harness.data.split.split_identities`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.data.ivs import IvSData
from harness.data.params import check_float, resolve
from harness.data.split import split_identities, split_source
from harness.data.stream import ArrayStore, StreamSource

DEFAULTS: dict[str, Any] = {
    "path": "",
    "labels_path": "",
    "domain_path": "",
    "feature_column": "x",
    "label_column": "label",
    "domain_column": "domain",
    "test_fraction": 0.2,
}
SUFFIXES = (".npy", ".npz", ".parquet")


def _load(p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    path = Path(p["path"])
    if path.suffix not in SUFFIXES:
        raise ValueError(f"data.path must end in one of {', '.join(SUFFIXES)}; got {str(path)!r}")
    if not path.is_file():
        raise ValueError(f"data.path {str(path)!r} does not exist or is not a file")
    if path.suffix == ".npy":
        if not p["labels_path"]:
            raise ValueError(
                "data.labels_path (a .npy of identity ids) is required with a .npy path"
            )
        x = np.load(path, mmap_mode="r", allow_pickle=False)
        labels = np.load(p["labels_path"], allow_pickle=False)
        domain = np.load(p["domain_path"], allow_pickle=False) if p["domain_path"] else None
        return x, labels, domain
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            for key in ("feature_column", "label_column"):
                if p[key] not in z:
                    raise ValueError(
                        f"data.{key}={p[key]!r} is not an array in {path}; has {list(z)}"
                    )
            domain = z.get(p["domain_column"], None)
            return z[p["feature_column"]], z[p["label_column"]], domain
    import polars as pl

    df = pl.read_parquet(path)
    if p["label_column"] not in df.columns:
        raise ValueError(f"data.label_column={p['label_column']!r} is not a column of {path}")
    domain = df[p["domain_column"]].to_numpy() if p["domain_column"] in df.columns else None
    if p["feature_column"] in df.columns:
        x = np.stack(df[p["feature_column"]].to_numpy())
    else:
        rest = [c for c in df.columns if c not in (p["label_column"], p["domain_column"])]
        x = df.select(rest).to_numpy()
    return x, df[p["label_column"]].to_numpy(), domain


def validate(cfg: Mapping[str, Any]) -> None:
    """Cheap check for suite validation: keys, `test_fraction`, and that the files exist."""
    p = resolve("features", cfg, DEFAULTS)
    check_float(p, "test_fraction", 0.0, 1.0)
    if not p["path"]:
        raise ValueError("data.path is required for data kind 'features'")
    path = Path(p["path"])
    if path.suffix not in SUFFIXES:
        raise ValueError(f"data.path must end in one of {', '.join(SUFFIXES)}; got {str(path)!r}")
    for key in ("path", "labels_path", "domain_path"):
        if p[key] and not Path(p[key]).is_file():
            raise ValueError(f"data.{key} {p[key]!r} does not exist or is not a file")
    if path.suffix == ".npy" and not p["labels_path"]:
        raise ValueError("data.labels_path (a .npy of identity ids) is required with a .npy path")


def build_features(cfg: Mapping[str, Any], seed: int, **_: Any) -> IvSData:
    """`build_data` for kind "features" (module docstring)."""
    validate(cfg)
    p = resolve("features", cfg, DEFAULTS)
    fraction = check_float(p, "test_fraction", 0.0, 1.0)
    x, labels, domain = _load(p)
    if x.ndim < 2 or labels.shape != (x.shape[0],):
        raise ValueError(
            f"features must be (n, ...) with n labels; got features {x.shape}, labels {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"data.{p['label_column']} must hold integer identity ids; got {labels.dtype}"
        )
    labels_t = torch.tensor(labels, dtype=torch.int64)
    if domain is None:
        domain_t = _first_is_id(labels_t)
    else:
        domain_t = torch.tensor(domain, dtype=torch.int64)
        if domain_t.shape != labels_t.shape or not torch.isin(domain_t, torch.tensor([0, 1])).all():
            raise ValueError("data.domain_column must hold one 0 (ID) or 1 (spot) per sample")
    if isinstance(x, np.memmap):  # .npy: stays on disk, rows are read per batch
        store = ArrayStore(x)

        def make_source(train_rows, id_rows, spot_rows) -> StreamSource:
            return StreamSource(store, train_rows, id_rows, spot_rows)

        rows = np.arange(x.shape[0])
        split = split_source(rows, labels_t, domain_t, fraction, seed, make_source, x.shape[1:])
    else:
        x_t = torch.tensor(x, dtype=torch.float32)  # a copy: polars/npz arrays may be read-only
        split = split_identities(x_t, labels_t, domain_t, fraction, seed)
    split.quality["single_image_identities"] = split.info["dropped_identities"]
    return split


def _first_is_id(labels: torch.Tensor) -> torch.Tensor:
    """Domain (n,): 0 for the first sample of each identity in order, 1 for later ones."""
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    first = torch.ones_like(sorted_labels, dtype=torch.bool)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    domain = torch.empty_like(labels)
    domain[order] = (~first).long()
    return domain
