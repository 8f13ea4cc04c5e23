"""Face images in one directory per identity (kind "image_folder"), streamed from disk.

Layout: `path/<identity>/<image>.{png,jpg,jpeg,pgm,bmp,webp}`, any number of images per
identity (CASIA-WebFace as distributed), identities in sorted directory-name order, images in
sorted file-name order. Nothing is decoded when the data set is built: an index of the files
(paths as one byte buffer with offsets, identities, domains) is made once, and images are
decoded batch by batch by `IvSData.train_batches` / `test_embeddings` (DataLoader workers).

Keys (defaults in DEFAULTS):
- `pairing`: how test pairs are formed and which training image is the ID photo (domain 0;
  every other image is a spot photo).
  "first" = the first image by file name is the ID photo; a test identity gives one pair (its
  ID photo, its first spot photo). "pattern" = as "first" with the first image whose file name
  matches the regular expression `id_pattern` as ID photo (an identity without one is skipped,
  counted). "all_pairs" = every unordered pair of distinct test images is a verification pair:
  genuine when both belong to one identity (Σ k(k−1)/2 for identities with k images), impostor
  otherwise; no image is paired with itself (`IvSData.test_symmetric`, labelled test rows). In
  training the first image by file name is the ID photo, as with "first".
- `image_size`, `channels` (1 = grey, 3 = RGB): every image is resized (bilinear; a JPEG is first
  decoded at the smallest DCT scale ≥ image_size, Pillow's `draft`) to
  channels×image_size×image_size and normalised to [−1, 1]: x = pixel·(2/255) − 1.
- `test_fraction`: share of identities held out (identity-disjoint, seeded).
- `on_bad_image`: "error" (a file that cannot be decoded fails the trial with a ValueError
  naming it) or "skip" (skipped and counted in `quality["bad_images"]`). With the cache every
  file is decoded once up front, so every bad file is known before the split. Without it,
  "skip" checks each file's header when the index is built (a file Pillow cannot identify is
  skipped); a file that fails later, while streaming (truncated JPEG), is fed as a blank
  (all-zero) image; "error" checks nothing up front and fails when it meets a bad file.
- `flip` (default true): random horizontal flip of training images (seeded, as arcface_torch).
- `cache`: "none" or "uint8" (decoded images kept in a memory-mapped uint8 array, reused by
  every later trial on the same files: harness/data/cache.py). `cache_dir`: where ("" = the
  `cache_root` given to `build_data`, else ./results/.cache/data).
Identities left with fewer than 2 usable images are skipped and counted
(`quality["single_image_identities"]`; `no_id_photo_identities` for "pattern").
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from harness.data.cache import content_key, open_cache
from harness.data.ivs import IvSData
from harness.data.params import check_choice, check_float, check_int, resolve
from harness.data.split import split_source
from harness.data.stream import BadSample, Store, StreamSource, default_workers

DEFAULTS: dict[str, Any] = {
    "path": "",
    "pairing": "first",
    "id_pattern": r"(?i)(^|[_-])id([_.-]|$)",
    "image_size": 112,
    "channels": 3,
    "test_fraction": 0.2,
    "on_bad_image": "error",
    "flip": True,
    "cache": "none",
    "cache_dir": "",
}
#: one line per key (`hembench` reference pages; the module docstring says more)
HELP: dict[str, str] = {
    "path": "directory with one sub-directory of images per identity (required)",
    "pairing": '"first", "pattern" (ID photo matches id_pattern) or "all_pairs"',
    "id_pattern": 'regular expression of ID-photo file names (pairing = "pattern")',
    "image_size": "images are resized to channels × image_size × image_size",
    "channels": "1 = grey, 3 = RGB",
    "test_fraction": "share of identities held out for testing (identity-disjoint)",
    "on_bad_image": '"error" (fail naming the file) or "skip" (skip it, count bad_images)',
    "flip": "random horizontal flip of training images (seeded)",
    "cache": '"none" or "uint8" (decoded images kept in a memory-mapped file, reused)',
    "cache_dir": 'where the cache lives ("" = <results>/.cache/data)',
}
PAIRINGS = ("first", "pattern", "all_pairs")
EXTENSIONS = (".png", ".jpg", ".jpeg", ".pgm", ".bmp", ".webp")
CACHES = ("none", "uint8")
DEFAULT_CACHE_DIR = Path("results") / ".cache" / "data"


def decode(data, size: int, channels: int, name: str) -> np.ndarray:
    """uint8 (channels, size, size) of an encoded image (a path or a file object); raises
    `BadSample` naming `name` when Pillow cannot decode it (unknown format, truncated, …)."""
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(data) as im:
            im.draft(mode, (size, size))  # JPEG: decode at a reduced DCT scale ≥ size
            if im.mode != mode:
                im = im.convert(mode)
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as e:
        raise BadSample(f"unreadable image {name!r}: {e}") from e
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


class FolderStore(Store):
    """Image files under `root`, by row; paths kept as one byte buffer + offsets."""

    images = True

    def __init__(self, root: Path, relpaths: list[str], size: int, channels: int):
        self.root = str(root)
        encoded = [p.encode("utf-8", "surrogateescape") for p in relpaths]
        self._buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self.size, self.channels = size, channels
        self.input_shape = (channels, size, size)

    def __len__(self) -> int:
        return len(self._ends)

    def relpath(self, row: int) -> str:
        start = int(self._ends[row - 1]) if row else 0
        return self._buf[start : int(self._ends[row])].tobytes().decode("utf-8", "surrogateescape")

    def path(self, row: int) -> str:
        return os.path.join(self.root, self.relpath(row))

    def read(self, row: int) -> np.ndarray:
        path = self.path(row)
        return decode(path, self.size, self.channels, path)

    def describe(self, row: int) -> str:
        return self.path(row)


def _params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Checked parameters (everything that can be checked without reading the folder)."""
    p = resolve("image_folder", cfg, DEFAULTS)
    check_choice(p, "pairing", PAIRINGS)
    check_int(p, "image_size", 8, 4096)
    if p["channels"] not in (1, 3) or isinstance(p["channels"], bool):
        raise ValueError(f"data.channels must be 1 or 3; got {p['channels']!r}")
    check_float(p, "test_fraction", 0.0, 1.0)
    check_choice(p, "on_bad_image", ("error", "skip"))
    check_choice(p, "cache", CACHES)
    if not isinstance(p["flip"], bool):
        raise ValueError(f"data.flip must be true or false; got {p['flip']!r}")
    if not isinstance(p["cache_dir"], str):
        raise ValueError(f"data.cache_dir must be a path string; got {p['cache_dir']!r}")
    try:
        p["_id_re"] = re.compile(p["id_pattern"])
    except (re.error, TypeError) as e:
        raise ValueError(f"data.id_pattern is not a valid regular expression: {e}") from e
    return p


def validate(cfg: Mapping[str, Any]) -> None:
    """Cheap check for suite validation: keys, values, and that `data.path` is a directory."""
    p = _params(cfg)
    if not p["path"]:
        raise ValueError(
            "data.path is required for data kind 'image_folder': a directory with one "
            "sub-directory of images per identity"
        )
    if not Path(p["path"]).is_dir():
        raise ValueError(f"data.path {p['path']!r} does not exist or is not a directory")


def cache_dir(p: Mapping[str, Any], cache_root: str | Path | None) -> Path:
    """`data.cache_dir`, else `<cache_root>/.cache/data`, else ./results/.cache/data."""
    if p["cache_dir"]:
        return Path(p["cache_dir"])
    return Path(cache_root) / ".cache" / "data" if cache_root else DEFAULT_CACHE_DIR


def _index(root: Path) -> tuple[list[str], list[int], list[str]]:
    """(relative paths, identity index, identity dir names) of every image file, sorted."""
    dirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not dirs:
        raise ValueError(f"data.path {str(root)!r} holds no identity directories")
    paths, labels = [], []
    for label, d in enumerate(dirs):
        names = sorted(
            e.name
            for e in os.scandir(root / d)
            if e.is_file() and os.path.splitext(e.name)[1].lower() in EXTENSIONS
        )
        paths += [f"{d}/{n}" for n in names]
        labels += [label] * len(names)
    return paths, labels, dirs


def _identifies(path: Path) -> bool:
    """Whether Pillow recognises the file's header (cheap: nothing is decoded)."""
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def _folder_key(root: Path, paths: list[str], size: int, channels: int) -> str:
    def parts():
        yield f"image_folder size={size} channels={channels}"
        for rel in paths:
            st = os.stat(root / rel)
            yield f"{rel}\t{st.st_size}\t{st.st_mtime_ns}"

    return content_key(parts())


def cached(
    p: Mapping[str, Any],
    store: Store,
    key: str,
    cache_root: str | Path | None,
    workers: int | None,
    info: dict[str, Any],
) -> tuple[Store, np.ndarray]:
    """`store` through its uint8 cache (produced by `workers` processes if absent) and the
    usable-rows mask; records cache_key / cache_build_s in `info`. With on_bad_image "error",
    an image that failed to decode is a ValueError naming it."""
    nw = default_workers() if workers is None else workers
    cache, bad, built_s = open_cache(store, key, cache_dir(p, cache_root), nw)
    info |= {"cache_key": key, "cache_build_s": built_s}
    if bad.any() and p["on_bad_image"] == "error":
        raise ValueError(
            f"unreadable image {store.describe(int(np.argmax(bad)))!r} ({int(bad.sum())} "
            "unreadable; set data.on_bad_image = 'skip' to skip them)"
        )
    return cache, ~bad


def build_image_folder(
    cfg: Mapping[str, Any],
    seed: int,
    *,
    cache_root: str | Path | None = None,
    workers: int | None = None,
) -> IvSData:
    """`build_data` for kind "image_folder" (module docstring). `workers` decode the cache when
    one is produced (None = `default_workers()`)."""
    validate(cfg)
    p = _params(cfg)
    size, channels = p["image_size"], p["channels"]
    root = Path(p["path"])
    paths, labels, dirs = _index(root)
    store: Store = FolderStore(root, paths, size, channels)
    quality = {"bad_images": 0, "single_image_identities": 0, "no_id_photo_identities": 0}
    info: dict[str, Any] = {"files": len(paths)}
    usable = np.ones(len(paths), dtype=bool)
    if p["cache"] == "uint8" and paths:
        key = _folder_key(root, paths, size, channels)
        store, usable = cached(p, store, key, cache_root, workers, info)
    elif p["on_bad_image"] == "skip":  # no cache: skip what Pillow cannot even identify
        usable = np.asarray([_identifies(root / rel) for rel in paths], dtype=bool)
    quality["bad_images"] = int((~usable).sum())
    labels_np = np.asarray(labels, dtype=np.int64)
    return _assemble(p, store, labels_np, len(dirs), usable, paths, quality, info, seed)


def _assemble(
    p: dict[str, Any],
    store: Store,
    labels: np.ndarray,
    n_ids: int,
    usable: np.ndarray,
    names: list[str],
    quality: dict[str, int],
    info: dict[str, Any],
    seed: int,
) -> IvSData:
    """Domains, skipped identities and the split (shared with recordio): rows of `store` with
    identity `labels` (n,), in per-identity order, of `n_ids` identities (some may have no
    row); only `usable` rows count; `names[row]` is the file name `id_pattern` looks at."""
    rows = np.nonzero(usable)[0]
    lab = labels[rows]
    domain = np.ones(len(rows), dtype=np.int64)
    keep = np.ones(len(rows), dtype=bool)
    # identities as runs of equal labels (rows are grouped by identity, in order)
    bounds = np.flatnonzero(np.diff(lab)) + 1 if len(lab) else np.array([], dtype=np.int64)
    starts = np.r_[0, bounds] if len(lab) else np.array([], dtype=np.int64)
    ends = np.r_[bounds, len(lab)] if len(lab) else np.array([], dtype=np.int64)
    id_re = p.get("_id_re")
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        if e - s < 2:
            quality["single_image_identities"] += 1
            keep[s:e] = False
            continue
        if p.get("pairing") == "pattern":
            hits = [i for i in range(s, e) if id_re.search(os.path.basename(names[rows[i]]))]
            if not hits:
                quality["no_id_photo_identities"] += 1
                keep[s:e] = False
                continue
            domain[hits[0]] = 0
        else:
            domain[s] = 0
    # identities with no usable image at all are single-image identities too
    quality["single_image_identities"] += n_ids - len(starts)
    rows, lab, domain = rows[keep], lab[keep], domain[keep]
    if len(np.unique(lab)) < 3:
        raise ValueError(
            f"data.path {p['path']!r}: {len(np.unique(lab))} identities with ≥ 2 usable images; "
            "need at least 3 (2 to train, 1 to test)"
        )
    info["train_and_test_samples"] = len(rows)

    def make_source(train_rows, id_rows, spot_rows) -> StreamSource:
        return StreamSource(
            store, train_rows, id_rows, spot_rows, flip=p["flip"], on_bad=p["on_bad_image"]
        )

    return split_source(
        rows,
        torch.from_numpy(lab),
        torch.from_numpy(domain),
        p["test_fraction"],
        seed,
        make_source,
        tuple(store.input_shape),
        info=info,
        all_pairs=p.get("pairing") == "all_pairs",
        quality=quality,
    )
