"""CrossBatchMemory: exact FIFO against a plain-list reference, ages, state, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mining.memory import CrossBatchMemory


def _reference(batches: list[tuple[torch.Tensor, torch.Tensor]], size: int):
    """Plain-list FIFO: every row with the index of the enqueue that wrote it; keep the last size."""
    rows = [
        (e, int(y), step)
        for step, (emb, lab) in enumerate(batches)
        for e, y in zip(emb, lab, strict=True)
    ]
    return rows[len(rows) - min(size, len(rows)) :]


@given(
    seed=st.integers(0, 2**31 - 1),
    size=st.integers(1, 12),
    batch_sizes=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_contents_are_the_last_size_items_in_order(seed, size, batch_sizes, dtype):
    gen = torch.Generator().manual_seed(seed)
    dim = 3
    mem = CrossBatchMemory(size, dim, dtype=dtype)
    batches = []
    for b in batch_sizes:
        emb = torch.randn(b, dim, generator=gen, dtype=dtype)
        lab = torch.randint(0, 5, (b,), generator=gen)
        batches.append((emb, lab))
        mem.enqueue(emb, lab)
    ref = _reference(batches, size)
    emb, lab, ages = mem.get()
    assert len(mem) == len(ref) == emb.shape[0]
    assert mem.step == len(batches)
    for i, (e, y, step) in enumerate(ref):
        assert torch.equal(emb[i], e)
        assert int(lab[i]) == y
        assert int(ages[i]) == len(batches) - 1 - step
    # Storage order holds the same rows (mining does not care about order).
    emb_u, lab_u, ages_u = mem.get(ordered=False)
    key = lambda e, y, a: sorted(zip(e.tolist(), y.tolist(), a.tolist(), strict=True))  # noqa: E731
    assert key(emb_u, lab_u, ages_u) == key(emb, lab, ages)


def test_fullness_is_a_counter_not_a_label():
    mem = CrossBatchMemory(4, 2)
    # Labels that a sentinel scheme would confuse with "empty" (0, -1) still count as stored.
    mem.enqueue(torch.ones(3, 2), torch.tensor([0, -1, 0]))
    assert len(mem) == 3 and not mem.is_full()
    assert mem.get()[1].tolist() == [0, -1, 0]


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
        mem.enqueue(torch.full((2, 2), float(i)), torch.tensor([i, i]))
    other = CrossBatchMemory(3, 2)
    other.load_state_dict(mem.state_dict())
    for a, b in zip(mem.get(), other.get(), strict=True):
        assert torch.equal(a, b)
    assert other.step == mem.step and len(other) == len(mem)
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
    ("args", "kwargs", "match"),
    [((0, 2), {}, "size"), ((2, 0), {}, "dim"), ((2, 2), {"dtype": torch.int64}, "dtype")],
)
def test_constructor_rejects_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossBatchMemory(*args, **kwargs)


@pytest.mark.gpu
def test_memory_on_cuda():
    mem = CrossBatchMemory(4, 2, dtype=torch.float16, device="cuda")
    mem.enqueue(torch.randn(6, 2), torch.arange(6))
    emb, lab, ages = mem.get()
    assert emb.is_cuda and lab.tolist() == [2, 3, 4, 5] and ages.tolist() == [0, 0, 0, 0]
