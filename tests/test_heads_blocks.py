"""The CPU row blocks of the fused heads (`mining.heads.fused.row_blocks`).

At the sizes of the formula tests every tensor is one block (2^18 entries), so these tests
shrink ``BLOCK_ELEMS`` to a few entries: NPCFace's hard-negative sweep, HSM's log-sum-exp and
the (C, d) projection of the W gradient then run over many blocks with a short last one, and
must still match the float64 per-element reference and the one-block gradients.
"""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mining.heads.fused as fused
from mining.heads.fused import row_blocks, row_reduce
from tests.test_heads_formulas import build
from tests.test_heads_grad import grads
from tests.test_heads_reference import assert_logits_match, make_batch, ref_logits

seeds = st.integers(0, 2**31 - 1)
sizes = st.tuples(st.integers(2, 9), st.integers(2, 7), st.integers(2, 5))  # B, C, d

#: every head whose work is done in row blocks on CPU
BLOCKED = [
    ("npcface", {}),
    ("npcface", {"interclass_filter": 0.2}),
    ("hsm", {"pseudo": "false_class", "saturation": "prob", "s": 8.0}),
    ("hsm", {"pseudo": "false_class", "saturation": "gap"}),
    ("hsm", {"pseudo": "virtual_class", "saturation": "prob", "s": 8.0}),
]


@given(n=st.integers(0, 40), k=st.integers(0, 9), block=st.integers(1, 50))
def test_row_blocks_cover_every_row_once_in_order(n, k, block):
    with patch.object(fused, "BLOCK_ELEMS", block):
        blocks = row_blocks(torch.empty(n, k))
    rows = [i for b in blocks for i in range(n)[b]]
    assert rows == list(range(n))
    assert all(b.stop - b.start == max(1, block // max(1, k)) for b in blocks[:-1])


def test_row_blocks_off_cpu_is_one_block():
    # devices with a caching allocator get the whole tensor at once ("meta" stands for CUDA)
    assert row_blocks(torch.empty(1000, 1000, device="meta")) == [slice(0, 1000)]


@given(seed=seeds, n=st.integers(1, 30), k=st.integers(1, 9), block=st.integers(1, 40))
def test_row_reduce_equals_one_call(seed, n, k, block):
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with patch.object(fused, "BLOCK_ELEMS", block):
        blocked = row_reduce(lambda t: torch.logsumexp(t, dim=1), x)
    torch.testing.assert_close(blocked, torch.logsumexp(x, dim=1), rtol=1e-14, atol=0)


def _counts(classes: int) -> list[int]:
    return [1 + (3 * j) % 7 for j in range(classes)]


@pytest.mark.parametrize(("name", "params"), BLOCKED, ids=lambda v: str(v))
@pytest.mark.parametrize("block", [1, 5, 13])
@settings(max_examples=15)
@given(seed=seeds, size=sizes)
def test_blocked_heads_match_reference_and_one_block(name, params, block, seed, size):
    emb, weight, labels = make_batch(seed, *size)
    if name == "hsm":
        params = {**params, "class_counts": _counts(size[1])}
    head = build(name, weight, **params)
    probe = torch.randn(
        size[0], size[1] + (params.get("pseudo") == "virtual_class"),
        generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
    )  # fmt: skip
    with patch.object(fused, "BLOCK_ELEMS", block):
        logits = head(emb, labels)
        blocked = grads(head, emb, weight, labels, probe)
    assert_logits_match(logits, ref_logits(name, emb, weight, labels, **params))
    one_block = grads(head, emb, weight, labels, probe)
    for a, b in zip(blocked, one_block, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("saturation", ["prob", "gap"])
@given(seed=seeds, size=sizes)
def test_hsm_saturation_test_leaves_the_logits_as_they_were(saturation, seed, size):
    # the test hides the targets under -inf while it reduces the other classes, then restores
    emb, weight, labels = make_batch(seed, *size)
    head = build("hsm", weight, class_counts=_counts(size[1]), saturation=saturation)
    logits = head.s * head.cosine(emb)
    before = logits.clone()
    with patch.object(fused, "BLOCK_ELEMS", 3):
        head._saturated_logits(logits, torch.ones(len(labels), dtype=logits.dtype), labels)
    assert torch.equal(logits, before)
