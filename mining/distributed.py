"""Data-parallel CB-HEM: every rank mines its own anchors against, and remembers, the same
global batch.

With W ranks each holding a local batch R_r (B_r, d), one training step should behave like a
single process fed the global batch ``R = [R_0; R_1; ...; R_{W-1}]`` (rank order, N = Σ_r B_r
rows). The pieces:

``all_gather_rank_order(t)``
    concatenates every rank's ``t`` in rank order -> (N, ...). The rows of this rank are the
    local tensor itself (not a gathered copy), so they keep their autograd graph; the other
    ranks' rows are constants. Local batch sizes may differ between ranks.
``all_gather_summed_grad(t)``
    the same concatenation, differentiable into every row: its backward sums the gradient of
    the N rows over the ranks (one all-reduce) and hands each rank its own rows.
``enqueue_global(memory, emb, labels)``
    enqueues the gathered global batch in every rank's ``CrossBatchMemory`` — one enqueue per
    step, so the memories are identical on all ranks (same rows, order, labels and ages) and
    equal to one process's memory fed the concatenated batches. Enqueueing only the local batch
    (or gathering in arrival order) gives each rank a different memory, and ranks then mine
    different negatives for the same anchors.
``GlobalBatchLoss(loss_fn)``
    wraps a loss (e.g. ``MetricObjective``) so that it is evaluated on the global batch, and its
    ``before_loss`` / ``after_loss`` hooks (the memory updates) see the global batch too.

Each rank computes its own anchors' terms. The global loss is a sum of terms, each anchored at
one row, over the reduction's denominator D (the number of terms, or of non-zero terms):
L = Σ_t ℓ_t / D. A ``loss_fn`` with the method

    local_loss(emb (N, d), labels (N,), anchors: slice, sum_ranks) -> L_r (scalar)

(``MetricObjective`` has it) computes only the terms T_r anchored at rows ``anchors`` — rank r's
own rows offset_r … offset_r + B_r − 1 — with positives and negatives searched over all N rows
and its own state (the memory), and divides by the global D; ``sum_ranks(t)`` sums a tensor over
the ranks (an all-reduce: call it equally often on every rank), which also gives the global
``last_stats``. So the mining scan costs B_r × (N + M) similarities per rank, not N × (N + M):

    L_r = Σ_{t ∈ T_r} ℓ_t / D,        Σ_r L_r = L.

The loss returned on every rank has the value L (an all-reduce of the L_r) and the gradient of
L_r.

Gradient scaling. A term of L_r may take its positive or negative from another rank's rows, so
all N gathered rows carry the graph (``all_gather_summed_grad``): rank r's backward reaches the
gather with G⁽ʳ⁾ = ∂L_r/∂R (N, d); the gather's backward all-reduces, Σ_r G⁽ʳ⁾ = ∂L/∂R, and hands
rank r its rows ∂L/∂R_r times ``grad_scale = W``. Rank r's parameter gradient is then
g_r = W · (∂L/∂R_r)ᵀ J_r (J_r = ∂R_r/∂θ) and DDP's *average* is

    (1/W) Σ_r g_r = Σ_r (∂L/∂R_r)ᵀ J_r = dL/dθ,

the single-process large-batch gradient. That backward all-reduce is a collective: every rank
must backward its loss, ranks without a term too (their L_r stays connected to the gathered
rows and contributes a zero gradient). Pass ``grad_scale=1`` if your reduction sums gradients.

A loss without ``local_loss`` (any ``loss_fn(emb (N, d), labels (N,))``) is evaluated whole on
every rank: each rank computes the same L, only its own rows carry a graph, so its backward
yields (∂L/∂R_r)ᵀ J_r, and the same factor W makes DDP's average dL/dθ. Parameters of such a
loss (e.g. a head's ``weight``) get the same dL/dw on every rank, so averaging them is a no-op;
a loss with parameters of its own must not offer ``local_loss`` (its dL_r/dw differ by rank).

PLB under DDP. ``PseudoLargeBatch`` runs K chunk backwards per step; letting DDP all-reduce after
each one is correct but costs K all-reduces. ``gradients_synced_after(ddp_model)`` runs the body
under ``ddp_model.no_sync()`` (gradients accumulate locally) and all-reduces the accumulated
gradient once when the body exits::

    objective = GlobalBatchLoss(MetricObjective(...))       # memory fed with the global batch
    plb = PseudoLargeBatch(ddp_model, objective, chunk_size=b, mode="exact")
    with gradients_synced_after(ddp_model):
        loss = plb(x_local, y_local)                       # K local backwards, no communication
    optimizer.step()                                       # .grad == single-process dL/dθ

Collectives: ``GlobalBatchLoss`` gathers a step's batch once (3 all-gathers: sizes, rows,
labels) and reuses it for ``before_loss``, the loss and ``after_loss`` when they get the same
local tensors, as the step protocol passes them (a tensor changed in place, or another one, is
gathered again); with ``local_loss`` it all-reduces the counts and the loss value in the call
and the gradient in its backward, so every rank must make the same calls in the same order. PLB
``exact`` and ``select`` call the loss once per step; ``chunk_loss`` calls it once per chunk, so
it needs the same number of chunks on every rank. So does a DDP model with buffers (BatchNorm):
DDP broadcasts buffers in every forward, and PLB forwards each chunk (twice in ``exact``), so
either keep the local batch size equal on every rank or build DDP with
``broadcast_buffers=False``. Losses that draw random numbers (the ``random`` miner) must use the
same generator state on every rank to stay identical.

Without an initialised process group everything degrades to the single-process behaviour
(world size 1, rank 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .gather import (
    GatherSumGrad,
    all_gather_rank_order,
    all_gather_summed_grad,
    gather_parts,
    local_sizes,
    rank_and_world_size,
    scaled_grad,
)

__all__ = [
    "GlobalBatchLoss",
    "all_gather_rank_order",
    "all_gather_summed_grad",
    "all_reduce_gradients",
    "enqueue_global",
    "gradients_synced_after",
    "rank_and_world_size",
]


class _Memory(Protocol):
    def enqueue(self, emb: Tensor, labels: Tensor) -> None: ...


def enqueue_global(
    memory: _Memory,
    emb: Tensor,
    labels: Tensor,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """Enqueue the global batch (every rank's ``emb (B_r, d)`` / ``labels (B_r,)``, rank order).

    Call it on every rank once per step. Returns the detached global ``(emb (N, d), labels (N,))``
    that was enqueued, N = Σ_r B_r.
    """
    global_emb, _ = all_gather_rank_order(emb.detach(), group)
    global_labels, _ = all_gather_rank_order(labels.detach(), group)
    memory.enqueue(global_emb, global_labels)
    return global_emb, global_labels


class GlobalBatchLoss:
    """Evaluate ``loss_fn`` on the rank-ordered global batch; gradient scaled for DDP averaging.

    ``loss_fn(emb (N, d), labels (N,)) -> scalar`` with N = Σ_r B_r; it may have the
    ``before_loss`` / ``after_loss`` hooks of the objective protocol (docs/architecture.md),
    which then receive the detached global batch, and a ``last_stats`` dict, which is exposed.
    If it also has ``local_loss`` (module docstring), each rank computes only the terms of its
    own anchors (``MetricObjective``: then ``last_stats`` holds the global statistics).

    ``__call__(emb (B_r, d), labels (B_r,)) -> loss`` returns L (the same value on every rank);
    its gradient into ``emb`` is ``grad_scale · ∂L/∂emb`` with ``grad_scale`` defaulting to the
    world size, so that DDP's averaged gradient equals the single-process gradient of L.
    """

    def __init__(
        self,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        group: dist.ProcessGroup | None = None,
        *,
        grad_scale: float | None = None,
    ) -> None:
        if grad_scale is not None and not grad_scale > 0:
            raise ValueError(f"grad_scale must be a positive number or None, got {grad_scale!r}")
        self.loss_fn = loss_fn
        self.group = group
        self.grad_scale = float(rank_and_world_size(group)[1] if grad_scale is None else grad_scale)
        self._step_batch: _GlobalBatch | None = None

    def __call__(self, emb: Tensor, labels: Tensor) -> Tensor:
        rank, world = rank_and_world_size(self.group)
        if world == 1:
            return self.loss_fn(scaled_grad(emb, self.grad_scale), labels)
        batch = self._global(emb, labels)
        local_loss = getattr(self.loss_fn, "local_loss", None)
        if not callable(local_loss):
            parts = list(batch.emb.split(batch.sizes))
            parts[rank] = scaled_grad(emb, self.grad_scale)
            return self.loss_fn(torch.cat(parts), batch.labels)
        global_emb = GatherSumGrad.apply(
            emb, batch.sizes, rank, self.group, self.grad_scale, batch.emb
        )
        offset = sum(batch.sizes[:rank])
        anchors = slice(offset, offset + emb.shape[0])
        share = local_loss(global_emb, batch.labels, anchors, self._sum_ranks)
        # Value L = Σ_r L_r (the same on every rank: L_r − L_r.detach() is exactly 0), gradient
        # that of L_r.
        return self._sum_ranks(share.detach()) + (share - share.detach())

    def _sum_ranks(self, t: Tensor) -> Tensor:
        """Elementwise sum of ``t`` over the ranks (a new tensor)."""
        total = t.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=self.group)
        return total

    def before_loss(self, emb: Tensor, labels: Tensor) -> None:
        self._hook("before_loss", emb, labels)

    def after_loss(self, emb: Tensor, labels: Tensor) -> None:
        self._hook("after_loss", emb, labels)
        self._step_batch = None  # the step is over: its gathered batch is not needed again

    @property
    def last_stats(self) -> dict[str, float]:
        return getattr(self.loss_fn, "last_stats", {})

    def _hook(self, name: str, emb: Tensor, labels: Tensor) -> None:
        hook = getattr(self.loss_fn, name, None)
        if not callable(hook):
            return  # no gather either: the wrapped loss is the same type on every rank
        if rank_and_world_size(self.group)[1] == 1:
            hook(emb.detach(), labels.detach())
            return
        batch = self._global(emb, labels)
        hook(batch.emb, batch.labels)

    def _global(self, emb: Tensor, labels: Tensor) -> _GlobalBatch:
        """The detached global batch of this local ``(emb, labels)``: gathered once per step
        (3 collectives: sizes, rows, labels) and reused by the hooks and the loss of the same
        step, which all see the same local tensors."""
        cached = self._step_batch
        if cached is not None and cached.holds(emb, labels):
            return cached
        if labels.shape[:1] != emb.shape[:1]:
            raise ValueError(
                f"emb (B, d) and labels (B,) must have the same B, got {tuple(emb.shape)} and "
                f"{tuple(labels.shape)}"
            )
        _, world = rank_and_world_size(self.group)
        sizes = local_sizes(emb, world, self.group)
        emb_d, labels_d = emb.detach(), labels.detach()
        self._step_batch = _GlobalBatch(
            emb_d,
            labels_d,
            emb_d._version,
            labels_d._version,
            sizes,
            torch.cat(gather_parts(emb_d, sizes, self.group)),
            torch.cat(gather_parts(labels_d, sizes, self.group)),
        )
        return self._step_batch


@dataclass
class _GlobalBatch:
    """A step's gathered batch and the local tensors it was gathered from.

    Holding the local tensors keeps their storage alive, so a later tensor that views the same
    storage, offset, shape and strides at the same version counter holds the same values."""

    local_emb: Tensor
    local_labels: Tensor
    emb_version: int
    labels_version: int
    sizes: list[int]
    emb: Tensor  # (N, d), detached
    labels: Tensor  # (N,)

    def holds(self, emb: Tensor, labels: Tensor) -> bool:
        return _same_view(emb, self.local_emb, self.emb_version) and _same_view(
            labels, self.local_labels, self.labels_version
        )


def _same_view(t: Tensor, ref: Tensor, version: int) -> bool:
    return (
        t.untyped_storage().data_ptr() == ref.untyped_storage().data_ptr()
        and t.storage_offset() == ref.storage_offset()
        and t.shape == ref.shape
        and t.stride() == ref.stride()
        and t.dtype == ref.dtype
        and t.device == ref.device
        and t._version == version
    )


def all_reduce_gradients(
    module: nn.Module, group: dist.ProcessGroup | None = None, *, average: bool = True
) -> None:
    """All-reduce the ``.grad`` of ``module``'s trainable parameters (one collective per dtype).

    A parameter whose ``.grad`` is None gets a zero gradient first, so every rank reduces the
    same list of tensors. ``average=True`` divides by the world size (DDP's convention).
    """
    _, world = rank_and_world_size(group)
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world == 1:
        return
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for p in params:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        if average:
            flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@contextlib.contextmanager
def gradients_synced_after(
    model: nn.Module, group: dist.ProcessGroup | None = None
) -> Iterator[None]:
    """Accumulate gradients locally in the body, then all-reduce (average) them once on exit.

    For a ``DistributedDataParallel`` model the body runs under ``model.no_sync()`` and the
    reduction uses the model's process group unless ``group`` is given; a plain module is
    reduced over ``group``. Nothing is reduced if the body raises.
    """
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
        all_reduce_gradients(model.module, group if group is not None else model.process_group)
    else:
        yield
        all_reduce_gradients(model, group)
