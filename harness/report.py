"""Reading a run: aggregation over seeds, pivots, rich/markdown/csv/json output, PNG plots.

Aggregation (`aggregate`): ok trials are grouped by configuration — method, memory size, virtual
batch, plus any other config column that varies within the run — and each metric gets
mean, 95% CI half-width t_{0.975, n−1}·sd/√n (null for n < 2), n, and Δ = mean − mean of the
suite's baseline configuration (the rows with `is_baseline`). Groups are sorted explicitly.

Metrics: `tar@<far>` (one FAR, see `pick_far`), `peak_mib` (torch peak allocated on CUDA, peak
RSS on CPU: whichever the trial has), `samples_per_s`, `eer`, `auc`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.table import Table

from harness.records import far_key, metric_info

FORMATS = ("table", "csv", "json", "markdown")
AXES = ("method", "memory", "virtual_batch")
# config columns that become grouping keys when they vary within a run
_OPTIONAL_KEYS = (
    "batch",
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
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


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
    return [pick_far(frame, far), "peak_mib", "samples_per_s", "eer", "auc"]


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
    keys = sorted(
        k
        for k in {k for d in dicts for k in d}
        if len({json.dumps(d.get(k), sort_keys=True) for d in dicts}) > 1
    )
    if not keys:
        return frame
    labels = [" ".join(f"{k}={d.get(k)}" for k in keys) for d in dicts]
    return frame.with_columns(pl.Series("variant", labels, dtype=pl.String))


def aggregate(frame: pl.DataFrame, far: float | None = None) -> pl.DataFrame:
    """One row per configuration: keys, `n`, `<metric>_mean`, `<metric>_ci95`, `<metric>_delta`."""
    frame = with_variant(frame)
    keys = group_keys(frame)
    metrics = metric_names(frame, far)
    ok = (
        frame.filter(pl.col("status") == "ok")
        # one row per (configuration, seed): a run that holds a trial twice (an older code
        # version, a changed execution setting) must not count it as two seeds — keep the last
        .unique(subset=[*keys, "seed"], keep="last", maintain_order=True)
        .with_columns(
            pl.coalesce(pl.col("peak_alloc_mib"), pl.col("peak_rss_mib")).alias("peak_mib")
        )
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
    return out.drop([f"{m}_sd" for m in metrics])


def _cell(row: dict[str, Any], m: str) -> str:
    mean = row.get(f"{m}_mean")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    info = metric_info(m)
    digits = info.digits if info else 3
    text = f"{mean:.{digits}f}"
    if row.get(f"{m}_ci95") is not None:
        text += f" ± {row[f'{m}_ci95']:.{digits}f}"
    delta = row.get(f"{m}_delta")
    if delta is not None and not row["is_baseline"]:
        text += f" ({delta:+.{digits}f})"
    return text


def pivots(agg: pl.DataFrame, metrics: list[str]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per metric: rows = configuration minus virtual batch, columns =
    virtual batch sizes, cells = "mean ± ci95 (Δ vs baseline)"."""
    row_keys = [k for k in agg.columns if k in (*AXES, *_OPTIONAL_KEYS) and k != "virtual_batch"]
    vbs = sorted(agg["virtual_batch"].unique().drop_nulls().to_list())
    header = [*row_keys, *[f"N={v}" for v in vbs]]
    out = []
    for m in metrics:
        cells: dict[tuple, dict[int, str]] = {}
        for row in agg.iter_rows(named=True):
            cells.setdefault(tuple(row[k] for k in row_keys), {})[row["virtual_batch"]] = _cell(
                row, m
            )
        rows = [[*map(str, key), *[by_vb.get(v, "") for v in vbs]] for key, by_vb in cells.items()]
        out.append((m, header, rows))
    return out


def show(frame: pl.DataFrame, fmt: str, far: float | None, console: Console) -> None:
    """Print the run summary in `fmt` (one of FORMATS) to `console`."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    agg = aggregate(frame, far)
    if fmt == "csv":
        console.out(agg.write_csv(), end="")
        return
    if fmt == "json":
        console.out(agg.write_json(), end="\n")
        return
    titles = {"peak_mib": "peak MiB", "samples_per_s": "samples/s"}
    metrics = metric_names(frame, far)[:3]
    for m, header, rows in pivots(agg, metrics):
        name = titles.get(m, m.replace("tar@", "TAR@"))
        title = f"{name} — mean ± 95% CI over seeds (Δ vs baseline)"
        if fmt == "markdown":
            console.out(f"\n### {title}\n")
            console.out("| " + " | ".join(header) + " |")
            console.out("|" + "---|" * len(header))
            for r in rows:
                console.out("| " + " | ".join(r) + " |")
        else:
            table = Table(title=title)
            for h in header:
                table.add_column(h, justify="left" if h == "method" else "right")
            for r in rows:
                table.add_row(*r)
            console.print(table)
    not_ok = frame.filter(pl.col("status") != "ok")
    if not_ok.height:
        counts = ", ".join(
            f"{s}: {n}" for s, n in not_ok.group_by("status").len().sort("status").iter_rows()
        )
        console.out(f"\nnot ok trials (excluded above): {counts}")


def summary_table(frame: pl.DataFrame) -> Table:
    """One line per trial: id, config, status, throughput, peak memory, TAR, time."""
    tar = pick_far(frame, None)
    table = Table(title=f"{frame.height} trials")
    for col in (
        "trial",
        "method",
        "memory",
        "N",
        "seed",
        "status",
        "samples/s",
        "peak MiB",
        tar,
        "time s",
    ):
        table.add_column(col, justify="left" if col in ("trial", "method", "status") else "right")
    frame = frame.with_columns(
        pl.coalesce(pl.col("peak_alloc_mib"), pl.col("peak_rss_mib")).alias("peak_mib")
    )

    def fmt(v: Any, digits: int) -> str:
        return "—" if v is None else f"{v:.{digits}f}"

    for r in frame.iter_rows(named=True):
        status = r["status"] if r["status"] == "ok" else f"[red]{r['status']}[/red]"
        table.add_row(
            r["trial_id"],
            r["method"],
            str(r["memory"]),
            str(r["virtual_batch"]),
            str(r["seed"]),
            status,
            fmt(r["samples_per_s"], 0),
            fmt(r["peak_mib"], 0),
            fmt(r[tar], 3),
            fmt(r["train_time_s"], 1),
        )
    return table


def plot(frame: pl.DataFrame, out_dir: Path, far: float | None = None) -> list[Path]:
    """Write accuracy_vs_memory.png, peak_memory_vs_virtual_batch.png, throughput_vs_memory.png.

    Lines are configurations (method and the other axis), points are means, error bars 95% CIs.
    Memory uses a symlog x axis (0 = in-batch mining stays visible); virtual batch a log2 axis.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed on servers and CI
    import matplotlib.pyplot as plt

    agg = aggregate(frame, far)
    if agg.height == 0:
        raise ValueError("no ok trials to plot")
    tar = pick_far(frame, far)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = [
        (
            "accuracy_vs_memory.png",
            "memory",
            "virtual_batch",
            tar,
            tar.replace("tar@", "TAR@") + " (held-out IvS pairs)",
            "accuracy vs CB-HEM memory size",
        ),
        (
            "peak_memory_vs_virtual_batch.png",
            "virtual_batch",
            "memory",
            "peak_mib",
            "peak memory (MiB; torch allocator on CUDA, RSS on CPU)",
            "peak memory vs virtual batch",
        ),
        (
            "throughput_vs_memory.png",
            "memory",
            "virtual_batch",
            "samples_per_s",
            "throughput (samples/s)",
            "throughput vs CB-HEM memory size",
        ),
    ]
    paths = []
    for name, x, series, metric, ylabel, title in specs:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        label_key = "M" if series == "memory" else "N"
        for keys, part in agg.sort(x).group_by(["method", series], maintain_order=True):
            part = part.filter(pl.col(f"{metric}_mean").is_not_null())
            if part.height == 0:
                continue
            yerr = part[f"{metric}_ci95"].fill_null(0).to_numpy()
            ax.errorbar(
                part[x].to_numpy(),
                part[f"{metric}_mean"].to_numpy(),
                yerr=yerr,
                marker="o",
                capsize=3,
                label=f"{keys[0]}, {label_key}={keys[1]}",
            )
        if x == "memory":
            ax.set_xscale(
                "symlog", linthresh=max(1, int(agg["memory"].filter(agg["memory"] > 0).min() or 1))
            )
            ax.set_xlabel("CB-HEM memory size M (samples; 0 = in-batch)")
        else:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("virtual batch N (samples)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{frame['suite'][0]}: {title}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
