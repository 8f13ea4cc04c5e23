"""Where and how a local worker runs: its GPU, its threads, and what its death means.

Pure functions (no torch, no GPU needed), unit-tested in tests/test_executors.py.

GPUs (issue 15 item 5): with `--device cuda --jobs N` every CUDA trial gets a GPU of its own
through `CUDA_VISIBLE_DEVICES` (round-robin over the visible devices), and at most as many CUDA
trials run at once as there are GPUs, unless the user allows sharing.

Deaths (issue 21 item 11): a worker killed by SIGKILL without a timeout is classified `oom`
only on evidence: the kernel's OOM-kill counter (`oom_kill` in the memory cgroup's
`memory.events` / `memory.oom_control`, or `/proc/vmstat`) rose while it ran. Without that
counter the status stays `failed` and the error says "possibly the OOM killer".
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

from harness.executors.worker import EXIT_ORPHANED, EXIT_TIMEOUT


def visible_devices(count: int, environ: Mapping[str, str] | None = None) -> list[str]:
    """The device names a worker's `CUDA_VISIBLE_DEVICES` may take: the entries of this
    process's `CUDA_VISIBLE_DEVICES` when set (indices, UUIDs or MIG ids), else "0".."count-1";
    none when `count` (the GPUs torch sees) is 0."""
    if count <= 0:
        return []
    environ = os.environ if environ is None else environ
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        return [d.strip() for d in value.split(",") if d.strip()]
    return [str(i) for i in range(count)]


def gpu_slots(devices: Sequence[str], jobs: int, allow_sharing: bool = False) -> list[str]:
    """One `CUDA_VISIBLE_DEVICES` value per CUDA trial that may run at once: each device once
    (at most `jobs`), or, when sharing is allowed, `jobs` slots round-robin over the devices."""
    if not devices or jobs < 1:
        return []
    n = jobs if allow_sharing else min(jobs, len(devices))
    return [devices[i % len(devices)] for i in range(n)]


def needs_gpu(device: str, have_gpus: bool) -> bool:
    """Whether a trial with `train.device = device` runs on a GPU."""
    return device == "cuda" or (device == "auto" and have_gpus)


def auto_threads(cores: int, concurrent: int) -> int:
    """Torch threads of a trial that leaves `train.threads = 0`: its share of the cores."""
    return max(1, cores // max(1, concurrent))


def oversubscription_warning(threads: int, concurrent: int, cores: int) -> str | None:
    """A one-line warning when an explicit `train.threads` times the concurrent trials exceeds
    the cores (`plan` and `run` print it), else None."""
    if not threads or threads * concurrent <= cores:
        return None
    return (
        f"warning: train.threads = {threads} x {concurrent} concurrent trials = "
        f"{threads * concurrent} threads on {cores} cores: trials will oversubscribe the CPU "
        "and run slowly (train.threads = 0 shares the cores automatically)"
    )


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else `os.cpu_count()`)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --- deaths -----------------------------------------------------------------------------------


def _own_memory_cgroup_files() -> list[Path]:
    files = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return files
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":  # cgroup v2
            files.append(Path("/sys/fs/cgroup", rel, "memory.events"))
        elif "memory" in controllers.split(","):  # cgroup v1
            files += [
                Path("/sys/fs/cgroup/memory", rel, "memory.oom_control"),
                Path("/sys/fs/cgroup/memory/memory.oom_control"),
            ]
    return files


def oom_kill_count() -> int | None:
    """Kernel OOM kills so far (this memory cgroup's counter, else the host's), or None."""
    for f in [*_own_memory_cgroup_files(), Path("/proc/vmstat")]:
        try:
            m = re.search(r"^oom_kill (\d+)$", f.read_text(), re.MULTILINE)
        except OSError:
            continue
        if m:
            return int(m.group(1))
    return None


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def classify_death(
    exitcode: int | None, oom_before: int | None, oom_after: int | None
) -> tuple[str, str]:
    """(status, error) of a worker that ended without sending a result."""
    if exitcode == EXIT_TIMEOUT:
        return "timeout", "the worker stopped itself at its deadline"
    if exitcode == EXIT_ORPHANED:
        return "failed", "the worker lost its parent process"
    if exitcode is not None and exitcode < 0:
        name = signal_name(-exitcode)
        if -exitcode != signal.SIGKILL:
            return "failed", f"worker process killed by {name} without a result"
        if oom_before is not None and oom_after is not None:
            if oom_after > oom_before:
                return "oom", (
                    "worker process killed by SIGKILL: the kernel OOM killer "
                    f"(oom_kill count {oom_before} -> {oom_after}; out of host memory)"
                )
            return "failed", "worker process killed by SIGKILL (not the OOM killer: no OOM kill)"
        return "failed", "worker process killed by signal 9 (possibly the OOM killer)"
    return "failed", f"worker process died (exit code {exitcode}) without a result"
