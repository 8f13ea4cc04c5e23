import csv
import io
import json
from pathlib import Path

import polars as pl
import pytest
from rich.console import Console
from typer.testing import CliRunner

from harness import __version__, cli_show, progress, report
from harness.cli import app
from harness.records import ROW_COLUMNS
from harness.results import load_run

runner = CliRunner()


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0
    assert __version__ in r.output


def test_env_json_without_gpu_does_not_crash():
    r = runner.invoke(app, ["env", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["torch"]
    assert isinstance(info["gpus"], list)
    assert set(info["nvml"]) == {"available", "driver", "reason"}


def test_env_table():
    r = runner.invoke(app, ["env"])
    assert r.exit_code == 0, r.output
    assert "nvml" in r.output


# --- output for logs and narrow terminals (issue 19 item 4) ----------------------------------

LONG_METHOD = "batch_hard+triplet plb:chunk_loss"


def write_run(root: Path, run_id: str, start: str, statuses=("ok", "ok", "timeout")) -> Path:
    """A finished run of suite `s` with one trial per status (seeds 0, 1, ...)."""
    path = root / "s" / run_id
    (path / "trials").mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"start": start}))
    for i, status in enumerate(statuses):
        row = dict.fromkeys(ROW_COLUMNS) | {
            "trial_id": f"{run_id}-{i}", "trial_index": i, "seed": i, "suite": "s",
            "method": LONG_METHOD, "memory": 1024, "virtual_batch": 256, "is_baseline": True,
            "status": status, "tar@1e-3": 0.6 + 0.05 * i if status == "ok" else None,
            "peak_rss_mib": 100.0, "samples_per_s": 1234.0, "eer": 0.1, "auc": 0.9,
            "train_time_s": 1.5,
            "error": None if status == "ok" else "Traceback ...\nTrialTimeout: timed out after 9.0 s",
        }  # fmt: skip
        pl.DataFrame([row], schema_overrides={**ROW_COLUMNS, "tar@1e-3": pl.Float64}).write_parquet(
            path / "trials" / f"{i}.parquet"
        )
    return path


def test_summary_off_a_tty_at_80_columns_is_never_truncated(tmp_path):
    """`run`'s summary and `show --raw` in a CI log (COLUMNS=80, not a terminal) keep the full
    method, status and metric text (they read `meth…`, `stat…`, `tar@1…` once)."""
    run = write_run(tmp_path, "r1", "2026-01-01T00:00:00")
    frame = load_run(run)
    buf = io.StringIO()
    report.print_table(Console(file=buf, width=80), "t", *report.trial_rows(frame))
    r = runner.invoke(app, ["show", str(run), "--raw"], env={"COLUMNS": "80"})
    for out in (buf.getvalue(), r.output):
        assert "…" not in out, out
        for text in (LONG_METHOD, "timeout", "tar@1e-3", "0.650", "TrialTimeout: timed out"):
            assert text in out, (text, out)


def test_summary_on_a_narrow_terminal_is_rows_of_column_values(tmp_path):
    frame = load_run(write_run(tmp_path, "r1", "2026-01-01T00:00:00"))
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    report.print_table(console, "3 trials", *report.trial_rows(frame))
    out = buf.getvalue()
    assert f"method={LONG_METHOD}" in out and "status=timeout" in out and "tar@1e-3=0.600" in out
    assert "…" not in out


def test_many_rows_are_plain_aligned_text():
    buf = io.StringIO()
    rows = [[str(i), "x" * (i % 7)] for i in range(report.PLAIN_ROWS + 1)]
    report.print_table(Console(file=buf, width=80), "big", ["#", "method"], rows)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "big" and len(lines) == len(rows) + 2 and "┃" not in buf.getvalue()


def test_show_n_column_clipped_ci_errors_and_latest(tmp_path):
    write_run(tmp_path, "b-old", "2026-01-01T00:00:00", ("ok", "ok"))
    write_run(tmp_path, "a-new", "2026-02-01T00:00:00", ("ok", "ok", "timeout"))
    r = runner.invoke(app, ["show", str(tmp_path / "s"), "--latest"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "a-new" in r.output  # the run that started last, not the lexicographically last
    assert "┃ n ┃" in r.output  # seeds per configuration
    assert "0.625 ± 0.318" in r.output  # TAR 0.60, 0.65: the CI [0.307, 0.943] needs no clipping
    assert "timeout: 1" in r.output and "a-new-2 timeout" in r.output
    assert "TrialTimeout: timed out after 9.0 s" in r.output
    by_name = runner.invoke(app, ["show", "s", "--latest", "--results-dir", str(tmp_path)])
    assert by_name.exit_code == 0 and "a-new" in by_name.output


def test_confidence_intervals_are_clipped_to_the_metric_range():
    rows = [
        {"method": "m", "memory": 0, "virtual_batch": 8, "seed": s, "status": "ok",
         "is_baseline": True, "tar@1e-3": v, "peak_alloc_mib": None, "peak_rss_mib": 1.0,
         "samples_per_s": 1.0, "eer": 0.0 + s * 0.01, "auc": 1.0 - s * 0.01}
        for s, v in enumerate((0.1, 0.9))
    ]  # fmt: skip
    agg = report.aggregate(pl.DataFrame(rows), 1e-3)
    assert agg["tar@1e-3_ci95"][0] > 5  # 12.706 · 0.566 / √2
    assert agg["tar@1e-3_lo"][0] == 0.0 and agg["tar@1e-3_hi"][0] == 1.0
    assert agg["eer_lo"][0] == 0.0 and agg["auc_hi"][0] == 1.0
    buf = io.StringIO()
    report.show(pl.DataFrame(rows), "markdown", 1e-3, Console(file=buf, width=200))
    tar_row = next(ln for ln in buf.getvalue().splitlines() if ln.startswith("| m |"))
    assert tar_row == "| m | 0 | 2 | 0.500 [0.000, 1.000] |"


@pytest.mark.parametrize("fmt", report.FORMATS)
def test_show_raw_in_every_format(tmp_path, fmt):
    run = write_run(tmp_path, "r1", "2026-01-01T00:00:00")
    r = runner.invoke(app, ["show", str(run), "--raw", "--format", fmt])
    assert r.exit_code == 0, r.output
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(r.output)))
        assert [row["status"] for row in rows] == ["ok", "ok", "timeout"]
    elif fmt == "json":
        rows = json.loads(r.output)
        assert [row["status"] for row in rows] == ["ok", "ok", "timeout"]
    else:
        assert all(f"r1-{i}" in r.output for i in range(3)) and "timeout" in r.output


# --- plan ----------------------------------------------------------------------------------

PLAN_SUITE = """\
[suite]
name = "p"
timeout_s = 77
[data]
identities = 64
test_identities = 40
dim = 8
[model]
embedding = 8
[train]
steps = 3
batch = 8
device = "cpu"
threads = 64
[eval]
far = [0.1]
[[sweep]]
train.lr = [0.05]
data.imbalance = [1.5]
"""


def test_plan_shows_variant_and_timeout_and_warns_on_oversubscription(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(PLAN_SUITE)
    r = runner.invoke(app, ["plan", str(path), "--jobs", "64"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    assert "variant" in r.output and "timeout s" in r.output and "77" in r.output
    assert "data.imbalance=1.5 train.lr=0.05" in r.output
    assert r.output.count("data.imbalance=") == 1  # the baseline's variant is empty
    assert "warning: train.threads = 64 x 64 concurrent trials = 4096 threads" in r.output
    path.write_text(PLAN_SUITE.replace("threads = 64", "threads = 0"))
    r = runner.invoke(app, ["plan", str(path), "--jobs", "64"])
    assert r.exit_code == 0 and "warning" not in r.output, r.output


def test_oversubscription_arithmetic():
    from harness.suite import parse_suite

    s = parse_suite(PLAN_SUITE.replace("threads = 64", "threads = 1"), check=False)
    assert cli_show.oversubscription(s, jobs=2, cores=2) is None
    assert "= 3 threads on 2 cores" in cli_show.oversubscription(s, jobs=3, cores=2)
    cuda = parse_suite(PLAN_SUITE.replace('"cpu"', '"cuda"'), check=False)
    assert cli_show.oversubscription(cuda, jobs=64, cores=2) is None


# --- progress --------------------------------------------------------------------------------


def test_live_line_reads_step_i_of_n():
    line = progress.live_line("abc", "m M=64", {"step": 3, "loss": 0.5, "samples_per_s": 99.6},
                              {"abc": 12})  # fmt: skip
    assert line == "abc m M=64: step 3/12 loss 0.5000 100 samples/s"
    assert progress.live_line("abc", "", {"step": 3}, {}) == "abc: step 3"


def test_progress_off_a_terminal_says_starting_at_once():
    buf = io.StringIO()
    with progress.RunProgress(Console(file=buf, width=80), 2, {"a": "m"}) as prog:
        assert buf.getvalue() == "starting 2 trials…\n"
        prog.update("a", {"step": 1})  # no live line in a log
    assert buf.getvalue() == "starting 2 trials…\n"


def test_progress_on_a_narrow_terminal_keeps_count_and_eta_on_their_own_row():
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    prog = progress.RunProgress(console, 5, {"abc": LONG_METHOD * 3}, steps={"abc": 40})
    with prog:
        rows = list(prog._progress.get_renderables())
        assert len(rows) == 2 and str(rows[1]) == "starting…"
        prog.update("abc", {"step": 7, "loss": 1.0})
        bar = Console(file=io.StringIO(), width=80).render_lines(rows[0])
        text = "".join(seg.text for line in bar for seg in line)
        assert "0/5" in text and "ETA" in text
        assert "step 7/40" in prog._progress.current


def test_compare_and_bench_errors_are_one_line_on_stderr(tmp_path):
    r = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert r.exit_code == 2
    assert r.stdout == "" and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
