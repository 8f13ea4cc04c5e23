"""Data-parallel speed-up on this machine: 2 ranks x 1 thread vs 1 rank x 1 thread (issue 17).

Each case is one trial run through the local executor (a fresh worker per trial, as
`hembench run` does) at `train.world_size = 1` and `= 2`, with `train.threads = 1` per rank and
the same global batch, so the ratio of the rows' `samples_per_s` (global batch / rank 0's
median step time, warm-up steps excluded) is the speed-up. The two trials of a case alternate
within every repetition (1 then 2, then 2 then 1, ...) so that a change of machine load hits
both sides alike; the 1-minute load average is printed before and after each trial, since on a
shared 2-core machine the ratio measures contention as much as the method
(docs/scale_out.md §5, "Speed-up"). Issue 17's target: >= 1.6x for a model large enough that
communication is not dominant.

Cases (synthetic IvS data, batch-hard triplet; each rank mines only its own anchors against
the global batch and the memory, `mining.distributed.GlobalBatchLoss`):

- `mlp1024`: features dim 256, `mlp` hidden 1024 x depth 3, embedding 128, global batch 2048;
- `mlp1024_mem`: the same with a CB-HEM memory of 8,192 rows (full after 4 steps), where the
  mining scan (anchors x (batch + memory)) is a large share of the step;
- `mlp2048`: hidden 2048, global batch 1024;
- `cnn_small`: 3x32x32 rendered images, `cnn_small` width 32, embedding 64, global batch 256.

    python benchmarks/ddp_scaling.py                 # 3 repetitions of every case, 40 steps
    python benchmarks/ddp_scaling.py --reps 5 --steps 60 --cases mlp1024 cnn_small
    python benchmarks/ddp_scaling.py --smoke         # tiny sizes, 1 repetition: does it run?
    python benchmarks/ddp_scaling.py --floor --cases mlp2048   # + the machine's parallel floor

Prints markdown tables: every trial, then per case the medians and the median of the
per-repetition ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from harness.executors.local import LocalExecutor
from harness.records import TrialOutcome, TrialSpec
from harness.suite import parse_suite

TEMPLATE = """
[suite]
name = "ddp_scaling"
seeds = [0]
[data]
kind = "synthetic_ivs"
identities = {identities}
test_identities = 64
{data}
[model]
{model}
[train]
steps = {steps}
warmup_steps = {warmup}
batch = {batch}
lr = 0.05
device = "cpu"
threads = 1
world_size = {world}
[baseline]
{method}
[eval]
far = [1e-1]
"""

MLP1024 = 'kind = "mlp"\nhidden = 1024\ndepth = 3\nembedding = 128'
#: name -> (data keys, model keys, global batch, method keys); the smoke sizes follow
CASES: dict[str, tuple[str, str, int, str]] = {
    "mlp1024": ("dim = 256", MLP1024, 2048, ""),
    "mlp1024_mem": ("dim = 256", MLP1024, 2048, "memory = 8192"),
    "mlp2048": ("dim = 256", 'kind = "mlp"\nhidden = 2048\ndepth = 3\nembedding = 128', 1024, ""),
    "cnn_small": (
        'modality = "images"\nimage_size = 32',
        'kind = "cnn_small"\nwidth = 32\nembedding = 64',
        256,
        "",
    ),
}
SMOKE: dict[str, tuple[str, str, int, str]] = {
    "mlp1024": ("dim = 16", 'kind = "mlp"\nhidden = 32\nembedding = 8', 64, ""),
    "mlp1024_mem": ("dim = 16", 'kind = "mlp"\nhidden = 32\nembedding = 8', 64, "memory = 128"),
    "mlp2048": ("dim = 16", 'kind = "mlp"\nhidden = 64\nembedding = 8', 64, ""),
    "cnn_small": (
        'modality = "images"\nimage_size = 16',
        'kind = "cnn_small"\nwidth = 8\nembedding = 8',
        32,
        "",
    ),
}


def spec(
    case: tuple[str, str, int, str], world: int, steps: int, warmup: int, part: int = 0
) -> TrialSpec:
    """The case's trial on `world` ranks; `part` > 0: a 1-process trial of half the global
    batch (one of the floor's two)."""
    data, model, batch, method = case
    text = TEMPLATE.format(identities=max(256, batch), data=data, model=model, steps=steps,
                           warmup=warmup, batch=batch // 2 if part else batch, world=world,
                           method=method)  # fmt: skip
    trial_id = f"half{part}" if part else f"w{world}"
    return TrialSpec(trial_id, "ddp_scaling", "bench", parse_suite(text).trials[0])


def run_all(specs: list[TrialSpec]) -> list[TrialOutcome]:
    """Run `specs` at once (one worker each) and return their outcomes."""
    got: list[TrialOutcome] = []
    LocalExecutor(jobs=len(specs)).run(specs, got.append)
    for o in got:
        if o.status != "ok":
            raise SystemExit(f"trial {o.trial_id} failed: {o.error}")
    return got


def rate(case: tuple[str, str, int, str], kind: str, steps: int, warmup: int) -> float:
    """samples/s of kind "1" or "2" (ranks), or "floor": two independent 1-process trials of
    half the global batch at once, no communication — their summed samples/s is what the two
    cores give a perfectly parallel job (an upper bound: each mines only its half batch)."""
    if kind == "floor":
        halves = run_all([spec(case, 1, steps, warmup, part) for part in (1, 2)])
        return sum(o.row["samples_per_s"] for o in halves)
    return run_all([spec(case, int(kind), steps, warmup)])[0].row["samples_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each (1, 2) pair")
    ap.add_argument("--steps", type=int, default=40, help="training steps per trial")
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded from samples/s")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 rep, 4 steps")
    ap.add_argument("--floor", action="store_true",
                    help="also run the floor: 2 independent half-batch trials at once")  # fmt: skip
    args = ap.parse_args()
    cases = SMOKE if args.smoke else CASES
    reps, steps, warmup = (1, 4, 1) if args.smoke else (args.reps, args.steps, args.warmup)
    print(f"cores: {os.cpu_count()}, affinity: {len(os.sched_getaffinity(0))}; "
          f"{steps} steps ({warmup} warm-up), threads = 1 per rank\n")  # fmt: skip
    print("| case | rep | ranks | samples/s | load before → after |")
    print("|---|---:|---:|---:|---|")
    kinds = ["1", "2", "floor"] if args.floor else ["1", "2"]
    rates: dict[str, dict[str, list[float]]] = {c: {k: [] for k in kinds} for c in args.cases}
    for rep in range(reps):
        for name in args.cases:
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                before = os.getloadavg()[0]
                r = rate(cases[name], kind, steps, warmup)
                rates[name][kind].append(r)
                print(f"| {name} | {rep} | {kind} | {r:.0f} | "
                      f"{before:.2f} → {os.getloadavg()[0]:.2f} |", flush=True)  # fmt: skip
                time.sleep(1.0)  # let the ranks' exit settle before the next start
    floor_head = " floor: 2 × half batch | floor ratio |" if args.floor else ""
    print("\n| case | global batch | 1 rank × 1 thread | 2 ranks × 1 thread | ratio (median "
          f"of reps) | ratios per rep |{floor_head}")  # fmt: skip
    print("|---|---:|---:|---:|---:|---|" + ("---:|---:|" if args.floor else ""))
    for name in args.cases:
        one, two = rates[name]["1"], rates[name]["2"]
        ratios = [b / a for a, b in zip(one, two, strict=True)]
        row = (f"| {name} | {cases[name][2]} | {statistics.median(one):.0f} | "
               f"{statistics.median(two):.0f} | {statistics.median(ratios):.2f} | "
               f"{', '.join(f'{r:.2f}' for r in ratios)} |")  # fmt: skip
        if args.floor:
            floor = rates[name]["floor"]
            floor_ratios = [f / a for a, f in zip(one, floor, strict=True)]
            row += f" {statistics.median(floor):.0f} | {statistics.median(floor_ratios):.2f} |"
        print(row)


if __name__ == "__main__":
    main()
