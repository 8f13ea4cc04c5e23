"""MagFace (Meng et al., CVPR 2021): a margin and a regulariser on the feature magnitude."""

from __future__ import annotations

import math

from torch import Tensor

from mining.heads.arcface import arcface_target
from mining.heads.base import CosineHead, feature_norms, target_cosine, with_target
from mining.heads.params import check_range


class MagFace(CosineHead):
    """ArcFace with a per-sample margin that grows with the feature magnitude a_i.

        a_i    = clamp(‖e_i‖, l_a, u_a)                         (with gradient)
        m(a)   = l_m + (u_m − l_m) · (a − l_a) / (u_a − l_a)     ∈ [l_m, u_m]
        target logit  s · ψ_{m(a_i)}(θ_y)  (`arcface_target`, with its fallback), others s · cos θ_j
        g(a)   = 1/a + a / u_a²
        loss   = CE(logits, y) + λ_g · mean_i g(a_i)            (`loss`; `forward` gives logits)

    Shapes as in `CosineHead`; ``norms`` are the raw feature norms ‖e_i‖ (B,). Defaults (the
    paper's): l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, lambda_g = 35, s = 64
    (docs/methods.md §5).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        s: float = 64.0,
        interclass_filter: float | None = None,
    ) -> None:
        super().__init__(embedding_dim, num_classes, s=s, interclass_filter=interclass_filter)
        self.l_a = check_range("l_a", l_a, 0.0, low_open=True, high_open=True)
        self.u_a = check_range("u_a", u_a, self.l_a, low_open=True, high_open=True)
        self.l_m = check_range("l_m", l_m, 0.0, math.pi, high_open=True)
        self.u_m = check_range("u_m", u_m, self.l_m, math.pi, high_open=True)
        self.lambda_g = check_range("lambda_g", lambda_g, 0.0, high_open=True)

    def magnitude(self, norms: Tensor) -> Tensor:
        """a_i = clamp(‖e_i‖, l_a, u_a): (B,) -> (B,)."""
        return norms.clamp(self.l_a, self.u_a)

    def logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        """cos θ (B, C), labels (B,), ‖e_i‖ (B,) -> logits (B, C)."""
        a = self.magnitude(norms)
        margin = self.l_m + (self.u_m - self.l_m) * (a - self.l_a) / (self.u_a - self.l_a)
        return self.s * with_target(cos, labels, arcface_target(target_cosine(cos, labels), margin))

    def regularizer(self, emb: Tensor) -> Tensor:
        """λ_g · mean_i g(a_i), g(a) = 1/a + a/u_a²: the term `loss` adds to the cross-entropy."""
        a = self.magnitude(feature_norms(emb))
        return self.lambda_g * (1.0 / a + a / self.u_a**2).mean()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, l_a={self.l_a:g}, u_a={self.u_a:g}, l_m={self.l_m:g}, "
            f"u_m={self.u_m:g}, lambda_g={self.lambda_g:g}"
        )
