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
  `failure_outcome(spec, "failed", ...)`; the remaining trials go on;
- `on_progress`, when given, may receive `(trial_id, {"step", "loss", "samples_per_s"})`
  updates while a trial runs (best effort, may be dropped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Status = Literal["ok", "failed", "oom", "nan", "timeout"]
STATUSES: tuple[str, ...] = ("ok", "failed", "oom", "nan", "timeout")


@dataclass(frozen=True)
class TrialSpec:
    """One trial to run: a resolved, JSON-serialisable config plus where it belongs.

    `config` is `harness.suite.TrialConfig.model_dump()` (plain dicts, lists and scalars),
    so a spec pickles across processes and machines without importing torch.
    `timeout_s` is the wall-clock budget for the whole trial (None = no limit).
    """

    trial_id: str
    suite: str
    run_id: str
    seed: int
    config: dict[str, Any]
    timeout_s: float | None = None


@dataclass
class TrialOutcome:
    """What a trial produced.

    `row` is the one-row result (column -> scalar; see `harness.trial` for the columns);
    `curves` holds per-step columns of equal length (`step`, `loss`, `samples_per_s`,
    `memory_share`, `neg_age`, `drift`); `error` is the error text for non-ok statuses.
    """

    trial_id: str
    status: Status
    row: dict[str, Any]
    curves: dict[str, list[Any]] = field(default_factory=dict)
    error: str | None = None


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


def failure_outcome(spec: TrialSpec, status: Status, error: str) -> TrialOutcome:
    """An outcome for a trial that produced no measurements (crash, kill, timeout, ...).

    The row still carries the trial's identity and config columns so that `show` and `--resume`
    can see it.
    """
    from harness.trial import base_row  # lazy: keeps this module import-light for Ray drivers

    row = base_row(spec)
    row.update(status=status, error=error)
    return TrialOutcome(trial_id=spec.trial_id, status=status, row=row, curves={}, error=error)


def timeout_outcome(spec: TrialSpec, elapsed_s: float) -> TrialOutcome:
    """The outcome of a trial stopped after `elapsed_s` seconds for exceeding `spec.timeout_s`."""
    return failure_outcome(
        spec, "timeout", f"timed out after {elapsed_s:.1f} s (limit {spec.timeout_s} s)"
    )
