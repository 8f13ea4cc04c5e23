"""The cosine head that every margin head builds on, and the tensor helpers of their formulas.

Each head is written formula-first, in the manner of arcface_torch's ``losses.py``: the head's
``logits(cos, labels, norms)`` maps the clamped cosine matrix to its logits in a few lines of
plain torch, and autograd takes the gradient (docs/methods.md §5). ``forward`` is the same for
all: cosine matrix (`cosine`) → the head's ``logits``. Heads whose margin only replaces the
target cosine (cosine, cosface, arcface, arcface_nograd) write it as ``target(c)`` instead and,
by default, run it through the fused op of mining/heads/fused.py, an accelerator of the same
formula tested equal to it in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mining.heads.fused import CosineLogits
from mining.heads.params import check_range, check_size

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


def with_target(x: Tensor, labels: Tensor, target: Tensor) -> Tensor:
    """``x`` (B, C) with entry (i, y_i) replaced by ``target[i]`` (B,); out of place."""
    return x.scatter(1, labels[:, None], target.to(x.dtype)[:, None])


def hard_negatives(cos: Tensor, labels: Tensor, threshold: Tensor) -> Tensor:
    """Boolean M (B, C): cos_ij > threshold_i (B,) and j ≠ y_i; no gradient."""
    with torch.no_grad():
        return (cos > threshold[:, None]).scatter_(1, labels[:, None], False)


def feature_norms(emb: Tensor) -> Tensor:
    """‖e_i‖ (B,) of raw embeddings (B, d), in at least float32 (also under autocast)."""
    return emb.to(torch.promote_types(emb.dtype, torch.float32)).norm(dim=1)


@torch.no_grad()
def ema_(buffer: Tensor, value: Tensor, momentum: float) -> None:
    """In place: buffer ← momentum · value + (1 − momentum) · buffer (no gradient)."""
    buffer.lerp_(value.to(buffer.dtype), momentum)


class _ClampStraightThrough(torch.autograd.Function):
    """clamp(x, −1 + COS_EPS, 1 − COS_EPS) whose gradient is passed straight through: the
    clamp only guards acos / sqrt(1 − cos²) and moves a cosine by at most COS_EPS."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.mark_dirty(x)  # in place: x is a fresh product that no backward needs
        return x.clamp_(-1.0 + COS_EPS, 1.0 - COS_EPS)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def cosine(emb: Tensor, weight: Tensor, labels: Tensor, interclass_filter: float | None) -> Tensor:
    """cos θ (B, C) = clamp(<e_i/|e_i|, W_j/|W_j|>, −1 + ε, 1 − ε), then 0 where filtered.

    ``emb`` (B, d) raw, ``weight`` (C, d), ``labels`` (B,). In at least float32 (also under
    fp16 autocast). Interclass filter: non-target cosines > ``interclass_filter`` become a
    constant 0 with no gradient (docs/methods.md §5).
    """
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    cos = _ClampStraightThrough.apply(cos.to(torch.promote_types(cos.dtype, torch.float32)))
    if interclass_filter is None:
        return cos
    with torch.no_grad():
        filtered = (cos > interclass_filter).scatter_(1, labels[:, None], False)
    return cos.masked_fill(filtered, 0.0)


class CosineHead(nn.Module):
    """Plain cosine head (NormFace): logits = s · cos θ_j, the base of every margin head.

    Shapes: ``emb`` (B, d) raw embeddings, ``labels`` (B,) int64 in [0, C), ``weight`` (C, d),
    logits (B, C) (margin heads may append columns; labels always index the first C).

    Args:
        embedding_dim: d.
        num_classes: C.
        s: scale applied to all cosine logits (default 64).
        interclass_filter: if given, non-target cosines > this threshold become a constant 0
            before the margin (arcface_torch uses 0.4); ``None`` = off.

    A margin head overrides ``target(c)`` (a margin on the target cosine alone) or
    ``logits(cos, labels, norms)`` (anything else); see docs/methods.md §5.
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
        self.fused = type(self).logits is CosineHead.logits

    @property
    def fused(self) -> bool:
        """Run `target` through the fused op of mining/heads/fused.py (measured faster on CPU:
        docs/benchmarks.md); the default where the margin is `target` alone. Set False for the
        plain path: the same logits and gradients."""
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        if value and type(self).logits is not CosineHead.logits:
            raise ValueError(f"{type(self).__name__} has no fused path: its margin is `logits`")
        self._fused = bool(value)

    def target(self, c: Tensor) -> Tensor:
        """The margin on the target cosines: ψ(cos θ_y) (B,) -> (B,). Here: none."""
        return c

    def logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        """The head's formula: cos θ (B, C), labels (B,), feature norms ‖e_i‖ (B,) -> logits.

        Here s · cos θ_j with the targets replaced by s · ψ(cos θ_y) (ψ = `target`).
        """
        return self.s * with_target(cos, labels, self.target(target_cosine(cos, labels)))

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        """(B, d), (B,) -> logits (B, C or more), scaled by s, margins applied."""
        check_labels(emb, labels, self.num_classes)
        if self.fused:
            return CosineLogits.apply(
                emb, self.weight, labels, self.s, COS_EPS, self.interclass_filter, self.target
            )
        cos = cosine(emb, self.weight, labels, self.interclass_filter)
        return self.logits(cos, labels, feature_norms(emb))

    def regularizer(self, emb: Tensor) -> Tensor | float:
        """A term `loss` adds to the cross-entropy (MagFace's λ_g · mean g(a)); here 0."""
        return 0.0

    def loss(self, emb: Tensor, labels: Tensor) -> Tensor:
        """Scalar training loss: mean cross-entropy of the logits + `regularizer`."""
        return F.cross_entropy(self(emb, labels), labels) + self.regularizer(emb)

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, s={self.s:g}, "
            f"interclass_filter={self.interclass_filter}"
        )
