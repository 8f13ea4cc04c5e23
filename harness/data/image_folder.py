"""Face images in one directory per identity (kind "image_folder").

Layout: `path/<identity>/<image>.{png,jpg,jpeg,pgm}`, any number of images per identity,
identities in sorted directory-name order, images in sorted file-name order.

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
- `image_size`, `channels` (1 = grey, 3 = RGB): every image is resized (bilinear) to
  channels×image_size×image_size and normalised to [−1, 1]: x = (pixel/255 − 0.5)/0.5.
- `test_fraction`: share of identities held out (identity-disjoint, seeded).
- `on_bad_image`: "error" (raise ValueError naming the file) or "skip" (warn, count).
Identities left with a single image are skipped with a warning and counted. The counts are in
`IvSData.info`: single_image_identities, no_id_photo_identities, bad_images.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from harness.data.ivs import IvSData, split_identities
from harness.data.params import check_choice, check_float, check_int, resolve

DEFAULTS: dict[str, Any] = {
    "path": "",
    "pairing": "first",
    "id_pattern": r"(?i)(^|[_-])id([_.-]|$)",
    "image_size": 112,
    "channels": 3,
    "test_fraction": 0.2,
    "on_bad_image": "error",
}
PAIRINGS = ("first", "pattern", "all_pairs")
EXTENSIONS = (".png", ".jpg", ".jpeg", ".pgm")


def _read(path: Path, size: int, channels: int) -> np.ndarray | None:
    """(channels, size, size) float32 in [−1, 1], or None when Pillow cannot decode the file."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError):
        return None
    a = a[None] if channels == 1 else a.transpose(2, 0, 1)
    return (a / 255.0 - 0.5) / 0.5


def build_image_folder(cfg: Mapping[str, Any], seed: int) -> IvSData:
    """`build_data` for kind "image_folder" (module docstring)."""
    p = resolve("image_folder", cfg, DEFAULTS)
    pairing = check_choice(p, "pairing", PAIRINGS)
    size = check_int(p, "image_size", 8)
    channels = p["channels"]
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 or 3; got {channels!r}")
    fraction = check_float(p, "test_fraction", 0.0, 1.0)
    on_bad = check_choice(p, "on_bad_image", ("error", "skip"))
    try:
        id_re = re.compile(p["id_pattern"])
    except re.error as e:
        raise ValueError(f"data.id_pattern is not a valid regular expression: {e}") from e
    root = Path(p["path"]) if p["path"] else None
    if root is None or not root.is_dir():
        raise ValueError(f"data.path must be an existing directory; got {p['path']!r}")
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not dirs:
        raise ValueError(f"data.path {str(root)!r} holds no identity directories")

    counts = {"single_image_identities": 0, "no_id_photo_identities": 0, "bad_images": 0}
    xs, labels, domains = [], [], []
    for label, d in enumerate(dirs):
        images = []
        for f in sorted(f for f in d.iterdir() if f.suffix.lower() in EXTENSIONS):
            a = _read(f, size, channels)
            if a is None:
                if on_bad == "error":
                    raise ValueError(
                        f"unreadable image {str(f)!r} (set data.on_bad_image = 'skip' to skip it)"
                    )
                warnings.warn(f"skipping unreadable image {f}", stacklevel=2)
                counts["bad_images"] += 1
                continue
            images.append((f.name, a))
        if len(images) < 2:
            warnings.warn(
                f"skipping identity {d.name!r}: {len(images)} usable image(s)", stacklevel=2
            )
            counts["single_image_identities"] += 1
            continue
        if pairing != "pattern":
            id_index = 0
        else:
            matches = [i for i, (name, _) in enumerate(images) if id_re.search(name)]
            if not matches:
                warnings.warn(
                    f"skipping identity {d.name!r}: no file matches id_pattern", stacklevel=2
                )
                counts["no_id_photo_identities"] += 1
                continue
            id_index = matches[0]
        for i, (_, a) in enumerate(images):
            xs.append(a)
            labels.append(label)
            domains.append(0 if i == id_index else 1)
    if not xs:
        raise ValueError(f"data.path {str(root)!r}: no identity with ≥ 2 readable images")
    return split_identities(
        torch.from_numpy(np.stack(xs)),
        torch.tensor(labels),
        torch.tensor(domains),
        fraction,
        seed,
        info=counts,
        all_pairs=pairing == "all_pairs",
    )
