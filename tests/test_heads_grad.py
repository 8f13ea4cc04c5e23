"""Gradients of the heads: gradcheck in float64, and the two gradients that are not d(value)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from mining.heads import HEADS
from tests.test_heads_reference import make_batch

seeds = st.integers(0, 2**31 - 1)

DIFFERENTIABLE = {
    "softmax": {},
    "cosine": {},
    "cosface": {},
    "arcface": {},
    "npcface": {},
    "hsm": {"class_counts": [3, 1, 4, 1, 5]},
    "unpg": {"base": "arcface", "s": 8.0},
}


def head_and_batch(name, seed, **params):
    emb, weight, labels = make_batch(seed, 4, 5, 3)
    head = HEADS[name](3, 5, **params).double()
    return head, emb, weight, labels


def weight_key(head) -> str:
    return next(k for k, v in head.named_parameters() if v is head.weight)


COUNTS = {"class_counts": [3, 1, 4, 1, 5]}
#: every code path of the fused CosineLogits: target-only margins, others-margins (NPCFace's
#: hard mask, HSM's row shift and extra column), each with the interclass filter's mask
GRADCHECK = [(name, params) for name, params in DIFFERENTIABLE.items()] + [
    ("hsm", {**COUNTS, "pseudo": "virtual_class", "saturation": "gap"}),
    ("hsm", {**COUNTS, "pseudo": "none"}),
    ("hsm", {**COUNTS, "interclass_filter": 0.2}),
    ("cosface", {"interclass_filter": 0.2}),
    ("arcface", {"interclass_filter": -0.2}),
    ("npcface", {"interclass_filter": 0.2}),
]


@pytest.mark.parametrize(("name", "params"), GRADCHECK, ids=lambda v: str(v))
@settings(max_examples=5)
@given(seed=seeds)
def test_gradcheck(name, params, seed):
    head, emb, weight, labels = head_and_batch(name, seed, **params)
    # gradcheck runs many backwards through one forward: the masks must survive them
    head.reuse_masks = False
    key = weight_key(head)
    if name == "npcface":
        # m' is a constant by design (no grad), so the gradient is that of the logits with the
        # hard mask and m' frozen at this point; the test below checks m' gets no gradient.
        hard, m_prime = head.hard_negatives(head.cosine(emb), labels)

        def frozen(logits, labels):  # the formula with M and m' fixed; a fresh M each time
            logits.addcmul_(logits, hard, value=head.t - 1.0).add_(hard, alpha=head.s * head.alpha)
            return hard.clone(), m_prime

        head.apply_hard_negatives = frozen

    def logits(e, w):
        return functional_call(head, {key: w}, (e, labels))

    assert torch.autograd.gradcheck(logits, (emb.requires_grad_(), weight.requires_grad_()))


def grads(head, emb, weight, labels, probe):
    """d(sum(logits · probe)) / d(emb, weight) with the head's weight set to ``weight``."""
    emb = emb.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    key = weight_key(head)
    (functional_call(head, {key: w}, (emb, labels)) * probe).sum().backward()
    return emb.grad, w.grad


@given(seed=seeds)
def test_arcface_nograd_gradient_is_the_plain_cosine_gradient(seed):
    emb, weight, labels = make_batch(seed, 6, 5, 3)
    probe = torch.randn(6, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    plain = grads(HEADS["cosine"](3, 5).double(), emb, weight, labels, probe)
    nograd = grads(HEADS["arcface_nograd"](3, 5).double(), emb, weight, labels, probe)
    classic = grads(HEADS["arcface"](3, 5).double(), emb, weight, labels, probe)
    for a, b in zip(nograd, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the classic form's gradient does differ: the two are distinct baselines
    assert not torch.allclose(classic[1], plain[1], rtol=1e-6, atol=1e-9)


def npcface_autograd_reference(emb, weight, labels, detach_margin):
    """NPCFace in float64 from the formula (acos form), m' optionally left differentiable."""
    m, m0, m1, t, alpha, s = 0.5, 0.4, 0.2, 1.1, 0.2, 64.0
    cos = (emb / emb.norm(dim=1, keepdim=True)) @ (weight / weight.norm(dim=1, keepdim=True)).T
    cos = cos.clamp(-1 + 1e-6, 1 - 1e-6)
    rows = torch.arange(len(labels))
    c = cos[rows, labels]
    others = torch.ones_like(cos, dtype=torch.bool)
    others[rows, labels] = False
    hard = (cos > torch.cos(torch.acos(c) + m)[:, None]) & others
    n_hard = hard.sum(1)
    mean_hard = (cos * hard).sum(1) / n_hard.clamp(min=1)
    m_prime = m0 + m1 * mean_hard
    if detach_margin:
        m_prime = m_prime.detach()
    target = torch.where(c > 0, torch.cos(torch.acos(c) + m_prime), c)
    out = torch.where(hard, t * cos + alpha, cos)
    out = torch.where(others, out, target[:, None])
    return s * out, n_hard


@given(seed=seeds)
def test_npcface_sample_margin_carries_no_gradient(seed):
    # rows with a positive target and hard negatives, where m' would otherwise pass gradient
    emb, weight, labels = make_batch(seed, 6, 5, 3, target_cos=[0.3, 0.5, 0.7])
    probe = torch.randn(6, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    head = HEADS["npcface"](3, 5).double()
    actual = grads(head, emb, weight, labels, probe)

    def reference(detach):
        e, w = emb.clone().requires_grad_(), weight.clone().requires_grad_()
        logits, n_hard = npcface_autograd_reference(e, w, labels, detach)
        (logits * probe).sum().backward()
        return e.grad, w.grad, n_hard

    *expected, n_hard = reference(detach=True)
    *with_margin_grad, _ = reference(detach=False)
    for a, b in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    if n_hard[:3].any():  # then the differentiable-m' variant must differ: the test can fail
        assert not torch.allclose(actual[1], with_margin_grad[1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "name", ["cosine", "cosface", "arcface", "arcface_nograd", "npcface", "hsm", "unpg"]
)
def test_interclass_filtered_entries_get_no_gradient(name):
    emb, weight, labels = make_batch(7, 8, 6, 4)
    params = {"class_counts": [1] * 6} if name == "hsm" else {}
    head = HEADS[name](4, 6, interclass_filter=0.1, **params).double()
    e, w = emb.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = functional_call(head, {weight_key(head): w}, (e, labels))
    filtered = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T > 0.1
    filtered[torch.arange(8), labels] = False
    assert filtered.any()
    for g in torch.autograd.grad(logits[:, :6][filtered].sum(), (e, w)):
        assert torch.count_nonzero(g) == 0


MASKED = [
    ("npcface", {}),
    ("arcface", {"interclass_filter": 0.2}),
    ("npcface", {"interclass_filter": 0.2}),
    ("unpg", {"base": "npcface"}),  # reuse_masks set on the wrapper reaches the base head
]


@pytest.mark.parametrize(("name", "params"), MASKED, ids=lambda v: str(v))
@given(seed=seeds)
def test_gradient_in_the_masks_equals_a_fresh_gradient(name, params, seed):
    # reuse_masks computes h in the filter's / NPCFace's mask storage instead of a new tensor
    head, emb, weight, labels = head_and_batch(name, seed, **params)
    shape = head(emb, labels).shape  # UNPG appends its negative-pair columns
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randn(shape, generator=gen, dtype=torch.float64)
    reused = grads(head, emb, weight, labels, probe)
    head.reuse_masks = False
    fresh = grads(head, emb, weight, labels, probe)
    for a, b in zip(reused, fresh, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "params"), MASKED, ids=lambda v: str(v))
def test_second_backward_needs_reuse_masks_off(name, params):
    head, emb, _, labels = head_and_batch(name, 0, **params)
    emb.requires_grad_()
    loss = head(emb, labels).square().sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="reuse_masks = False"):
        loss.backward()
    head.reuse_masks, emb.grad = False, None
    loss = head(emb, labels).square().sum()
    loss.backward(retain_graph=True)
    first = emb.grad.clone()
    loss.backward()
    torch.testing.assert_close(emb.grad, 2 * first)
