"""What the CLI prints and how it reports bad input, kept out of the commands (cli.py).

- `OneLineErrors`: typer's usage errors (a bad `--jobs`, an unknown option) as one `error:`
  line on stderr with exit code 2, instead of a boxed multi-line panel.
- `plan_rows`: the rows of `hembench plan` (variant and timeout columns) and the threads ×
  jobs oversubscription warning.
- `find_run`: the run directory that `show`/`plot` mean (a run, or `--latest` of a suite).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from typer.core import TyperGroup

from harness.config import TrialConfig, estimated_extra_mib, trial_timeout
from harness.executors.placement import oversubscription_warning, usable_cores
from harness.records import method_name
from harness.results_io import start_time
from harness.suite import Suite

err_console = Console(stderr=True)


def error(message: str) -> None:
    """One `error:` line on stderr (no markup, never wrapped)."""
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


class OneLineErrors(TyperGroup):
    """A typer group whose usage errors are one line each: `error: Invalid value for '--jobs':
    ... (see hembench run --help)`, exit 2 — readable in CI logs and narrow terminals."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        from typer import Abort
        from typer._click.exceptions import ClickException

        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `hembench` alone: help was shown
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            error(" ".join(exc.format_message().split()) + hint)
            sys.exit(exc.exit_code)
        except Abort:
            error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


# --- plan ------------------------------------------------------------------------------------

PLAN_HEADER = (
    "#", "trial id", "seed", "method", "memory", "N", "variant", "timeout s", "est. extra MiB",
)  # fmt: skip
# swept keys shown in columns of their own, or in the method's name
_IN_COLUMNS = {"memory", "virtual_batch", "miner", "loss", "plb", "head"}


def variants(suite: Suite) -> list[str]:
    """Per trial, `key=value` of the values its sweep block set, other than method, memory and
    N (`data.imbalance=1.5 train.lr=0.05`, head parameters as `head.s=32.0`); "" for the
    baseline."""
    out = []
    for combo in suite.swept or [{}] * len(suite.trials):
        parts = []
        for key, value in sorted(combo.items()):
            if isinstance(value, dict):  # head_params / objective_params
                prefix = key.removesuffix("_params")
                parts += [f"{prefix}.{k}={v}" for k, v in sorted(value.items())]
            elif key not in _IN_COLUMNS:
                parts.append(f"{key}={value}")
        out.append(" ".join(parts))
    return out


def plan_rows(suite: Suite) -> list[list[str]]:
    """One row per trial, in PLAN_HEADER's order."""

    def limit(t: TrialConfig) -> str:
        timeout = trial_timeout(suite.meta.timeout_s, t)
        return "none" if timeout is None else f"{timeout:g}"

    ids = suite.ids
    rows = zip(suite.trials, ids, variants(suite), strict=True)
    return [
        [
            str(i),
            tid,
            str(t.seed),
            method_name(t),
            str(t.method.memory),
            str(t.virtual_batch),
            variant,
            limit(t),
            f"{estimated_extra_mib(t):.1f}",
        ]
        for i, (t, tid, variant) in enumerate(rows)
    ]


def oversubscription(suite: Suite, jobs: int, cores: int | None = None) -> str | None:
    """The runner's warning (the same words) when CPU trials with an explicit `train.threads`
    × `jobs` concurrent trials ask for more threads than there are cores."""
    threads = max((t.train.threads for t in suite.trials if t.train.device != "cuda"), default=0)
    return oversubscription_warning(threads, jobs, cores or usable_cores())


# --- show / plot -----------------------------------------------------------------------------


def find_run(path: Path, latest: bool, results_dir: Path) -> Path:
    """The run directory `path` names: a run itself; with `latest`, the run of a suite that
    started last, the suite given as its directory (`results/smoke`) or its name (`smoke`,
    under `results_dir`). Raises ValueError with what to type instead."""
    if not latest:
        if not (path / "trials").is_dir() and _runs(path):
            raise ValueError(
                f"{path} is a suite's directory with {len(_runs(path))} runs: add --latest, or "
                f"name one, e.g. {max(_runs(path), key=start_time)}"
            )
        return path
    suite_dir = path if path.is_dir() or path.parent != Path(".") else results_dir / path
    if (suite_dir / "trials").is_dir():
        suite_dir = suite_dir.parent  # a run was named: the latest run of its suite
    runs = _runs(suite_dir)
    if not runs:
        raise ValueError(f"no run under {suite_dir} (a directory holding <run_id>/run.json)")
    return max(runs, key=start_time)


def _runs(suite_dir: Path) -> list[Path]:
    try:
        return [p.parent for p in suite_dir.glob("*/run.json") if p.is_file()]
    except OSError:
        return []
