"""`hembench compare`: join by config, mean over seeds, direction-aware breaches, exit codes."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from harness.cli import app
from harness.compare import (
    Delta,
    RunError,
    compare_runs,
    direction,
    join_columns,
    parse_fail_on,
)
from harness.results import load_run

runner = CliRunner()

CONFIGS = [
    {"miner": "batch_hard", "memory": 0, "plb": "off", "virtual_batch": 128, "margin": 0.2},
    {"miner": "cbhem", "memory": 8192, "plb": "off", "virtual_batch": 128, "margin": 0.2},
    {"miner": "cbhem", "memory": 8192, "plb": "exact", "virtual_batch": 512, "margin": 0.2},
]
BASE_METRICS = {
    "samples_per_s": 1000.0,
    "peak_alloc_mib": 200.0,
    "peak_rss_mib": 900.0,
    "tar@1e-3": 0.8,
}


def rows(scale: dict[str, float] | None = None, seeds=(0, 1), status="ok") -> list[dict]:
    """One trial row per config × seed; metric m is BASE_METRICS[m] · scale[m] (+ seed jitter)."""
    scale = scale or {}
    out = []
    for i, cfg in enumerate(CONFIGS):
        for seed in seeds:
            metrics = {
                m: v * scale.get(m, 1.0) * (1 + 0.01 * (seed - 0.5))
                for m, v in BASE_METRICS.items()
            }
            out.append(
                {
                    "trial_id": f"t{i}s{seed}",
                    "status": status,
                    "error": None,
                    **cfg,
                    "seed": seed,
                    **metrics,
                }
            )
    return out


def write_run(root, name: str, trial_rows: list[dict]):
    run = root / name
    (run / "trials").mkdir(parents=True)
    for r in trial_rows:
        pl.DataFrame([r]).write_parquet(run / "trials" / f"{r['trial_id']}.parquet")
    return run


def invoke(*args) -> tuple[int, str]:
    r = runner.invoke(app, ["compare", *map(str, args)], terminal_width=200)
    return r.exit_code, r.output


def test_unchanged_runs_pass(tmp_path):
    base, head = write_run(tmp_path, "a", rows()), write_run(tmp_path, "b", rows())
    code, out = invoke(base, head, "--fail-on", "throughput:1%", "--fail-on", "peak_mem:1%")
    assert code == 0, out
    assert "no breach" in out


def test_memory_increase_of_30_percent_is_caught(tmp_path):
    base = write_run(tmp_path, "a", rows())
    head = write_run(tmp_path, "b", rows({"peak_alloc_mib": 1.3}))
    code, out = invoke(base, head, "--fail-on", "peak_mem:10%")
    assert code == 1, out
    assert "BREACH" in out and "peak_alloc_mib" in out
    # a memory *decrease* of 30 % is an improvement, not a breach
    head2 = write_run(tmp_path, "c", rows({"peak_alloc_mib": 0.7}))
    assert invoke(base, head2, "--fail-on", "peak_mem:10%")[0] == 0


@pytest.mark.parametrize(
    ("metric", "spec", "worse", "better"),
    [
        ("samples_per_s", "throughput:10%", 0.8, 1.3),
        ("tar@1e-3", "tar@1e-3:2%", 0.95, 1.05),
        ("peak_rss_mib", "peak_rss_mib:5", 1.1, 0.5),
    ],
)
def test_direction_aware(tmp_path, metric, spec, worse, better):
    base = write_run(tmp_path, "a", rows())
    assert invoke(base, write_run(tmp_path, "w", rows({metric: worse})), "--fail-on", spec)[0] == 1
    assert invoke(base, write_run(tmp_path, "b", rows({metric: better})), "--fail-on", spec)[0] == 0


def test_breach_below_threshold_passes(tmp_path):
    base = write_run(tmp_path, "a", rows())
    head = write_run(tmp_path, "b", rows({"samples_per_s": 0.95}))
    assert invoke(base, head, "--fail-on", "throughput:10%")[0] == 0
    assert invoke(base, head, "--fail-on", "throughput:4%")[0] == 1


def test_mean_over_seeds_matches_numpy(tmp_path):
    base = pl.DataFrame(rows(seeds=(0, 1)))
    head = pl.DataFrame(rows({"samples_per_s": 0.9}, seeds=(0, 1, 2)))
    deltas, notes = compare_runs(base, head, [("throughput", 10.0)])
    assert notes == []
    thr = [d for d in deltas if d.metric == "samples_per_s"]
    assert len(thr) == len(CONFIGS)
    for d in thr:
        b = np.mean([1000 * (1 + 0.01 * (s - 0.5)) for s in (0, 1)])
        h = np.mean([900 * (1 + 0.01 * (s - 0.5)) for s in (0, 1, 2)])
        assert d.base == pytest.approx(b) and d.head == pytest.approx(h)
        assert d.change_pct == pytest.approx(100 * (h / b - 1))
        assert (d.n_base, d.n_head) == (2, 3)
        assert d.breached == (100 * (1 - h / b) > 10.0)


def test_failed_trials_are_excluded_and_a_config_failing_in_head_is_a_breach(tmp_path):
    base = write_run(tmp_path, "a", rows())
    bad = rows()
    for r in bad:
        if r["miner"] == "batch_hard":
            r.update(status="oom", samples_per_s=None)
    code, out = invoke(base, write_run(tmp_path, "b", bad), "--fail-on", "throughput:10%")
    assert code == 1, out
    assert "no ok trial in head" in out


def test_head_run_where_every_trial_failed_exits_1(tmp_path):
    base = write_run(tmp_path, "a", rows())
    code, out = invoke(base, write_run(tmp_path, "b", rows(status="failed")), "--fail-on", "tar:1%")
    assert code == 1, out
    assert out.count("no ok trial in head") == len(CONFIGS)


def test_config_only_in_head_is_a_note(tmp_path):
    base = write_run(tmp_path, "a", [r for r in rows() if r["miner"] == "cbhem"])
    code, out = invoke(base, write_run(tmp_path, "b", rows()), "--fail-on", "throughput:10%")
    assert code == 0, out
    assert "only in head" in out
    code, out = invoke(write_run(tmp_path, "c", rows()), base, "--fail-on", "throughput:10%")
    assert code == 0, out
    assert "only in base" in out


def test_inferred_config_columns_exclude_seed_metrics_and_meta():
    cols = join_columns(pl.DataFrame(rows()))
    assert set(cols) == {"miner", "memory", "plb", "virtual_batch", "margin"}


def test_by_overrides_the_join_key(tmp_path):
    base = write_run(tmp_path, "a", rows())
    head = write_run(tmp_path, "b", rows({"samples_per_s": 0.5}))
    code, out = invoke(base, head, "--by", "miner", "--fail-on", "throughput:10%")
    assert code == 1
    assert "miner=cbhem" in out and "memory=" not in out


@given(
    seed=st.integers(0, 2**31 - 1),
    pct=st.floats(0.0, 60.0),
    metric=st.sampled_from(list(BASE_METRICS)),
)
def test_breach_iff_bad_direction_beyond_limit(seed, pct, metric):
    rng = np.random.default_rng(seed)
    base = pl.DataFrame(rows())
    factors = rng.uniform(0.5, 1.5, size=len(CONFIGS))
    head_rows = rows()
    for r in head_rows:
        r[metric] *= factors[CONFIGS.index({k: r[k] for k in CONFIGS[0]})]
    deltas, _ = compare_runs(base, pl.DataFrame(head_rows), [(metric, pct)])
    gated = [d for d in deltas if d.metric == metric]
    assert len(gated) == len(CONFIGS)
    higher_better = metric in ("samples_per_s", "tar@1e-3")
    for d in gated:
        change = 100 * (d.head / d.base - 1)
        assert d.change_pct == pytest.approx(change)
        expected = (-change if higher_better else change) > pct
        assert d.breached == expected
    assert all(not d.breached for d in deltas if d.metric != metric)


def test_direction_and_fail_on_parsing():
    assert direction("samples_per_s") == 1 and direction("tar@1e-4") == 1 and direction("auc") == 1
    assert (
        direction("peak_alloc_mib") == -1 and direction("eer") == -1 and direction("step_s") == -1
    )
    assert direction("miner") is None
    assert parse_fail_on(["throughput:10%", " tar@1e-3:2.5 "]) == [
        ("throughput", 10.0),
        ("tar@1e-3", 2.5),
    ]
    with pytest.raises(RunError, match="METRIC:PCT"):
        parse_fail_on(["throughput"])
    with pytest.raises(RunError, match="METRIC:PCT"):
        parse_fail_on(["throughput:-5%"])


def test_delta_is_frozen_record():
    d = Delta("c", "m", 1.0, 2.0, 1, 1, 100.0, None, False)
    with pytest.raises(AttributeError):
        d.metric = "x"


# ---- malformed inputs: exit 2 with a message ---------------------------------------------


def test_missing_run_dir_exits_2(tmp_path):
    base = write_run(tmp_path, "a", rows())
    code, out = invoke(base, tmp_path / "nope")
    assert code == 2 and "not a run directory" in out


def test_empty_trials_exits_2(tmp_path):
    base = write_run(tmp_path, "a", rows())
    (tmp_path / "empty" / "trials").mkdir(parents=True)
    code, out = invoke(base, tmp_path / "empty")
    assert code == 2 and "no .parquet" in out


def test_corrupt_parquet_exits_2(tmp_path):
    base = write_run(tmp_path, "a", rows())
    head = write_run(tmp_path, "b", rows())
    (head / "trials" / "zz.parquet").write_bytes(b"not parquet at all")
    code, out = invoke(base, head)
    assert code == 2 and "cannot read trial files" in out


def test_rows_without_status_exit_2(tmp_path):
    base = write_run(tmp_path, "a", rows())
    head = write_run(tmp_path, "b", [{k: v for k, v in r.items() if k != "status"} for r in rows()])
    code, out = invoke(base, head)
    assert code == 2 and "status" in out


def test_unknown_metric_and_bad_spec_exit_2(tmp_path):
    base, head = write_run(tmp_path, "a", rows()), write_run(tmp_path, "b", rows())
    code, out = invoke(base, head, "--fail-on", "latency:5%")
    assert code == 2 and "matches no metric column" in out
    code, out = invoke(base, head, "--fail-on", "throughput=5")
    assert code == 2 and "METRIC:PCT" in out


def test_no_common_config_exits_2(tmp_path):
    base = write_run(tmp_path, "a", rows())
    other = rows()
    for r in other:
        r["margin"] = 0.3
    code, out = invoke(base, write_run(tmp_path, "b", other), "--fail-on", "throughput:5%")
    assert code == 2 and "no config in common" in out


def test_load_run_reads_every_trial(tmp_path):
    run = write_run(tmp_path, "a", rows())
    assert load_run(run).height == len(CONFIGS) * 2


def test_harness_rows_join_on_config_key_despite_unsigned_stats(tmp_path):
    """Stats without a direction (memory_share, drift, ...) differ between runs of one config;
    harness rows must still join on their `config_key`, not split on those columns."""
    import polars as pl

    from harness.compare import compare_runs

    def run(name: str, share: float, sps: float):
        d = tmp_path / name / "trials"
        d.mkdir(parents=True)
        pl.DataFrame(
            {
                "trial_id": ["t0"],
                "config_key": ["k0"],
                "method": ["batch_hard+triplet"],
                "memory": [64],
                "virtual_batch": [32],
                "seed": [0],
                "status": ["ok"],
                "memory_share": [share],
                "drift": [share / 2],
                "samples_per_s": [sps],
            }
        ).write_parquet(d / "t0.parquet")
        return load_run(tmp_path / name)

    deltas, notes = compare_runs(run("a", 0.3, 1000.0), run("b", 0.7, 500.0), [("throughput", 10)])
    assert not notes
    breached = [d for d in deltas if d.metric == "samples_per_s"]
    assert len(breached) == 1 and breached[0].breached
