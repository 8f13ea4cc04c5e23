"""ivs_verification: chunked all-vs-all IvS scoring equals the dense computation; sanity on
random and identical embeddings; the acceptance figure of the default synthetic difficulty."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score, roc_curve

from harness.data import PairBatchSampler, build_data
from harness.ivs_eval import ivs_verification
from harness.metrics import auc, eer, far_key, min_impostors, tar_at_far
from harness.models import build_model

FARS = [0.5, 1e-1, 1e-2, 1e-3, 1e-4]


@given(st.integers(0, 2**31 - 1), st.integers(2, 60), st.integers(1, 6), st.integers(1, 70))
def test_chunked_equals_dense(seed, n, d, block):
    # small-integer embeddings and raw dot products: every score is exact in float32, with ties
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-2, 3, (n, d), generator=g).float()
    b = a + torch.randint(-1, 2, (n, d), generator=g).float()
    got = ivs_verification(a, b, FARS, block=block, normalize=False)
    scores = (a @ b.T).reshape(-1)
    genuine = torch.eye(n, dtype=torch.bool).reshape(-1)
    for far in FARS:
        ref = tar_at_far(scores, genuine, far)
        assert (math.isnan(ref) and math.isnan(got[far_key(far)])) or got[far_key(far)] == ref
    assert got["eer"] == pytest.approx(eer(scores, genuine), abs=1e-12)
    assert got["auc"] == pytest.approx(auc(scores, genuine), abs=1e-12)


def dense_oracle(scores: list[float], genuine: list[bool]) -> dict[str, float]:
    """Reference figures of a dense pair list: TAR@FAR = best TPR of sklearn's ROC vertices with
    FPR ≤ far (NaN below ⌈1/far⌉ impostors), AUC = roc_auc_score, EER from harness `eer` (itself
    checked against a brute-force threshold sweep in test_metrics)."""
    s, g = np.array(scores), np.array(genuine)
    fpr, tpr, _ = roc_curve(g, s, drop_intermediate=False)
    out = {
        far_key(f): tpr[fpr <= f * (1 + 1e-12)].max()
        if (~g).sum() >= min_impostors(f)
        else math.nan
        for f in FARS
    }
    return {**out, "auc": roc_auc_score(g, s), "eer": eer(s, g)}


def assert_matches(got: dict[str, float], ref: dict[str, float]) -> None:
    for far in FARS:
        key = far_key(far)
        assert (math.isnan(ref[key]) and math.isnan(got[key])) or got[key] == ref[key]
    assert got["eer"] == pytest.approx(ref["eer"], abs=1e-12)
    assert got["auc"] == pytest.approx(ref["auc"], abs=1e-12)


def photos_per_identity(g: torch.Generator, n_ids: int, most: int, d: int):
    """Labels with 0..most photos per identity (shuffled) and small-integer embeddings that are
    a per-identity centre plus noise: exact float32 dot products, many ties."""
    labels = torch.repeat_interleave(
        torch.arange(n_ids), torch.randint(0, most + 1, (n_ids,), generator=g)
    )
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    centre = torch.randint(-2, 3, (n_ids, d), generator=g)
    emb = centre[labels] + torch.randint(-1, 2, (labels.numel(), d), generator=g)
    return emb.float(), labels


@given(
    st.integers(0, 2**31 - 1),
    st.integers(2, 12),
    st.integers(1, 4),
    st.integers(1, 5),
    st.integers(1, 40),
)
def test_labelled_chunked_equals_dense_brute_force(seed, n_ids, most, d, block):
    g = torch.Generator().manual_seed(seed)
    a, id_labels = photos_per_identity(g, n_ids, most, d)
    b, spot_labels = photos_per_identity(g, n_ids, most, d)
    pairs = [(i, j) for i in range(len(a)) for j in range(len(b))]
    genuine = [bool(id_labels[i] == spot_labels[j]) for i, j in pairs]
    if not any(genuine) or all(genuine):
        with pytest.raises(ValueError, match="need ≥ 1 of each"):
            ivs_verification(a, b, FARS, id_labels=id_labels, spot_labels=spot_labels)
        return
    got = ivs_verification(
        a, b, FARS, id_labels=id_labels, spot_labels=spot_labels, block=block, normalize=False
    )
    assert_matches(got, dense_oracle([float(a[i] @ b[j]) for i, j in pairs], genuine))


@given(st.integers(0, 2**31 - 1), st.integers(2, 10), st.integers(1, 4), st.integers(1, 40))
def test_symmetric_counts_each_unordered_pair_once(seed, n_ids, most, block):
    # all_pairs protocol: one sample set, pairs i < j only — no self-pairs, no mirrored copies
    g = torch.Generator().manual_seed(seed)
    x, labels = photos_per_identity(g, n_ids, most, 3)
    pairs = [(i, j) for i in range(len(x)) for j in range(i + 1, len(x))]
    genuine = [bool(labels[i] == labels[j]) for i, j in pairs]
    if not any(genuine) or all(genuine):
        with pytest.raises(ValueError, match="need ≥ 1 of each"):
            ivs_verification(x, x, FARS, id_labels=labels, spot_labels=labels, symmetric=True)
        return
    got = ivs_verification(
        x,
        x,
        FARS,
        id_labels=labels,
        spot_labels=labels,
        symmetric=True,
        block=block,
        normalize=False,
    )
    assert_matches(got, dense_oracle([float(x[i] @ x[j]) for i, j in pairs], genuine))


def test_labels_arange_equal_unlabelled():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    ids = torch.arange(200)
    assert ivs_verification(a, a + b, FARS, block=33) == ivs_verification(
        a, a + b, FARS, id_labels=ids, spot_labels=ids.clone(), block=33
    )


def test_symmetric_identical_photos_separate_perfectly():
    # self-pairs would be genuine score 1 anyway; here each identity's photos are identical, so
    # only a rule that never pairs across identities as genuine gives TAR 1 and EER 0
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(50).repeat_interleave(3)
    x = torch.randn(50, 16, generator=g)[labels]
    out = ivs_verification(x, x, [1e-3], id_labels=labels, spot_labels=labels, symmetric=True)
    assert out["tar@1e-3"] == 1.0 and out["eer"] == 0.0 and out["auc"] == 1.0


def test_cosine_scores_match_dense():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    b = a + b
    got = ivs_verification(a, b, [1e-1, 1e-2], block=37)
    s = (F.normalize(a.double(), dim=1) @ F.normalize(b.double(), dim=1).T).reshape(-1)
    y = torch.eye(300, dtype=torch.bool).reshape(-1)
    assert got["tar@1e-2"] == pytest.approx(tar_at_far(s, y, 1e-2), abs=2 / 300)
    assert got["auc"] == pytest.approx(auc(s, y), abs=1e-6)
    assert got["eer"] == pytest.approx(eer(s, y), abs=1e-4)


def test_random_embeddings_give_tar_close_to_far():
    g = torch.Generator().manual_seed(1)
    n = 1000
    a, b = torch.randn(n, 32, generator=g), torch.randn(n, 32, generator=g)
    out = ivs_verification(a, b, [0.5, 0.1, 0.01])
    for far in (0.5, 0.1, 0.01):
        sigma = math.sqrt(far * (1 - far) / n)  # binomial sampling error of n genuine pairs
        assert abs(out[far_key(far)] - far) < 5 * sigma
    assert abs(out["auc"] - 0.5) < 5 * math.sqrt(1 / (12 * n))
    assert abs(out["eer"] - 0.5) < 0.05


def test_identical_embeddings_give_tar_one():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(500, 32, generator=g)
    out = ivs_verification(a, a.clone(), [1e-1, 1e-3, 1e-5])
    assert out["tar@1e-1"] == out["tar@1e-3"] == out["tar@1e-5"] == 1.0
    assert out["eer"] == 0.0 and out["auc"] == 1.0
    assert out["collapsed"] is False  # identical sides, but 500 different directions


def test_undefined_far_is_nan():
    a = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    assert math.isnan(ivs_verification(a, a, [1e-3])["tar@1e-3"])  # 90 impostors < 1000


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (torch.zeros(4, 3), torch.zeros(5, 3), "same shape"),
        (torch.zeros(1, 3), torch.zeros(1, 3), "at least 2"),
        (torch.full((3, 2), math.nan), torch.ones(3, 2), "NaN"),
    ],
)
def test_ivs_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        ivs_verification(a, b, [0.1], normalize=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"id_labels": torch.arange(4)}, "both id_labels and spot_labels"),
        ({"id_labels": torch.arange(3), "spot_labels": torch.arange(5)}, r"id_labels .*\(4,\)"),
        ({"id_labels": torch.zeros(4), "spot_labels": torch.arange(5)}, "integer"),
        ({"symmetric": True}, "symmetric=True needs id_labels"),
        (
            {"id_labels": torch.arange(4), "spot_labels": torch.arange(5), "symmetric": True},
            "equal id_labels",
        ),
    ],
)
def test_ivs_bad_labels(kwargs, match):
    a, b = torch.ones(4, 3), torch.ones(5 if "spot_labels" in kwargs else 4, 3)
    with pytest.raises(ValueError, match=match):
        ivs_verification(a, b, [0.1], **kwargs)


# --- acceptance: default difficulty leaves room between chance and 1 ---------------------------


def batch_hard_triplet(
    emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2
) -> torch.Tensor:
    """Plain in-batch batch-hard cosine triplet: mean_a [max_n s(a,n) − min_p s(a,p) + m]_+."""
    f = F.normalize(emb, dim=1)
    s = f @ f.T
    same = labels[:, None] == labels[None, :]
    self_pair = torch.eye(len(labels), dtype=torch.bool)
    hardest_pos = s.masked_fill(~same | self_pair, 2.0).min(dim=1).values
    hardest_neg = s.masked_fill(same, -2.0).max(dim=1).values
    return F.relu(hardest_neg - hardest_pos + margin).mean()


def train_mlp_triplet(
    cfg: dict, seed: int, steps: int = 300, batch: int = 128, lr: float = 0.1
) -> dict[str, float]:
    """Train an MLP (embedding 64) with batch-hard triplet on synthetic IvS; evaluate on the
    held-out pairs. The model's initial weights come from torch's global RNG seeded with `seed`
    (a training run, not a hypothesis test)."""
    torch.manual_seed(seed)
    data = build_data(cfg, seed)
    model = build_model("mlp", data.input_shape, 64)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sampler = PairBatchSampler(data.train.labels, batch, torch.Generator().manual_seed(seed))
    batches = iter(())
    for _ in range(steps):
        idx = next(batches, None)
        if idx is None:
            batches = iter(sampler)
            idx = next(batches)
        loss = batch_hard_triplet(model(data.train.x[idx]), data.train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return ivs_verification(model(data.test_id_x), model(data.test_spot_x), [1e-2, 1e-3])


def test_default_difficulty_leaves_room_for_mining():
    # one thread: the ops are tiny, and on a loaded 2-core machine intra-op threads only contend
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = train_mlp_triplet({"kind": "synthetic_ivs"}, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert 0.2 < out["tar@1e-3"] < 0.8
