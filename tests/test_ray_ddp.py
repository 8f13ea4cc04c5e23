"""Data-parallel trials (`train.world_size = 2`, gloo on CPU) on a local Ray (num_cpus=2),
issue 17 items 2 and 3: `harness.executors.ray_ddp`.

One Ray run of four 2-rank trials, in this order (the cluster holds one at a time):
a rank raises at step 2; a rank's process is killed with SIGKILL by the test; a rank hangs until
the trial's timeout; a plain 20-step trial (batch-hard triplet, CB-HEM memory 48, PLB exact,
`mlp` backbone on synthetic feature vectors). The plain trial also runs through the local
executor (spawned rank processes): its loss curve and every measured column must be
identical (tolerance 0: the same rank body on the same data with one thread per rank), apart
from timings and memory figures.
Afterwards no placement group is left and no rank process lives.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from harness.executors import TrialOutcome, TrialSpec  # noqa: E402
from harness.executors.local import LocalExecutor  # noqa: E402
from harness.executors.ray_ddp import fit_problems, rank_bundles, rank_layout  # noqa: E402
from harness.executors.ray_executor import RayExecutor  # noqa: E402

SUITE = """
[suite]
name = "ray_ddp"
seeds = [0]
[data]
kind = "synthetic_ivs"
identities = 96
test_identities = 16
dim = 8
[model]
kind = "mlp"
embedding = 8
hidden = 16
[train]
steps = {steps}
batch = 16
lr = 0.05
device = "cpu"
threads = 1
world_size = {world}
[baseline]
memory = 48
plb = "exact"
virtual_batch = 32
[debug]
{debug}
[eval]
far = [1e-1]
"""


def _spec(tid: str, *, steps: int = 20, world: int = 2, debug: str = "", timeout_s=None):
    from harness.suite import parse_suite

    cfg = parse_suite(SUITE.format(steps=steps, world=world, debug=debug)).trials[0]
    return TrialSpec(tid, "ray_ddp", "run", cfg, timeout_s=timeout_s)


# Columns that legitimately differ between two runs of the same trial, besides every memory
# figure (`*_mib`: each process's own RSS and allocator readings).
VOLATILE = {"train_time_s", "samples_per_s", "samples_per_s_iqr", "step_ms_median", "git_commit"}
KILL_TO_OUTCOME_S = 30.0


def _rank_processes() -> dict[int, str]:
    """{pid: comm} of the live processes named hembench-r<rank> (local or Ray ranks)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if comm.startswith("hembench-r") and state != "Z":
            found[int(pid)] = comm
    return found


class _Killer(threading.Thread):
    """Once `armed`, SIGKILLs the first new `hembench-r1` process after it lived 1 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.armed, self.stop = threading.Event(), False
        self.old: set[int] = set()
        self.seen: dict[int, float] = {}
        self.killed_at: float | None = None

    def arm(self) -> None:
        self.old = set(_rank_processes())  # the ranks of the trial before: not the target
        self.armed.set()

    def run(self) -> None:
        while not self.stop and self.killed_at is None:
            if self.armed.is_set():
                now = time.monotonic()
                for pid, comm in _rank_processes().items():
                    new = comm == "hembench-r1" and pid not in self.old
                    if new and now - self.seen.setdefault(pid, now) >= 1.0:
                        os.kill(pid, signal.SIGKILL)
                        self.killed_at = now
            time.sleep(0.05)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_run(local_ray):
    """The four trials through the Ray executor: ({id: (outcome, seconds since start)},
    the killer, the start time, what was left afterwards)."""
    specs = [
        _spec("raises", debug='inject = "exception"\ninject_step = 2'),
        _spec("killed", steps=100_000, timeout_s=300),  # only the kill ends it
        _spec("hangs", debug='inject = "hang"\ninject_step = 1', timeout_s=12),
        _spec("plain"),
    ]
    got: dict[str, tuple[TrialOutcome, float]] = {}
    killer = _Killer()
    killer.start()
    t0 = time.monotonic()

    def on_result(outcome: TrialOutcome) -> None:
        got[outcome.trial_id] = (outcome, time.monotonic())
        if outcome.trial_id == "raises":
            killer.arm()

    try:
        RayExecutor().run(specs, on_result)
        deadline = time.monotonic() + 15  # ray.kill is asynchronous
        while _rank_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {
            "groups": [v["state"] for v in ray.util.placement_group_table().values()],
            "ranks": _rank_processes(),
        }
        yield {k: (o, t - t0) for k, (o, t) in got.items()}, killer, t0, left
    finally:
        killer.stop = True


@pytest.fixture(scope="module")
def local_outcome(ray_run):  # after the Ray run: the two never compete for the 2 cores
    got: list[TrialOutcome] = []
    # in-process: the trial's process is this one (a forked worker would only add its imports);
    # the ranks are spawned by harness.ddp's local launcher either way
    LocalExecutor(in_process=True).run([_spec("plain")], got.append)
    return got[0]


def test_two_ranks_on_ray_equal_the_local_executor(ray_run, local_outcome):
    ray_outcome = ray_run[0]["plain"][0]
    assert ray_outcome.status == local_outcome.status == "ok", (ray_outcome, local_outcome)
    row, ref = ray_outcome.row, local_outcome.row
    assert (row["world_size"], row["backend"], row["device"]) == (2, "gloo", "cpu")
    assert len(ray_outcome.curves["loss"]) == 20
    assert ray_outcome.curves["loss"] == local_outcome.curves["loss"]  # bitwise
    assert row["tar@1e-1"] is not None and row["tar@1e-1"] == ref["tar@1e-1"]
    same = [k for k in set(row) - VOLATILE if not k.endswith("_mib")]
    differ = {k: (row[k], ref.get(k)) for k in same if row[k] != ref.get(k)}
    assert differ == {}


def test_a_rank_that_raises_fails_the_trial_with_its_error(ray_run):
    outcome, seconds = ray_run[0]["raises"]
    assert outcome.status == "failed"
    assert "rank 1 of 2: RuntimeError: injected exception at step 2" in outcome.error
    assert seconds < 120  # start-up of 3 workers + 2 steps + GRACE_S; no collective timeout


def test_a_killed_rank_fails_the_trial_within_bounded_time(ray_run):
    outcomes, killer, t0, _ = ray_run
    outcome, seconds = outcomes["killed"]
    assert killer.killed_at is not None, "the test never found rank 1's process"
    assert outcome.status == "failed"
    assert "rank 1 of 2 died" in outcome.error and "ActorDiedError" in outcome.error
    assert (t0 + seconds) - killer.killed_at < KILL_TO_OUTCOME_S


def test_a_hanging_rank_times_out_and_the_suite_goes_on(ray_run):
    outcomes = ray_run[0]
    assert outcomes["hangs"][0].status == "timeout"
    assert outcomes["plain"][0].status == "ok"  # after three failures


def test_no_placement_group_and_no_rank_process_is_left(ray_run):
    left = ray_run[3]
    assert len(left["groups"]) == 4 and set(left["groups"]) == {"REMOVED"}, left
    assert left["ranks"] == {}


def test_more_ranks_than_the_cluster_holds_is_bad_input(local_ray, tmp_path):
    """`hembench run --executor ray` exits 2 naming the key, before any trial runs."""
    from typer.testing import CliRunner

    from harness.cli import app

    suite = tmp_path / "big.toml"
    suite.write_text(SUITE.format(steps=2, world=4, debug=""))
    args = ["run", str(suite), "--executor", "ray", "--results-dir", str(tmp_path), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "train.world_size = 4 needs 4 x 1 CPUs" in result.output
    assert not list(tmp_path.glob("ray_ddp/*"))  # no run directory left behind


# --- pure pieces ------------------------------------------------------------------------------


def test_bundles_and_cluster_fit():
    assert rank_bundles(2, 3, True) == [{"CPU": 3.0, "GPU": 1.0}] * 2
    assert rank_bundles(2, 1, False) == [{"CPU": 1.0}] * 2
    specs = [_spec("a", world=4), _spec("b", world=4), _spec("c", world=2)]
    on_gpu = dict.fromkeys("abc", True)
    problems = fit_problems(specs, {"CPU": 16.0, "GPU": 2.0}, 1, on_gpu)
    assert problems == [
        "train.world_size = 4 needs 4 GPUs (one per rank); the Ray cluster has 2 (trials a, b)"
    ]
    assert fit_problems(specs, {"CPU": 8.0}, 2, dict.fromkeys("abc", False)) == []
    assert (
        "needs 4 x 3 CPUs" in fit_problems(specs, {"CPU": 8.0}, 3, dict.fromkeys("abc", False))[0]
    )


def test_rank_layout_rendezvous_local_ranks_and_gpus():
    """Ranks 0 and 2 on node A, rank 1 on node B: rank 0's address and port for everyone,
    local ranks per node, and each node's GPUs of this trial visible to its ranks."""
    infos = [
        {"node": "A", "ip": "10.0.0.1", "cuda": "3", "port": 29511},
        {"node": "B", "ip": "10.0.0.2", "cuda": "0", "port": None},
        {"node": "A", "ip": "10.0.0.1", "cuda": "5", "port": None},
    ]
    layout = rank_layout(infos, gpu=True)
    envs = [env for env, _ in layout]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"], e["WORLD_SIZE"]) for e in envs} == {
        ("10.0.0.1", "29511", "3")
    }
    assert [(e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]) for e in envs] == [
        ("0", "2"), ("0", "1"), ("1", "2")
    ]  # fmt: skip
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3,5", "0", "3,5"]
    assert [index for _, index in layout] == [0, 0, 1]
    cpu = rank_layout(infos, gpu=False)
    assert [(e["CUDA_VISIBLE_DEVICES"], i) for e, i in cpu] == [("", None)] * 3


def test_jobs_count_trials_and_the_cluster_counts_ranks():
    from harness.executors.ray_executor import _InFlight

    two = {"x": _InFlight(_spec("x"), 0.0)}  # a 2-rank trial in flight
    assert RayExecutor()._room({}, _spec("y", world=4), 2)  # alone, it always starts
    assert not RayExecutor()._room(two, _spec("y"), 3)  # 2 + 2 ranks > 3 CPUs
    assert RayExecutor()._room(two, _spec("y"), 4)
    assert RayExecutor(jobs=2)._room(two, _spec("y", world=4), 2)  # jobs: trials
    with pytest.raises(ValueError, match="placement_strategy"):
        RayExecutor(placement_strategy="RANDOM")
