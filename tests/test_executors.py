"""The local executor's placement (GPUs, threads), worker deaths, and orphan-proof workers
(issue 21 items 9 and 11, issue 15 item 5, issue 19 item 2)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.executors.local import LocalExecutor
from harness.executors.placement import (
    auto_threads,
    classify_death,
    gpu_slots,
    needs_gpu,
    oom_kill_count,
    visible_devices,
)
from harness.executors.worker import (
    EXIT_ORPHANED,
    EXIT_TIMEOUT,
    _send,
    run_worker,
    watchdog_verdict,
)
from harness.records import TrialSpec
from harness.suite import parse_suite
from tests.test_run_e2e import TINY

ROOT = Path(__file__).resolve().parents[1]


def _spec(
    tid: str = "t", device: str = "cpu", inject: str = "none", timeout: float = 60, step: int = 0
):
    text = TINY.format(name="ex", sweep="memory = [0]", steps=2, timeout=timeout)
    text = text.replace('device = "cpu"', f'device = "{device}"')
    if inject != "none":
        text += f'[debug]\ninject = "{inject}"\ninject_step = {step}\n'
    cfg = parse_suite(text).trials[0]
    return TrialSpec(tid, "ex", "run", cfg, timeout_s=timeout)


# --- GPUs: one per worker --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("devices", "jobs", "share", "want"),
    [
        (["0", "1"], 4, False, ["0", "1"]),  # never more CUDA trials than GPUs
        (["0", "1"], 4, True, ["0", "1", "0", "1"]),  # round-robin when sharing is allowed
        (["0", "1", "2"], 2, False, ["0", "1"]),
        (["3"], 1, False, ["3"]),
        ([], 4, False, []),
        (["GPU-aaaa", "MIG-bbbb"], 3, True, ["GPU-aaaa", "MIG-bbbb", "GPU-aaaa"]),
    ],
)
def test_gpu_slots_round_robin_and_cap(devices, jobs, share, want):
    assert gpu_slots(devices, jobs, share) == want


def test_visible_devices_follow_cuda_visible_devices():
    assert visible_devices(2, {}) == ["0", "1"]
    assert visible_devices(2, {"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_devices(1, {"CUDA_VISIBLE_DEVICES": " GPU-x "}) == ["GPU-x"]
    assert visible_devices(0, {"CUDA_VISIBLE_DEVICES": "0"}) == []


def test_needs_gpu():
    assert needs_gpu("cuda", False) and needs_gpu("auto", True)
    assert not needs_gpu("cpu", True) and not needs_gpu("auto", False)


def test_cuda_trials_wait_for_a_free_gpu_and_cpu_trials_do_not():
    ex = LocalExecutor(jobs=3, gpus=["0", "1"])
    ex._free_gpus = gpu_slots(ex.gpus, ex.jobs)
    cuda, cpu = _spec("g", device="cuda"), _spec("c", device="cpu")
    assert ex._gpu_for(cuda) == "0" and ex._gpu_for(cuda) == "1"
    assert ex._gpu_for(cuda) is False  # both GPUs busy: the third CUDA trial waits
    assert ex._gpu_for(cpu) == ""  # a CPU trial needs no GPU
    assert LocalExecutor(jobs=2)._gpu_for(cuda) == ""  # no GPU list: no assignment


# --- threads ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "concurrent", "want"), [(16, 4, 4), (2, 2, 1), (2, 4, 1), (1, 1, 1), (7, 2, 3)]
)
def test_auto_threads_share_the_cores(cores, concurrent, want):
    assert auto_threads(cores, concurrent) == want


# --- deaths ----------------------------------------------------------------------------------


def test_sigkill_is_oom_only_on_evidence():
    assert classify_death(-9, 3, 4)[0] == "oom"
    status, error = classify_death(-9, 3, 3)
    assert status == "failed" and "not the OOM killer" in error
    status, error = classify_death(-9, None, None)
    assert status == "failed" and "possibly the OOM killer" in error
    assert "SIGSEGV" in classify_death(-11, 0, 1)[1]  # only SIGKILL can be the OOM killer
    assert classify_death(EXIT_TIMEOUT, None, None)[0] == "timeout"
    assert "exit code 3" in classify_death(3, None, None)[1]


def test_oom_kill_count_reads_a_kernel_counter_or_none():
    count = oom_kill_count()
    assert count is None or count >= 0


# --- orphans ---------------------------------------------------------------------------------


def test_watchdog_verdict():
    assert watchdog_verdict(10.0, None, True) is None
    assert watchdog_verdict(10.0, 11.0, True) is None
    assert watchdog_verdict(12.0, 11.0, True) == EXIT_TIMEOUT
    assert watchdog_verdict(1.0, None, False) == EXIT_ORPHANED  # the runner is gone


def test_progress_to_a_dead_parent_is_dropped_silently():
    recv, send = mp.Pipe(duplex=False)
    recv.close()
    assert _send(send, ("progress", {"step": 1})) is False  # no BrokenPipeError escapes


def test_worker_stops_itself_at_its_deadline():
    """A hung trial's worker exits by itself (EXIT_TIMEOUT) even if its parent never kills it."""
    ctx = mp.get_context("spawn")
    _recv, send = ctx.Pipe(duplex=False)
    spec = _spec(inject="hang", timeout=1)
    deadline = time.monotonic() + 1
    proc = ctx.Process(target=run_worker, args=(spec, send, os.getpid(), deadline, {}, 0.5))
    proc.start()
    send.close()
    proc.join(120)
    assert proc.exitcode == EXIT_TIMEOUT
    assert classify_death(proc.exitcode, None, None)[0] == "timeout"


ORPHAN_PARENT = """
import multiprocessing as mp, os, sys
sys.path.insert(0, {root!r})
from tests.test_executors import _spec
from harness.executors.worker import run_worker
if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    spec = _spec(inject="hang", timeout=600, step=1)
    proc = ctx.Process(target=run_worker, args=(spec, send, os.getpid(), None, {{}}, 5.0,
                       {pdeathsig}))
    proc.start()
    print(proc.pid, flush=True)
    recv.poll(120)  # the first progress message: the trial is running (and then hangs)
    os.kill(os.getpid(), 9)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("pdeathsig", [True, False], ids=["pdeathsig", "liveness-check"])
def test_worker_dies_with_its_parent(pdeathsig):
    """kill -9 of the parent ends a hung worker: by PR_SET_PDEATHSIG, and without it by the
    worker's own parent-liveness check (issue 21 item 9)."""
    code = textwrap.dedent(ORPHAN_PARENT.format(root=str(ROOT), pdeathsig=pdeathsig))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == -signal.SIGKILL, out.stderr
    worker = int(out.stdout.split()[0])
    deadline = time.monotonic() + 20
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), "the worker outlived its parent"
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr


# --- the runner's choices: threads and GPUs (issue 19 item 2, issue 15 item 5) ----------------


class _Capture:
    """Stands in for an executor: records the specs and options, reports every trial failed."""

    def __init__(self, options):
        self.options = options
        self.specs: list[TrialSpec] = []

    def run(self, trials, on_result, on_progress=None):
        from harness.records import failure_outcome

        self.specs = list(trials)
        for s in trials:
            on_result(failure_outcome(s, "failed", "stand-in"))


def _run_captured(tmp_path, monkeypatch, threads: int, jobs: int, in_process=False, cores=2):
    from rich.console import Console

    from harness.runner import run_suite
    from harness.suite import load_suite

    text = TINY.format(name="thr", sweep="memory = [0, 16, 32]", steps=2, timeout=60)
    path = tmp_path / "thr.toml"
    path.write_text(text.replace("threads = 1", f"threads = {threads}"))
    made: list[_Capture] = []

    def fake(name, **options):
        made.append(_Capture(options))
        return made[-1]

    monkeypatch.setattr("harness.runner.get_executor", fake)
    monkeypatch.setattr("harness.runner.usable_cores", lambda: cores)
    console = Console(record=True, width=300)
    run_suite(load_suite(path, check=False), tmp_path / "res", console, jobs=jobs,
              in_process=in_process, quiet=True)  # fmt: skip
    return made[0], console.export_text()


@pytest.mark.parametrize(
    ("jobs", "in_process", "cores", "want"),
    [(1, False, 2, 2), (2, False, 2, 1), (2, False, 16, 8), (4, True, 8, 8), (8, False, 16, 5)],
)
def test_threads_zero_gets_a_share_of_the_cores(
    tmp_path, monkeypatch, jobs, in_process, cores, want
):
    """`train.threads = 0`: cores // concurrent trials (concurrent = min(jobs, trials to run);
    1 in-process), so `--jobs 2` never oversubscribes a 2-core machine 50-90x."""
    cap, out = _run_captured(tmp_path, monkeypatch, 0, jobs, in_process, cores)
    assert {s.threads for s in cap.specs} == {want}
    assert "oversubscribe" not in out


def test_explicit_threads_that_oversubscribe_warn(tmp_path, monkeypatch):
    cap, out = _run_captured(tmp_path, monkeypatch, 2, 2, cores=2)
    assert {s.threads for s in cap.specs} == {None}  # explicit: the config's own setting
    assert "warning: train.threads = 2 x 2 concurrent trials = 4 threads on 2 cores" in out


def test_local_executor_gets_the_gpu_list(tmp_path, monkeypatch):
    cap, _ = _run_captured(tmp_path, monkeypatch, 0, 2)
    assert cap.options["allow_gpu_sharing"] is False and isinstance(cap.options["gpus"], list)


@pytest.mark.gpu
def test_cuda_jobs_get_one_gpu_each(tmp_path):
    """On a GPU machine: `--device cuda --jobs N` runs every trial ok, each worker seeing one
    GPU (CUDA_VISIBLE_DEVICES), never more at once than GPUs (a note says so)."""
    import torch
    from typer.testing import CliRunner

    from harness.cli import app
    from harness.results import load_run

    n = torch.cuda.device_count()
    path = tmp_path / "gpu.toml"
    path.write_text(TINY.format(name="gpu", sweep="memory = [0, 16, 32]", steps=3, timeout=300))
    args = ["run", str(path), "--results-dir", str(tmp_path), "--device", "cuda"]
    r = CliRunner().invoke(app, [*args, "--jobs", str(n + 1)])
    assert r.exit_code == 0, r.output
    assert f"at most {n} CUDA trial(s)" in r.output
    (run,) = (tmp_path / "gpu").iterdir()
    df = load_run(run)
    assert df["status"].to_list() == ["ok"] * 3
    assert set(df["device"].to_list()) <= {"cuda", "cuda:0"}  # each worker sees its one GPU


# --- Ray: a Ray started by hembench is shut down, also when the run fails ----------------------


def test_ray_started_here_is_shut_down_on_error(monkeypatch):
    import types

    calls: list[str] = []
    fake = types.ModuleType("ray")
    fake.exceptions = types.ModuleType("ray.exceptions")
    fake.ObjectRef = object
    fake.exceptions.RayError = type("RayError", (Exception,), {})
    fake.is_initialized = lambda: False
    fake.init = lambda **k: calls.append("init")
    fake.shutdown = lambda: calls.append("shutdown")

    def boom():
        raise KeyboardInterrupt

    fake.cluster_resources = boom
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.exceptions", fake.exceptions)
    monkeypatch.delitem(sys.modules, "harness.executors.ray_executor", raising=False)
    from harness.executors.ray_executor import RayExecutor

    with pytest.raises(KeyboardInterrupt):
        RayExecutor(jobs=1).run([_spec()], lambda o: None)
    assert calls == ["init", "shutdown"]
    monkeypatch.delitem(sys.modules, "harness.executors.ray_executor", raising=False)
