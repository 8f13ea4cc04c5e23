"""MetricObjective: miner + metric loss (+ optional CB-HEM memory) as one callable.

The protocol (docs/architecture.md) used by training loops, PLB and the harness::

    obj.before_loss(emb.detach(), labels)  # once per step; enqueues here if enqueue="before"
    loss = obj(emb, labels)                # pure: reads the memory, never changes it
    obj.after_loss(emb.detach(), labels)   # once per step; enqueues here if enqueue="after"
    obj.last_stats                         # dict[str, float] of the latest call

CB-HEM [recon] (docs/methods.md §2): negatives are mined over batch ∪ memory once the memory
is active (``warmup_steps`` steps done and not empty). Each mined term's loss is weighted 1 when
its negative is a batch row and ``memory_weight`` (w) when it came from the memory, so that
``loss = L_batch + w·L_mem`` with both parts sharing the reduction's denominator. On equal
similarity the in-batch negative wins (it carries a gradient). With ``in_batch=False`` only
memory negatives are used while the memory is active (in-batch mining during warm-up).

Every enqueued row also stores its IvS domain by the order rule of the bidirectional miner
(:func:`mining.miners.ivs_domains`: first row of an identity in the enqueued batch = ID photo),
so that the ``bidirectional`` miner offers an ID anchor only spot photos from the memory too, and
a spot anchor only ID photos. Other miners ignore domains.

Data parallel (:mod:`mining.distributed`): ``obj.local_loss(emb, labels, anchors, sum_ranks)``
mines only the anchors ``anchors`` (a rank's rows of the gathered global batch) against every
row and the memory, and reduces over the global denominator (:mod:`mining.reduction`), so that
the ranks' shares sum to the loss of ``obj(emb, labels)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import LOSSES, TermSims
from .memory import CrossBatchMemory
from .miners import MINERS, Candidates, ivs_domains
from .reduction import SUMS, Terms, denominator, last_stats, reduced_loss, term_sums

_REDUCTIONS = ("mean_nonzero", "mean_all")
_ENQUEUE = ("before", "after")
_MINERS_WITH_K = ("top_k", "random")


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


def _keep_max_per_pair(term: Tensor, anchor: Tensor, positive: Tensor, num_batch: int) -> Tensor:
    """Indices of the terms that are the largest of their unordered positive pair {a, p}."""
    pair = torch.minimum(anchor, positive) * num_batch + torch.maximum(anchor, positive)
    _, group = torch.unique(pair, return_inverse=True)
    best = torch.full((int(group.max()) + 1,), -math.inf, dtype=term.dtype, device=term.device)
    best = best.scatter_reduce(0, group, term.detach(), reduce="amax")
    is_best = term.detach() == best[group]
    # One winner per pair even on ties: the last term index among the maxima.
    order = torch.arange(term.shape[0], device=term.device)
    winner = torch.full_like(best, -1, dtype=torch.int64).scatter_reduce(
        0, group, torch.where(is_best, order, -1), reduce="amax"
    )
    return winner


class MetricObjective:
    """Miner + loss + optional cross-batch memory; see the module docstring for the protocol.

    Args:
        miner: a key of :data:`mining.miners.MINERS`.
        loss: a key of :data:`mining.losses.LOSSES`.
        margin: triplet / MPS margin m, and the threshold miner's margin.
        memory_size: CB-HEM memory M in samples; 0 = in-batch mining only.
        memory_weight: w in ``L = L_batch + w·L_mem``.
        warmup_steps: optimisation steps (``after_loss`` calls) before the memory is mined; it is
            filled during warm-up so it is full when mining starts.
        enqueue: ``"before"`` or ``"after"`` the loss.
        in_batch: mine batch negatives too once the memory is active.
        k: negatives per anchor for ``top_k`` and ``random`` (must be 1 for other miners).
        reduction: ``"mean_nonzero"`` (mean over terms with a non-zero loss) or ``"mean_all"``.
        memory_dtype: storage dtype of the memory (fp16 halves it; similarities are computed in
            the embeddings' dtype).
        alpha1, alpha2: quadruplet margins (α2 < α1).
        seed: base seed of the random miner (reseeded per step, so repeated calls agree).
        chunk: candidates per similarity GEMM (default: see :func:`mining.negatives.default_chunk`).

    ``last_stats`` (from the latest call): ``memory_share`` (fraction of mined terms whose
    negative came from the memory), ``neg_age`` (mean age in steps of those memory negatives; NaN
    if none), ``active_frac`` (fraction of batch rows anchoring a non-zero term), ``num_terms``,
    ``loss_batch`` and ``loss_mem`` (``loss = loss_batch + memory_weight · loss_mem``).
    With ``enqueue="before"`` the memory rows written this step (stale copies of the batch) are
    never mined.
    """

    def __init__(
        self,
        miner: str = "batch_hard",
        loss: str = "triplet",
        margin: float = 0.2,
        *,
        memory_size: int = 0,
        memory_weight: float = 1.0,
        warmup_steps: int = 0,
        enqueue: str = "after",
        in_batch: bool = True,
        k: int = 1,
        reduction: str = "mean_nonzero",
        memory_dtype: torch.dtype = torch.float32,
        alpha1: float = 0.2,
        alpha2: float = 0.1,
        seed: int = 0,
        chunk: int | None = None,
    ) -> None:
        _check("miner", miner, MINERS)
        _check("loss", loss, LOSSES)
        _check("enqueue", enqueue, _ENQUEUE)
        _check("reduction", reduction, _REDUCTIONS)
        for name, value in (("memory_size", memory_size), ("warmup_steps", warmup_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not float(memory_weight) >= 0.0:
            raise ValueError(f"memory_weight must be >= 0, got {memory_weight!r}")
        if k != 1 and miner not in _MINERS_WITH_K:
            raise ValueError(f"k={k!r} needs miner in {list(_MINERS_WITH_K)}, got miner={miner!r}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1 or None, got {chunk!r}")
        params: dict = {}
        if miner in _MINERS_WITH_K:
            params["k"] = k
        if miner == "threshold":
            params["margin"] = margin
        self.miner_name, self.loss_name = miner, loss
        self.miner = MINERS[miner](**params)
        self.loss = (
            LOSSES[loss](alpha1=alpha1, alpha2=alpha2)
            if loss == "quadruplet"
            else LOSSES[loss](margin=margin)
        )
        self.memory_size = memory_size
        self.memory_weight = float(memory_weight)
        self.warmup_steps = warmup_steps
        self.enqueue = enqueue
        self.in_batch = bool(in_batch)
        self.reduction = reduction
        self.memory_dtype = memory_dtype
        self.seed = seed
        self.chunk = chunk
        self.memory: CrossBatchMemory | None = None  # created on the first enqueue (dim, device)
        self.step = 0  # completed optimisation steps (after_loss calls)
        self.last_stats: dict[str, float] = {}

    # -- step hooks -----------------------------------------------------------------------------
    def before_loss(self, emb: Tensor, labels: Tensor) -> None:
        if self.enqueue == "before":
            self._enqueue(emb, labels)

    def after_loss(self, emb: Tensor, labels: Tensor) -> None:
        if self.enqueue == "after":
            self._enqueue(emb, labels)
        self.step += 1

    def _enqueue(self, emb: Tensor, labels: Tensor) -> None:
        if self.memory_size == 0:
            return
        if self.memory is None:
            self.memory = CrossBatchMemory(
                self.memory_size, emb.shape[-1], dtype=self.memory_dtype, device=emb.device
            )
        self.memory.enqueue(F.normalize(emb.detach(), dim=1), labels, ivs_domains(labels))

    def memory_active(self) -> bool:
        return self.memory is not None and len(self.memory) > 0 and self.step >= self.warmup_steps

    # -- the loss -------------------------------------------------------------------------------
    def __call__(self, emb: Tensor, labels: Tensor) -> Tensor:
        """Loss of ``emb (N, d)`` (raw; L2-normalised here) with int64 ``labels (N,)``; pure."""
        terms = self._terms(emb, labels, None)
        sums = term_sums(terms)
        count = denominator(sums, self.reduction)
        self.last_stats = last_stats(sums, emb.shape[0], count)
        return reduced_loss(terms, count, self.memory_weight)

    def local_loss(
        self,
        emb: Tensor,
        labels: Tensor,
        anchors: slice,
        sum_ranks: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """This rank's share L_r of the loss of the global batch ``emb (N, d)``: the terms
        anchored at rows ``anchors`` only, over the same candidates (all N rows ∪ the memory),
        divided by the global denominator, so that Σ_r L_r = L (the loss of
        :meth:`__call__`) when the ranks' ``anchors`` partition range(N); pure.

        ``sum_ranks(t)`` returns the elementwise sum of ``t`` over the ranks; it is called once
        per call, on a float64 vector of additive counts and sums, from which the denominator
        and ``last_stats`` (the global statistics) are computed. The max-per-pair loss (mps)
        needs both directions of a positive pair on one rank: if a term's positive is not among
        ``anchors`` on some rank, every rank raises a ValueError.
        """
        terms = self._terms(emb, labels, anchors)
        sums = sum_ranks(term_sums(terms))
        straddling = int(sums[SUMS.index("straddling")])
        if straddling:  # raised on every rank: all of them see the same sums
            raise ValueError(
                f"loss={self.loss_name!r} keeps the larger direction of each positive pair, so "
                f"every identity's rows must be anchors of one rank; {straddling} terms have "
                "their positive on another rank: give each rank whole identities"
            )
        count = denominator(sums, self.reduction)
        self.last_stats = last_stats(sums, emb.shape[0], count)
        return reduced_loss(terms, count, self.memory_weight)

    def _terms(self, emb: Tensor, labels: Tensor, anchors: slice | None) -> Terms:
        """Mine (anchors only, if given) and compute every term's loss with gradient."""
        if emb.ndim != 2 or labels.shape != (emb.shape[0],):
            raise ValueError(
                f"emb must be (N, d) and labels (N,), got {tuple(emb.shape)} and {tuple(labels.shape)}"
            )
        f = F.normalize(emb, dim=1)
        num_batch = f.shape[0]
        mem_mask = mem_domains = None
        if self.memory_active():
            mem, mem_labels, mem_ages = self.memory.get(ordered=False)
            mem_domains = self.memory.get_domains(ordered=False)
            if self.enqueue == "before":
                # Rows of age 0 are stale copies of this very batch: never mine them (they would
                # duplicate in-batch candidates without their gradient).
                mem_mask = mem_ages > 0
        else:
            mem = f.new_zeros(0, f.shape[1])
            mem_labels = labels.new_zeros(0)
            mem_ages = labels.new_zeros(0)
        minable = mem.shape[0] if mem_mask is None else int(mem_mask.sum())
        cands = Candidates(
            f.detach(),
            labels,
            mem,
            mem_labels,
            # Without minable memory rows (warm-up, or only stale copies) mine in-batch.
            use_batch=self.in_batch or minable == 0,
            chunk=self.chunk,
            memory_mask=mem_mask,
            memory_domains=mem_domains,
            anchor_rows=anchors,
        )
        if self.miner_name == "random":
            self.miner.seed = self.seed * 1_000_003 + self.step  # same draw on every call of a step
        mined = self.miner(cands) if num_batch else None
        a, p, n = (mined.anchor, mined.positive, mined.negative) if mined else (labels[:0],) * 3

        n2 = None
        if self.loss.needs_second_negative:
            anchors_n1 = cands.rows(n)
            excluded = torch.stack([cands.labels_of(n), labels[a]], dim=1)
            n2 = cands.hardest(anchors_n1, excluded, 1)[1][:, 0]
            keep = n2 >= 0
            a, p, n, n2 = a[keep], p[keep], n[keep], n2[keep]

        rows_n = cands.rows(n, batch=f)
        sims = TermSims(
            ap=(f[a] * f[p]).sum(dim=1),
            an=(f[a] * rows_n).sum(dim=1),
            nn=None if n2 is None else (rows_n * cands.rows(n2, batch=f)).sum(dim=1),
        )
        term = self.loss(sims)
        straddling = 0
        if self.loss.max_per_pair:
            own = cands.anchor_slice
            straddling = int(((p < own.start) | (p >= own.stop)).sum())
            if term.numel():
                keep = _keep_max_per_pair(term, a, p, num_batch)
                a, p, n, term = a[keep], p[keep], n[keep], term[keep]
        ages = mem_ages[n[n >= num_batch] - num_batch]
        return Terms(f, a, n, term, ages, straddling)

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the memory and the step counter."""
        self.memory = None
        self.step = 0

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "memory": None if self.memory is None else self.memory.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        if state["memory"] is None:
            self.memory = None
            return
        mem_state = state["memory"]
        self.memory = CrossBatchMemory(
            mem_state["size"],
            mem_state["dim"],
            dtype=mem_state["emb"].dtype,
            device=mem_state["emb"].device,
        )
        self.memory.load_state_dict(mem_state)
