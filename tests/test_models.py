"""Backbones: output shapes, gradients, published parameter counts, config errors."""

from __future__ import annotations

import pytest
import torch

from harness.models import MODELS, build_model


@pytest.mark.parametrize(
    ("kind", "shape", "params"),
    [
        ("mlp", (12,), {"hidden": 16, "depth": 3}),
        ("cnn_small", (3, 20, 20), {"width": 4}),
        ("iresnet18", (3, 32, 32), {}),
        ("iresnet50", (1, 16, 16), {"dropout": 0.1}),
    ],
)
def test_shapes_and_gradients(kind, shape, params):
    g = torch.Generator().manual_seed(0)
    model = build_model(kind, shape, 24, **params)
    x = torch.randn(3, *shape, generator=g)
    emb = model(x)
    assert emb.shape == (3, 24) and torch.isfinite(emb).all()
    emb.pow(2).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 24)


@pytest.mark.parametrize(("kind", "millions"), [("iresnet18", 24.03), ("iresnet50", 43.59)])
def test_iresnet_parameter_counts_match_arcface_torch(kind, millions):
    # insightface arcface_torch r18 / r50 at 3×112×112 → 512 (published model sizes)
    model = build_model(kind, (3, 112, 112), 512)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)


@pytest.mark.parametrize(
    ("kind", "shape", "params", "match"),
    [
        ("resnet", (3, 8, 8), {}, "model.kind"),
        ("mlp", (3, 8, 8), {}, r"input_shape \(d,\)"),
        ("mlp", (8,), {"width": 3}, r"model\.width"),
        ("mlp", (8,), {"depth": 0}, r"model\.depth"),
        ("iresnet18", (3, 100, 100), {}, "multiples of 16"),
        ("cnn_small", (8,), {}, r"\(C, H, W\)"),
    ],
)
def test_bad_config(kind, shape, params, match):
    with pytest.raises(ValueError, match=match):
        build_model(kind, shape, 8, **params)


def test_registry():
    assert set(MODELS) == {"mlp", "cnn_small", "iresnet18", "iresnet50"}
