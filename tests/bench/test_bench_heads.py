"""Margin heads: forward + backward at B = 256, d = 512, C = 100,000 on CPU (issue 5).

Run: ``python -m pytest tests/bench/test_bench_heads.py --benchmark-enable -s`` (skipped when
benchmarks are disabled, as in the default test command).

One step = ``F.cross_entropy(head(emb, y), y).backward()`` with gradients for the embeddings and
the class centres; labels are IvS-like pairs (y = arange(B) // 2). All heads share one weight
tensor so that the runs differ only in the head's own work. :func:`test_ratio_table` interleaves
all heads within each round (so the ratios share the machine's state) and reports the median
of the per-round ratios to plain softmax. Target (reported, not asserted): every head ≤ 1.3×
softmax except UNPG, whose extra cost is reported at B = 512 (≈130k extra logit columns)
against softmax at B = 512. The pytest-benchmark tests give each head's absolute time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from mining.heads import HEADS

D, C = 512, 100_000
ROUNDS = 7
TARGET = 1.3

# label -> (head name, params); "hsm" gets class counts below
CONFIGS: dict[str, tuple[str, dict]] = {
    "softmax": ("softmax", {}),
    "cosine": ("cosine", {}),
    "cosface": ("cosface", {}),
    "arcface": ("arcface", {}),
    "arcface_nograd": ("arcface_nograd", {}),
    "arcface + interclass_filter": ("arcface", {"interclass_filter": 0.4}),
    "npcface": ("npcface", {}),
    "hsm (false_class, prob)": ("hsm", {}),
    "hsm (virtual_class, gap)": ("hsm", {"pseudo": "virtual_class", "saturation": "gap"}),
    "unpg (arcface)": ("unpg", {"base": "arcface"}),
}


@pytest.fixture
def bench_enabled(request) -> None:
    config = request.config  # addopts holds --benchmark-disable; --benchmark-enable wins
    if config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"):
        pytest.skip("benchmark: run with --benchmark-enable")


def _shared_weight() -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(0)
    return torch.nn.Parameter(torch.randn(C, D, generator=gen) * 0.01)


def _step(label: str, weight: torch.nn.Parameter, batch: int) -> Callable[[], float]:
    """One forward + backward of the head ``label`` on a fixed batch; returns the loss."""
    name, params = CONFIGS[label]
    gen = torch.Generator().manual_seed(1)
    if name == "hsm" or params.get("base") == "hsm":
        params = {**params, "class_counts": torch.randint(1, 100, (C,), generator=gen)}
    head = HEADS[name](D, C, **params)
    owner = head.base if name == "unpg" else head
    owner.weight = weight  # the same storage for every head: no 200 MB copy per head
    emb = torch.randn(batch, D, generator=gen)
    labels = torch.arange(batch) // 2

    def step() -> float:
        e = emb.clone().requires_grad_(True)
        loss = F.cross_entropy(head(e, labels), labels)
        loss.backward()
        weight.grad = None
        return loss.item()

    return step


@pytest.mark.parametrize("label", list(CONFIGS))
def test_step_time(benchmark, bench_enabled, label):
    benchmark.group = f"heads B=256 d={D} C={C}"
    benchmark.pedantic(_step(label, _shared_weight(), 256), rounds=5, warmup_rounds=1)


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved_ratios(steps: dict[str, Callable[[], float]], reference: str) -> dict:
    """Median time and median per-round ratio to ``reference`` of each step.

    Steps are interleaved within each round, so each ratio compares runs seconds apart: on a
    shared machine this is far steadier than a ratio of medians taken minutes apart.
    """
    for fn in steps.values():
        fn()  # warm-up: first-call allocations and kernel selection
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(ROUNDS):
        for name, fn in steps.items():
            times[name].append(_seconds(fn))
    return {
        name: (
            statistics.median(t),
            statistics.median(a / b for a, b in zip(t, times[reference], strict=True)),
        )
        for name, t in times.items()
    }


def test_ratio_table(bench_enabled):
    weight = _shared_weight()
    med = _interleaved_ratios({label: _step(label, weight, 256) for label in CONFIGS}, "softmax")
    big = _interleaved_ratios(
        {f"{label} B=512": _step(label, weight, 512) for label in ("softmax", "unpg (arcface)")},
        "softmax B=512",
    )
    labels = torch.arange(512) // 2
    emb = torch.randn(512, D, generator=torch.Generator().manual_seed(1))
    extra = HEADS["unpg"](D, C)
    extra.base.weight = weight
    with torch.no_grad():
        extra_columns = extra(emb, labels).shape[1] - C

    print(f"\nB=256, d={D}, C={C}, CPU threads={torch.get_num_threads()}, {ROUNDS} rounds")
    print("| head | ms (median) | × softmax (median of per-round ratios) |")
    print("|---|---:|---:|")
    for label, (seconds, ratio) in {**med, **big}.items():
        print(f"| {label} | {1e3 * seconds:.0f} | {ratio:.2f} |")
    print(f"UNPG at B=512: {extra_columns} extra columns")

    slow = {
        label: round(ratio, 2)
        for label, (_, ratio) in med.items()
        if not label.startswith("unpg") and ratio > TARGET
    }
    # A report, not a timed test: the target's outcome is printed; only sanity is asserted.
    print(f"heads above the {TARGET}× target: {slow or 'none'}")
    assert extra_columns > 0 and all(seconds > 0 for seconds, _ in med.values())
