"""The Ray executor on a local Ray started by the test (num_cpus=2).

Fault-path tests run cheap stand-in trial functions (module-level, so Ray workers import them);
the end-to-end test runs suites/smoke.toml through `hembench run --executor ray` and compares
its rows with the local executor's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from harness.executors import TrialOutcome, TrialSpec, get_executor  # noqa: E402
from harness.executors.ray_executor import RayExecutor, needs_gpu  # noqa: E402
from harness.records import base_row  # noqa: E402

SMOKE = Path(__file__).resolve().parents[1] / "suites" / "smoke.toml"


BARRIER_WAIT_S = 60.0


def _config(device: str = "auto"):
    from harness.suite import load_suite

    return load_suite(SMOKE, device=device).trials[0]


def _spec(i: int, *, timeout_s: float | None = None, tag: str = "run", device: str = "auto"):
    return TrialSpec(f"t{i}", "smoke", tag, _config(device), index=i, timeout_s=timeout_s)


# -- stand-in trial functions (run inside Ray workers) -------------------------------------------


def _ok(spec: TrialSpec) -> TrialOutcome:
    import torch

    row = base_row(spec)
    row.update(status="ok", worker_pid=os.getpid(), threads=torch.get_num_threads())
    return TrialOutcome(spec.trial_id, "ok", row)


def _faulty(spec: TrialSpec) -> TrialOutcome:
    """t0 hangs (until its timeout), t1 kills its own worker, the others meet at a barrier."""
    if spec.trial_id == "t0":
        while True:
            time.sleep(0.1)
    if spec.trial_id == "t1":
        os._exit(3)  # the worker process dies without returning anything
    return _barrier(spec)


def _barrier(spec: TrialSpec) -> TrialOutcome:
    """Touch this trial's file in the folder named by run_id, then wait (up to
    `BARRIER_WAIT_S`) until two trials have touched theirs: ok only if both run at once."""
    folder = Path(spec.run_id)
    (folder / spec.trial_id).touch()
    deadline = time.monotonic() + BARRIER_WAIT_S
    while len(list(folder.iterdir())) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the other trial never ran concurrently")
        time.sleep(0.05)
    return _ok(spec)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_collect(executor: RayExecutor, specs: list[TrialSpec]) -> dict[str, TrialOutcome]:
    got: list[TrialOutcome] = []
    executor.run(specs, got.append)
    ids = [o.trial_id for o in got]
    assert sorted(ids) == sorted(s.trial_id for s in specs), "exactly one outcome per trial"
    return dict(zip(ids, got, strict=True))


# -- tests -----------------------------------------------------------------------------------------


def test_failures_are_outcomes_and_two_trials_run_at_once(local_ray, tmp_path):
    specs = [_spec(0, timeout_s=3.0)] + [_spec(i, tag=str(tmp_path)) for i in (1, 2, 3)]
    out = run_collect(RayExecutor(trial_fn=_faulty), specs)
    # a hung trial is killed at its timeout
    assert out["t0"].status == "timeout" and "timed out" in out["t0"].error
    # a trial that kills its worker is failed, with its identity columns; the grid goes on
    assert out["t1"].status == "failed" and "died" in out["t1"].error
    assert out["t1"].row["status"] == "failed" and out["t1"].row["trial_id"] == "t1"
    # t2 and t3 could only finish by running at the same time (2 CPUs -> 2 in flight)
    assert out["t2"].status == out["t3"].status == "ok", out
    # max_calls=1: every trial got a fresh worker process, with one torch thread per CPU
    assert out["t2"].row["worker_pid"] != out["t3"].row["worker_pid"]
    assert out["t2"].row["threads"] == out["t3"].row["threads"] == 1


def test_trials_in_flight_are_capped_by_jobs_or_the_cluster():
    cluster = {"CPU": 8.0, "GPU": 2.0}
    assert RayExecutor(jobs=3)._capacity(False, cluster) == 3
    assert RayExecutor()._capacity(False, cluster) == 8
    assert RayExecutor(cpus_per_trial=3)._capacity(False, cluster) == 2
    assert RayExecutor()._capacity(True, cluster) == 2  # every trial needs one of the 2 GPUs
    assert RayExecutor()._capacity(True, {"CPU": 1.0}) == 1  # never 0: the loop must progress


def test_gpu_reservation_follows_the_trial_device():
    for device, has_gpus, want in [
        ("cpu", True, False),
        ("cuda", False, True),
        ("auto", True, True),
        ("auto", False, False),
    ]:
        assert needs_gpu(_spec(0, device=device), has_gpus) is want, (device, has_gpus)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"jobs": 0}, "jobs"),
        ({"num_cpus": -1}, "num_cpus"),
        ({"cpus_per_trial": 0}, "cpus_per_trial"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RayExecutor(**kwargs)


def test_get_executor_builds_ray():
    assert isinstance(get_executor("ray", jobs=2, in_process=False), RayExecutor)


# -- end to end: the same rows as the local executor -----------------------------------------------

# Columns that legitimately differ between two runs of the same trial (git_commit: other
# sessions may commit to a shared checkout between the two runs), besides every memory figure
# (`*_mib`: each process's own allocator, RSS and NVML readings).
VOLATILE = {
    "run_id",
    "host",
    "git_commit",
    "train_time_s",
    "samples_per_s",
    "samples_per_s_iqr",
    "step_ms_median",
    "peak_rss_mib",
    "peak_alloc_mib",
    "peak_reserved_mib",
    "nvml_peak_mib",
    "nvml_process_peak_mib",
}


def _run_cli(suite: Path, results: Path, *args: str):
    from typer.testing import CliRunner

    from harness.cli import app
    from harness.results import load_run

    result = CliRunner().invoke(app, ["run", str(suite), "--results-dir", str(results), *args])
    assert result.exit_code == 0, result.output
    (run_dir,) = (results / "smoke").iterdir()
    return load_run(run_dir)


def test_smoke_suite_rows_match_the_local_executor(local_ray, tmp_path):
    local = _run_cli(SMOKE, tmp_path / "local", "--in-process", "--quiet")
    remote = _run_cli(SMOKE, tmp_path / "ray", "--executor", "ray", "--jobs", "2", "--quiet")
    assert local.height == remote.height >= 2
    assert set(remote.columns) == set(local.columns)
    assert (remote["status"] == "ok").all()
    local, remote = local.sort("trial_id"), remote.sort("trial_id")
    columns = [c for c in sorted(set(local.columns) - VOLATILE) if not c.endswith("_mib")]
    differ = [c for c in columns if not local[c].equals(remote[c])]
    assert differ == [], {c: (local[c].to_list(), remote[c].to_list()) for c in differ}
