"""AdaFace (Kim et al., CVPR 2022): a margin that adapts to image quality via the feature norm."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mining.heads.base import CosineHead, ema_, target_cosine, with_target
from mining.heads.params import check_range

#: AdaFace's own epsilon (its code's ``eps``): in the norm standardisation and the angle clip.
EPS = 1e-3


class AdaFace(CosineHead):
    """Angular margin for high-norm samples, additive margin for low-norm ones.

    With a_i = clip(‖e_i‖, 0.001, 100) (no gradient) and running statistics μ, σ of the norms
    (buffers, starting at 20 and 100 as in the authors' code; updated in training mode, before
    use, by μ ← t_alpha · mean_i a_i + (1 − t_alpha) · μ and likewise σ with the batch's
    unbiased std):

        ẑ_i     = clip(h · (a_i − μ) / (σ + eps), −1, 1)
        g_angle = −m · ẑ_i,   g_add = m · ẑ_i + m
        target logit  s · (cos(clip(θ_y + g_angle, eps, π − eps)) − g_add),  others s · cos θ_j

    eps = 1e-3. Shapes as in `CosineHead`; ``norms`` are the raw feature norms ‖e_i‖ (B,).
    Defaults (the paper's): m = 0.4, h = 0.333, t_alpha = 0.01, s = 64 (docs/methods.md §5).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        m: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        s: float = 64.0,
        interclass_filter: float | None = None,
    ) -> None:
        super().__init__(embedding_dim, num_classes, s=s, interclass_filter=interclass_filter)
        self.m = check_range("m", m, 0.0, math.pi / 2)
        self.h = check_range("h", h, 0.0)
        self.t_alpha = check_range("t_alpha", t_alpha, 0.0, 1.0)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        """cos θ (B, C), labels (B,), ‖e_i‖ (B,) -> logits (B, C)."""
        a = norms.detach().clamp(0.001, 100.0)
        if self.training and len(a) > 1:  # a one-sample batch has no std
            ema_(self.batch_mean, a.mean(), self.t_alpha)
            ema_(self.batch_std, a.std(), self.t_alpha)
        mean, std = self.batch_mean.to(a.dtype), self.batch_std.to(a.dtype)
        z = (self.h * (a - mean) / (std + EPS)).clamp(-1.0, 1.0)  # ẑ_i (B,)
        g_angle, g_add = -self.m * z, self.m * z + self.m
        theta = torch.acos(target_cosine(cos, labels)) + g_angle
        target = torch.cos(theta.clamp(EPS, math.pi - EPS)) - g_add
        return self.s * with_target(cos, labels, target)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m:g}, h={self.h:g}, t_alpha={self.t_alpha:g}"
