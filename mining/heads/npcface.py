"""NPCFace (Zeng et al., 2020): negative-positive cooperation, following the authors' code."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mining.heads.arcface import cos_plus
from mining.heads.base import CosineHead, hard_negatives, target_cosine, with_target
from mining.heads.params import check_range


class NPCFace(CosineHead):
    """Hard negatives get a larger logit, and samples with hard negatives a larger margin.

    For sample i with target y (the mask M and m'_i are constants: no gradient):

        M_ij  = [cos θ_j > cos(θ_y + m)], j ≠ y                      hard-negative mask
        m'_i  = m0 + m1 · mean_{j ∈ M_i} cos θ_j   (m0 if M_i is empty)  ∈ [m0 − m1, m0 + m1]
        target logit   s · (cos(θ_y + m'_i) if cos θ_y > 0 else cos θ_y)
        hard negatives s · (t · cos θ_j + α),  other negatives s · cos θ_j

    Shapes as in `CosineHead`. Defaults m = 0.5, m0 = 0.4, m1 = 0.2, t = 1.1, α = 0.2, s = 64
    (docs/methods.md §5).
    """

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

    def logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        """cos θ (B, C), labels (B,) -> logits (B, C); ``norms`` unused."""
        c = target_cosine(cos, labels)  # (B,)
        hard = hard_negatives(cos, labels, cos_plus(c, self.m))  # M (B, C)
        with torch.no_grad():
            mean_hard = (cos * hard).sum(1) / hard.sum(1).clamp(min=1)  # 0 without hard ones
        sample_margin = self.m0 + self.m1 * mean_hard  # m'_i (B,)
        others = torch.where(hard, self.t * cos + self.alpha, cos)
        target = torch.where(c > 0, cos_plus(c, sample_margin), c)
        return self.s * with_target(others, labels, target)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, m={self.m:g}, m0={self.m0:g}, m1={self.m1:g}, "
            f"t={self.t:g}, alpha={self.alpha:g}"
        )
