"""harness.metrics against scikit-learn and brute-force threshold sweeps."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score, roc_curve

from harness.metrics import auc, eer, far_key, kfold_accuracy, roc, tar_at_far


def scores_with_ties(seed: int, n: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n scores on `levels` distinct values (many ties), genuine shifted up, both classes present."""
    g = torch.Generator().manual_seed(seed)
    genuine = torch.rand(n, generator=g) < 0.3
    genuine[0], genuine[1] = True, False
    s = torch.randint(0, levels, (n,), generator=g) + genuine * torch.randint(
        0, 3, (n,), generator=g
    )
    return s.double() / levels, genuine


def sweep(s: np.ndarray, g: np.ndarray) -> tuple[list[float], list[float]]:
    """Brute force: (FAR, TAR) at every threshold in {+inf} ∪ scores, descending, by loops."""
    fars, tars = [], []
    for t in [math.inf, *sorted(set(s.tolist()), reverse=True)]:
        fars.append(sum(1 for x, y in zip(s, g, strict=True) if x >= t and not y) / (~g).sum())
        tars.append(sum(1 for x, y in zip(s, g, strict=True) if x >= t and y) / g.sum())
    return fars, tars


cases = st.tuples(st.integers(0, 2**31 - 1), st.integers(2, 300), st.integers(1, 40))


@given(cases)
def test_roc_and_auc_match_sklearn(case):
    s, g = scores_with_ties(*case)
    far, tar, thr = roc(s, g)
    ref_far, ref_tar, ref_thr = roc_curve(g.numpy(), s.numpy(), drop_intermediate=False)
    np.testing.assert_allclose(far, ref_far)
    np.testing.assert_allclose(tar, ref_tar)
    np.testing.assert_array_equal(thr[1:], ref_thr[1:])
    assert auc(s, g) == pytest.approx(roc_auc_score(g.numpy(), s.numpy()), abs=1e-12)


@given(cases, st.sampled_from([0.5, 0.1, 0.05, 0.01, 1e-3]))
def test_tar_at_far_is_the_best_tar_of_a_threshold_sweep(case, far):
    s, g = scores_with_ties(*case)
    n_imp = int((~g).sum())
    got = tar_at_far(s, g, far)
    if n_imp < round(1 / far):
        assert math.isnan(got)
        return
    fars, tars = sweep(s.numpy(), g.numpy())
    assert got == pytest.approx(max(t for f, t in zip(fars, tars, strict=True) if f <= far + 1e-15))


@given(cases)
def test_eer_is_the_crossing_of_the_swept_roc_with_far_eq_frr(case):
    s, g = scores_with_ties(*case)
    fars, tars = sweep(s.numpy(), g.numpy())
    fars, frrs = [*fars, 1.0], [1 - t for t in tars] + [0.0]
    # walk the polyline; on the segment where FAR − FRR changes sign, solve FAR = FRR
    for (f0, r0), (f1, r1) in itertools.pairwise(zip(fars, frrs, strict=True)):
        if f0 - r0 < 0 <= f1 - r1:
            w = (r0 - f0) / ((f1 - f0) - (r1 - r0))
            expected = f0 + w * (f1 - f0)
            break
    assert eer(s, g) == pytest.approx(expected, abs=1e-12)


def brute_kfold(s: np.ndarray, g: np.ndarray, folds: int) -> tuple[float, float]:
    accs = []
    for test in np.array_split(np.arange(s.size), folds):
        train = np.setdiff1d(np.arange(s.size), test)
        values = sorted(set(s[train].tolist()), reverse=True)
        cands = [math.inf] + [(a + b) / 2 for a, b in itertools.pairwise(values)]
        cands.append(-math.inf)
        best = max(cands, key=lambda t: (np.mean((s[train] >= t) == g[train]), t))
        # ties in accuracy go to the highest threshold; the outer ends are the extreme scores
        best = values[0] if best == math.inf else values[-1] if best == -math.inf else best
        accs.append(np.mean((s[test] >= best) == g[test]))
    return float(np.mean(accs)), float(np.std(accs))


@given(st.integers(0, 2**31 - 1), st.integers(40, 200), st.integers(2, 30), st.integers(2, 10))
def test_kfold_accuracy_matches_brute_force(seed, n, levels, folds):
    s, g = scores_with_ties(seed, n, levels)
    s = s.numpy()
    g = g.numpy()
    # every training part needs both classes
    for test in np.array_split(np.arange(n), folds):
        rest = np.setdiff1d(np.arange(n), test)
        if g[rest].all() or not g[rest].any():
            return
    mean, std = kfold_accuracy(s, g, folds)
    ref_mean, ref_std = brute_kfold(s, g, folds)
    assert mean == pytest.approx(ref_mean, abs=1e-12)
    assert std == pytest.approx(ref_std, abs=1e-12)


def test_kfold_accuracy_perfectly_separable_is_one():
    s = np.r_[np.linspace(0.6, 1.0, 50), np.linspace(0.0, 0.4, 50)]
    g = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    perm = np.random.default_rng(0).permutation(100)
    assert kfold_accuracy(s[perm], g[perm]) == (1.0, 0.0)


def test_far_key():
    assert far_key(1e-3) == "tar@1e-3"
    assert far_key(0.1) == "tar@1e-1"
    assert far_key(5e-2) == "tar@5e-2"
    assert far_key(1e-6) == "tar@1e-6"
    with pytest.raises(ValueError, match="far"):
        far_key(0.0)


@pytest.mark.parametrize(
    ("scores", "genuine", "match"),
    [
        ([0.1, 0.2], [True], "length mismatch"),
        ([0.1, 0.2], [False, False], "no genuine"),
        ([0.1, 0.2], [True, True], "no impostor"),
        ([0.1, float("nan")], [True, False], "NaN"),
        ([[0.1, 0.2]], [[True, False]], "1-D"),
    ],
)
@pytest.mark.parametrize("fn", [roc, auc, eer, lambda s, g: tar_at_far(s, g, 0.5)])
def test_bad_input_raises(fn, scores, genuine, match):
    with pytest.raises(ValueError, match=match):
        fn(np.array(scores), np.array(genuine))


def test_tar_at_far_rejects_bad_far():
    with pytest.raises(ValueError, match="far"):
        tar_at_far([0.1, 0.2], [True, False], 1.5)


def test_tar_at_far_nan_rule_boundary():
    # exactly 1/far impostors: defined; one fewer: NaN
    g = np.r_[True, np.zeros(100, bool)]
    s = np.r_[1.0, np.linspace(0, 0.5, 100)]
    assert tar_at_far(s, g, 0.01) == 1.0
    assert math.isnan(tar_at_far(s[:-1], g[:-1], 0.01))
