"""Run directories, atomic Parquet rows, resume bookkeeping (harness/results.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import polars as pl
import pytest

from harness.records import TrialOutcome
from harness.results import (
    RunDataWarning,
    RunDir,
    RunDirError,
    check_inside,
    load_run,
    row_frame,
)


def outcome(tid: str, status: str = "ok", tar: float | None = 0.5) -> TrialOutcome:
    row = {
        "trial_id": tid,
        "trial_index": 0,
        "seed": 0,
        "status": status,
        "memory": 0,
        "samples_per_s": None if status != "ok" else 10.0,
        "tar@1e-1": tar,
        "error": None,
    }
    curves = {
        "step": [0, 1],
        "loss": [1.0, 0.5],
        "samples_per_s": [1.0, 2.0],
        "memory_share": [None, None],
        "neg_age": [None, None],
        "drift": [None, 0.1],
    }
    return TrialOutcome(tid, status, row, curves if status == "ok" else {}, None)


def test_null_metrics_keep_dtypes():
    ok, failed = row_frame(outcome("a").row), row_frame(outcome("b", "oom", None).row)
    assert ok.schema == failed.schema
    assert failed.schema["tar@1e-1"] == pl.Float64 and failed.schema["samples_per_s"] == pl.Float64


def test_write_done_and_load(tmp_path):
    run = RunDir.create(tmp_path, "s")
    run.write_outcome(outcome("a"))
    run.write_outcome(outcome("b", "nan", None))
    assert run.done() == {"a": "ok", "b": "nan"}
    df = load_run(run.path)
    assert sorted(df["trial_id"]) == ["a", "b"]
    # a corrupt file (not produced by us) is ignored by done(): the trial will be re-run
    (run.trials / "c.parquet").write_bytes(b"PAR1 garbage")
    assert "c" not in run.done()
    # re-writing a trial replaces its row atomically
    run.write_outcome(outcome("b"))
    assert run.done()["b"] == "ok"
    assert not [p for p in run.trials.iterdir() if p.name.startswith(".")]


def test_concurrent_runs_get_distinct_dirs(tmp_path):
    made: list[Path] = []
    lock = threading.Lock()

    def make():
        r = RunDir.create(tmp_path, "s")
        for i in range(5):
            r.write_outcome(outcome(f"t{i}"))
        with lock:
            made.append(r.path)

    threads = [threading.Thread(target=make) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 6
    for p in made:
        assert load_run(p).height == 5


def test_explicit_run_id_clash_and_lock(tmp_path):
    run = RunDir.create(tmp_path, "s", "r1")
    with pytest.raises(RunDirError, match="already exists"):
        RunDir.create(tmp_path, "s", "r1")
    (run.path / "run.json").write_text("{}")
    same = RunDir.find(tmp_path, "s", "r1")
    with run.lock(), pytest.raises(RunDirError, match="another process"), same.lock():
        pass


@pytest.mark.parametrize("bad", ["../x", "/tmp/x", "a/b", "..", ".hidden", ""])
def test_bad_run_ids_rejected(tmp_path, bad):
    with pytest.raises(RunDirError):
        RunDir.create(tmp_path, "s", bad)
    assert not any(tmp_path.rglob("*trials*"))


def test_check_inside(tmp_path):
    assert check_inside(tmp_path, tmp_path / "a" / "b") == (tmp_path / "a" / "b").resolve()
    for escape in (tmp_path / ".." / "x", Path("/etc")):
        with pytest.raises(RunDirError, match="escapes"):
            check_inside(tmp_path, escape)


def test_find_latest_is_the_newest_start_not_the_last_name(tmp_path):
    """Issue 21 item 11: `--resume` without `--run-id` picks the run that started last."""
    for rid, start in (("zzz-named-run", "2020-01-01T00:00:00+00:00"),
                       ("aaa-named-run", "2021-06-01T00:00:00+00:00"),
                       ("20200101-000000-aaaaaa", "2019-01-01T00:00:00+00:00")):  # fmt: skip
        r = RunDir.create(tmp_path, "s", rid)
        (r.path / "run.json").write_text(json.dumps({"start": start}))
    assert RunDir.find(tmp_path, "s").run_id == "aaa-named-run"
    with pytest.raises(RunDirError, match="no earlier run"):
        RunDir.find(tmp_path, "other")


def test_load_run_skips_unreadable_files_with_a_warning(tmp_path):
    run = RunDir.create(tmp_path, "s")
    run.write_outcome(outcome("a"))
    run.write_outcome(outcome("b"))
    (run.trials / "b.parquet").write_bytes(b"PAR1 broken")
    with pytest.warns(RunDataWarning, match=r"b\.parquet"):
        df = load_run(run.path)
    assert df["trial_id"].to_list() == ["a"]
    (run.trials / "a.parquet").write_bytes(b"")
    with pytest.warns(RunDataWarning), pytest.raises(RunDirError, match="none of the 2"):
        load_run(run.path)


def test_repair_quarantines_damaged_trials_and_removes_temp_files(tmp_path):
    run = RunDir.create(tmp_path, "s")
    for tid in ("a", "b", "c"):
        run.write_outcome(outcome(tid))
    (run.trials / "a.parquet").write_bytes(b"junk")  # unreadable row
    (run.curves / "b.parquet").unlink()  # row without its curves
    (run.trials / ".c.parquet.123.tmp").write_bytes(b"half")  # a kill inside the write window
    with run.lock():
        stale, damaged = run.repair()
    assert [p.name for p in stale] == [".c.parquet.123.tmp"]
    assert sorted(damaged) == ["a", "b"]
    assert run.done() == {"c": "ok"}
    assert len(list(run.quarantine.iterdir())) == 3  # a's row and curves, b's row


def test_lock_never_follows_a_symlink(tmp_path):
    run = RunDir.create(tmp_path, "s")
    target = tmp_path / "precious"
    target.write_text("keep")
    (run.path / "run.lock").symlink_to(target)
    with pytest.raises(RunDirError, match="symlink"), run.lock():
        pass
    assert target.read_text() == "keep"


def test_os_errors_become_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        RunDir.create(tmp_path / "file", "s")
    with pytest.raises(RunDirError, match="too long"):
        RunDir.create(tmp_path / ("x" * 300), "s")


def test_load_run_strict_refuses_an_unreadable_file(tmp_path):
    """A regression gate (`compare`) must not pass on a run with rows silently left out."""
    run = RunDir.create(tmp_path, "s")
    run.write_outcome(outcome("a"))
    (run.trials / "b.parquet").write_bytes(b"junk")
    with pytest.raises(RunDirError, match=r"cannot read trial files: 1 unreadable.*b\.parquet"):
        load_run(run.path, strict=True)
