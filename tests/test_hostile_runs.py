"""A corpus of hostile run directories, results roots and interruptions (issue 21 items 7-11).

Every case runs the real CLI (`typer.testing.CliRunner` on `harness.cli.app`) and asserts the
exit code, one recognisable line, no traceback, and that nothing finished is lost: trial files
that were intact before the command are byte-identical after it (or, when damaged, moved into
`quarantine/` and re-run). Hostile suite files are in another corpus (the suite's own tests).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.results import RunDataWarning, load_run
from tests.test_run_e2e import TINY

runner = CliRunner()
RID = "r1"
SUITE = "hostile"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(suite file, results root) of a finished 2-trial run `hostile/r1`, made once."""
    base = tmp_path_factory.mktemp("finished")
    suite = base / "hostile.toml"
    suite.write_text(TINY.format(name=SUITE, sweep="memory = [0, 16]", steps=2, timeout=120))
    root = base / "results"
    r = runner.invoke(
        app, ["run", str(suite), "--results-dir", str(root), "--run-id", RID, "--in-process", "-q"]
    )
    assert r.exit_code == 0, r.output
    return suite, root


@pytest.fixture
def run(finished, tmp_path) -> tuple[Path, Path, Path]:
    """(suite file, results root, run dir): a private copy of the finished run."""
    suite, root = finished
    copy = tmp_path / "results"
    shutil.copytree(root, copy, symlinks=True)
    return suite, copy, copy / SUITE / RID


def invoke(*args: str):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output, r.output
    return r


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Bytes of every trial and curve file (the finished work)."""
    return {
        f"{p.parent.name}/{p.name}": p.read_bytes()
        for kind in ("trials", "curves")
        for p in sorted((run_dir / kind).glob("*.parquet"))
        if p.is_file() and not p.is_symlink()
    }


def trial_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "trials").glob("*.parquet"))


def resume(suite: Path, root: Path, *extra: str):
    return invoke("run", suite, "--results-dir", root, "--resume", "--in-process", "-q", *extra)


# --- fresh runs into a hostile results root: exit 2, one line, nothing written ------------------

FRESH: dict[str, tuple[Callable[[Path], Path], str]] = {
    # name: (make the --results-dir from tmp_path, expected text)
    "results-dir-is-a-file": (lambda t: _file(t / "res"), "not a directory"),
    "results-dir-under-a-file": (lambda t: _file(t / "res") / "sub", "file"),
    "results-dir-name-too-long": (lambda t: t / ("x" * 300), "too long"),
    "results-dir-path-too-long": (lambda t: t.joinpath(*["d" * 200] * 25), "too long"),
    "suite-folder-is-a-file": (lambda t: _file(t / "res" / SUITE).parent, "file"),
    "suite-folder-is-a-symlink": (lambda t: _link(t / "res" / SUITE, t / "elsewhere"), "symlink"),
}


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a directory")
    return path


def _link(link: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link.parent


@pytest.mark.parametrize("case", sorted(FRESH))
def test_fresh_run_into_hostile_results_dir(finished, tmp_path, case):
    suite, _ = finished
    make, text = FRESH[case]
    root = make(tmp_path)
    r = invoke("run", suite, "--results-dir", root, "--in-process", "-q")
    assert r.exit_code == 2, r.output
    assert text in r.output and r.output.count("error:") == 1, r.output
    assert not list(tmp_path.rglob("*.parquet"))
    assert not any((tmp_path / "elsewhere").iterdir()) if (tmp_path / "elsewhere").exists() else 1


@pytest.mark.parametrize(
    ("run_id", "text"),
    [
        (RID, "already exists"),
        ("a" * 300, "too long"),
        ("a b", "run id"),
        ("../x", "run id"),
        ("a/b", "run id"),
        (".hidden", "run id"),
        ("x..y", "run id"),
    ],
    ids=["exists", "too-long", "space", "dotdot", "slash", "hidden", "inner-dotdot"],
)
def test_bad_or_taken_run_id(run, run_id, text):
    suite, root, run_dir = run
    before = snapshot(run_dir)
    r = invoke("run", suite, "--results-dir", root, "--run-id", run_id, "--in-process", "-q")
    assert r.exit_code == 2 and text in r.output, r.output
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    ("err", "text"),
    [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system")],
    ids=["read-only-dir", "read-only-fs"],
)
def test_unwritable_results_dir(finished, tmp_path, monkeypatch, err, text):
    """(Tests run as root, where chmod cannot make a folder read-only: mkdir is refused.)"""
    suite, _ = finished
    real_mkdir = os.mkdir

    def refuse(path, *a, **k):
        if str(path).startswith(str(tmp_path / "res")):
            raise OSError(err, os.strerror(err), str(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", refuse)
    r = invoke("run", suite, "--results-dir", tmp_path / "res", "--in-process", "-q")
    assert r.exit_code == 2 and text in r.output, r.output


# --- disk full / I/O errors while writing: one line, exit 2, nothing finished lost -------------


def _fail_write(monkeypatch, nth: int, err: int = errno.ENOSPC, name: str = "") -> None:
    """Make the `nth` file write (counting those whose file name contains `name`) fail at its
    fsync, as a full disk does, after the data went to the temporary file."""
    real = os.fsync
    seen = {"n": 0}

    def flaky(fd: int) -> None:
        if name in os.readlink(f"/proc/self/fd/{fd}"):
            seen["n"] += 1
            if seen["n"] == nth:
                raise OSError(err, os.strerror(err))
        real(fd)

    monkeypatch.setattr(os, "fsync", flaky)


@pytest.mark.parametrize(
    ("nth", "name", "err", "kept"),
    [
        (1, "run.json", errno.ENOSPC, 0),  # at the start
        (2, "parquet", errno.ENOSPC, 0),  # the first trial's row (after its curves)
        (4, "parquet", errno.ENOSPC, 1),  # the second trial's row: the first is kept
        (3, "parquet", errno.EDQUOT, 1),  # the second trial's curves
        (2, "run.json", errno.ENOSPC, 2),  # the final run.json: every trial is kept
        (2, "parquet", errno.EIO, 0),
    ],
    ids=["run-json-start", "first-row", "second-row", "quota", "run-json-end", "io-error"],
)
def test_disk_full_mid_run(finished, tmp_path, monkeypatch, nth, name, err, kept):
    suite, _ = finished
    root = tmp_path / "res"
    _fail_write(monkeypatch, nth, err, name)
    args = ["run", suite, "--results-dir", root, "--run-id", "df", "--in-process", "-q"]
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert os.strerror(err).lower() in r.output.lower() or "disk" in r.output, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.output
    run_dir = root / SUITE / "df"
    done = [p for p in trial_files(run_dir)]
    assert len(done) == kept
    for p in done:  # what was written is whole
        assert pl.read_parquet(p).height == 1
    if name == "parquet":
        assert "resume with hembench run" in r.output
    monkeypatch.undo()
    if nth == 1 and name == "run.json":
        return  # no run.json: nothing to resume (the line says the write failed)
    before = snapshot(run_dir)
    r = invoke("run", suite, "--results-dir", root, "--resume", "--run-id", "df", "--in-process")
    assert r.exit_code == 0, r.output
    assert f"{2 - kept} of 2 trials to run" in r.output
    after = snapshot(run_dir)
    assert all(after[k] == v for k, v in before.items() if k.startswith("trials/"))
    assert load_run(run_dir)["status"].to_list() == ["ok", "ok"]
    assert not [p for p in run_dir.rglob(".*.tmp")]


# --- resume of a hostile run directory: exit 2, one line, nothing changed ----------------------


def _write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def mutate(run_dir: Path) -> None:
        path = run_dir / rel
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return mutate


def _edit_meta(**changes) -> Callable[[Path], None]:
    def mutate(run_dir: Path) -> None:
        meta = json.loads((run_dir / "run.json").read_text())
        meta.update(changes)
        (run_dir / "run.json").write_text(json.dumps(meta))

    return mutate


def _truncate_meta(run_dir: Path) -> None:
    data = (run_dir / "run.json").read_bytes()
    (run_dir / "run.json").write_bytes(data[: len(data) // 2])


def _replace_with(rel: str, kind: str) -> Callable[[Path], None]:
    """Replace `rel` by a file, a folder, a symlink to a folder outside, or nothing."""

    def mutate(run_dir: Path) -> None:
        path = run_dir / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        if kind == "file":
            path.write_text("x")
        elif kind == "dir":
            path.mkdir()
        elif kind == "symlink":
            outside = run_dir.parents[2] / "outside"
            outside.mkdir(exist_ok=True)
            (outside / "keep.txt").write_text("precious")
            path.symlink_to(outside)

    return mutate


def _link_run_dir(run_dir: Path) -> None:
    moved = run_dir.parents[2] / "moved-run"
    shutil.move(run_dir, moved)
    run_dir.symlink_to(moved)


def _link_suite_dir(run_dir: Path) -> None:
    suite_dir = run_dir.parent
    moved = run_dir.parents[2] / "moved-suite"
    shutil.move(suite_dir, moved)
    suite_dir.symlink_to(moved)


def _link_lock(run_dir: Path) -> None:
    target = run_dir.parents[2] / "precious.txt"
    target.write_text("precious")
    (run_dir / "run.lock").unlink(missing_ok=True)
    (run_dir / "run.lock").symlink_to(target)


def _damage_one_and_link_quarantine(run_dir: Path) -> None:
    trial_files(run_dir)[0].write_bytes(b"garbage")
    _replace_with("quarantine", "symlink")(run_dir)


RESUME_REFUSED: dict[str, tuple[Callable[[Path], None], str]] = {
    "run-json-garbage": (_write("run.json", b"\x00\x01garbage"), "damaged"),
    "run-json-truncated": (_truncate_meta, "damaged"),
    "run-json-empty": (_write("run.json", ""), "damaged"),
    "run-json-a-list": (_write("run.json", "[1, 2]"), "not a JSON object"),
    "run-json-a-string": (_write("run.json", '"run"'), "not a JSON object"),
    "run-json-not-utf8": (_write("run.json", b'{"a": "\xff\xfe"}'), "damaged"),
    "run-json-deeply-nested": (_write("run.json", "[" * 100_000 + "]" * 100_000), "damaged"),
    "run-json-nan-text": (_write("run.json", "NaN garbage"), "damaged"),
    "run-json-sessions-not-a-list": (_edit_meta(sessions="yes"), "sessions"),
    "run-json-trial-ids-a-dict": (_edit_meta(trial_ids={"a": 1}), "trial_ids"),
    "run-json-suite-text-a-number": (_edit_meta(suite_text=3), "suite_text"),
    "run-json-other-suite": (_edit_meta(suite_text="[suite]\nname='x'"), "suite file changed"),
    "run-json-other-trials": (_edit_meta(trial_ids=["a", "b"]), "trial ids"),
    "run-json-is-a-folder": (_replace_with("run.json", "dir"), "no earlier run"),
    "run-json-missing": (_replace_with("run.json", "none"), "no earlier run"),
    "trials-missing": (_replace_with("trials", "none"), "missing trials/"),
    "trials-a-file": (_replace_with("trials", "file"), "not a directory"),
    "trials-a-symlink": (_replace_with("trials", "symlink"), "symlink"),
    "curves-missing": (_replace_with("curves", "none"), "missing curves/"),
    "curves-a-file": (_replace_with("curves", "file"), "not a directory"),
    "curves-a-symlink": (_replace_with("curves", "symlink"), "symlink"),
    "run-lock-a-symlink": (_link_lock, "symlink"),
    "run-lock-a-folder": (_replace_with("run.lock", "dir"), "run lock"),
    "run-dir-a-symlink": (_link_run_dir, "symlink"),
    "suite-dir-a-symlink": (_link_suite_dir, "symlink"),
    "quarantine-a-symlink": (_damage_one_and_link_quarantine, "symlink"),
}


@pytest.mark.parametrize("case", sorted(RESUME_REFUSED))
@pytest.mark.parametrize("with_id", [True, False], ids=["run-id", "latest"])
def test_resume_of_a_hostile_run_is_refused(run, case, with_id):
    suite, root, run_dir = run
    mutate, text = RESUME_REFUSED[case]
    mutate(run_dir)
    before = snapshot(run_dir.resolve()) if run_dir.resolve().is_dir() else {}
    outside = {p: p.read_bytes() for p in root.parent.rglob("*") if p.is_file() and "out" in str(p)}
    r = resume(suite, root, *(["--run-id", RID] if with_id else []))
    if case in ("run-json-is-a-folder", "run-json-missing") and with_id:
        text = "no run"
    assert r.exit_code == 2, r.output
    assert text in r.output and r.output.count("error:") == 1, r.output
    if run_dir.resolve().is_dir():
        assert snapshot(run_dir.resolve()) == before
    for p, data in outside.items():  # link targets are untouched
        assert p.read_bytes() == data
    precious = root.parent / "precious.txt"
    assert not precious.exists() or precious.read_text() == "precious"


def test_resume_of_a_run_in_use_is_refused(run):
    suite, root, run_dir = run
    with open(run_dir / "run.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        r = resume(suite, root, "--run-id", RID)
    assert r.exit_code == 2 and "another process" in r.output


@pytest.mark.parametrize(
    ("args", "text"),
    [(["--run-id", "nope"], "no run"), (["--device", "auto"], "changed the trial ids")],
    ids=["unknown-run-id", "changed-device"],
)
def test_resume_that_cannot_match(run, args, text):
    suite, root, run_dir = run
    before = snapshot(run_dir)
    r = resume(suite, root, *args)
    assert r.exit_code == 2 and text in r.output, r.output
    assert snapshot(run_dir) == before


def test_resume_without_any_run(finished, tmp_path):
    suite, _ = finished
    r = resume(suite, tmp_path / "empty")
    assert r.exit_code == 2 and "no earlier run" in r.output


# --- resume repairs damaged trials: quarantined, re-run, exit 0 ---------------------------------


def _damage_row(how: str) -> Callable[[Path], None]:
    def mutate(run_dir: Path) -> None:
        first, second = trial_files(run_dir)
        data = first.read_bytes()
        if how == "garbage":
            first.write_bytes(b"PAR1 garbage PAR1")
        elif how == "truncated":
            first.write_bytes(data[: len(data) // 2])
        elif how == "empty":
            first.write_bytes(b"")
        elif how == "other-trial":
            first.write_bytes(second.read_bytes())
        elif how == "two-rows":
            pl.concat([pl.read_parquet(first)] * 2).write_parquet(first)
        elif how == "no-status":
            pl.read_parquet(first).drop("status").write_parquet(first)
        elif how == "symlink":
            target = run_dir.parents[2] / "outside-row.parquet"
            target.write_bytes(data)
            first.unlink()
            first.symlink_to(target)
        elif how == "folder":
            first.unlink()
            first.mkdir()
        curve = run_dir / "curves" / first.name
        if how == "curve-missing":
            curve.unlink()
        elif how == "curve-garbage":
            curve.write_bytes(b"garbage")
        elif how == "curve-truncated":
            curve.write_bytes(curve.read_bytes()[:20])
        elif how == "curve-other-trial":
            curve.write_bytes((run_dir / "curves" / second.name).read_bytes())

    return mutate


DAMAGE = [
    "garbage", "truncated", "empty", "other-trial", "two-rows", "no-status", "symlink", "folder",
    "curve-missing", "curve-garbage", "curve-truncated", "curve-other-trial",
]  # fmt: skip


@pytest.mark.parametrize("how", DAMAGE)
def test_resume_quarantines_and_reruns_a_damaged_trial(run, how):
    suite, root, run_dir = run
    damaged, intact = trial_files(run_dir)
    intact_bytes = intact.read_bytes()
    _damage_row(how)(run_dir)
    r = resume(suite, root)
    assert r.exit_code == 0, r.output
    assert "quarantine" in r.output and damaged.stem in r.output, r.output
    assert intact.read_bytes() == intact_bytes  # the intact trial was not re-run
    df = load_run(run_dir)
    assert sorted(df["trial_id"]) == sorted([damaged.stem, intact.stem])
    assert df["status"].to_list() == ["ok", "ok"]
    assert list((run_dir / "quarantine").iterdir())  # the damaged file is kept, not deleted
    outside = run_dir.parents[2] / "outside-row.parquet"
    assert not outside.exists() or pl.read_parquet(outside).height == 1


def _stale_temps(run_dir: Path) -> None:
    for folder in (run_dir, run_dir / "trials", run_dir / "curves"):
        (folder / ".x.parquet.abc123.tmp").write_bytes(b"half")
    (run_dir / ".run.json.zz.tmp").write_bytes(b"{")


def _mark_failed(run_dir: Path) -> None:
    f = trial_files(run_dir)[0]
    pl.read_parquet(f).with_columns(status=pl.lit("failed")).write_parquet(f)


@pytest.mark.parametrize(
    ("case", "mutate", "to_run"),
    [
        ("stale-temp-files", _stale_temps, 0),
        ("unrelated-file-in-trials", _write("trials/notes.txt", "mine"), 0),
        ("failed-trial", _mark_failed, 1),
        ("orphan-curve-file", _write("curves/deadbeef.parquet", b"half a kill"), 0),
        ("old-quarantine", lambda d: (d / "quarantine").mkdir(), 0),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_resume_cleans_up_and_keeps_finished_work(run, case, mutate, to_run):
    suite, root, run_dir = run
    mutate(run_dir)
    before = {k: v for k, v in snapshot(run_dir).items() if "deadbeef" not in k}
    r = invoke("run", suite, "--results-dir", root, "--resume", "--in-process")
    assert r.exit_code == 0, r.output
    assert f"{to_run} of 2 trials to run" in r.output
    assert not list(run_dir.rglob(".*.tmp"))
    after = snapshot(run_dir)
    assert sum(after[k] != v for k, v in before.items() if k.startswith("trials/")) == to_run
    if case == "unrelated-file-in-trials":
        assert (run_dir / "trials" / "notes.txt").read_text() == "mine"


def _second_run(finished, root: Path, run_id: str, start: str) -> Path:
    shutil.copytree(root / SUITE / RID, root / SUITE / run_id)
    meta = json.loads((root / SUITE / run_id / "run.json").read_text())
    (root / SUITE / run_id / "run.json").write_text(json.dumps({**meta, "start": start}))
    return root / SUITE / run_id


@pytest.mark.parametrize("garbage_old", [False, True], ids=["old-run", "old-run-damaged"])
def test_resume_picks_the_newest_start(run, finished, garbage_old):
    """Issue 21 item 11: not the lexicographically last run directory."""
    suite, root, _ = run
    newer = _second_run(finished, root, "0-newer", "2999-01-01T00:00:00+00:00")
    older = _second_run(finished, root, "zz-older", "2000-01-01T00:00:00+00:00")
    for d in (newer, older):
        (d / "trials" / trial_files(d)[0].name).unlink()
    if garbage_old:
        (older / "run.json").write_bytes(b"\xff")
        os.utime(older / "run.json", (0, 0))
    r = invoke("run", suite, "--results-dir", root, "--resume", "--in-process")
    assert r.exit_code == 0 and "0-newer" in r.output, r.output
    assert len(trial_files(newer)) == 2 and len(trial_files(older)) == 1


# --- reading a damaged run: show / plot / compare ----------------------------------------------


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "markdown"])
def test_show_skips_a_corrupt_trial_file(run, fmt):
    _, _, run_dir = run
    bad = trial_files(run_dir)[0]
    bad.write_bytes(b"garbage")
    r = invoke("show", run_dir, "--format", fmt)  # the CLI prints the warning as one line
    assert r.exit_code == 0, r.output
    assert "warning: " in r.output and bad.name in r.output


def test_show_with_a_corrupt_curve_file(run):
    _, _, run_dir = run
    (run_dir / "curves" / trial_files(run_dir)[0].name).write_bytes(b"garbage")
    assert invoke("show", run_dir).exit_code == 0


def test_plot_skips_a_corrupt_trial_file(run, tmp_path):
    _, _, run_dir = run
    trial_files(run_dir)[0].write_bytes(b"")
    r = invoke("plot", run_dir, "--out", tmp_path / "plots")
    assert r.exit_code == 0, r.output
    assert "warning: " in r.output and "skipped" in r.output


def test_compare_with_a_corrupt_trial_file(run):
    """A gate refuses (exit 2, `load_run(strict=True)`) or compares the readable rows with a
    warning (exit 0); never a traceback."""
    import warnings

    _, _, run_dir = run
    trial_files(run_dir)[0].write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = invoke("compare", run_dir, run_dir)
    if r.exit_code == 2:
        assert "cannot read trial files" in r.output and r.output.count("error:") == 1
    else:
        assert r.exit_code == 0 and any(w.category is RunDataWarning for w in caught), r.output


@pytest.mark.parametrize(
    ("case", "text"),
    [
        ("all-corrupt", "none of the 2 trial files is readable"),
        ("no-trials", "no .parquet files"),
        ("a-file", "not a run directory"),
        ("missing", "not a run directory"),
    ],
)
def test_show_refuses_a_run_without_readable_rows(run, case, text):
    _, _, run_dir = run
    target = run_dir
    if case == "all-corrupt":
        for f in trial_files(run_dir):
            f.write_bytes(b"garbage")
    elif case == "no-trials":
        for f in trial_files(run_dir):
            f.unlink()
    elif case == "a-file":
        target = run_dir / "run.json"
    else:
        target = run_dir / "nope"
    with _no_warning():  # the CLI turns warnings into one-line messages
        r = invoke("show", target)
    assert r.exit_code == 2 and text in r.output, r.output


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- interruptions -------------------------------------------------------------------------------


class _InterruptAfterOne:
    """An executor that finishes the first trial, then behaves as if Ctrl-C was pressed."""

    def run(self, trials, on_result, on_progress=None):
        from harness.records import failure_outcome

        on_result(failure_outcome(trials[0], "failed", "stand-in"))
        raise KeyboardInterrupt


def test_ctrl_c_is_recorded_and_prints_the_resume_command(finished, tmp_path, monkeypatch):
    from rich.console import Console

    from harness.runner import run_suite
    from harness.suite import load_suite

    suite, _ = finished
    root = tmp_path / "res"
    monkeypatch.setattr("harness.runner.get_executor", lambda *a, **k: _InterruptAfterOne())
    console = Console(record=True, width=200)
    with pytest.raises(KeyboardInterrupt):
        run_suite(load_suite(suite), root, console, run_id="int", quiet=True)
    text = console.export_text()
    assert f"interrupted: resume with hembench run {suite} --resume --run-id int" in text
    meta = json.loads((root / SUITE / "int" / "run.json").read_text())
    assert meta["sessions"][-1]["ended"] == "interrupted"
    assert meta["sessions"][-1]["statuses"] == {"failed": 1}
    assert len(trial_files(root / SUITE / "int")) == 1  # the finished trial is kept
    monkeypatch.undo()
    r = invoke("run", suite, "--results-dir", root, "--resume", "--in-process")
    assert r.exit_code == 0 and "2 of 2 trials to run" in r.output, r.output


def test_ctrl_c_exit_code_is_130(finished, tmp_path, monkeypatch):
    suite, _ = finished
    monkeypatch.setattr("harness.runner.get_executor", lambda *a, **k: _InterruptAfterOne())
    r = runner.invoke(app, ["run", str(suite), "--results-dir", str(tmp_path), "-q"])
    assert "interrupted: resume with" in r.output
    assert r.exit_code == 130, r.output


# Real signals, real worker processes (Linux /proc): the run is started as a subprocess.

SLOW = TINY.format(
    name="sig",
    sweep='debug.inject = ["none", "hang"]\ndebug.inject_step = [1]',
    steps=3,
    timeout=600,
)


def _procs() -> dict[int, tuple[int, str, bytes]]:
    """pid -> (parent pid, state, cmdline) of every process."""
    found = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            cmd = (stat_file.parent / "cmdline").read_bytes()
        except OSError:
            continue
        found[int(stat_file.parent.name)] = (int(fields[1]), fields[0], cmd)
    return found


def _children(pid: int) -> list[int]:
    """Trial worker processes of runner `pid`: forked by its multiprocessing forkserver (a child
    of the runner) or, with the spawn start method, its own spawned children."""
    procs = _procs()
    servers = {p for p, (ppid, _, cmd) in procs.items() if ppid == pid and b"forkserver" in cmd}
    return [
        p
        for p, (ppid, state, cmd) in procs.items()
        if state != "Z" and (ppid in servers or (ppid == pid and b"spawn_main" in cmd))
    ]


def _start_run(tmp_path: Path):
    import subprocess
    import sys
    import time

    suite = tmp_path / "sig.toml"
    suite.write_text(SLOW)
    root = tmp_path / "res"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", str(suite), "--results-dir", str(root),
         "--run-id", "s1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
    )  # fmt: skip
    trials = root / "sig" / "s1" / "trials"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # the first trial is written, the hang is running
        if trials.is_dir() and list(trials.glob("*.parquet")) and _children(proc.pid):
            time.sleep(1.0)
            return suite, root, proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the run never reached its hanging trial")


def _wait_gone(pids: list[int], seconds: float = 20) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() and _children_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def _children_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


@linux_only
def test_sigint_kills_workers_records_and_prints_the_hint(tmp_path):
    import signal

    _suite, root, proc = _start_run(tmp_path)
    workers = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in out + err, out + err
    assert "interrupted: resume with hembench run" in out, out + err
    assert proc.returncode == 130, proc.returncode
    assert _wait_gone(workers)
    run_dir = root / "sig" / "s1"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["sessions"][-1]["ended"] == "interrupted"
    assert len(trial_files(run_dir)) == 1


@linux_only
def test_kill_9_of_the_runner_takes_its_workers(tmp_path):
    import signal

    suite, root, proc = _start_run(tmp_path)
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # the runner only, not its process group
    _out, err = proc.communicate(timeout=60)
    assert _wait_gone(workers), "a worker outlived the runner"
    assert "BrokenPipe" not in err and "Traceback" not in err, err
    run_dir = root / "sig" / "s1"
    before = snapshot(run_dir)
    r = invoke("run", suite, "--results-dir", root, "--resume", "--in-process", "--timeout", "2")
    assert r.exit_code == 1, r.output  # the hang times out; the finished trial is not re-run
    assert "1 of 2 trials to run" in r.output
    assert all(snapshot(run_dir)[k] == v for k, v in before.items() if k.startswith("trials/"))


@linux_only
def test_a_worker_killed_from_outside_is_named(tmp_path):
    import signal

    _suite, root, proc = _start_run(tmp_path)
    (worker,) = _children(proc.pid)
    os.kill(worker, signal.SIGKILL)  # as the OOM killer or an operator would
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, out + err
    assert "Traceback" not in out + err
    df = load_run(root / "sig" / "s1")
    row = df.filter(pl.col("inject") == "hang")
    assert row["status"][0] in ("failed", "oom")
    assert "SIGKILL" in row["error"][0] or "signal 9" in row["error"][0]


# --- hostile bench baselines: exit 2 before any timing -------------------------------------------

BASELINE = Path(__file__).resolve().parents[1] / "benchmarks" / "baseline-cpu.json"


def _baseline_doc(**changes) -> str:
    doc = json.loads(BASELINE.read_text())
    doc.update(changes)
    return json.dumps(doc)


def _first_case(**ratio) -> str:
    doc = json.loads(BASELINE.read_text())
    first = next(iter(doc["cases"].values()))
    first["ratio"].update(ratio)
    return json.dumps(doc)


BASELINES: dict[str, str | bytes] = {
    "not-json": "not json",
    "empty-file": "",
    "not-utf8": b"\xff\xfe{}",
    "deeply-nested": "[" * 100_000 + "]" * 100_000,
    "a-list": "[]",
    "tolerance-nan": _baseline_doc(tolerance_pct=float("nan")),
    "tolerance-negative": _baseline_doc(tolerance_pct=-5),
    "tolerance-string": _baseline_doc(tolerance_pct="ten"),
    "no-cases": _baseline_doc(cases={}),
    "median-true": _first_case(median=True),
    "median-infinity": _first_case(median=float("inf")),
    "median-nan": _first_case(median=float("nan")),
}


@pytest.mark.parametrize("case", sorted(BASELINES))
def test_hostile_bench_baseline_is_refused_before_timing(tmp_path, case):
    data = BASELINES[case]
    path = tmp_path / "baseline.json"
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    r = invoke("bench", "--baseline", path, "--preset", "tiny", "--only", "no-such-case")
    assert r.exit_code == 2, r.output
    assert r.output.count("error:") == 1 and "baseline" in r.output, r.output


@pytest.mark.parametrize(
    "args",
    [["--tolerance", "nan"], ["--baseline", "/no/such/file.json"], ["--save", "{file}/x.json"]],
    ids=["tolerance-nan", "missing-baseline", "save-under-a-file"],
)
def test_hostile_bench_options_are_refused_before_timing(tmp_path, args):
    (tmp_path / "f").write_text("a file")
    args = [a.replace("{file}", str(tmp_path / "f")) for a in args]
    r = invoke("bench", "--preset", "tiny", "--only", "no-such-case", *args)
    assert r.exit_code == 2 and r.output.count("error:") == 1, r.output
