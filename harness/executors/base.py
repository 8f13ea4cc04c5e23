"""The executor protocol: how a list of trials is run and how their outcomes come back.

An executor takes picklable `TrialSpec`s, runs each one (in a worker process, a Ray task, ...)
through `harness.trial.execute_trial`, and reports every `TrialOutcome` to `on_result` in the
calling process as soon as it is known (completion order, not submission order). Executors never
write files: the caller persists outcomes (`harness.results`), so every backend gets atomic
writes and resume for free.

Contract for implementers (local, ray, ...):
- call `on_result` exactly once per trial, from the thread that called `run`;
- a trial that exceeds `spec.timeout_s` is stopped and reported with `timeout_outcome`;
- a worker that dies without reporting (segfault, kill -9, OOM killer) is reported with
  `failure_outcome(spec, "failed", ...)` naming the signal or exit code, or `"oom"` where there
  is evidence of the OOM killer (both from `harness.records`); the remaining trials go on;
- on any exception (Ctrl-C, `on_result` failing on a full disk) stop every running trial
  before re-raising, and release what the executor started (worker processes, a local Ray);
- `on_progress`, when given, may receive `(trial_id, {"step", "loss", "samples_per_s"})`
  updates while a trial runs (best effort, may be dropped).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from harness.records import TrialOutcome, TrialSpec, failure_outcome, timeout_outcome

__all__ = [
    "Executor",
    "ProgressCallback",
    "ResultCallback",
    "TrialOutcome",
    "TrialSpec",
    "failure_outcome",
    "timeout_outcome",
]

ResultCallback = Callable[[TrialOutcome], None]
ProgressCallback = Callable[[str, dict[str, Any]], None]


@runtime_checkable
class Executor(Protocol):
    """Runs trials and streams their outcomes back to the caller."""

    def run(
        self,
        trials: list[TrialSpec],
        on_result: ResultCallback,
        on_progress: ProgressCallback | None = None,
    ) -> None: ...
