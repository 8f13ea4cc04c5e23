"""Mining rules over batch ∪ memory against brute-force loops (float64, continuous values)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mining.candidates
from mining.miners import (
    MINERS,
    BatchHardMiner,
    BidirectionalMiner,
    Candidates,
    RandomMiner,
    SemiHardMiner,
    ThresholdMiner,
    TopKMiner,
    ivs_domains,
    occurrence_rank,
)


@st.composite
def candidates(draw):
    """A batch with label collisions (pairs and singletons) and a memory sharing some labels,
    optionally with masked-out memory rows, memory domains (0 ID, 1 spot, -1 unknown) and an
    anchor subset (a rank's rows of a gathered global batch)."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    b, m, d = draw(st.integers(1, 10)), draw(st.integers(0, 25)), draw(st.integers(2, 5))
    n_labels = draw(st.integers(1, 7))
    unit = lambda n: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1
    )
    return Candidates(
        unit(b),
        torch.randint(0, n_labels, (b,), generator=gen),
        unit(m),
        torch.randint(0, n_labels, (m,), generator=gen),
        use_batch=draw(st.booleans()),
        chunk=draw(st.one_of(st.none(), st.integers(1, 8))),
        memory_mask=torch.rand(m, generator=gen) < 0.8 if draw(st.booleans()) else None,
        memory_domains=torch.randint(-1, 2, (m,), generator=gen) if draw(st.booleans()) else None,
        anchor_rows=draw(st.one_of(st.none(), _row_slices(b))),
    )


def _row_slices(b: int):
    """slice(lo, hi) with 0 <= lo <= hi <= b (empty subsets included)."""
    return st.integers(0, b).flatmap(lambda lo: st.integers(lo, b).map(lambda hi: slice(lo, hi)))


def _anchors(c: Candidates) -> range:
    """The anchor rows the brute force loops over: the subset, or every batch row."""
    rows = c.anchor_rows or slice(0, c.num_batch)
    return range(rows.start, rows.stop)


def _all_cands(c: Candidates):
    """[(index, embedding, label)] of every negative candidate, in Mined index convention."""
    out = []
    if c.use_batch:
        out += [(j, c.batch[j], int(c.batch_labels[j])) for j in range(c.num_batch)]
    out += [
        (c.num_batch + j, c.memory[j], int(c.memory_labels[j]))
        for j in range(len(c.memory))
        if c.memory_mask is None or bool(c.memory_mask[j])
    ]
    return out


def _ref_positive(c: Candidates, i: int):
    """(sim, j) of the least similar other batch row with the same label, or None."""
    pos = [
        (float(c.batch[i] @ c.batch[j]), j)
        for j in range(c.num_batch)
        if j != i and c.batch_labels[j] == c.batch_labels[i]
    ]
    return min(pos) if pos else None


def _ref_negatives(c: Candidates, i: int, allowed=None):
    """Descending [(sim, index)] of admissible negatives of anchor i."""
    negs = [
        (float(c.batch[i] @ e), j)
        for j, e, y in _all_cands(c)
        if y != int(c.batch_labels[i]) and (allowed is None or allowed(j))
    ]
    return sorted(negs, reverse=True)


def _sim(c: Candidates, a, n):
    return float(c.batch[a] @ c.rows(n[None])[0])


def _assert_valid(c: Candidates, mined):
    for a, p, n in zip(mined.anchor, mined.positive, mined.negative, strict=True):
        assert int(a) in _anchors(c)
        assert a != p and c.batch_labels[a] == c.batch_labels[p]
        assert c.labels_of(n[None])[0] != c.batch_labels[a]  # same label is never a negative
        assert c.use_batch or n >= c.num_batch


@given(candidates(), st.integers(1, 4))
def test_batch_hard_and_top_k_match_brute_force(c, k):
    for miner, kk in ((BatchHardMiner(), 1), (TopKMiner(k), k)):
        mined = miner(c)
        _assert_valid(c, mined)
        expected = []
        for i in _anchors(c):
            pos = _ref_positive(c, i)
            negs = _ref_negatives(c, i)[:kk]
            if pos is not None:
                expected += [(i, pos[1], s) for s, _ in negs]
        got = sorted(
            (int(a), int(p), _sim(c, a, n))
            for a, p, n in zip(mined.anchor, mined.positive, mined.negative, strict=True)
        )
        assert [(a, p) for a, p, _ in got] == sorted((a, p) for a, p, _ in expected)
        expected_sims = sorted(expected)
        for (_, _, s), (_, _, r) in zip(got, expected_sims, strict=True):
            assert abs(s - r) < 1e-12


@given(candidates())
def test_semi_hard_matches_brute_force(c):
    mined = SemiHardMiner()(c)
    _assert_valid(c, mined)
    got = {int(a): _sim(c, a, n) for a, n in zip(mined.anchor, mined.negative, strict=True)}
    for i in _anchors(c):
        pos = _ref_positive(c, i)
        negs = [s for s, _ in _ref_negatives(c, i) if pos is not None and s < pos[0]]
        if negs:
            assert abs(got.pop(i) - negs[0]) < 1e-12
    assert not got


@given(candidates(), st.floats(0.0, 1.0))
def test_threshold_returns_every_negative_within_margin(c, margin):
    mined = ThresholdMiner(margin)(c)
    _assert_valid(c, mined)
    expected = set()
    for i in _anchors(c):
        pos = _ref_positive(c, i)
        if pos is not None:
            expected |= {(i, j) for s, j in _ref_negatives(c, i) if s > pos[0] - margin}
    got = {(int(a), int(n)) for a, n in zip(mined.anchor, mined.negative, strict=True)}
    assert got == expected and len(got) == len(mined)


@given(candidates(), st.integers(1, 3))
def test_random_is_admissible_distinct_and_reproducible(c, k):
    mined = RandomMiner(k, seed=3)(c)
    _assert_valid(c, mined)
    again = RandomMiner(k, seed=3)(c)
    assert torch.equal(mined.negative, again.negative)
    for i in _anchors(c):
        mine = mined.negative[mined.anchor == i].tolist()
        n_admissible = len(_ref_negatives(c, i))
        has_pos = _ref_positive(c, i) is not None
        assert len(mine) == len(set(mine)) == (min(k, n_admissible) if has_pos else 0)


@given(candidates())
def test_bidirectional_mines_the_other_domain(c):
    """ID anchors (first row of an identity) mine spot rows, spot anchors ID rows, from the batch
    and from the memory; memory rows of unknown domain are candidates for both."""
    domain = occurrence_rank(c.batch_labels).clamp(max=1)
    mined = BidirectionalMiner()(c)
    _assert_valid(c, mined)
    got = {int(a): _sim(c, a, n) for a, n in zip(mined.anchor, mined.negative, strict=True)}

    def cand_domain(j):
        if j < c.num_batch:
            return int(domain[j])
        return -1 if c.memory_domains is None else int(c.memory_domains[j - c.num_batch])

    for i in _anchors(c):
        other = lambda j: cand_domain(j) in (-1, 1 - int(domain[i]))  # noqa: E731, B023
        negs = _ref_negatives(c, i, allowed=other)
        if _ref_positive(c, i) is not None and negs:
            assert abs(got.pop(i) - negs[0][0]) < 1e-12
    assert not got
    for a, n in zip(mined.anchor, mined.negative, strict=True):
        assert cand_domain(int(n)) != int(domain[a])


@given(candidates())
def test_other_miners_ignore_memory_domains(c):
    plain = replace(c, memory_domains=None)
    for miner in (BatchHardMiner(), TopKMiner(2), SemiHardMiner(), ThresholdMiner(0.3)):
        m, pm = miner(c), miner(plain)
        for got, want in (
            (m.anchor, pm.anchor),
            (m.positive, pm.positive),
            (m.negative, pm.negative),
        ):
            assert torch.equal(got, want)


@given(st.integers(0, 2**31 - 1), st.integers(0, 40), st.integers(1, 10))
def test_occurrence_rank_and_ivs_domains_match_loops(seed, b, n_labels):
    labels = torch.randint(0, n_labels, (b,), generator=torch.Generator().manual_seed(seed))
    ref = [sum(int(labels[j]) == int(labels[i]) for j in range(i)) for i in range(b)]
    assert occurrence_rank(labels).tolist() == ref
    domains = ivs_domains(labels)
    assert domains.dtype == torch.int8 and domains.tolist() == [min(r, 1) for r in ref]


def test_occurrence_rank():
    assert occurrence_rank(torch.tensor([5, 3, 5, 3, 7, 5])).tolist() == [0, 0, 1, 1, 0, 2]


@given(candidates(), st.integers(0, 2**31 - 1))
def test_permuting_the_batch_permutes_the_result(c, seed):
    c = replace(c, anchor_rows=None)  # a permutation moves rows in and out of a subset
    perm = torch.randperm(c.num_batch, generator=torch.Generator().manual_seed(seed))
    inv = torch.argsort(perm)
    pc = replace(c, batch=c.batch[perm], batch_labels=c.batch_labels[perm])
    for miner in (BatchHardMiner(), TopKMiner(2), SemiHardMiner(), ThresholdMiner(0.3)):
        m, pm = miner(c), miner(pc)
        # Map the permuted result back to original batch rows (memory indices are unchanged).
        back = lambda idx: torch.where(idx < c.num_batch, perm[idx.clamp(max=c.num_batch - 1)], idx)  # noqa: E731
        got = sorted(
            zip(
                back(pm.anchor).tolist(),
                back(pm.positive).tolist(),
                back(pm.negative).tolist(),
                strict=True,
            )
        )
        want = sorted(zip(m.anchor.tolist(), m.positive.tolist(), m.negative.tolist(), strict=True))
        assert got == want
    assert inv.numel() == c.num_batch


def test_no_positives_or_no_negatives_mine_nothing():
    x = torch.nn.functional.normalize(
        torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=1
    )
    for labels in (torch.arange(4), torch.zeros(4, dtype=torch.long)):
        c = Candidates.in_batch(x, labels)
        for miner in (
            BatchHardMiner(),
            TopKMiner(3),
            SemiHardMiner(),
            ThresholdMiner(),
            RandomMiner(),
            BidirectionalMiner(),
        ):
            assert len(miner(c)) == 0


def _miners():
    return (
        BatchHardMiner(),
        TopKMiner(3),
        SemiHardMiner(),
        ThresholdMiner(0.3),
        RandomMiner(2, seed=5),
        BidirectionalMiner(),
    )


def _triple_set(mined) -> set[tuple[int, int, int]]:
    return set(
        zip(mined.anchor.tolist(), mined.positive.tolist(), mined.negative.tolist(), strict=True)
    )


@given(candidates(), st.data())
def test_anchor_subset_mines_the_full_result_restricted_to_its_anchors(c, data):
    """Σ over a partition of the rows (the ranks) = the result without a subset, index for
    index: what makes the ranks' terms together the single-process terms."""
    c = replace(c, anchor_rows=None)
    cut = data.draw(st.integers(0, c.num_batch))
    for miner in _miners():
        full = miner(c)
        parts = [miner(replace(c, anchor_rows=rows)) for rows in (slice(0, cut), slice(cut, None))]
        assert sum(len(m) for m in parts) == len(full)
        assert _triple_set(parts[0]) | _triple_set(parts[1]) == _triple_set(full)
        assert all(int(a) < cut for a in parts[0].anchor) and all(
            int(a) >= cut for a in parts[1].anchor
        )


@given(c=candidates())
def test_anchor_subset_scans_only_its_rows(c, scans):
    """The speed-up itself: every similarity scan (positives, hardest negatives, threshold
    window) has at most A = |anchors| rows; batch-hard / top-k / semi-hard scan exactly A."""
    num_anchors = len(_anchors(c))
    for miner in _miners():
        scans.clear()
        miner(c)
        negatives = scans.get("negatives", [])  # none without a candidate block
        assert scans["positives"] == [num_anchors]
        assert all(rows <= num_anchors for rows in negatives)
        if isinstance(miner, (BatchHardMiner, TopKMiner, SemiHardMiner)):
            assert set(negatives) <= {num_anchors}
            assert len(negatives) == int(c.use_batch) + 1  # one scan per candidate block
        if isinstance(miner, ThresholdMiner):
            assert scans["within"] == [num_anchors]


@pytest.fixture(scope="module")
def scans():
    """Record the anchor rows of every scan of mining.candidates (module-scoped: hypothesis
    reruns the test body, not the fixture)."""
    seen: dict[str, list[int]] = {}
    negatives, positives = mining.candidates.hardest_negatives, mining.candidates.hardest_positives
    within = Candidates.within

    def record(kind, rows):
        seen.setdefault(kind, []).append(rows)

    def hardest_negatives(anchors, *args, **kwargs):
        record("negatives", anchors.shape[0])
        return negatives(anchors, *args, **kwargs)

    def hardest_positives(emb, labels, anchors=None):
        out = positives(emb, labels, anchors)
        record("positives", out[0].shape[0])
        return out

    def record_within(self, anchors, labels, lower):
        record("within", anchors.shape[0])
        return within(self, anchors, labels, lower)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mining.candidates, "hardest_negatives", hardest_negatives)
        mp.setattr(mining.candidates, "hardest_positives", hardest_positives)
        mp.setattr(Candidates, "within", record_within)
        yield seen


def test_every_miner_is_covered_by_the_subset_tests():
    assert {type(m) for m in _miners()} == set(MINERS.values())


@pytest.mark.parametrize(
    "rows", [slice(-1, 2), slice(0, 5), slice(3, 2), slice(0, 4, 2), slice(0.0, 2)]
)
def test_bad_anchor_rows_are_rejected(rows):
    x = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="anchor_rows must be"):
        replace(Candidates.in_batch(x, torch.arange(4)), anchor_rows=rows)


@pytest.mark.parametrize("miner", [TopKMiner, RandomMiner])
def test_k_is_validated(miner):
    with pytest.raises(ValueError, match="k must be"):
        miner(0)
