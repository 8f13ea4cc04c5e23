"""One trial as `train.world_size` processes under torch.distributed (issue 17).

`run_ranks(cfg, rank_fn, ...)` is called by `harness.trial.run_trial` in the trial's own
process. By default it starts the ranks here the way `torchrun` would: a free localhost port for
the rendezvous, then N processes (start method `spawn`) with MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE set. Inside `launched_by(launcher)` it hands its
arguments to `launcher` instead (the Ray executor's placement group of rank actors,
`harness.executors.ray_ddp`). Both launchers share the rest:

- `rank_body`, what every rank runs: environment, threads, GPU, process group (gloo on CPU,
  NCCL on CUDA), then `rank_fn(cfg, progress, deadline_check, workdir)` (`harness.trial._run`),
  where `build_step` and `Trainer` switch to their data-parallel forms (docs/scale_out.md §5);
- `supervise`, which reads a launcher's `RankGroup` events (rank 0's progress and result, a
  rank's error, a rank's end) and decides the trial's fate:
  - a rank raises: its error (`rank r of N: Type: message [at ...]`) is the cause; the other
    ranks' errors (mostly a collective that lost its peer) are collected for `GRACE_S`, then
    the launcher kills every rank;
  - a rank dies without a word (SIGKILL, segfault): `RankFailed` naming the signal (or the Ray
    error), within `POLL_S` plus `GRACE_S`, never waiting for a collective's timeout;
  - the trial's deadline passes: every rank is killed, `TrialTimeout`.
Local ranks die with their parent (`PR_SET_PDEATHSIG` plus a watchdog thread); Ray rank actors
are owned by the trial's task and die with it. The error's type is kept where it decides the
trial's status: `NonFiniteLoss` (nan), `torch.OutOfMemoryError` (oom), `TrialTimeout`; anything
else is `RankFailed` (failed).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.config import TrialConfig
from harness.ddp_local import LocalRanks, children_allowed, die_with_parent, kill_all
from harness.records import NonFiniteLoss, TrialTimeout
from mining.distributed import rank_and_world_size

POLL_S = 0.2  # how often the supervisor looks at the ranks when nothing arrives
GRACE_S = 2.0  # after the first failure, how long the supervisor collects the other ranks' errors
EXIT_S = 30.0  # after rank 0's result, how long the other ranks may take to end
PG_TIMEOUT_S = 1800.0  # collectives of a rank whose peer hangs (the supervisor usually kills first)

Result = tuple[dict[str, Any], dict[str, list[Any]]]  # rank 0's (row values, curves)
RankFn = Callable[..., Result]
#: what a rank reports: ("progress", rank, dict), ("result", rank, Result),
#: ("error", rank, (unix time, type name, text)), ("ended", rank, how) where `how` is 0 for a
#: clean end, else an exit code (negative: the signal) or a description of the death
Event = tuple[str, int, Any]
Launcher = Callable[..., Result]  # takes `run_ranks`' arguments
_KEPT_TYPES: dict[str, type[Exception]] = {
    "NonFiniteLoss": NonFiniteLoss,
    "OutOfMemoryError": torch.OutOfMemoryError,
    "TrialTimeout": TrialTimeout,
}
_LAUNCHER: contextvars.ContextVar[Launcher | None] = contextvars.ContextVar(
    "hembench_ddp_launcher", default=None
)


class RankFailed(RuntimeError):
    """A rank of a data-parallel trial raised or died; the message says which and why."""


class RankGroup(Protocol):
    """A launcher's running ranks, as `supervise` sees them."""

    world: int

    def poll(self, timeout: float) -> list[Event]: ...


def backend_for(device: torch.device) -> str:
    """The process-group backend of a trial on `device`: NCCL on CUDA, gloo elsewhere."""
    return "nccl" if device.type == "cuda" else "gloo"


def process_group() -> tuple[int, int, str | None]:
    """(rank, world size, backend) of this process; (0, 1, None) outside a process group."""
    rank, world = rank_and_world_size()
    return rank, world, (str(dist.get_backend()) if world > 1 else None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of `host` ("" = every interface) that was free a moment ago (the rendezvous
    of `torchrun` does the same; rank 0 binds it right away)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def launched_by(launcher: Launcher) -> Iterator[None]:
    """Within this block `run_ranks` starts the ranks with `launcher(cfg, rank_fn, progress,
    deadline, **kw)` (same arguments as `run_ranks`) instead of local processes."""
    token = _LAUNCHER.set(launcher)
    try:
        yield
    finally:
        _LAUNCHER.reset(token)


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
) -> Result:
    """Run `rank_fn(cfg, progress, deadline_check, workdir, **rank_kwargs)` on `cfg.train.world_size` ranks; rank 0's (row values, curves).

    `rank_fn`, `error_text` and `model_fn` are pickled to the ranks (module-level functions).
    `model_fn(cfg, data) -> nn.Module` replaces `harness.build.model` in every rank (tests use
    it for a BatchNorm-free float64 backbone). Torch threads of each rank: `train.threads`
    when set, else the trial's share `threads` (the runner's choice) split between the ranks.
    Raises `RankFailed` (or the rank's `NonFiniteLoss` / OOM / `TrialTimeout`) on failure.
    """
    launcher = _LAUNCHER.get()
    if launcher is not None:
        return launcher(cfg, rank_fn, progress, deadline, threads=threads, workdir=workdir,
                        error_text=error_text, model_fn=model_fn, **rank_kwargs)  # fmt: skip
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
    with children_allowed():
        try:
            for rank in range(world):
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_rank_main, name=f"hembench-rank{rank}", daemon=False,
                    args=(rank, {**env, "LOCAL_RANK": str(rank)}, backend_for(device), cfg,
                          rank_fn, threads, workdir, writer, error_text, model_fn, os.getpid(),
                          rank_kwargs),
                )  # fmt: skip
                proc.start()
                writer.close()  # the rank holds the only write end: its death closes the pipe
                procs.append(proc)
                conns.append(reader)
            return supervise(LocalRanks(procs, conns), progress, deadline)
        finally:
            kill_all(procs)


def supervise(
    ranks: RankGroup,
    progress: Callable[[dict[str, Any]], None] | None,
    deadline: float | None,
) -> Result:
    """Poll the ranks until rank 0's result and every rank's clean end, or a failure (raised;
    the caller kills the ranks that are left)."""
    world = ranks.world
    result: Result | None = None
    errors: list[tuple[float, int, str, str]] = []  # (time, rank, type, text)
    ended: dict[int, int | str] = {}
    failing_since: float | None = None
    done_since: float | None = None
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise TrialTimeout(f"trial ran past its deadline ({world} ranks killed)")
        for kind, rank, payload in ranks.poll(POLL_S):
            if kind == "progress" and progress is not None:
                progress(payload)
            elif kind == "result":
                result = payload
            elif kind == "error":
                errors.append((payload[0], rank, payload[1], payload[2]))
            elif kind == "ended":
                ended[rank] = payload
        deaths = [(r, how) for r, how in sorted(ended.items()) if how != 0]
        now = time.monotonic()
        if (errors or deaths) and failing_since is None:
            failing_since = now
        if failing_since is not None:
            if now - failing_since >= GRACE_S or len(ended) == world:
                raise _failure(world, errors, deaths)
            continue
        if len(ended) == world:  # all clean
            if result is None:
                raise RankFailed(f"rank 0 of {world} ended without a result")
            return result
        if result is not None:
            done_since = done_since or now
            if now - done_since > EXIT_S:
                raise RankFailed(f"ranks did not end within {EXIT_S:.0f} s after the result")


def _failure(
    world: int, errors: list[tuple[float, int, str, str]], deaths: list[tuple[int, int | str]]
) -> Exception:
    """The exception for the supervisor: the root cause in full (a rank that died without a
    word before the errors its peers then saw, else the earliest error), the other ranks'
    errors by type only (they are mostly a collective that lost its peer)."""
    reported = {rank for _, rank, _, _ in errors}
    silent = [(r, how) for r, how in deaths if r not in reported]
    errors = sorted(errors)
    if silent:
        cause, cls = f"rank {silent[0][0]} of {world} {_death(silent[0][1])} without a result", None
    else:
        cause, cls = f"rank {errors[0][1]} of {world}: {errors[0][3]}", errors[0][2]
        errors = errors[1:]
    others = [f"rank {r} {_death(how)}" for r, how in silent[1:]]
    others += [f"rank {r}: {kind}" for _, r, kind, _ in errors]
    text = cause + (f" (then {', '.join(others)})" if others else "")
    return _KEPT_TYPES.get(cls or "", RankFailed)(text)


def _death(how: int | str) -> str:
    if isinstance(how, str):
        return how
    if how < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-how).name}"
        return f"was killed by signal {-how}"
    return f"exited with code {how}"


# --- every rank -----------------------------------------------------------------------------------


def rank_body(
    rank: int,
    env: dict[str, str],
    backend: str,
    cfg: TrialConfig,
    rank_fn: RankFn,
    threads: int | None,
    workdir: Path | None,
    model_fn: Callable[..., torch.nn.Module] | None,
    rank_kwargs: dict[str, Any],
    progress: Callable[[dict[str, Any]], None] | None,
    cuda_index: int | None = None,
) -> Result:
    """What every rank runs, whoever started it: `env` (MASTER_ADDR, MASTER_PORT, WORLD_SIZE,
    LOCAL_RANK, ...; set before CUDA is touched), torch threads, GPU `cuda_index` (NCCL), the
    process group, then `rank_fn`. Raises what `rank_fn` raises; leaves the group joined (the
    launcher leaves it, or ends the process)."""
    os.environ.update(env, RANK=str(rank))
    if threads:
        torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(cuda_index if cuda_index is not None else rank)
    if model_fn is not None:
        from harness import build

        build.model = model_fn
    dist.init_process_group(backend, init_method="env://", rank=rank,
                            world_size=int(env["WORLD_SIZE"]),
                            timeout=timedelta(seconds=PG_TIMEOUT_S))  # fmt: skip
    return rank_fn(cfg, progress if rank == 0 else None, lambda: None, workdir, **rank_kwargs)


def error_message(exc: BaseException, error_text: Callable[[BaseException], str]) -> tuple:
    """A rank's ("error", ...) payload: (unix time, type name, text)."""
    return time.time(), type(exc).__name__, error_text(exc)


# --- the local launcher (its process plumbing: harness.ddp_local) ---------------------------------


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
    """A local rank process: `rank_body`, its result or error through the pipe."""
    die_with_parent(parent_pid, rank)
    try:
        out = rank_body(rank, env, backend, cfg, rank_fn, threads, workdir, model_fn,
                        rank_kwargs, lambda info: conn.send(("progress", info)))  # fmt: skip
        if rank == 0:
            conn.send(("result", out))
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("error", error_message(exc, error_text)))
        conn.close()
        os._exit(1)  # no atexit/destructors: a peer may hold a collective we would wait on
    conn.close()
