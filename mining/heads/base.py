"""The cosine head that every margin head builds on (arcface_torch ``losses.py`` style).

``CosineHead`` computes the clamped cosine matrix, applies the optional interclass filter and
scales, all in one fused op (`CosineLogits`). A margin head overrides one of two hooks:

* `CosineHead.target_margin` — the new target cosines ψ(cos θ_y) from the B target cosines
  alone (CosFace, ArcFace, HSM without pseudo-class); the cosine matrix is scaled and its B
  targets are overwritten in place.
* `CosineHead.others_margin` (with ``target_only = False``) — a margin that changes non-target
  logits too (NPCFace, HSM's pseudo-class): it builds the output logits from the cosines and
  names the entries whose gradient it scales (see `OthersMargin`).

Without a margin this is the plain normalised-softmax (NormFace) head, registered as ``cosine``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mining.heads.fused import CosineLogits, OthersMargin
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
    to [-1 + COS_EPS, 1 - COS_EPS] (see `CosineLogits`: the clamp passes gradient through).
    Interclass-filtered entries are a constant 0 with no gradient (arcface_torch builds the
    mask under no_grad): such class centres are treated as probable label noise or duplicate
    identities, not pushed away.
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

    #: The backward computes its gradient in the storage of the interclass filter's and the
    #: margin's (B, C) masks, which saves a fresh (B, C) tensor per step on CPU but allows one
    #: backward per forward; set False to backward twice (``retain_graph=True``, gradcheck).
    reuse_masks = True

    #: True when the margin changes only the target logits (`target_margin`); False for a
    #: head that implements `others_margin`.
    target_only = True

    def cosine(self, emb: Tensor) -> Tensor:
        """Clamped cosine matrix (B, C) between normalised embeddings and class centres."""
        return CosineLogits.apply(emb, self.weight, None, 1.0, COS_EPS, None, None, None)

    def target_margin(self, c: Tensor, labels: Tensor) -> Tensor:
        """New target cosines ψ(c) (B,) from the clamped target cosines c (B,). Here: none.

        Written with differentiable torch ops on the B values: `CosineLogits` takes dψ/dc from
        autograd.
        """
        return c

    def others_margin(self, logits: Tensor, labels: Tensor) -> OthersMargin:
        """Output logits from s·cos (B, C), clamped and filtered, for ``target_only = False``.

        ``logits`` belongs to the hook: it may build its output there (see `OthersMargin`).
        """
        raise NotImplementedError(f"{type(self).__name__} changes only the target logits")

    def margin(self, cos: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The margin that forward applies, on an explicit cosine matrix (B, C), unscaled.

        Returns ``(others, target)``: ``others`` (B, C') supplies every non-target cosine
        (C' > C appends columns), ``target`` (B,) the new target cosines. For inspection and
        tests: forward runs the same hooks inside `CosineLogits`.
        """
        c = target_cosine(cos, labels)
        if self.target_only:
            return cos, self.target_margin(c, labels)
        margin = self.others_margin(self.s * cos, labels)  # the hook may overwrite its input
        return margin.others / self.s, margin.target(c, labels)

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        """(B, d), (B,) -> logits (B, C or more), scaled by s, margins applied."""
        check_labels(emb, labels, self.num_classes)
        hooks = (self.target_margin, None) if self.target_only else (None, self.others_margin)
        return CosineLogits.apply(
            emb, self.weight, labels, self.s, COS_EPS, self.interclass_filter, *hooks,
            self.reuse_masks,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, s={self.s:g}, "
            f"interclass_filter={self.interclass_filter}"
        )
