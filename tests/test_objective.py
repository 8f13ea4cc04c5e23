"""MetricObjective (CB-HEM) against a plain-loop float64 autograd reference, plus its properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mining.objective import MetricObjective


def _ivs_batch(gen, pairs, d, dtype=torch.float64, offset=0):
    """P identities × 2 rows (ID photo first, then spot), labels offset + 0..P-1."""
    x = torch.randn(2 * pairs, d, generator=gen, dtype=dtype)
    y = torch.arange(pairs).repeat_interleave(2) + offset
    return x, y


def _reference_batch_hard(x, y, mem, mem_y, *, margin, weight, reduction, in_batch):
    """Batch-hard cosine triplet over batch ∪ memory, in plain loops; autograd gives the grad.

    Negative ties prefer the batch row (it carries a gradient), as documented in the objective.
    """
    f = F.normalize(x, dim=1)
    terms = []
    for i in range(len(y)):
        pos = [f[i] @ f[j] for j in range(len(y)) if j != i and y[j] == y[i]]
        negs = [(f[i] @ f[j], 1.0) for j in range(len(y)) if in_batch and y[j] != y[i]]
        negs += [(f[i] @ mem[j], weight) for j in range(len(mem_y)) if mem_y[j] != y[i]]
        if not pos or not negs:
            continue
        s_ap = min(pos, key=lambda t: float(t.detach()))
        # max keeps the first (batch) candidate on ties
        s_an, w = max(negs, key=lambda t: float(t[0].detach()))
        terms.append((torch.relu(s_an - s_ap + margin), w))
    active = [t for t in terms if float(t[0].detach()) > 0]
    count = len(terms) if reduction == "mean_all" else len(active)
    if count == 0:
        return x.sum() * 0.0
    return sum(t * w for t, w in terms) / count


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


@given(
    seed=st.integers(0, 2**31 - 1),
    history=st.integers(0, 4),
    memory_size=st.integers(1, 20),
    weight=st.sampled_from([0.0, 0.5, 1.0]),
    reduction=st.sampled_from(["mean_nonzero", "mean_all"]),
    in_batch=st.booleans(),
    enqueue=st.sampled_from(["before", "after"]),
)
def test_batch_hard_triplet_matches_reference(
    seed, history, memory_size, weight, reduction, in_batch, enqueue
):
    gen = torch.Generator().manual_seed(seed)
    obj = MetricObjective(
        "batch_hard",
        "triplet",
        margin=0.3,
        memory_size=memory_size,
        memory_weight=weight,
        reduction=reduction,
        in_batch=in_batch,
        enqueue=enqueue,
        memory_dtype=torch.float64,
        chunk=3,
    )
    for step in range(history):  # labels collide across steps: memory holds positives too
        x, y = _ivs_batch(gen, 3, 4, offset=step)
        obj.before_loss(x, y)
        obj.after_loss(x, y)
    x, y = _ivs_batch(gen, 4, 4)
    obj.before_loss(x, y)
    if obj.memory_active():
        mem, mem_y, ages = obj.memory.get()
        if enqueue == "before":  # this batch's own (stale) copies are never mined
            mem, mem_y = mem[ages > 0], mem_y[ages > 0]
    else:
        mem, mem_y = x.new_zeros(0, 4), y[:0]
    loss, grad = _grad(lambda t: obj(t, y), x)
    ref_loss, ref_grad = _grad(
        lambda t: _reference_batch_hard(
            t,
            y,
            mem,
            mem_y,
            margin=0.3,
            weight=weight,
            reduction=reduction,
            in_batch=in_batch or mem.shape[0] == 0,  # in-batch while nothing is minable
        ),
        x,
    )
    assert torch.allclose(loss, ref_loss, atol=1e-12)
    assert torch.allclose(grad, ref_grad, atol=1e-12)
    stats = obj.last_stats
    assert math.isclose(stats["loss_batch"] + weight * stats["loss_mem"], float(loss), abs_tol=1e-9)


def _ivs_domains_loop(y):
    """Order rule in plain loops: the first row of an identity is its ID photo (0), later rows
    spot photos (1)."""
    return [0 if int(y[i]) not in y[:i].tolist() else 1 for i in range(len(y))]


def _reference_bidirectional(
    x, y, mem, mem_y, mem_dom, *, loss, margin, weight, reduction, in_batch
):
    """Bidirectional triplet / MPS over batch ∪ memory, in plain loops: an anchor's negatives are
    rows of the other domain (memory rows of unknown domain -1 too); MPS keeps per positive pair
    the larger of its two terms. Negative ties prefer the batch row."""
    f = F.normalize(x, dim=1)
    dom = _ivs_domains_loop(y)
    value = lambda t: float(t.detach())  # noqa: E731
    best = {}  # positive pair -> (term, weight) of its kept term(s)
    terms = []
    for i in range(len(y)):
        pos = [(f[i] @ f[j], j) for j in range(len(y)) if j != i and y[j] == y[i]]
        negs = [
            (f[i] @ f[j], 1.0)
            for j in range(len(y))
            if in_batch and y[j] != y[i] and dom[j] != dom[i]
        ]
        negs += [
            (f[i] @ mem[j], weight)
            for j in range(len(mem_y))
            if mem_y[j] != y[i] and mem_dom[j] in (-1, 1 - dom[i])
        ]
        if not pos or not negs:
            continue
        s_ap, p = min(pos, key=lambda t: value(t[0]))
        s_an, w = max(negs, key=lambda t: value(t[0]))
        term = (torch.relu(s_an - s_ap + margin), w)
        if loss == "triplet":
            terms.append(term)
        else:
            key = (min(i, p), max(i, p))
            if key not in best or value(term[0]) > value(best[key][0]):
                best[key] = term
    terms += best.values()
    count = len(terms) if reduction == "mean_all" else sum(value(t) > 0 for t, _ in terms)
    if count == 0:
        return x.sum() * 0.0
    return sum(t * w for t, w in terms) / count


@given(
    seed=st.integers(0, 2**31 - 1),
    history=st.integers(0, 4),
    memory_size=st.integers(1, 20),
    loss=st.sampled_from(["triplet", "mps"]),
    weight=st.sampled_from([0.0, 0.5, 1.0]),
    reduction=st.sampled_from(["mean_nonzero", "mean_all"]),
    in_batch=st.booleans(),
    enqueue=st.sampled_from(["before", "after"]),
)
def test_bidirectional_with_memory_mines_only_the_other_domain(
    seed, history, memory_size, loss, weight, reduction, in_batch, enqueue
):
    gen = torch.Generator().manual_seed(seed)
    obj = MetricObjective(
        "bidirectional",
        loss,
        margin=0.3,
        memory_size=memory_size,
        memory_weight=weight,
        reduction=reduction,
        in_batch=in_batch,
        enqueue=enqueue,
        memory_dtype=torch.float64,
        chunk=3,
    )
    enqueued = []  # domain of every row written to the memory, by the loop rule
    for step in range(history):
        x, y = _ivs_batch(gen, 3, 4, offset=step)
        perm = torch.randperm(6, generator=gen)  # which row of a pair comes first varies
        x, y = x[perm], y[perm]
        obj.before_loss(x, y)
        obj.after_loss(x, y)
        enqueued += _ivs_domains_loop(y)
    x, y = _ivs_batch(gen, 4, 4)
    obj.before_loss(x, y)
    if enqueue == "before":
        enqueued += _ivs_domains_loop(y)
    if obj.memory_active():
        mem, mem_y, ages = obj.memory.get()
        mem_dom = obj.memory.get_domains().tolist()
        assert mem_dom == enqueued[len(enqueued) - len(mem_dom) :]
        if enqueue == "before":  # this batch's own (stale) copies are never mined
            keep = ages > 0
            mem, mem_y = mem[keep], mem_y[keep]
            mem_dom = [d for d, k in zip(mem_dom, keep.tolist(), strict=True) if k]
    else:
        mem, mem_y, mem_dom = x.new_zeros(0, 4), y[:0], []
    loss_value, grad = _grad(lambda t: obj(t, y), x)
    ref_loss, ref_grad = _grad(
        lambda t: _reference_bidirectional(
            t,
            y,
            mem,
            mem_y,
            mem_dom,
            loss=loss,
            margin=0.3,
            weight=weight,
            reduction=reduction,
            in_batch=in_batch or mem.shape[0] == 0,  # in-batch while nothing is minable
        ),
        x,
    )
    assert torch.allclose(loss_value, ref_loss, atol=1e-12)
    assert torch.allclose(grad, ref_grad, atol=1e-12)


def test_bidirectional_skips_a_same_domain_look_alike_in_memory():
    """The IvS collapse case: an ID anchor's most similar memory row is another identity's ID
    photo; it must mine that identity's (less similar) spot photo instead."""
    e = torch.eye(3, dtype=torch.float64)
    obj = MetricObjective(
        "bidirectional", memory_size=4, in_batch=False, reduction="mean_all", memory_dtype=e.dtype
    )
    id_9, spot_9 = e[0] + 0.1 * e[1], e[0] + e[1]  # identity 9 in memory: ID photo, spot photo
    obj.after_loss(torch.stack([id_9, spot_9]), torch.tensor([9, 9]))
    assert obj.memory.get_domains().tolist() == [0, 1]
    x = torch.stack([e[0], e[0] + 0.5 * e[2]])  # identity 1: ID photo, spot photo
    id_1, spot_1 = F.normalize(x, dim=1)
    id_9, spot_9 = F.normalize(id_9, dim=0), F.normalize(spot_9, dim=0)
    assert id_1 @ id_9 > id_1 @ spot_9  # the same-domain look-alike is the nearer one
    loss = obj(x, torch.tensor([1, 1]))
    expected = (
        torch.relu(id_1 @ spot_9 - id_1 @ spot_1 + 0.2)
        + torch.relu(spot_1 @ id_9 - id_1 @ spot_1 + 0.2)
    ) / 2
    assert math.isclose(float(loss), float(expected), abs_tol=1e-12)
    assert obj.last_stats["memory_share"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "miner", ["batch_hard", "semi_hard", "top_k", "threshold", "bidirectional"]
)
def test_memory_of_one_batch_without_history_reduces_to_in_batch(dtype, miner):
    gen = torch.Generator().manual_seed(0)
    x, y = _ivs_batch(gen, 8, 6, dtype=dtype)
    k = 3 if miner == "top_k" else 1
    plain = MetricObjective(miner, "triplet", margin=0.5, k=k)
    cbhem = MetricObjective(
        miner, "triplet", margin=0.5, k=k, memory_size=16, enqueue="before", memory_dtype=dtype
    )
    cbhem.before_loss(x, y)  # memory = stale copies of this very batch
    ref = _grad(lambda t: plain(t, y), x)
    got = _grad(lambda t: cbhem(t, y), x)
    assert float(ref[0]) > 0
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert cbhem.last_stats["memory_share"] == 0.0 and math.isnan(cbhem.last_stats["neg_age"])


@given(seed=st.integers(0, 2**31 - 1), miner=st.sampled_from(["batch_hard", "top_k", "threshold"]))
def test_permuting_the_batch_permutes_loss_and_gradient(seed, miner):
    gen = torch.Generator().manual_seed(seed)
    obj = MetricObjective(
        miner, "triplet", memory_size=10, k=2 if miner == "top_k" else 1, memory_dtype=torch.float64
    )
    hx, hy = _ivs_batch(gen, 5, 4, offset=3)
    obj.after_loss(hx, hy)
    x, y = _ivs_batch(gen, 5, 4)
    perm = torch.randperm(10, generator=gen)
    loss, grad = _grad(lambda t: obj(t, y), x)
    ploss, pgrad = _grad(lambda t: obj(t, y[perm]), x[perm])
    assert torch.allclose(loss, ploss, atol=1e-12)
    assert torch.allclose(grad[perm], pgrad, atol=1e-12)


@pytest.mark.parametrize("loss", ["triplet", "triplet_l2", "quadruplet", "mps"])
@pytest.mark.parametrize("labels", [torch.arange(6), torch.zeros(6, dtype=torch.long)])
def test_no_positives_or_no_negatives_give_zero_loss_not_nan(loss, labels):
    obj = MetricObjective("batch_hard", loss, reduction="mean_nonzero", memory_size=4)
    obj.after_loss(torch.randn(4, 3), labels[:4])  # memory of the same labels: still nothing
    x = torch.randn(6, 3, requires_grad=True)
    out = obj(x, labels)
    out.backward()
    assert float(out.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    assert obj.last_stats["num_terms"] == 0 and math.isnan(obj.last_stats["neg_age"])


def test_warmup_purity_and_stats():
    gen = torch.Generator().manual_seed(1)
    obj = MetricObjective(
        "batch_hard",
        memory_size=12,
        warmup_steps=2,
        in_batch=False,
        margin=1.5,
        memory_dtype=torch.float64,
    )
    for step in range(3):
        x, y = _ivs_batch(gen, 3, 4, offset=10 * (step + 1))
        obj.before_loss(x, y)
        first, second = obj(x, y), obj(x, y)
        assert torch.equal(first, second)  # pure: the call changes no state
        assert obj.last_stats["memory_share"] == (0.0 if step < 2 else 1.0)
        obj.after_loss(x, y)
    # Step 2 mined from the 12 rows written at steps 0 and 1 (ages 1 and 0); margin 1.5 makes
    # every term active.
    assert obj.last_stats["active_frac"] == 1.0
    assert 0.0 <= obj.last_stats["neg_age"] <= 1.0 and len(obj.memory) == 12


def test_mps_with_bidirectional_matches_docface_formula():
    gen = torch.Generator().manual_seed(2)
    x, y = _ivs_batch(gen, 6, 5)
    obj = MetricObjective("bidirectional", "mps", margin=0.4, reduction="mean_all")
    loss, grad = _grad(lambda t: obj(t, y), x)

    def docface(t):
        f = F.normalize(t, dim=1)
        s = f[0::2] @ f[1::2].T  # ID × spot scores
        n = s.shape[0]
        per_pair = []
        value = lambda t: float(t.detach())  # noqa: E731
        for i in range(n):
            h = max(
                max((s[i, j] for j in range(n) if j != i), key=value),
                max((s[j, i] for j in range(n) if j != i), key=value),
                key=value,
            )
            per_pair.append(torch.relu(0.4 + h - s[i, i]))
        return sum(per_pair) / n

    ref_loss, ref_grad = _grad(docface, x)
    assert torch.allclose(loss, ref_loss, atol=1e-12) and torch.allclose(grad, ref_grad, atol=1e-12)


def test_quadruplet_second_negative_matches_brute_force():
    gen = torch.Generator().manual_seed(3)
    x, y = _ivs_batch(gen, 5, 4)
    obj = MetricObjective("batch_hard", "quadruplet", alpha1=0.6, alpha2=0.3, reduction="mean_all")
    loss = obj(x, y)
    f = F.normalize(x, dim=1)
    d2 = lambda u, v: float(((u - v) ** 2).sum())  # noqa: E731
    terms = []
    for a in range(10):
        p = min((j for j in range(10) if j != a and y[j] == y[a]), key=lambda j: float(f[a] @ f[j]))
        n1 = max((j for j in range(10) if y[j] != y[a]), key=lambda j: float(f[a] @ f[j]))
        n2 = max(
            (j for j in range(10) if y[j] not in (y[a], y[n1])), key=lambda j: float(f[n1] @ f[j])
        )
        terms.append(
            max(d2(f[a], f[p]) - d2(f[a], f[n1]) + 0.6, 0)
            + max(d2(f[a], f[p]) - d2(f[n1], f[n2]) + 0.3, 0)
        )
    assert math.isclose(float(loss), sum(terms) / 10, abs_tol=1e-12)


def test_state_dict_roundtrip():
    obj = MetricObjective(memory_size=5)
    obj.after_loss(torch.randn(4, 3), torch.tensor([3, 5, 3, 5]))
    other = MetricObjective(memory_size=5)
    other.load_state_dict(obj.state_dict())
    assert other.step == 1 and torch.equal(other.memory.get()[0], obj.memory.get()[0])
    assert other.memory.get_domains().tolist() == [0, 0, 1, 1]  # first occurrence = ID photo


def _simulated_ranks(obj, x, y, bounds):
    """``local_loss`` on each rank's rows ``bounds = [(lo, hi), ...]`` of one process: a first
    pass records every rank's sums, a second hands each rank their total (what the
    all-reduce of ``sum_ranks`` gives). Returns [(L_r, dL_r/dx (N, d), last_stats)]."""
    local = []

    def record(t):
        local.append(t)
        return t

    for lo, hi in bounds:
        obj.local_loss(x, y, slice(lo, hi), record)
    total = torch.stack(local).sum(dim=0)
    shares = []
    for lo, hi in bounds:
        leaf = x.clone().requires_grad_(True)
        share = obj.local_loss(leaf, y, slice(lo, hi), lambda t: total)
        share.backward()
        assert leaf.grad is not None  # a rank without terms still reaches the gathered rows
        shares.append((share.detach(), leaf.grad, dict(obj.last_stats)))
    return shares


def _assert_stats_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert math.isclose(got[key], value, rel_tol=1e-12, abs_tol=1e-12), key


MEMORY_SETUPS = {
    "none": {},
    "warm-up": {"memory_size": 12, "warmup_steps": 5},
    "after": {"memory_size": 12, "enqueue": "after"},
    "before, memory only": {
        "memory_size": 9,
        "enqueue": "before",
        "in_batch": False,
        "memory_weight": 0.5,
    },
}


@given(
    seed=st.integers(0, 2**31 - 1),
    miner=st.sampled_from(
        ["batch_hard", "top_k", "semi_hard", "threshold", "random", "bidirectional"]
    ),
    loss=st.sampled_from(["triplet", "triplet_l2", "quadruplet", "mps"]),
    memory=st.sampled_from(sorted(MEMORY_SETUPS)),
    reduction=st.sampled_from(["mean_nonzero", "mean_all"]),
    pairs=st.integers(1, 6),
    random_labels=st.booleans(),
    data=st.data(),
)
def test_rank_shares_sum_to_the_loss_with_global_stats(
    seed, miner, loss, memory, reduction, pairs, random_labels, data
):
    """Σ_r L_r = L and Σ_r dL_r/dx = dL/dx for ranks owning consecutive rows (any cut, empty
    shares included; whole identities for mps), and every rank's last_stats = the global ones."""
    gen = torch.Generator().manual_seed(seed)
    obj = MetricObjective(
        miner, loss, margin=0.3, k=3 if miner in ("top_k", "random") else 1,
        reduction=reduction, memory_dtype=torch.float64, chunk=3, seed=seed % 7,
        **MEMORY_SETUPS[memory],
    )  # fmt: skip
    for step in range(2):
        hx, hy = _ivs_batch(gen, 3, 4, offset=step)
        obj.before_loss(hx, hy)
        obj.after_loss(hx, hy)
    x, y = _ivs_batch(gen, pairs, 4)
    if random_labels and loss != "mps":  # identities straddle the ranks
        y = torch.randint(0, 4, y.shape, generator=gen)
    n = y.shape[0]
    step = 2 if loss == "mps" else 1  # mps: every rank holds whole identities
    cuts = sorted(data.draw(st.lists(st.integers(0, n // step), min_size=1, max_size=2)))
    bounds = list(zip([0, *(c * step for c in cuts)], [*(c * step for c in cuts), n], strict=True))
    obj.before_loss(x, y)
    ref_loss, ref_grad = _grad(lambda t: obj(t, y), x)
    ref_stats = dict(obj.last_stats)
    shares = _simulated_ranks(obj, x, y, bounds)
    torch.testing.assert_close(sum(s for s, _, _ in shares), ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(g for _, g, _ in shares), ref_grad, rtol=1e-12, atol=1e-12)
    for _, _, stats in shares:
        _assert_stats_equal(stats, ref_stats)


def test_local_loss_over_every_row_is_the_loss():
    gen = torch.Generator().manual_seed(5)
    x, y = _ivs_batch(gen, 5, 4)
    obj = MetricObjective("top_k", "quadruplet", k=2, memory_size=6, memory_dtype=torch.float64)
    obj.after_loss(*_ivs_batch(gen, 3, 4, offset=2))
    loss, grad = _grad(lambda t: obj(t, y), x)
    stats = dict(obj.last_stats)
    share, share_grad = _grad(lambda t: obj.local_loss(t, y, slice(0, 10), lambda s: s), x)
    assert torch.equal(share, loss) and torch.equal(share_grad, grad)
    assert obj.last_stats == stats


def test_mps_with_an_identity_split_between_ranks_is_an_error():
    gen = torch.Generator().manual_seed(6)
    x, y = _ivs_batch(gen, 3, 4)
    obj = MetricObjective("bidirectional", "mps")
    obj.local_loss(x, y, slice(0, 2), lambda t: t)  # whole identities: fine
    with pytest.raises(ValueError, match="whole identities"):
        obj.local_loss(x, y, slice(0, 3), lambda t: t)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"miner": "hardest"}, "miner must be one of"),
        ({"loss": "contrastive"}, "loss must be one of"),
        ({"enqueue": "during"}, "enqueue must be one of"),
        ({"reduction": "sum"}, "reduction must be one of"),
        ({"memory_size": -1}, "memory_size must be"),
        ({"warmup_steps": 1.5}, "warmup_steps must be"),
        ({"memory_weight": -0.1}, "memory_weight must be"),
        ({"k": 3}, "k=3 needs miner"),
        ({"chunk": 0}, "chunk must be"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetricObjective(**kwargs)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="emb must be"):
        MetricObjective()(torch.randn(4, 3), torch.arange(3))


@pytest.mark.gpu
def test_cuda_fp16_memory_matches_cpu():
    gen = torch.Generator().manual_seed(4)
    hist, hy = _ivs_batch(gen, 16, 32, dtype=torch.float32, offset=100)
    x, y = _ivs_batch(gen, 16, 32, dtype=torch.float32)
    losses = []
    for device in ("cpu", "cuda"):
        obj = MetricObjective(memory_size=64, memory_dtype=torch.float16)
        obj.after_loss(hist.to(device), hy.to(device))
        losses.append(float(obj(x.to(device), y.to(device))))
    assert math.isclose(losses[0], losses[1], abs_tol=1e-4)
