"""Cross-batch memory: a FIFO ring buffer of past embeddings, their labels and their age.

The memory of CB-HEM (docs/methods.md §2) holds the last ``size`` embeddings written to it,
detached from the graph, with their identity labels, the step at which each was written and
optionally their image domain (IvS: 0 = ID photo, 1 = spot photo; :data:`UNKNOWN_DOMAIN` when
not given). It is exact FIFO for any batch size (a batch larger than the free slots wraps
around; a batch larger than the whole memory keeps its newest ``size`` rows), and "how full" is
a counter, never a sentinel label.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

UNKNOWN_DOMAIN = -1
"""Domain of a row enqueued without one."""
_MAX_DOMAIN = torch.iinfo(torch.int8).max  # domains are stored as int8


class CrossBatchMemory:
    """Ring buffer of ``size`` embeddings of dimension ``dim``.

    Storage: ``emb (size, dim)`` in ``dtype``, ``labels (size,) int64``, ``domains (size,) int8``
    and ``written (size,) int64`` (the value of the step counter when the row was written). Each :meth:`enqueue`
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
        self._domains = torch.full((size,), UNKNOWN_DOMAIN, dtype=torch.int8, device=device)
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

    def enqueue(self, emb: Tensor, labels: Tensor, domains: Tensor | None = None) -> None:
        """Write ``emb (B, dim)``, ``labels (B,)`` and ``domains (B,)`` (integers) as the newest rows.

        ``domains`` holds values in ``[-1, 127]`` (-1 = unknown); ``None`` stores
        :data:`UNKNOWN_DOMAIN` for every row. Copies are detached and cast to the memory's dtype
        and device. ``B = 0`` is allowed and still counts as a step (the other rows age by one).
        """
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"emb must have shape (B, {self.dim}), got {tuple(emb.shape)}")
        if not emb.is_floating_point():
            raise ValueError(f"emb must be a floating tensor, got dtype {emb.dtype}")
        b = emb.shape[0]
        _check_integer_column("labels", labels, b)
        if domains is None:
            domains = torch.full((b,), UNKNOWN_DOMAIN, dtype=torch.int8, device=self.device)
        else:
            _check_integer_column("domains", domains, b)
            if b and (domains.min() < UNKNOWN_DOMAIN or domains.max() > _MAX_DOMAIN):
                raise ValueError(
                    f"domains must lie in [{UNKNOWN_DOMAIN}, {_MAX_DOMAIN}] "
                    f"({UNKNOWN_DOMAIN} = unknown), got values in "
                    f"[{int(domains.min())}, {int(domains.max())}]"
                )
        columns = (
            (self._emb, emb.detach()),
            (self._labels, labels.detach()),
            (self._domains, domains.detach()),
        )
        if b >= self.size:
            # Only the newest `size` rows survive; write them in order from slot 0.
            for buf, rows in columns:
                buf.copy_(rows[-self.size :])
            self._written.fill_(self._step)
            self._ptr, self._count = 0, self.size
        else:
            first = min(b, self.size - self._ptr)  # rows that fit before the wrap
            for src, dst in ((slice(0, first), self._ptr), (slice(first, b), 0)):
                n = src.stop - src.start
                for buf, rows in columns:
                    buf[dst : dst + n] = rows[src]
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
        order = self._order() if ordered else None
        if order is not None:
            emb, labels, written = emb[order], labels[order], written[order]
        return emb, labels, (self._step - 1) - written

    def get_domains(self, ordered: bool = True) -> Tensor:
        """``(n,) int8`` domains of the rows, in the same order as :meth:`get` with the same
        ``ordered`` (-1 = enqueued without a domain)."""
        domains = self._domains[: self._count]
        order = self._order() if ordered else None
        return domains if order is None else domains[order]

    def _order(self) -> Tensor | None:
        """Storage slots oldest first, or ``None`` when storage order already is that order."""
        n = self._count
        if n < self.size or self._ptr == 0:
            return None
        # Once full, the oldest row sits at the write pointer.
        return torch.arange(n, device=self.device).add_(self._ptr).remainder_(n)

    def reset(self) -> None:
        """Forget every row and restart the step counter (storage is kept, not reallocated)."""
        self._ptr = self._count = self._step = 0

    def state_dict(self) -> dict[str, Tensor | int]:
        return {
            "size": self.size,
            "dim": self.dim,
            "emb": self._emb.clone(),
            "labels": self._labels.clone(),
            "domains": self._domains.clone(),
            "written": self._written.clone(),
            "ptr": self._ptr,
            "count": self._count,
            "step": self._step,
        }

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        """Restore a :meth:`state_dict`; its size and dim must match this memory's.

        A state saved before domains were stored (no ``"domains"`` key) loads with every row's
        domain unknown.
        """
        if state.get("size") != self.size or state.get("dim") != self.dim:
            raise ValueError(
                f"state is for size={state.get('size')!r}, dim={state.get('dim')!r}; "
                f"this memory has size={self.size}, dim={self.dim}"
            )
        self._emb.copy_(state["emb"])
        self._labels.copy_(state["labels"])
        if "domains" in state:
            self._domains.copy_(state["domains"])
        else:
            self._domains.fill_(UNKNOWN_DOMAIN)
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
        self._domains = self._domains.to(device=device)
        self._written = self._written.to(device=device)
        return self

    def __repr__(self) -> str:
        return (
            f"CrossBatchMemory(size={self.size}, dim={self.dim}, dtype={self.dtype}, "
            f"device={self.device}, len={len(self)}, step={self.step})"
        )


def _check_integer_column(name: str, values: Tensor, rows: int) -> None:
    if values.ndim != 1 or values.shape[0] != rows:
        raise ValueError(
            f"{name} must have shape ({rows},) to match emb, got {tuple(values.shape)}"
        )
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {values.dtype}")
