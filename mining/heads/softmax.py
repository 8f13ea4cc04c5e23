"""Plain softmax head: an unnormalised linear classifier, the baseline of the heads benchmark."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mining.heads.base import check_labels
from mining.heads.params import check_size


class SoftmaxHead(nn.Module):
    """logits = emb · Wᵀ (+ b): (B, d) -> (B, C); no normalisation, no scale, no margin.

    Args:
        embedding_dim: d.
        num_classes: C.
        bias: add a learnt per-class bias b (C,) (default off, as in face-recognition heads).

    ``labels`` are validated but unused: the signature matches the margin heads
    (docs/methods.md §5).
    """

    def __init__(self, embedding_dim: int, num_classes: int, *, bias: bool = False) -> None:
        super().__init__()
        self.embedding_dim = check_size("embedding_dim", embedding_dim)
        self.num_classes = check_size("num_classes", num_classes)
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be True or False, got {bias!r}")
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        """(B, d), (B,) -> logits (B, C)."""
        check_labels(emb, labels, self.num_classes)
        return F.linear(emb, self.weight, self.bias)

    def loss(self, emb: Tensor, labels: Tensor) -> Tensor:
        """Scalar training loss: mean cross-entropy of the logits."""
        return F.cross_entropy(self(emb, labels), labels)

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"bias={self.bias is not None}"
        )
