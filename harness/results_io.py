"""Safe file operations under a results root, and checks of a run's files: no symlink is
followed for a write, every OS error becomes one line naming the path, every file is written
atomically, a damaged run.json or trial file is recognised as such.

Used by `harness.results`; torch-free. The results root itself may be a symlink (the user chose
it); below it, the suite folder, the run directory, `trials/`, `curves/`, `quarantine/` and
`run.lock` must be real files and folders, so that a planted link cannot redirect a write (a
`run.lock` link would otherwise truncate its target, a `trials/` link write rows elsewhere).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl


class RunDirError(ValueError):
    """A run directory or id is invalid, missing, or in use by another process."""


class RunWriteError(RunDirError):
    """Results could not be written (disk full, read-only, I/O error). Files written before the
    error are complete (atomic writes), so nothing finished is lost; the run can be resumed."""


_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOTDIR: "a component of the path is a file, not a directory",
    errno.EISDIR: "is a directory",
    errno.ELOOP: "is a symlink (not followed)",
    errno.EIO: "I/O error",
}


def os_reason(exc: OSError) -> str:
    """A short reason for an OS error: `disk full`, `permission denied`, ..."""
    return _REASONS.get(exc.errno or 0, exc.strerror or type(exc).__name__)


def dir_error(what: str, path: Path, exc: OSError) -> RunDirError:
    """A one-line error for an OS error while preparing `path` (bad input: exit 2)."""
    return RunDirError(f"{what} {path}: {os_reason(exc)}")


def write_error(path: Path, exc: OSError) -> RunWriteError:
    return RunWriteError(
        f"cannot write {path}: {os_reason(exc)}; files written before this are complete"
    )


def check_no_symlinks(root: Path, path: Path) -> None:
    """Raise `RunDirError` if any existing component of `path` below `root` is a symlink."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise RunDirError(f"output path {path} escapes the results root {root}") from None
    current = root
    for part in rel.parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise dir_error("cannot inspect", current, exc) from None
        if stat.S_ISLNK(mode):
            raise RunDirError(
                f"{current} is a symlink; hembench never writes through links under the results "
                "root (replace it with a real directory or file)"
            )


def require_dir(path: Path, what: str) -> None:
    """`path` must be an existing real directory (not a symlink, not a file)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise RunDirError(f"{path}: missing {what}; not a complete run directory") from None
    except OSError as exc:
        raise dir_error("cannot inspect", path, exc) from None
    if stat.S_ISLNK(mode):
        raise RunDirError(f"{path} is a symlink; hembench never writes through links")
    if not stat.S_ISDIR(mode):
        raise RunDirError(f"{path}: {what} is not a directory")


def mkdir_real(path: Path) -> None:
    """Create directory `path` (parent must exist); an existing real directory is fine."""
    try:
        path.mkdir()
    except FileExistsError:
        require_dir(path, path.name + "/ folder")
    except OSError as exc:
        raise write_error(path, exc) from None


def open_lock_file(path: Path) -> int:
    """A descriptor of `path` opened for locking, never following a symlink, never truncating."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunDirError(
                f"{path} is a symlink; hembench never writes through links (remove it)"
            ) from None
        raise dir_error("cannot open the run lock", path, exc) from None


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file in `path`'s folder, fsync, and rename it into place
    (a rename replaces a symlink at `path` itself, never its target). OS errors (disk full, ...)
    raise `RunWriteError`; the temporary file is removed and an earlier `path` stays intact."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise


def stale_temp_files(*folders: Path) -> list[Path]:
    """Temporary files (`.<name>.*.tmp`) that a killed writer left in `folders`."""
    found: list[Path] = []
    for folder in folders:
        with contextlib.suppress(OSError):
            found += [
                p
                for p in folder.iterdir()
                if p.name.startswith(".") and p.name.endswith(".tmp") and not p.is_dir()
            ]
    return found


# --- checks of a run's files ---------------------------------------------------------------


def verify_trial(row_file: Path, curve_file: Path) -> str | None:
    """Why the trial file pair is damaged, or None when both read whole and match the trial."""
    tid = row_file.stem
    for f in (row_file, curve_file):
        if f.is_symlink():
            return f"{f.parent.name}/{f.name} is a symlink"
        if not f.is_file():
            return f"{f.parent.name}/{f.name} is missing"
    try:
        row = pl.read_parquet(row_file)
    except Exception as exc:
        return f"unreadable row file ({type(exc).__name__})"
    if row.height != 1 or "trial_id" not in row.columns or "status" not in row.columns:
        return f"row file holds {row.height} rows / columns {row.columns[:3]}..., not one row"
    if row["trial_id"][0] != tid:
        return f"row file holds trial {row['trial_id'][0]!r}, not {tid!r}"
    try:
        curves = pl.read_parquet(curve_file)
    except Exception as exc:
        return f"unreadable curve file ({type(exc).__name__})"
    if "trial_id" in curves.columns and curves.height and set(curves["trial_id"]) != {tid}:
        return "curve file belongs to another trial"
    return None


def read_meta_file(path: Path) -> dict[str, Any]:
    """A run.json: a JSON object whose `sessions` (if any) is a list; else `RunDirError`."""
    hint = "this run cannot be resumed; start a new run (its trial files stay readable)"
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise RunDirError(f"{path}: cannot read ({os_reason(exc)})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:120]
        raise RunDirError(f"{path} is damaged ({type(exc).__name__}: {reason}); {hint}") from None
    if not isinstance(meta, dict):
        raise RunDirError(f"{path} is damaged (not a JSON object); {hint}")
    for key, kind in (("sessions", list), ("trial_ids", list), ("suite_text", str)):
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise RunDirError(f"{path} is damaged ({key!r} is not a {kind.__name__}); {hint}")
    return meta


def start_time(run: Path) -> tuple[float, str]:
    """Sort key of a run: its run.json `start` (else the file's mtime), then its name."""
    try:
        start = json.loads((run / "run.json").read_text())["start"]
        return datetime.fromisoformat(start).timestamp(), run.name
    except Exception:
        try:
            return (run / "run.json").stat().st_mtime, run.name
        except OSError:
            return float("-inf"), run.name
