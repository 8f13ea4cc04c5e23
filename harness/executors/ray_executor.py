"""The Ray executor (`--executor ray`, optional extra `hembench[ray]`): one Ray task per trial.

Where it runs: the Ray cluster at `address` (default: the `RAY_ADDRESS` environment variable),
or a Ray already initialised in this process, or else a local Ray started here with `num_cpus`
CPUs (and shut down again when `run` returns). See docs/scale_out.md for multi-node clusters.

Each trial is one remote task, run by `harness.trial.execute_trial` in a worker process:
- resources: `num_gpus=1` when the trial runs on CUDA (`train.device = "cuda"`, or `"auto"` on a
  cluster that has GPUs; Ray then sets `CUDA_VISIBLE_DEVICES` to the GPU it reserved), and
  `cpus_per_trial` CPUs; torch's intra-op threads are set to that many so that trials sharing a
  node do not oversubscribe its cores;
- isolation: `max_calls=1`, so each trial gets a fresh worker process (its own CUDA context and
  allocator peaks, its own peak RSS), as with the local executor;
- `max_retries=0`: a trial that crashes its worker is not re-run; it is reported with status
  `failed` (`oom` when Ray's memory monitor killed it) and the grid goes on;
- outcomes come back with `ray.wait` in completion order, into the caller's `on_result` (which
  writes the per-trial Parquet files: same statuses and `--resume` as the local executor);
- at most `jobs` trials are in flight; without `jobs`, at most as many ranks (a trial of
  `train.world_size = N` counts N) as the cluster's CPU count // `cpus_per_trial`, or its GPU
  count when every trial needs a GPU, so a trial's `timeout_s`, counted from its submission,
  is not spent waiting in Ray's queue; an overdue trial's worker is killed
  (`ray.cancel(force=True)`) and reported as `timeout`.
A trial with `train.world_size = N > 1` runs as N rank actors in a placement group of its own
(`harness.executors.ray_ddp`, strategy `placement_strategy`), removed when the trial ends,
whatever ends it; a trial the cluster can never place (more ranks than its GPUs or CPUs) stops
the run before anything runs (`RunInputError` naming `train.world_size`: exit 2).
Progress updates are not forwarded (the protocol allows dropping them).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import ray.exceptions

from harness.executors import ray_ddp
from harness.executors.base import (
    ProgressCallback,
    ResultCallback,
    TrialOutcome,
    TrialSpec,
    failure_outcome,
    timeout_outcome,
)

TrialFn = Callable[[TrialSpec], TrialOutcome]


def _execute(spec: TrialSpec, trial_fn: TrialFn | None, threads: int) -> TrialOutcome:
    """Body of the remote task: run one trial in this (fresh) worker process."""
    import torch

    torch.set_num_threads(threads)
    if trial_fn is None:
        from harness.trial import execute_trial

        trial_fn = execute_trial
    return trial_fn(spec)


@dataclass
class _InFlight:
    spec: TrialSpec
    submitted: float
    pg: Any = None  # a data-parallel trial's placement group, removed when the trial ends


def needs_gpu(spec: TrialSpec, cluster_has_gpus: bool) -> bool:
    """Whether the trial's task must reserve a GPU (its resolved `train.device`)."""
    device = spec.config.train.device
    return device == "cuda" or (device == "auto" and cluster_has_gpus)


def outcome_of_error(spec: TrialSpec, exc: ray.exceptions.RayError) -> TrialOutcome:
    """The outcome of a task that ended without returning one (crash, kill, raise)."""
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return failure_outcome(spec, "oom", f"Ray killed the worker for host memory: {exc}")
    if isinstance(exc, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError):
        return failure_outcome(spec, "failed", f"worker process died without a result: {exc}")
    return failure_outcome(spec, "failed", f"{type(exc).__name__}: {exc}")


class RayExecutor:
    """Runs each trial as a Ray task and streams outcomes back as they finish.

    Args:
        jobs: most trials in flight at once (None: the cluster's capacity, see module doc).
        address: Ray cluster address (default: `RAY_ADDRESS`; neither -> a local Ray).
        num_cpus: CPUs of a local Ray started here (default: `jobs * cpus_per_trial` times the
            largest `train.world_size`, or all).
        cpus_per_trial: CPUs each task reserves (and torch threads it uses); per rank for a
            data-parallel trial.
        runtime_env: Ray runtime environment for `ray.init` (e.g. `{"working_dir": "."}` on a
            cluster whose nodes lack this checkout).
        trial_fn: runs one spec in the worker (default `harness.trial.execute_trial`); must be
            importable or picklable by Ray.
        placement_strategy: how a data-parallel trial's ranks are spread over nodes: PACK
            (default: as few nodes as possible), SPREAD, STRICT_PACK or STRICT_SPREAD.
    """

    def __init__(
        self,
        jobs: int | None = None,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        cpus_per_trial: int = 1,
        runtime_env: dict[str, Any] | None = None,
        trial_fn: TrialFn | None = None,
        placement_strategy: str = "PACK",
    ) -> None:
        for name, value in (("jobs", jobs), ("num_cpus", num_cpus)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1 or None; got {value!r}")
        if not isinstance(cpus_per_trial, int) or cpus_per_trial < 1:
            raise ValueError(f"cpus_per_trial must be an int >= 1; got {cpus_per_trial!r}")
        if placement_strategy not in ray_ddp.STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {', '.join(ray_ddp.STRATEGIES)}; "
                             f"got {placement_strategy!r}")  # fmt: skip
        self.jobs = jobs
        self.address = address if address is not None else os.environ.get("RAY_ADDRESS")
        self.num_cpus = num_cpus
        self.cpus_per_trial = cpus_per_trial
        self.runtime_env = runtime_env
        self.trial_fn = trial_fn
        self.placement_strategy = placement_strategy

    def run(
        self,
        trials: list[TrialSpec],
        on_result: ResultCallback,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        if not trials:
            return
        started_here = self._connect(max(s.config.train.world_size for s in trials))
        try:
            self._run(trials, on_result)
        finally:  # also on Ctrl-C or a failed write: never leave a local Ray behind
            if started_here:
                with contextlib.suppress(Exception):
                    ray.shutdown()

    def _connect(self, ranks: int) -> bool:
        """Attach to the cluster (or the Ray already running here); True if we started one
        (with room for `jobs` trials of `ranks` ranks when `jobs` is given)."""
        if ray.is_initialized():
            return False
        options: dict[str, Any] = {"runtime_env": self.runtime_env, "log_to_driver": False}
        if self.address:
            ray.init(address=self.address, **options)
            return True  # ray.shutdown() only disconnects this driver from a remote cluster
        local_cpus = self.num_cpus or (
            self.jobs * self.cpus_per_trial * ranks if self.jobs else os.cpu_count()
        )
        ray.init(num_cpus=local_cpus, include_dashboard=False, **options)
        return True

    def _capacity(self, gpu_trials_only: bool, resources: dict[str, float]) -> int:
        if self.jobs is not None:
            return self.jobs
        if gpu_trials_only:
            return max(1, int(resources.get("GPU", 0)))
        return max(1, int(resources.get("CPU", 1) // self.cpus_per_trial))

    def _run(self, trials: list[TrialSpec], on_result: ResultCallback) -> None:
        resources = ray.cluster_resources()
        has_gpus = resources.get("GPU", 0) > 0
        gpu = {s.trial_id: needs_gpu(s, has_gpus) for s in trials}
        problems = ray_ddp.fit_problems(trials, resources, self.cpus_per_trial, gpu)
        if problems:  # nothing has run: bad input, not failed trials
            from harness.runner import RunInputError

            raise RunInputError("; ".join(problems))
        capacity = self._capacity(all(gpu.values()), resources)
        task = ray.remote(max_calls=1, max_retries=0)(_execute)
        pending = list(reversed(trials))  # pop() from the end keeps submission order
        in_flight: dict[ray.ObjectRef, _InFlight] = {}
        try:
            while pending or in_flight:
                while pending and self._room(in_flight, pending[-1], capacity):
                    spec, pg = pending.pop(), None
                    if ray_ddp.is_ddp(spec):
                        ref, pg = ray_ddp.start(spec, gpu[spec.trial_id], self.cpus_per_trial,
                                                self.placement_strategy, self.trial_fn)  # fmt: skip
                    else:
                        ref = task.options(
                            num_cpus=self.cpus_per_trial,
                            num_gpus=1 if gpu[spec.trial_id] else 0,
                            name=f"trial-{spec.trial_id}",
                        ).remote(spec, self.trial_fn, self.cpus_per_trial)
                    in_flight[ref] = _InFlight(spec, time.monotonic(), pg)
                done, _ = ray.wait(
                    list(in_flight), num_returns=1, timeout=self._wait_timeout(in_flight)
                )
                for ref in done:
                    f = in_flight.pop(ref)
                    ray_ddp.release(f.pg)
                    on_result(self._collect(ref, f.spec))
                self._kill_overdue(in_flight, on_result)
        finally:  # interrupted (Ctrl-C) or on_result raised: stop what is still running
            for ref, f in in_flight.items():
                ray.cancel(ref, force=True)
                ray_ddp.release(f.pg)

    def _room(
        self, in_flight: dict[ray.ObjectRef, _InFlight], spec: TrialSpec, capacity: int
    ) -> bool:
        """Whether `spec` may start now: `jobs` counts trials, the cluster's capacity ranks
        (a trial too big for it still runs, alone)."""
        if not in_flight:
            return True
        if self.jobs is not None:
            return len(in_flight) < capacity
        ranks = sum(f.spec.config.train.world_size for f in in_flight.values())
        return ranks + spec.config.train.world_size <= capacity

    @staticmethod
    def _collect(ref: ray.ObjectRef, spec: TrialSpec) -> TrialOutcome:
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:
            return outcome_of_error(spec, exc)

    @staticmethod
    def _wait_timeout(in_flight: dict[ray.ObjectRef, _InFlight]) -> float | None:
        deadlines = [
            f.submitted + f.spec.timeout_s
            for f in in_flight.values()
            if f.spec.timeout_s is not None
        ]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    @staticmethod
    def _kill_overdue(in_flight: dict[ray.ObjectRef, _InFlight], on_result: ResultCallback) -> None:
        now = time.monotonic()
        for ref, f in list(in_flight.items()):
            if f.spec.timeout_s is not None and now - f.submitted > f.spec.timeout_s:
                ray.cancel(ref, force=True)
                ray_ddp.release(f.pg)  # also kills the ranks, whose owner is the task
                del in_flight[ref]
                on_result(timeout_outcome(f.spec, now - f.submitted))
