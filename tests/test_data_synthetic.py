"""synthetic_ivs: determinism, streaming, disjoint splits, group structure, difficulty knob,
class imbalance, images, config errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.data import DATA_KINDS, build_data
from harness.data.synthetic import CHUNK, SyntheticIvS
from harness.ivs_eval import ivs_verification

SMALL = {"identities": 300, "test_identities": 200, "dim": 16, "lookalike_groups": 20}


@settings(max_examples=5)  # each example generates whole chunks; a few seeds suffice
@given(st.integers(0, 2**31 - 1))
def test_deterministic_per_seed(seed):
    a, b = build_data(SMALL, seed), build_data(SMALL, seed)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test_spot_x, b.test_spot_x)
    c = build_data(SMALL, seed + 1)
    assert not torch.equal(a.train.x, c.train.x)


def test_layout_and_labels():
    d = build_data(SMALL, 0)
    assert d.train.x.shape == (600, 16) and d.input_shape == (16,) and d.num_classes == 300
    assert d.test_id_x.shape == d.test_spot_x.shape == (200, 16)
    assert torch.equal(torch.bincount(d.train.labels), torch.full((300,), 2))
    # one ID and one spot photo per identity
    for dom in (0, 1):
        assert torch.equal(
            torch.bincount(d.train.labels[d.train.domain == dom]), torch.ones(300).long()
        )


def test_streaming_any_range_equals_whole():
    world = SyntheticIvS.from_config({"dim": 8}, seed=3)
    n = 2 * CHUNK + 100

    def gather(ranges):
        parts = [c for lo, hi in ranges for c in world.chunks(lo, hi)]
        x, ident, dom = (torch.cat(t) for t in zip(*parts, strict=True))
        order = torch.argsort(ident * 2 + dom)
        return x[order], ident[order]

    whole_x, whole_id = gather([(0, n)])
    pieces_x, pieces_id = gather([(0, 5), (5, CHUNK + 7), (CHUNK + 7, n)])
    assert torch.equal(whole_id, pieces_id) and torch.equal(whole_x, pieces_x)


def test_train_and_test_identities_are_disjoint():
    # test identities are new people: no test latent equals a train latent, and the test photos
    # are exactly those of identities [identities, identities + test_identities)
    world = SyntheticIvS.from_config(SMALL, seed=0)
    z, _, _, _ = world.latents(0)
    train_z, test_z = z[:300], z[300:500]
    assert (train_z[:, None, :] == test_z[None, :, :]).all(-1).sum() == 0
    d = build_data(SMALL, 0)
    x, ident, dom = next(world.chunks(300, 500))
    assert torch.equal(d.test_id_x, x[dom == 0]) and torch.equal(d.test_spot_x, x[dom == 1])
    assert ident.min() == 300 and ident.max() == 499


def test_lookalike_groups_are_closer_than_strangers():
    world = SyntheticIvS.from_config({"dim": 32, "lookalike_groups": 10}, seed=1)
    z, group, _, _ = world.latents(0)
    sim = z @ z.T
    same = group[:, None] == group[None, :]
    off_diag = ~torch.eye(len(group), dtype=torch.bool)
    within = sim[same & off_diag].mean()
    between = sim[~same].mean()
    expected = 1 / (1 + world.params["group_spread"] ** 2)
    assert within > between + 0.5
    assert within == pytest.approx(expected, abs=0.1)


def test_more_domain_gap_lowers_tar_of_a_fixed_probe():
    # the probe: raw cosine of the photos restricted to nothing learned (identity map)
    tars = []
    for gap in (0.0, 0.3, 0.6, 1.0):
        cfg = {**SMALL, "test_identities": 1000, "domain_gap": gap, "nuisance": 0.0}
        d = build_data(cfg, 0)
        tars.append(ivs_verification(d.test_id_x, d.test_spot_x, [1e-2])["tar@1e-2"])
    assert all(a > b for a, b in itertools.pairwise(tars)), tars


def test_imbalance_gives_a_heavy_head_and_a_tail_of_two():
    d = build_data({**SMALL, "identities": 3000, "imbalance": 1.0, "imbalance_max": 50}, 0)
    counts = torch.bincount(d.train.labels)
    assert counts.min() == 2 and counts.max() == 52
    # discrete Pareto law with α = 1: P(extra ≥ k) = 1/(k+1)
    for k in (1, 3, 9):
        assert (counts - 2 >= k).double().mean() == pytest.approx(1 / (k + 1), abs=0.03)
    # extras are spot photos; the ID photo stays unique
    assert torch.equal(torch.bincount(d.train.labels[d.train.domain == 0]), torch.ones(3000).long())
    # the test pairs are unaffected by the imbalance option
    base = build_data({**SMALL, "identities": 3000}, 0)
    assert torch.equal(base.test_spot_x, d.test_spot_x)


def test_images_modality():
    cfg = {**SMALL, "modality": "images", "image_size": 16, "identities": 10, "nuisance": 0.0}
    d = build_data(cfg, 0)
    assert d.input_shape == (3, 16, 16) and d.train.x.shape == (20, 3, 16, 16)
    # the image encodes the identity: genuine pairs are closer than impostors
    a, b = F.normalize(d.test_id_x.flatten(1), dim=1), F.normalize(d.test_spot_x.flatten(1), dim=1)
    s = a @ b.T
    assert s.diagonal().mean() > s.mean() + 0.1


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"identitys": 10}, "data.identitys"),
        ({"modality": "video"}, "data.modality"),
        ({"domain_gap": 1.5}, "data.domain_gap"),
        ({"dim": 1}, "data.dim"),
        ({"noise": "high"}, "data.noise"),
        ({"kind": "nope"}, "data.kind"),
    ],
)
def test_bad_config_names_the_key(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_data(cfg, 0)


def test_registry():
    assert set(DATA_KINDS) == {"synthetic_ivs", "image_folder", "features", "recordio"}


def test_validation_is_arithmetic_and_cheap():
    """A huge generator is refused from its numbers, before anything is allocated."""
    import time

    from harness.data import validate_data

    t0 = time.perf_counter()
    for cfg, match in [
        ({"dim": 10**9}, "data.dim"),
        ({"identities": 10**9, "dim": 1024}, "GiB"),
        ({"modality": "images", "image_size": 4096, "identities": 10**5}, "GiB"),
    ]:
        with pytest.raises(ValueError, match=match):
            validate_data(cfg)
    validate_data({"dim": 8192, "identities": 1000})  # at the limit: accepted, not built
    assert time.perf_counter() - t0 < 1.0


def test_train_batches_are_the_sampler_batches():
    """In-memory kinds: batch i = the i-th index batch of PairBatchSampler seeded by `seed`
    (epoch after epoch), x and y indexed from the training tensors."""
    from harness.data import PairBatchSampler

    d = build_data({"identities": 40, "test_identities": 5, "dim": 6}, 0)
    sampler = PairBatchSampler(
        d.train.labels, 16, torch.Generator().manual_seed(7), k=2, domain=d.train.domain
    )
    expected = [idx for _ in range(3) for idx in sampler]  # 3 epochs of 2 batches
    got = d.train_batches(16, 2, 7)
    for idx in expected:
        x, y = next(got)
        assert torch.equal(x, d.train.x[idx]) and torch.equal(y, d.train.labels[idx])
    with pytest.raises(ValueError, match="multiple of the samples per identity k=3"):
        d.train_batches(16, 3, 0)
    with pytest.raises(ValueError, match="needs 41 training identities with ≥ 2"):
        d.train_batches(82, 2, 0)
    assert torch.equal(d.probe_x(5), d.train.x[:5])
    calls = []

    def embed(x):
        calls.append(len(x))
        return x[:, :2] * 2

    ids, spots = d.test_embeddings(embed, block=2)
    assert calls == [2, 2, 1, 2, 2, 1]
    assert torch.equal(ids, d.test_id_x[:, :2] * 2) and torch.equal(spots, d.test_spot_x[:, :2] * 2)
    assert d.quality == {"bad_images": 0, "single_image_identities": 0, "no_id_photo_identities": 0}


def test_sampler_puts_the_id_photo_first_whatever_the_storage_order():
    """The bidirectional miner and MPS read ID/spot from the row order inside a pair."""
    from harness.data import PairBatchSampler

    gen = torch.Generator().manual_seed(0)
    n_id = 50
    labels = torch.arange(n_id).repeat(2)
    domain = torch.cat([torch.ones(n_id), torch.zeros(n_id)]).long()  # spot rows stored first
    perm = torch.randperm(2 * n_id, generator=gen)
    labels, domain = labels[perm], domain[perm]
    for batch in PairBatchSampler(labels, 20, gen, k=2, domain=domain):
        pairs = domain[batch].view(-1, 2)
        assert (pairs[:, 0] == 0).all() and (pairs[:, 1] == 1).all()
        assert (labels[batch].view(-1, 2)[:, 0] == labels[batch].view(-1, 2)[:, 1]).all()
