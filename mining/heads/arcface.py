"""ArcFace (Deng et al., CVPR 2019): additive angular margin, in the two forms of arcface_torch.

The two are separate baselines because their gradients differ (docs/methods.md §5):

* `ArcFace` (classic): the target logit is the differentiable function cos(θ_y + m), with the
  fallback cos θ_y − m·sin m once θ_y + m would pass π (where cos(θ + m) stops decreasing).
* `ArcFaceNoGrad`: the value cos(θ_y + m) is written under no_grad (no fallback), so the
  backward pass is that of the plain cosine head.

`cos_plus` and `arcface_target` are shared with NPCFace, CurricularFace and MagFace.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mining.heads.base import CosineHead
from mining.heads.params import check_range


def cos_plus(cos: Tensor, m: float | Tensor) -> Tensor:
    """cos(θ + m) = cos θ·cos m − sin θ·sin m for cos θ in (−1, 1) and θ ∈ [0, π].

    Differentiable (no acos); ``m`` a float or a tensor broadcastable to ``cos``. ``cos`` must
    already be clamped away from ±1 (sqrt has an infinite slope at 0).
    """
    m = torch.as_tensor(m, dtype=cos.dtype, device=cos.device)
    return cos * torch.cos(m) - torch.sqrt(1.0 - cos * cos) * torch.sin(m)


def arcface_target(c: Tensor, m: float | Tensor) -> Tensor:
    """ψ(θ) = cos(θ + m) if cos θ > cos(π − m), else cos θ − m·sin m: (B,) -> (B,).

    ``m`` a float or a per-sample tensor (B,) (MagFace).
    """
    m = torch.as_tensor(m, dtype=c.dtype, device=c.device)
    return torch.where(c > torch.cos(math.pi - m), cos_plus(c, m), c - m * torch.sin(m))


class _AngularMargin(CosineHead):
    """Shared constructor of the two ArcFace forms: m ∈ [0, π), default 0.5."""

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        m: float = 0.5,
        s: float = 64.0,
        interclass_filter: float | None = None,
    ) -> None:
        super().__init__(embedding_dim, num_classes, s=s, interclass_filter=interclass_filter)
        self.m = check_range("m", m, 0.0, math.pi, high_open=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m:g}"


class ArcFace(_AngularMargin):
    """Classic ArcFace: target logit s·ψ(θ_y) (`arcface_target`), other logits s·cos θ_j.

    Shapes as in `CosineHead`. Default m = 0.5, s = 64.
    """

    def target(self, c: Tensor) -> Tensor:
        return arcface_target(c, self.m)


class ArcFaceNoGrad(_AngularMargin):
    """ArcFace as in arcface_torch's ``CombinedMarginLoss(m1=1, m3=0)``.

    Forward value: target logit s·cos(acos(cos θ_y) + m) (no fallback), others s·cos θ_j.
    Backward: the gradient of the plain cosine head s·cos θ (the margin is a constant shift).
    Shapes as in `CosineHead`. Default m = 0.5, s = 64.
    """

    def target(self, c: Tensor) -> Tensor:
        with torch.no_grad():
            shifted = torch.cos(torch.acos(c) + self.m)
        # value == shifted exactly (c - c.detach() is an exact 0), gradient == dc.
        return shifted + (c - c.detach())
