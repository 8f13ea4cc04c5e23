"""One trial as `train.world_size` processes under torch.distributed (issue 17).

`run_ranks(cfg, rank_fn, ...)` is called by `harness.trial.run_trial` in the trial's own
process (an executor's worker, or the caller's process in-process) and starts the ranks the way
`torchrun` would: a free localhost port for the rendezvous, then N processes (start method
`spawn`) with MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE set;
each joins the process group (gloo on CPU, NCCL on CUDA with GPU = local rank) and runs
`rank_fn(cfg, progress, deadline_check, workdir)` (`harness.trial._run`). Inside a rank
`mining.distributed.rank_and_world_size()` reports the group, and `harness.build.build_step` /
`harness.train.Trainer` switch to their data-parallel forms (docs/scale_out.md §5).

Rank 0 sends its progress and its result (row values, curves); the other ranks send nothing
unless they fail. The parent polls the ranks' pipes and process sentinels:

- a rank raises: its error (`rank r of N: Type: message [at ...]`) reaches the parent, which
  kills the other ranks (they would block in the next collective) and raises;
- a rank dies without a word (SIGKILL, segfault): the parent sees its sentinel, kills the rest
  and raises `RankFailed` naming the signal — within `POLL_S` plus `GRACE_S`, never waiting for a
  collective's timeout;
- the trial's deadline passes: every rank is killed, `TrialTimeout`;
- the parent itself dies (its executor kills it at a timeout): every rank gets SIGKILL from
  the kernel (`PR_SET_PDEATHSIG`, Linux), and a watchdog thread checks the parent pid as well.

The error's type is kept where it decides the trial's status: `NonFiniteLoss` (nan),
`torch.OutOfMemoryError` (oom), `TrialTimeout`; anything else is `RankFailed` (failed).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.config import TrialConfig
from harness.records import NonFiniteLoss, TrialTimeout
from mining.distributed import rank_and_world_size

POLL_S = 0.2  # how often the parent looks at the ranks when nothing arrives
GRACE_S = 2.0  # after the first failure, how long the parent collects the other ranks' errors
EXIT_S = 30.0  # after rank 0's result, how long the other ranks may take to exit
PG_TIMEOUT_S = 1800.0  # collectives of a rank whose peer hangs (the parent usually kills first)

RankFn = Callable[..., tuple[dict[str, Any], dict[str, list[Any]]]]
_KEPT_TYPES: dict[str, type[Exception]] = {
    "NonFiniteLoss": NonFiniteLoss,
    "OutOfMemoryError": torch.OutOfMemoryError,
    "TrialTimeout": TrialTimeout,
}


class RankFailed(RuntimeError):
    """A rank of a data-parallel trial raised or died; the message says which and why."""


def backend_for(device: torch.device) -> str:
    """The process-group backend of a trial on `device`: NCCL on CUDA, gloo elsewhere."""
    return "nccl" if device.type == "cuda" else "gloo"


def process_group() -> tuple[int, int, str | None]:
    """(rank, world size, backend) of this process; (0, 1, None) outside a process group."""
    rank, world = rank_and_world_size()
    return rank, world, (str(dist.get_backend()) if world > 1 else None)


def free_port() -> int:
    """A localhost TCP port that was free a moment ago (the rendezvous of `torchrun` does the
    same; rank 0 binds it right away)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(
    cfg: TrialConfig,
    rank_fn: RankFn,
    progress: Callable[[dict[str, Any]], None] | None = None,
    deadline: float | None = None,
    *,
    threads: int | None = None,
    workdir: Path | None = None,
    error_text: Callable[[BaseException], str] = lambda e: f"{type(e).__name__}: {e}",
    model_fn: Callable[..., torch.nn.Module] | None = None,
    **rank_kwargs: Any,
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Run `rank_fn(cfg, progress, deadline_check, workdir, **rank_kwargs)` on `cfg.train.world_size` ranks; rank 0's (row values, curves).

    `rank_fn`, `error_text` and `model_fn` are pickled to the ranks (module-level functions).
    `model_fn(cfg, data) -> nn.Module` replaces `harness.build.model` in every rank (tests use
    it for a BatchNorm-free float64 backbone). Torch threads of each rank: `train.threads`
    when set, else the trial's share `threads` (the runner's choice) split between the ranks.
    Raises `RankFailed` (or the rank's `NonFiniteLoss` / OOM / `TrialTimeout`) on failure.
    """
    world = cfg.train.world_size
    threads = cfg.train.threads or (max(1, threads // world) if threads else None)
    device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available()
                          else "cpu")  # fmt: skip
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"train.world_size = {world} needs {world} GPUs (one per rank); "
                         f"{torch.cuda.device_count()} visible")  # fmt: skip
    ctx = mp.get_context("spawn")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world)}  # fmt: skip
    procs, conns = [], []
    with _children_allowed():
        try:
            for rank in range(world):
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_rank_main, name=f"hembench-rank{rank}", daemon=False,
                    args=(rank, env, backend_for(device), cfg, rank_fn, threads, workdir,
                          writer, error_text, model_fn, os.getpid(), rank_kwargs),
                )  # fmt: skip
                proc.start()
                writer.close()  # the rank holds the only write end: its death closes the pipe
                procs.append(proc)
                conns.append(reader)
            return _supervise(procs, conns, progress, deadline)
        finally:
            _kill_all(procs)


def _supervise(
    procs: list[Any],
    conns: list[Connection],
    progress: Callable[[dict[str, Any]], None] | None,
    deadline: float | None,
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Poll the ranks until rank 0's result and every rank's clean exit, or a failure."""
    world, open_conns = len(procs), dict(zip(conns, range(len(procs)), strict=True))
    result: tuple[dict[str, Any], dict[str, list[Any]]] | None = None
    errors: list[tuple[float, int, str, str]] = []  # (time, rank, type, text)
    failing_since: float | None = None
    done_since: float | None = None
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise TrialTimeout(f"trial ran past its deadline ({world} ranks killed)")
        ready = wait([*open_conns, *(p.sentinel for p in procs if p.exitcode is None)], POLL_S)
        for conn in [c for c in ready if c in open_conns]:
            rank = open_conns[conn]
            try:
                kind, *payload = conn.recv()
            except (EOFError, OSError):
                del open_conns[conn]  # the rank exited (or died mid-message)
                continue
            if kind == "progress" and progress is not None:
                progress(payload[0])
            elif kind == "result":
                result = payload[0], payload[1]
            elif kind == "error":
                errors.append((payload[0], rank, payload[1], payload[2]))
        deaths = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        now = time.monotonic()
        if (errors or deaths) and failing_since is None:
            failing_since = now
        if failing_since is not None:
            if now - failing_since >= GRACE_S or all(p.exitcode is not None for p in procs):
                _kill_all(procs)
                raise _failure(world, errors, deaths)
            continue
        if all(p.exitcode == 0 for p in procs):
            if result is None:
                raise RankFailed(f"rank 0 of {world} exited without a result")
            return result
        if result is not None:
            done_since = done_since or now
            if now - done_since > EXIT_S:
                raise RankFailed(f"ranks did not exit within {EXIT_S:.0f} s after the result")


def _failure(
    world: int, errors: list[tuple[float, int, str, str]], deaths: list[tuple[int, int]]
) -> Exception:
    """The exception for the parent: the root cause in full (a rank that died without a word
    before the errors its peers then saw, else the earliest error), the other ranks' errors by
    type only (they are mostly a collective that lost its peer)."""
    reported = {rank for _, rank, _, _ in errors}
    silent = [(r, code) for r, code in deaths if r not in reported]
    errors = sorted(errors)
    if silent:
        cause, cls = f"rank {silent[0][0]} of {world} {_death(silent[0][1])} without a result", None
    else:
        cause, cls = f"rank {errors[0][1]} of {world}: {errors[0][3]}", errors[0][2]
        errors = errors[1:]
    others = [f"rank {r} {_death(code)}" for r, code in silent[1:]]
    others += [f"rank {r}: {kind}" for _, r, kind, _ in errors]
    text = cause + (f" (then {', '.join(others)})" if others else "")
    return _KEPT_TYPES.get(cls or "", RankFailed)(text)


def _death(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _kill_all(procs: list[Any]) -> None:
    """SIGKILL every rank still running and reap them all (no orphans, no zombies)."""
    for p in procs:
        if p.exitcode is None:
            with contextlib.suppress(ProcessLookupError, AttributeError):
                p.kill()
    for p in procs:
        with contextlib.suppress(AssertionError):
            p.join(timeout=10)


@contextlib.contextmanager
def _children_allowed():
    """Let a daemonic process (a local-executor worker) start the ranks: multiprocessing
    refuses because a daemon's children would outlive it — the ranks die with their parent
    (`_die_with_parent`), so the refusal does not apply."""
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


# --- inside a rank ------------------------------------------------------------------------------


def _die_with_parent(parent_pid: int, rank: int) -> None:
    """SIGKILL from the kernel when the parent dies (Linux), a watchdog thread elsewhere, and
    the process named `hembench-r<rank>` (ps, /proc/<pid>/comm)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        libc.prctl(15, f"hembench-r{rank}".encode())  # PR_SET_NAME
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before prctl took effect

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _rank_main(
    rank: int,
    env: dict[str, str],
    backend: str,
    cfg: TrialConfig,
    rank_fn: RankFn,
    threads: int | None,
    workdir: Path | None,
    conn: Connection,
    error_text: Callable[[BaseException], str],
    model_fn: Callable[..., torch.nn.Module] | None,
    parent_pid: int,
    rank_kwargs: dict[str, Any],
) -> None:
    _die_with_parent(parent_pid, rank)
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        if threads:
            torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        if model_fn is not None:
            from harness import build

            build.model = model_fn
        dist.init_process_group(backend, init_method="env://", rank=rank,
                                world_size=int(env["WORLD_SIZE"]),
                                timeout=timedelta(seconds=PG_TIMEOUT_S))  # fmt: skip

        def progress(info: dict[str, Any]) -> None:
            conn.send(("progress", info))

        out, curves = rank_fn(
            cfg, progress if rank == 0 else None, lambda: None, workdir, **rank_kwargs
        )
        if rank == 0:
            conn.send(("result", out, curves))
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("error", time.time(), type(exc).__name__, error_text(exc)))
        conn.close()
        os._exit(1)  # no atexit/destructors: a peer may hold a collective we would wait on
    conn.close()
