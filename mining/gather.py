"""Rank-ordered all-gathers for data-parallel mining (used by :mod:`mining.distributed`).

With W ranks each holding ``t_r (B_r, *rest)``, the global tensor is the rank-order
concatenation ``[t_0; t_1; ...; t_{W-1}]`` (N = Σ_r B_r rows); B_r may differ between ranks.

``all_gather_rank_order(t)``
    this rank's rows are ``t`` itself (with its graph), the others detached copies.
``all_gather_summed_grad(t)``
    every row carries the graph: the backward all-reduces (sums) the gradient of the N rows
    and hands each rank its own rows — what a loss needs whose terms on rank r also touch
    other ranks' rows.

Both take ``grad_scale`` (W under DDP's gradient averaging; see :mod:`mining.distributed`).
Without an initialised process group they return the local tensor (gradient scaled).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_rank_order", "all_gather_summed_grad", "rank_and_world_size"]


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


def scaled_grad(tensor: Tensor, scale: float) -> Tensor:
    """``tensor``, with the gradient flowing back into it multiplied by ``scale`` (itself when
    ``scale`` is 1: no extra autograd node)."""
    return tensor if scale == 1.0 else _ScaleGrad.apply(tensor, scale)


def gather_shapes(tensor: Tensor, world: int, group: dist.ProcessGroup | None) -> list[list[int]]:
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


def gather_parts(tensor: Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> list[Tensor]:
    """Every rank's detached ``tensor (sizes[r], *rest)``, in rank order."""
    # all_gather needs equal shapes: pad every rank to the largest batch, then trim.
    padded = tensor.detach().new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    buffers = [torch.empty_like(padded) for _ in range(len(sizes))]
    dist.all_gather(buffers, padded, group=group)
    return [buf[:n] for buf, n in zip(buffers, sizes, strict=True)]


def local_sizes(tensor: Tensor, world: int, group: dist.ProcessGroup | None) -> list[int]:
    """Every rank's ``tensor.shape[0]``; ValueError unless the other dims agree."""
    shapes = gather_shapes(tensor, world, group)
    if any(s[1:] != list(tensor.shape[1:]) for s in shapes):
        raise ValueError(
            f"tensor must have the same shape beyond dim 0 on every rank; got shapes {shapes}"
        )
    return [s[0] for s in shapes]


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
    local = scaled_grad(tensor, grad_scale)
    if world == 1:
        return local, 0
    sizes = local_sizes(tensor, world, group)
    parts = gather_parts(tensor, sizes, group)
    parts[rank] = local
    return torch.cat(parts), sum(sizes[:rank])


class GatherSumGrad(torch.autograd.Function):
    """Forward: the rank-ordered concatenation (N, *rest) — gathered here, or ``gathered``, the
    same rows gathered earlier in the step. Backward: the gradient of the N rows summed over the
    ranks (one all-reduce), this rank's rows, times ``scale``."""

    @staticmethod
    def forward(
        ctx: Any,
        tensor: Tensor,
        sizes: list[int],
        rank: int,
        group: Any,
        scale: float,
        gathered: Tensor | None = None,
    ) -> Tensor:
        ctx.lo, ctx.rows, ctx.group, ctx.scale = sum(sizes[:rank]), sizes[rank], group, scale
        if gathered is not None:
            return gathered.clone()
        return torch.cat(gather_parts(tensor, sizes, group))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        total = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(total, group=ctx.group)
        return total[ctx.lo : ctx.lo + ctx.rows] * ctx.scale, None, None, None, None, None


def all_gather_summed_grad(
    tensor: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    grad_scale: float = 1.0,
    sizes: list[int] | None = None,
) -> tuple[Tensor, int]:
    """Concatenate every rank's ``tensor (B_r, *rest)`` in rank order, differentiably.

    Returns ``(gathered (Σ_r B_r, *rest), offset)`` like :func:`all_gather_rank_order`, but
    every row carries the graph: the backward all-reduces (sums) the gradient of ``gathered``
    over the ranks and returns rows ``offset : offset + B_r`` of the sum times ``grad_scale``.
    That backward is a collective: every rank must backward through its ``gathered`` exactly
    when the others do. ``sizes`` (every rank's B_r, when the caller knows them, e.g. equal
    shares) saves the all-gather of the shapes. Without a process group: ``(tensor, 0)``
    (gradient scaled).
    """
    rank, world = rank_and_world_size(group)
    if world == 1:
        return scaled_grad(tensor, grad_scale), 0
    if sizes is None:
        sizes = local_sizes(tensor, world, group)
    elif len(sizes) != world or sizes[rank] != tensor.shape[0]:
        raise ValueError(
            f"sizes must list every rank's rows ({world} ranks, this rank "
            f"{tensor.shape[0]}); got {sizes}"
        )
    return GatherSumGrad.apply(tensor, sizes, rank, group, grad_scale), sum(sizes[:rank])
