"""CB-HEM batch-hard step vs the similarity floor and vs pytorch-metric-learning (issue 3).

Run: ``python -m pytest tests/bench/test_bench_cbhem.py --benchmark-enable -s`` (skipped when
benchmarks are disabled, as in the default test command).

CPU, B = 256, D = 512, memory M ∈ {1024, 8192, 32768} full of other identities:
- ``floor``: one similarity GEMM ``(B, D) @ (D, M)`` + row max (the least work any hardest-
  negative search must do);
- ``ours``: ``MetricObjective("batch_hard", "triplet", memory_size=M, enqueue="before")`` —
  enqueue, chunked mining over batch ∪ memory, triplet loss and backward;
- ``pml``: ``CrossBatchMemory(TripletMarginLoss, miner=BatchHardMiner)`` with cosine distance,
  forward and backward.
The ratios (ours/floor, pml/ours) come from :func:`test_ratio_table`, which interleaves the three
and takes medians in one run so that they share the machine's state. The pytest-benchmark tests
give the absolute times of each.

Large memory: M = 1,000,000, d = 128 in a fresh subprocess. The step's working space = peak of
the bytes of tensor storages created during the step (a TorchDispatchMode counts each new
storage and a weakref finalizer uncounts it when freed): it must stay below 64 MiB on top of the
memory's own bytes. Peak RSS over the pre-memory baseline is printed too (coarse: allocator
caching and lazily loaded code count).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import pytest
import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.distances import CosineSimilarity

from mining.memory import CrossBatchMemory
from mining.objective import MetricObjective

B, D = 256, 512
MEMORY_SIZES = (1024, 8192, 32768)
ROUNDS = 7


@pytest.fixture
def bench_enabled(request) -> None:
    config = request.config  # addopts holds --benchmark-disable; --benchmark-enable wins
    if config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"):
        pytest.skip("benchmark: run with --benchmark-enable")


def _steps(memory_size: int) -> dict[str, Callable[[], object]]:
    """The three step functions on the same batch and the same full memory."""
    gen = torch.Generator().manual_seed(0)
    mem = torch.randn(memory_size, D, generator=gen)
    mem_labels = torch.arange(memory_size) // 2 + B  # pairs, never a batch identity
    x = torch.randn(B, D, generator=gen)
    y = torch.arange(B) // 2
    mem_unit = torch.nn.functional.normalize(mem, dim=1)

    def floor():
        return (torch.nn.functional.normalize(x, dim=1) @ mem_unit.T).max(dim=1)

    ours = MetricObjective("batch_hard", "triplet", memory_size=memory_size, enqueue="before")
    ours.memory = CrossBatchMemory(memory_size, D)
    ours.memory.enqueue(mem_unit, mem_labels)

    def ours_step():
        emb = x.clone().requires_grad_(True)
        ours.before_loss(emb.detach(), y)
        loss = ours(emb, y)
        loss.backward()
        ours.after_loss(emb.detach(), y)
        return loss

    pml = losses.CrossBatchMemory(
        losses.TripletMarginLoss(margin=0.2, distance=CosineSimilarity()),
        embedding_size=D,
        memory_size=memory_size,
        miner=miners.BatchHardMiner(distance=CosineSimilarity()),
    )
    # Fill PML's queue directly: running its forward M/B times would dominate the benchmark.
    pml.embedding_memory.copy_(mem)
    pml.label_memory.copy_(mem_labels)
    pml.has_been_filled = True

    def pml_step():
        emb = x.clone().requires_grad_(True)
        loss = pml(emb, y)
        loss.backward()
        return loss

    return {"floor": floor, "ours": ours_step, "pml": pml_step}


@pytest.mark.parametrize("memory_size", MEMORY_SIZES)
@pytest.mark.parametrize("impl", ["floor", "ours", "pml"])
def test_step_time(benchmark, bench_enabled, impl, memory_size):
    step = _steps(memory_size)[impl]
    benchmark.group = f"cbhem M={memory_size}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)


def _median_seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@pytest.fixture(params=[1, None], ids=["threads1", "threads_default"])
def num_threads(request):
    """Intra-op threads: 1 isolates the compute cost from thread-sync stalls on a shared host."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param or before)
    yield torch.get_num_threads()
    torch.set_num_threads(before)


def test_ratio_table(bench_enabled, num_threads):
    rows = []
    for memory_size in MEMORY_SIZES:
        steps = _steps(memory_size)
        for fn in steps.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(ROUNDS):  # interleaved: the three share the machine's state
            for name, fn in steps.items():
                times[name].append(_median_seconds(fn))
        med = {name: statistics.median(t) for name, t in times.items()}
        rows.append((memory_size, med))
    print(f"\nthreads={num_threads}")
    print("| M | floor ms | ours ms | PML ms | ours/floor | PML/ours |")
    print("|---:|---:|---:|---:|---:|---:|")
    for memory_size, med in rows:
        print(
            f"| {memory_size} | {1e3 * med['floor']:.1f} | {1e3 * med['ours']:.1f} | "
            f"{1e3 * med['pml']:.1f} | {med['ours'] / med['floor']:.2f} | "
            f"{med['pml'] / med['ours']:.1f} |"
        )
    for _, med in rows:  # sanity, not a target: the step does at least the floor's work
        assert med["ours"] > 0 and med["floor"] > 0


_LARGE_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, torch
    from harness.live_memory import LiveTensorBytes as NewTensorBytes
    from mining.memory import CrossBatchMemory
    from mining.objective import MetricObjective

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    M, d, B = 1_000_000, 128, 256
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(B, d, generator=gen), torch.arange(B) // 2
    warm = MetricObjective("batch_hard", "triplet", memory_size=4 * B, enqueue="before")
    for _ in range(3):  # warm the same code path on a small memory: kernels, allocator
        warm.before_loss(x, y); warm(x.clone().requires_grad_(True), y).backward()
        warm.after_loss(x, y + B)
    del warm
    obj = MetricObjective("batch_hard", "triplet", memory_size=M, enqueue="before")
    base = rss_mib()
    obj.memory = CrossBatchMemory(M, d)
    for start in range(0, M, 8192):  # fill in small pieces: the fill's own peak stays small
        n = min(8192, M - start)
        obj.memory.enqueue(
            torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1),
            torch.arange(start, start + n) // 2 + B,
        )
    emb = x.clone().requires_grad_(True)
    with NewTensorBytes() as counter:
        obj.before_loss(emb.detach(), y)
        loss = obj(emb, y)
        loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # The memory's bytes: embeddings (M×d float32) + labels and write steps (M int64 each).
    print(json.dumps({"memory_mib": (M * d * 4 + 2 * M * 8) / 2**20,
                      "step_peak_mib": counter.peak / 2**20, "rss_peak_mib": peak - base,
                      "memory_share": obj.last_stats["memory_share"]}))
    """
)


def test_large_memory_peak(bench_enabled):
    out = subprocess.run(
        [sys.executable, "-c", _LARGE_MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"\nM=1e6 d=128: memory {res['memory_mib']:.0f} MiB; step's peak of new tensor bytes "
        f"{res['step_peak_mib']:.1f} MiB; RSS peak over baseline {res['rss_peak_mib']:.0f} MiB; "
        f"memory_share {res['memory_share']:.2f}"
    )
    assert res["memory_share"] > 0.9  # the memory was really mined
    assert res["step_peak_mib"] < 64  # working space of the step, measured exactly
