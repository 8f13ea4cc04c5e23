"""Margin heads: ``HEADS[name](embedding_dim, num_classes, **params)``.

Every head has a parameter ``weight`` (C, d) and ``forward(emb (B, d), labels (B,)) -> logits``
(scaled, margins applied), trained with ``F.cross_entropy(head(emb, y), y)``. Unknown names and
unknown or out-of-range parameters raise a ValueError that lists the valid ones.

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
unpg           any cosine head + in-batch negative-pair columns        base="arcface", k=1.5
============== ======================================================= =====================

All but ``softmax`` take ``s`` and ``interclass_filter`` (a cosine threshold, e.g. 0.4; off by
default).
"""

from __future__ import annotations

from torch import nn

from mining.heads.arcface import ArcFace, ArcFaceNoGrad
from mining.heads.base import COS_EPS, CosineHead
from mining.heads.cosface import CosFace
from mining.heads.hsm import HSM
from mining.heads.npcface import NPCFace
from mining.heads.softmax import SoftmaxHead
from mining.heads.unpg import UNPG


class UnknownHeadError(KeyError, ValueError):
    """``HEADS[name]`` with an unknown name; a ValueError that is still a KeyError for dicts."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would print the message with quotes


class _Registry(dict):
    def __missing__(self, name: object) -> type[nn.Module]:
        raise UnknownHeadError(f"unknown head {name!r}; valid heads: {', '.join(self)}")


HEADS: dict[str, type[nn.Module]] = _Registry(
    softmax=SoftmaxHead,
    cosine=CosineHead,
    cosface=CosFace,
    arcface=ArcFace,
    arcface_nograd=ArcFaceNoGrad,
    npcface=NPCFace,
    hsm=HSM,
    unpg=UNPG,
)

__all__ = [
    "COS_EPS",
    "HEADS",
    "HSM",
    "UNPG",
    "ArcFace",
    "ArcFaceNoGrad",
    "CosFace",
    "CosineHead",
    "NPCFace",
    "SoftmaxHead",
    "UnknownHeadError",
]
