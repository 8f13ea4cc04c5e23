"""The decoded-image cache (`data.cache = "uint8"`): every image of a data set decoded and
resized once, kept as a uint8 memory-mapped array that any later trial, seed or run on the same
data reads instead of decoding.

Layout under the cache directory (`data.cache_dir`, default `<results root>/.cache/data`):

    <key>/images.npy   uint8 (n, channels, size, size), row i = sample i of the store
    <key>/bad.npy      bool (n,): sample i could not be decoded (its image row is zeros)
    <key>.lock         lock file (fcntl.flock) held by the one process producing <key>

`key` is a content hash of what the images are made from (for a folder: every file's relative
path, size and modification time, plus image_size and channels — `content_key`), so a changed
file gives a new key and an old cache is simply not used. A cache is written under a temporary
name `<key>.partial-<pid>` and renamed to `<key>` only when complete: a producer killed midway
leaves no `<key>`, and the next producer deletes its leftovers. Concurrent trials take the lock:
one produces, the others wait on the lock and then read what it wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from harness.data.stream import BadSample, Store

BLOCK = 256  # images decoded per loader item while producing a cache
VERSION = 1  # part of the key: bump when the decoding changes


def content_key(parts: Iterable[str]) -> str:
    """SHA-256 (first 32 hex digits) of `parts`, one per line, plus the cache VERSION."""
    h = hashlib.sha256(f"hembench-uint8-cache v{VERSION}\n".encode())
    for p in parts:
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()[:32]


class CachedStore(Store):
    """A store read from a finished cache: uint8 rows of a read-only memory map (opened lazily in
    each process, so forking or pickling it never copies the array)."""

    images = True

    def __init__(self, directory: Path, names: Store):
        self.directory = Path(directory)
        self.names = names  # the store it caches, for `describe`
        self.input_shape = names.input_shape
        self._n = len(names)
        self._pid, self._array = -1, None

    def _images(self) -> np.ndarray:
        if self._array is None or self._pid != os.getpid():
            self._array = np.load(self.directory / "images.npy", mmap_mode="r")
            self._pid = os.getpid()
        return self._array

    def __len__(self) -> int:
        return self._n

    def read(self, row: int) -> np.ndarray:
        return np.array(self._images()[row])

    def describe(self, row: int) -> str:
        return self.names.describe(row)

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_pid": -1, "_array": None}


def open_cache(
    store: Store, key: str, cache_dir: Path, workers: int = 0
) -> tuple[CachedStore, np.ndarray, float]:
    """The cache of `store` under `cache_dir/key`, produced first if absent (module docstring).

    Returns (cached store, bad (n,) bool, seconds spent producing it (0.0 when it existed)).
    `workers` decoding processes produce it (0 = this process).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / key
    built = 0.0
    if not _complete(final, len(store)):
        with _locked(cache_dir / f"{key}.lock"):
            if not _complete(final, len(store)):  # another process may have finished it
                t0 = time.perf_counter()
                _produce(store, final, workers)
                built = time.perf_counter() - t0
    bad = np.load(final / "bad.npy")
    return CachedStore(final, store), bad, built


def _complete(final: Path, n: int) -> bool:
    try:
        meta = json.loads((final / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("n") == n and meta.get("version") == VERSION


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _produce(store: Store, final: Path, workers: int) -> None:
    """Decode every image of `store` into `final` (under the lock)."""
    for old in final.parent.glob(f"{final.name}.partial-*"):  # a killed producer's leftovers
        shutil.rmtree(old, ignore_errors=True)
    if final.exists():  # incomplete (no meta.json): never used, replaced
        shutil.rmtree(final)
    tmp = final.parent / f"{final.name}.partial-{os.getpid()}"
    tmp.mkdir()
    n, shape = len(store), tuple(store.input_shape)
    bad = np.zeros(n, dtype=bool)
    try:
        with open(tmp / "images.npy", "wb") as f:
            # written sequentially (no writable memory map: the producer's RSS stays small)
            header = {"descr": "|u1", "fortran_order": False, "shape": (n, *shape)}
            np.lib.format.write_array_header_2_0(f, header)
            for start, block, block_bad in _decoded_blocks(store, workers):
                f.write(np.ascontiguousarray(block).tobytes())
                bad[start : start + len(block)] = block_bad
        np.save(tmp / "bad.npy", bad)
        (tmp / "meta.json").write_text(
            json.dumps({"n": n, "shape": list(shape), "version": VERSION, "bad": int(bad.sum())})
        )
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _Blocks(Dataset):
    def __init__(self, store: Store):
        self.store = store

    def __len__(self) -> int:
        return (len(self.store) + BLOCK - 1) // BLOCK

    def __getitem__(self, b: int) -> tuple[int, np.ndarray, np.ndarray]:
        start = b * BLOCK
        rows = range(start, min(start + BLOCK, len(self.store)))
        out = np.zeros((len(rows), *self.store.input_shape), dtype=np.uint8)
        bad = np.zeros(len(rows), dtype=bool)
        for i, r in enumerate(rows):
            try:
                out[i] = self.store.read(r)
            except BadSample:
                bad[i] = True
        return start, out, bad


def _identity(item):
    return item


def _decoded_blocks(store: Store, workers: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    loader = DataLoader(
        _Blocks(store),
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity,
        prefetch_factor=2 if workers else None,
        generator=torch.Generator(),
    )
    yield from loader
