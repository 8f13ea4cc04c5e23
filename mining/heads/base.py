"""The cosine head that every margin head builds on (arcface_torch ``losses.py`` style).

``CosineHead`` computes the clamped cosine matrix, applies the optional interclass filter and
scales; a margin head only overrides `CosineHead.margin`, which returns its new target cosines
(and, if it changes them, its non-target cosines). Without a margin this is the plain normalised-softmax (NormFace) head,
registered as ``cosine``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mining.heads.fused import ClampedCosine, ScaleWithTarget
from mining.heads.params import CheckedParams, check_range, check_size

#: Cosines are clamped to [-1 + COS_EPS, 1 - COS_EPS] before any acos/sqrt(1 - cos²): fp16 dot
#: products of unit vectors can exceed 1, and d/dc sqrt(1 - c²) is infinite at |c| = 1.
#: 1e-6 is well above float32 resolution near 1 (6e-8), so the clamp survives the upcast.
COS_EPS = 1e-6


def check_labels(emb: Tensor, labels: Tensor, num_classes: int) -> None:
    """Raise a ValueError unless ``emb`` is (B, d) and ``labels`` is (B,) int64 in [0, num_classes)."""
    if emb.dim() != 2:
        raise ValueError(f"emb must be (B, d), got shape {tuple(emb.shape)}")
    if labels.shape != emb.shape[:1]:
        raise ValueError(
            f"labels must be (B,) = ({emb.shape[0]},), got shape {tuple(labels.shape)}"
        )
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be an int64 tensor, got {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )


def target_cosine(cos: Tensor, labels: Tensor) -> Tensor:
    """cos θ_y per row: (B, C), (B,) -> (B,)."""
    return cos.gather(1, labels[:, None]).squeeze(1)


def non_target_mask(cos: Tensor, labels: Tensor) -> Tensor:
    """Boolean (B, C), True everywhere except at each row's label column."""
    return torch.ones_like(cos, dtype=torch.bool).scatter_(1, labels[:, None], False)


def interclass_filter(cos: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """arcface_torch interclass filtering: non-target cosines above ``threshold`` become 0.

    The mask is a boolean constant (arcface_torch builds it under no_grad), so the filtered
    entries get zero gradient: such class centres are treated as probable label noise or
    duplicate identities, not pushed away. (B, C) -> (B, C).
    """
    dirty = (cos > threshold) & non_target_mask(cos, labels)
    return cos.masked_fill(dirty, 0.0)


class CosineHead(CheckedParams, nn.Module):
    """Plain cosine head (NormFace): logits = s · cos θ_j, cos θ_j = <f/|f|, W_j/|W_j|>.

    Shapes: ``emb`` (B, d) raw embeddings, ``labels`` (B,) int64 in [0, C), ``weight`` (C, d),
    logits (B, C) (margin heads may append columns; labels always index the first C).

    Args:
        embedding_dim: d.
        num_classes: C.
        s: scale applied to all cosine logits (default 64).
        interclass_filter: if given, non-target cosines > this threshold are zeroed under
            no_grad before the margin is applied (arcface_torch uses 0.4); ``None`` = off.

    The cosine matrix is computed in at least float32 (also under fp16 autocast) and clamped
    to [-1 + COS_EPS, 1 - COS_EPS] (see `ClampedCosine`: the clamp passes gradient through).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        s: float = 64.0,
        interclass_filter: float | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim = check_size("embedding_dim", embedding_dim)
        self.num_classes = check_size("num_classes", num_classes)
        self.s = check_range("s", s, 0.0, low_open=True, high_open=True)
        self.interclass_filter = (
            None
            if interclass_filter is None
            else check_range("interclass_filter", interclass_filter, -1.0, 1.0)
        )
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)  # arcface_torch's init of the class centres

    def cosine(self, emb: Tensor) -> Tensor:
        """Clamped cosine matrix (B, C) between normalised embeddings and class centres."""
        return ClampedCosine.apply(F.normalize(emb, dim=1), self.weight, COS_EPS)

    def margin(self, cos: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """This head's margin on the (filtered, clamped) cosines (B, C).

        Returns ``(others, target)``: ``others`` (B, C') supplies every non-target logit
        (C' > C appends columns), ``target`` (B,) the new target cosines, or None to keep
        ``others``' own. Here: no margin.
        """
        return cos, None

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        """(B, d), (B,) -> logits (B, C or more), scaled by s, margins applied."""
        check_labels(emb, labels, self.num_classes)
        cos = self.cosine(emb)
        if self.interclass_filter is not None:
            cos = interclass_filter(cos, labels, self.interclass_filter)
        others, target = self.margin(cos, labels)
        if target is None:
            return self.s * others
        return ScaleWithTarget.apply(others, labels, target, self.s)

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, s={self.s:g}, "
            f"interclass_filter={self.interclass_filter}"
        )
