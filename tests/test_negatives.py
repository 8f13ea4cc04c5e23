"""hardest_negatives / random_negatives against a brute-force loop reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mining.negatives import default_chunk, hardest_negatives, merge_topk, random_negatives


def _brute_force(anchors, alabels, cands, clabels, k, exclude=None, below=None, mask=None):
    """Per anchor: sorted list of (sim, j) over admissible candidates, plain Python loops."""
    out = []
    for i in range(anchors.shape[0]):
        labs = alabels[i].tolist() if alabels.ndim == 2 else [int(alabels[i])]
        cand = []
        for j in range(cands.shape[0]):
            if int(clabels[j]) in labs or (exclude is not None and j == int(exclude[i])):
                continue
            if mask is not None and not bool(mask[j]):
                continue
            s = float(sum(float(a) * float(c) for a, c in zip(anchors[i], cands[j], strict=True)))
            if below is not None and s >= float(below[i]):
                continue
            cand.append((s, j))
        out.append(sorted(cand, key=lambda t: -t[0])[:k])
    return out


def _check(sims, idx, ref, anchors, cands, k, tol):
    for i, row in enumerate(ref):
        assert len(row) <= k
        for r in range(k):
            if r >= len(row):
                assert int(idx[i, r]) == -1 and sims[i, r] == -math.inf
                continue
            # Ties: any index is fine as long as its similarity equals the reference value.
            assert abs(float(sims[i, r]) - row[r][0]) <= tol
            j = int(idx[i, r])
            assert abs(float(anchors[i] @ cands[j].to(anchors.dtype)) - row[r][0]) <= tol
        chosen = [int(j) for j in idx[i] if int(j) >= 0]
        assert len(set(chosen)) == len(chosen)  # no candidate twice


@st.composite
def problems(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    b, m, d = draw(st.integers(1, 9)), draw(st.integers(0, 40)), draw(st.integers(1, 6))
    n_labels = draw(st.integers(1, 6))  # few labels: many collisions
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    # Small integer coordinates give exact ties between different candidates.
    integer = draw(st.booleans())
    make = (
        (lambda n: torch.randint(-2, 3, (n, d), generator=gen).to(dtype))
        if integer
        else (lambda n: torch.randn(n, d, generator=gen, dtype=dtype))
    )
    anchors, cands = make(b), make(m)
    alabels = torch.randint(0, n_labels, (b,), generator=gen)
    clabels = torch.randint(0, n_labels, (m,), generator=gen)
    k = draw(st.integers(1, 5))
    chunk = draw(st.one_of(st.none(), st.integers(1, 45)))
    return anchors, alabels, cands, clabels, k, chunk, gen


@given(problems())
def test_matches_brute_force(problem):
    anchors, alabels, cands, clabels, k, chunk, _ = problem
    sims, idx = hardest_negatives(anchors, alabels, cands, clabels, k=k, chunk=chunk)
    assert sims.shape == idx.shape == (anchors.shape[0], k)
    tol = 1e-4 if anchors.dtype == torch.float32 else 1e-10
    ref = _brute_force(anchors, alabels, cands, clabels, k)
    _check(sims, idx, ref, anchors, cands, k, tol)
    chosen = idx[idx >= 0]
    owners = torch.arange(anchors.shape[0])[:, None].expand_as(idx)[idx >= 0]
    assert not (clabels[chosen] == alabels[owners]).any()  # same label is never a negative


@given(problems(), st.data())
def test_exclude_self_below_mask_and_two_labels(problem, data):
    anchors, alabels, cands, clabels, k, chunk, gen = problem
    m, b = cands.shape[0], anchors.shape[0]
    exclude = torch.randint(-1, max(m, 1), (b,), generator=gen)
    below = torch.randn(b, generator=gen, dtype=anchors.dtype)
    labels2 = torch.stack([alabels, torch.randint(0, 6, (b,), generator=gen)], dim=1)
    use_two = data.draw(st.booleans())
    al = labels2 if use_two else alabels
    mask = torch.rand(m, generator=gen) < 0.7
    sims, idx = hardest_negatives(
        anchors,
        al,
        cands,
        clabels,
        k=k,
        exclude_self=exclude,
        chunk=chunk,
        below=below,
        cand_mask=mask,
    )
    tol = 1e-4 if anchors.dtype == torch.float32 else 1e-10
    ref = _brute_force(anchors, al, cands, clabels, k, exclude=exclude, below=below, mask=mask)
    _check(sims, idx, ref, anchors, cands, k, tol)


@given(problems())
def test_permuting_anchors_permutes_result_and_chunk_does_not_matter(problem):
    anchors, alabels, cands, clabels, k, chunk, gen = problem
    # Continuous float64 values: no ties and no near-ties, so the indices are unique.
    anchors = torch.randn(anchors.shape, generator=gen, dtype=torch.float64)
    cands = torch.randn(cands.shape, generator=gen, dtype=torch.float64)
    perm = torch.randperm(anchors.shape[0], generator=gen)
    s1, i1 = hardest_negatives(anchors, alabels, cands, clabels, k=k, chunk=chunk)
    s2, i2 = hardest_negatives(anchors[perm], alabels[perm], cands, clabels, k=k, chunk=None)
    assert torch.equal(i1[perm], i2)
    assert torch.allclose(s1[perm], s2, rtol=0, atol=1e-12)


def test_no_negatives_gives_padding():
    a = torch.randn(3, 4)
    sims, idx = hardest_negatives(
        a, torch.zeros(3, dtype=torch.long), a, torch.zeros(3, dtype=torch.long), k=2
    )
    assert (idx == -1).all() and torch.isinf(sims).all()
    sims, idx = hardest_negatives(
        a, torch.zeros(3, dtype=torch.long), a[:0], torch.zeros(0, dtype=torch.long)
    )
    assert idx.shape == (3, 1) and (idx == -1).all()


def test_fp16_candidates_are_cast_per_chunk():
    gen = torch.Generator().manual_seed(0)
    a, c = torch.randn(5, 8, generator=gen), torch.randn(50, 8, generator=gen)
    al, cl = torch.arange(5), torch.arange(50) % 7
    s16, _i16 = hardest_negatives(a, al, c.half(), cl, k=3, chunk=7)
    s32, _ = hardest_negatives(a, al, c.half().float(), cl, k=3)
    assert s16.dtype == torch.float32 and torch.allclose(s16, s32)


def test_merge_topk_prefers_first_on_ties():
    s = torch.tensor([[1.0, 0.5]])
    i = torch.tensor([[3, 4]])
    ms, mi = merge_topk(s, i, torch.tensor([[1.0, 0.75]]), torch.tensor([[8, 9]]), 3)
    assert mi.tolist() == [[3, 8, 9]] and ms.tolist() == [[1.0, 1.0, 0.75]]


def test_default_chunk_bounds():
    assert default_chunk(256, 10**6) == 4096
    assert default_chunk(256, 100) == 100
    assert default_chunk(10**6, 10**6) == 1024


@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 4))
def test_random_negatives_are_distinct_admissible_and_cover(seed, k):
    gen = torch.Generator().manual_seed(seed)
    alabels = torch.randint(0, 3, (6,), generator=gen)
    clabels = torch.randint(0, 3, (20,), generator=gen)
    _, idx = random_negatives(alabels, clabels, k, generator=gen, chunk=6)
    for i in range(6):
        admissible = {j for j in range(20) if clabels[j] != alabels[i]}
        chosen = [int(j) for j in idx[i] if j >= 0]
        assert len(chosen) == min(k, len(admissible)) == len(set(chosen))
        assert set(chosen) <= admissible


def test_random_negatives_are_roughly_uniform():
    gen = torch.Generator().manual_seed(1)
    clabels = torch.tensor([0, 1, 1, 2, 2, 2])
    _, idx = random_negatives(torch.zeros(6000, dtype=torch.long), clabels, generator=gen, chunk=4)
    counts = torch.bincount(idx[:, 0], minlength=6)
    assert counts[0] == 0
    assert ((counts[1:] - 1200).abs() < 150).all()  # 5 admissible, 1200 expected each (~4.4 sd)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be"),
        ({"chunk": 0}, "chunk must be"),
        ({"cands": torch.ones(3, 5)}, "share d"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    args = {
        "anchors": torch.ones(2, 4),
        "anchor_labels": torch.arange(2),
        "cands": torch.ones(3, 4),
        "cand_labels": torch.arange(3),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        hardest_negatives(**args)


@pytest.mark.gpu
def test_matches_cpu_on_cuda():
    gen = torch.Generator().manual_seed(0)
    a, c = torch.randn(16, 32, generator=gen), torch.randn(3000, 32, generator=gen)
    al, cl = (
        torch.randint(0, 50, (16,), generator=gen),
        torch.randint(0, 50, (3000,), generator=gen),
    )
    s, i = hardest_negatives(a, al, c, cl, k=4, chunk=512)
    sg, ig = hardest_negatives(a.cuda(), al.cuda(), c.cuda(), cl.cuda(), k=4, chunk=512)
    assert torch.equal(i, ig.cpu()) and torch.allclose(s, sg.cpu(), atol=1e-4)
