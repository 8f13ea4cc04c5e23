"""The worker side of the local executor: one spawned process runs one trial.

A worker must never outlive its run, and never write to a terminal nobody reads:
- it dies with the runner: `PR_SET_PDEATHSIG` (Linux: the kernel sends SIGKILL when the parent
  dies, even by kill -9; the parent is the forkserver, which exits with the runner) plus a
  watchdog thread that checks every `LIVENESS_INTERVAL_S` that the runner process is still
  alive (every platform, and the race before the prctl);
- it enforces its own deadline: the watchdog ends the process with `EXIT_TIMEOUT` at
  `deadline + grace` (the parent normally kills it at `deadline`; this covers a parent that is
  gone or stuck);
- it ignores SIGINT: Ctrl-C reaches the whole process group, and the parent alone handles it
  (it kills its workers and records the interruption);
- a message the parent can no longer receive (BrokenPipe, EOF) is dropped, not printed.

This module imports only the standard library at the top, so that the prctl happens before the
seconds of importing torch. Worker -> parent messages: ("progress", dict) any number of times,
then ("result", TrialOutcome) once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from typing import Any

EXIT_TIMEOUT = 124  # the worker ran past its own deadline (same code as coreutils `timeout`)
EXIT_ORPHANED = 125  # the parent died: nobody will read the result
LIVENESS_INTERVAL_S = 0.5
PROGRESS_INTERVAL_S = 0.5  # a worker sends at most this often: the pipe is not a log
PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux); True if set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:  # no /proc (not Linux): kill(0) said it exists
        return True


def watchdog_verdict(now: float, deadline: float | None, runner_alive: bool) -> int | None:
    """The exit code the watchdog ends the worker with now, or None to keep running."""
    if not runner_alive:
        return EXIT_ORPHANED
    if deadline is not None and now > deadline:
        return EXIT_TIMEOUT
    return None


def _watchdog(parent_pid: int, hard_deadline: list[float | None]) -> None:
    while True:  # hard_deadline[0] moves by the data preparation time (`run_worker`)
        code = watchdog_verdict(time.monotonic(), hard_deadline[0], process_alive(parent_pid))
        if code is not None:
            os._exit(code)  # no cleanup: the trial may be stuck in native code
        time.sleep(LIVENESS_INTERVAL_S)


def _send(conn: Any, message: tuple[str, Any]) -> bool:
    """Send to the parent; False (silently) if it can no longer receive."""
    try:
        conn.send(message)
        return True
    except (BrokenPipeError, EOFError, ConnectionError, OSError):
        return False


def run_worker(
    spec: Any,
    conn: Any,
    parent_pid: int,
    deadline: float | None = None,
    environ: dict[str, str] | None = None,
    grace_s: float = 5.0,
    pdeathsig: bool = True,
) -> None:
    """Process target: run `spec` and send its outcome to `conn`.

    `deadline` is a `time.monotonic()` value of the parent (CLOCK_MONOTONIC is system-wide);
    `environ` is applied before torch is imported (e.g. `CUDA_VISIBLE_DEVICES`).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if pdeathsig:
        die_with_parent()
    if not process_alive(parent_pid):  # the runner died before the prctl took effect
        os._exit(EXIT_ORPHANED)
    hard = [None if deadline is None else deadline + grace_s]
    threading.Thread(target=_watchdog, args=(parent_pid, hard), daemon=True).start()
    os.environ.update(environ or {})

    last = 0.0

    def progress(update: dict[str, Any]) -> None:
        nonlocal last
        if update.get("phase") == "prepared":  # never dropped: the timeouts count from here
            if hard[0] is not None:
                hard[0] += update["prep_s"]
            _send(conn, ("progress", update))
            return
        now = time.monotonic()
        if now - last >= PROGRESS_INTERVAL_S:
            last = now
            _send(conn, ("progress", update))

    try:
        from harness.trial import execute_trial

        outcome = execute_trial(spec, progress=progress)
    except Exception as exc:  # e.g. an import error: still a result, never a traceback
        from harness.records import failure_outcome

        outcome = failure_outcome(spec, "failed", f"worker: {type(exc).__name__}: {exc}")
    _send(conn, ("result", outcome))
    with contextlib.suppress(OSError):
        conn.close()
