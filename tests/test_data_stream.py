"""Streaming image data: the same batches with or without worker processes, seeded flips, the
uint8 cache (reuse, content key, partial and concurrent producers), bad files, validation."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import build_data, validate_data
from harness.data.stream import normalize


def write_folder(root, per_id=(3, 2, 4, 3, 2, 5, 3, 2), size=(14, 12)) -> None:
    """Identity i, image j: left half red = (20·i + 10) mod 240, right half red = 250;
    green = 40·j."""
    for i, k in enumerate(per_id):
        d = root / f"id{i:03d}"
        d.mkdir(parents=True)
        for j in range(k):
            a = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            a[:, : size[0] // 2, 0] = (20 * i + 10) % 240
            a[:, size[0] // 2 :, 0] = 250
            a[:, :, 1] = 40 * j
            Image.fromarray(a).save(d / f"{j:02d}.png")


def cfg_of(root, **kw):
    return {"kind": "image_folder", "path": str(root), "image_size": 8, "test_fraction": 0.25} | kw


def take(it, n):
    return [next(it) for _ in range(n)]


def left_is_bright(x):
    """Per sample: the left column is the 250 half (i.e. the image is mirrored)."""
    return x[:, 0, 0, 0] > x[:, 0, 0, -1]


def test_same_batches_whatever_the_workers_and_seeded_flips(tmp_path):
    write_folder(tmp_path)
    d = build_data(cfg_of(tmp_path), 0)
    assert d.train.x is None and d.source is not None
    in_process = take(d.train_batches(6, 3, 5, workers=0), 6)
    two_workers = take(d.train_batches(6, 3, 5, workers=2), 6)
    for (xa, ya), (xb, yb) in zip(in_process, two_workers, strict=True):
        assert xa.dtype == torch.float32 and xa.shape == (6, 3, 8, 8) and ya.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert (ya.view(2, 3) == ya.view(2, 3)[:, :1]).all()  # P identities × K photos
    # uint8 batches (to normalise on the device) are the same pixels
    raw = take(d.train_batches(6, 3, 5, workers=1, uint8=True), 6)
    for (xa, ya), (xr, yr) in zip(in_process, raw, strict=True):
        assert xr.dtype == torch.uint8 and torch.equal(normalize(xr), xa) and torch.equal(ya, yr)
    flips = torch.cat([left_is_bright(x) for x, _ in in_process])
    assert 0 < flips.sum() < flips.numel()  # about half are mirrored
    # another seed: other batches; flip = false: never mirrored, otherwise the same batches
    other = take(d.train_batches(6, 3, 6), 6)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(in_process, other, strict=True))
    plain = build_data(cfg_of(tmp_path, flip=False), 0)
    unflipped = take(plain.train_batches(6, 3, 5), 6)
    assert not any(left_is_bright(x).any() for x, _ in unflipped)
    for (xa, ya), (xb, yb) in zip(in_process, unflipped, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa[..., ::1].flip(-1)[left_is_bright(xa)],
                                                   xb[left_is_bright(xa)])  # fmt: skip
    # the ID photo (first file) comes first in each identity's group
    x0, _ = unflipped[0]
    green = torch.round((x0[:, 1, 0, 0] + 1) / 2 * 255 / 40).long().view(2, 3)
    assert (green[:, 0] == 0).all() or d.train.domain.eq(0).sum() == 0


def test_reused_worker_buffers_never_change_a_yielded_batch(tmp_path):
    """Workers reuse shared-memory batch buffers (stream.RING); batches kept by the consumer
    must stay as drawn, over many more batches than the ring holds."""
    write_folder(tmp_path, per_id=(2,) * 30)
    d = build_data(cfg_of(tmp_path, image_size=8), 0)
    expected = take(d.train_batches(4, 2, 1), 40)
    for uint8 in (False, True):
        kept = take(d.train_batches(4, 2, 1, workers=2, uint8=uint8), 40)
        test_side = list(d.source.blocks(d.source.train_rows, 3, workers=2))
        assert torch.equal(torch.cat(test_side), d.probe_x(len(d.train)))
        for (xa, ya), (xb, yb) in zip(expected, kept, strict=True):
            assert torch.equal(xa, normalize(xb)) and torch.equal(ya, yb)


def test_resumed_batches_equal_the_uninterrupted_ones(tmp_path):
    write_folder(tmp_path)
    d = build_data(cfg_of(tmp_path), 0)
    whole = take(d.train_batches(4, 2, 9), 7)
    resumed = take(d.train_batches(4, 2, 9, start=4, workers=2), 3)
    for (xa, ya), (xb, yb) in zip(whole[4:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # flips included


def test_batch_shape_errors_explain_p_by_k(tmp_path):
    write_folder(tmp_path)
    d = build_data(cfg_of(tmp_path), 0)
    with pytest.raises(ValueError, match=r"multiple of the samples per identity k=3"):
        d.train_batches(8, 3, 0)
    # only one identity has 5 photos
    with pytest.raises(ValueError, match=r"needs 2 training identities with ≥ 5 photos"):
        d.train_batches(10, 5, 0)


def test_test_side_streams_in_blocks(tmp_path):
    write_folder(tmp_path)
    d = build_data(cfg_of(tmp_path), 0)
    blocks = []

    def embed(x):
        blocks.append(x.shape[0])
        return x.flatten(1)[:, :4]

    ids, spots = d.test_embeddings(embed, block=1)
    again = d.test_embeddings(lambda x: x.flatten(1)[:, :4], block=2, workers=2)
    assert blocks == [1, 1, 1, 1] and torch.equal(ids, again[0]) and torch.equal(spots, again[1])
    assert d.probe_x(3).shape == (3, 3, 8, 8)
    assert not left_is_bright(d.probe_x(100)).any()  # probes are never flipped


def test_cache_is_reused_keyed_by_content_and_never_partial(tmp_path):
    root, cache = tmp_path / "faces", tmp_path / "cache"
    write_folder(root)
    cfg = cfg_of(root, cache="uint8", cache_dir=str(cache))
    first = build_data(cfg, 0, workers=0)
    key = first.info["cache_key"]
    assert first.info["cache_build_s"] > 0 and (cache / key / "images.npy").is_file()
    images = np.load(cache / key / "images.npy", mmap_mode="r")
    assert images.dtype == np.uint8 and images.shape == (24, 3, 8, 8)
    second = build_data(cfg, 1, workers=0)  # another seed, same data: reused
    assert second.info["cache_build_s"] == 0.0 and second.info["cache_key"] == key
    streamed = build_data(cfg_of(root), 1)
    for (xa, ya), (xb, yb) in zip(
        take(second.train_batches(4, 2, 0, workers=2), 4),
        take(streamed.train_batches(4, 2, 0), 4),
        strict=True,
    ):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # a producer killed midway left a partial directory; an incomplete <key> has no meta.json
    (cache / key / "meta.json").unlink()
    (cache / f"{key}.partial-999999").mkdir()
    rebuilt = build_data(cfg, 0, workers=0)
    assert rebuilt.info["cache_build_s"] > 0 and not list(cache.glob("*.partial-*"))
    # a changed file (size / mtime) gives another key
    f = root / "id000" / "00.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert build_data(cfg, 0, workers=0).info["cache_key"] != key
    # the default directory: <cache_root>/.cache/data
    d = build_data(cfg_of(root, cache="uint8"), 0, cache_root=tmp_path / "results", workers=0)
    assert (tmp_path / "results" / ".cache" / "data" / d.info["cache_key"]).is_dir()


def _build_in_child(args):
    cfg, out = args
    d = build_data(cfg, 0, workers=0)
    out.put((d.info["cache_key"], d.info["cache_build_s"]))


def test_concurrent_trials_produce_the_cache_once(tmp_path):
    root = tmp_path / "faces"
    write_folder(root, per_id=(6,) * 40, size=(64, 64))
    cfg = cfg_of(root, cache="uint8", cache_dir=str(tmp_path / "cache"), image_size=32)
    ctx = mp.get_context("fork")  # fork: no torch re-import per child (spawn: ~4 s each)
    out = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=((cfg, out),)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({k for k, _ in results}) == 1
    assert sum(built > 0 for _, built in results) == 1  # one produced, the others waited


def test_bad_files(tmp_path):
    cache = str(tmp_path / "cache")
    tmp_path = tmp_path / "faces"
    write_folder(tmp_path)
    (tmp_path / "id000" / "zz_text.jpg").write_bytes(b"not an image")
    good = (tmp_path / "id001" / "00.png").read_bytes()
    (tmp_path / "id001" / "01.png").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "id009").mkdir()  # an identity without images
    # with the cache, every file is decoded once: bad ones are known before the split
    with pytest.raises(
        ValueError, match=r"unreadable image .*(zz_text\.jpg|01\.png).*2 unreadable"
    ):
        build_data(cfg_of(tmp_path, cache="uint8", cache_dir=cache), 0, workers=0)
    d = build_data(cfg_of(tmp_path, cache="uint8", cache_dir=cache, on_bad_image="skip"), 0)
    # id001 kept one usable image, id009 none: both are skipped single-image identities
    assert d.quality == {"bad_images": 2, "single_image_identities": 2, "no_id_photo_identities": 0}
    assert "bad_images=2" in d.quality_summary()
    # without it, "skip" drops files Pillow cannot identify; the truncated one streams blank
    d = build_data(cfg_of(tmp_path, on_bad_image="skip"), 0)
    assert d.quality["bad_images"] == 1 and d.quality["single_image_identities"] == 1
    # "error" fails when a worker meets the file, naming it
    d = build_data(cfg_of(tmp_path, test_fraction=0.2), 3)
    with pytest.raises(ValueError, match=r"unreadable image .*(zz_text\.jpg|01\.png)"):
        for _ in d.train_batches(2, 2, 0, workers=2):
            pass
    # a folder without any identity of ≥ 2 usable images
    empty = tmp_path.parent / "few"
    for i in range(4):
        (empty / f"p{i}").mkdir(parents=True)
        Image.new("RGB", (9, 9)).save(empty / f"p{i}" / "a.png")
    with pytest.raises(ValueError, match="identities with ≥ 2 usable images"):
        build_data(cfg_of(empty), 0)


def test_validation_is_cheap_and_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"data\.path is required"):
        validate_data({"kind": "image_folder"})
    with pytest.raises(ValueError, match=r"data\.path .*missing_dir"):
        validate_data({"kind": "image_folder", "path": str(tmp_path / "missing_dir")})
    with pytest.raises(ValueError, match=r"data\.cache"):
        validate_data({"kind": "image_folder", "path": str(tmp_path), "cache": "float"})
    with pytest.raises(ValueError, match=r"data\.flip"):
        validate_data({"kind": "image_folder", "path": str(tmp_path), "flip": "yes"})
    with pytest.raises(ValueError, match=r"data\.labels_path .*y\.npy"):
        np.save(tmp_path / "x.npy", np.zeros((4, 2)))
        validate_data({"kind": "features", "path": str(tmp_path / "x.npy"), "labels_path": "y.npy"})
    t0 = time.perf_counter()
    validate_data({"kind": "image_folder", "path": str(tmp_path)})  # nothing is listed
    assert time.perf_counter() - t0 < 0.5


def test_shipped_faces_folder_suite(tmp_path):
    """suites/faces_folder.toml: refused until `data.path` is set, naming the key; valid once
    it points at a folder; its trial runs on a tiny folder (smaller model and input)."""
    from pathlib import Path

    from harness.suite import SuiteError, load_suite, parse_suite
    from harness.trial import run_trial

    shipped = Path(__file__).resolve().parents[1] / "suites" / "faces_folder.toml"
    with pytest.raises(SuiteError, match=r"faces_folder\.toml: .*data\.path is required"):
        load_suite(shipped)
    root = tmp_path / "faces"
    write_folder(root, per_id=(3,) * 12)
    text = (
        shipped.read_text()
        .replace('path = ""', f'path = "{root}"')
        .replace("far = [1e-2, 1e-3, 1e-4]", "far = [0.5]")  # a 12-identity folder: few pairs
        .replace("test_fraction = 0.05", "test_fraction = 0.25")
    )
    suite = parse_suite(text, path="faces_folder.toml")
    assert len(suite.trials) == 5 and suite.trials[0].data.params()["cache"] == "uint8"
    tiny = (
        text.replace('kind = "iresnet18"', 'kind = "cnn_small"\nwidth = 4')
        .replace("image_size = 112", f'image_size = 16\ncache_dir = "{tmp_path / "cache"}"')
        .replace("embedding = 512", "embedding = 8")
        .replace("steps = 20000", "steps = 2")
        .replace("batch = 128", "batch = 8")
        .replace("lr_warmup = 500", "lr_warmup = 0")
        .replace("checkpoint_every = 2000", "checkpoint_every = 0")
        .replace('precision = "bf16"', 'precision = "fp32"')
        .replace('device = "auto"', 'device = "cpu"')
        .replace('workers = "auto"', "workers = 0")
    )
    row, _ = run_trial(parse_suite(tiny).trials[0])
    assert row["bad_images"] == 0 and 0.0 <= row["tar@5e-1"] <= 1.0
