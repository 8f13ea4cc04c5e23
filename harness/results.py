"""Results on disk: run directories, atomic per-trial Parquet files, resume, loading.

Layout of one run (`root/<suite>/<run_id>/`):

    run.json                  provenance: suite text, env, git, start/end, planned trial ids
    run.lock                  flock held by the process writing the run (freed if it dies)
    trials/<trial_id>.parquet one row per trial (written last: its presence = trial done)
    curves/<trial_id>.parquet per-step curves of that trial

Every file is written to a temporary name in the same directory and `os.replace`d into place,
so a reader (or a run killed with -9) never sees a half-written file. Run ids are unique
(UTC time + random suffix) and created with `mkdir(exist_ok=False)`, so two runs writing into
the same results root at once never share a directory; the lock stops two processes from
resuming the same run at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from harness.records import CURVE_COLUMNS, TrialOutcome, column_dtype

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RunDirError(ValueError):
    """A run directory or id is invalid, missing, or in use by another process."""


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
    return run_id


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


class RunDir:
    """One run's directory; hold `lock()` while writing into it."""

    def __init__(self, path: Path):
        self.path = path
        self.trials = path / "trials"
        self.curves = path / "curves"

    @property
    def run_id(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, root: Path, suite: str, run_id: str | None = None) -> RunDir:
        """A new, empty run directory `root/suite/run_id` (fails if it exists)."""
        run_id = check_run_id(new_run_id() if run_id is None else run_id)
        path = check_inside(root, root / suite / run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            raise RunDirError(f"run directory {path} already exists (use --resume)") from None
        run = cls(path)
        run.trials.mkdir()
        run.curves.mkdir()
        return run

    @classmethod
    def find(cls, root: Path, suite: str, run_id: str | None = None) -> RunDir:
        """An existing run: `run_id`, or the latest run of `suite` under `root`."""
        suite_dir = check_inside(root, root / suite)
        if run_id is not None:
            path = check_inside(root, suite_dir / check_run_id(run_id))
            if not (path / "run.json").is_file():
                raise RunDirError(f"no run {run_id!r} of suite {suite!r} under {root}")
            return cls(path)
        runs = sorted(p for p in suite_dir.glob("*/run.json")) if suite_dir.is_dir() else []
        if not runs:
            raise RunDirError(f"no earlier run of suite {suite!r} under {root} to resume")
        return cls(runs[-1].parent)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive, non-blocking lock on the run (released by the OS if the process dies)."""
        with open(self.path / "run.lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirError(f"run {self.path} is being written by another process") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # --- provenance ------------------------------------------------------------------------

    def read_meta(self) -> dict[str, Any]:
        return json.loads((self.path / "run.json").read_text())

    def write_meta(self, meta: dict[str, Any]) -> None:
        _atomic_write(self.path / "run.json", json.dumps(meta, indent=2, default=str).encode())

    # --- trials ------------------------------------------------------------------------------

    def write_outcome(self, outcome: TrialOutcome) -> None:
        """Curves first, then the row: a trial file exists only for a completed trial."""
        tid = outcome.trial_id
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
            except Exception:  # truncated/corrupt (should not happen with atomic writes)
                continue
            if row.height == 1 and row["trial_id"][0] == f.stem:
                out[f.stem] = row["status"][0]
        return out


def row_frame(row: dict[str, Any]) -> pl.DataFrame:
    """A one-row frame with the dtypes of `harness.records.ROW_COLUMNS` (`tar@*`: Float64), so
    that null values in failed trials never change a dtype."""
    schema = {k: column_dtype(k) for k in row}
    return pl.DataFrame([row], schema=schema, strict=False)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _atomic_parquet(frame: pl.DataFrame, path: Path) -> None:
    buf = io.BytesIO()  # a trial's row or curves: small enough to serialise in memory
    frame.write_parquet(buf)
    _atomic_write(path, buf.getvalue())


def load_run(path: str | Path) -> pl.DataFrame:
    """All trial rows of the run at `path`, sorted by trial_index then seed.

    Frames from different code versions are aligned by column name (missing columns become
    null). Raises `RunDirError` naming the directory when it is not a run, holds no trial
    files, holds an unreadable one, or its rows have no `status` column.
    """
    path = Path(path)
    trials = path / "trials"
    if not trials.is_dir():
        raise RunDirError(f"{path}: not a run directory (no trials/ folder)")
    files = sorted(trials.glob("*.parquet"))
    if not files:
        raise RunDirError(f"{path}: trials/ holds no .parquet files (no trial has finished)")
    try:
        frame = pl.concat([pl.scan_parquet(f) for f in files], how="diagonal_relaxed").collect()
    except Exception as exc:  # polars raises several error types for corrupt or clashing files
        raise RunDirError(f"{path}: cannot read trial files: {exc}") from exc
    if "status" not in frame.columns:
        raise RunDirError(f"{path}: trial rows have no 'status' column")
    order = [c for c in ("trial_index", "seed") if c in frame.columns]
    return frame.sort(order) if order else frame


def load_curves(path: str | Path) -> pl.DataFrame:
    files = sorted((Path(path) / "curves").glob("*.parquet"))
    if not files:
        return pl.DataFrame(schema={**CURVE_COLUMNS, "trial_id": pl.String()})
    return pl.concat([pl.scan_parquet(f) for f in files], how="diagonal_relaxed").collect()


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


def finish_meta(meta: dict[str, Any], counts: dict[str, int], resumed: bool) -> dict[str, Any]:
    """run.json content after a (possibly resumed) session ended."""
    end = _utcnow()
    meta["sessions"] = [
        *meta.get("sessions", []),
        {"end": end, "resumed": resumed, "statuses": counts},
    ]
    meta["end"] = end
    return meta
