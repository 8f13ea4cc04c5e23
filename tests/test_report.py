"""Aggregation over seeds, pivots and output formats (harness/report.py)."""

from __future__ import annotations

import io
import json
import math
import statistics

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from harness import report


def frame(values: dict[tuple[int, int], list[float]], baseline=(0, 32)) -> pl.DataFrame:
    rows = []
    for (mem, vb), tars in values.items():
        for seed, tar in enumerate(tars):
            rows.append(
                {
                    "trial_id": f"{mem}-{vb}-{seed}",
                    "trial_index": 0,
                    "suite": "s",
                    "seed": seed,
                    "method": "batch_hard+triplet",
                    "memory": mem,
                    "virtual_batch": vb,
                    "batch": 32,
                    "is_baseline": (mem, vb) == baseline,
                    "status": "ok",
                    "tar@1e-1": tar,
                    "tar@1e-3": tar / 2,
                    "peak_alloc_mib": None,
                    "peak_rss_mib": 100.0 + mem,
                    "samples_per_s": 1000.0 - mem,
                    "eer": 0.1,
                    "auc": 0.9,
                    "train_time_s": 1.0,
                }
            )
    rows.append({**rows[0], "trial_id": "x", "status": "oom", "tar@1e-1": None, "tar@1e-3": None})
    return pl.DataFrame(rows)


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 5),
    mems=st.lists(st.sampled_from([0, 64, 256]), min_size=1, max_size=3, unique=True),
)
def test_aggregate_matches_statistics_module(seed, n, mems):
    import random

    rnd = random.Random(seed)
    vals = {(m, vb): [rnd.random() for _ in range(n)] for m in [0, *mems] for vb in (32, 64)}
    agg = report.aggregate(frame(vals), far=1e-1)
    base = statistics.fmean(vals[(0, 32)])
    assert agg.height == len(vals)
    for row in agg.iter_rows(named=True):
        xs = vals[(row["memory"], row["virtual_batch"])]
        assert row["n"] == n  # the oom trial is excluded
        assert row["tar@1e-1_mean"] == pytest.approx(statistics.fmean(xs))
        if n > 1:
            ci = report.t975(n - 1) * statistics.stdev(xs) / math.sqrt(n)
            assert row["tar@1e-1_ci95"] == pytest.approx(ci)
        else:
            assert row["tar@1e-1_ci95"] is None
        assert row["tar@1e-1_delta"] == pytest.approx(statistics.fmean(xs) - base)
        assert row["peak_mib_mean"] == pytest.approx(100.0 + row["memory"])  # RSS on CPU


def test_pick_far():
    f = frame({(0, 32): [0.5]})
    assert report.pick_far(f, None) == "tar@1e-3"
    assert report.pick_far(f, 0.1) == "tar@1e-1"
    with pytest.raises(ValueError, match="not evaluated"):
        report.pick_far(f, 1e-4)


@pytest.mark.parametrize("fmt", report.FORMATS)
def test_show_formats(fmt):
    f = frame({(0, 32): [0.5, 0.7], (64, 32): [0.6, 0.8], (64, 64): [0.9, 0.9]})
    buf = io.StringIO()
    report.show(f, fmt, None, Console(file=buf, width=200))
    out = buf.getvalue()
    if fmt == "json":
        rows = json.loads(out)
        assert len(rows) == 3 and {"n", "tar@1e-3_mean", "tar@1e-3_delta"} <= set(rows[0])
    elif fmt == "csv":
        assert out.splitlines()[0].startswith("method,memory,virtual_batch")
        assert len(out.splitlines()) == 4
    else:
        assert "N=32" in out and "N=64" in out and "oom: 1" in out
        # mean of tar@1e-3 at baseline (0.25, 0.35): 2 seeds, CI ± 0.635 clipped at 0
        assert "0.300 [0.000, 0.935]" in out
        assert "(+0.050)" in out  # Δ of M=64, N=32 vs baseline


def test_plot_writes_pngs(tmp_path):
    f = frame({(0, 32): [0.5, 0.7], (64, 32): [0.6, 0.8], (64, 64): [0.9, 0.9]})
    from harness.plots import plot

    paths = plot(f, tmp_path, None)
    assert [p.name for p in paths] == ["accuracy_by_config.png"]  # M and N: 2 values each
    assert all(p.stat().st_size > 1000 for p in paths)


def test_plots_follow_the_swept_axes(tmp_path):
    """A line plot for each axis the suite sweeps with ≥ 3 values, none for the others; every
    series its own (colour, marker); ticks at the swept values."""
    import matplotlib.pyplot as plt

    from harness import plots

    grid = {(m, n): [0.5 + m / 1e3, 0.6] for m in (0, 64, 256) for n in (32, 64, 128)}
    made = plots.plot(frame(grid), tmp_path / "a", None)
    assert sorted(p.name for p in made) == sorted(
        ["accuracy_vs_memory.png", "throughput_vs_memory.png", "peak_memory_vs_memory.png",
         "peak_memory_vs_virtual_batch.png", "accuracy_by_config.png"]
    )  # fmt: skip
    only_memory = {(m, 32): [0.5, 0.6] for m in (0, 64, 256)}
    made = plots.plot(frame(only_memory), tmp_path / "b", None)
    assert "peak_memory_vs_virtual_batch.png" not in {p.name for p in made}
    styles = plots._styles([{"method": f"m{i}"} for i in range(40)])
    assert len(set(styles.values())) == 40
    for n in (10, 16, 20):  # no two series of a plot share a colour up to 20 series
        colours = [c for c, _ in plots._styles([{"m": i} for i in range(n)]).values()]
        assert len(set(map(str, colours))) == n
    fig, ax = plt.subplots()
    plots._x_axis(ax, "memory", [0, 1024, 65536])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1k", "64k"]
    plt.close(fig)


def test_configs_differing_only_in_a_param_are_not_averaged_together():
    """A sweep over e.g. data.imbalance has no column of its own: `params` must keep the two
    configurations apart in the aggregate (they were once averaged into one row)."""
    import polars as pl

    from harness.report import aggregate

    rows = []
    for imbalance, tar in ((0.0, 0.2), (1.5, 0.6)):
        for seed in range(2):
            rows.append(
                {
                    "method": "head:hsm", "memory": 0, "virtual_batch": 64, "status": "ok",
                    "is_baseline": False, "seed": seed, "tar@1e-3": tar + 0.01 * seed,
                    "peak_alloc_mib": None, "peak_rss_mib": 100.0, "samples_per_s": 1.0,
                    "eer": 0.1, "auc": 0.9,
                    "params": f'{{"data.identities":100,"data.imbalance":{imbalance}}}',
                }
            )  # fmt: skip
    agg = aggregate(pl.DataFrame(rows), 1e-3)
    assert agg.height == 2
    assert sorted(agg["variant"].to_list()) == ["data.imbalance=0.0", "data.imbalance=1.5"]
    assert sorted(agg["tar@1e-3_mean"].round(3).to_list()) == [0.205, 0.605]


def test_one_trial_written_twice_counts_as_one_seed():
    """A run directory that holds the same (configuration, seed) twice — e.g. after a resume
    under a different --device, which changes trial ids — must not report n = 2 for one seed
    (issue 21 item 2): the last row counts."""
    rows = frame({(0, 32): [0.2, 0.4]}).filter(pl.col("status") == "ok").to_dicts()
    dup = {**rows[0], "trial_id": "again", "tar@1e-1": 0.3}
    agg = report.aggregate(pl.DataFrame([*rows, dup]), far=1e-1)
    assert agg["n"].to_list() == [2]
    assert agg["tar@1e-1_mean"][0] == pytest.approx((0.3 + 0.4) / 2)


def test_unmeasurable_figures_read_n_a_not_nan():
    """TAR at a FAR the test set cannot support is NaN in the row: it reads "n/a"."""
    f = frame({(0, 32): [0.5, 0.7]}).with_columns(pl.lit(float("nan")).alias("tar@1e-3"))
    buf = io.StringIO()
    report.show(f, "markdown", 1e-3, Console(file=buf, width=200))
    assert "n/a" in buf.getvalue() and "nan" not in buf.getvalue()
    header, rows = report.trial_rows(f, 1e-3)
    assert rows[0][header.index("tar@1e-3")] == "n/a"


def test_error_texts_with_markup_brackets_print_verbatim():
    """gloo errors hold paths like "[/tmp/...]": rich must not parse cells as markup (a run's
    summary once crashed with MarkupError)."""
    out = io.StringIO()
    text = "RuntimeError: [/gloo/transport] closed [bold]"
    report.print_table(Console(file=out, width=200), "t", ["method", "error"], [["m", text]],
                       ("method", "error"))  # fmt: skip
    assert text in out.getvalue()


def test_pretrain_blocks_are_told_apart_in_params():
    """Trials that differ only in their [pretrain] stage (a head sweep, a from-scratch block)
    carry it in `params`, so `show`/`plot` do not average an ArcFace-pretrained, a
    softmax-pretrained and a from-scratch trial into one row."""
    from harness.records import params_json
    from harness.report import with_variant
    from harness.suite import parse_suite

    text = """
[suite]
name = "p"
[train]
steps = 5
[baseline]
miner = "batch_hard"
[[sweep]]
"pretrain.head" = ["softmax"]
"pretrain.head_params" = [{}]
[[sweep]]
"pretrain.steps" = [0]
[pretrain]
steps = 30
head = "arcface"
head_params = { s = 32.0, m = 0.3 }
[pretrain.data]
photos_per_identity = 4
"""
    trials = parse_suite(text, path="p").trials
    params = [params_json(t) for t in trials]
    labels = with_variant(pl.DataFrame({"params": params}))["variant"].to_list()
    assert [label.split(" #")[0] for label in labels] == [
        "pretrain=arcface(m=0.3,s=32.0) 30 steps",
        "pretrain=softmax 30 steps",
        "pretrain=none",
    ]
    assert labels[0].split(" #")[1] == labels[1].split(" #")[1]  # same data and train setup


def test_configs_differing_only_in_steps_are_not_averaged_together():
    """An equal-samples comparison (the same config trained 4x longer) must keep two rows."""
    from harness.report import aggregate

    rows = [
        {
            "method": "semi_hard+triplet", "memory": 0, "virtual_batch": 64, "status": "ok",
            "is_baseline": steps == 600, "seed": seed, "steps_planned": steps,
            "tar@1e-3": tar, "peak_alloc_mib": None, "peak_rss_mib": 100.0,
            "samples_per_s": 1.0, "eer": 0.1, "auc": 0.9, "params": "{}",
        }
        for steps, tar in ((600, 0.79), (2400, 0.86))
        for seed in range(2)
    ]  # fmt: skip
    agg = aggregate(pl.DataFrame(rows), 1e-3)
    assert agg.sort("steps_planned")["tar@1e-3_mean"].round(2).to_list() == [0.79, 0.86]
