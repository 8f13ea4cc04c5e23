"""Registry and make_head errors, numerical edge cases, HSM class counts, `loss`, training smoke."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mining.heads import HEADS, make_head

ALL_HEADS = list(HEADS)
COUNTED = {"hsm": {"class_counts": [2, 2, 2, 2]}}  # heads that need more than (d, C)


def test_registry_holds_the_issue_heads():
    assert set(HEADS) >= {
        "softmax",
        "cosface",
        "arcface",
        "arcface_nograd",
        "npcface",
        "hsm",
        "unpg",
        "curricularface",
        "adaface",
        "magface",
    }
    assert type(HEADS) is dict


def test_unknown_head_name_lists_valid_names():
    with pytest.raises(
        ValueError, match="unknown head 'arcfce'; valid heads: softmax, cosine, cosface"
    ):
        make_head("arcfce", 4, 3)
    assert HEADS.get("arcfce") is None


@pytest.mark.parametrize("name", ALL_HEADS)
def test_make_head_builds_the_registered_class(name):
    head = make_head(name, 3, 4, **COUNTED.get(name, {}))
    assert type(head) is HEADS[name]


@pytest.mark.parametrize("name", ALL_HEADS)
def test_unknown_parameter_names_valid_ones(name):
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) margn; valid parameters: .*"):
        make_head(name, 4, 3, margn=0.3, **COUNTED.get(name, {}))


def test_unknown_parameter_message_lists_the_keyword_parameters():
    with pytest.raises(
        ValueError,
        match=r"^arcface: unknown parameter\(s\) margn, x; valid parameters: m, s, interclass_filter$",
    ):
        make_head("arcface", 4, 3, x=1, margn=0.3)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("cosface", {"m": -0.1}, r"m must be in \[0, 2\]"),
        ("arcface", {"m": 3.5}, r"m must be in \[0, 3.14159\)"),
        ("arcface", {"s": 0}, r"s must be in \(0, inf\)"),
        ("cosine", {"interclass_filter": 1.5}, r"interclass_filter must be in \[-1, 1\]"),
        ("npcface", {"m0": 3.0, "m1": 0.2}, r"m1 must be in \[0, 0.141593\)"),
        ("npcface", {"t": "big"}, "t must be a number"),
        ("hsm", {"pseudo": "virtual"}, "pseudo must be one of 'false_class', 'virtual_class'"),
        ("hsm", {"saturation": "p"}, "saturation must be one of 'prob', 'gap'"),
        ("hsm", {"tau": 1.0}, r"tau must be in \(0, 1\)"),
        ("hsm", {"class_counts": [1, 2]}, "class_counts must have length num_classes=3"),
        ("hsm", {"class_counts": [1, -2, 3]}, "class_counts must be >= 0"),
        ("unpg", {"base": "softmax"}, "base must be one of 'cosine', 'cosface'"),
        ("unpg", {"k": -1}, r"k must be in \[0, inf\]"),
        ("unpg", {"base": "cosface", "m": 5}, r"unpg .*m must be in \[0, 2\]"),
        ("softmax", {"bias": "yes"}, "bias must be True or False"),
        ("curricularface", {"m": -1}, r"m must be in \[0, 3.14159\)"),
        ("curricularface", {"momentum": 2}, r"momentum must be in \[0, 1\]"),
        ("adaface", {"h": -0.1}, r"h must be in \[0, inf\]"),
        ("adaface", {"t_alpha": 1.5}, r"t_alpha must be in \[0, 1\]"),
        ("magface", {"u_a": 5}, r"u_a must be in \(10, inf\)"),
        ("magface", {"u_m": 0.1}, r"u_m must be in \[0.45, 3.14159\)"),
        ("magface", {"lambda_g": -1}, r"lambda_g must be in \[0, inf\)"),
        ("unpg", {"base": "magface", "l_a": 0}, r"unpg .*l_a must be in \(0, inf\)"),
    ],
)
def test_bad_parameter_values(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_head(name, 4, 3, **params)


@pytest.mark.parametrize("bad", ["dim", "num"])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="must be a positive int"):
        make_head("arcface", 0 if bad == "dim" else 4, 0 if bad == "num" else 3)


def test_bad_labels():
    head = HEADS["cosface"](4, 3)
    emb = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"labels must be \(B,\)"):
        head(emb, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        head(emb, torch.zeros(2))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        head(emb, torch.tensor([0, 3]))


@pytest.mark.parametrize("name", ALL_HEADS)
def test_weight_is_c_by_d_and_logits_shape(name):
    head = HEADS[name](5, 4, **COUNTED.get(name, {}))
    assert isinstance(head.weight, nn.Parameter) and head.weight.shape == (4, 5)
    assert any(p is head.weight for p in head.parameters())
    emb = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    logits = head(emb, torch.tensor([0, 1, 2, 3, 1]))
    assert logits.shape[0] == 5 and logits.shape[1] >= 4


def extreme_batch(dtype):
    """Embeddings equal to +W_y (cos = 1) and -W_y (cos = -1); class 0 and 1 are antipodal."""
    weight = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0, 0, 1.0]])
    emb = torch.cat([weight, -weight, 3 * weight]).to(dtype)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])
    return emb, weight.to(dtype), labels


def finite_forward_backward(name, emb, weight, labels, params=None):
    head = HEADS[name](3, 4, **{**COUNTED.get(name, {}), **(params or {})}).to(weight.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
    emb = emb.clone().requires_grad_()
    logits = head(emb, labels)
    F.cross_entropy(logits.float(), labels).backward()
    return logits, emb.grad, head.weight.grad


@pytest.mark.parametrize("name", ALL_HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("interclass_filter", [None, 0.4])
def test_no_nan_or_inf_at_cos_plus_minus_one(name, dtype, interclass_filter):
    params = {} if name == "softmax" else {"interclass_filter": interclass_filter}
    for tensor in finite_forward_backward(name, *extreme_batch(dtype), params):
        assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("name", ALL_HEADS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_no_nan_or_inf_under_cpu_autocast(name, dtype):
    with torch.autocast("cpu", dtype=dtype):
        tensors = finite_forward_backward(name, *extreme_batch(torch.float32))
    for tensor in tensors:
        assert torch.isfinite(tensor).all()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL_HEADS)
def test_no_nan_or_inf_under_cuda_fp16_autocast(name):
    emb, weight, labels = (t.cuda() for t in extreme_batch(torch.float32))
    with torch.autocast("cuda", dtype=torch.float16):
        tensors = finite_forward_backward(name, emb, weight, labels)
    for tensor in tensors:
        assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("base", ["arcface", "npcface", "hsm"])
def test_unpg_empty_negative_set_is_finite(base):
    emb, weight, _ = extreme_batch(torch.float32)
    same = torch.full((12,), 2)
    params = {"base": base, **COUNTED.get(base, {})}
    logits, *grads = finite_forward_backward("unpg", emb, weight, same, params)
    assert logits.shape[1] in (4, 5)  # no extra column (5 = HSM's virtual class)
    for tensor in (logits, *grads):
        assert torch.isfinite(tensor).all()


def test_unpg_single_sample_batch():
    logits = HEADS["unpg"](3, 4)(torch.ones(1, 3), torch.tensor([1]))
    assert logits.shape == (1, 4)


def test_hsm_counts_from_labels_equal_given_counts():
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 0, 1, 0])
    counted = HEADS["hsm"](3, 4)
    counted.count_labels(labels[:4])
    counted.count_labels(labels[4:])
    given = HEADS["hsm"](3, 4, class_counts=[5, 2, 2, 0])
    assert counted.class_counts.tolist() == [5, 2, 2, 0]
    torch.testing.assert_close(counted.class_margins(), given.class_margins())
    # LDAM rule: the rarest seen classes get m_max, class 0 gets m_max · (2 / 5)^(1/4)
    expected = torch.tensor([0.5 * (2 / 5) ** 0.25, 0.5, 0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(given.class_margins(), expected)


def test_hsm_without_counts_raises_and_counts_survive_state_dict():
    head = HEADS["hsm"](3, 4)
    emb, labels = torch.randn(2, 3), torch.tensor([0, 3])
    with pytest.raises(ValueError, match="class counts of every batch label"):
        head(emb, labels)
    head.set_class_counts(torch.tensor([4, 1, 1, 9]))
    restored = HEADS["hsm"](3, 4)
    restored.load_state_dict(head.state_dict())
    assert torch.equal(restored(emb, labels), head(emb, labels))


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("softmax", {}),
        ("cosine", {}),
        ("cosface", {}),
        ("arcface", {}),
        ("arcface_nograd", {}),
        ("npcface", {}),
        ("hsm", {"pseudo": "false_class"}),
        ("hsm", {"pseudo": "virtual_class", "saturation": "gap"}),
        ("unpg", {"base": "arcface"}),
        ("unpg", {"base": "hsm"}),
        ("cosface", {"interclass_filter": 0.4}),
        ("curricularface", {}),
        ("adaface", {}),
        ("magface", {}),
        ("unpg", {"base": "magface"}),
        ("unpg", {"base": "adaface"}),
    ],
)
def test_training_smoke_loss_decreases(name, params):
    gen = torch.Generator().manual_seed(0)
    classes, dim_in, dim_emb = 8, 16, 8
    centres = torch.randn(classes, dim_in, generator=gen) * 2
    labels = torch.arange(classes).repeat_interleave(16)
    x = centres[labels] + torch.randn(len(labels), dim_in, generator=gen)
    model = nn.Linear(dim_in, dim_emb)
    head = HEADS[name](dim_emb, classes, **params)
    if hasattr(head, "count_labels"):  # as the harness does: HSM, alone or under UNPG
        head.count_labels(labels)
    with torch.no_grad():  # deterministic init from the test's generator, not the global RNG
        for p in (*model.parameters(), head.weight):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.05, momentum=0.9)
    losses = []
    for step in range(30):
        batch = torch.randperm(len(labels), generator=gen)[:64] if step else torch.arange(64)
        loss = head.loss(model(x[batch]), labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses


@pytest.mark.parametrize("name", ALL_HEADS)
def test_inference_mode_gives_the_no_grad_logits(name):
    # the fused op takes the margin's slope from autograd, which inference mode forbids
    gen = torch.Generator().manual_seed(0)
    head = HEADS[name](3, 4, **COUNTED.get(name, {})).eval()  # eval: no state update
    emb, labels = torch.randn(6, 3, generator=gen), torch.tensor([0, 0, 1, 1, 2, 3])
    with torch.no_grad():
        expected = head(emb, labels)
    with torch.inference_mode():
        actual = head(emb, labels)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_unpg_exposes_count_labels_only_over_hsm():
    assert not hasattr(HEADS["unpg"](3, 4, base="arcface"), "count_labels")
    head = HEADS["unpg"](3, 4, base="hsm")
    head.count_labels(torch.tensor([0, 1, 1, 3]))
    assert head.base.class_counts.tolist() == [1, 2, 0, 1]


@pytest.mark.parametrize("name", ALL_HEADS)
def test_loss_is_the_cross_entropy_of_the_logits(name):
    # MagFace adds its regulariser: norms inside [l_a, u_a] make it non-zero
    gen = torch.Generator().manual_seed(0)
    head = HEADS[name](3, 4, **COUNTED.get(name, {})).eval()
    emb, labels = 30 * torch.randn(6, 3, generator=gen), torch.tensor([0, 0, 1, 1, 2, 3])
    extra = head.regularizer(emb) if name == "magface" else 0.0
    assert float(extra) > 0 or name != "magface"
    expected = F.cross_entropy(head(emb, labels), labels) + extra
    torch.testing.assert_close(head.loss(emb, labels), expected, rtol=1e-6, atol=0)


def test_unpg_loss_adds_the_base_regulariser():
    gen = torch.Generator().manual_seed(0)
    head = HEADS["unpg"](3, 4, base="magface")
    emb, labels = 30 * torch.randn(6, 3, generator=gen), torch.tensor([0, 0, 1, 1, 2, 3])
    expected = F.cross_entropy(head(emb, labels), labels) + head.base.regularizer(emb)
    torch.testing.assert_close(head.loss(emb, labels), expected)


@pytest.mark.parametrize("name", ["curricularface", "adaface"])
def test_state_is_a_buffer_that_follows_the_module(name):
    head = HEADS[name](3, 4)
    head(torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0]))
    restored = HEADS[name](3, 4)
    restored.load_state_dict(head.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(head.buffers(), restored.buffers(), strict=True))
    assert {b.dtype for b in head.double().buffers()} == {torch.float64}


@pytest.mark.parametrize(
    "base", ["cosface", "arcface", "npcface", "hsm", "curricularface", "adaface", "magface"]
)
@pytest.mark.parametrize("one_identity", [False, True])
def test_unpg_loss_equals_cross_entropy_of_its_logits(base, one_identity):
    """`loss` never builds the (B, C' + K) logits; value and gradients (embeddings, class
    centres) equal the cross-entropy of `forward`'s logits in float64, also with K = 0."""
    import copy

    gen = torch.Generator().manual_seed(3)
    labels = torch.full((12,), 2) if one_identity else torch.randint(0, 4, (12,), generator=gen)
    head = HEADS["unpg"](5, 4, base=base, s=16.0, **COUNTED.get(base, {})).double()
    twin = copy.deepcopy(head)  # curricularface / adaface update buffers in forward
    emb = torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    emb2 = emb.detach().clone().requires_grad_(True)
    fast = head.loss(emb, labels)
    slow = F.cross_entropy(twin(emb2, labels), labels) + twin.base.regularizer(emb2)
    fast.backward()
    slow.backward()
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(emb.grad, emb2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, twin.weight.grad, rtol=1e-10, atol=1e-12)
