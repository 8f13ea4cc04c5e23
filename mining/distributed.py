"""Data-parallel CB-HEM: a rank-ordered all-gather so that every rank mines over, and remembers,
the same global batch.

With W ranks each holding a local batch (B_r, d), one training step should behave like a single
process fed the global batch ``[batch_0; batch_1; ...; batch_{W-1}]`` (rank order). Three pieces
give that:

``all_gather_rank_order(t)``
    concatenates every rank's ``t`` in rank order -> (Σ_r B_r, ...). The rows of this rank are
    the local tensor itself (not a gathered copy), so they keep their autograd graph; the other
    ranks' rows are constants. Local batch sizes may differ between ranks.
``enqueue_global(memory, emb, labels)``
    enqueues the gathered global batch in every rank's ``CrossBatchMemory`` — one enqueue per
    step, so the memories are identical on all ranks (same rows, order, labels and ages) and
    equal to one process's memory fed the concatenated batches. Enqueueing only the local batch
    (or gathering in arrival order) gives each rank a different memory, and ranks then mine
    different negatives for the same anchors.
``GlobalBatchLoss(loss_fn)``
    wraps a loss (e.g. ``MetricObjective``) so that it is evaluated on the global batch, and its
    ``before_loss`` / ``after_loss`` hooks (the memory updates) see the global batch too.

Gradient scaling. Every rank computes the same global loss L (identical inputs, identical
memory), but only its own rows carry a graph, so rank r's backward yields g_r = (∂L/∂R_r)ᵀ J_r
(J_r = ∂R_r/∂θ). The single-process large-batch gradient is dL/dθ = Σ_r g_r, whereas DDP
*averages* gradients: (1/W) Σ_r g_r. ``GlobalBatchLoss`` therefore multiplies the gradient that
flows into the local rows by ``grad_scale = W`` (the loss *value* is unchanged, so logging stays
meaningful): after DDP's average the gradient is exactly dL/dθ. Pass ``grad_scale=1`` if your
reduction sums gradients instead of averaging them. Parameters of the loss itself (e.g. a head's
``weight``) get the same dL/dw on every rank, so averaging them is a no-op.

PLB under DDP. ``PseudoLargeBatch`` runs K chunk backwards per step; letting DDP all-reduce after
each one is correct but costs K all-reduces. ``gradients_synced_after(ddp_model)`` runs the body
under ``ddp_model.no_sync()`` (gradients accumulate locally) and all-reduces the accumulated
gradient once when the body exits::

    objective = GlobalBatchLoss(MetricObjective(...))       # memory fed with the global batch
    plb = PseudoLargeBatch(ddp_model, objective, chunk_size=b, mode="exact")
    with gradients_synced_after(ddp_model):
        loss = plb(x_local, y_local)                       # K local backwards, no communication
    optimizer.step()                                       # .grad == single-process dL/dθ

Collectives: ``GlobalBatchLoss`` gathers once per loss call (plus once per hook when the wrapped
loss has hooks), so every rank must make the same calls in the same order. PLB ``exact`` and
``select`` call the loss once per step; ``chunk_loss`` calls it once per chunk, so it needs the
same number of chunks on every rank. So does a DDP model with buffers (BatchNorm): DDP broadcasts
buffers in every forward, and PLB forwards each chunk (twice in ``exact``), so either keep the
local batch size equal on every rank or build DDP with ``broadcast_buffers=False``. Losses that
draw random numbers (the ``random`` miner) must
use the same generator state on every rank to stay identical.

Without an initialised process group everything degrades to the single-process behaviour
(world size 1, rank 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "GlobalBatchLoss",
    "all_gather_rank_order",
    "all_reduce_gradients",
    "enqueue_global",
    "gradients_synced_after",
    "rank_and_world_size",
]


class _Memory(Protocol):
    def enqueue(self, emb: Tensor, labels: Tensor) -> None: ...


def rank_and_world_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank in ``group``, size of ``group``); (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def _gather_shapes(tensor: Tensor, world: int, group: dist.ProcessGroup | None) -> list[list[int]]:
    """Every rank's ``tensor.shape``, in rank order (one small all-gather)."""
    shape = torch.tensor([tensor.ndim, *tensor.shape], dtype=torch.int64, device=tensor.device)
    # ndim travels first so that a rank with a different ndim is reported, not mis-gathered.
    padded = torch.full((9,), -1, dtype=torch.int64, device=tensor.device)
    if shape.numel() > padded.numel():
        raise ValueError(f"tensor must have at most 8 dims, got shape {tuple(tensor.shape)}")
    padded[: shape.numel()] = shape
    shapes = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shapes, padded, group=group)
    return [s[1 : 1 + int(s[0])].tolist() for s in shapes]


def all_gather_rank_order(
    tensor: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    grad_scale: float = 1.0,
) -> tuple[Tensor, int]:
    """Concatenate every rank's ``tensor`` along dim 0 in rank order.

    Args:
        tensor: this rank's rows, shape (B_r, *rest); B_r may differ between ranks, ``rest``
            and the dtype may not.
        group: the process group (default: the world).
        grad_scale: factor applied to the gradient flowing back into ``tensor`` (see the module
            docstring: W under DDP's gradient averaging).

    Returns:
        ``(gathered (Σ_r B_r, *rest), offset)`` where ``gathered[offset : offset + B_r]`` is
        ``tensor`` itself (with its graph) and the other rows are detached copies. Without a
        process group: ``(tensor, 0)``.
    """
    rank, world = rank_and_world_size(group)
    local = tensor if grad_scale == 1.0 else _ScaleGrad.apply(tensor, grad_scale)
    if world == 1:
        return local, 0
    shapes = _gather_shapes(tensor, world, group)
    if any(s[1:] != shapes[rank][1:] for s in shapes):
        raise ValueError(
            f"tensor must have the same shape beyond dim 0 on every rank; got shapes {shapes}"
        )
    sizes = [s[0] for s in shapes]
    # all_gather needs equal shapes: pad every rank to the largest batch, then trim.
    padded = tensor.detach().new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded, group=group)
    parts = [buf[:n] for buf, n in zip(buffers, sizes, strict=True)]
    parts[rank] = local
    return torch.cat(parts), sum(sizes[:rank])


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

    def __call__(self, emb: Tensor, labels: Tensor) -> Tensor:
        global_emb, _ = all_gather_rank_order(emb, self.group, grad_scale=self.grad_scale)
        global_labels, _ = all_gather_rank_order(labels.detach(), self.group)
        return self.loss_fn(global_emb, global_labels)

    def before_loss(self, emb: Tensor, labels: Tensor) -> None:
        self._hook("before_loss", emb, labels)

    def after_loss(self, emb: Tensor, labels: Tensor) -> None:
        self._hook("after_loss", emb, labels)

    @property
    def last_stats(self) -> dict[str, float]:
        return getattr(self.loss_fn, "last_stats", {})

    def _hook(self, name: str, emb: Tensor, labels: Tensor) -> None:
        hook = getattr(self.loss_fn, name, None)
        if not callable(hook):
            return  # no gather either: the wrapped loss is the same type on every rank
        global_emb, _ = all_gather_rank_order(emb.detach(), self.group)
        global_labels, _ = all_gather_rank_order(labels.detach(), self.group)
        hook(global_emb, global_labels)


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
