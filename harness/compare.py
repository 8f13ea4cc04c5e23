"""Compare two suite runs: `hembench compare BASE_RUN HEAD_RUN --fail-on METRIC:PCT%`.

A run directory holds one Parquet file per trial, `<run>/trials/<trial_id>.parquet`, one row
each (status, config columns, seed, metrics). Trials are joined **by config**: the seed is dropped
from the key and each metric is averaged over the ok seeds of a config (a trial id is a hash of
config + seed, so equal configs with equal seeds share ids; averaging first also copes with runs
that used different seed lists). For each config present in both runs and each metric:

    change % = 100 · (head_mean / base_mean − 1)

A breach is a change in the bad direction beyond the threshold: lower is worse for throughput
and TAR/AUC/accuracy, higher is worse for memory, EER and durations. A config that has ok trials
in the base run but none in the head run is also a breach (every seed failed); a config found in
one run only is reported as a note.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import polars as pl

from harness.records import metric_info

# --fail-on shorthands -> column patterns they stand for
ALIASES: dict[str, str] = {
    "throughput": "samples_per_s",
    "peak_mem": "*_mib",
    "tar": "tar@*",
}

# columns that describe the trial record rather than its configuration
_META = {"trial_id", "status", "error", "seed", "run_id", "suite", "hostname"}
_META_PREFIXES = ("env_", "git_", "started", "ended", "time_")

_FAIL_ON = re.compile(r"^(?P<metric>[^:]+):(?P<pct>\d+(\.\d+)?)%?$")


class RunError(ValueError):
    """An option is malformed or the runs cannot be compared (exit 2); an unreadable run
    directory raises `harness.results.RunDirError`."""


@dataclass(frozen=True)
class Delta:
    """One config × metric comparison."""

    config: str
    metric: str
    base: float | None
    head: float | None
    n_base: int
    n_head: int
    change_pct: float | None
    limit_pct: float | None  # None: reported only, not gated
    breached: bool
    note: str = ""


def direction(column: str) -> int | None:
    """+1 if higher is better, −1 if lower is better, None if `column` is not a known metric
    (`harness.records.METRICS`)."""
    info = metric_info(column)
    return None if info is None else (1 if info.higher_is_better else -1)


def parse_fail_on(specs: list[str]) -> list[tuple[str, float]]:
    """`["throughput:10%", "tar@1e-3:2"]` -> `[("throughput", 10.0), ("tar@1e-3", 2.0)]`."""
    out = []
    for spec in specs:
        m = _FAIL_ON.match(spec.strip())
        if not m:
            raise RunError(f"--fail-on {spec!r}: expected METRIC:PCT% (e.g. throughput:10%)")
        out.append((m["metric"], float(m["pct"])))
    return out


def metric_columns(frame: pl.DataFrame) -> list[str]:
    """Numeric columns with a known direction, in frame order."""
    return [c for c, t in frame.schema.items() if t.is_numeric() and direction(c) is not None]


# Columns that a harness row derives from `config_key`; they ride along to make labels readable.
_LABEL_COLUMNS = ("method", "memory", "virtual_batch")


def join_columns(frame: pl.DataFrame) -> list[str]:
    """Columns that identify a configuration (seed excluded).

    Harness rows carry `config_key` (hash of the resolved config minus seed): that is the join
    key, plus the descriptive columns it determines. Without it (rows from elsewhere), every
    column that is neither a metric nor record metadata is taken as config.
    """
    if "config_key" in frame.columns:
        return ["config_key", *[c for c in _LABEL_COLUMNS if c in frame.columns]]
    metrics = set(metric_columns(frame))
    return [
        c
        for c in frame.columns
        if c not in metrics and c not in _META and not c.startswith(_META_PREFIXES)
    ]


def expand_metric(name: str, columns: list[str]) -> list[str]:
    """The metric columns an alias or pattern stands for; a plain name must exist as a column."""
    pattern = ALIASES.get(name, name)
    matched = [c for c in columns if fnmatch.fnmatchcase(c, pattern)]
    if not matched:
        raise RunError(
            f"--fail-on metric {name!r} matches no metric column; available: {', '.join(columns)}; "
            f"aliases: {', '.join(ALIASES)}"
        )
    return matched


def mean_by_config(frame: pl.DataFrame, by: list[str], metrics: list[str]) -> pl.DataFrame:
    """Per config: `trials` (any status), `n` (ok trials), each metric's mean over ok trials."""
    if not by:
        frame = frame.with_columns(pl.lit("all").alias("_config"))
        by = ["_config"]
    ok = pl.col("status") == "ok"
    return (
        frame.group_by(by)
        .agg(
            pl.len().alias("trials"),
            ok.sum().alias("n"),
            *[pl.col(m).filter(ok).cast(pl.Float64).mean() for m in metrics],
        )
        .sort(by)
    )


def _label(row: dict, by: list[str]) -> str:
    return " ".join(f"{k}={row[k]}" for k in by) or "all"


def compare_runs(
    base: pl.DataFrame,
    head: pl.DataFrame,
    fail_on: list[tuple[str, float]],
    by: list[str] | None = None,
) -> tuple[list[Delta], list[str]]:
    """Deltas for every shared config × metric, and notes on configs found in one run only.

    `by` overrides the inferred config columns. Gated metrics are those named in `fail_on`
    (aliases and fnmatch patterns allowed); all other common metrics are reported ungated.
    """
    by = by if by is not None else sorted(set(join_columns(base)) & set(join_columns(head)))
    for col in by:
        if col not in base.columns or col not in head.columns:
            raise RunError(f"config column {col!r} is not in both runs")
    metrics = [m for m in metric_columns(base) if m in metric_columns(head)]
    limits: dict[str, float] = {}
    for name, pct in fail_on:
        for col in expand_metric(name, metrics):
            limits[col] = min(pct, limits.get(col, pct))

    a, b = mean_by_config(base, by, metrics), mean_by_config(head, by, metrics)
    keys = by or ["_config"]
    joined = a.join(b, on=keys, how="full", suffix="_head", coalesce=True, nulls_equal=True)
    deltas: list[Delta] = []
    notes: list[str] = []
    for row in joined.sort(keys).iter_rows(named=True):
        label = _label(row, by)
        if row["trials"] is None or row["trials_head"] is None:
            notes.append(f"only in {'head' if row['trials'] is None else 'base'}: {label}")
            continue
        if row["n"] and not row["n_head"]:
            note = "no ok trial in head"
            deltas.append(Delta(label, "status", None, None, row["n"], 0, None, None, True, note))
            continue
        for m in metrics:
            deltas.append(
                _delta(label, m, row[m], row[f"{m}_head"], row["n"], row["n_head"], limits.get(m))
            )
    if not deltas:
        raise RunError(f"no config in common between the runs (joined on {', '.join(keys)})")
    return deltas, notes


def _delta(
    config: str, metric: str, base: float | None, head: float | None, n_base: int, n_head: int,
    limit: float | None,
) -> Delta:  # fmt: skip
    if base is None or head is None:
        return Delta(config, metric, base, head, n_base, n_head, None, limit, False, "null")
    if base == 0:
        change = 0.0 if head == 0 else float("inf") * (1 if head > 0 else -1)
    else:
        change = 100.0 * (head / base - 1.0)
    worse = -direction(metric) * change  # > 0 means the bad direction
    breached = limit is not None and worse > limit
    return Delta(config, metric, base, head, n_base, n_head, change, limit, breached)
