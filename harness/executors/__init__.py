"""Executors run trials: `local` (a process per trial, `--jobs N`) and `ray`.

`get_executor(name, **options)` returns one; the protocol is in `harness.executors.base`.
"""

from __future__ import annotations

from typing import Any

from harness.executors.base import (
    Executor,
    TrialOutcome,
    TrialSpec,
    failure_outcome,
    timeout_outcome,
)

EXECUTORS: tuple[str, ...] = ("local", "ray")

__all__ = [
    "EXECUTORS",
    "Executor",
    "TrialOutcome",
    "TrialSpec",
    "failure_outcome",
    "get_executor",
    "timeout_outcome",
]


def get_executor(name: str, **options: Any) -> Executor:
    """Build the executor called `name` (one of `EXECUTORS`).

    Options: `jobs` (parallel trials; None = the executor's default); local only:
    `in_process` (run trials in this process), `gpus` (device names for the workers'
    `CUDA_VISIBLE_DEVICES`), `allow_gpu_sharing` (more CUDA trials at once than GPUs).
    The Ray executor is `harness.executors.ray_executor.RayExecutor(jobs=...)` (Ray reserves
    GPUs itself).
    """
    if name == "local":
        from harness.executors.local import LocalExecutor

        options["jobs"] = options.get("jobs") or 1
        return LocalExecutor(**options)
    if name == "ray":
        from harness.executors.ray_executor import RayExecutor

        for local_only in ("in_process", "gpus", "allow_gpu_sharing"):
            options.pop(local_only, None)
        return RayExecutor(**options)
    raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}; got {name!r}")
