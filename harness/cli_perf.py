"""Performance-regression commands (`hembench bench`, `hembench compare`), registered on the app.

Kept apart from cli.py so the regression tooling can evolve on its own.
Exit codes: 0 ok, 1 regression, 2 bad or missing baseline / run directory / option (one
`error:` line on stderr).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from harness import cli_show
from harness import compare as cmp
from harness.envinfo import collect_env
from harness.results import RunDirError, load_run


class _WideConsole(Console):
    """A rich console that is 160 columns wide when not writing to a terminal (CI logs, pipes),
    instead of rich's default 80, so that case names and numbers are not truncated."""

    def __init__(self) -> None:
        super().__init__()
        if not self.is_terminal:
            self.width = 160


console = _WideConsole()


def _fail(message: str) -> typer.Exit:
    """One `error:` line on stderr (no markup, never wrapped); raise the returned Exit(2)."""
    cli_show.error(message)
    return typer.Exit(2)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _bench_table(doc: dict[str, Any]) -> Table:
    s = doc["settings"]
    table = Table(title=f"hembench bench ({s['preset']}, {s['device']}, {s['threads']} thread(s))")
    for col in ("case", "reference", "ratio", "IQR", "n", "subject ms", "ref ms"):
        table.add_column(col, justify="left" if col in ("case", "reference") else "right")
    for name, rec in doc["cases"].items():
        if "skipped" in rec or "error" in rec:
            what = "[yellow]skipped[/]" if "skipped" in rec else "[bold red]error[/]"
            table.add_row(name, what, "", "", "", "", "")
            continue
        r = rec["ratio"]
        table.add_row(
            name, rec["reference"], f"{r['median']:.3f}", f"{r['iqr']:.3f}", str(r["n"]),
            f"{rec['subject_ms']:.2f}", f"{rec['reference_ms']:.2f}",
        )  # fmt: skip
    return table


def _exact_table(doc: dict[str, Any]) -> Table:
    table = Table(title="deterministic figures (compared exactly)")
    table.add_column("case")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, rec in doc["cases"].items():
        for fig, value in rec.get("exact", {}).items():
            table.add_row(name, fig, f"{value:.10g}")
    return table


def _skipped(doc: dict[str, Any]) -> None:
    for name, rec in doc["cases"].items():
        if "skipped" in rec:
            console.print(f"[yellow]skipped[/] {name}: {rec['skipped']}")
        if "error" in rec:
            console.print(f"[bold red]error[/] {name}: {rec['error']}")


def _checks_table(checks: list, only_bad: bool) -> Table:
    table = Table(title="regressions" if only_bad else "comparison with baseline")
    for col in ("case", "figure", "baseline", "now", "change %", "limit %", "verdict"):
        table.add_column(col, justify="left" if col in ("case", "figure", "verdict") else "right")
    for c in checks:
        if only_bad and not c.regressed:
            continue
        verdict = "[bold red]REGRESSED[/]" if c.regressed else "[green]ok[/]"
        if c.note:
            verdict += f" ({c.note})"
        change = "—" if c.change_pct is None else f"{c.change_pct:+.1f}"
        table.add_row(
            c.case,
            c.figure,
            _fmt(c.baseline, 6),
            _fmt(c.current, 6),
            change,
            f"{c.limit_pct:.1f}",
            verdict,
        )
    return table


def _read_baseline(path: Path) -> dict[str, Any]:
    """The validated baseline document at `path`; exit 2 naming the file on any problem."""
    from harness import bench as bench_mod

    try:
        return bench_mod.validate_document(json.loads(path.read_bytes()), str(path))
    except (OSError, ValueError, RecursionError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise _fail(f"cannot use baseline {path}: {exc}") from None


def _file_in_path(path: Path) -> bool:
    """Whether `path` or one of its ancestors is an existing non-directory."""
    return any(p.exists() and not p.is_dir() for p in (path, *path.parents))


def bench(
    baseline: Path | None = typer.Option(
        None,
        "--baseline",
        help="Compare with this bench JSON; exit 1 on a regression, 2 if unusable.",
    ),
    save: Path | None = typer.Option(
        None, "--save", help="Write the result JSON (with environment) here."
    ),
    tolerance: float | None = typer.Option(
        None,
        "--tolerance",
        help="Allowed ratio slowdown in percent (default: the baseline's, set from measured noise).",
    ),
    repeat: int = typer.Option(
        21, "--repeat", min=1, help="Interleaved subject/reference rounds per case."
    ),
    min_time: float = typer.Option(
        0.1, "--min-time", min=0.0, help="Seconds per timing (calls are batched)."
    ),
    preset: str = typer.Option(
        "default", "--preset", help="Problem sizes: default | tiny (smoke tests)."
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:i]"),
    threads: int = typer.Option(
        1, "--threads", min=1, help="torch intra-op threads during the bench."
    ),
    only: list[str] = typer.Option(
        [], "--only", help="Run only cases whose name contains this (repeatable)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result JSON instead of tables."),
) -> None:
    """Machine-normalised microbenchmarks: each figure is a ratio to a reference in the same process.

    Cases: CB-HEM mining at M = 8k and 32k and a CB-HEM objective step (vs the similarity GEMM),
    PLB exact at K = 4 (vs a plain step), every margin head fwd+bwd (vs plain softmax) and chunked
    IvS evaluation (vs the score GEMM). Subject and reference run interleaved, `--repeat` times;
    the table shows the median ratio and its IQR. Deterministic figures (buffer bytes, number of
    forwards, CUDA peaks) are compared exactly.

    Example (CI): `hembench bench --baseline benchmarks/baseline-cpu.json`
    """
    from harness import bench as bench_mod  # imports torch and mining: only for `bench`

    # every input is checked before minutes of timing: a bad baseline, tolerance or save path
    base_doc = _read_baseline(baseline) if baseline is not None else None
    if tolerance is not None:
        try:
            bench_mod.check_tolerance(tolerance, "--tolerance")
        except bench_mod.BaselineError as exc:
            raise _fail(str(exc)) from None
    if save is not None and (save.is_dir() or _file_in_path(save.parent)):
        raise _fail(f"--save {save}: not a writable file path (a directory, or under a file)")
    quiet = as_json

    def progress(name: str, rec: dict[str, Any]) -> None:
        if not quiet:
            what = rec.get("skipped") or rec.get("error") or f"ratio {rec['ratio']['median']:.3f}"
            console.print(f"  {name}: {what}")

    try:
        doc = bench_mod.run_bench(
            preset=preset, repeat=repeat, min_time_s=min_time, device=device, threads=threads,
            only=only or None, env=collect_env(), on_case=progress,
        )  # fmt: skip
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if save is not None:
        try:
            save.parent.mkdir(parents=True, exist_ok=True)
            save.write_text(json.dumps(doc, indent=2) + "\n")
        except OSError as exc:
            raise _fail(f"--save {save}: cannot write: {exc.strerror or exc}") from None
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    else:
        console.print(_bench_table(doc))
        console.print(_exact_table(doc))
        _skipped(doc)
    crashed = bench_mod.failed_cases(doc)
    if base_doc is None:
        if crashed:
            console.print(f"[bold red]{len(crashed)} benchmark(s) crashed[/]")
            raise typer.Exit(1)
        return
    try:
        checks = bench_mod.compare_to_baseline(doc, base_doc, tolerance)
    except bench_mod.BaselineError as exc:
        raise _fail(f"baseline {baseline} is not comparable: {exc}") from None
    regressed = [c for c in checks if c.regressed]
    if not as_json:
        console.print(_checks_table(checks, only_bad=False))
    if regressed or crashed:
        console.print(_checks_table(checks, only_bad=True))
        console.print(
            f"[bold red]{len(regressed)} regression(s) against {baseline}, "
            f"{len(crashed)} crashed benchmark(s)[/]"
        )
        raise typer.Exit(1)
    console.print(f"[green]no regression against {baseline}[/]")


def compare(
    base_run: Path = typer.Argument(..., help="Base run directory (results/<suite>/<run_id>)."),
    head_run: Path = typer.Argument(..., help="Head run directory to check against the base."),
    fail_on: list[str] = typer.Option(
        [],
        "--fail-on",
        help="METRIC:PCT% (repeatable). Aliases: throughput, peak_mem (every *_mib column), tar.",
    ),
    by: list[str] = typer.Option([], "--by", help="Config columns to join on (default: inferred)."),
    show_all: bool = typer.Option(False, "--all", help="Also list ungated metrics."),
) -> None:
    """Compare two suite runs config by config (mean over seeds); exit 1 on a breach.

    Direction-aware: lower throughput, higher peak memory and lower TAR are regressions.

    Example: `hembench compare results/smoke/base results/smoke/head --fail-on throughput:10%
    --fail-on peak_mem:2%`
    """
    try:
        limits = cmp.parse_fail_on(fail_on)
        deltas, notes = cmp.compare_runs(
            load_run(base_run, strict=True), load_run(head_run, strict=True), limits, by=by or None
        )
    except (cmp.RunError, RunDirError) as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"{base_run} → {head_run}")
    for col in ("config", "metric", "base", "head", "n", "change %", "limit %", "verdict"):
        table.add_column(col, justify="left" if col in ("config", "metric", "verdict") else "right")
    for d in deltas:
        if d.limit_pct is None and not d.breached and not show_all:
            continue
        verdict = (
            "[bold red]BREACH[/]"
            if d.breached
            else "[green]ok[/]"
            if d.limit_pct is not None
            else ""
        )
        if d.note:
            verdict += f" ({d.note})"
        table.add_row(
            d.config, d.metric, _fmt(d.base, 5), _fmt(d.head, 5), f"{d.n_base}/{d.n_head}",
            "—" if d.change_pct is None else f"{d.change_pct:+.1f}",
            "—" if d.limit_pct is None else f"{d.limit_pct:g}", verdict,
        )  # fmt: skip
    console.print(table)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    breaches = [d for d in deltas if d.breached]
    if breaches:
        console.print(f"[bold red]{len(breaches)} breach(es)[/]")
        raise typer.Exit(1)
    console.print("[green]no breach[/]")


def register(app: typer.Typer) -> None:
    """Add the performance commands (`bench`, `compare`) to `app`."""
    app.command()(bench)
    app.command()(compare)
