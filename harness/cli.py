"""`hembench` — the command-line entry point (typer).

Exit codes: 0 ok, 1 a trial failed or a regression was found, 2 bad input.
"""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from harness import __version__, cli_perf

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


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"hembench {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """hembench command-line interface."""


@app.command()
def env(
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """Show versions, CUDA devices and NVML status (works without a GPU or nvidia-ml-py).

    Example: `hembench env --json > env.json`
    """
    from harness.envinfo import collect_env

    info = collect_env()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(title="hembench environment", show_header=False)
    for key, value in info.items():
        if key == "gpus":
            value = ", ".join(f"{g['index']}: {g['name']} ({g['total_mib']} MiB)" for g in value) or "none"
        elif key == "nvml":
            value = f"available, driver {value['driver']}" if value["available"] else f"unavailable ({value['reason']})"
        table.add_row(key, str(value))
    console.print(table)


cli_perf.register(app)

if __name__ == "__main__":
    app()
