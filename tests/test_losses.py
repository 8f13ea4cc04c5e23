"""Metric loss formulas against numpy, and their argument validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mining.losses import LOSSES, MPSLoss, QuadrupletLoss, TermSims, TripletL2Loss, TripletLoss


def _sims(seed, n):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(3)]


@given(st.integers(0, 2**31 - 1), st.integers(0, 20), st.floats(0.0, 1.0))
def test_triplet_forms_match_numpy(seed, n, margin):
    ap, an, _ = _sims(seed, n)
    a, b = ap.numpy(), an.numpy()
    cos = TripletLoss(margin)(TermSims(ap, an)).numpy()
    l2 = TripletL2Loss(margin)(TermSims(ap, an)).numpy()
    np.testing.assert_allclose(cos, np.maximum(b - a + margin, 0.0), rtol=0, atol=1e-12)
    # Unit vectors: |u − v|² = 2 − 2 u·v.
    np.testing.assert_allclose(l2, np.maximum((2 - 2 * a) - (2 - 2 * b) + margin, 0.0), atol=1e-12)
    assert MPSLoss.max_per_pair and not TripletLoss.max_per_pair


@given(st.integers(0, 2**31 - 1), st.integers(0, 20))
def test_quadruplet_matches_numpy_on_vectors(seed, n):
    gen = torch.Generator().manual_seed(seed)
    a, p, n1, n2 = (
        torch.nn.functional.normalize(torch.randn(n, 4, generator=gen, dtype=torch.float64), dim=1)
        for _ in range(4)
    )
    dot = lambda u, v: (u * v).sum(1)  # noqa: E731
    got = QuadrupletLoss(0.3, 0.1)(TermSims(dot(a, p), dot(a, n1), dot(n1, n2))).numpy()
    d2 = lambda u, v: ((u.numpy() - v.numpy()) ** 2).sum(1)  # noqa: E731
    want = np.maximum(d2(a, p) - d2(a, n1) + 0.3, 0) + np.maximum(d2(a, p) - d2(n1, n2) + 0.1, 0)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_quadruplet_needs_nn_and_ordered_alphas():
    with pytest.raises(ValueError, match=r"sims\.nn"):
        QuadrupletLoss()(TermSims(torch.zeros(1), torch.zeros(1)))
    with pytest.raises(ValueError, match="alpha2 must be < alpha1"):
        QuadrupletLoss(0.1, 0.2)
    with pytest.raises(ValueError, match="alpha1 must be >= 0"):
        QuadrupletLoss(-0.1, -0.2)


def test_registry_and_margin_validation():
    assert set(LOSSES) == {"triplet", "triplet_l2", "quadruplet", "mps"}
    with pytest.raises(ValueError, match="margin must be >= 0"):
        TripletLoss(-1.0)
