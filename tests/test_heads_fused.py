"""The fused `CosineLogits` op equals the plain formula it accelerates, in float64.

`CosineHead.fused` selects the op for heads whose margin is ``target`` alone (cosine, cosface,
arcface, arcface_nograd); the other heads never use it. Logits and gradients must agree to
rounding, with and without the interclass filter.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

from mining.heads import HEADS
from tests.test_heads_reference import make_batch

seeds = st.integers(0, 2**31 - 1)
sizes = st.tuples(st.integers(1, 8), st.integers(2, 9), st.integers(2, 6))  # B, C, d
TARGET_ONLY = ["cosine", "cosface", "arcface", "arcface_nograd"]


def logits_and_grads(name, fused, emb, weight, labels, probe, **params):
    head = HEADS[name](weight.shape[1], weight.shape[0], **params).double()
    head.fused = fused
    e, w = emb.clone().requires_grad_(), weight.clone().requires_grad_()
    out = functional_call(head, {"weight": w}, (e, labels))
    (out * probe).sum().backward()
    return out.detach(), e.grad, w.grad


@pytest.mark.parametrize("name", TARGET_ONLY)
@given(
    seed=seeds,
    size=sizes,
    threshold=st.sampled_from([None, -0.3, 0.2, 0.4]),
    s=st.sampled_from([1.0, 64.0]),
)
def test_fused_equals_plain(name, seed, size, threshold, s):
    emb, weight, labels = make_batch(seed, *size)
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randn(size[0], size[1], generator=gen, dtype=torch.float64)
    params = {"interclass_filter": threshold, "s": s}
    fused = logits_and_grads(name, True, emb, weight, labels, probe, **params)
    plain = logits_and_grads(name, False, emb, weight, labels, probe, **params)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_by_default_only_for_target_only_heads():
    fused = {name for name, cls in HEADS.items() if getattr(cls(3, 4), "fused", False)}
    assert fused == set(TARGET_ONLY)


@pytest.mark.parametrize("name", TARGET_ONLY)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_equals_plain_under_cpu_autocast(name, dtype):
    emb, weight, labels = make_batch(3, 16, 10, 8, dtype=torch.float32)
    outs = []
    for fused in (True, False):
        head = HEADS[name](8, 10)
        head.fused = fused
        with torch.no_grad():
            head.weight.copy_(weight)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            outs.append(head(emb, labels))
    assert outs[0].dtype == outs[1].dtype == torch.float32
    # bf16 products: the two paths round differently (≈ 1e-2 of s = 64 after the upcast)
    tol = 1e-4 if dtype == torch.float32 else 1.0
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=tol)


@pytest.mark.parametrize("name", TARGET_ONLY)
def test_fused_equals_plain_where_cosines_are_clamped(name):
    # embeddings on ± a class centre: cos = ±1 exactly, clamped to ±(1 − 1e-6) on both paths
    weight = torch.tensor(
        [[2.0, 0, 0], [0, 1.0, 0], [0, 0, 3.0], [-1.0, 0, 0]], dtype=torch.float64
    )
    emb = torch.cat([weight, -2 * weight, weight + 0.3])
    labels = torch.tensor([0, 1, 2, 3, 1, 2, 3, 0, 2, 2, 0, 1])
    probe = torch.randn(12, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fused = logits_and_grads(name, True, emb, weight, labels, probe)
    plain = logits_and_grads(name, False, emb, weight, labels, probe)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_head_with_its_own_logits_refuses_the_fused_path():
    head = HEADS["npcface"](3, 4)
    head.fused = False
    with pytest.raises(ValueError, match="NPCFace has no fused path"):
        head.fused = True
