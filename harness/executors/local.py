"""The local executor: every trial in its own spawned worker process, `jobs` at a time.

Why a process per trial (not a pool that reuses workers): a fresh CUDA context per trial makes
the allocator and NVML peaks the trial's own, a crash or leak ends with its trial, and a hung
trial can be killed (SIGKILL) at its timeout without disturbing the others. `spawn` (not fork)
because CUDA cannot be re-initialised in a forked child.

`in_process=True` runs trials one by one in the calling process (for debugging with pdb);
timeouts are then cooperative (checked between steps), so a trial stuck in one call cannot be
stopped.

Worker -> parent messages on a pipe: ("progress", dict) any number of times, then
("result", TrialOutcome) once.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from harness.executors.base import (
    ProgressCallback,
    ResultCallback,
    TrialSpec,
    failure_outcome,
    timeout_outcome,
)
from harness.trial import execute_trial

PROGRESS_INTERVAL_S = 0.5  # a worker sends at most this often: the pipe is not a log


def _worker(spec: TrialSpec, conn: Connection) -> None:
    last = 0.0

    def progress(update: dict[str, Any]) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_INTERVAL_S:
            last = now
            conn.send(("progress", update))

    outcome = execute_trial(spec, progress=progress)
    conn.send(("result", outcome))
    conn.close()


@dataclass
class _Running:
    spec: TrialSpec
    proc: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    started: float


class LocalExecutor:
    """Runs trials in spawned worker processes (`jobs` at once) or in this process."""

    def __init__(self, jobs: int = 1, in_process: bool = False):
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1; got {jobs}")
        self.jobs = jobs
        self.in_process = in_process

    def run(
        self,
        trials: list[TrialSpec],
        on_result: ResultCallback,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        if self.in_process:
            self._run_in_process(trials, on_result, on_progress)
        else:
            self._run_workers(trials, on_result, on_progress)

    def _run_in_process(
        self,
        trials: list[TrialSpec],
        on_result: ResultCallback,
        on_progress: ProgressCallback | None,
    ) -> None:
        for spec in trials:
            deadline = None if spec.timeout_s is None else time.monotonic() + spec.timeout_s

            def progress(update: dict[str, Any], tid: str = spec.trial_id) -> None:
                if on_progress is not None:
                    on_progress(tid, update)

            on_result(execute_trial(spec, progress=progress, deadline=deadline))

    def _run_workers(
        self,
        trials: list[TrialSpec],
        on_result: ResultCallback,
        on_progress: ProgressCallback | None,
    ) -> None:
        ctx = mp.get_context("spawn")
        pending = list(reversed(trials))  # pop() from the end keeps submission order
        running: dict[Connection, _Running] = {}
        try:
            while pending or running:
                while pending and len(running) < self.jobs:
                    spec = pending.pop()
                    recv, send = ctx.Pipe(duplex=False)
                    proc = ctx.Process(
                        target=_worker,
                        args=(spec, send),
                        daemon=True,
                        name=f"trial-{spec.trial_id}",
                    )
                    proc.start()
                    send.close()  # the child holds the only write end: EOF when it dies
                    running[recv] = _Running(spec, proc, recv, time.monotonic())
                for conn in wait(list(running), timeout=self._wait_timeout(running.values())):
                    self._receive(running, conn, on_result, on_progress)
                self._kill_overdue(running, on_result)
        finally:  # interrupted (Ctrl-C): leave no orphan workers behind
            for r in running.values():
                r.proc.kill()
                r.proc.join()

    @staticmethod
    def _wait_timeout(running: Any) -> float | None:
        deadlines = [r.started + r.spec.timeout_s for r in running if r.spec.timeout_s is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    @staticmethod
    def _receive(
        running: dict[Connection, _Running],
        conn: Connection,
        on_result: ResultCallback,
        on_progress: ProgressCallback | None,
    ) -> None:
        r = running[conn]
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):  # the worker died without reporting
            r.proc.join()
            del running[conn]
            conn.close()
            on_result(
                failure_outcome(
                    r.spec,
                    "failed",
                    f"worker process died (exit code {r.proc.exitcode}) without a result",
                )
            )
            return
        if kind == "progress":
            if on_progress is not None:
                on_progress(r.spec.trial_id, payload)
            return
        r.proc.join()
        del running[conn]
        conn.close()
        on_result(payload)

    @staticmethod
    def _kill_overdue(running: dict[Connection, _Running], on_result: ResultCallback) -> None:
        now = time.monotonic()
        for conn, r in list(running.items()):
            if r.spec.timeout_s is not None and now - r.started > r.spec.timeout_s:
                r.proc.kill()
                r.proc.join()
                del running[conn]
                conn.close()
                on_result(timeout_outcome(r.spec, now - r.started))
