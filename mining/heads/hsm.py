"""HSM (Bai et al., ICIP 2023) — RECONSTRUCTED from the paper's abstract, not its equations.

No equations of HSM are public. What the abstract states: a real-class margin that depends on
the class size (larger for minority classes) and a pseudo-class margin for samples that
saturate early. Every concrete choice below (LDAM's n^(−1/4) rule, the two saturation tests,
the two pseudo-class variants, all defaults) is ours, exposed as parameters so the harness can
ablate them. Never report these settings as the paper's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mining.heads.base import CosineHead, target_cosine, with_target
from mining.heads.params import check_choice, check_range

PSEUDO_VARIANTS = ("false_class", "virtual_class", "none")
SATURATION_TESTS = ("prob", "gap")


class HSM(CosineHead):
    """Class-size margin + pseudo-class margin for saturated samples. [recon]

    1. Real-class margin (LDAM-style, additive on the target cosine):
           m_y = m_max · n_y^(−1/4) / max_j n_j^(−1/4)   (max over classes with n_j > 0)
           target cosine c'_y = cos θ_y − m_y
       so the smallest class gets m_max and larger classes less.
    2. Saturation (under no_grad, on the logits after step 1), ``saturation=``:
           "prob": p_y = softmax(s · c')_y > tau
           "gap":  c'_y − max_{j≠y} cos θ_j > delta        (cosine units)
    3. Pseudo-class margin for saturated rows, ``pseudo=``:
           "false_class":   non-target cosines become cos θ_j + m_p
           "virtual_class": one extra column (index C) with cosine 1 − m_p; rows that are not
                            saturated get the most negative finite float there (its softmax
                            weight is exactly 0, and logits stay finite)
           "none":          step 1 only

    Class counts n_j: pass ``class_counts`` (length C) or call `set_class_counts` /
    `count_labels` before training; a batch label whose class count is 0 raises a ValueError.

    Shapes as in `CosineHead`; logits are (B, C), or (B, C + 1) with ``pseudo="virtual_class"``.
    Defaults (all [recon] except m_max = 0.5 from LDAM): tau = 0.9, delta = 0.3, m_p = 0.2.
    See docs/methods.md §5.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        class_counts: Sequence[int] | Tensor | None = None,
        m_max: float = 0.5,
        pseudo: str = "false_class",
        saturation: str = "prob",
        tau: float = 0.9,
        delta: float = 0.3,
        m_p: float = 0.2,
        s: float = 64.0,
        interclass_filter: float | None = None,
    ) -> None:
        super().__init__(embedding_dim, num_classes, s=s, interclass_filter=interclass_filter)
        self.m_max = check_range("m_max", m_max, 0.0, 2.0)
        self.pseudo = check_choice("pseudo", pseudo, PSEUDO_VARIANTS)
        self.saturation = check_choice("saturation", saturation, SATURATION_TESTS)
        self.tau = check_range("tau", tau, 0.0, 1.0, low_open=True, high_open=True)
        self.delta = check_range("delta", delta, 0.0, 2.0)
        self.m_p = check_range("m_p", m_p, 0.0, 2.0)
        self.register_buffer("class_counts", torch.zeros(num_classes, dtype=torch.int64))
        if class_counts is not None:
            self.set_class_counts(class_counts)

    def set_class_counts(self, counts: Sequence[int] | Tensor) -> None:
        """Replace the class counts n_j: length C, non-negative integers."""
        counts = torch.as_tensor(counts)
        if counts.shape != (self.num_classes,):
            raise ValueError(
                f"class_counts must have length num_classes={self.num_classes}, "
                f"got shape {tuple(counts.shape)}"
            )
        if counts.dtype.is_floating_point and not torch.equal(counts, counts.round()):
            raise ValueError("class_counts must be integers")
        if (counts < 0).any():
            raise ValueError("class_counts must be >= 0")
        self.class_counts.copy_(counts.to(torch.int64))

    def count_labels(self, labels: Tensor) -> None:
        """Add the occurrences of each class in ``labels`` (any shape, int64 in [0, C))."""
        labels = labels.reshape(-1)
        if labels.dtype != torch.int64:
            raise ValueError(f"labels must be an int64 tensor, got {labels.dtype}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        self.class_counts += torch.bincount(labels, minlength=self.num_classes).to(
            self.class_counts.device
        )

    def class_margins(self, labels: Tensor | None = None) -> Tensor:
        """Real-class margins m_y (float64) of ``labels`` (B,), or of all classes (C,) if None.

        m_y = m_max · (n_min / n_y)^(1/4), which equals m_max · n_y^(−1/4) / max_j n_j^(−1/4)
        with n_min the smallest non-zero count; 0 for classes never counted. Computed from the
        counts on each call (cheap: one reduction over C), so nothing derived can go stale.
        """
        counts = self.class_counts.to(torch.float64)
        n_min = counts.masked_fill(counts == 0, torch.inf).min()
        n = counts if labels is None else counts[labels]
        return torch.where(n > 0, self.m_max * (n_min / n.clamp(min=1)) ** 0.25, 0.0)

    def batch_margins(self, labels: Tensor) -> Tensor:
        """m_y (B,) of the batch labels; a ValueError if a label's class was never counted."""
        if (self.class_counts[labels] == 0).any():
            raise ValueError(
                "HSM needs the class counts of every batch label: pass class_counts=... "
                "or call set_class_counts(...) / count_labels(...) first"
            )
        return self.class_margins(labels)

    def logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        """cos θ (B, C), labels (B,) -> logits (B, C), or (B, C + 1) for "virtual_class"."""
        target = target_cosine(cos, labels) - self.batch_margins(labels).to(cos.dtype)  # c'_y
        real = with_target(cos, labels, target)  # step 1
        if self.pseudo == "none":
            return self.s * real
        with torch.no_grad():  # step 2
            if self.saturation == "prob":
                p_target = target_cosine(F.softmax(self.s * real, dim=1), labels)
                saturated = p_target > self.tau
            else:
                others = cos.scatter(1, labels[:, None], -torch.inf).amax(dim=1)
                saturated = target - others > self.delta
        if self.pseudo == "false_class":  # step 3
            shifted = cos + self.m_p * saturated.to(cos.dtype)[:, None]
            return self.s * with_target(shifted, labels, target)
        # unsaturated rows: the most negative finite float (softmax weight 0, logits finite)
        virtual = torch.full_like(target, torch.finfo(cos.dtype).min)
        virtual.masked_fill_(saturated, self.s * (1.0 - self.m_p))
        return torch.cat([self.s * real, virtual[:, None]], dim=1)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, m_max={self.m_max:g}, pseudo={self.pseudo!r}, "
            f"saturation={self.saturation!r}, tau={self.tau:g}, delta={self.delta:g}, "
            f"m_p={self.m_p:g}"
        )
