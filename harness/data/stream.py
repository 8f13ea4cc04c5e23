"""Sample stores and their loaders: what lets a dataset stay on disk until a batch needs it.

A `Store` holds n samples addressed by row (0..n−1) and reads one at a time:

- `ArrayStore`: rows of a numpy array, typically a read-only memory map of a .npy file
  (kind "features"); `read` returns float32 (*input_shape).
- image stores (`FolderStore` in image_folder.py, `RecordStore` in recordio.py, `CachedStore`
  in cache.py): `read` returns uint8 (channels, size, size); `normalize` maps batches of it to
  [−1, 1] with x = pixel·(2/255) − 1, the normalisation of every image kind.

`StreamSource` = a store plus the rows of the training samples and of both test sides; it is
what `IvSData` holds for kinds that do not keep their samples in memory. Training batches come
from a `torch.utils.data.DataLoader` whose `batch_sampler` yields, per batch, the P×K rows (from
`PairBatchSampler`, seeded) together with their labels and flip decisions (from a second seeded
stream), so a batch is the same whether it is decoded in-process (`workers = 0`) or by any
number of worker processes. Stores hold only numpy arrays and paths (no per-sample Python
objects), so forked workers do not copy them page by page, and they reopen their files in each
process.
"""

from __future__ import annotations

import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

PREFETCH = 4  # batches prefetched per worker


class BadSample(ValueError):
    """A sample that cannot be read (undecodable image, truncated record); names the file."""


class Store(ABC):
    """n samples of one shape, read by row (module docstring)."""

    #: shape of one sample as returned by `read(row)`
    input_shape: tuple[int, ...]
    #: True: `read` returns uint8 pixels (normalised by `normalize`, flippable)
    images: bool = True

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, row: int) -> np.ndarray:
        """Sample `row`; raises `BadSample` naming the file when it cannot be read."""

    def describe(self, row: int) -> str:
        """Where sample `row` comes from, for error messages."""
        return f"row {row}"


class ArrayStore(Store):
    """Rows of a numpy array (a memory map stays one: only the rows read are paged in)."""

    images = False

    def __init__(self, array: np.ndarray):
        self.array = array
        self.input_shape = tuple(array.shape[1:])

    def __len__(self) -> int:
        return self.array.shape[0]

    def read(self, row: int) -> np.ndarray:
        return np.asarray(self.array[row], dtype=np.float32)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), *input_shape), one fancy-indexing read."""
        return np.asarray(self.array[np.asarray(rows)], dtype=np.float32)


class PerProcessFile:
    """A binary file handle reopened in every process (forked DataLoader workers must not share
    the parent's file offset)."""

    def __init__(self, path: str):
        self.path = path
        self._pid = -1
        self._f = None

    def get(self):
        if self._pid != os.getpid() or self._f is None:
            self._f = open(self.path, "rb")  # noqa: SIM115 - kept open for the process
            self._pid = os.getpid()
        return self._f

    def __getstate__(self) -> dict:
        return {"path": self.path, "_pid": -1, "_f": None}


@dataclass(frozen=True)
class StreamSource:
    """A store and the rows (np.int64 arrays of store rows) of the training samples (aligned
    with `Split.labels`) and of the two test sides. `flip`: training-time horizontal flip.
    `on_bad`: "error" (a sample that fails to read raises `BadSample` naming the file) or
    "skip" (it is fed as a blank sample: all zeros, i.e. a black image)."""

    store: Store
    train_rows: np.ndarray
    test_id_rows: np.ndarray
    test_spot_rows: np.ndarray
    flip: bool = False
    on_bad: str = "error"

    def take(self, rows: np.ndarray) -> torch.Tensor:
        """float32 (len(rows), *input_shape) decoded in this process, unflipped."""
        if isinstance(self.store, ArrayStore):
            return torch.from_numpy(self.store.read_rows(rows))
        ds = _RowsDataset(self.store, self.on_bad)
        x, _ = _Collate(None)([ds[(int(r), 0, False)] for r in np.asarray(rows)])
        return normalize(x)

    def blocks(self, rows: np.ndarray, block: int, workers: int = 0) -> Iterator[torch.Tensor]:
        """float32 blocks of up to `block` samples of `rows`, in order, unflipped; decoded by
        `workers` processes (0 = in this one)."""
        rows = np.asarray(rows, dtype=np.int64)
        if isinstance(self.store, ArrayStore) or workers == 0:
            for s in range(0, len(rows), block):
                yield self.take(rows[s : s + block])
            return
        spans = [
            [(int(r), 0, False) for r in rows[s : s + block]] for s in range(0, len(rows), block)
        ]
        for x, _ in _decoded(self.store, self.on_bad, spans, block, workers, torch.Generator()):
            yield normalize(x) if x.dtype == torch.uint8 else _copy(x)

    def train_batches(
        self,
        index_batches: Iterator[torch.Tensor],
        labels: torch.Tensor,
        seed: int,
        workers: int,
        pin_memory: bool,
        start: int = 0,
        uint8: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) for each batch of training positions from `index_batches` (endless, all of
        one size), whose first batch is batch number `start` of the run: the flips of batch b
        are drawn from a generator seeded by (seed, b), so a resumed run flips as the
        uninterrupted one.

        Workers decode and flip a whole batch into one uint8 array in shared memory
        (`_decoded`): a quarter of the bytes of float32 to hand between processes, which is
        what limits a loader of small images. This process then converts it (`normalize`),
        unless `uint8` (images only): then x stays uint8 pixels, to be normalised on the device
        with `normalize` (4× less host-to-device traffic)."""
        rows, lab = self.train_rows, labels.numpy()
        if isinstance(self.store, ArrayStore):  # already in (mapped) memory: no loader
            for idx in index_batches:
                x = torch.from_numpy(self.store.read_rows(rows[idx.numpy()]))
                yield _pin(x, pin_memory), _pin(labels[idx], pin_memory)
            return
        index_batches = iter(index_batches)
        first = next(index_batches)

        def items() -> Iterator[list[tuple[int, int, bool]]]:
            for b, idx in enumerate(itertools.chain([first], index_batches), start):
                pos = idx.numpy()
                if self.flip and self.store.images:
                    gen = torch.Generator().manual_seed(_stream_seed(seed, 1, b))
                    flips = (torch.rand(len(pos), generator=gen) < 0.5).tolist()
                else:
                    flips = [False] * len(pos)
                yield [
                    (int(r), int(y), f) for r, y, f in zip(rows[pos], lab[pos], flips, strict=True)
                ]

        gen = torch.Generator().manual_seed(_stream_seed(seed, 2))
        for x, y in _decoded(self.store, self.on_bad, items(), len(first), workers, gen):
            x = _copy(x) if uint8 or x.dtype != torch.uint8 else normalize(x)  # (RING)
            yield _pin(x, pin_memory), _pin(y, pin_memory)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels p (any device) → float32 p·(2/255) − 1 ∈ [−1, 1] (two float32 roundings),
    the normalisation of every image kind; float input is returned as float32."""
    if x.dtype != torch.uint8:
        return x.float()
    if x.device.type == "cpu":  # numpy: one thread, no OpenMP wake-ups (5-7x faster when the
        out = np.multiply(x.numpy(), _SCALE, dtype=np.float32)  # CPU is shared)
        out -= 1.0
        return torch.from_numpy(out)
    return x.float().mul_(float(_SCALE)).sub_(1.0)


_SCALE = np.float32(2.0 / 255.0)


def _copy(x: torch.Tensor) -> torch.Tensor:
    """A CPU tensor copied out of a worker's reused buffer (RING) by numpy: torch's copy of a
    batch-sized tensor runs on its OpenMP threads, whose spin-wait after the copy took ~0.1 ms
    of CPU per 112 × 112 image from the decoding workers on a 2-core machine."""
    return torch.from_numpy(x.numpy().copy())


def _stream_seed(seed: int, *stream: int) -> int:
    state = np.random.SeedSequence([seed, *stream]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def _pin(x: torch.Tensor, pin: bool) -> torch.Tensor:
    return x.pin_memory() if pin and torch.cuda.is_available() else x


class _RowsDataset(Dataset):
    """Map-style dataset over a store; an item (row, label, flip) gives (the sample as the store
    reads it — uint8 pixels for images —, mirrored when `flip`, label). A sample that cannot be
    read raises `BadSample` ("error") or is replaced by zeros ("skip": a black image)."""

    def __init__(self, store: Store, on_bad: str):
        self.store, self.on_bad = store, on_bad

    def __getitem__(self, item: tuple[int, int, bool]) -> tuple[np.ndarray, int]:
        row, label, flip = item
        try:
            a = self.store.read(row)
        except BadSample:
            if self.on_bad == "error":
                raise
            a = np.zeros(
                self.store.input_shape, dtype=np.uint8 if self.store.images else np.float32
            )
        return (a[..., ::-1] if flip else a), label

    def __len__(self) -> int:
        return len(self.store)


RING = PREFETCH + 2
"""Shared-memory batch slots per worker, reused in turn. Safe because a worker never has more
than PREFETCH + 1 batches that the trial process has not yet copied out (the DataLoader sends a
worker its next batch only after receiving one of its earlier ones, and the trial process copies
a received batch out — `normalize`, or `_copy` for uint8 — before it asks for the next)."""


def _decoded(
    store: Store,
    on_bad: str,
    batches: Iterable[list[tuple[int, int, bool]]],
    max_batch: int,
    workers: int,
    generator: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y int64) for each list of (row, label, flip) items of `batches` (at most `max_batch`
    long), decoded by `workers` processes (0 = in this one); x in the store's dtype.

    From workers, x is a view of a slot of `ring` — shared memory allocated here once and
    inherited by the workers — valid until the next batch is drawn: copy it out. A batch then
    crosses processes as (worker, slot, n) and the labels: a few hundred pickled bytes, where a
    tensor per batch would pass a shared-memory file descriptor through a socket and an
    authentication handshake (~30 µs per 112 × 112 image in each process)."""
    ring = None
    if workers > 0:
        shape = (workers, RING, max_batch, *store.input_shape)
        dtype = torch.uint8 if store.images else torch.float32
        nbytes = int(np.prod(shape)) * dtype.itemsize
        ring = torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes))
        ring = ring.view(shape)
    loader = DataLoader(
        _RowsDataset(store, on_bad),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_Collate(ring),
        prefetch_factor=PREFETCH if workers > 0 else None,
        generator=generator,  # the loader's base seed comes from here, not the global RNG
    )
    it = iter(loader)
    try:
        for x, y in it:
            if isinstance(x, tuple):  # (worker, slot, n): the batch is in the shared ring
                w, slot, n = x
                x = ring[w, slot, :n]
            yield x, torch.from_numpy(y)
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class _Collate:
    """items [(sample as the store reads it, label)] → (x (B, *shape), y int64 (B,) numpy): one
    copy per sample straight into the batch (torch.stack of strided per-sample tensors is far
    slower). In a worker, x is written into its next `ring` slot and stands as (worker, slot,
    B); in-process it is a fresh tensor."""

    def __init__(self, ring: torch.Tensor | None):
        self.ring = ring
        self.turn = 0  # per process: each worker has its own copy

    def __call__(
        self, items: list[tuple[np.ndarray, int]]
    ) -> tuple[torch.Tensor | tuple[int, int, int], np.ndarray]:
        y = np.fromiter((label for _, label in items), dtype=np.int64, count=len(items))
        info = get_worker_info()
        if info is None or self.ring is None:
            first = items[0][0]
            x = np.empty((len(items), *first.shape), dtype=first.dtype)
            _fill(x, items)
            return torch.from_numpy(x), y
        slot = self.turn % RING
        self.turn += 1
        _fill(self.ring[info.id, slot, : len(items)].numpy(), items)
        return (info.id, slot, len(items)), y


def _fill(out: np.ndarray, items: list[tuple[np.ndarray, int]]) -> None:
    for i, (a, _) in enumerate(items):
        out[i] = a


def default_workers() -> int:
    """A sensible number of decoding processes for this machine: the CPUs this process may
    use, at most 8 (decoding small face crops saturates well before that)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))
