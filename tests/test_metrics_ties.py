"""ivs_verification on tied scores (issue 21 item 1): collapsed embeddings score chance, not
"perfect"; equal scores are bit-equal whichever op computed them; ties follow the documented rules
(TAR@FAR never splits a tie, EER/AUC count it half — scikit-learn's conventions); `collapsed`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score, roc_curve

from harness.ivs_eval import (
    COLLAPSE_SPREAD,
    _checked_embeddings,
    _fixed_point,
    ivs_verification,
)
from harness.metrics import auc, eer, far_key, tar_at_far

FARS = [0.5, 1e-1, 1e-2]


def assert_chance(out: dict, fars=FARS) -> None:
    """Every score tied: no threshold separates anything. TAR@FAR = 0 (accepting the tie would
    accept every impostor), AUC = EER = 0.5 (one diagonal ROC segment), flagged collapsed."""
    assert [out[far_key(f)] for f in fars] == [0.0] * len(fars), out
    assert out["auc"] == 0.5 and out["eer"] == 0.5, out
    assert out["collapsed"] is True


# --- identical (collapsed) embeddings ----------------------------------------------------------


def test_identical_embeddings_score_chance_for_200_directions():
    # the red-team case: 56 of 200 random collapse directions scored TAR 1 / EER 0 / AUC 1
    g = torch.Generator().manual_seed(21)
    n = 12  # 132 impostor pairs: every far in FARS is defined
    for _ in range(200):
        d = int(torch.randint(8, 513, (1,), generator=g))
        u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
        rows = u.expand(n, d)
        small = 1e-3 * rows  # one small norm, identical rows
        # per-row power-of-two norms 2^-k: normalisation returns bit-identical rows
        pow2 = rows * torch.exp2(-torch.randint(0, 40, (n, 1), generator=g).float())
        for a, b in ((rows, rows.clone()), (small, small.clone()), (pow2, rows), (rows, pow2)):
            assert_chance(ivs_verification(a, b, FARS))
        labels = torch.arange(n // 2).repeat(2)
        assert_chance(ivs_verification(pow2, rows, FARS, id_labels=labels, spot_labels=labels))
        out = ivs_verification(
            pow2, pow2, FARS, id_labels=labels, spot_labels=labels, symmetric=True
        )
        assert_chance(out, [0.5, 0.1])  # 60 impostor pairs: 1e-2 is n/a


def test_zero_embeddings_score_chance():
    z = torch.zeros(12, 16)
    assert_chance(ivs_verification(z, z.clone(), FARS))
    assert_chance(ivs_verification(z, z.clone(), FARS, normalize=False))


def test_collapsed_id_side_gives_the_diagonal_roc():
    # every ID row equal: column j's genuine score ties with its n−1 impostors, so FAR = TAR at
    # every threshold — chance, whatever the spot side looks like
    g = torch.Generator().manual_seed(3)
    n = 40
    a = torch.randn(1, 32, generator=g).expand(n, 32)
    b = torch.randn(n, 32, generator=g)
    out = ivs_verification(a, b, FARS)
    assert out["auc"] == pytest.approx(0.5, abs=1e-12)
    assert out["eer"] == pytest.approx(0.5, abs=1e-12)
    for f in FARS:
        assert out[far_key(f)] <= f
    assert out["collapsed"] is True


def test_near_identical_embeddings_are_flagged_collapsed():
    # rows equal up to float32 rounding (arbitrary norms): scores may differ by an ulp, so the
    # figures are noise — `collapsed` says so
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        u = torch.randn(64, generator=g).expand(30, 64)
        a = u * (torch.rand(30, 1, generator=g) * 1e-3 + 1e-6)
        b = u * torch.rand(30, 1, generator=g)
        assert ivs_verification(a, b, FARS)["collapsed"] is True


# --- collapsed flag ------------------------------------------------------------------------------


def test_normal_embeddings_are_not_collapsed():
    g = torch.Generator().manual_seed(5)
    for d in (2, 8, 128):
        a = torch.randn(300, d, generator=g)
        b = a + torch.randn(300, d, generator=g)
        assert ivs_verification(a, b, FARS)["collapsed"] is False
        labels = torch.arange(100).repeat(3)
        out = ivs_verification(a, a, FARS, id_labels=labels, spot_labels=labels, symmetric=True)
        assert out["collapsed"] is False
    # a side with one row has no spread to measure; the other side decides
    a, lab = torch.randn(5, 8, generator=g), torch.tensor([0, 1, 2, 3, 4])
    out = ivs_verification(a, a[:1], [0.5], id_labels=lab, spot_labels=lab[:1])
    assert out["collapsed"] is False


@pytest.mark.parametrize(("sigma", "collapsed"), [(1e-6, True), (1e-5, True), (1e-2, False)])
def test_collapsed_threshold(sigma, collapsed):
    # spread ≈ d·σ² for a unit direction plus N(0, σ²) noise per coordinate
    g = torch.Generator().manual_seed(6)
    u = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
    a = u + sigma * torch.randn(200, 64, generator=g)
    b = u + sigma * torch.randn(200, 64, generator=g)
    assert (64 * sigma**2 <= COLLAPSE_SPREAD) == collapsed
    assert ivs_verification(a, b, FARS)["collapsed"] is collapsed
    # one collapsed side suffices
    assert ivs_verification(torch.randn(200, 64, generator=g), b, FARS)["collapsed"] is collapsed


# --- equal scores are bit-equal whichever op computed them ---------------------------------------


def pooled_embeddings(g: torch.Generator, n: int, d: int, pool: int) -> torch.Tensor:
    """n rows drawn from `pool` random directions (one pair of them 1e-7 apart, a rounding-level
    near-tie), each row scaled by a random power of two: after normalisation rows are
    bit-identical copies of a few directions, so genuine and impostor scores tie exactly."""
    dirs = torch.randn(pool, d, generator=g)
    if pool > 1:
        dirs[1] = dirs[0] + 1e-7 * torch.randn(d, generator=g)
    rows = dirs[torch.randint(0, pool, (n,), generator=g)]
    return rows * torch.exp2(torch.randint(-20, 21, (n, 1), generator=g).float())


def dense_scores(a, b, normalize=True) -> torch.Tensor:
    """All n×m scores by a different op than ivs_verification's (broadcast product and a
    reduction along d, no GEMM), from the same exact fixed-point rows."""
    a, b = _checked_embeddings(a, b, torch.arange(len(a)), torch.arange(len(b)), normalize)
    a, b = _fixed_point(a), _fixed_point(b)
    return (a[:, None, :] * b[None, :, :]).sum(dim=2).float()


def assert_same(x: dict, y: dict, fars=FARS) -> None:
    for f in fars:
        vx, vy = x[far_key(f)], y[far_key(f)]
        assert (math.isnan(vx) and math.isnan(vy)) or vx == vy, (f, x, y)
    assert x["eer"] == y["eer"] and x["auc"] == y["auc"] and x["collapsed"] == y["collapsed"]


@settings(deadline=None, max_examples=60)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(2, 24),
    st.integers(1, 48),
    st.integers(1, 4),
    st.integers(1, 30),
    st.integers(1, 30),
)
def test_equal_scores_give_identical_metrics_whatever_the_op(seed, n, d, pool, block, block2):
    g = torch.Generator().manual_seed(seed)
    a = pooled_embeddings(g, n, d, pool)
    b = torch.cat([a[: n // 2], pooled_embeddings(g, n - n // 2, d, pool)])  # some exact copies
    base = ivs_verification(a, b, FARS, block=block)

    # three ops on the exact rows give the same bits: GEMM, broadcast-and-reduce, row-wise
    s = dense_scores(a, b)
    a64, b64 = (_fixed_point(x) for x in _checked_embeddings(a, b, None, None, True))
    assert torch.equal(s, (a64 @ b64.T).float())
    assert torch.equal(s.diagonal(), (a64 * b64).sum(dim=1).float())
    # the dense reference on the explicit score list
    s, gen = s.reshape(-1), torch.eye(n, dtype=torch.bool).reshape(-1)
    for f in FARS:
        ref = tar_at_far(s, gen, f)
        got = base[far_key(f)]
        assert (math.isnan(ref) and math.isnan(got)) or got == ref
    assert base["eer"] == pytest.approx(eer(s, gen), abs=1e-12)
    assert base["auc"] == pytest.approx(auc(s, gen), abs=1e-12)

    # another block size, permuted rows: the same scores, bit for bit, so the same figures
    perm = torch.randperm(n, generator=g)
    assert_same(base, ivs_verification(a[perm], b[perm], FARS, block=block2))
    # every row duplicated (each pair counted 4×, genuine scores of the copies from the row-wise
    # product, impostors from the GEMM): identical fractions, identical figures
    ids = torch.arange(n).repeat(2)
    dup = ivs_verification(
        a.repeat(2, 1), b.repeat(2, 1), FARS, id_labels=ids, spot_labels=ids, block=block2
    )
    defined = [f for f in FARS if not math.isnan(base[far_key(f)])]
    assert_same(base, dup, defined)
    # a power-of-two rescaling of the inputs changes nothing either (normalisation is exact)
    assert_same(base, ivs_verification(a * 2.0**60, b * 2.0**-60, FARS, block=block2))


def test_genuine_and_impostor_scores_of_equal_rows_are_bit_equal():
    # the mechanism: row-wise product (genuine) and GEMM (impostors) give the same bits
    g = torch.Generator().manual_seed(7)
    for d in (8, 100, 512):
        x = torch.nn.functional.normalize(torch.randn(1, d, generator=g), dim=1)
        a = _fixed_point(x.expand(257, d))
        gemm = (a @ a.T).float()
        rowwise = (a * a).sum(dim=1).float()
        assert torch.unique(gemm).numel() == 1 and torch.equal(rowwise, gemm.diagonal())


def test_overflowing_raw_dot_products_raise():
    a = torch.full((4, 3), 1e20)
    with pytest.raises(ValueError, match="beyond float32"):
        ivs_verification(a, a, [0.5], normalize=False)


def test_extreme_norms_are_cosines_too():
    # normalised, huge and tiny rows score as their directions (norms taken in float64, and no
    # 1e-12 floor as in F.normalize, which left rows of norm < 1e-12 short of unit length)
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
    scale = torch.exp2(torch.randint(-120, 121, (40, 1), generator=g).float())
    assert_same(ivs_verification(a, a + b, FARS), ivs_verification(a * scale, a + b, FARS))


def test_raw_scores_keep_precision_next_to_a_large_row():
    # normalize=False: each row has its own grid, so a row of norm 2^20 does not round the unit
    # rows' coordinates to a coarse grid
    g = torch.Generator().manual_seed(9)
    a = torch.nn.functional.normalize(torch.randn(50, 32, generator=g), dim=1)
    b = torch.nn.functional.normalize(a + torch.randn(50, 32, generator=g), dim=1)
    a[0] *= 2.0**20
    s = dense_scores(a, b, normalize=False).double()
    np.testing.assert_allclose(s[1:], a[1:].double() @ b.double().T, atol=1e-6)
    out = ivs_verification(a, b, [0.1], normalize=False)
    ref = (a.double() @ b.double().T).reshape(-1), torch.eye(50, dtype=torch.bool).reshape(-1)
    assert out["auc"] == pytest.approx(auc(*ref), abs=1e-3)


# --- ties against scikit-learn -----------------------------------------------------------------


def sklearn_eer(y: np.ndarray, s: np.ndarray) -> float:
    """FAR where sklearn's ROC polyline crosses FAR = 1 − TAR (linear interpolation)."""
    fpr, tpr, _ = roc_curve(y, s)
    d = fpr - (1 - tpr)
    k = int(np.argmax(d >= 0))
    if d[k] == 0:
        return float(fpr[k])
    w = -d[k - 1] / (d[k] - d[k - 1])
    return float(fpr[k - 1] + w * (fpr[k] - fpr[k - 1]))


@pytest.mark.parametrize("seed", range(8))
def test_ties_match_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    n_ids, d = 30, 16
    id_labels = torch.arange(n_ids).repeat_interleave(2)
    spot_labels = torch.arange(n_ids).repeat_interleave(3)
    # one of 3 directions per photo, identity-biased: many exact genuine–impostor ties
    dirs = torch.randn(3, d, generator=g)

    def photos(labels: torch.Tensor) -> torch.Tensor:
        pick = (labels + torch.randint(0, 2, labels.shape, generator=g)) % 3
        return dirs[pick] * torch.exp2(torch.randint(-5, 6, (len(labels), 1), generator=g))

    a, b = photos(id_labels), photos(spot_labels)
    out = ivs_verification(
        a, b, FARS, id_labels=id_labels, spot_labels=spot_labels, block=int(seed) + 1
    )
    s = dense_scores(a, b).reshape(-1).double().numpy()
    y = (id_labels[:, None] == spot_labels[None, :]).reshape(-1).numpy()
    assert len(np.intersect1d(s[y], s[~y])) > 0  # genuine and impostor scores do tie
    assert out["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert out["eer"] == pytest.approx(sklearn_eer(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    for f in FARS:
        assert out[far_key(f)] == tpr[fpr <= f * (1 + 1e-12)].max()
    # the scalar functions agree on the same list
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert eer(s, y) == pytest.approx(sklearn_eer(y, s), abs=1e-12)


def test_all_tied_scores_against_sklearn():
    y = np.r_[np.ones(5, bool), np.zeros(20, bool)]
    s = np.full(25, 0.3)
    assert auc(s, y) == roc_auc_score(y, s) == 0.5
    assert eer(s, y) == sklearn_eer(y, s) == 0.5
    assert tar_at_far(s, y, 0.5) == 0.0
