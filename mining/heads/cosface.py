"""CosFace (Wang et al., CVPR 2018): additive cosine margin on the target class."""

from __future__ import annotations

from torch import Tensor

from mining.heads.base import CosineHead
from mining.heads.params import check_range


class CosFace(CosineHead):
    """Target logit s·(cos θ_y − m), other logits s·cos θ_j (docs/methods.md §5).

    Shapes as in `CosineHead`: emb (B, d), labels (B,) -> logits (B, C).

    Args:
        m: additive cosine margin, in [0, 2] (default 0.35; arcface_torch configs use 0.4).
        s, interclass_filter: see `CosineHead`.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        m: float = 0.35,
        s: float = 64.0,
        interclass_filter: float | None = None,
    ) -> None:
        super().__init__(embedding_dim, num_classes, s=s, interclass_filter=interclass_filter)
        self.m = check_range("m", m, 0.0, 2.0)

    def target(self, c: Tensor) -> Tensor:
        """ψ(cos θ_y) = cos θ_y − m: (B,) -> (B,)."""
        return c - self.m

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m:g}"
