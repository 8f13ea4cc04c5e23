"""Reading a run: aggregation over seeds, pivots, per-trial rows, rich/markdown/csv/json output
(plots: `harness.plots`).

Aggregation (`aggregate`): ok trials are grouped by configuration — method, memory size, virtual
batch, plus any other config column that varies within the run — and each metric gets
mean, 95% CI half-width t_{0.975, n−1}·sd/√n (null for n < 2), n, the CI's bounds clipped to
the metric's range (`<m>_lo`, `<m>_hi`: TAR, EER and AUC lie in [0, 1], so two seeds never read
`0.625 ± 1.588`), and Δ = mean − mean of the suite's baseline configuration (the rows with
`is_baseline`). Groups are sorted explicitly.

Tables are never truncated (`print_table`): wider than the terminal they become one line of
`column=value` per row, off a terminal (CI logs, pipes) they are printed at their full width.

Metrics: `tar@<far>` (one FAR, see `pick_far`), `peak_mib` (`with_peak`: the torch allocator's
peak on CUDA, the peak of live tensor bytes on CPU), `samples_per_s`, `eer`, `auc`, and
`rss_net_mib` (peak RSS above the RSS after setup) when the run has it.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Sequence
from typing import Any

import polars as pl
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from harness.records import far_key, metric_info

FORMATS = ("table", "csv", "json", "markdown")
AXES = ("method", "memory", "virtual_batch")
# config columns that become grouping keys when they vary within a run
_OPTIONAL_KEYS = (
    "batch",
    "steps_planned",  # equal-samples comparisons: the same config trained longer
    "margin",
    "memory_weight",
    "lr",
    "embedding",
    "data_kind",
    "model_kind",
    "inject",
    "variant",  # see with_variant
)
# two-sided 95% Student t quantiles by degrees of freedom (df > 30: normal 1.96)
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


#: (column pattern, lowest, highest value) of metrics with a bounded range; CIs are clipped to it
RANGES = (("tar@*", 0.0, 1.0), ("auc", 0.0, 1.0), ("eer", 0.0, 1.0), ("*", 0.0, math.inf))


def metric_range(column: str) -> tuple[float, float]:
    return next((lo, hi) for pat, lo, hi in RANGES if fnmatch.fnmatchcase(column, pat))


def t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


def pick_far(frame: pl.DataFrame, far: float | None) -> str:
    """The `tar@...` column to report: `far` if given, else 1e-3 if evaluated, else the lowest."""
    cols = [c for c in frame.columns if c.startswith("tar@")]
    if not cols:
        raise ValueError("the run has no tar@<far> columns")
    if far is not None:
        key = far_key(far)
        if key not in cols:
            raise ValueError(
                f"--far {far:g} was not evaluated in this run; available: {', '.join(cols)}"
            )
        return key
    return "tar@1e-3" if "tar@1e-3" in cols else min(cols, key=lambda c: float(c[4:]))


def metric_names(frame: pl.DataFrame, far: float | None) -> list[str]:
    net = ["rss_net_mib"] if "rss_net_mib" in frame.columns else []
    return [pick_far(frame, far), "peak_mib", "samples_per_s", "eer", "auc", *net]


#: `peak_mib`, the memory figure of `show` and `plot`, is the first of these a trial has: the CUDA
#: allocator's peak; on CPU the peak of live tensor bytes (counts the CB-HEM memory and the PLB
#: cache at their size, unlike RSS); peak RSS for trials recorded before peak_live_mib existed
PEAK_SOURCES = {"peak_alloc_mib": "torch allocator", "peak_live_mib": "live tensors",
                "peak_rss_mib": "RSS"}  # fmt: skip


def with_peak(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` with its `peak_mib` column (see PEAK_SOURCES)."""
    cols = [c for c in PEAK_SOURCES if c in frame.columns]
    peak = pl.coalesce(cols) if cols else pl.lit(None, dtype=pl.Float64)
    return frame.with_columns(peak.alias("peak_mib"))


def peak_source(frame: pl.DataFrame) -> str:
    """What `peak_mib` measures in the ok trials of `frame`: "live tensors", or e.g. "torch
    allocator / live tensors" in a run of CUDA and CPU trials."""
    rest, used = frame.filter(pl.col("status") == "ok"), []
    for col, name in PEAK_SOURCES.items():
        if col in rest.columns and rest[col].is_not_null().any():
            used.append(name)
            rest = rest.filter(pl.col(col).is_null())
    return " / ".join(used) or "none"


def group_keys(frame: pl.DataFrame) -> list[str]:
    extra = [
        c for c in _OPTIONAL_KEYS if c in frame.columns and frame[c].drop_nulls().n_unique() > 1
    ]
    return [*AXES, *extra]


def with_variant(frame: pl.DataFrame) -> pl.DataFrame:
    """Add a `variant` column ("data.imbalance=1.5 head.s=16") naming, per row, the values of
    the `params` keys that vary within the frame; absent when none vary. Without it, trials that
    differ only in such a parameter would be averaged together."""
    if "params" not in frame.columns:
        return frame
    dicts = [json.loads(p) if p else {} for p in frame["params"]]
    methods = frame["method"].to_list() if "method" in frame.columns else [None] * len(dicts)

    def distinguishes(k: str) -> bool:
        """k varies, and not only with the method (head.s of each head: the method says it)."""
        by_method: dict[Any, set[str]] = {}
        for m, d in zip(methods, dicts, strict=True):
            by_method.setdefault(m, set()).add(json.dumps(d.get(k), sort_keys=True))
        return any(len(v) > 1 for v in by_method.values())

    keys = sorted(k for k in {k for d in dicts for k in d} if distinguishes(k))
    if not keys:
        return frame
    labels = [" ".join(f"{k}={d.get(k)}" for k in keys) for d in dicts]
    return frame.with_columns(pl.Series("variant", labels, dtype=pl.String))


def aggregate(frame: pl.DataFrame, far: float | None = None) -> pl.DataFrame:
    """One row per configuration: keys, `n`, `<metric>_mean`, `<metric>_ci95` (half-width),
    `<metric>_lo` / `_hi` (the CI clipped to the metric's range), `<metric>_delta`."""
    frame = with_variant(frame)
    keys = group_keys(frame)
    metrics = metric_names(frame, far)
    ok = (
        frame.filter(pl.col("status") == "ok")
        # one row per (configuration, seed): a run that holds a trial twice (an older code
        # version, a changed execution setting) must not count it as two seeds — keep the last
        .unique(subset=[*keys, "seed"], keep="last", maintain_order=True)
        .pipe(with_peak)
    )
    aggs: list[pl.Expr] = [pl.len().alias("n"), pl.col("is_baseline").all().alias("is_baseline")]
    for m in metrics:
        aggs += [
            pl.col(m).cast(pl.Float64).mean().alias(f"{m}_mean"),
            pl.col(m).cast(pl.Float64).std().alias(f"{m}_sd"),
        ]
    grouped = ok.group_by(keys).agg(aggs).sort(keys, nulls_last=True)
    base = grouped.filter(pl.col("is_baseline"))
    out = grouped.with_columns(
        *[
            (
                pl.col(f"{m}_sd")
                * pl.col("n").map_elements(
                    lambda n: t975(n - 1) if n > 1 else None, return_dtype=pl.Float64
                )
                / pl.col("n").sqrt()
            ).alias(f"{m}_ci95")
            for m in metrics
        ],
        *[
            (pl.col(f"{m}_mean") - (base[f"{m}_mean"][0] if base.height else None)).alias(
                f"{m}_delta"
            )
            for m in metrics
        ],
    )
    bounds = []
    for m in metrics:
        lo, hi = metric_range(m)
        mean, ci = pl.col(f"{m}_mean"), pl.col(f"{m}_ci95")
        bounds += [
            (mean - ci).clip(lo, hi).alias(f"{m}_lo"),
            (mean + ci).clip(lo, None if math.isinf(hi) else hi).alias(f"{m}_hi"),
        ]
    return out.with_columns(bounds).drop([f"{m}_sd" for m in metrics])


def _cell(row: dict[str, Any], m: str) -> str:
    mean = row.get(f"{m}_mean")
    if mean is None:
        return "—"
    if isinstance(mean, float) and math.isnan(mean):
        return "n/a"  # e.g. TAR at a FAR the test set is too small to measure
    info = metric_info(m)
    digits = info.digits if info else 3
    text = f"{mean:.{digits}f}"
    ci, lo, hi = row.get(f"{m}_ci95"), row.get(f"{m}_lo"), row.get(f"{m}_hi")
    if ci is not None and lo is not None and hi is not None:
        if math.isclose(hi - lo, 2 * ci, rel_tol=1e-9, abs_tol=1e-12):
            text += f" ± {ci:.{digits}f}"
        else:  # clipped to the metric's range: the interval itself
            text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    delta = row.get(f"{m}_delta")
    if delta is not None and not row["is_baseline"]:
        text += f" ({delta:+.{digits}f})"
    return text


def pivots(agg: pl.DataFrame, metrics: list[str]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per metric: rows = configuration minus virtual batch, columns =
    `n` (seeds per cell: "3", or "2–3" when the cells of a row differ) and the virtual batch
    sizes, cells = "mean ± ci95 (Δ vs baseline)" or "mean [lo, hi] (Δ)" when the CI is clipped."""
    row_keys = [k for k in agg.columns if k in (*AXES, *_OPTIONAL_KEYS) and k != "virtual_batch"]
    vbs = sorted(agg["virtual_batch"].unique().drop_nulls().to_list())
    header = [*row_keys, "n", *[f"N={v}" for v in vbs]]
    ns: dict[tuple, list[int]] = {}
    for row in agg.iter_rows(named=True):
        ns.setdefault(tuple(row[k] for k in row_keys), []).append(row["n"])
    out = []
    for m in metrics:
        cells: dict[tuple, dict[int, str]] = {}
        for row in agg.iter_rows(named=True):
            key = tuple(row[k] for k in row_keys)
            cells.setdefault(key, {})[row["virtual_batch"]] = _cell(row, m)
        rows = [
            [*map(str, key), _n_text(ns[key]), *[by_vb.get(v, "") for v in vbs]]
            for key, by_vb in cells.items()
        ]
        out.append((m, header, rows))
    return out


def _n_text(ns: list[int]) -> str:
    return str(ns[0]) if min(ns) == max(ns) else f"{min(ns)}–{max(ns)}"


def show(
    frame: pl.DataFrame, fmt: str, far: float | None, console: Console, raw: bool = False
) -> None:
    """Print the run summary in `fmt` (one of FORMATS) to `console`: the pivots, or with `raw`
    one row per trial; in table and markdown, the errors of the trials that are not ok."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if raw and fmt in ("csv", "json"):
        raw_frame = with_variant(frame)
        console.out(raw_frame.write_csv() if fmt == "csv" else raw_frame.write_json(), end="")
        return
    agg = aggregate(frame, far)
    if fmt in ("csv", "json"):
        console.out(agg.write_csv() if fmt == "csv" else agg.write_json() + "\n", end="")
        return
    titles = {"peak_mib": f"peak MiB ({peak_source(frame)})", "samples_per_s": "samples/s",
              "rss_net_mib": "RSS net MiB (peak RSS above setup)"}  # fmt: skip
    shown = [m for m in metric_names(frame, far) if m not in ("eer", "auc")]
    tables = [(f"{frame.height} trials", *trial_rows(frame, far))] if raw else []
    for m, header, rows in [] if raw else pivots(agg, shown):
        name = titles.get(m, m.replace("tar@", "TAR@"))
        tables.append((f"{name} — mean ± 95% CI over seeds (Δ vs baseline)", header, rows))
    for title, header, rows in tables:
        if fmt == "markdown":
            console.out(f"\n### {title}\n")
            console.out("| " + " | ".join(header) + " |")
            console.out("|" + "---|" * len(header))
            for r in rows:
                console.out("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        else:
            print_table(console, title, header, rows, left=("trial", "method", "status", "error"))
    if not raw:
        print_errors(console, frame)


def print_errors(console: Console, frame: pl.DataFrame) -> None:
    """The trials that are not ok: counts by status, then one line per trial with its error."""
    not_ok = frame.filter(pl.col("status") != "ok")
    if not not_ok.height:
        return
    counts = ", ".join(
        f"{s}: {n}" for s, n in not_ok.group_by("status").len().sort("status").iter_rows()
    )
    console.out(f"\nnot ok trials (excluded above): {counts}")
    for r in not_ok.iter_rows(named=True):
        error = _first_line(r.get("error")) or "(no error recorded)"
        console.out(f"  {r.get('trial_id')} {r['status']} {r.get('method') or ''}: {error}")


def _first_line(text: str | None, limit: int = 300) -> str:
    """The last non-empty line of an error (a traceback's last line names the exception)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


# --- per-trial rows ------------------------------------------------------------------------------


def trial_rows(frame: pl.DataFrame, far: float | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per trial — id, configuration, seed, status, metrics, time,
    error (its last line) — for the run summary and `show --raw`."""
    tar = pick_far(frame, far)
    frame = with_peak(with_variant(frame))
    cols = [
        ("trial", "trial_id", None), ("method", "method", None), ("memory", "memory", None),
        ("N", "virtual_batch", None), ("variant", "variant", None), ("seed", "seed", None),
        ("status", "status", None), ("samples/s", "samples_per_s", "samples_per_s"),
        ("peak MiB", "peak_mib", "peak_mib"), ("RSS net MiB", "rss_net_mib", "rss_net_mib"),
        (tar, tar, tar), ("time s", "train_time_s", "train_time_s"),
        ("error", "error", None),
    ]  # fmt: skip
    cols = [c for c in cols if c[1] in frame.columns]
    rows = []
    for r in frame.iter_rows(named=True):
        rows.append([_value(r[col], metric) for _, col, metric in cols])
    if "error" in frame.columns and frame["error"].is_null().all():
        cols, rows = cols[:-1], [r[:-1] for r in rows]
    return [h for h, _, _ in cols], rows


def _value(v: Any, metric: str | None) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if metric is None:
        return _first_line(v) if isinstance(v, str) else str(v)
    info = metric_info(metric)
    return f"{v:.{info.digits if info else 3}f}"


# --- printing tables ---------------------------------------------------------------------------

#: Above this many rows a table is printed as aligned plain text (rich takes minutes to lay out
#: tens of thousands of rows).
PLAIN_ROWS = 500


def print_table(
    console: Console, title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
    left: Sequence[str] = ("method",),
) -> None:  # fmt: skip
    """Print a table without ever truncating a cell. Fits the console: a rich table. Off a
    terminal (CI logs, pipes, files): the rich table at its full width, whatever COLUMNS says.
    On a terminal too narrow: one line of `column=value` pairs per row (the terminal wraps it).
    More than PLAIN_ROWS rows: aligned plain text."""
    if len(rows) > PLAIN_ROWS:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        lines = [title]
        for r in [list(header), *rows]:
            cells = zip(r, widths, header, strict=True)
            lines.append("  ".join(c.ljust(w) if h in left else c.rjust(w) for c, w, h in cells))
        console.out("\n".join(line.rstrip() for line in lines), highlight=False)  # one write
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h in left else "right", overflow="fold")
    for r in rows:  # cells are data (error texts hold "[/...]"): never parsed as markup
        table.add_row(*map(Text, r))
    width = Measurement.get(console, console.options.update_width(100_000), table).maximum
    if width <= console.width:
        console.print(table)
    elif not console.is_terminal:
        Console(file=console.file, width=width, color_system=None).print(table)
    else:
        console.print(title, markup=False, highlight=False)
        for r in rows:
            pairs = "  ".join(f"{h}={c}" for h, c in zip(header, r, strict=True))
            console.print(pairs, markup=False, highlight=False, soft_wrap=True)
