"""NPCFace (Zeng et al., 2020): negative-positive cooperation, following the authors' code."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mining.heads.arcface import cos_plus
from mining.heads.base import CosineHead, target_cosine
from mining.heads.fused import OthersMargin, row_blocks
from mining.heads.params import check_range


class NPCFace(CosineHead):
    """Hard negatives get a larger logit, and samples with hard negatives a larger margin.

    For sample i with target y (all masks and m'_i under no_grad):

        M_ij  = [cos θ_j > cos(θ_y + m)], j ≠ y                      hard-negative mask
        m'_i  = m0 + m1 · mean_{j ∈ M_i} cos θ_j   (m0 if M_i is empty)  ∈ [m0 − m1, m0 + m1]
        target logit   s · (cos(θ_y + m'_i) if cos θ_y > 0 else cos θ_y)
        hard negatives s · (t · cos θ_j + α),  other negatives s · cos θ_j

    Shapes as in `CosineHead`. Defaults m = 0.5, m0 = 0.4, m1 = 0.2, t = 1.1, α = 0.2, s = 64.
    """

    target_only = False  # hard negatives change non-target logits

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        m: float = 0.5,
        m0: float = 0.4,
        m1: float = 0.2,
        t: float = 1.1,
        alpha: float = 0.2,
        s: float = 64.0,
        interclass_filter: float | None = None,
    ) -> None:
        super().__init__(embedding_dim, num_classes, s=s, interclass_filter=interclass_filter)
        self.m = check_range("m", m, 0.0, math.pi, high_open=True)
        self.m0 = check_range("m0", m0, 0.0, math.pi, high_open=True)
        # m'_i <= m0 + m1 must stay below π for cos(θ_y + m'_i) to be a margin at all.
        self.m1 = check_range("m1", m1, 0.0, math.pi - self.m0, high_open=True)
        self.t = check_range("t", t, 0.0, low_open=True, high_open=True)
        self.alpha = check_range("alpha", alpha, 0.0, high_open=True)

    @torch.no_grad()
    def hard_negatives(self, cos: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Hard mask M (B, C) (float 0/1) and sample margins m' (B,) for clamped cosines (B, C)."""
        return self.apply_hard_negatives(cos * self.s, labels)

    @torch.no_grad()
    def apply_hard_negatives(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Turn s·cos (B, C) in place into s·(t·cos + α) on the hard negatives; return M, m'.

        M (B, C) is a float 0/1 tensor in the logits' dtype (float masks take one vectorised
        pass where boolean ones take several on CPU; the backward computes its gradient in it).
        Done in row blocks (`row_blocks`): the mask, its count, the hard-cosine sum and the
        new logits of a block are computed while it is in cache, one memory sweep in all
        instead of five.
        """
        s = self.s
        threshold = s * cos_plus(target_cosine(logits, labels) / s, self.m)  # (B,)
        hard = torch.empty_like(logits)
        count, hard_sum = logits.new_empty(len(labels)), logits.new_empty(len(labels))
        for rows in row_blocks(logits):
            x, m = logits[rows], hard[rows]
            torch.gt(x, threshold[rows, None], out=m)
            m.scatter_(1, labels[rows, None], 0.0)
            torch.sum(m, 1, out=count[rows])
            torch.sum(m * x, 1, out=hard_sum[rows])
            x.addcmul_(x, m, value=self.t - 1.0).add_(m, alpha=s * self.alpha)
        mean_hard = hard_sum / (s * count.clamp(min=1))  # 0 when there is no hard negative
        return hard, self.m0 + self.m1 * mean_hard

    def others_margin(self, logits: Tensor, labels: Tensor) -> OthersMargin:
        hard, sample_margin = self.apply_hard_negatives(logits, labels)

        def target(c: Tensor, labels: Tensor) -> Tensor:
            return torch.where(c > 0, cos_plus(c, sample_margin.to(c.dtype)), c)

        return OthersMargin(logits, target, mask=hard, slope=self.t)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, m={self.m:g}, m0={self.m0:g}, m1={self.m1:g}, "
            f"t={self.t:g}, alpha={self.alpha:g}"
        )
