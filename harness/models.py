"""Backbones: `build_model(kind, input_shape, embedding, **params)`.

Every model maps (B, *input_shape) to raw embeddings (B, embedding); the objective or head
L2-normalises them. Kinds:

- `mlp` — for feature vectors (input_shape (d,)): [Linear → BN → ReLU] × depth → Linear.
  params: hidden (256), depth (2).
- `cnn_small` — CPU-friendly CNN for small images (C, H, W): 3 stride-2 [Conv3×3 → BN → ReLU]
  stages of width, 2·width, 4·width, global average pool, Linear. params: width (32).
- `iresnet18` / `iresnet50` — our compact implementation of the ArcFace "improved ResNet"
  (insightface arcface_torch layout): 3×3 stem conv (stride 1) → BN → PReLU, four stages of
  IBasicBlock (BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN, + shortcut) with 64/128/256/512
  channels and [2,2,2,2] / [3,4,14,3] blocks, the first block of each stage with stride 2;
  head BN2d → dropout → flatten → Linear(512·H/16·W/16 → embedding) → BN1d.
  Made for 3×112×112 (7×7 final map) and embedding 512; H and W must be multiples of 16.
  params: dropout (0.0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _check_params(kind: str, params: dict[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) for model {kind!r}: {', '.join('model.' + k for k in unknown)}; "
            f"allowed: {', '.join(sorted(allowed)) or 'none'}"
        )
    return {**allowed, **params}


def _positive_int(kind: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model.{key} for {kind!r} must be a positive integer; got {value!r}")
    return value


def mlp(input_shape: tuple[int, ...], embedding: int, **params: Any) -> nn.Module:
    p = _check_params("mlp", params, {"hidden": 256, "depth": 2})
    if len(input_shape) != 1:
        raise ValueError(f"model 'mlp' needs input_shape (d,); got {tuple(input_shape)}")
    hidden = _positive_int("mlp", "hidden", p["hidden"])
    depth = _positive_int("mlp", "depth", p["depth"])
    layers: list[nn.Module] = []
    width = input_shape[0]
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, embedding))
    return nn.Sequential(*layers)


def cnn_small(input_shape: tuple[int, ...], embedding: int, **params: Any) -> nn.Module:
    p = _check_params("cnn_small", params, {"width": 32})
    if len(input_shape) != 3:
        raise ValueError(f"model 'cnn_small' needs input_shape (C, H, W); got {tuple(input_shape)}")
    w = _positive_int("cnn_small", "width", p["width"])
    layers: list[nn.Module] = []
    c_in = input_shape[0]
    for c_out in (w, 2 * w, 4 * w):
        layers += [
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, embedding)]
    return nn.Sequential(*layers)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block of the ArcFace iResNet."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in, eps=1e-5),
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out, eps=1e-5),
            nn.PReLU(c_out),
            nn.Conv2d(c_out, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out, eps=1e-5),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class IResNet(nn.Module):
    """ArcFace iResNet (module docstring). x (B, C, H, W) → (B, embedding)."""

    WIDTHS = (64, 128, 256, 512)

    def __init__(
        self,
        blocks: tuple[int, int, int, int],
        input_shape: tuple[int, ...],
        embedding: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        c, h, w = input_shape
        self.stem = nn.Sequential(
            nn.Conv2d(c, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
        )
        stages: list[nn.Module] = []
        c_in = 64
        for n, c_out in zip(blocks, self.WIDTHS, strict=True):
            stages += [IBasicBlock(c_in, c_out, 2)] + [
                IBasicBlock(c_out, c_out, 1) for _ in range(n - 1)
            ]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(c_in * (h // 16) * (w // 16), embedding),
            nn.BatchNorm1d(embedding),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def _iresnet(kind: str, blocks: tuple[int, int, int, int]) -> Callable[..., nn.Module]:
    def build(input_shape: tuple[int, ...], embedding: int, **params: Any) -> nn.Module:
        p = _check_params(kind, params, {"dropout": 0.0})
        if len(input_shape) != 3 or input_shape[1] % 16 or input_shape[2] % 16:
            raise ValueError(
                f"model {kind!r} needs input_shape (C, H, W) with H, W multiples of 16 "
                f"(3×112×112 is standard); got {tuple(input_shape)}"
            )
        if not 0.0 <= p["dropout"] < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1); got {p['dropout']!r}")
        return IResNet(blocks, tuple(input_shape), embedding, float(p["dropout"]))

    build.__doc__ = f"{kind}: IResNet with blocks {blocks} (module docstring)."
    return build


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn_small": cnn_small,
    "iresnet18": _iresnet("iresnet18", (2, 2, 2, 2)),
    "iresnet50": _iresnet("iresnet50", (3, 4, 14, 3)),
}


def build_model(
    kind: str, input_shape: tuple[int, ...], embedding: int, **params: Any
) -> nn.Module:
    """The backbone `kind` (a key of MODELS) for inputs (B, *input_shape) and outputs
    (B, embedding); `params` are the kind's keyword parameters (module docstring)."""
    if kind not in MODELS:
        raise ValueError(f"model.kind must be one of {', '.join(map(repr, MODELS))}; got {kind!r}")
    if isinstance(embedding, bool) or not isinstance(embedding, int) or embedding < 1:
        raise ValueError(f"model.embedding must be a positive integer; got {embedding!r}")
    return MODELS[kind](tuple(input_shape), embedding, **params)
