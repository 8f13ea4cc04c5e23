"""CrossBatchMemory: exact FIFO against a plain-list reference, ages, domains, state, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mining.memory import CrossBatchMemory


def _reference(batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], size: int):
    """Plain-list FIFO: every row with its domain (-1 when enqueued without) and the index of the
    enqueue that wrote it; keep the last size."""
    rows = [
        (e, int(y), -1 if dom is None else int(dom[i]), step)
        for step, (emb, lab, dom) in enumerate(batches)
        for i, (e, y) in enumerate(zip(emb, lab, strict=True))
    ]
    return rows[len(rows) - min(size, len(rows)) :]


@given(
    seed=st.integers(0, 2**31 - 1),
    size=st.integers(1, 12),
    batch_sizes=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    domain_dtype=st.sampled_from([torch.int8, torch.int64]),
)
def test_contents_are_the_last_size_items_in_order(seed, size, batch_sizes, dtype, domain_dtype):
    gen = torch.Generator().manual_seed(seed)
    dim = 3
    mem = CrossBatchMemory(size, dim, dtype=dtype)
    batches = []
    for b in batch_sizes:
        emb = torch.randn(b, dim, generator=gen, dtype=dtype)
        lab = torch.randint(0, 5, (b,), generator=gen)
        # Some enqueues carry domains (including an explicit -1), others none.
        with_domains = bool(torch.randint(0, 2, (), generator=gen))
        dom = torch.randint(-1, 2, (b,), generator=gen).to(domain_dtype) if with_domains else None
        batches.append((emb, lab, dom))
        mem.enqueue(emb, lab, dom)
    ref = _reference(batches, size)
    emb, lab, ages = mem.get()
    dom = mem.get_domains()
    assert len(mem) == len(ref) == emb.shape[0] == dom.shape[0]
    assert mem.step == len(batches) and dom.dtype == torch.int8
    for i, (e, y, d, step) in enumerate(ref):
        assert torch.equal(emb[i], e)
        assert int(lab[i]) == y
        assert int(dom[i]) == d
        assert int(ages[i]) == len(batches) - 1 - step
    # Storage order holds the same rows (mining does not care about order), domains aligned.
    emb_u, lab_u, ages_u = mem.get(ordered=False)
    dom_u = mem.get_domains(ordered=False)
    key = lambda e, y, a, d: sorted(  # noqa: E731
        zip(e.tolist(), y.tolist(), a.tolist(), d.tolist(), strict=True)
    )
    assert key(emb_u, lab_u, ages_u, dom_u) == key(emb, lab, ages, dom)


def test_fullness_is_a_counter_not_a_label():
    mem = CrossBatchMemory(4, 2)
    # Labels that a sentinel scheme would confuse with "empty" (0, -1) still count as stored.
    mem.enqueue(torch.ones(3, 2), torch.tensor([0, -1, 0]))
    assert len(mem) == 3 and not mem.is_full()
    assert mem.get()[1].tolist() == [0, -1, 0]
    assert mem.get_domains().tolist() == [-1, -1, -1]  # enqueued without domains: unknown


def test_enqueue_detaches_and_casts_to_fp16():
    mem = CrossBatchMemory(5, 2, dtype=torch.float16)
    x = torch.randn(2, 2, requires_grad=True)
    mem.enqueue(x * 2, torch.tensor([1, 2]))
    emb, _, _ = mem.get()
    assert emb.dtype == torch.float16 and not emb.requires_grad
    assert torch.allclose(emb.float(), (x * 2).detach(), atol=1e-2)


def test_state_dict_roundtrip_and_reset():
    mem = CrossBatchMemory(3, 2)
    for i in range(4):
        mem.enqueue(torch.full((2, 2), float(i)), torch.tensor([i, i]), torch.tensor([0, 1]))
    other = CrossBatchMemory(3, 2)
    other.load_state_dict(mem.state_dict())
    for a, b in zip(mem.get(), other.get(), strict=True):
        assert torch.equal(a, b)
    assert other.get_domains().tolist() == mem.get_domains().tolist() == [1, 0, 1]
    assert other.step == mem.step and len(other) == len(mem)
    # A state saved before domains were stored loads with every domain unknown.
    old_state = {k: v for k, v in mem.state_dict().items() if k != "domains"}
    other.load_state_dict(old_state)
    assert other.get_domains().tolist() == [-1, -1, -1]
    assert torch.equal(other.get()[0], mem.get()[0])
    mem.reset()
    assert len(mem) == 0 and mem.step == 0 and mem.get()[0].shape == (0, 2)
    with pytest.raises(ValueError, match="size=3"):
        CrossBatchMemory(4, 2).load_state_dict(other.state_dict())


def test_to_moves_and_casts():
    mem = CrossBatchMemory(3, 2).to(dtype=torch.float64)
    mem.enqueue(torch.ones(1, 2), torch.tensor([7]))
    assert mem.get()[0].dtype == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        mem.to(dtype=torch.int32)


@pytest.mark.parametrize(
    ("emb", "labels", "match"),
    [
        (torch.ones(2, 3), torch.tensor([1, 2]), r"shape \(B, 2\)"),
        (torch.ones(2), torch.tensor([1, 2]), r"shape \(B, 2\)"),
        (torch.ones(2, 2, dtype=torch.int64), torch.tensor([1, 2]), "floating"),
        (torch.ones(2, 2), torch.tensor([1, 2, 3]), r"labels must have shape \(2,\)"),
        (torch.ones(2, 2), torch.tensor([1.0, 2.0]), "integer"),
    ],
)
def test_enqueue_rejects_bad_inputs(emb, labels, match):
    with pytest.raises(ValueError, match=match):
        CrossBatchMemory(4, 2).enqueue(emb, labels)


@pytest.mark.parametrize(
    ("domains", "match"),
    [
        (torch.tensor([0, 1, 1]), r"domains must have shape \(2,\)"),
        (torch.tensor([0.0, 1.0]), "domains must be an integer"),
        (torch.tensor([True, False]), "domains must be an integer"),
        (torch.tensor([0, -2]), r"domains must lie in \[-1, 127\]"),
        (torch.tensor([128, 0]), r"domains must lie in \[-1, 127\]"),
    ],
)
def test_enqueue_rejects_bad_domains(domains, match):
    mem = CrossBatchMemory(4, 2)
    with pytest.raises(ValueError, match=match):
        mem.enqueue(torch.ones(2, 2), torch.tensor([1, 2]), domains)
    assert len(mem) == 0 and mem.step == 0  # nothing written


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [((0, 2), {}, "size"), ((2, 0), {}, "dim"), ((2, 2), {"dtype": torch.int64}, "dtype")],
)
def test_constructor_rejects_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossBatchMemory(*args, **kwargs)


@pytest.mark.gpu
def test_memory_on_cuda():
    mem = CrossBatchMemory(4, 2, dtype=torch.float16, device="cuda")
    mem.enqueue(torch.randn(6, 2), torch.arange(6), torch.tensor([0, 1] * 3))
    emb, lab, ages = mem.get()
    assert emb.is_cuda and lab.tolist() == [2, 3, 4, 5] and ages.tolist() == [0, 0, 0, 0]
    assert mem.get_domains().is_cuda and mem.get_domains().tolist() == [0, 1, 0, 1]
