"""End to end: `hembench run` on the smoke suite, faults, kill -9 + --resume, determinism."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.results import load_curves, load_run
from harness.suite import load_suite, parse_suite, trial_id
from harness.trial import run_trial

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

TINY = """
[suite]
name = "{name}"
seeds = [0]
timeout_s = {timeout}
[data]
kind = "synthetic_ivs"
identities = 96
test_identities = 48
dim = 8
lookalike_groups = 8
[model]
kind = "mlp"
embedding = 8
[train]
steps = {steps}
batch = 16
lr = 0.05
device = "cpu"
warmup_steps = 1
threads = 1
[baseline]
miner = "batch_hard"
loss = "triplet"
[[sweep]]
{sweep}
[eval]
far = [1e-1]
"""


def tiny(tmp_path: Path, name: str, sweep: str, steps: int = 4, timeout: float = 60) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(name=name, sweep=sweep, steps=steps, timeout=timeout))
    return path


def only_run(root: Path, suite: str) -> Path:
    (run,) = (root / suite).iterdir()
    return run


def test_smoke_suite_end_to_end(tmp_path):
    """The shipped smoke suite in worker processes: one ok row per trial with typed columns."""
    suite = ROOT / "suites" / "smoke.toml"
    r = runner.invoke(app, ["run", str(suite), "--results-dir", str(tmp_path), "--quiet"])
    assert r.exit_code == 0, r.output
    run = only_run(tmp_path, "smoke")
    df = load_run(run)
    ids = [trial_id(t) for t in load_suite(suite).trials]
    assert df["trial_id"].to_list() == ids  # sorted by trial_index
    assert df["status"].to_list() == ["ok"] * len(ids)
    for col, dtype in {
        "seed": pl.Int64,
        "memory": pl.Int64,
        "virtual_batch": pl.Int64,
        "batch": pl.Int64,
        "samples_per_s": pl.Float64,
        "samples_per_s_iqr": pl.Float64,
        "step_ms_median": pl.Float64,
        "peak_rss_mib": pl.Float64,
        "rss_net_mib": pl.Float64,
        "peak_live_mib": pl.Float64,
        "tar@1e-1": pl.Float64,
        "eer": pl.Float64,
        "auc": pl.Float64,
        "final_loss": pl.Float64,
        "train_time_s": pl.Float64,
        "miner": pl.String,
        "head": pl.String,
        "plb": pl.String,
        "device": pl.String,
        "host": pl.String,
        "git_commit": pl.String,
        "memory_share": pl.Float64,
        "neg_age": pl.Float64,
        "drift": pl.Float64,
        "peak_alloc_mib": pl.Float64,
        "nvml_peak_mib": pl.Float64,
        "gpu_name": pl.String,
    }.items():
        assert df.schema[col] == dtype, col
    assert (df["samples_per_s"] > 0).all() and (df["peak_rss_mib"] > 0).all()
    assert (df["peak_live_mib"] > 0).all() and (df["rss_net_mib"] >= 0).all()  # CPU trials
    assert df["tar@1e-1"].is_between(0, 1).all() and df["auc"].is_between(0, 1).all()
    assert df["device"].to_list() == ["cpu"] * len(ids)
    assert df["peak_alloc_mib"].is_null().all()  # CPU: no allocator peaks, RSS instead
    cbhem = df.filter(pl.col("memory") > 0)
    assert cbhem["memory_share"].is_not_null().all()
    curves = load_curves(run)
    assert set(curves["trial_id"]) == set(ids)
    assert curves.filter(pl.col("trial_id") == ids[0]).height == 12
    meta = (run / "run.json").read_text()
    assert "suite_text" in meta and '"end"' in meta
    # show and plot read the run
    for fmt in ("table", "csv", "json", "markdown"):
        r = runner.invoke(app, ["show", str(run), "--format", fmt])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["plot", str(run)])
    assert r.exit_code == 0, r.output
    assert len(list((run / "plots").glob("*.png"))) == 4  # M: accuracy, throughput, peak; dots


def test_every_injected_fault_gets_its_status(tmp_path):
    """In-process: exception/nan/oom/hang (cooperative deadline) plus an ok trial; the suite
    finishes and exits 1."""
    path = tiny(
        tmp_path, "faults", 'debug.inject = ["none", "exception", "nan", "oom", "hang"]', timeout=3
    )
    r = runner.invoke(app, ["run", str(path), "--results-dir", str(tmp_path), "--in-process", "-q"])
    assert r.exit_code == 1, r.output
    df = load_run(only_run(tmp_path, "faults"))
    got = dict(zip(df["inject"], df["status"], strict=True))
    assert got == {
        "none": "ok",
        "exception": "failed",
        "nan": "nan",
        "oom": "oom",
        "hang": "timeout",
    }
    errors = dict(zip(df["inject"], df["error"], strict=True))
    assert errors["none"] is None
    assert "injected exception" in errors["exception"]
    assert all(errors[k] for k in ("nan", "oom", "hang"))
    assert df.filter(pl.col("status") != "ok")["tar@1e-1"].is_null().all()


def test_worker_hang_is_killed(tmp_path):
    """Worker processes: a hung trial is killed at its timeout and reported; exit 1."""
    path = tiny(tmp_path, "hang", 'debug.inject = ["hang"]\ndebug.inject_step = [0]', timeout=4)
    r = runner.invoke(app, ["run", str(path), "--results-dir", str(tmp_path), "-q"])
    assert r.exit_code == 1, r.output
    df = load_run(only_run(tmp_path, "hang"))
    # both trials have a row: the suite went on past the kill (the baseline's own status is not
    # asserted: on an overloaded machine its process start alone can exceed the short limit)
    assert sorted(df["inject"]) == ["hang", "none"]
    assert df.filter(pl.col("inject") == "hang")["status"].to_list() == ["timeout"]
    assert "timed out after" in df.filter(pl.col("status") == "timeout")["error"][0]


def test_kill_9_then_resume_runs_each_trial_once(tmp_path):
    path = tiny(tmp_path, "killme", "memory = [0, 16, 32, 48]", steps=40)
    suite = parse_suite(path.read_text())
    ids = [trial_id(t) for t in suite.trials]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            str(path),
            "--results-dir",
            str(tmp_path),
            "-q",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        trials = None
        while time.monotonic() < deadline:
            runs = (
                list((tmp_path / "killme").glob("*/trials"))
                if (tmp_path / "killme").exists()
                else []
            )
            if runs and list(runs[0].glob("*.parquet")):
                trials = runs[0]
                break
            time.sleep(0.05)
        assert trials is not None, "no trial file appeared"
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker, mid-suite
    finally:
        proc.wait()
    before = {p.stem: p.stat().st_mtime_ns for p in trials.glob("*.parquet")}
    assert 1 <= len(before) < len(ids)
    r = runner.invoke(
        app, ["run", str(path), "--results-dir", str(tmp_path), "--resume", "--in-process", "-q"]
    )
    assert r.exit_code == 0, r.output
    df = load_run(trials.parent)
    assert sorted(df["trial_id"]) == sorted(ids)  # each trial exactly once
    assert df["status"].to_list() == ["ok"] * len(ids)
    for tid, mtime in before.items():  # finished trials were not re-run
        assert (trials / f"{tid}.parquet").stat().st_mtime_ns == mtime
    assert not [p for p in trials.iterdir() if p.suffix != ".parquet"]  # no temp leftovers
    # resuming a complete run runs nothing
    r = runner.invoke(
        app, ["run", str(path), "--results-dir", str(tmp_path), "--resume", "--in-process"]
    )
    assert r.exit_code == 0 and "0 of 4 trials" in r.output


def test_cpu_determinism_same_rows_apart_from_timings():
    s = parse_suite(
        tiny_text := TINY.format(
            name="det",
            sweep='memory = [32]\nplb = ["exact"]\nvirtual_batch = [32]',
            steps=5,
            timeout=60,
        )
    )
    assert tiny_text
    cfg = s.trials[-1]
    (a, ca), (b, cb) = run_trial(cfg), run_trial(cfg)
    timing = {
        "train_time_s",
        "samples_per_s",
        "samples_per_s_iqr",
        "step_ms_median",
        "peak_rss_mib",
        "rss_setup_mib",
        "rss_net_mib",
    }  # peak_live_mib is not one: live tensor bytes are deterministic
    assert {k: v for k, v in a.items() if k not in timing} == {
        k: v for k, v in b.items() if k not in timing
    }
    assert ca["loss"] == cb["loss"] and ca["drift"] == cb["drift"]


@pytest.mark.parametrize("bad", ["../x", "/abs/run", "a/b", ".."])
def test_run_id_path_traversal_rejected(tmp_path, bad):
    path = tiny(tmp_path, "ids", "memory = [0]")
    results = tmp_path / "results"
    r = runner.invoke(app, ["run", str(path), "--results-dir", str(results), "--run-id", bad])
    assert r.exit_code == 2, r.output
    assert "run id" in r.output and "Traceback" not in r.output
    assert not any(results.rglob("*.parquet")) and not (tmp_path / "x").exists()


def test_resume_without_earlier_run_is_bad_input(tmp_path):
    path = tiny(tmp_path, "nores", "memory = [0]")
    r = runner.invoke(app, ["run", str(path), "--results-dir", str(tmp_path), "--resume"])
    assert r.exit_code == 2 and "no earlier run" in r.output


def test_resume_with_a_setting_that_changes_trial_ids_is_refused(tmp_path):
    """`--device` is part of every trial's config, hence of its id: resuming under another
    device would re-run every trial into the same run (issue 21 item 2). Exit 2, nothing run."""
    path = tiny(tmp_path, "dev", "memory = [0]", steps=2)
    args = ["run", str(path), "--results-dir", str(tmp_path), "--in-process", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    run = only_run(tmp_path, "dev")
    before = sorted(p.name for p in (run / "trials").iterdir())
    r = runner.invoke(app, [*args, "--resume", "--device", "auto"])
    assert r.exit_code == 2, r.output
    assert "changed the trial ids" in r.output and "new run" in r.output
    assert sorted(p.name for p in (run / "trials").iterdir()) == before


@pytest.mark.parametrize(("suite_timeout", "flag"), [("inf", []), (60, ["--timeout", "1e7"])])
def test_unbounded_timeouts_mean_no_limit(tmp_path, suite_timeout, flag):
    """`timeout_s = inf` and `--timeout 1e7` (beyond what thread and process waits accept) run
    to completion in worker processes instead of crashing with OverflowError (issue 21 item 3)."""
    path = tiny(tmp_path, "inf", "memory = [0]", steps=2, timeout=suite_timeout)
    r = runner.invoke(app, ["run", str(path), "--results-dir", str(tmp_path), "-q", *flag])
    assert r.exit_code == 0, r.output
    assert load_run(only_run(tmp_path, "inf"))["status"].to_list() == ["ok"]


def test_timeout_counts_from_the_end_of_data_preparation_and_says_where(tmp_path, monkeypatch):
    """Data preparation (slowed to 4 s here) does not count against a 3 s timeout; a hang in
    training then times out, and the error says the phase and step it reached (issue 15)."""
    import time as _time

    from harness import build

    real = build.data

    def slow_data(*args, **kwargs):
        _time.sleep(4.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "data", slow_data)
    ok = tiny(tmp_path, "prep", "memory = [0]", steps=2, timeout=3)
    r = runner.invoke(app, ["run", str(ok), "--results-dir", str(tmp_path), "--in-process", "-q"])
    assert r.exit_code == 0, r.output
    hang = tiny(tmp_path, "preph", 'memory = [0]\n"debug.inject" = ["hang"]', steps=4, timeout=3)
    r = runner.invoke(app, ["run", str(hang), "--results-dir", str(tmp_path), "--in-process", "-q"])
    rows = load_run(only_run(tmp_path, "preph"))
    err = rows.filter(rows["inject"] == "hang")["error"][0]
    assert "ran past its deadline" in err or "timed out" in err, err


def test_worker_timeout_message_names_phase_and_step():
    from harness.records import timeout_outcome
    from harness.suite import load_suite

    cfg = load_suite(ROOT / "suites" / "smoke.toml", check=False).trials[0]
    from harness.records import TrialSpec

    spec = TrialSpec("t", "smoke", "r", cfg, timeout_s=5)
    assert "after step 7" in timeout_outcome(spec, 6.0, {"step": 7}).error
    assert (
        "pretrain after step 2"
        in timeout_outcome(spec, 6.0, {"step": 2, "phase": "pretrain"}).error
    )
    assert "data preparation" in timeout_outcome(spec, 6.0, None).error


def test_kill_9_mid_trial_then_resume_gives_the_uninterrupted_row(tmp_path):
    """Issue 16: the runner (and with it the trial's worker) is killed with SIGKILL after the
    trial wrote a checkpoint; `--resume` continues from it, and the final row and curves equal
    an uninterrupted run's (CPU, apart from timings)."""
    path = tiny(tmp_path, "ck", "memory = [32]", steps=3000, timeout=600)
    path.write_text(path.read_text().replace("threads = 1", "threads = 1\ncheckpoint_every = 400"))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", str(path), "--results-dir", str(killed),
         "--run-id", "r", "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not list(killed.glob("ck/r/work/*/ckpt-*.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    assert list(killed.glob("ck/r/work/*/ckpt-*.pt")), "no checkpoint was written"
    assert not list(killed.glob("ck/r/trials/*.parquet")), "the trial finished before the kill"

    r = runner.invoke(app, ["run", str(path), "--results-dir", str(killed), "--resume", "-q"])
    assert r.exit_code == 0, r.output
    clean = tmp_path / "clean"
    r = runner.invoke(app, ["run", str(path), "--results-dir", str(clean), "-q"])
    assert r.exit_code == 0, r.output

    a, b = load_run(killed / "ck" / "r"), load_run(only_run(clean, "ck"))
    assert a["resumed_from_step"][0] > 0 and b["resumed_from_step"][0] is None
    for col in ("final_loss", "tar@1e-1", "eer", "auc", "drift", "memory_share", "neg_age"):
        assert a[col][0] == b[col][0], col
    ca, cb = load_curves(killed / "ck" / "r"), load_curves(only_run(clean, "ck"))
    assert ca["loss"].to_list() == cb["loss"].to_list()
