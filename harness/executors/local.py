"""The local executor: every trial in its own spawned worker process, `jobs` at a time.

Why a process per trial (not a pool that reuses workers): a fresh CUDA context per trial makes
the allocator and NVML peaks the trial's own, a crash or leak ends with its trial, and a hung
trial can be killed (SIGKILL) at its timeout without disturbing the others. Workers are forked
from a *forkserver* (not from this process: CUDA cannot be re-initialised in a forked child,
and the server never touches CUDA) that has torch, torch.optim with the `torch._dynamo` it
imports, and the harness preloaded: a fresh process per trial without paying ~2–4 s of imports
in each (docs/benchmarks.md, "Trial start-up"). `start_method="spawn"` is the slow, plain way. The worker side (dies with this
process, enforces its own deadline, ignores Ctrl-C) is `harness.executors.worker`.

GPUs: a CUDA trial's worker sees one GPU (`CUDA_VISIBLE_DEVICES`, round-robin over the visible
devices), and at most one CUDA trial runs per GPU unless `allow_gpu_sharing`
(`harness.executors.placement`).

A trial's timeout counts from the end of its data preparation (the worker reports it: a
`{"phase": "prepared", "prep_s": ...}` progress message), so decoding a large image folder or
producing a cache never eats the training budget; a timeout says the phase and step reached. A worker
that dies without a result is reported `failed` with its signal or exit code (`oom` when the
kernel's OOM-kill counter says so; `timeout` when it stopped itself at its deadline).

`in_process=True` runs trials one by one in the calling process (for debugging with pdb);
timeouts are then cooperative (checked between steps), so a trial stuck in one call cannot be
stopped.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Sequence
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
from harness.executors.placement import classify_death, gpu_slots, needs_gpu, oom_kill_count
from harness.executors.worker import run_worker

WORKER_GRACE_S = 5.0  # a worker stops itself this long after its deadline if nobody killed it
#: imported once in the forkserver, inherited by every worker it forks
PRELOAD = ("torch", "torch.optim", "torch._dynamo", "harness.trial", "harness.executors.worker")


@dataclass
class _Running:
    spec: TrialSpec
    proc: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    started: float
    gpu: str | None
    oom_before: int | None
    last: dict[str, Any] | None = None  # the latest progress update: how far the trial got


class LocalExecutor:
    """Runs trials in spawned worker processes (`jobs` at once) or in this process.

    `gpus`: the device names a worker's `CUDA_VISIBLE_DEVICES` may take (see
    `placement.visible_devices`; None: no GPU assignment); `allow_gpu_sharing`: run up to
    `jobs` CUDA trials at once even with fewer GPUs (round-robin).
    """

    def __init__(
        self,
        jobs: int = 1,
        in_process: bool = False,
        gpus: Sequence[str] | None = None,
        allow_gpu_sharing: bool = False,
        grace_s: float = WORKER_GRACE_S,
        start_method: str = "forkserver",
    ):
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1; got {jobs}")
        self.jobs = jobs
        self.in_process = in_process
        self.gpus = list(gpus or [])
        self.allow_gpu_sharing = allow_gpu_sharing
        self.grace_s = grace_s
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn'; got {start_method!r}")
        self.start_method = start_method

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
        from harness.trial import execute_trial

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
        ctx = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            ctx.set_forkserver_preload(list(PRELOAD))  # effective when the server starts
        pending = list(reversed(trials))  # pop() from the end keeps submission order
        self._free_gpus = gpu_slots(self.gpus, self.jobs, self.allow_gpu_sharing)
        running: dict[Connection, _Running] = {}
        try:
            while pending or running:
                while pending and len(running) < self.jobs:
                    gpu = self._gpu_for(pending[-1])
                    if gpu is False:
                        break  # the next trial waits for a GPU (submission order is kept)
                    spec = pending.pop()
                    running_trial = self._start(ctx, spec, gpu or None)
                    running[running_trial.conn] = running_trial
                for conn in wait(list(running), timeout=self._wait_timeout(running.values())):
                    self._receive(running, conn, on_result, on_progress)
                self._kill_overdue(running, on_result)
        finally:  # interrupted (Ctrl-C) or on_result raised: leave no orphan workers behind
            for r in running.values():
                r.proc.kill()
                r.proc.join()

    def _gpu_for(self, spec: TrialSpec) -> str | bool:
        """A free GPU slot for a CUDA trial, "" for a trial that needs none, False to wait."""
        if not self.gpus or not needs_gpu(spec.config.train.device, True):
            return ""
        return self._free_gpus.pop(0) if self._free_gpus else False

    def _start(self, ctx: Any, spec: TrialSpec, gpu: str | None) -> _Running:
        recv, send = ctx.Pipe(duplex=False)
        started = time.monotonic()
        deadline = None if spec.timeout_s is None else started + spec.timeout_s
        environ = {} if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu}
        proc = ctx.Process(
            target=run_worker,
            args=(spec, send, os.getpid(), deadline, environ, self.grace_s),
            # not daemonic: a trial's DataLoader starts worker processes of its own (the worker
            # dies with this process anyway: PR_SET_PDEATHSIG, harness.executors.worker)
            daemon=False,
            name=f"trial-{spec.trial_id}",
        )
        oom_before = oom_kill_count()
        proc.start()
        send.close()  # the child holds the only write end: EOF when it dies
        return _Running(spec, proc, recv, started, gpu, oom_before)

    def _finish(self, running: dict[Connection, _Running], conn: Connection) -> _Running:
        r = running.pop(conn)
        r.proc.join()
        conn.close()
        if r.gpu is not None:
            self._free_gpus.append(r.gpu)
        return r

    @staticmethod
    def _wait_timeout(running: Any) -> float | None:
        deadlines = [r.started + r.spec.timeout_s for r in running if r.spec.timeout_s is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _receive(
        self,
        running: dict[Connection, _Running],
        conn: Connection,
        on_result: ResultCallback,
        on_progress: ProgressCallback | None,
    ) -> None:
        r = running[conn]
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):  # the worker died without reporting
            self._finish(running, conn)
            status, error = classify_death(r.proc.exitcode, r.oom_before, oom_kill_count())
            if status == "timeout":
                on_result(timeout_outcome(r.spec, time.monotonic() - r.started, r.last))
            else:
                on_result(failure_outcome(r.spec, status, error))  # type: ignore[arg-type]
            return
        if kind == "progress":
            r.last = payload
            if payload.get("phase") == "prepared":  # the timeout counts from here
                r.started += payload["prep_s"]
            elif on_progress is not None:
                on_progress(r.spec.trial_id, payload)
            return
        self._finish(running, conn)
        on_result(payload)

    def _kill_overdue(self, running: dict[Connection, _Running], on_result: ResultCallback) -> None:
        now = time.monotonic()
        for conn, r in list(running.items()):
            if r.spec.timeout_s is not None and now - r.started > r.spec.timeout_s:
                r.proc.kill()
                self._finish(running, conn)
                on_result(timeout_outcome(r.spec, now - r.started, r.last))
