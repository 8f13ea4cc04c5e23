"""Each rank computes only its own anchors' terms: `GlobalBatchLoss` over `MetricObjective.
local_loss` on 2 gloo ranks against one process fed the concatenated batch (float64).

Every miner × loss × memory setup × reduction × batch layout runs in ONE spawn of 2 processes
(module-scoped fixture); each rank saves its loss, the gradient of its local embeddings divided
by W (what DDP's average makes of the W-scaled gradient), `last_stats`, the memory, and the
number of anchor rows its scans saw. The layouts include unequal local batches, an empty rank,
a rank whose anchors yield no term and identities split between the ranks (not for mps, which
needs whole identities per rank and raises otherwise).
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

import mining.candidates
from mining.distributed import GlobalBatchLoss
from mining.objective import MetricObjective
from tests.ranks import spawn_ranks
from tests.test_objective import MEMORY_SETUPS

WORLD = 2
DIM = 4
MINERS = ("batch_hard", "top_k", "semi_hard", "threshold", "random", "bidirectional")
LOSSES = ("triplet", "triplet_l2", "quadruplet", "mps")
MEMORIES = MEMORY_SETUPS  # none, warm-up, enqueue after, enqueue before with memory only
REDUCTIONS = ("mean_nonzero", "mean_all")
# name -> per-rank sizes; "pairs" layouts hold whole identities (ID photo, spot photo) per rank
LAYOUTS = {
    "pairs, unequal": (6, 4),
    "empty rank 0": (0, 8),
    "rank 1 without terms": (6, 3),  # rank 1: three identities of one row each
    "identities split": (5, 4),  # random labels: a pair may straddle the ranks
}


def scenarios() -> list[dict]:
    out = []
    for i, (miner, loss, memory, reduction, layout) in enumerate(
        itertools.product(MINERS, LOSSES, MEMORIES, REDUCTIONS, LAYOUTS)
    ):
        if loss == "mps" and layout == "identities split":
            continue  # an error, tested on its own
        out.append({"id": f"{miner}-{loss}-{memory}-{reduction}-{layout}", "seed": i,
                    "miner": miner, "loss": loss, "memory": memory, "reduction": reduction,
                    "layout": layout})  # fmt: skip
    return out


def make_objective(sc: dict) -> MetricObjective:
    return MetricObjective(
        sc["miner"], sc["loss"], margin=0.3, k=3 if sc["miner"] in ("top_k", "random") else 1,
        reduction=sc["reduction"], memory_dtype=torch.float64, chunk=4, seed=sc["seed"] % 5,
        **MEMORIES[sc["memory"]],
    )  # fmt: skip


def pairs(gen: torch.Generator, n: int, offset: int) -> Tensor:
    """Labels of n // 2 identities × (ID photo, spot photo), offset + 0, 1, ..."""
    return torch.arange(n // 2).repeat_interleave(2) + offset


def batches(sc: dict) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor]:
    """(history of global batches, x (N, DIM), y (N,)) of a scenario; the same in every process."""
    gen = torch.Generator().manual_seed(sc["seed"])
    history = []
    for step in range(2):  # labels overlap the batch's: the memory holds positives too
        history.append(
            (torch.randn(6, DIM, generator=gen, dtype=torch.float64), pairs(gen, 6, step))
        )
    b0, b1 = LAYOUTS[sc["layout"]]
    x = torch.randn(b0 + b1, DIM, generator=gen, dtype=torch.float64)
    if sc["layout"] == "identities split":
        y = torch.randint(0, 4, (b0 + b1,), generator=gen)
    elif sc["layout"] == "rank 1 without terms":
        y = torch.cat([pairs(gen, b0, 0), 100 + torch.arange(b1)])
    else:
        y = torch.cat([pairs(gen, b0, 0), pairs(gen, b1, b0 // 2)])
    return history, x, y


def rows_of(sc: dict, rank: int) -> slice:
    sizes = LAYOUTS[sc["layout"]]
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def split(t: Tensor, sc: dict, rank: int, n: int | None = None) -> Tensor:
    """This rank's rows of a global batch (history batches: halves)."""
    if n is not None:
        return t[rank * n // WORLD : (rank + 1) * n // WORLD]
    return t[rows_of(sc, rank)]


def one_step(sc: dict, loss_fn, objective: MetricObjective, rank: int | None) -> dict:
    """History hooks, then one step; rank None = the single process on the global batch."""
    history, x, y = batches(sc)
    for hx, hy in history:
        if rank is not None:
            hx, hy = split(hx, sc, rank, 6), split(hy, sc, rank, 6)
        loss_fn.before_loss(hx, hy)
        loss_fn.after_loss(hx, hy)
    if rank is not None:
        x, y = split(x, sc, rank), split(y, sc, rank)
    x = x.clone().requires_grad_(True)
    loss_fn.before_loss(x.detach(), y)
    loss = loss_fn(x, y)
    loss.backward()
    stats = dict(loss_fn.last_stats)
    loss_fn.after_loss(x.detach(), y)
    scale = 1.0 if rank is None else WORLD  # DDP averages the W-scaled gradient
    return {"loss": loss.detach(), "grad": x.grad / scale, "stats": stats,
            "memory": None if objective.memory is None else objective.memory.get()}  # fmt: skip


class ScanRows:
    """Counts the anchor rows of every similarity scan in mining.candidates."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int]] = []
        self._negatives = mining.candidates.hardest_negatives
        self._positives = mining.candidates.hardest_positives

    def install(self) -> None:
        def negatives(anchors, *args, **kwargs):
            self.rows.append(("negatives", anchors.shape[0]))
            return self._negatives(anchors, *args, **kwargs)

        def positives(emb, labels, anchors=None):
            out = self._positives(emb, labels, anchors)
            self.rows.append(("positives", out[0].shape[0]))
            return out

        mining.candidates.hardest_negatives = negatives
        mining.candidates.hardest_positives = positives

    def uninstall(self) -> None:
        mining.candidates.hardest_negatives = self._negatives
        mining.candidates.hardest_positives = self._positives


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out: dict = {"steps": {}}
        for sc in scenarios():
            objective = make_objective(sc)
            out["steps"][sc["id"]] = one_step(sc, GlobalBatchLoss(objective), objective, rank)

        # what the scans saw: this rank's anchors only (batch_hard with a memory: 2 blocks)
        scans = ScanRows()
        scans.install()
        sc = {**scenarios()[0], "memory": "after", "layout": "pairs, unequal"}
        objective = make_objective(sc)
        one_step(sc, GlobalBatchLoss(objective), objective, rank)
        scans.uninstall()
        out["scan_rows"] = scans.rows

        # mps with an identity split between the ranks: every rank raises (no hang)
        sc = {**scenarios()[0], "loss": "mps", "layout": "identities split", "seed": 3}
        try:
            objective = make_objective(sc)
            one_step(sc, GlobalBatchLoss(objective), objective, rank)
            out["mps_split"] = None
        except ValueError as exc:
            out["mps_split"] = str(exc)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("local"), WORLD)


def single_process(sc: dict) -> dict:
    objective = make_objective(sc)
    return one_step(sc, objective, objective, None)


def _assert_stats_equal(got: dict, want: dict, where: str) -> None:
    assert got.keys() == want.keys(), where
    for key, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[key]), (where, key)
        else:
            assert math.isclose(got[key], value, rel_tol=1e-12, abs_tol=1e-12), (where, key)


@pytest.mark.parametrize(("miner", "loss"), list(itertools.product(MINERS, LOSSES)))
def test_two_ranks_equal_one_process(ranks, miner, loss):
    """Loss (on every rank), gradient of each rank's rows, last_stats and memory: every memory
    setup, reduction and layout of this miner and loss."""
    cases = [sc for sc in scenarios() if sc["miner"] == miner and sc["loss"] == loss]
    active = 0
    for sc in cases:
        want = single_process(sc)
        active += float(want["loss"]) > 0
        for rank, got in enumerate(r["steps"][sc["id"]] for r in ranks):
            where = f"{sc['id']}, rank {rank}"
            torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-12, atol=1e-12, msg=where)
            ref_grad = want["grad"][rows_of(sc, rank)]
            torch.testing.assert_close(got["grad"], ref_grad, rtol=1e-12, atol=1e-12, msg=where)
            _assert_stats_equal(got["stats"], want["stats"], where)
            if want["memory"] is not None:
                for g, w in zip(got["memory"], want["memory"], strict=True):
                    assert torch.equal(g, w), where
    assert active > len(cases) // 2  # the cases are not trivially zero


def test_layouts_cover_an_empty_rank_and_a_rank_without_terms(ranks):
    """The rank-1-without-terms layout has terms on rank 0 only, yet rank 1's rows get the
    gradient of rank 0's terms (they are negatives there)."""
    sc = next(s for s in scenarios() if s["layout"] == "rank 1 without terms" and
              s["memory"] == "none" and s["miner"] == "batch_hard" and s["loss"] == "triplet")  # fmt: skip
    want = single_process(sc)
    assert want["stats"]["num_terms"] == LAYOUTS[sc["layout"]][0]  # rank 0's anchors only
    assert ranks[1]["steps"][sc["id"]]["grad"].abs().sum() > 0


def test_each_rank_scans_only_its_own_anchors(ranks):
    """batch_hard over batch ∪ memory: per rank one positive scan and one negative scan per
    candidate block, each over this rank's B_r anchor rows — never the global batch's N."""
    sizes = LAYOUTS["pairs, unequal"]
    for rank, r in enumerate(ranks):
        b = sizes[rank]
        assert r["scan_rows"] == [("positives", b), ("negatives", b), ("negatives", b)]


def test_mps_with_an_identity_split_between_ranks_raises_on_every_rank(ranks):
    for r in ranks:
        assert r["mps_split"] is not None and "whole identities" in r["mps_split"]
