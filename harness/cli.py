"""`hembench` — the command-line entry point (typer).

Exit codes: 0 ok, 1 a trial failed or a regression was found, 2 bad input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from harness import __version__, cli_perf, report
from harness.config import estimated_extra_mib
from harness.envinfo import collect_env
from harness.executors import EXECUTORS
from harness.records import trial_label
from harness.results import RunDirError, load_run
from harness.runner import RunInputError, run_suite
from harness.suite import Suite, SuiteError, load_suite, trial_id

# Every module above is torch-free at import (tests/test_architecture.py): `show`, `plan` and
# `--help` answer in well under a second; torch loads when a suite is checked or a trial runs.

if TYPE_CHECKING:
    import polars as pl

app = typer.Typer(
    name="hembench",
    help=(
        "Benchmark and ablate cross-batch hard example mining (CB-HEM), pseudo large batch (PLB) "
        "and margin heads for ID-vs-Spot face recognition.\n\n"
        "Typical use: `hembench plan suites/smoke.toml`, then `hembench run suites/smoke.toml`, "
        "then `hembench show results/smoke/<run_id>`."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"hembench {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version_callback,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """hembench command-line interface."""


@app.command()
def env(
    as_json: bool = typer.Option(
        False, "--json", help="Print machine-readable JSON instead of a table."
    ),
) -> None:
    """Show versions, CUDA devices and NVML status (works without a GPU or nvidia-ml-py).

    Example: `hembench env --json > env.json`
    """
    info = collect_env()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(title="hembench environment", show_header=False)
    for key, value in info.items():
        if key == "gpus":
            value = (
                ", ".join(f"{g['index']}: {g['name']} ({g['total_mib']} MiB)" for g in value)
                or "none"
            )
        elif key == "nvml":
            value = (
                f"available, driver {value['driver']}"
                if value["available"]
                else f"unavailable ({value['reason']})"
            )
        table.add_row(key, str(value))
    console.print(table)


# --- suites: validate / plan / run -----------------------------------------------------------

SUITE_ARG = typer.Argument(
    ..., help="Suite file (TOML), e.g. suites/smoke.toml.", show_default=False
)


def _fail(problems: list[str]) -> NoReturn:
    """Print input problems (one per line, no traceback) and exit 2."""
    for p in problems:
        err_console.print(f"error: {p}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _load(path: Path, device: str | None = None) -> Suite:
    try:
        return load_suite(path, device=device)
    except SuiteError as exc:
        _fail(exc.problems)


@app.command()
def validate(suite: Path = SUITE_ARG) -> None:
    """Validate a suite file and run nothing: exit 0 if valid, 2 with one message per problem.

    Example: `hembench validate suites/ivs_ablation.toml`
    """
    s = _load(suite)
    typer.echo(f"{suite}: ok ({len(s.trials)} trials)")


@app.command()
def plan(
    suite: Path = SUITE_ARG,
    device: str | None = typer.Option(None, help="Override train.device: auto, cpu or cuda."),
) -> None:
    """Validate a suite and print its expanded grid (trial ids, configs, estimated extra memory).

    Example: `hembench plan suites/ivs_ablation.toml`
    """
    s = _load(suite, device)
    table = Table(title=f"suite {s.name}: {len(s.trials)} trials")
    for col in ("#", "trial id", "seed", "method", "memory", "virtual batch", "est. extra MiB"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for i, t in enumerate(s.trials):
        table.add_row(
            str(i),
            trial_id(t),
            str(t.seed),
            trial_label(t),
            str(t.method.memory),
            str(t.virtual_batch),
            f"{estimated_extra_mib(t):.1f}",
        )
    console.print(table)
    console.print(
        "est. extra MiB = CB-HEM memory bank + PLB representation cache; activations excluded."
    )


@app.command()
def run(
    suite: Path = SUITE_ARG,
    results_dir: Path = typer.Option(
        Path("results"), help="Results root; the run goes to DIR/<suite>/<run_id>/."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the latest run of this suite (or --run-id): re-run only missing or not-ok trials.",
    ),
    run_id: str | None = typer.Option(
        None, help="Name of the run directory (default: UTC time + random suffix)."
    ),
    executor: str = typer.Option(
        "local", help="Where trials run: local (process per trial) or ray."
    ),
    jobs: int | None = typer.Option(
        None,
        min=1,
        help="Trials running at the same time (local default 1; ray default: what the "
        "cluster's free CPUs/GPUs can hold).",
    ),
    device: str | None = typer.Option(
        None, help="Override train.device for every trial: auto, cpu or cuda."
    ),
    in_process: bool = typer.Option(
        False,
        "--in-process",
        help="Run trials in this process (debugging; timeouts only between steps).",
    ),
    timeout: float | None = typer.Option(
        None, min=0.001, help="Per-trial timeout in seconds (overrides suite.timeout_s)."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress output, only the summary."
    ),
) -> None:
    """Run every trial of a suite and write one Parquet file per trial.

    Exit 0 if all trials are ok, 1 if any trial failed (oom, nan, timeout, failed), 2 on bad input.

    Examples:
      `hembench run suites/smoke.toml`
      `hembench run suites/ivs_ablation.toml --jobs 2 --device cuda`
      `hembench run suites/ivs_ablation.toml --resume`   (after an interruption)
    """
    if executor not in EXECUTORS:
        _fail([f"--executor must be one of {', '.join(EXECUTORS)}; got {executor!r}"])
    s = _load(suite, device)
    try:
        result = run_suite(
            s, results_dir, console, resume=resume, run_id=run_id, executor=executor,
            jobs=jobs, in_process=in_process, timeout_s=timeout, quiet=quiet,
        )  # fmt: skip
    except (RunDirError, RunInputError) as exc:
        _fail([str(exc)])
    console.print(report.summary_table(load_run(result.run_dir.path)))
    console.print(f"results: {result.run_dir.path}", highlight=False)
    if not result.all_ok:
        raise typer.Exit(1)


# --- reading runs: show / plot -----------------------------------------------------------------

RUN_ARG = typer.Argument(
    ..., help="A run directory, e.g. results/smoke/<run_id>.", show_default=False
)


def _load_run(run_dir: Path) -> pl.DataFrame:
    try:
        return load_run(run_dir)
    except RunDirError as exc:
        _fail([str(exc)])


@app.command()
def show(
    run_dir: Path = RUN_ARG,
    fmt: str = typer.Option("table", "--format", help="table (rich), csv, json or markdown."),
    far: float | None = typer.Option(
        None, help="FAR of the TAR column (default: 1e-3 if evaluated, else the lowest)."
    ),
) -> None:
    """Summarise a run: memory × virtual batch pivots of TAR@FAR, peak MiB and samples/s,
    mean ± 95% CI over seeds and Δ vs the suite's baseline.

    Examples: `hembench show results/smoke/<run_id>`,
    `hembench show results/ivs_ablation/<run_id> --format csv > grid.csv`
    """
    if fmt not in report.FORMATS:
        _fail([f"--format must be one of {', '.join(report.FORMATS)}; got {fmt!r}"])
    frame = _load_run(run_dir)
    try:
        report.show(frame, fmt, far, console)
    except ValueError as exc:
        _fail([str(exc)])


@app.command()
def plot(
    run_dir: Path = RUN_ARG,
    out: Path | None = typer.Option(None, help="Directory for the PNGs (default: RUN_DIR/plots)."),
    far: float | None = typer.Option(None, help="FAR of the accuracy plot (default as in show)."),
) -> None:
    """Write PNG plots: accuracy vs memory size, peak memory vs virtual batch, throughput vs memory.

    Example: `hembench plot results/ivs_ablation/<run_id> --out figs/`
    """
    frame = _load_run(run_dir)
    try:
        paths = report.plot(frame, out or run_dir / "plots", far)
    except ValueError as exc:
        _fail([str(exc)])
    for p in paths:
        console.print(str(p), highlight=False)


cli_perf.register(app)

if __name__ == "__main__":
    app()
