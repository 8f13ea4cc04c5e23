"""`hembench` — the command-line entry point (typer).

Exit codes: 0 ok, 1 a trial failed or a regression was found, 2 bad input (one `error:` line
per problem on stderr, never a traceback), 130 interrupted. Commands parse, call and print; what
they print is built in `cli_show` and `report`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from harness import __version__, cli_perf, cli_show, report
from harness.config import SuiteFile
from harness.envinfo import collect_env
from harness.executors import EXECUTORS
from harness.results import RunDataWarning, RunDirError, load_run
from harness.runner import RunInputError, run_suite
from harness.suite import MAX_TRIALS, Suite, SuiteError, load_suite

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
    cls=cli_show.OneLineErrors,  # usage errors: one `error:` line, not a boxed panel
    pretty_exceptions_enable=False,
)
console = Console()


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
MAX_TRIALS_OPT = typer.Option(
    MAX_TRIALS, "--max-trials", min=1, help="Refuse suites that expand to more trials than this."
)


def _fail(problems: list[str]) -> NoReturn:
    """Print input problems (one `error:` line each, no traceback) and exit 2."""
    for p in problems:
        cli_show.error(p)
    raise typer.Exit(2)


def _load(path: Path, device: str | None = None, max_trials: int = MAX_TRIALS) -> Suite:
    try:
        return load_suite(path, device=device, max_trials=max_trials)
    except SuiteError as exc:
        _fail(exc.problems)


@app.command()
def validate(suite: Path = SUITE_ARG, max_trials: int = MAX_TRIALS_OPT) -> None:
    """Validate a suite file and run nothing: exit 0 if valid, 2 with one line per problem.

    Checks the schema, library names and parameters, data paths, FARs the test set cannot
    measure and the grid size (docs/suites.md, "What validate checks").

    Example: `hembench validate suites/ivs_ablation.toml`
    """
    s = _load(suite, max_trials=max_trials)
    typer.echo(f"{suite}: ok ({len(s.trials)} trials)")


@app.command()
def schema() -> None:
    """Print the JSON Schema of a suite file (for editor completion; reference: docs/suites.md).

    Example: `hembench schema > suite.schema.json`
    """
    typer.echo(json.dumps(SuiteFile.model_json_schema(), indent=2, ensure_ascii=False))


@app.command()
def plan(
    suite: Path = SUITE_ARG,
    device: str | None = typer.Option(None, help="Override train.device: auto, cpu or cuda."),
    jobs: int = typer.Option(1, min=1, help="Concurrent trials you will run with (threads check)."),
    max_trials: int = MAX_TRIALS_OPT,
) -> None:
    """Validate a suite and print its expanded grid, one row per trial.

    Columns: trial id, seed, method, memory, virtual batch N, variant (the other swept values
    that tell trials apart), per-trial timeout and estimated extra memory. Warns when explicit
    train.threads × --jobs asks for more threads than there are cores.

    Example: `hembench plan suites/ivs_ablation.toml --jobs 2`
    """
    s = _load(suite, device, max_trials)
    title = f"suite {s.name}: {len(s.trials)} trials"
    report.print_table(
        console, title, cli_show.PLAN_HEADER, cli_show.plan_rows(s), ("method", "variant")
    )
    console.print(
        "est. extra MiB = CB-HEM memory bank + PLB representation cache; activations excluded.",
        highlight=False,
        soft_wrap=True,
    )
    if warning := cli_show.oversubscription(s, jobs):
        cli_show.err_console.print(warning, markup=False, highlight=False, soft_wrap=True)


@app.command()
def run(
    suite: Path = SUITE_ARG,
    results_dir: Path = typer.Option(
        Path("results"), help="Results root; the run goes to DIR/<suite>/<run_id>/."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the latest run of this suite (or --run-id): re-run only missing or not-ok "
        "trials; an interrupted trial continues from its last checkpoint.",
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
        None,
        min=0.001,
        help="Per-trial timeout in seconds, counted from the end of data preparation "
        "(overrides suite.timeout_s; inf = none).",
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress output, only the summary."
    ),
    max_trials: int = MAX_TRIALS_OPT,
    allow_gpu_sharing: bool = typer.Option(
        False,
        "--allow-gpu-sharing",
        help="With --jobs above the GPU count, run several CUDA trials per GPU (default: one).",
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
    s = _load(suite, device, max_trials)
    try:
        result = run_suite(
            s, results_dir, console, resume=resume, run_id=run_id, executor=executor,
            jobs=jobs, in_process=in_process, timeout_s=timeout, quiet=quiet,
            allow_gpu_sharing=allow_gpu_sharing,
        )  # fmt: skip
    except (RunDirError, RunInputError) as exc:
        _fail([str(exc)])
    frame = load_run(result.run_dir.path)
    left = ("trial", "method", "variant", "status", "error")
    report.print_table(console, f"{frame.height} trials", *report.trial_rows(frame), left)
    console.print(f"results: {result.run_dir.path}", highlight=False)
    if not result.all_ok:
        raise typer.Exit(1)


# --- reading runs: show / plot -----------------------------------------------------------------

RUN_ARG = typer.Argument(
    ...,
    help="A run directory (results/smoke/<run_id>), or with --latest a suite's directory "
    "(results/smoke) or name (smoke).",
    show_default=False,
)
LATEST_OPT = typer.Option(False, "--latest", help="The run of that suite that started last.")
ROOT_OPT = typer.Option(Path("results"), help="Where --latest looks for a suite given by name.")


def _load_run(run_dir: Path, latest: bool, results_dir: Path) -> tuple[Path, pl.DataFrame]:
    try:
        path = cli_show.find_run(run_dir, latest, results_dir)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RunDataWarning)
            frame = load_run(path)
    except (RunDirError, ValueError) as exc:
        _fail([str(exc)])
    for w in caught:  # damaged trial files: one line each, not Python's two-line warning
        cli_show.err_console.print(
            f"warning: {w.message}", markup=False, highlight=False, soft_wrap=True
        )
    return path, frame


@app.command()
def show(
    run_dir: Path = RUN_ARG,
    fmt: str = typer.Option("table", "--format", help="table (rich), csv, json or markdown."),
    far: float | None = typer.Option(
        None, help="FAR of the TAR column (default: 1e-3 if evaluated, else the lowest)."
    ),
    raw: bool = typer.Option(False, "--raw", help="One row per trial instead of the pivots."),
    latest: bool = LATEST_OPT,
    results_dir: Path = ROOT_OPT,
) -> None:
    """Summarise a run: pivots of TAR@FAR, peak MiB and samples/s over seeds.

    Memory × virtual batch pivots with n seeds, mean ± 95% CI (clipped to the metric's range)
    and Δ vs the suite's baseline; then the errors of the trials that are not ok.

    Examples: `hembench show results/smoke --latest`,
    `hembench show results/ivs_ablation/<run_id> --format csv > grid.csv`, `... --raw`
    """
    if fmt not in report.FORMATS:
        _fail([f"--format must be one of {', '.join(report.FORMATS)}; got {fmt!r}"])
    path, frame = _load_run(run_dir, latest, results_dir)
    if latest and fmt in ("table", "markdown"):
        console.print(f"run {path}", highlight=False)
    try:
        report.show(frame, fmt, far, console, raw=raw)
    except ValueError as exc:
        _fail([str(exc)])


@app.command()
def plot(
    run_dir: Path = RUN_ARG,
    out: Path | None = typer.Option(None, help="Directory for the PNGs (default: RUN_DIR/plots)."),
    far: float | None = typer.Option(None, help="FAR of the accuracy plot (default as in show)."),
    latest: bool = LATEST_OPT,
    results_dir: Path = ROOT_OPT,
) -> None:
    """Write PNG plots of what the suite sweeps: accuracy and throughput vs memory size (M swept),
    peak memory vs virtual batch (N swept), and accuracy by configuration (always).

    Example: `hembench plot results/ivs_ablation/<run_id> --out figs/`
    """
    from harness.plots import plot as plot_run  # matplotlib: only when plotting

    path, frame = _load_run(run_dir, latest, results_dir)
    try:
        paths = plot_run(frame, out or path / "plots", far)
    except ValueError as exc:
        _fail([str(exc)])
    for p in paths:
        console.print(str(p), highlight=False)


cli_perf.register(app)

if __name__ == "__main__":
    app()
