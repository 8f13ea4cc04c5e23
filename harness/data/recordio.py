"""insightface RecordIO (kind "recordio"): MXNet IndexedRecordIO files read in pure Python.

`data.path` is the `.rec` file; its index `<same name>.idx` must lie beside it. This is how
insightface ships MS1M-ArcFace (faces_emore), Glint360K and its CASIA-WebFace packing.

Format (dmlc-core recordio, little-endian), all that is read here:
- `.idx`: one line per record, `key<TAB>offset` (decimal), offset = byte position in `.rec`.
- a record at an offset: parts, each `uint32 magic 0xced7230a`, `uint32 lrec` (upper 3 bits
  cflag, lower 29 bits length), `length` bytes, zero padding to a multiple of 4. cflag 0 = the
  whole record; 1 / 2 / 3 = first / middle / last part of a record that the writer split where
  its payload contained the magic: the parts are joined with the magic between them.
- a record's payload: IRHeader `struct "<IfQQ"` = (flag, label, id, id2), 24 bytes; when
  flag > 0, `flag` float32 labels follow (the scalar label is then unused) and label[0] is the
  identity; then the encoded image (JPEG in insightface's releases).
- header variant (insightface): when record 0 has flag ≥ 2 and no image (nothing after its
  labels — an image record 0 with several labels, as im2rec writes, is not a header), its
  labels (a, b) say that records
  1..a−1 are images and a..b−1 are identity records (each with labels (start, stop) of its image
  records); only the image records are read as samples. Without it every record is an image.

Samples: the image records, grouped by identity (label, sorted), keys in order inside an
identity; the first is the ID photo (domain 0). With the header, identities are read from the
identity records' ranges (one read per identity); otherwise from each image record's label. Identities are split as for image folders.

Keys (defaults in DEFAULTS): `path`, `pairing` ("first" | "all_pairs", as image_folder),
`image_size`, `channels`, `test_fraction`, `on_bad_image`, `flip`, `cache`, `cache_dir` — all
as for image_folder (harness/data/image_folder.py). Building reads the index and the 24-byte
header of every image record, or of every identity record with the header (not the images).
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from harness.data.cache import content_key
from harness.data.image_folder import DEFAULTS as FOLDER_DEFAULTS
from harness.data.image_folder import _assemble, cached, decode
from harness.data.image_folder import _params as folder_params
from harness.data.ivs import IvSData
from harness.data.params import check_choice, resolve
from harness.data.stream import BadSample, PerProcessFile, Store

MAGIC = 0xCED7230A
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
_LEN_MASK = (1 << 29) - 1

DEFAULTS: dict[str, Any] = {k: v for k, v in FOLDER_DEFAULTS.items() if k not in ("id_pattern",)}
PAIRINGS = ("first", "all_pairs")
HELP: dict[str, str] = {
    "path": "the .rec file (insightface IndexedRecordIO); its .idx must lie beside it (required)",
    "pairing": '"first" (first record of an identity is its ID photo) or "all_pairs"',
    "image_size": "images are resized to channels × image_size × image_size",
    "channels": "1 = grey, 3 = RGB",
    "test_fraction": "share of identities held out for testing (identity-disjoint)",
    "on_bad_image": '"error" (fail naming the record) or "skip" (skip it, count bad_images)',
    "flip": "random horizontal flip of training images (seeded)",
    "cache": '"none" or "uint8" (decoded images kept in a memory-mapped file, reused)',
    "cache_dir": 'where the cache lives ("" = <results>/.cache/data)',
}


def idx_path(rec: str | Path) -> Path:
    """The `.idx` beside a `.rec`."""
    return Path(rec).with_suffix(".idx")


def read_idx(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) int64 of an .idx file, in file order; ValueError naming the file and the
    line for a malformed line."""
    keys, offsets = [], []
    with open(path, encoding="ascii", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                k, o = int(parts[0]), int(parts[1])
                if k < 0 or o < 0:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"{str(path)!r} line {n}: expected 'key<TAB>offset' (two non-negative "
                    f"integers); got {line.rstrip()[:80]!r}"
                ) from None
            keys.append(k)
            offsets.append(o)
    if not keys:
        raise ValueError(f"{str(path)!r} lists no records")
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def read_record(f, offset: int, name: str, limit: int | None = None) -> bytes:
    """The payload of the record at `offset` of the open .rec `f` (parts joined). With `limit`,
    at most about `limit` bytes of it (enough for a header). ValueError naming `name` for a bad
    magic or a record cut short by the end of the file."""
    f.seek(offset)
    out = bytearray()
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{name}: record at byte {offset} is truncated (end of file)")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise ValueError(
                f"{name}: no record at byte {offset} (magic {magic:#010x}, expected {MAGIC:#010x})"
            )
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        want = length if limit is None else min(length, max(0, limit - len(out)))
        data = f.read(want)
        if len(data) < want:
            raise ValueError(f"{name}: record at byte {offset} is truncated (end of file)")
        out += data
        if cflag in (0, 3) or (limit is not None and len(out) >= limit):
            return bytes(out)
        f.seek((length + 3) // 4 * 4 - want, os.SEEK_CUR)
        out += struct.pack("<I", MAGIC)


def unpack_header(payload: bytes, name: str) -> tuple[int, np.ndarray, int]:
    """(flag, labels float32 (max(flag, 1),), image offset in payload) of a record payload."""
    if len(payload) < IR_SIZE:
        raise ValueError(f"{name}: record shorter than its {IR_SIZE}-byte header")
    flag, label, _, _ = struct.unpack(IR_FORMAT, payload[:IR_SIZE])
    if flag == 0:
        return 0, np.asarray([label], dtype=np.float32), IR_SIZE
    end = IR_SIZE + 4 * flag
    if len(payload) < end:
        raise ValueError(f"{name}: record header announces {flag} labels, payload too short")
    return flag, np.frombuffer(payload[IR_SIZE:end], dtype="<f4").astype(np.float32), end


class RecordStore(Store):
    """Image records of a .rec file, by row (`offsets[row]`); one file handle per process."""

    images = True

    def __init__(self, rec: str, keys: np.ndarray, offsets: np.ndarray, size: int, channels: int):
        self.rec, self.keys, self.offsets = rec, keys, offsets
        self.size, self.channels = size, channels
        self.input_shape = (channels, size, size)
        self._file = PerProcessFile(rec)

    def __len__(self) -> int:
        return len(self.offsets)

    def describe(self, row: int) -> str:
        return f"{self.rec} record {int(self.keys[row])}"

    def read(self, row: int) -> np.ndarray:
        name = self.describe(row)
        try:
            payload = read_record(self._file.get(), int(self.offsets[row]), name)
            _, _, start = unpack_header(payload, name)
        except ValueError as e:
            raise BadSample(str(e)) from e
        return decode(io.BytesIO(payload[start:]), self.size, self.channels, name)


def _params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    p = resolve("recordio", cfg, DEFAULTS)
    check_choice(p, "pairing", PAIRINGS)
    return folder_params({**p, "pairing": "first"}) | {"pairing": p["pairing"]}


def validate(cfg: Mapping[str, Any]) -> None:
    """Cheap check for suite validation: keys, values, the .rec and its .idx exist."""
    p = _params(cfg)
    if not p["path"]:
        raise ValueError("data.path is required for data kind 'recordio': the .rec file")
    rec = Path(p["path"])
    if not rec.is_file():
        raise ValueError(f"data.path {str(rec)!r} does not exist or is not a file")
    if not idx_path(rec).is_file():
        raise ValueError(
            f"data.path {str(rec)!r}: its index {str(idx_path(rec))!r} is missing (an "
            "IndexedRecordIO .rec needs the .idx written with it)"
        )


def index_records(rec: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(keys, offsets, identity labels int64) of the image records of `rec`, grouped by
    identity (sorted labels, keys in order inside one), and facts for `info`."""
    rec = Path(rec)
    keys, offsets = read_idx(idx_path(rec))
    order = np.argsort(keys, kind="stable")
    keys, offsets = keys[order], offsets[order]
    name = str(rec)
    size = rec.stat().st_size
    if int(offsets.max()) >= size:
        bad = int(keys[np.argmax(offsets >= size)])
        raise ValueError(f"{name}: record {bad} of the .idx lies beyond the end of the file")
    info: dict[str, Any] = {"records": len(keys), "header_record": False}
    with open(rec, "rb") as f:
        if keys[0] == 0:
            payload = read_record(f, int(offsets[0]), f"{name} record 0")
            flag, lab, start = unpack_header(payload, name)
            if flag >= 2 and start == len(payload):  # insightface header: images 1..a−1
                a, b = int(lab[0]), int(lab[1])
                info |= {"header_record": True, "identity_records": b - a}
                labels = _labels_from_ranges(f, keys, offsets, a, b, name)
                if labels is not None:
                    info["labels_from"] = "identity records"
                    images = (keys >= 1) & (keys < a)
                    keys, offsets, labels = keys[images], offsets[images], labels[images]
                    order = np.lexsort((keys, labels))
                    return keys[order], offsets[order], labels[order], info
                images = (keys >= 1) & (keys < a)
                keys, offsets = keys[images], offsets[images]
        info["labels_from"] = "image records"
        labels = np.empty(len(keys), dtype=np.int64)
        for i, off in enumerate(offsets.tolist()):
            limit = IR_SIZE + 64
            _, lab, _ = unpack_header(read_record(f, off, f"{name} record {keys[i]}", limit), name)
            labels[i] = int(lab[0])
    order = np.lexsort((keys, labels))
    return keys[order], offsets[order], labels[order], info


def _labels_from_ranges(
    f, keys: np.ndarray, offsets: np.ndarray, a: int, b: int, name: str
) -> np.ndarray | None:
    """With insightface's header, identity i (record a + i) holds the image records
    [start, stop) of its labels: identity labels for every record key in one read per identity
    (MS1M: 85k reads instead of 5.8 M). None when the identity records are missing from the
    .idx or their ranges do not partition the image records 1..a−1 (then every image record's
    own label is read instead). Non-image keys get label −1."""
    where = {int(k): int(o) for k, o in zip(keys.tolist(), offsets.tolist(), strict=True)}
    labels = np.full(len(keys), -1, dtype=np.int64)
    pos = np.searchsorted(keys, np.arange(1, a))
    if len(keys) == 0 or not np.array_equal(keys[np.minimum(pos, len(keys) - 1)], np.arange(1, a)):
        return None  # not every image key 1..a−1 is indexed
    covered = 0
    for ident, key in enumerate(range(a, b)):
        if key not in where:
            return None
        flag, lab, _ = unpack_header(read_record(f, where[key], f"{name} record {key}", 64), name)
        if flag < 2:
            return None
        start, stop = int(lab[0]), int(lab[1])
        if not 1 <= start <= stop <= a:
            return None
        labels[pos[start - 1 : stop - 1]] = ident
        covered += stop - start
    if covered != a - 1 or (labels[pos] < 0).any():
        return None
    return labels


def build_recordio(
    cfg: Mapping[str, Any],
    seed: int,
    *,
    cache_root: str | Path | None = None,
    workers: int | None = None,
) -> IvSData:
    """`build_data` for kind "recordio" (module docstring)."""
    validate(cfg)
    p = _params(cfg)
    size, channels = p["image_size"], p["channels"]
    rec = Path(p["path"])
    keys, offsets, labels, info = index_records(rec)
    store: Store = RecordStore(str(rec), keys, offsets, size, channels)
    quality = {"bad_images": 0, "single_image_identities": 0, "no_id_photo_identities": 0}
    usable = np.ones(len(keys), dtype=bool)
    if p["cache"] == "uint8":
        parts = [f"recordio size={size} channels={channels}"]
        for f in (rec, idx_path(rec)):
            st = f.stat()
            parts.append(f"{f.resolve()}\t{st.st_size}\t{st.st_mtime_ns}")
        store, usable = cached(p, store, content_key(parts), cache_root, workers, info)
    quality["bad_images"] = int((~usable).sum())
    n_ids = len(np.unique(labels))
    names = [""] * len(keys)
    return _assemble(p, store, labels, n_ids, usable, names, quality, info, seed)
