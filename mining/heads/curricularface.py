"""CurricularFace (Huang et al., CVPR 2020): adaptive curriculum on the hard negatives."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mining.heads.arcface import arcface_target, cos_plus
from mining.heads.base import CosineHead, ema_, hard_negatives, target_cosine, with_target
from mining.heads.params import check_range


class CurricularFace(CosineHead):
    """ArcFace target; hard negatives reweighted by a curriculum t that follows training.

    For sample i with target y (t and the mask M are constants: no gradient):

        t     ← momentum · mean_i cos θ_{y_i} + (1 − momentum) · t     (buffer, starts at 0;
                                                                       updated in training mode)
        M_ij  = [cos θ_j > cos(θ_y + m)], j ≠ y                       hard-negative mask
        target logit   s · ψ(θ_y)   (ArcFace with its fallback, `arcface_target`)
        hard negatives s · cos θ_j · (t + cos θ_j),  other negatives s · cos θ_j

    Early in training t ≈ 0 lowers the hard negatives' logits (easy samples first); as the
    target cosines grow, t grows and hard negatives weigh more. Shapes as in `CosineHead`.
    Defaults (the paper's): m = 0.5, s = 64, momentum = 0.01 (docs/methods.md §5).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        m: float = 0.5,
        momentum: float = 0.01,
        s: float = 64.0,
        interclass_filter: float | None = None,
    ) -> None:
        super().__init__(embedding_dim, num_classes, s=s, interclass_filter=interclass_filter)
        self.m = check_range("m", m, 0.0, math.pi, high_open=True)
        self.momentum = check_range("momentum", momentum, 0.0, 1.0)
        self.register_buffer("t", torch.zeros(()))

    def logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        """cos θ (B, C), labels (B,) -> logits (B, C); ``norms`` unused."""
        c = target_cosine(cos, labels)  # (B,)
        if self.training:
            ema_(self.t, c.mean(), self.momentum)
        hard = hard_negatives(cos, labels, cos_plus(c, self.m))  # M (B, C)
        others = torch.where(hard, cos * (self.t.to(cos.dtype) + cos), cos)
        return self.s * with_target(others, labels, arcface_target(c, self.m))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m:g}, momentum={self.momentum:g}"
