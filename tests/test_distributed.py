"""Data-parallel CB-HEM (mining.distributed).

The two-rank checks run in ONE spawn of 2 gloo processes on CPU (a module-scoped fixture: each
spawn costs seconds); every rank saves what it saw and the tests compare it here with a single
process fed the concatenated (rank-order) global batch, in float64.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from mining.distributed import (
    GlobalBatchLoss,
    all_gather_rank_order,
    all_gather_summed_grad,
    all_reduce_gradients,
    enqueue_global,
    gradients_synced_after,
    rank_and_world_size,
)
from mining.memory import CrossBatchMemory
from mining.objective import MetricObjective
from mining.plb import PseudoLargeBatch
from tests.ranks import spawn_ranks

WORLD = 2
DIM = 3
FEATURES = 5


# -- shared, deterministic fixtures of the scenarios (identical in every process) ---------------


def memory_scenarios() -> list[dict]:
    """Random memory sizes and per-step, per-rank batch sizes (including 0 and unequal sizes)."""
    gen = torch.Generator().manual_seed(1234)
    scenarios = []
    for _ in range(6):
        size = int(torch.randint(1, 12, (), generator=gen))
        steps = [torch.randint(0, 7, (WORLD,), generator=gen).tolist() for _ in range(5)]
        batches = [
            [
                (torch.randn(b, DIM, generator=gen), torch.randint(0, 9, (b,), generator=gen))
                for b in sizes
            ]
            for sizes in steps
        ]
        scenarios.append({"size": size, "batches": batches})
    return scenarios


def batch_hard_triplet(emb: Tensor, labels: Tensor, cand: Tensor, cand_labels: Tensor) -> Tensor:
    """Brute-force cosine batch-hard triplet loss (margin 0.2): every anchor against all candidates.

    A deliberately non-separable loss: each anchor's hardest negative may live on another rank.
    """
    f = nn.functional.normalize(emb, dim=1)
    c = nn.functional.normalize(cand, dim=1)
    sims = f @ c.T
    same = labels[:, None] == cand_labels[None, :]
    hardest_neg = sims.masked_fill(same, float("-inf")).amax(dim=1)
    pos = (f * f.roll(1, dims=0)).sum(dim=1)  # positive = previous row (a fixed pairing)
    return torch.relu(hardest_neg - pos + 0.2).mean()


class MemoryTripletLoss:
    """A loss with the objective hooks: mines over the batch ∪ memory, enqueues after the loss."""

    def __init__(self, size: int) -> None:
        self.memory = CrossBatchMemory(size, DIM, dtype=torch.float64)
        self.hook_sizes: list[int] = []

    def before_loss(self, emb: Tensor, labels: Tensor) -> None:
        pass  # enqueue="after"; present so that the wrapper's hook path runs like MetricObjective's

    def __call__(self, emb: Tensor, labels: Tensor) -> Tensor:
        mem_emb, mem_labels, _ = self.memory.get()
        cand = torch.cat([emb, mem_emb.to(emb.dtype)])
        return batch_hard_triplet(emb, labels, cand, torch.cat([labels, mem_labels]))

    def after_loss(self, emb: Tensor, labels: Tensor) -> None:
        self.hook_sizes.append(emb.shape[0])
        self.memory.enqueue(emb, labels)


# name -> (step: plain | a PLB mode, objective: the stub | a MetricObjective, grad_scale).
# The stub is evaluated whole on every rank; a MetricObjective (it has local_loss) computes
# only each rank's own anchors' terms (mining.distributed docstring).
VARIANTS = {
    "plain": ("plain", "stub", None),
    "plb_exact": ("exact", "stub", None),
    "plb_chunk_loss": ("chunk_loss", "stub", None),
    "unscaled": ("plain", "stub", 1.0),
    "metric_objective_plb_exact": ("exact", "metric", None),
    "metric_objective_plain": ("plain", "metric", None),
    "metric_objective_plb_chunk_loss": ("chunk_loss", "metric", None),
    "metric_objective_plb_select": ("select", "metric", None),
    "top_k_quadruplet_plain": ("plain", "top_k_quadruplet", None),
}


def make_objective(kind: str):
    if kind == "metric":
        return MetricObjective(memory_size=7, memory_dtype=torch.float64)
    if kind == "top_k_quadruplet":
        return MetricObjective("top_k", "quadruplet", k=2, memory_size=7, reduction="mean_all",
                               memory_dtype=torch.float64)  # fmt: skip
    return MemoryTripletLoss(size=7)


def make_model() -> nn.Module:
    torch.manual_seed(7)  # the same initial weights in every process
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, DIM)).double()


def grad_batches(step: str = "plain") -> list[tuple[list[int], Tensor, Tensor]]:
    """Two steps of a global batch split between the ranks: (sizes, x, y). The unequal split is
    left out for chunk_loss, which gathers once per chunk: every rank needs the same K."""
    gen = torch.Generator().manual_seed(99)
    out = []
    for sizes in ([6, 4], [5, 5]):
        n = sum(sizes)
        x = torch.randn(n, FEATURES, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 4, (n,), generator=gen)
        if step != "chunk_loss" or sizes[0] == sizes[1]:
            out.append((sizes, x, y))
    return out


def rank_slice(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def grads_of(model: nn.Module) -> list[Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


# -- the two-rank worker ------------------------------------------------------------------------


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out: dict = {"rank_world": rank_and_world_size()}

        # Memories: rank-order global enqueue vs local-only enqueue (the common mistake).
        out["memories"], out["local_only"] = [], []
        for sc in memory_scenarios():
            mem = CrossBatchMemory(sc["size"], DIM)
            local = CrossBatchMemory(sc["size"], DIM)
            for step in sc["batches"]:
                emb, labels = step[rank]
                enqueue_global(mem, emb, labels)
                local.enqueue(emb, labels)
            out["memories"].append(mem.get())
            out["local_only"].append(local.get())

        out["gathers"] = _gathers_per_plain_step(rank)
        out["bad_sizes"] = _bad_sizes_error(rank)
        out["in_place"] = _loss_after_in_place_change(rank)

        # Gradients over two steps: plain DDP step or PLB under gradients_synced_after.
        for variant, (step, kind, grad_scale) in VARIANTS.items():
            ddp = nn.parallel.DistributedDataParallel(make_model())
            objective = make_objective(kind)
            loss_fn = GlobalBatchLoss(objective, grad_scale=grad_scale)
            steps = []
            for sizes, x, y in grad_batches(step):
                xs, ys = x[rank_slice(sizes, rank)], y[rank_slice(sizes, rank)]
                ddp.zero_grad(set_to_none=True)
                if step == "plain":
                    emb = ddp(xs)
                    loss_fn.before_loss(emb.detach(), ys)
                    loss = loss_fn(emb, ys)
                    loss.backward()
                    loss_fn.after_loss(emb.detach(), ys)
                else:
                    plb = PseudoLargeBatch(ddp, loss_fn, chunk_size=2, mode=step)
                    with gradients_synced_after(ddp):
                        loss = plb(xs, ys)
                steps.append((loss.detach(), grads_of(ddp.module)))
            out[variant] = {
                "steps": steps,
                "memory": objective.memory.get(),
                "hook_sizes": getattr(objective, "hook_sizes", None),
            }
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _bad_sizes_error(rank: int) -> str:
    """The error of `all_gather_summed_grad` given sizes that do not match this rank's rows
    (raised before any collective, so every rank can raise it alone)."""
    try:
        all_gather_summed_grad(torch.zeros(rank + 2, DIM), sizes=[4, 4])
    except ValueError as exc:
        return str(exc)
    return ""


def _gathers_per_plain_step(rank: int) -> dict[str, int]:
    """all_gather calls of one plain step (before_loss, loss, after_loss), per objective kind:
    the hooks and the loss of a step share one gather of the batch (sizes, rows, labels)."""
    real, calls = dist.all_gather, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    counts = {}
    sizes, x, y = grad_batches()[0]
    dist.all_gather = counting
    try:
        for kind in ("stub", "metric"):
            loss_fn = GlobalBatchLoss(make_objective(kind))
            emb = make_model()(x[rank_slice(sizes, rank)])
            ys = y[rank_slice(sizes, rank)]
            calls.clear()
            loss_fn.before_loss(emb.detach(), ys)
            loss_fn(emb, ys).backward()
            loss_fn.after_loss(emb.detach(), ys)
            counts[kind] = len(calls)
    finally:
        dist.all_gather = real
    return counts


def _loss_after_in_place_change(rank: int) -> tuple[Tensor, Tensor]:
    """The loss of a batch changed in place after before_loss gathered it (must be re-gathered),
    and the loss of a fresh wrapper on the changed batch."""
    sizes, x, y = grad_batches()[0]
    emb = make_model()(x[rank_slice(sizes, rank)]).detach()
    ys = y[rank_slice(sizes, rank)]
    stale = GlobalBatchLoss(MemoryTripletLoss(size=7))
    stale.before_loss(emb, ys)
    emb.mul_(-1.0)  # same storage, new values: the version counter moves
    fresh = GlobalBatchLoss(MemoryTripletLoss(size=7))
    return stale(emb, ys).detach(), fresh(emb, ys).detach()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("dist"), WORLD)


def single_process_steps(variant: str) -> dict:
    """The reference: one process, the concatenated global batch, a plain backward."""
    step, kind, _ = VARIANTS[variant]
    model = make_model()
    objective = make_objective(kind)
    steps = []
    for _, x, y in grad_batches(step):
        model.zero_grad(set_to_none=True)
        emb = model(x)
        objective.before_loss(emb.detach(), y)
        loss = objective(emb, y)
        loss.backward()
        objective.after_loss(emb.detach(), y)
        steps.append((loss.detach(), grads_of(model)))
    return {"steps": steps, "memory": objective.memory.get()}


# -- two-rank tests -------------------------------------------------------------------------------


def test_ranks_see_themselves(ranks):
    assert [r["rank_world"] for r in ranks] == [(0, 2), (1, 2)]


def test_hooks_and_loss_of_a_step_share_one_gather(ranks):
    """3 all_gathers per step (sizes, rows, labels) however many hooks the objective has; the
    per-call gathers before this (4 per hook and per loss call) made the ranks wait 12 times."""
    for r in ranks:
        assert r["gathers"] == {"stub": 3, "metric": 3}


def test_a_batch_changed_in_place_is_gathered_again(ranks):
    for r in ranks:
        stale, fresh = r["in_place"]
        assert torch.equal(stale, fresh)


def test_memories_identical_on_both_ranks_and_equal_single_process(ranks):
    for i, sc in enumerate(memory_scenarios()):
        single = CrossBatchMemory(sc["size"], DIM)
        for step in sc["batches"]:
            single.enqueue(torch.cat([e for e, _ in step]), torch.cat([lab for _, lab in step]))
        for r in ranks:
            for got, want in zip(r["memories"][i], single.get(), strict=True):
                assert torch.equal(got, want), f"scenario {i}"


def test_local_only_enqueue_would_diverge(ranks):
    # The control: without the gather, the ranks' memories differ in these scenarios.
    differ = [
        any(not torch.equal(a, b) for a, b in zip(m0, m1, strict=True))
        for m0, m1 in zip(ranks[0]["local_only"], ranks[1]["local_only"], strict=True)
    ]
    assert any(differ)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "unscaled"])
def test_two_rank_gradient_equals_single_process(ranks, variant):
    want = single_process_steps(variant)
    assert len(want["steps"]) >= 1
    for r in ranks:
        got = r[variant]
        assert len(got["steps"]) == len(want["steps"])
        for (loss, grads), (ref_loss, ref_grads) in zip(got["steps"], want["steps"], strict=True):
            torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
            for g, ref in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-12)
        # PLB forwards in chunks (different GEMM shapes): embeddings agree to rounding only
        for m, ref in zip(got["memory"], want["memory"], strict=True):
            torch.testing.assert_close(m, ref, rtol=1e-12, atol=1e-12)
    # ... but the ranks' memories are bit-identical to each other
    for a, b in zip(ranks[0][variant]["memory"], ranks[1][variant]["memory"], strict=True):
        assert torch.equal(a, b)
    # the stub's hooks saw the whole global batch once per step, not the local rows
    if ranks[0][variant]["hook_sizes"] is not None:
        expected = [sum(sizes) for sizes, _, _ in grad_batches(VARIANTS[variant][0])]
        assert ranks[0][variant]["hook_sizes"] == expected


def test_without_scaling_ddp_averaging_halves_the_gradient(ranks):
    want = single_process_steps("unscaled")
    for (_, grads), (_, ref) in zip(ranks[0]["unscaled"]["steps"], want["steps"], strict=True):
        for g, r in zip(grads, ref, strict=True):
            torch.testing.assert_close(g * WORLD, r, rtol=1e-9, atol=1e-12)


# -- single-process behaviour (no process group) ------------------------------------------------


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 6), scale=st.floats(0.25, 8.0))
def test_without_process_group_gather_is_identity_with_scaled_grad(seed, n, scale):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    out, offset = all_gather_rank_order(x, grad_scale=scale)
    assert offset == 0 and torch.equal(out, x)
    (out * w).sum().backward()
    torch.testing.assert_close(x.grad, scale * w)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 8))
def test_without_process_group_global_loss_is_the_loss(seed, n):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,), generator=gen)
    plain, wrapped = MemoryTripletLoss(5), GlobalBatchLoss(MemoryTripletLoss(5))
    assert wrapped.grad_scale == 1.0
    torch.testing.assert_close(wrapped(emb, labels), plain(emb, labels), rtol=0, atol=0)
    wrapped.after_loss(emb, labels)
    plain.after_loss(emb, labels)
    for a, b in zip(wrapped.loss_fn.memory.get(), plain.memory.get(), strict=True):
        assert torch.equal(a, b)


def test_global_loss_without_hooks_has_no_hook_effect_and_empty_stats():
    loss = GlobalBatchLoss(lambda e, y: e.sum())
    loss.before_loss(torch.ones(2, DIM), torch.zeros(2, dtype=torch.int64))  # must not raise
    assert loss.last_stats == {}


def test_all_reduce_without_process_group_fills_missing_grads():
    model = make_model()
    all_reduce_gradients(model)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    with gradients_synced_after(model):
        model(torch.ones(1, FEATURES, dtype=torch.float64)).sum().backward()
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_grad_scale_must_be_positive(bad):
    with pytest.raises(ValueError, match="grad_scale"):
        GlobalBatchLoss(lambda e, y: e.sum(), grad_scale=bad)


def test_summed_gather_rejects_sizes_that_miss_this_ranks_rows(ranks):
    assert (
        "sizes must list every rank's rows (2 ranks, this rank 2); got [4, 4]"
        in ranks[0]["bad_sizes"]
    )
    assert "this rank 3" in ranks[1]["bad_sizes"]
