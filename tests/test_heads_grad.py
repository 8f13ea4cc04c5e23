"""Gradients of the heads: gradcheck in float64, the formulas' constants, a second backward."""

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
NEW = ["curricularface", "adaface", "magface"]
COUNTS = {"class_counts": [3, 1, 4, 1, 5]}

#: (name, params, fused) covering every head and path. NPCFace's m'_i and AdaFace's norm
#: statistics are constants by design (no gradient), which finite differences cannot see: NPCFace
#: is checked here with m1 = 0 (m'_i = m0) and against an autograd reference below; AdaFace
#: through its formula (`test_gradcheck_formula`) and the reference below.
GRADCHECK = [
    ("softmax", {}, False),
    ("cosine", {}, True),
    ("cosine", {}, False),
    ("cosface", {}, True),
    ("cosface", {"interclass_filter": 0.2}, True),
    ("cosface", {"interclass_filter": 0.2}, False),
    ("arcface", {}, True),
    ("arcface", {"interclass_filter": -0.2}, False),
    ("npcface", {"m1": 0.0}, False),
    ("npcface", {"m1": 0.0, "interclass_filter": 0.2}, False),
    ("hsm", COUNTS, False),
    ("hsm", {**COUNTS, "pseudo": "virtual_class", "saturation": "gap"}, False),
    ("hsm", {**COUNTS, "pseudo": "none"}, False),
    ("hsm", {**COUNTS, "interclass_filter": 0.2}, False),
    ("curricularface", {}, False),
    ("curricularface", {"interclass_filter": 0.2}, False),
    ("magface", {}, False),
    ("unpg", {"base": "arcface", "s": 8.0}, True),
    ("unpg", {"base": "curricularface", "s": 8.0}, False),
    ("unpg", {"base": "magface", "s": 8.0}, False),
]


def head_and_batch(name, seed, fused=True, **params):
    """A float64 head with a (4, 3) batch over 5 classes; norms scaled into MagFace's [l_a, u_a]."""
    emb, weight, labels = make_batch(seed, 4, 5, 3)
    head = HEADS[name](3, 5, **params).double()
    if hasattr(head, "fused"):
        head.fused = head.fused and fused
    head.eval()  # a stateful head (CurricularFace's t) keeps its state between gradcheck's calls
    return head, emb * 20.0, weight, labels


def weight_key(head) -> str:
    return next(k for k, v in head.named_parameters() if v is head.weight)


@pytest.mark.parametrize(("name", "params", "fused"), GRADCHECK, ids=lambda v: str(v))
@settings(max_examples=5)
@given(seed=seeds)
def test_gradcheck(name, params, fused, seed):
    head, emb, weight, labels = head_and_batch(name, seed, fused, **params)
    key = weight_key(head)

    def logits(e, w):
        return functional_call(head, {key: w}, (e, labels))

    assert torch.autograd.gradcheck(logits, (emb.requires_grad_(), weight.requires_grad_()))


@settings(max_examples=5)
@given(seed=seeds)
def test_gradcheck_adaface_weight(seed):
    # w.r.t. the class centres only: the embeddings' norms move ẑ, a constant by design
    head, emb, weight, labels = head_and_batch("adaface", seed)
    key = weight_key(head)
    grad_check = torch.autograd.gradcheck
    assert grad_check(
        lambda w: functional_call(head, {key: w}, (emb, labels)), weight.requires_grad_()
    )


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])  # norms below, in and above [l_a, u_a]
def test_gradcheck_magface_regularizer(scale):
    head, emb, _, _ = head_and_batch("magface", 0)
    assert torch.autograd.gradcheck(head.regularizer, ((emb * scale).requires_grad_(),))


#: arcface_nograd is left out: its gradient is by design not the derivative of its value
FORMULAS = ["cosine", "cosface", "arcface", "npcface", "hsm", *NEW]


@pytest.mark.parametrize("name", FORMULAS)
@settings(max_examples=5)
@given(seed=seeds)
def test_gradcheck_formula(name, seed):
    # the head's formula `logits(cos, labels, norms)` alone; the norms carry gradient only in
    # MagFace (AdaFace's are detached by design); NPCFace with m1 = 0 (m'_i = m0, see above)
    head, _, _, labels = head_and_batch(name, seed, **(COUNTS if name == "hsm" else {}))
    head.m1 = 0.0
    gen = torch.Generator().manual_seed(seed)
    cos = torch.rand(4, 5, generator=gen, dtype=torch.float64) * 1.8 - 0.9
    norms = 5 + 120 * torch.rand(4, generator=gen, dtype=torch.float64)
    if name == "magface":
        formula, inputs = (lambda c, n: head.logits(c, labels, n)), (cos, norms)
    else:
        formula, inputs = (lambda c: head.logits(c, labels, norms)), (cos,)
    assert torch.autograd.gradcheck(formula, tuple(x.requires_grad_() for x in inputs))


def grads(head, emb, weight, labels, probe):
    """d(sum(logits · probe)) / d(emb, weight) with the head's weight set to ``weight``."""
    emb = emb.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    key = weight_key(head)
    (functional_call(head, {key: w}, (emb, labels)) * probe).sum().backward()
    return emb.grad, w.grad


@pytest.mark.parametrize("fused", [True, False], ids=["default", "plain"])
@given(seed=seeds)
def test_arcface_nograd_gradient_is_the_plain_cosine_gradient(fused, seed):
    emb, weight, labels = make_batch(seed, 6, 5, 3)
    probe = torch.randn(6, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def head(name):
        h = HEADS[name](3, 5).double()
        h.fused = fused
        return h

    plain = grads(head("cosine"), emb, weight, labels, probe)
    nograd = grads(head("arcface_nograd"), emb, weight, labels, probe)
    classic = grads(head("arcface"), emb, weight, labels, probe)
    for a, b in zip(nograd, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the classic form's gradient does differ: the two are distinct baselines
    assert not torch.allclose(classic[1], plain[1], rtol=1e-6, atol=1e-9)


def unit_cosines(emb, weight):
    """Clamped cosine matrix from the definitions, for the autograd references below."""
    cos = (emb / emb.norm(dim=1, keepdim=True)) @ (weight / weight.norm(dim=1, keepdim=True)).T
    return cos.clamp(-1 + 1e-6, 1 - 1e-6)


def npcface_autograd_reference(emb, weight, labels, detach_margin):
    """NPCFace in float64 from the formula (acos form), m' optionally left differentiable."""
    m, m0, m1, t, alpha, s = 0.5, 0.4, 0.2, 1.1, 0.2, 64.0
    cos = unit_cosines(emb, weight)
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


def adaface_autograd_reference(emb, weight, labels, detach_norms):
    """AdaFace in float64 from the paper's equations (fresh statistics 20, 100, updated by the
    batch first), the norms optionally left differentiable."""
    m, h, t_alpha, s, eps = 0.4, 0.333, 0.01, 64.0, 1e-3
    cos = unit_cosines(emb, weight)
    a = emb.norm(dim=1).clamp(0.001, 100)
    if detach_norms:
        a = a.detach()
    mean = t_alpha * a.detach().mean() + (1 - t_alpha) * 20.0
    std = t_alpha * a.detach().std() + (1 - t_alpha) * 100.0
    z = (h * (a - mean) / (std + eps)).clamp(-1, 1)
    rows = torch.arange(len(labels))
    theta = (torch.acos(cos[rows, labels]) - m * z).clamp(eps, torch.pi - eps)
    out = cos.clone()
    out[rows, labels] = torch.cos(theta) - (m * z + m)
    return s * out


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


@given(seed=seeds)
def test_adaface_norms_carry_no_gradient(seed):
    emb, weight, labels = make_batch(seed, 6, 5, 3)
    emb = emb * 15  # norms 7.5 to 37.5 around the running mean: ẑ inside (−1, 1)
    probe = torch.randn(6, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    actual = grads(HEADS["adaface"](3, 5).double(), emb, weight, labels, probe)

    def reference(detach):
        e, w = emb.clone().requires_grad_(), weight.clone().requires_grad_()
        (adaface_autograd_reference(e, w, labels, detach) * probe).sum().backward()
        return e.grad, w.grad

    for a, b in zip(actual, reference(detach=True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(actual[0], reference(detach=False)[0], rtol=1e-6, atol=1e-9)


#: every head, with the options that change its code path
EVERY = [(name, params, fused) for name, params, fused in GRADCHECK] + [("adaface", {}, False)]


@pytest.mark.parametrize(("name", "params", "fused"), EVERY, ids=lambda v: str(v))
def test_second_backward_through_one_forward(name, params, fused):
    head, emb, _, labels = head_and_batch(name, 0, fused, **params)
    head.train()
    emb.requires_grad_()
    loss = head.loss(emb, labels)
    loss.backward(retain_graph=True)
    first = (emb.grad.clone(), head.weight.grad.clone())
    loss.backward()
    torch.testing.assert_close(emb.grad, 2 * first[0])
    torch.testing.assert_close(head.weight.grad, 2 * first[1])


@pytest.mark.parametrize("fused", [True, False], ids=["default", "plain"])
@pytest.mark.parametrize("name", ["unpg", *FORMULAS])
def test_interclass_filtered_entries_get_no_gradient(name, fused):
    emb, weight, labels = make_batch(7, 8, 6, 4)
    params = {"class_counts": [1] * 6} if name == "hsm" else {}
    head = HEADS[name](4, 6, interclass_filter=0.1, **params).double()
    if hasattr(head, "fused"):
        head.fused = head.fused and fused
    e, w = emb.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = functional_call(head, {weight_key(head): w}, (e, labels))
    filtered = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T > 0.1
    filtered[torch.arange(8), labels] = False
    assert filtered.any()
    for g in torch.autograd.grad(logits[:, :6][filtered].sum(), (e, w)):
        assert torch.count_nonzero(g) == 0
