"""PNG plots of a run, drawn for a paper: means over seeds with 95% CIs clipped to each
metric's range (`report.aggregate`), one distinct colour + marker per series, ticks at the swept
values, the legend outside the data, and small multiples where series would overlap.

Which plots a run gets depends on what its suite sweeps (no plot of an axis it does not sweep):

- `accuracy_vs_memory.png`, `throughput_vs_memory.png`, `peak_memory_vs_memory.png`: when the
  CB-HEM memory size takes ≥ 3 values; x = M (symlog, 0 = in-batch mining).
- `peak_memory_vs_virtual_batch.png`: when the virtual batch N takes ≥ 3 values; x = N (log2).

Peak memory is `report.with_peak`: the torch allocator's peak on CUDA, the peak of live tensor
bytes on CPU, where RSS would hide the CB-HEM memory and the PLB cache under the interpreter's
and the allocator's own hundreds of MiB; the axis label says which.
- `accuracy_by_config.png`: always; one row per configuration (a dot plot), for grids whose
  configurations are categories (heads, PLB vs a real batch) rather than points on an axis.

On a line plot, series are the method × the other axis (N on a memory plot, M on an N plot);
every other key that varies (lr, a pretrain, data.imbalance: `report.group_keys`) gets a panel
of its own, up to `MAX_PANELS`, beyond which it joins the series.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from harness.report import AXES, aggregate, group_keys, peak_source, pick_far

MAX_PANELS = 9
MARKERS = "osD^vP*X<>ph"
# tab10's colours for up to 10 series; tab20's 20 (dark/light pairs) when a plot has more
_TAB10 = [f"C{i}" for i in range(10)]


def plot(frame: pl.DataFrame, out_dir: Path, far: float | None = None) -> list[Path]:
    """Write the plots the run's sweeps call for (module docstring) into `out_dir`; returns
    their paths. Raises ValueError when no trial is ok or `out_dir` cannot be written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed on servers and CI

    agg = aggregate(frame, far)
    if agg.height == 0:
        raise ValueError("no ok trials to plot")
    tar = pick_far(frame, far)
    tar_label = tar.replace("tar@", "TAR@") + " (held-out IvS pairs)"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission, a name too long
        raise ValueError(
            f"cannot use {out_dir} as the plot directory: {exc.strerror or exc}"
        ) from None
    title = str(frame["suite"][0]) if "suite" in frame.columns else "run"
    keys = group_keys(agg)  # the keys that vary among the configurations being plotted
    paths = []
    peak_label = f"peak memory (MiB; {peak_source(frame)})"
    if agg["memory"].n_unique() >= 3:
        paths.append(_lines(agg, keys, "memory", tar, tar_label, title, out_dir / "accuracy_vs_memory.png"))  # fmt: skip
        paths.append(_lines(agg, keys, "memory", "samples_per_s", "throughput (samples/s)", title, out_dir / "throughput_vs_memory.png"))  # fmt: skip
        paths.append(_lines(agg, keys, "memory", "peak_mib", peak_label, title, out_dir / "peak_memory_vs_memory.png"))  # fmt: skip
    if agg["virtual_batch"].n_unique() >= 3:
        paths.append(_lines(agg, keys, "virtual_batch", "peak_mib", peak_label, title, out_dir / "peak_memory_vs_virtual_batch.png"))  # fmt: skip
    paths.append(_dots(agg, keys, tar, tar_label, title, out_dir / "accuracy_by_config.png"))
    return paths


def _lines(
    agg: pl.DataFrame, keys: list[str], x: str, metric: str, ylabel: str, title: str, path: Path
) -> Path:
    """Metric vs `x`: one panel per combination of the non-axis keys, one line per series."""
    import matplotlib.pyplot as plt

    other = "virtual_batch" if x == "memory" else "memory"
    panel_keys = [k for k in keys if k not in AXES]
    panels = _combos(agg, panel_keys)
    if len(panels) > MAX_PANELS:  # too many: fold them into the series
        panel_keys, panels = [], [{}]
    series_keys = ["method", *([other] if agg[other].n_unique() > 1 else [])]
    series_keys += [k for k in keys if k not in AXES and k not in panel_keys]
    style = _styles(_combos(agg, series_keys))
    # one row of panels per value of the first panel key (e.g. lr), one column per value of the
    # last (e.g. the pretrain), when that fits
    cols = agg[panel_keys[-1]].n_unique() if panel_keys else 1
    fig, axes = _grid(len(panels), plt, cols=cols if cols <= 4 else 3)
    xs = sorted(agg[x].unique().to_list())
    for ax, panel in zip(axes, panels, strict=False):
        part = _select(agg, panel).filter(pl.col(f"{metric}_mean").is_not_null())
        for combo, (colour, marker) in style.items():
            line = _select(part, dict(combo)).sort(x)  # combo: the series' (key, value) items
            if line.height == 0:
                continue
            ax.errorbar(
                line[x].to_numpy(),
                line[f"{metric}_mean"].to_numpy(),
                yerr=_yerr(line, metric),
                color=colour,
                marker=marker,
                capsize=3,
                label=_label(dict(combo)),
            )
        _x_axis(ax, x, xs)
        ax.set_title(_label(panel) or title, fontsize=8)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[: len(panels)]:
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(f"{title}: {ylabel.split(' (')[0]} vs {_AXIS_NAMES[x]}", fontsize=10)
    return _save(fig, axes[: len(panels)], path, plt)


def _dots(
    agg: pl.DataFrame, keys: list[str], metric: str, xlabel: str, title: str, path: Path
) -> Path:
    """A dot plot: one row per configuration, the metric's mean and CI; panels by `variant`
    when it has a few values and the method varies too (e.g. balanced vs imbalanced data)."""
    import matplotlib.pyplot as plt

    facet = None  # panels by variant: few of them, each with several methods
    if "variant" in keys and agg["variant"].n_unique() <= 4:
        per_panel = agg.group_by("variant").agg(pl.col("method").n_unique())["method"]
        facet = "variant" if per_panel.min() > 1 else None
    row_keys = [k for k in keys if k != facet and agg[k].n_unique() > 1] or ["method"]
    panels = _combos(agg, [facet]) if facet else [{}]
    order = (  # best first, by the mean over panels
        agg.group_by(row_keys)
        .agg(pl.col(f"{metric}_mean").mean())
        .sort(f"{metric}_mean", descending=True, nulls_last=True)
    )
    rows = [dict(zip(row_keys, r, strict=True)) for r in order.select(row_keys).iter_rows()]
    style = _styles(rows)
    fig, axes = _grid(len(panels), plt, height=0.32 * len(rows) + 1.2, width=4.2)
    for ax, panel in zip(axes, panels, strict=False):
        part = _select(agg, panel)
        for i, row in enumerate(rows):
            point = _select(part, row).filter(pl.col(f"{metric}_mean").is_not_null())
            if point.height == 0:
                continue
            colour, marker = style[tuple(row.items())]
            ax.errorbar(
                point[f"{metric}_mean"].to_numpy(),
                [i] * point.height,
                xerr=_yerr(point, metric),
                color=colour,
                marker=marker,
                capsize=3,
                linestyle="none",
            )
        ax.set_yticks(range(len(rows)), [_label(r) for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_title(_label(panel) or title, fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: {xlabel.split(' (')[0]} by configuration", fontsize=10)
    return _save(fig, [], path, plt)


# --- helpers ------------------------------------------------------------------------------------

_AXIS_NAMES = {"memory": "CB-HEM memory size", "virtual_batch": "virtual batch"}


def _combos(agg: pl.DataFrame, keys: list[str]) -> list[dict[str, Any]]:
    """The distinct value combinations of `keys` in `agg`, sorted (nulls last)."""
    if not keys:
        return [{}]
    combos = agg.select(keys).unique().sort(keys, nulls_last=True).iter_rows()
    return [dict(zip(keys, c, strict=True)) for c in combos]


def _styles(series: list[dict[str, Any]]) -> dict[tuple, tuple[str, str]]:
    """A (colour, marker) pair per series, keyed by its (key, value) items: a colour of its own
    for up to 20 series (tab10, else tab20), marker i mod 12 on top."""
    if len(series) <= len(_TAB10):
        colours = _TAB10
    else:
        from matplotlib import colormaps

        colours = list(colormaps["tab20"].colors)
    return {
        tuple(s.items()): (colours[i % len(colours)], MARKERS[i % len(MARKERS)])
        for i, s in enumerate(series)
    }


def _select(frame: pl.DataFrame, values: dict[str, Any]) -> pl.DataFrame:
    for k, v in values.items():
        frame = frame.filter(pl.col(k).is_null() if v is None else pl.col(k) == v)
    return frame


def _yerr(part: pl.DataFrame, metric: str) -> list:
    """Asymmetric error bars: the CI clipped to the metric's range (near 0 and 1 for TAR)."""
    mean = part[f"{metric}_mean"]
    return [  # ≥ 0 even for a mean outside the range (it would only come from a broken row)
        (mean - part[f"{metric}_lo"].fill_null(mean)).clip(lower_bound=0).to_numpy(),
        (part[f"{metric}_hi"].fill_null(mean) - mean).clip(lower_bound=0).to_numpy(),
    ]


def _label(values: dict[str, Any]) -> str:
    short = {"virtual_batch": "N", "memory": "M", "method": ""}
    parts = []
    for k, v in values.items():
        name = short.get(k, k)
        parts.append(f"{v}" if k in ("method", "variant") else f"{name}={_tick(v)}")
    return ", ".join(parts)


def _tick(v: Any) -> str:
    """65536 → 64k, 1024 → 1k, 0.1 → 0.1."""
    if isinstance(v, int) and v >= 1024 and v % 1024 == 0:
        return f"{v // 1024}k"
    return str(v)


def _x_axis(ax, x: str, xs: list) -> None:
    if x == "memory":
        positive = [v for v in xs if v > 0]
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 1)
        ax.set_xlabel("CB-HEM memory size M (samples; 0 = in-batch)", fontsize=8)
    else:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("virtual batch N (samples)", fontsize=8)
    ax.set_xticks(xs, [_tick(v) for v in xs], fontsize=7)
    ax.minorticks_off()


def _grid(n: int, plt, height: float = 3.0, width: float = 4.2, cols: int = 3):
    cols = min(n, cols)
    rows = -(-n // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols + 2.2, height * rows + 0.6), dpi=120, squeeze=False
    )
    return fig, list(axes.flat)


def _save(fig, legend_axes: list, path: Path, plt) -> Path:
    """One legend for all panels (every series once), right of the panels, outside the data."""
    try:
        seen: dict[str, Any] = {}
        for ax in legend_axes:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                seen.setdefault(label, handle)
        if seen:
            fig.legend(
                list(seen.values()), list(seen), loc="center left", bbox_to_anchor=(1.0, 0.5),
                fontsize=7,
            )  # fmt: skip
        fig.tight_layout()
        fig.savefig(path, bbox_inches="tight")
    except OSError as exc:
        raise ValueError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path
