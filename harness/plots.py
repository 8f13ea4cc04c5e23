"""PNG plots of a run: accuracy vs memory size, peak memory vs virtual batch, throughput vs
memory — means over seeds with 95% CIs clipped to each metric's range (`report.aggregate`)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from harness.report import aggregate, pick_far


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
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission, a name too long
        raise ValueError(
            f"cannot use {out_dir} as the plot directory: {exc.strerror or exc}"
        ) from None
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
            mean = part[f"{metric}_mean"]
            yerr = [
                (mean - part[f"{metric}_lo"].fill_null(mean)).to_numpy(),
                (part[f"{metric}_hi"].fill_null(mean) - mean).to_numpy(),
            ]  # the CI clipped to the metric's range: asymmetric near 0 and 1
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
        try:
            fig.savefig(path)
        except OSError as exc:
            raise ValueError(f"cannot write {path}: {exc.strerror or exc}") from None
        finally:
            plt.close(fig)
        paths.append(path)
    return paths
