"""kind "recordio": insightface IndexedRecordIO read without mxnet, on files written here by a
minimal writer of the format (independent of the reader: its own struct code and splitting)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import build_data, validate_data
from harness.data.recordio import read_idx, read_record

MAGIC_BYTES = struct.pack("<I", 0xCED7230A)


def _frame(cflag: int, data: bytes) -> bytes:
    pad = (4 - len(data) % 4) % 4
    return MAGIC_BYTES + struct.pack("<I", (cflag << 29) | len(data)) + data + b"\0" * pad


def write_record(data: bytes) -> bytes:
    """dmlc-core RecordIOWriter::WriteRecord: the payload is cut where the magic occurs at a
    4-aligned position (the magic itself dropped), parts flagged 1 (first), 2, 3 (last)."""
    cuts = [i for i in range(0, len(data) - 3, 4) if data[i : i + 4] == MAGIC_BYTES]
    if not cuts:
        return _frame(0, data)
    parts, start = [], 0
    for c in cuts:
        parts.append(data[start:c])
        start = c + 4
    parts.append(data[start:])
    flags = [1] + [2] * (len(parts) - 2) + [3]
    return b"".join(_frame(f, p) for f, p in zip(flags, parts, strict=True))


def pack(label, image: bytes, rid: int = 0) -> bytes:
    """mx.recordio.pack: IRHeader(flag, label, id, id2) "IfQQ"; a list label → flag = count,
    the floats after the header."""
    if isinstance(label, list | tuple):
        head = struct.pack("<IfQQ", len(label), 0.0, rid, 0)
        return head + struct.pack(f"<{len(label)}f", *label) + image
    return struct.pack("<IfQQ", 0, float(label), rid, 0) + image


def jpeg(colour, size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_rec(path, records: dict[int, bytes]) -> None:
    """records: key -> payload; .rec and .idx (key\\toffset) written beside each other."""
    offsets, out = {}, bytearray()
    for key, payload in records.items():
        offsets[key] = len(out)
        out += write_record(payload)
    path.write_bytes(bytes(out))
    path.with_suffix(".idx").write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items()))


def colour(identity: int, j: int) -> tuple[int, int, int]:
    return (20 * identity + 10, 60 * j + 20, 128)


def dataset(path, per_id=(3, 2, 4, 2, 3, 2), header=False, multi=False) -> None:
    """Identities i with per_id[i] JPEGs; red encodes i, green the image. `header`: insightface
    layout (record 0 = (a, b), images 1..a−1, identity records a..b−1); `multi`: list labels."""
    records, key = {}, 1 if header else 0
    ranges = []
    for i, k in enumerate(per_id):
        start = key
        for j in range(k):
            label = [float(i), 0.5, 7.0] if multi else float(i)
            records[key] = pack(label, jpeg(colour(i, j)), key)
            key += 1
        ranges.append((start, key))
    if header:
        a = key
        for r in ranges:
            records[key] = pack([float(r[0]), float(r[1])], b"")
            key += 1
        records = {0: pack([float(a), float(key)], b""), **records}
    write_rec(path, records)


def red(x):
    return torch.round(((x[:, 0, 0, 0] + 1) / 2 * 255 - 10) / 20).long()


def green(x):
    return torch.round(((x[:, 1, 0, 0] + 1) / 2 * 255 - 20) / 60).long()


@pytest.mark.parametrize(("header", "multi"), [(False, False), (True, False), (False, True)])
def test_reads_identities_images_and_split(tmp_path, header, multi):
    rec = tmp_path / "train.rec"
    per_id = (3, 2, 4, 2, 3, 2)
    dataset(rec, per_id, header=header, multi=multi)
    cfg = {"kind": "recordio", "path": str(rec), "image_size": 8, "test_fraction": 0.34}
    validate_data(cfg)
    d = build_data(cfg, 0)
    assert d.input_shape == (3, 8, 8) and d.train.x is None
    assert d.info["header_record"] is header
    assert d.info["labels_from"] == ("identity records" if header else "image records")
    assert d.num_classes == 4 and len(d.train) + 2 == sum(per_id) - sum(
        per_id[int(i)] - 1 for i in red(d.test_embeddings(lambda x: x)[0])
    )
    x = d.probe_x(len(d.train))
    ident = red(x)
    # labels follow identities; the first record of an identity is its ID photo
    assert torch.equal(d.train.labels, torch.unique(ident, return_inverse=True)[1])
    assert torch.equal(d.train.domain == 0, green(x) == 0)
    assert [int((ident == i).sum()) for i in ident.unique()] == [per_id[i] for i in ident.unique()]
    ids, spots = d.test_embeddings(lambda x: x)
    assert torch.equal(red(ids), red(spots)) and not set(red(ids).tolist()) & set(ident.tolist())
    assert (green(ids) == 0).all() and (green(spots) == 1).all()
    # P×K batches stream like image folders
    xb, yb = next(d.train_batches(4, 2, 0, workers=0))
    assert xb.shape == (4, 3, 8, 8) and (yb.view(2, 2)[:, 0] == yb.view(2, 2)[:, 1]).all()


def test_header_ranges_that_do_not_partition_the_images_fall_back(tmp_path):
    rec = tmp_path / "h.rec"
    dataset(rec, header=True)
    idx = rec.with_suffix(".idx").read_text().splitlines()
    # drop the last identity record from the .idx: ranges no longer cover every image
    rec.with_suffix(".idx").write_text("\n".join(idx[:-1]) + "\n")
    d = build_data({"kind": "recordio", "path": str(rec), "image_size": 8}, 0)
    assert d.info["labels_from"] == "image records" and d.num_classes == 5


def test_payload_with_the_magic_is_split_and_joined(tmp_path):
    payload = b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + MAGIC_BYTES + b"xyz"
    framed = write_record(payload)
    assert framed.count(MAGIC_BYTES) == 4  # four parts, each with its own magic
    (tmp_path / "r.rec").write_bytes(b"\0" * 8 + framed)
    with open(tmp_path / "r.rec", "rb") as f:
        assert read_record(f, 8, "r.rec") == payload


def test_image_containing_the_magic(tmp_path):
    # a record whose JPEG bytes hold the magic at an aligned offset is still read intact
    img = jpeg((200, 10, 10))
    pad = (-(24 + len(img))) % 4
    payload = pack(0.0, img + b"\0" * pad + MAGIC_BYTES)  # trailing bytes after EOI are ignored
    recs = {k: pack(float(k // 2), jpeg(colour(k // 2, k % 2))) for k in range(1, 8)}
    write_rec(tmp_path / "m.rec", {0: payload, **recs})
    d = build_data({"kind": "recordio", "path": str(tmp_path / "m.rec"), "image_size": 8}, 0)
    assert len(d.train) + 2 == 8


def test_bad_input_names_the_file(tmp_path):
    rec = tmp_path / "t.rec"
    dataset(rec)
    cfg = {"kind": "recordio", "path": str(rec), "image_size": 8}
    idx = rec.with_suffix(".idx")
    lines = idx.read_text().splitlines()
    # .rec without its .idx: refused at validation
    idx.rename(tmp_path / "moved.idx")
    with pytest.raises(ValueError, match=r"t\.idx.* is missing"):
        validate_data(cfg)
    # a corrupt .idx line
    idx.write_text("\n".join([*lines[:3], "7\tnot-a-number", *lines[3:]]) + "\n")
    with pytest.raises(ValueError, match=r"t\.idx' line 4"):
        build_data(cfg, 0)
    with pytest.raises(ValueError, match="line 4"):
        read_idx(idx)
    # an offset past the end of the file, a truncated last record
    idx.write_text("\n".join(lines) + f"\n99\t{rec.stat().st_size + 100}\n")
    with pytest.raises(ValueError, match=r"t\.rec: record 99 .* beyond the end"):
        build_data(cfg, 0)
    idx.write_text("\n".join(lines) + "\n")
    data = rec.read_bytes()
    last = int(lines[-1].split()[1])
    rec.write_bytes(data[: last + 20])  # inside the last record's header
    with pytest.raises(ValueError, match=r"t\.rec record .*truncated"):
        build_data(cfg, 0)
    # an image record cut inside its JPEG: found when decoded, named by record
    rec.write_bytes(data[: len(data) - 200])
    d = build_data({**cfg, "test_fraction": 0.5}, 0)
    with pytest.raises(ValueError, match=r"t\.rec record \d+"):
        d.probe_x(len(d.train))
        d.test_embeddings(lambda x: x)
    # validation: missing file, unknown key
    with pytest.raises(ValueError, match=r"data\.path .*nope\.rec"):
        validate_data({**cfg, "path": str(tmp_path / "nope.rec")})
    with pytest.raises(ValueError, match=r"data\.id_pattern"):
        validate_data({**cfg, "id_pattern": "x"})


def test_cache_uint8_equals_streaming(tmp_path):
    rec = tmp_path / "c.rec"
    dataset(rec, header=True)
    cfg = {"kind": "recordio", "path": str(rec), "image_size": 8, "cache_dir": str(tmp_path / "c")}
    plain = build_data(cfg, 1)
    cached = build_data({**cfg, "cache": "uint8"}, 1, workers=0)
    assert cached.info["cache_build_s"] > 0
    assert torch.equal(plain.probe_x(100), cached.probe_x(100))
    again = build_data({**cfg, "cache": "uint8"}, 1, workers=0)
    assert (
        again.info["cache_build_s"] == 0.0 and again.info["cache_key"] == cached.info["cache_key"]
    )
    a, b = plain.train_batches(4, 2, 3), again.train_batches(4, 2, 3)
    for _ in range(5):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert np.array_equal(*(d.test_embeddings(lambda x: x)[1].numpy() for d in (plain, again)))
