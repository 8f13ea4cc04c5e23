"""UNPG (Jung et al., BMVC 2022): unified negative pair generation, following the authors' code.

Negative pairs of the mini-batch, after dropping outliers with Tukey fences, become extra
negative logit columns shared by every row of any cosine margin head (docs/methods.md §5):

    s_n   = {<f_i, f_j> : i < j, y_i ≠ y_j}                       (f = normalised embedding)
    Q1, Q3 = v[⌊n/4⌋], v[⌊3n/4⌋] of v = sort(s_n) ascending, n = |s_n|
    kept  = {x ∈ v : Q1 − k·IQR ≤ x ≤ Q3 + k·IQR},  IQR = Q3 − Q1      (ascending order)
    logits = [base logits (B, C') | s · kept, repeated for every row (B, K)]

Nothing is detached: the kept similarities carry gradient to the embeddings. With no
different-label pair (K = 0) the logits are exactly the base head's.

The K extra columns are the same in every row, so the training loss never builds the
(B, C' + K) logits (K ≈ B²/2: 32k columns at B = 256, 9× the width of a 4k-class head):

    CE_i = logsumexp([z_i | s·kept]) − z_i[y_i]
         = logaddexp(logsumexp(z_i), logsumexp(s·kept)) − z_i[y_i]      (z = base logits)

which is the cross-entropy of `forward`'s logits, exactly (tests/test_heads_usage.py checks
value and gradients in float64), in O(B·C' + K) instead of O(B·(C' + K)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mining.heads.params import check_range
from mining.heads.registry import COSINE_HEADS, build


def negative_pair_cosines(emb: Tensor, labels: Tensor) -> Tensor:
    """Cosines of all pairs i < j with different labels, row-major order: (B, d), (B,) -> (n,).

    Computed in at least float32 (also under fp16 autocast), like the head's cosines.
    """
    f = F.normalize(emb, dim=1)
    sim = f @ f.T
    sim = sim.to(torch.promote_types(sim.dtype, torch.float32))
    different = (labels[:, None] != labels[None, :]).triu(diagonal=1)
    return sim[different]


def tukey_kept(values: Tensor, k: float) -> Tensor:
    """Values inside the Tukey fences [Q1 − k·IQR, Q3 + k·IQR], sorted ascending: (n,) -> (K,).

    Quartiles by sorted index, as in the UNPG code: Q1 = v[⌊n/4⌋], Q3 = v[⌊3n/4⌋] (no
    interpolation). Both fences are inclusive. An empty input gives an empty output.
    """
    if values.numel() == 0:
        return values
    v = torch.sort(values).values
    n = v.numel()
    q1, q3 = v[n // 4], v[(3 * n) // 4]
    iqr = q3 - q1
    return v[(v >= q1 - k * iqr) & (v <= q3 + k * iqr)]


class UNPG(nn.Module):
    """Wrap a cosine margin head and append the kept in-batch negative pairs as logit columns.

    ``UNPG(embedding_dim, num_classes, base="arcface", k=1.5, **base_params)``; ``base`` is any
    head of `COSINE_HEADS` and ``base_params`` go to it (e.g. ``m``, ``s``,
    ``interclass_filter``); its scale ``s`` also scales the extra columns. ``forward(emb (B, d),
    labels (B,)) -> (B, C' + K)`` where C' is the base head's width (C, or C + 1 for HSM's
    virtual class) and labels index the first C. ``weight`` is the base head's (C, d)
    parameter; `loss` adds the base head's regulariser (MagFace's) to the cross-entropy.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        base: str = "arcface",
        k: float = 1.5,
        **base_params: object,
    ) -> None:
        super().__init__()
        if base not in COSINE_HEADS:
            bases = ", ".join(map(repr, COSINE_HEADS))
            raise ValueError(f"base must be one of {bases}; got {base!r}")
        self.k = check_range("k", k, 0.0)
        try:
            self.base = build(COSINE_HEADS, base, embedding_dim, num_classes, base_params)
        except ValueError as err:
            raise ValueError(f"unpg (own parameters: base, k): {err}") from None
        self.base_name = base

    @property
    def weight(self) -> nn.Parameter:
        """The base head's class centres (C, d)."""
        return self.base.weight

    @property
    def s(self) -> float:
        return self.base.s

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    @property
    def count_labels(self) -> Callable[[Tensor], None]:
        """The base head's ``count_labels`` (HSM's class counts); absent for other bases.

        Raises AttributeError when the base has none, so ``hasattr(head, "count_labels")``
        tells a trainer whether the head needs the class counts, wrapped or not.
        """
        return self.base.count_labels

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        """(B, d), (B,) -> logits (B, C' + K)."""
        logits, extra = self._logits_and_columns(emb, labels)
        if extra.numel() == 0:
            return logits
        return torch.cat([logits, extra.expand(logits.shape[0], -1)], dim=1)

    def loss(self, emb: Tensor, labels: Tensor) -> Tensor:
        """Scalar training loss: mean cross-entropy of `forward`'s logits + the base's
        regulariser, without building the shared columns per row (module docstring)."""
        logits, extra = self._logits_and_columns(emb, labels)
        target = logits.gather(1, labels[:, None])[:, 0]
        lse = torch.logsumexp(logits, dim=1)
        if extra.numel():
            lse = torch.logaddexp(lse, torch.logsumexp(extra, dim=0))
        return (lse - target).mean() + self.base.regularizer(emb)

    def _logits_and_columns(self, emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The base head's logits (B, C') and the shared columns s · kept (K,) in their dtype."""
        logits = self.base(emb, labels)
        kept = tukey_kept(negative_pair_cosines(emb, labels), self.k)
        return logits, (self.s * kept).to(logits.dtype)

    def extra_repr(self) -> str:
        return f"base={self.base_name!r}, k={self.k:g}"
