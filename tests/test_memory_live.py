"""Honest memory on the CPU (issue 18 item 4): live tensor bytes (`harness.live_memory`, the
trainer's probe steps) checked against bytes computed by hand, and RSS net of setup
(`harness.measure.RssWatermark`), including that a trial's worker does not inherit the runner's
peak RSS."""

from __future__ import annotations

import gc
import types

import pytest
import torch

from harness import measure
from harness.live_memory import LiveTensorBytes, state_tensors

F32 = 4
BANK_ROW = 8 + 1 + 8  # per CB-HEM row besides the embedding: label int64, domain int8, step int64


def test_tracker_follows_allocations_views_in_place_and_frees():
    held = torch.zeros(250)  # exists before: counted once held, uncounted when freed
    t = LiveTensorBytes()
    t.hold([held, held[10:]])  # a view of a held storage is the same storage
    assert t.live == 1000
    with t:
        a = torch.empty(1000)  # a factory op: 4000 bytes
        v = a[10:]  # a view: no new storage
        a.mul_(2)  # in place: none either
        b = a + 1  # 4000
        assert (t.live, t.peak) == (9000, 9000)
        del a  # the view keeps the storage alive
        assert t.live == 9000
        del v
        assert t.live == 5000
        c = torch.cat([b, b])  # 8000
        assert t.peak == 13000
        del b, c, held
        d = torch.empty(10)
        d.resize_(1000)  # grown in place: 4000 in all
        assert t.live == 4000
    del d
    gc.collect()
    assert (t.live, t.peak) == (0, 13000)


def test_tracker_ignores_the_dataset_and_its_views():
    data = torch.zeros(1000)
    t = LiveTensorBytes(ignore=[data])
    t.hold([data[:10]])  # e.g. the drift probe's set: a view of the training features
    with t:
        x = data[torch.arange(10)]  # a gathered batch is new: 40 bytes
    assert t.live == 40
    del x


def test_state_tensors_reach_modules_optimisers_closures_and_slots_not_excluded():
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.step()
    cell_tensor, slot_tensor, dataset = torch.ones(5), torch.ones(6), torch.ones(7)

    def step() -> torch.Tensor:
        return cell_tensor

    class Slotted:
        __slots__ = ("t",)

    slotted = Slotted()
    slotted.t = slot_tensor
    holder = types.SimpleNamespace(data=dataset, inner=[slotted])
    found = {id(t) for t in state_tensors(model, opt, step, holder, exclude=(dataset,))}
    want = [model.weight, model.bias, model.weight.grad, model.bias.grad, cell_tensor, slot_tensor]
    want += [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    assert {id(t) for t in want} <= found
    assert id(dataset) not in found


# --- the trainer's probe -------------------------------------------------------------------

D, DIM, B = 16, 16, 32  # embedding, input features, batch
SUITE = f"""
[suite]
name = "live"
seeds = [0]
[data]
kind = "synthetic_ivs"
identities = 512
test_identities = 32
dim = {DIM}
lookalike_groups = 8
[model]
kind = "mlp"
embedding = {D}
hidden = 32
depth = 1
[train]
steps = 4
batch = {B}
lr = 0.05
device = "cpu"
threads = 1
log_every = 100   # the drift probe holds 2 embeddings of its set, whatever the memory size
save_model = false
[baseline]
miner = "batch_hard"
loss = "triplet"
memory_warmup = 1000   # filled, never mined: the memory's bytes are its only cost
{{extra}}
[eval]
far = [1e-1]
"""


def _trained(extra: str):
    """A trained `Trainer` of SUITE with `extra` method lines (its first trial)."""
    from harness import build
    from harness.suite import parse_suite
    from harness.train import Trainer

    cfg = parse_suite(SUITE.format(extra=extra)).trials[0]
    torch.manual_seed(cfg.seed)
    data = build.data(cfg, None)
    trainer = Trainer(cfg, build.model(cfg, data), data, torch.device("cpu"))
    trainer.run()
    return cfg, trainer


def test_state_at_a_step_start_equals_the_bytes_counted_by_hand():
    """Parameters, their gradients and SGD momentum (3× the parameter bytes), BatchNorm buffers,
    the CB-HEM memory of M rows, the drift probe's 2 embeddings of 64 samples and the batch."""
    m = 1024
    cfg, trainer = _trained(f"memory = {m}")
    params = sum(p.numel() * F32 for p in trainer.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in trainer.model.buffers())
    by_hand = 3 * params + buffers + m * (D * F32 + BANK_ROW) + 2 * 64 * D * F32
    x, y = next(trainer._batches)
    by_hand += x.numel() * F32 + y.numel() * 8
    t = LiveTensorBytes(ignore=state_tensors(trainer.data))
    roots = (trainer.model, trainer.optimizer, trainer.stateful, trainer.step_fn, trainer.probe)
    t.hold([*state_tensors(*roots, exclude=(trainer.data,)), x, y])
    assert t.live == by_hand
    with t:  # after a step, what is still live is the state again (the batch aside)
        trainer._update(cfg.train.steps, x, y, schedule=False)
    assert t.live == by_hand


def test_peak_grows_by_exactly_the_memory_bank_bytes():
    small, large = 256, 256 + 8192
    peaks = [_trained(f"memory = {m}")[1].measure_live() for m in (small, large)]
    grown = (peaks[1] - peaks[0]) * measure.MIB
    assert grown == (large - small) * (D * F32 + BANK_ROW)  # 8192 × 81 bytes = 0.63 MiB


def test_peak_grows_with_the_plb_cache():
    """PLB exact at N = K·b caches N embeddings and their gradient (2·N·d floats) and holds the
    N-sample batch; the activations stay those of one chunk of b. So the peak rises with N by
    at least the cache and batch bytes (plus the loss's N-sized terms)."""
    peaks = {
        n: _trained(f'memory = 0\nplb = "exact"\nvirtual_batch = {n}')[1].measure_live()
        for n in (B, 4 * B, 16 * B)
    }
    for n in (4 * B, 16 * B):
        cache_and_batch = (n - B) * (2 * D * F32 + DIM * F32 + 8)
        assert (peaks[n] - peaks[B]) * measure.MIB >= cache_and_batch


def test_trial_row_has_the_memory_columns():
    from harness.suite import parse_suite
    from harness.trial import run_trial

    row, _ = run_trial(parse_suite(SUITE.format(extra="memory = 512")).trials[0])
    assert row["peak_live_mib"] > 0 and row["rss_setup_mib"] > 0
    assert 0 <= row["rss_net_mib"] <= row["peak_rss_mib"]
    assert row["peak_alloc_mib"] is None  # CPU: the allocator columns stay null


# --- RSS ------------------------------------------------------------------------------------


def test_rss_net_counts_what_comes_after_setup_and_peak_rss_stays_whole():
    before = measure.peak_rss_mib()
    mark = measure.RssWatermark()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    out = mark.result()
    del block
    assert out["peak_rss_mib"] >= before  # the reset does not lower the process's peak
    if mark.reset:  # Linux
        assert 63 <= out["rss_net_mib"] <= 64 + 32  # the block, plus little else
        assert out["rss_setup_mib"] <= out["peak_rss_mib"]


@pytest.mark.skipif(not measure.reset_peak_rss(), reason="needs Linux /proc")
def test_worker_peak_rss_is_not_the_runners():
    """The runner's own peak must not leak into a trial's: a spawned child inherits it through
    exec (ru_maxrss), which made the first trial of a run read lower than later ones; forked
    from the forkserver, a worker's peak is its own."""
    from harness.executors.local import LocalExecutor
    from harness.records import TrialSpec
    from harness.suite import parse_suite

    big = torch.ones(768 * 2**20 // 4)  # the runner's peak: +768 MiB, then freed
    del big
    runner_peak = measure.peak_rss_mib()
    cfg = parse_suite(SUITE.format(extra="memory = 0")).trials[0]
    outcomes = []
    LocalExecutor(jobs=1).run([TrialSpec("t", "live", "r", cfg, timeout_s=120)], outcomes.append)
    (row,) = [o.row for o in outcomes]
    assert row["status"] == "ok", row["error"]
    assert row["peak_rss_mib"] < runner_peak - 384


def test_show_and_plot_read_live_bytes_on_cpu_and_the_allocator_on_cuda():
    import polars as pl

    from harness import report

    rows = pl.DataFrame(
        {"status": ["ok", "ok", "ok"], "peak_alloc_mib": [7.0, None, None],
         "peak_live_mib": [None, 3.0, None], "peak_rss_mib": [300.0, 290.0, 280.0]}
    )  # fmt: skip
    assert report.with_peak(rows)["peak_mib"].to_list() == [7.0, 3.0, 280.0]
    assert report.peak_source(rows) == "torch allocator / live tensors / RSS"
    assert report.peak_source(rows[1:2]) == "live tensors"


def test_a_failing_probe_step_gives_null_not_a_failed_trial():
    _, trainer = _trained("memory = 0")

    def broken(x, y):
        raise RuntimeError("boom")

    trainer.step_fn = broken
    with pytest.warns(UserWarning, match="peak_live_mib not measured: RuntimeError: boom"):
        assert trainer.measure_live() is None
