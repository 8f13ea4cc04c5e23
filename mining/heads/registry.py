"""The cosine heads by name, and `build`: construct a head from a name and keyword parameters
with ValueErrors that name the valid heads or parameters (the harness shows them)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from mining.heads.adaface import AdaFace
from mining.heads.arcface import ArcFace, ArcFaceNoGrad
from mining.heads.base import CosineHead
from mining.heads.cosface import CosFace
from mining.heads.curricularface import CurricularFace
from mining.heads.hsm import HSM
from mining.heads.magface import MagFace
from mining.heads.npcface import NPCFace

#: Every head built on `CosineHead`: the bases that UNPG can wrap.
COSINE_HEADS: dict[str, type[CosineHead]] = {
    "cosine": CosineHead,
    "cosface": CosFace,
    "arcface": ArcFace,
    "arcface_nograd": ArcFaceNoGrad,
    "npcface": NPCFace,
    "hsm": HSM,
    "curricularface": CurricularFace,
    "adaface": AdaFace,
    "magface": MagFace,
}


def build(
    heads: dict[str, type[nn.Module]],
    name: str,
    embedding_dim: int,
    num_classes: int,
    params: dict[str, Any],
) -> nn.Module:
    """``heads[name](embedding_dim, num_classes, **params)``; a ValueError naming the valid
    heads for an unknown name, the valid parameters for an unknown one (a head that takes
    ``**params`` checks its own), and the range for an out-of-range value."""
    if name not in heads:
        raise ValueError(f"unknown head {name!r}; valid heads: {', '.join(heads)}")
    signature = inspect.signature(heads[name])
    named = [p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        unknown = sorted(set(params) - set(named))
        if unknown:
            raise ValueError(
                f"{name}: unknown parameter(s) {', '.join(unknown)}; "
                f"valid parameters: {', '.join(named)}"
            )
    return heads[name](embedding_dim, num_classes, **params)
