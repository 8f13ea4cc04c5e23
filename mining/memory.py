"""Cross-batch memory: a FIFO ring buffer of past embeddings, their labels and their age.

The memory of CB-HEM (methods.md §2) holds the last ``size`` embeddings written to it, detached
from the graph, with their identity labels and the step at which each was written. It is exact
FIFO for any batch size (a batch larger than the free slots wraps around; a batch larger than the
whole memory keeps its newest ``size`` rows), and "how full" is a counter, never a sentinel label.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CrossBatchMemory:
    """Ring buffer of ``size`` embeddings of dimension ``dim``.

    Storage: ``emb (size, dim)`` in ``dtype``, ``labels (size,) int64`` and ``written (size,)
    int64`` (the value of the step counter when the row was written). Each :meth:`enqueue`
    advances the step counter by one, so ``age = step - 1 - written`` is 0 for the rows of the
    newest enqueue.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype!r}")
        self.size = size
        self.dim = dim
        self._emb = torch.zeros(size, dim, dtype=dtype, device=device)
        self._labels = torch.zeros(size, dtype=torch.int64, device=device)
        self._written = torch.zeros(size, dtype=torch.int64, device=device)
        self._ptr = 0  # next slot to write
        self._count = 0  # number of valid rows
        self._step = 0  # number of enqueues so far

    @property
    def dtype(self) -> torch.dtype:
        return self._emb.dtype

    @property
    def device(self) -> torch.device:
        return self._emb.device

    @property
    def step(self) -> int:
        """Number of enqueues since construction or the last :meth:`reset`."""
        return self._step

    def __len__(self) -> int:
        return self._count

    def is_full(self) -> bool:
        return self._count == self.size

    def enqueue(self, emb: Tensor, labels: Tensor) -> None:
        """Write ``emb (B, dim)`` and ``labels (B,)`` (integer) as the newest rows.

        Copies are detached and cast to the memory's dtype and device. ``B = 0`` is allowed and
        still counts as a step (the other rows age by one).
        """
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"emb must have shape (B, {self.dim}), got {tuple(emb.shape)}")
        if not emb.is_floating_point():
            raise ValueError(f"emb must be a floating tensor, got dtype {emb.dtype}")
        if labels.ndim != 1 or labels.shape[0] != emb.shape[0]:
            raise ValueError(
                f"labels must have shape ({emb.shape[0]},) to match emb, got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        emb = emb.detach()
        labels = labels.detach()
        if emb.shape[0] >= self.size:
            # Only the newest `size` rows survive; write them in order from slot 0.
            self._emb.copy_(emb[-self.size :])
            self._labels.copy_(labels[-self.size :])
            self._written.fill_(self._step)
            self._ptr, self._count = 0, self.size
        else:
            b = emb.shape[0]
            first = min(b, self.size - self._ptr)  # rows that fit before the wrap
            for src, dst in ((slice(0, first), self._ptr), (slice(first, b), 0)):
                n = src.stop - src.start
                self._emb[dst : dst + n] = emb[src]
                self._labels[dst : dst + n] = labels[src]
                self._written[dst : dst + n] = self._step
            self._ptr = (self._ptr + b) % self.size
            self._count = min(self._count + b, self.size)
        self._step += 1

    def get(self, ordered: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(emb (n, dim), labels (n,), ages (n,) int64)`` of the ``n = len(self)`` rows.

        ``ordered=True`` (the contract) returns them oldest first, which copies the buffer once it
        has wrapped. ``ordered=False`` returns views in storage order without copying the
        embeddings — what a miner wants, since the order of candidates does not matter to it.
        """
        n = self._count
        emb, labels, written = self._emb[:n], self._labels[:n], self._written[:n]
        if ordered and n == self.size and self._ptr != 0:
            # Once full, the oldest row sits at the write pointer.
            order = torch.arange(n, device=self.device).add_(self._ptr).remainder_(n)
            emb, labels, written = emb[order], labels[order], written[order]
        return emb, labels, (self._step - 1) - written

    def reset(self) -> None:
        """Forget every row and restart the step counter (storage is kept, not reallocated)."""
        self._ptr = self._count = self._step = 0

    def state_dict(self) -> dict[str, Tensor | int]:
        return {
            "size": self.size,
            "dim": self.dim,
            "emb": self._emb.clone(),
            "labels": self._labels.clone(),
            "written": self._written.clone(),
            "ptr": self._ptr,
            "count": self._count,
            "step": self._step,
        }

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        """Restore a :meth:`state_dict`; its size and dim must match this memory's."""
        if state.get("size") != self.size or state.get("dim") != self.dim:
            raise ValueError(
                f"state is for size={state.get('size')!r}, dim={state.get('dim')!r}; "
                f"this memory has size={self.size}, dim={self.dim}"
            )
        self._emb.copy_(state["emb"])
        self._labels.copy_(state["labels"])
        self._written.copy_(state["written"])
        self._ptr, self._count, self._step = (
            int(state["ptr"]),
            int(state["count"]),
            int(state["step"]),
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> CrossBatchMemory:
        """Move the buffers (and optionally cast the embeddings) in place; returns ``self``."""
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype!r}")
        self._emb = self._emb.to(device=device, dtype=dtype)
        self._labels = self._labels.to(device=device)
        self._written = self._written.to(device=device)
        return self

    def __repr__(self) -> str:
        return (
            f"CrossBatchMemory(size={self.size}, dim={self.dim}, dtype={self.dtype}, "
            f"device={self.device}, len={len(self)}, step={self.step})"
        )
