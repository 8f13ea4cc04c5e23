"""Margin heads: ``make_head(name, embedding_dim, num_classes, **params)`` or ``HEADS[name](...)``.

Every head has a parameter ``weight`` (C, d), ``forward(emb (B, d), labels (B,)) -> logits``
(scaled, margins applied) and ``loss(emb, labels)`` (the cross-entropy of its logits; MagFace
adds its regulariser). `make_head` raises a ValueError that lists the valid heads for an
unknown name and the valid parameters for an unknown one; out-of-range values raise in the
constructors. Each head's formula is plain torch in its own module; see docs/methods.md §5.

============== ======================================================= =====================
name           logits                                                  defaults
============== ======================================================= =====================
softmax        emb · Wᵀ (unnormalised linear)                          bias=False
cosine         s·cos θ (NormFace; the base of all margin heads)        s=64
cosface        target s·(cos θ_y − m)                                  m=0.35
arcface        target s·cos(θ_y + m), fallback cos θ_y − m·sin m       m=0.5
arcface_nograd value of arcface (no fallback), gradient of ``cosine``  m=0.5
npcface        sample margin + hard negatives t·cos θ + α              m=0.5, m0=0.4, m1=0.2
hsm            [recon] class-size margin + pseudo-class margin         m_max=0.5
curricularface arcface target + hard negatives cos θ·(t + cos θ)       m=0.5, momentum=0.01
adaface        norm-adaptive angular + additive target margin          m=0.4, h=0.333
magface        magnitude-dependent arcface margin + regulariser        l_m=0.45, u_m=0.8
unpg           any cosine head + in-batch negative-pair columns        base="arcface", k=1.5
============== ======================================================= =====================

All but ``softmax`` take ``s`` and ``interclass_filter`` (a cosine threshold, e.g. 0.4; off by
default).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mining.heads.adaface import AdaFace
from mining.heads.arcface import ArcFace, ArcFaceNoGrad
from mining.heads.base import COS_EPS, CosineHead
from mining.heads.cosface import CosFace
from mining.heads.curricularface import CurricularFace
from mining.heads.hsm import HSM
from mining.heads.magface import MagFace
from mining.heads.npcface import NPCFace
from mining.heads.registry import COSINE_HEADS, build
from mining.heads.softmax import SoftmaxHead
from mining.heads.unpg import UNPG

HEADS: dict[str, type[nn.Module]] = {"softmax": SoftmaxHead, **COSINE_HEADS, "unpg": UNPG}


def make_head(name: str, embedding_dim: int, num_classes: int, **params: Any) -> nn.Module:
    """``HEADS[name](embedding_dim, num_classes, **params)``, with ValueErrors that name the
    valid heads (unknown name) or the valid parameters (unknown or out-of-range parameter)."""
    return build(HEADS, name, embedding_dim, num_classes, params)


__all__ = [
    "COS_EPS",
    "HEADS",
    "HSM",
    "UNPG",
    "AdaFace",
    "ArcFace",
    "ArcFaceNoGrad",
    "CosFace",
    "CosineHead",
    "CurricularFace",
    "MagFace",
    "NPCFace",
    "SoftmaxHead",
    "make_head",
]
