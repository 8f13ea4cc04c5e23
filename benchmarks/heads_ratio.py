"""Margin heads vs a plain linear-softmax step: the time ratio, measured in one run.

One step = the head's training loss (``head.loss(emb, y)``; ``F.cross_entropy(head(emb, y), y)``
for heads without ``loss``) and its backward, with gradients for the embeddings and the class
centres. The reference step is ``F.cross_entropy(emb @ Wᵀ, y)`` and its backward on the same
tensors. All heads share one weight tensor, so runs differ only in the head's own work. Steps are
interleaved within each round and each head's ratio is the median over rounds of its time
divided by the reference's time in the same round: on a shared machine this is far steadier than
a ratio of medians taken minutes apart. Labels are ID-vs-Spot pairs, y = arange(B) // 2.

Also runs against an older checkout, for before/after tables (heads it lacks are skipped)::

    python benchmarks/heads_ratio.py                           # this checkout
    PYTHONPATH=/path/to/old/checkout python benchmarks/heads_ratio.py

Heads that run a fused op by default (``head.fused``) are also timed on their plain path, as
"<label> [plain]". Results: docs/benchmarks.md ("Margin heads: formula-first redesign").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from mining.heads import HEADS

#: (B, d, C): face-recognition scale and the suite scale
SIZES = {"large": (256, 512, 100_000), "small": (64, 128, 1000)}
#: rounds per size: a small step takes milliseconds, so more rounds for a steady median
ROUNDS = {"large": 7, "small": 41}

#: label -> (head name, params); HSM gets class counts in `make_step`
CONFIGS: dict[str, tuple[str, dict]] = {
    "cosine": ("cosine", {}),
    "cosface": ("cosface", {}),
    "arcface": ("arcface", {}),
    "arcface_nograd": ("arcface_nograd", {}),
    "arcface + interclass_filter": ("arcface", {"interclass_filter": 0.4}),
    "npcface": ("npcface", {}),
    "hsm (false_class, prob)": ("hsm", {}),
    "hsm (virtual_class, gap)": ("hsm", {"pseudo": "virtual_class", "saturation": "gap"}),
    "curricularface": ("curricularface", {}),
    "adaface": ("adaface", {}),
    "magface": ("magface", {}),
    "unpg (arcface)": ("unpg", {"base": "arcface"}),
}

REFERENCE = "linear softmax"


def build_head(label: str, weight: torch.nn.Parameter) -> torch.nn.Module:
    """The head ``label`` on ``weight`` (shared, C × d)."""
    name, params = CONFIGS[label]
    classes = weight.shape[0]
    if name == "hsm":
        gen = torch.Generator().manual_seed(1)
        params = {**params, "class_counts": torch.randint(1, 100, (classes,), generator=gen)}
    head = HEADS[name](weight.shape[1], classes, **params)
    owner = head.base if name == "unpg" else head
    owner.weight = weight  # the same storage for every head: no 200 MB copy per head
    return head


def head_step(
    head: torch.nn.Module, weight: torch.nn.Parameter, emb: torch.Tensor, labels: torch.Tensor
) -> Callable[[], None]:
    """One loss + backward of ``head``."""
    loss = getattr(head, "loss", lambda e, y: F.cross_entropy(head(e, y), y))

    def step() -> None:
        e = emb.clone().requires_grad_(True)
        loss(e, labels).backward()
        weight.grad = None

    return step


def reference_step(
    weight: torch.nn.Parameter, emb: torch.Tensor, labels: torch.Tensor
) -> Callable[[], None]:
    """Plain linear softmax: logits = emb · Wᵀ (B, C), cross-entropy, backward."""

    def step() -> None:
        e = emb.clone().requires_grad_(True)
        F.cross_entropy(e @ weight.T, labels).backward()
        weight.grad = None

    return step


def interleaved_ratios(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, dict]:
    """Median ms and median per-round ratio to `REFERENCE` of each step; also the fastest
    round's ms and the ratio of the fastest rounds (steadier under bursts of load from other
    processes, which only ever add time)."""
    for fn in steps.values():
        fn()  # warm-up: first-call allocations and kernel selection
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(rounds):
        for label, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    ref = times[REFERENCE]
    return {
        label: {
            "ms": 1e3 * statistics.median(t),
            "ratio": statistics.median(a / b for a, b in zip(t, ref, strict=True)),
            "min_ms": 1e3 * min(t),
            "min_ratio": min(t) / min(ref),
        }
        for label, t in times.items()
    }


def measure(size: str, rounds: int, labels_wanted: list[str]) -> dict[str, dict]:
    batch, dim, classes = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(classes, dim, generator=gen) * 0.01)
    emb = torch.randn(batch, dim, generator=gen)
    labels = torch.arange(batch) // 2
    steps = {REFERENCE: reference_step(weight, emb, labels)}
    for label in labels_wanted:
        if CONFIGS[label][0] not in HEADS:
            continue  # an older checkout without this head
        head = build_head(label, weight)
        steps[label] = head_step(head, weight, emb, labels)
        if getattr(head, "fused", False):
            plain = build_head(label, weight)
            plain.fused = False
            steps[f"{label} [plain]"] = head_step(plain, weight, emb, labels)
    return interleaved_ratios(steps, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--rounds", type=int, help="rounds per size (default: ROUNDS)")
    parser.add_argument("--heads", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    source = Path(sys.modules["mining.heads"].__file__).parents[2]
    commit = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    results = {}
    for size in args.sizes:
        batch, dim, classes = SIZES[size]
        rounds = args.rounds or ROUNDS[size]
        results[size] = measure(size, rounds, args.heads)
        print(
            f"\n{size}: B={batch}, d={dim}, C={classes}; mining from {source} ({commit}); "
            f"torch threads={torch.get_num_threads()}; {rounds} rounds"
        )
        print(
            "| head | ms (median) | × softmax (median of per-round ratios) | ms (min) | × softmax (min / min) |"
        )
        print("|---|---:|---:|---:|---:|")
        for label, r in results[size].items():
            print(
                f"| {label} | {r['ms']:.1f} | {r['ratio']:.2f} | {r['min_ms']:.1f} | "
                f"{r['min_ratio']:.2f} |"
            )
    if args.json:
        args.json.write_text(json.dumps({"commit": commit, "results": results}, indent=1))


if __name__ == "__main__":
    main()
