"""Results on disk: run directories, atomic per-trial Parquet files, resume, loading.

Layout of one run (`root/<suite>/<run_id>/`):

    run.json                  provenance: suite text, env, git, start/end, planned trial ids
    run.lock                  flock held by the process writing the run (freed if it dies)
    trials/<trial_id>.parquet one row per trial (written last: its presence = trial done)
    curves/<trial_id>.parquet per-step curves of that trial
    quarantine/               damaged trial files found on --resume (moved, never deleted)

Every file is written to a temporary name in the same directory and `os.replace`d into place,
so a reader (or a run killed with -9) never sees a half-written file; a temporary file left by a
kill inside that window is removed on `--resume`. Run ids are unique (UTC time + random suffix)
and created with `mkdir(exist_ok=False)`, so two runs writing into the same results root at
once never share a directory; the lock stops two processes from resuming the same run at once.
No write under the root follows a symlink (`harness.results_io`). OS errors while preparing a
run raise `RunDirError`, while writing results `RunWriteError` (disk full: one line, nothing
finished lost).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import secrets
import stat
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from harness.records import CURVE_COLUMNS, TrialOutcome, column_dtype
from harness.results_io import (
    RunDirError,
    RunWriteError,
    atomic_write,
    check_no_symlinks,
    dir_error,
    mkdir_real,
    open_lock_file,
    read_meta_file,
    require_dir,
    stale_temp_files,
    start_time,
    verify_trial,
)

__all__ = ["RunDataWarning", "RunDir", "RunDirError", "RunWriteError", "load_curves", "load_run"]

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RunDataWarning(UserWarning):
    """Some files of a run could not be read and were left out."""


def _utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_inside(root: Path, path: Path) -> Path:
    """`path` resolved, after checking it lies inside `root` (no `..` or absolute escape)."""
    root_r, path_r = root.resolve(), path.resolve()
    if path_r != root_r and root_r not in path_r.parents:
        raise RunDirError(f"output path {path} escapes the results root {root}")
    return path_r


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
        raise RunDirError(
            f"run id {run_id!r} must match [A-Za-z0-9][A-Za-z0-9_.-]* (no '/', no '..')"
        )
    if len(run_id) > 200:
        raise RunDirError(f"run id of {len(run_id)} characters is too long (at most 200)")
    return run_id


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _check_root(root: Path) -> None:
    """The results root is a directory or does not exist yet (any OS error: `RunDirError`)."""
    try:
        if not stat.S_ISDIR(os.stat(root).st_mode):
            raise RunDirError(f"results directory {root} is not a directory")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise dir_error("cannot use the results directory", root, exc) from None


class RunDir:
    """One run's directory; hold `lock()` while writing into it."""

    def __init__(self, path: Path, root: Path | None = None):
        self.path = path
        self.root = root if root is not None else path.parent.parent
        self.trials = path / "trials"
        self.curves = path / "curves"
        self.quarantine = path / "quarantine"

    @property
    def run_id(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, root: Path, suite: str, run_id: str | None = None) -> RunDir:
        """A new, empty run directory `root/suite/run_id` (fails if it exists)."""
        run_id = check_run_id(new_run_id() if run_id is None else run_id)
        _check_root(root)
        path = root / suite / run_id
        check_no_symlinks(root, path)
        check_inside(root, path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir()
        except FileExistsError:
            if path.parent.is_dir():
                raise RunDirError(f"run directory {path} already exists (use --resume)") from None
            raise RunDirError(f"cannot create {path}: {path.parent} is a file") from None
        except OSError as exc:
            raise dir_error("cannot create the run directory", path, exc) from None
        run = cls(path, root)
        mkdir_real(run.trials)
        mkdir_real(run.curves)
        return run

    @classmethod
    def find(cls, root: Path, suite: str, run_id: str | None = None) -> RunDir:
        """An existing run: `run_id`, or the run of `suite` under `root` that started last
        (`start` in its run.json; a run whose run.json is unreadable counts by its mtime)."""
        _check_root(root)
        suite_dir = root / suite
        check_no_symlinks(root, suite_dir)
        check_inside(root, suite_dir)
        if run_id is not None:
            path = suite_dir / check_run_id(run_id)
            check_no_symlinks(root, path)
            if not (path / "run.json").is_file():
                raise RunDirError(f"no run {run_id!r} of suite {suite!r} under {root}")
            return cls(path, root)
        runs = [p.parent for p in suite_dir.glob("*/run.json")] if suite_dir.is_dir() else []
        runs = [p for p in runs if (p / "run.json").is_file()]
        if not runs:
            raise RunDirError(f"no earlier run of suite {suite!r} under {root} to resume")
        latest = max(runs, key=start_time)
        check_no_symlinks(root, latest)
        return cls(latest, root)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive, non-blocking lock on the run (released by the OS if the process dies).
        Checks first that no path component under the root is a symlink and that `trials/`
        and `curves/` are real directories."""
        check_no_symlinks(self.root, self.path / "run.lock")
        require_dir(self.path, "run directory")
        fd = open_lock_file(self.path / "run.lock")
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirError(f"run {self.path} is being written by another process") from None
            require_dir(self.trials, "trials/ folder")
            require_dir(self.curves, "curves/ folder")
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # --- provenance ------------------------------------------------------------------------

    def read_meta(self) -> dict[str, Any]:
        """run.json as a dict; `RunDirError` (one line) when it is unreadable or malformed."""
        return read_meta_file(self.path / "run.json")

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write(self.path / "run.json", json.dumps(meta, indent=2, default=str).encode())

    # --- trials ------------------------------------------------------------------------------

    def write_outcome(self, outcome: TrialOutcome) -> None:
        """Curves first, then the row: a trial file exists only for a completed trial."""
        tid = outcome.trial_id
        require_dir(self.trials, "trials/ folder")
        require_dir(self.curves, "curves/ folder")
        curves = pl.DataFrame(outcome.curves or None, schema=CURVE_COLUMNS, strict=False)
        curves = curves.with_columns(pl.lit(tid).alias("trial_id"))
        _atomic_parquet(curves, self.curves / f"{tid}.parquet")
        _atomic_parquet(row_frame(outcome.row), self.trials / f"{tid}.parquet")

    def done(self) -> dict[str, str]:
        """trial_id -> status of every readable trial file (unreadable ones are ignored and
        will be re-run)."""
        out = {}
        for f in self.trials.glob("*.parquet"):
            try:
                row = pl.read_parquet(f, columns=["trial_id", "status"])
            except Exception:  # damaged: re-run (repair() quarantines it on --resume)
                continue
            if row.height == 1 and row["trial_id"][0] == f.stem:
                out[f.stem] = row["status"][0]
        return out

    def repair(self) -> tuple[list[Path], dict[str, str]]:
        """Before resuming (under the lock): remove temporary files a kill left behind and move
        every damaged trial (row or curve file unreadable, or a row that is not exactly this
        trial's) into `quarantine/`, so that it is re-run. Returns (removed temp files,
        trial_id -> why it was quarantined)."""
        stale = stale_temp_files(self.path, self.trials, self.curves)
        for p in stale:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        damaged = {}
        for f in sorted(self.trials.glob("*.parquet")):
            why = verify_trial(f, self.curves / f.name)
            if why is not None:
                damaged[f.stem] = why
        if damaged:
            check_no_symlinks(self.root, self.quarantine)
            mkdir_real(self.quarantine)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            for tid in damaged:
                for kind in ("trials", "curves"):
                    src = self.path / kind / f"{tid}.parquet"
                    if src.is_symlink() or src.exists():
                        _move(src, self.quarantine / f"{stamp}-{kind}-{tid}.parquet")
        return stale, damaged


def _move(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as exc:
        raise dir_error("cannot move a damaged file to quarantine:", src, exc) from None


def row_frame(row: dict[str, Any]) -> pl.DataFrame:
    """A one-row frame with the dtypes of `harness.records.ROW_COLUMNS` (`tar@*`: Float64), so
    that null values in failed trials never change a dtype."""
    schema = {k: column_dtype(k) for k in row}
    return pl.DataFrame([row], schema=schema, strict=False)


def _atomic_parquet(frame: pl.DataFrame, path: Path) -> None:
    buf = io.BytesIO()  # a trial's row or curves: small enough to serialise in memory
    frame.write_parquet(buf)
    atomic_write(path, buf.getvalue())


def _read_each(files: list[Path], what: str, strict: bool = False) -> list[pl.DataFrame]:
    """Every readable file as a frame; unreadable ones are named in one `RunDataWarning` (or,
    with `strict`, a `RunDirError`)."""
    frames, bad = [], []
    for f in files:
        try:
            frames.append(pl.read_parquet(f))
        except Exception:  # polars raises several error types for corrupt files
            bad.append(f.name)
    if bad:
        what = f"{len(bad)} unreadable {what} file(s): {', '.join(bad)}"
        if strict:
            raise RunDirError(f"{files[0].parent}: cannot read trial files: {what}")
        warnings.warn(f"{files[0].parent}: skipped {what}", RunDataWarning, stacklevel=3)
    return frames


def load_run(path: str | Path, strict: bool = False) -> pl.DataFrame:
    """All readable trial rows of the run at `path`, sorted by trial_index then seed.

    Frames from different code versions are aligned by column name (missing columns become
    null). An unreadable trial file is left out with a `RunDataWarning` naming it (`strict`, as
    a regression gate wants: `RunDirError` "cannot read trial files" instead). Raises
    `RunDirError` naming the directory when it is not a run, holds no readable trial file, or
    its rows have no `status` column.
    """
    path = Path(path)
    trials = path / "trials"
    if not trials.is_dir():
        raise RunDirError(f"{path}: not a run directory (no trials/ folder)")
    try:
        files = sorted(trials.glob("*.parquet"))
    except OSError as exc:
        raise dir_error("cannot list", trials, exc) from None
    if not files:
        raise RunDirError(f"{path}: trials/ holds no .parquet files (no trial has finished)")
    frames = _read_each(files, "trial", strict)
    if not frames:
        raise RunDirError(f"{path}: none of the {len(files)} trial files is readable")
    try:
        frame = pl.concat(frames, how="diagonal_relaxed")
    except Exception as exc:  # columns of one name but clashing types
        raise RunDirError(f"{path}: cannot combine trial files: {exc}") from exc
    if "status" not in frame.columns:
        raise RunDirError(f"{path}: trial rows have no 'status' column")
    order = [c for c in ("trial_index", "seed") if c in frame.columns]
    return frame.sort(order) if order else frame


def load_curves(path: str | Path) -> pl.DataFrame:
    """All readable curve files of a run (unreadable ones left out with a `RunDataWarning`)."""
    files = sorted((Path(path) / "curves").glob("*.parquet"))
    frames = _read_each(files, "curve") if files else []
    if not frames:
        return pl.DataFrame(schema={**CURVE_COLUMNS, "trial_id": pl.String()})
    return pl.concat(frames, how="diagonal_relaxed")


def run_meta_start(
    suite_path: str, suite_text: str, env: dict[str, Any], trial_ids: list[str], argv: list[str]
) -> dict[str, Any]:
    """run.json content at the start of a run."""
    return {
        "suite_path": suite_path,
        "suite_text": suite_text,
        "argv": argv,
        "env": env,
        "git_commit": env.get("git_commit"),
        "git_dirty": env.get("git_dirty"),
        "hostname": env.get("hostname"),
        "start": _utcnow(),
        "end": None,
        "trial_ids": trial_ids,
        "sessions": [],
    }


def finish_meta(
    meta: dict[str, Any], counts: dict[str, int], resumed: bool, ended: str = "finished"
) -> dict[str, Any]:
    """run.json content after a (possibly resumed) session ended; `ended` is `finished`,
    `interrupted` (Ctrl-C) or `write error`."""
    end = _utcnow()
    session = {"end": end, "resumed": resumed, "statuses": counts}
    if ended != "finished":
        session["ended"] = ended
    meta["sessions"] = [*(meta.get("sessions") or []), session]
    meta["end"] = end
    return meta
