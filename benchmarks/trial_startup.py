"""Per-trial fixed cost of the local executor: worker start → result, minus the trial's own
work, for each multiprocessing start method (issue 16: torch.optim in every trial).

Each trial is the smallest real one (an MLP, 1 step, a tiny synthetic set); trials run one at a
time (`jobs = 1`), so the figure is what every trial pays before its first step and after its
last. Run: python benchmarks/trial_startup.py [trials]   (prints a markdown table)
"""

from __future__ import annotations

import statistics
import sys
import time

from harness.executors.local import LocalExecutor
from harness.records import TrialSpec
from harness.suite import parse_suite
from harness.trial import run_trial

TINY = """
[suite]
name = "startup"
seeds = [{seeds}]
[data]
kind = "synthetic_ivs"
identities = 64
test_identities = 32
dim = 8
lookalike_groups = 4
[model]
kind = "mlp"
embedding = 8
[train]
steps = 1
batch = 16
device = "cpu"
threads = 1
[eval]
far = [1e-1]
"""


def per_trial(method: str, n: int) -> list[float]:
    suite = parse_suite(TINY.format(seeds=", ".join(map(str, range(n)))))
    specs = [TrialSpec(f"t{i}", "startup", "bench", c, i) for i, c in enumerate(suite.trials)]
    done: list[float] = []
    t0 = time.perf_counter()
    LocalExecutor(jobs=1, start_method=method).run(
        specs, lambda outcome: done.append(time.perf_counter())
    )
    return [b - a for a, b in zip([t0, *done[:-1]], done, strict=True)]


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    suite = parse_suite(TINY.format(seeds="0"))
    run_trial(suite.trials[0])  # warm this process's imports
    t = time.perf_counter()
    run_trial(suite.trials[0])
    work = time.perf_counter() - t
    print(f"in-process trial (the work itself): {work:.3f} s")
    print("| start method | trials | median s per trial | fixed cost (median − work) |")
    print("|---|---|---|---|")
    for method in ("spawn", "forkserver"):
        times = per_trial(method, n)
        steady = times[1:] if method == "forkserver" else times  # first: the server starts
        med = statistics.median(steady)
        print(f"| {method} | {n} | {med:.2f} | {med - work:.2f} |")
        if method == "forkserver":
            print(f"(forkserver start, first trial: {times[0]:.2f} s)")
