"""Process plumbing of `harness.ddp`'s local launcher: rank processes on this machine.

Standard library only (no torch), so that a Ray rank actor can name itself with
`name_process` before it imports anything heavy.

- `LocalRanks` turns the ranks' pipes (messages) and process sentinels (ends) into the events
  `harness.ddp.supervise` reads;
- `die_with_parent` makes a rank die with the trial's process: SIGKILL from the kernel
  (`PR_SET_PDEATHSIG`, Linux) plus a watchdog thread on the parent pid;
- `children_allowed` lets a daemonic process (a local-executor worker) start the ranks;
- `kill_all` leaves no rank behind (no orphans, no zombies).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any


class LocalRanks:
    """Spawned rank processes, as `harness.ddp.supervise` sees them (a `RankGroup`)."""

    def __init__(self, procs: list[Any], conns: list[Connection]) -> None:
        self.procs, self.world = procs, len(procs)
        self.open = dict(zip(conns, range(len(procs)), strict=True))
        self.reported: set[int] = set()

    def poll(self, timeout: float) -> list[tuple[str, int, Any]]:
        """Messages (`(kind, payload)` from a rank's pipe) and ends since the last call."""
        events: list[tuple[str, int, Any]] = []
        running = [p.sentinel for p in self.procs if p.exitcode is None]
        for conn in [c for c in wait([*self.open, *running], timeout) if c in self.open]:
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                del self.open[conn]  # the rank exited (or died mid-message)
                continue
            events.append((kind, self.open[conn], payload))
        for rank, p in enumerate(self.procs):  # after the pipes: a result precedes its exit
            if p.exitcode is not None and rank not in self.reported:
                self.reported.add(rank)
                events.append(("ended", rank, p.exitcode))
        return events


def kill_all(procs: list[Any]) -> None:
    """SIGKILL every rank still running and reap them all (no orphans, no zombies)."""
    for p in procs:
        if p.exitcode is None:
            with contextlib.suppress(ProcessLookupError, AttributeError):
                p.kill()
    for p in procs:
        with contextlib.suppress(AssertionError):
            p.join(timeout=10)


@contextlib.contextmanager
def children_allowed():
    """Let a daemonic process (a local-executor worker) start the ranks: multiprocessing
    refuses because a daemon's children would outlive it — the ranks die with their parent
    (`die_with_parent`), so the refusal does not apply."""
    config = mp.current_process()._config  # type: ignore[attr-defined]
    had, daemon = "daemon" in config, config.get("daemon")
    config["daemon"] = False
    try:
        yield
    finally:
        if had:
            config["daemon"] = daemon
        else:
            config.pop("daemon", None)


def name_process(rank: int) -> None:
    """Name this process `hembench-r<rank>` (ps, /proc/<pid>/comm; Linux only)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(15, f"hembench-r{rank}".encode())  # PR_SET_NAME


def die_with_parent(parent_pid: int, rank: int) -> None:
    """SIGKILL from the kernel when the parent dies (Linux), a watchdog thread elsewhere, and
    the process named `hembench-r<rank>`."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    name_process(rank)
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before prctl took effect

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
