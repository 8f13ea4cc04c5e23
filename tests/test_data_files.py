"""image_folder and features kinds, and the P×K sampler."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from harness.data import IvSData, PairBatchSampler, Split, build_data
from harness.ivs_eval import ivs_verification
from harness.metrics import far_key


def write_tree(root, n_ids=6, per_id=3):
    """n_ids identity dirs of small PNGs whose colour encodes (identity, image), plus a
    one-image identity and a corrupt file."""
    for i in range(n_ids):
        d = root / f"person{i:02d}"
        d.mkdir()
        for j in range(per_id):
            name = "id.png" if j == per_id - 1 else f"spot{j}.png"
            Image.new("RGB", (20, 24), (10 * i, 40 * j, 7)).save(d / name)
    (root / "zz_lonely").mkdir()
    Image.new("RGB", (20, 24), (1, 2, 3)).save(root / "zz_lonely" / "only.png")
    (root / "person00" / "broken.jpg").write_bytes(b"not an image")


def decoded_train(d: IvSData) -> torch.Tensor:
    """Every training sample, decoded in this process (streaming kinds hold no tensors)."""
    return d.probe_x(len(d.train))


def decoded_test(d: IvSData) -> tuple[torch.Tensor, torch.Tensor]:
    """The two test sides, decoded (embedding = identity)."""
    return d.test_embeddings(lambda x: x, block=3)


def test_image_folder_reads_splits_and_counts(tmp_path):
    write_tree(tmp_path)
    cfg = {"kind": "image_folder", "path": str(tmp_path), "image_size": 8, "test_fraction": 0.34}
    # "error": the bad file fails the trial when it is met (here: it is person00's first file,
    # so its ID photo, decoded by the probe or the test side)
    d = build_data(cfg, 0)
    assert d.train.x is None and d.test_id_x is None
    with pytest.raises(ValueError, match=r"unreadable image .*broken\.jpg"):
        decoded_train(d)
        decoded_test(d)
    d = build_data({**cfg, "on_bad_image": "skip"}, 0)
    assert d.quality == {"bad_images": 1, "single_image_identities": 1, "no_id_photo_identities": 0}
    assert d.input_shape == (3, 8, 8) and d.num_classes == 4
    test_id_x, test_spot_x = decoded_test(d)
    assert test_id_x.shape == test_spot_x.shape == (2, 3, 8, 8)
    x = decoded_train(d)
    assert x.shape[0] == len(d.train) == 12 and x.min() >= -1 and x.max() <= 1
    # pixel value −1 + 2·(10·i)/255 identifies the person: test people are not in train
    person = lambda x: torch.round((x[:, 0, 0, 0] + 1) / 2 * 255 / 10).long()  # noqa: E731
    assert not set(person(test_id_x).tolist()) & set(person(x).tolist())
    assert torch.equal(
        person(x), torch.tensor(sorted(set(person(x).tolist()))).repeat_interleave(3)
    )
    # pairing "first": the first file by name (id.png < spot*.png) is the ID photo
    green = lambda x: torch.round((x[:, 1, 0, 0] + 1) / 2 * 255).long()  # noqa: E731
    assert (green(test_id_x) == 80).all() and (green(test_spot_x) == 0).all()
    assert (green(x[d.train.domain == 0]) == 80).all()
    # deterministic for a seed; another seed can pick other test identities
    again = build_data({**cfg, "on_bad_image": "skip"}, 0)
    assert torch.equal(decoded_test(again)[0], test_id_x)


def test_image_folder_pattern_pairing(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "person00" / "broken.jpg").unlink()
    cfg = {"kind": "image_folder", "path": str(tmp_path), "image_size": 8}
    d = build_data({**cfg, "pairing": "pattern", "id_pattern": "^spot1"}, 0)
    assert d.quality["single_image_identities"] == 1
    green = lambda x: torch.round((x[:, 1, 0, 0] + 1) / 2 * 255).long()  # noqa: E731
    assert (green(decoded_train(d)[d.train.domain == 0]) == 40).all()  # spot1.png has green 40·1
    test_id_x, test_spot_x = decoded_test(d)
    assert (green(test_id_x) == 40).all() and (green(test_spot_x) != 40).all()
    assert (d.train.domain == 0).sum() == d.num_classes
    grey = build_data({**cfg, "channels": 1, "on_bad_image": "skip"}, 0)
    assert grey.input_shape == (1, 8, 8)


def test_image_folder_all_pairs(tmp_path):
    # identities with 2..5 images; red encodes the identity, green the image index
    per_id = [2, 3, 4, 2, 3, 5, 4]
    for i, k in enumerate(per_id):
        (tmp_path / f"p{i}").mkdir()
        for j in range(k):
            Image.new("RGB", (9, 9), (30 * i, 40 * j, 0)).save(tmp_path / f"p{i}" / f"{j}.png")
    cfg = {"kind": "image_folder", "path": str(tmp_path), "image_size": 8, "test_fraction": 0.45}
    d = build_data({**cfg, "pairing": "all_pairs"}, 3)
    test_id_x, test_spot_x = decoded_test(d)
    red = lambda x: torch.round((x[:, 0, 0, 0] + 1) / 2 * 255 / 30).long()  # noqa: E731
    green = lambda x: torch.round((x[:, 1, 0, 0] + 1) / 2 * 255 / 40).long()  # noqa: E731
    test_people = sorted(set(red(test_id_x).tolist()))
    assert len(test_people) == 3 and not set(test_people) & set(red(decoded_train(d)).tolist())
    # every image of a test identity is on the test side, once, labelled by its identity
    assert d.test_symmetric and test_spot_x is test_id_x
    assert torch.equal(d.test_id_labels, d.test_spot_labels)
    assert test_id_x.shape[0] == sum(per_id[p] for p in test_people)
    n = test_id_x.shape[0]
    same_person = red(test_id_x)[:, None] == red(test_id_x)[None, :]
    same_label = d.test_id_labels[:, None] == d.test_id_labels[None, :]
    assert torch.equal(same_person, same_label)
    # training: all images of training identities, the first by file name is the ID photo
    assert len(d.train) == sum(per_id) - n and d.num_classes == 4
    assert torch.equal(d.train.domain == 0, green(decoded_train(d)) == 0)
    # evaluation counts: genuine = Σ k(k−1)/2 over test identities, impostor = the rest of the
    # n(n−1)/2 unordered pairs; an embedding that is the identity one-hot separates them exactly
    n_gen = sum(per_id[p] * (per_id[p] - 1) // 2 for p in test_people)
    n_imp = n * (n - 1) // 2 - n_gen
    emb = torch.nn.functional.one_hot(red(test_id_x)).float()

    def evaluate(e: torch.Tensor, fars: list[float]) -> dict[str, float]:
        return ivs_verification(
            e, e, fars, id_labels=d.test_id_labels, spot_labels=d.test_spot_labels, symmetric=True
        )

    out = evaluate(emb, [1 / n_imp, 1 / (n_imp + 1)])
    assert out[far_key(1 / n_imp)] == 1.0 and out["eer"] == 0.0  # defined: n_imp impostors
    assert math.isnan(out[far_key(1 / (n_imp + 1))])  # needs n_imp + 1 impostors
    # negate one image: its k−1 genuine pairs score −1 < every impostor (0), so exactly
    # (k−1) of the n_gen genuine pairs are lost
    emb[0] = -emb[0]
    k = int((d.test_id_labels == d.test_id_labels[0]).sum())
    assert evaluate(emb, [0.5])["tar@5e-1"] == pytest.approx(1 - (k - 1) / n_gen, abs=1e-12)


def test_trial_evaluates_all_pairs_with_labels(tmp_path):
    # the trial must pass labels and the symmetric rule through: the unlabelled rule would pair
    # each test image with itself (cosine 1 > every impostor: EER 0, TAR a multiple of 1/n)
    from harness.suite import parse_suite
    from harness.trial import run_trial

    for i in range(10):
        (tmp_path / f"p{i}").mkdir()
        for j in range(2 + i % 3):
            Image.new("RGB", (9, 9), (20 * i, 50 * j, 3)).save(tmp_path / f"p{i}" / f"{j}.png")
    data = {
        "kind": "image_folder",
        "path": str(tmp_path),
        "pairing": "all_pairs",
        "image_size": 8,
        "test_fraction": 0.4,
    }
    suite = parse_suite(
        f"""
[suite]
name = "all_pairs"
seeds = [0]
[data]
{chr(10).join(f"{k} = {v!r}" for k, v in data.items())}
[model]
kind = "cnn_small"
embedding = 8
width = 4
[train]
steps = 2
batch = 8
device = "cpu"
[eval]
far = [1e-1]
"""
    )
    row, _ = run_trial(suite.trials[0])
    labels = build_data(data, 0).test_id_labels
    n_gen = int(((labels[:, None] == labels[None, :]).sum() - labels.numel()) // 2)
    assert row["eer"] > 0
    assert row["tar@1e-1"] * n_gen == pytest.approx(round(row["tar@1e-1"] * n_gen), abs=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_id_labels": torch.arange(3)}, "both test_id_labels"),
        ({"test_symmetric": True}, "test_symmetric needs"),
        ({"test_id_labels": torch.arange(2), "test_spot_labels": torch.arange(3)}, r"\(3,\)"),
    ],
)
def test_ivs_data_rejects_inconsistent_test_labels(kwargs, match):
    split = Split(torch.zeros(2, 1), torch.arange(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=match):
        IvSData(split, torch.zeros(3, 1), torch.zeros(3, 1), (1,), 2, **kwargs)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"path": "/nonexistent"}, "data.path"),
        ({"pairing": "random"}, "data.pairing"),
        ({"channels": 2}, "data.channels"),
        ({"on_bad_image": "ignore"}, "data.on_bad_image"),
    ],
)
def test_image_folder_bad_config(tmp_path, cfg, match):
    write_tree(tmp_path)
    with pytest.raises(ValueError, match=match):
        build_data({"kind": "image_folder", "path": str(tmp_path), **cfg}, 0)


def test_image_folder_empty(tmp_path):
    with pytest.raises(ValueError, match="no identity directories"):
        build_data({"kind": "image_folder", "path": str(tmp_path)}, 0)


def feature_table(n_ids=20, per_id=3, dim=5):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(100, 100 + n_ids), per_id)
    x = rng.normal(size=(labels.size, dim)).astype(np.float32)
    x[:, 0] = labels  # column 0 carries the identity, to check the split
    domain = np.tile(np.r_[1, 0, np.ones(per_id - 2, int)], n_ids)
    return x, labels, domain


def check_features(d, n_ids=20):
    test_id_x, test_spot_x = decoded_test(d)
    assert d.num_classes + test_id_x.shape[0] == n_ids
    assert torch.equal(test_id_x[:, 0], test_spot_x[:, 0])  # rows aligned by identity
    assert not set(test_id_x[:, 0].tolist()) & set(decoded_train(d)[:, 0].tolist())
    assert d.train.labels.max() == d.num_classes - 1


def test_features_npz_npy_parquet_agree(tmp_path):
    x, labels, domain = feature_table()
    np.savez(tmp_path / "f.npz", x=x, label=labels, domain=domain)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", labels)
    np.save(tmp_path / "d.npy", domain)
    pl.DataFrame({"x": x.tolist(), "label": labels, "domain": domain}).write_parquet(
        tmp_path / "f.parquet"
    )
    builds = [
        build_data({"kind": "features", "path": str(tmp_path / "f.npz")}, 1),
        build_data(
            {
                "kind": "features",
                "path": str(tmp_path / "x.npy"),
                "labels_path": str(tmp_path / "y.npy"),
                "domain_path": str(tmp_path / "d.npy"),
            },
            1,
        ),
        build_data({"kind": "features", "path": str(tmp_path / "f.parquet")}, 1),
    ]
    assert builds[1].train.x is None  # .npy: a memory map, read batch by batch
    assert isinstance(builds[1].source.store.array, np.memmap)
    for d in builds:
        check_features(d)
        assert torch.equal(decoded_train(d), decoded_train(builds[0]))
        assert torch.equal(decoded_test(d)[1], decoded_test(builds[0])[1])
        a, b = next(d.train_batches(8, 2, 5)), next(builds[0].train_batches(8, 2, 5))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the ID photo of a test identity is its domain-0 sample (the second row of each identity)
    id_row = {int(labels[i]): x[i] for i in range(len(labels)) if domain[i] == 0}
    for row in decoded_test(builds[0])[0]:
        assert np.array_equal(row.numpy(), id_row[int(row[0])])


def test_features_parquet_columns_without_domain(tmp_path):
    x, labels, _ = feature_table()
    df = pl.DataFrame({f"f{i}": x[:, i] for i in range(x.shape[1])}).with_columns(
        pl.Series("label", labels)
    )
    df.write_parquet(tmp_path / "f.parquet")
    d = build_data({"kind": "features", "path": str(tmp_path / "f.parquet")}, 0)
    check_features(d)
    # without a domain column, the first sample of an identity is its ID photo
    first = {int(lab): x[i] for i, lab in reversed(list(enumerate(labels)))}
    for row in decoded_test(d)[0]:
        assert np.allclose(row.numpy(), first[int(row[0])])


def test_features_bad_config(tmp_path):
    with pytest.raises(ValueError, match=r"data\.path"):
        build_data({"kind": "features", "path": str(tmp_path / "x.csv")}, 0)
    with pytest.raises(ValueError, match=r"data\.path is required"):
        build_data({"kind": "features"}, 0)
    np.save(tmp_path / "x.npy", np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"data\.labels_path"):
        build_data({"kind": "features", "path": str(tmp_path / "x.npy")}, 0)


@given(st.integers(0, 2**31 - 1), st.integers(1, 8), st.integers(2, 3))
def test_pair_sampler_p_by_k(seed, p, k):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 6, (40,), generator=g)
    labels = torch.repeat_interleave(torch.arange(40), counts)[
        torch.randperm(int(counts.sum()), generator=g)
    ]
    eligible = int((counts >= k).sum())
    if eligible < p:
        with pytest.raises(ValueError, match="batch_size"):
            PairBatchSampler(labels, p * k, g, k=k)
        return
    sampler = PairBatchSampler(labels, p * k, torch.Generator().manual_seed(seed), k=k)
    seen = []
    batches = list(sampler)
    assert len(batches) == len(sampler) == eligible // p
    for idx in batches:
        groups = labels[idx].view(p, k)
        assert (groups == groups[:, :1]).all()  # K samples of one identity per group
        assert idx.unique().numel() == p * k  # distinct samples
        seen += groups[:, 0].tolist()
    assert len(set(seen)) == len(seen)  # an identity appears at most once per epoch
    again = list(PairBatchSampler(labels, p * k, torch.Generator().manual_seed(seed), k=k))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_pair_sampler_rejects_bad_batch():
    with pytest.raises(ValueError, match="multiple of k=2"):
        PairBatchSampler(torch.arange(10) // 2, 7, torch.Generator())
