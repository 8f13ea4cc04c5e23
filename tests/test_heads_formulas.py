"""Head logits vs the scalar float64 references of tests/test_heads_reference.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from mining.heads import HEADS
from mining.heads.unpg import negative_pair_cosines, tukey_kept
from tests.test_heads_reference import (
    adaface_stats,
    assert_logits_match,
    magface_regularizer,
    make_batch,
    negative_pairs_reference,
    norms_of,
    npcface_row,
    ref_cosines,
    ref_logits,
    tukey_reference,
)

seeds = st.integers(0, 2**31 - 1)
NEW = ["curricularface", "adaface", "magface"]  # the heads added by the formula-first redesign
sizes = st.tuples(st.integers(1, 6), st.integers(2, 7), st.integers(2, 5))  # B, C, d


def build(name, weight, fused=True, **params):
    """A float64 head on ``weight``; ``fused=False`` selects the plain path of a fused head."""
    head = HEADS[name](weight.shape[1], weight.shape[0], **params).double()
    head.fused = head.fused and fused
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


#: every cosine head but HSM (which needs class counts), with the defaults of the reference
SIMPLE = ["cosine", "cosface", "arcface", "arcface_nograd", "npcface", *NEW]


@pytest.mark.parametrize("fused", [True, False], ids=["default", "plain"])
@pytest.mark.parametrize("name", SIMPLE)
@given(seed=seeds, size=sizes, s=st.sampled_from([1.0, 30.0, 64.0]))
def test_margin_head_matches_reference(name, fused, seed, size, s):
    emb, weight, labels = make_batch(seed, *size)
    head = build(name, weight, fused, s=s)
    assert_logits_match(head(emb, labels), ref_logits(name, emb, weight, labels, s=s))


@given(seed=seeds, size=sizes, t=st.sampled_from([0.0, 0.3, 0.8]), m=st.sampled_from([0.2, 0.5]))
def test_curricularface_matches_reference_and_updates_t(seed, size, t, m):
    emb, weight, labels = make_batch(seed, *size)
    head = build("curricularface", weight, m=m)
    head.t.fill_(t)
    expected = ref_logits("curricularface", emb, weight, labels, m=m, t=t)
    assert_logits_match(head(emb, labels), expected)
    cos = torch.tensor(ref_cosines(emb, weight), dtype=torch.float64)
    mean_target = cos[torch.arange(len(labels)), labels].mean()
    torch.testing.assert_close(head.t, 0.01 * mean_target + 0.99 * t, rtol=1e-12, atol=1e-15)
    head.eval()  # evaluation mode: t is used, not updated
    t_now = head.t.clone()
    expected = ref_logits("curricularface", emb, weight, labels, m=m, t=float(t_now), momentum=0.0)
    assert_logits_match(head(emb, labels), expected)
    assert torch.equal(head.t, t_now)


@given(
    seed=seeds,
    size=st.tuples(st.integers(2, 6), st.integers(2, 7), st.integers(2, 5)),
    stats=st.sampled_from([(20.0, 100.0), (1.5, 0.5), (1.0, 0.1)]),
    h=st.sampled_from([0.333, 1.0, 3.0]),
)
def test_adaface_matches_reference_and_updates_norm_statistics(seed, size, stats, h):
    # statistics near the batch's norms (0.5 to 2.5) and a large h: ẑ covers (−1, 1) and both clips
    emb, weight, labels = make_batch(seed, *size)
    head = build("adaface", weight, h=h)
    head.batch_mean.fill_(stats[0])
    head.batch_std.fill_(stats[1])
    params = {"h": h, "batch_mean": stats[0], "batch_std": stats[1]}
    assert_logits_match(head(emb, labels), ref_logits("adaface", emb, weight, labels, **params))
    mean, std = adaface_stats(norms_of(emb), *stats, 0.01)
    np.testing.assert_allclose(
        [float(head.batch_mean), float(head.batch_std)], [mean, std], rtol=1e-12
    )


def test_adaface_one_sample_batch_keeps_its_statistics():
    emb, weight, labels = make_batch(0, 1, 3, 4)
    head = build("adaface", weight)
    assert torch.isfinite(head(emb, labels)).all()
    assert (float(head.batch_mean), float(head.batch_std)) == (20.0, 100.0)


@given(seed=seeds, size=sizes, scale=st.sampled_from([1.0, 30.0, 60.0, 200.0]))
def test_magface_matches_reference(seed, size, scale):
    # norms 0.5–2.5 times scale: below l_a, inside [l_a, u_a] and above u_a
    emb, weight, labels = make_batch(seed, *size)
    emb = emb * scale
    head = build("magface", weight)
    assert_logits_match(head(emb, labels), ref_logits("magface", emb, weight, labels))
    expected = magface_regularizer(norms_of(emb), 10.0, 110.0, 35.0)
    np.testing.assert_allclose(float(head.regularizer(emb)), expected, rtol=1e-12)
    ce = torch.nn.functional.cross_entropy(head(emb, labels), labels)
    np.testing.assert_allclose(head.loss(emb, labels).item(), ce.item() + expected, rtol=1e-12)


@given(seed=seeds, size=sizes, m=st.sampled_from([0.1, 0.5, 1.2]))
def test_arcface_fallback_region(seed, size, m):
    # row 0 lies beyond π − m (fallback), row 1 well inside: both branches in every example
    emb, weight, labels = make_batch(seed, max(size[0], 2), *size[1:], target_cos=[-0.999, 0.4])
    assert ref_cosines(emb[:1], weight[labels[:1]])[0][0] <= math.cos(math.pi - m)
    for name in ("arcface", "arcface_nograd"):
        head = build(name, weight, m=m)
        assert_logits_match(head(emb, labels), ref_logits(name, emb, weight, labels, m=m))


def npcface_sample_margins(head, emb, weight, labels):
    """m'_i read back from the target logits s·cos(θ_y + m'_i) (rows with cos θ_y > 0)."""
    cos = torch.tensor(ref_cosines(emb, weight), dtype=torch.float64)
    rows = torch.arange(len(labels))
    with torch.no_grad():
        target = head(emb, labels)[rows, labels] / head.s
    c = cos[rows, labels]
    return torch.acos(target) - torch.acos(c), c > 0


@given(seed=seeds, size=sizes)
def test_npcface_rows_with_and_without_hard_negatives(seed, size):
    # row 0: target nearly aligned (hard negatives unlikely); row 1: target far (hard likely)
    emb, weight, labels = make_batch(seed, max(size[0], 2), *size[1:], target_cos=[0.999, 0.5])
    cos = ref_cosines(emb, weight)
    rows = [npcface_row(cos[i], int(labels[i]), 0.5, 0.4, 0.2, 1.1, 0.2) for i in range(2)]
    assume(rows[0][2] == 0 and rows[1][2] > 0)
    head = build("npcface", weight)
    m_prime, _ = npcface_sample_margins(head, emb, weight, labels)
    # m' = m0 when there is no hard negative
    np.testing.assert_allclose(m_prime[:2].numpy(), [0.4, rows[1][1]], rtol=1e-9)
    assert_logits_match(head(emb, labels), ref_logits("npcface", emb, weight, labels))


@given(seed=seeds, size=sizes)
def test_npcface_sample_margin_range(seed, size):
    emb, weight, labels = make_batch(seed, *size)
    head = build("npcface", weight, m0=0.3, m1=0.25)
    m_prime, positive = npcface_sample_margins(head, emb, weight, labels)
    m_prime = m_prime[positive]
    assert ((m_prime >= 0.3 - 0.25 - 1e-6) & (m_prime <= 0.3 + 0.25 + 1e-6)).all()


@pytest.mark.parametrize("fused", [True, False], ids=["default", "plain"])
@pytest.mark.parametrize("name", ["cosface", "arcface", "arcface_nograd", "npcface", "hsm", *NEW])
@given(seed=seeds, size=sizes, threshold=st.sampled_from([-0.2, 0.2, 0.4]))
def test_interclass_filter_matches_reference(name, fused, seed, size, threshold):
    emb, weight, labels = make_batch(seed, *size)
    extra = {"class_counts": list(range(1, size[1] + 1))} if name == "hsm" else {}
    head = build(name, weight, fused, interclass_filter=threshold, **extra)
    expected = ref_logits(name, emb, weight, labels, interclass_filter=threshold, **extra)
    assert_logits_match(head(emb, labels), expected)


@pytest.mark.parametrize("pseudo", ["false_class", "virtual_class", "none"])
@pytest.mark.parametrize("saturation", ["prob", "gap"])
@given(seed=seeds, size=sizes, data=st.data())
def test_hsm_matches_reference(pseudo, saturation, seed, size, data):
    emb, weight, labels = make_batch(seed, *size)
    counts = data.draw(st.lists(st.integers(1, 50), min_size=size[1], max_size=size[1]))
    params = {
        "pseudo": pseudo,
        "saturation": saturation,
        "tau": data.draw(st.sampled_from([0.5, 0.9])),
        "delta": data.draw(st.sampled_from([0.1, 0.3])),
        "m_p": data.draw(st.sampled_from([0.0, 0.2, 0.5])),
        "m_max": data.draw(st.sampled_from([0.2, 0.5])),
        "s": data.draw(st.sampled_from([8.0, 64.0])),
    }
    head = build("hsm", weight, class_counts=counts, **params)
    expected = ref_logits("hsm", emb, weight, labels, class_counts=counts, **params)
    assert_logits_match(head(emb, labels), expected)


def saturated_rows(head, emb, labels):
    """HSM's saturation test, read from the virtual column (finite where saturated)."""
    assert head.pseudo == "virtual_class"
    return head(emb, labels)[:, -1] > torch.finfo(torch.float64).min


def test_hsm_saturation_covers_both_outcomes():
    # guards test_hsm_matches_reference against a saturation test that is never (or always) on
    emb, weight, labels = make_batch(0, 64, 5, 4, target_cos=[0.97] * 32)
    for saturation in ("prob", "gap"):
        head = build(
            "hsm",
            weight,
            saturation=saturation,
            pseudo="virtual_class",
            class_counts=[1, 2, 3, 4, 5],
        )
        assert 0 < int(saturated_rows(head, emb, labels).sum()) < 64


@given(
    seed=seeds,
    n=st.integers(0, 60),
    k=st.sampled_from([0.0, 0.5, 1.5, 3.0]),
    ties=st.booleans(),
)
def test_tukey_fences_vs_quantile_by_index_reference(seed, n, k, ties):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=gen, dtype=torch.float64)
    values[: n // 8] *= 20  # a few outliers, so that the fences have something to remove
    if ties:
        values = values.round(decimals=0)
    np.testing.assert_array_equal(tukey_kept(values, k).numpy(), tukey_reference(values, k))


@given(seed=seeds, batch=st.integers(1, 8), classes=st.integers(1, 4))
def test_negative_pair_cosines_vs_loops(seed, batch, classes):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, 3, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    np.testing.assert_allclose(
        negative_pair_cosines(emb, labels).numpy(),
        negative_pairs_reference(emb, labels),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("base", ["cosine", "cosface", "arcface", "npcface", *NEW])
@given(seed=seeds, size=sizes, k=st.sampled_from([0.5, 1.5]))
def test_unpg_matches_reference(base, seed, size, k):
    emb, weight, labels = make_batch(seed, *size)
    head = HEADS["unpg"](size[2], size[1], base=base, k=k, s=30.0).double()
    with torch.no_grad():
        head.weight.copy_(weight)
    kept = tukey_reference(negative_pairs_reference(emb, labels.tolist()), k)
    expected = [
        row + [30.0 * x for x in kept] for row in ref_logits(base, emb, weight, labels, s=30.0)
    ]
    assert_logits_match(head(emb, labels), expected)


@pytest.mark.parametrize("base", ["arcface", "hsm", *NEW])
@given(seed=seeds, size=sizes)
def test_unpg_without_negative_pairs_equals_base(base, seed, size):
    emb, weight, _ = make_batch(seed, *size)
    labels = torch.full((size[0],), size[1] - 1)  # one identity: no pair with different labels
    extra = {"class_counts": [1] * size[1]} if base == "hsm" else {}
    wrapped = HEADS["unpg"](size[2], size[1], base=base, **extra).double()
    plain = build(base, weight, **extra)
    with torch.no_grad():
        wrapped.weight.copy_(weight)
    assert torch.equal(wrapped(emb, labels), plain(emb, labels))


@pytest.mark.parametrize("name", ["cosface", "arcface"])
@given(seed=seeds, size=sizes)
def test_margin_never_raises_the_target_logit(name, seed, size):
    emb, weight, labels = make_batch(seed, *size)
    plain, margin = build("cosine", weight), build(name, weight)
    rows = torch.arange(size[0])
    assert (margin(emb, labels)[rows, labels] <= plain(emb, labels)[rows, labels]).all()


def two_class_batch(a: float, b: float):
    """One sample with cos = a to class 0 (its label) and cos = b to class 1, in float64."""
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    emb = torch.tensor([[a, b, math.sqrt(1 - a * a - b * b)]], dtype=torch.float64)
    return emb, weight, torch.tensor([0])


@pytest.mark.parametrize("side", [-1, 1])
def test_hsm_saturation_thresholds_are_exact(side):
    # gap test: c'_y − c_1 = (0.8 − 0.5) − 0.1 = 0.2; saturated iff delta < 0.2
    emb, weight, labels = two_class_batch(0.8, 0.1)
    head = build("hsm", weight, pseudo="virtual_class", saturation="gap", delta=0.2 + side * 1e-9)
    head.set_class_counts([1, 1])
    assert bool(saturated_rows(head, emb, labels)) == (side < 0)
    # prob test: p_y = 1 / (1 + exp(s · (0.1 − 0.3))) with s = 8
    p_y = 1 / (1 + math.exp(8 * (0.1 - 0.3)))
    head = build("hsm", weight, pseudo="virtual_class", tau=p_y + side * 1e-9, s=8.0)
    head.set_class_counts([1, 1])
    assert bool(saturated_rows(head, emb, labels)) == (side < 0)
