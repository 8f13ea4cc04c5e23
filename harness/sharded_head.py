"""A margin head whose classes are sharded across the ranks of a data-parallel trial, the way
insightface's Partial FC shards its classifier (without its class sampling):
`head_params.sharded = true` with `train.world_size = W > 1`.

Rank r holds the class rows [r·C/W, (r+1)·C/W) of the head's weight (C×d is built on every rank
from the same seed, then sliced: the shards together are the replicated head's weight). A step:

1. the backbone (DDP) embeds this rank's share; `gather_embeddings` all-gathers the global
   batch (B, d) in rank order; its backward sums the ranks' gradients of the global rows and
   keeps this rank's rows (times W: DDP averages the backbone's gradients);
2. every rank computes the logits of the global batch against its classes only, (B, C/W),
   with the head's target margin where the label is one of its classes;
3. `sharded_cross_entropy`: the softmax cross-entropy over all C classes from a distributed
   max, sum of exponentials and target logit (three all-reduces of B numbers); its backward is
   local: (softmax − one-hot) / B on this rank's columns.

The loss equals the replicated head's loss, the backbone gradient and each shard's weight
gradient equal the replicated ones (tests/test_ddp_trial.py). Only heads whose margin acts on the
target cosine alone (`cosine`, `cosface`, `arcface`, `arcface_nograd`) can be sharded: the other
heads' logits depend on all classes of a row (hard negatives, curricula) or carry state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mining.gather import all_gather_summed_grad
from mining.heads.base import CosineHead, cosine

SHARDABLE = ("cosine", "cosface", "arcface", "arcface_nograd")


def check_shardable(name: str, h: nn.Module) -> None:
    """Raise a ValueError unless `h` is a target-margin head without state besides `weight`."""
    ok = (
        isinstance(h, CosineHead)
        and type(h).logits is CosineHead.logits
        and type(h).regularizer is CosineHead.regularizer
        and [n for n, _ in h.named_parameters()] == ["weight"]
        and not list(h.buffers())
    )
    if not ok:
        raise ValueError(
            f"sharded = true needs a head whose margin is on the target cosine alone "
            f"({', '.join(SHARDABLE)}); {name!r} is not one"
        )


def gather_embeddings(local: Tensor, scale: float) -> Tensor:
    """Rank-ordered global batch of equal shares, gradient summed over the ranks back into this
    rank's rows, times `scale` (step 1 above; `mining.gather.all_gather_summed_grad`)."""
    shares = [local.shape[0]] * dist.get_world_size()  # equal shares: no shape all-gather
    return all_gather_summed_grad(local, grad_scale=scale, sizes=shares)[0]


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over classes split across ranks.

    logits (B, C_r) of this rank's classes; target (B,) int64 = the column of the label in
    this shard, or −1 where another rank holds it."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor) -> Tensor:
        top = logits.detach().amax(dim=1)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        exp = (logits.detach() - top[:, None]).exp()
        total = exp.sum(dim=1)
        dist.all_reduce(total)
        here = target >= 0
        picked = torch.zeros_like(total)
        rows = here.nonzero().squeeze(1)
        picked[rows] = logits.detach()[rows, target[rows]]
        dist.all_reduce(picked)
        ctx.save_for_backward(exp / total[:, None], target)
        return (total.log() + top - picked).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        prob, target = ctx.saved_tensors
        rows = (target >= 0).nonzero().squeeze(1)
        out = prob.clone()
        out[rows, target[rows]] -= 1
        return out * (grad / prob.shape[0]), None


def sharded_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return _ShardedCrossEntropy.apply(logits, target)


class ShardedMarginHead(nn.Module):
    """This rank's classes [lo, hi) of `full` (whose weight it takes and drops).

    `loss(emb (B, d), labels (B,))` on the GLOBAL batch (every rank the same rows) -> the mean
    cross-entropy over all classes, as `full.loss` would give it. Not checkpointed: its
    state (and its optimiser state) differs between ranks, and rank 0 alone writes."""

    checkpointable = False

    def __init__(self, name: str, full: CosineHead, rank: int, world: int) -> None:
        super().__init__()
        check_shardable(name, full)
        c = full.num_classes
        if c < world:
            raise ValueError(f"sharded = true needs at least {world} classes (one per rank); {c}")
        self.lo, self.hi = rank * c // world, (rank + 1) * c // world
        self.weight = nn.Parameter(full.weight.detach()[self.lo : self.hi].clone())
        del full._parameters["weight"]  # the full C×d weight is not kept
        self._target, self.s, self.filter = full.target, full.s, full.interclass_filter

    def logits(self, emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(B, hi − lo) logits of this shard's classes, and each row's target column (or −1)."""
        here = (labels >= self.lo) & (labels < self.hi)
        col = torch.where(here, labels - self.lo, torch.full_like(labels, -1))
        cos = cosine(emb, self.weight, labels, None)
        if self.filter is not None:
            with torch.no_grad():
                mask = cos > self.filter
                rows = here.nonzero().squeeze(1)
                mask[rows, col[rows]] = False
            cos = cos.masked_fill(mask, 0.0)
        logits = self.s * cos
        rows = here.nonzero().squeeze(1)
        if rows.numel():
            target = self.s * self._target(cos[rows, col[rows]])
            logits = logits.index_put((rows, col[rows]), target.to(logits.dtype))
        return logits, col

    def loss(self, emb: Tensor, labels: Tensor) -> Tensor:
        return sharded_cross_entropy(*self.logits(emb, labels))
