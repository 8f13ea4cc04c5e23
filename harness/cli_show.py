"""What the CLI prints and how it reports bad input, kept out of the commands (cli.py).

- `OneLineErrors`: typer's usage errors (a bad `--jobs`, an unknown option) as one `error:`
  line on stderr with exit code 2, instead of a boxed multi-line panel.
- `plan_rows`: the rows of `hembench plan` (variant and timeout columns) and the threads ×
  jobs oversubscription warning.
- `find_run`: the run directory that `show`/`plot` mean (a run, or `--latest` of a suite).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from typer.core import TyperGroup

from harness.config import TrialConfig, estimated_extra_mib
from harness.records import method_name
from harness.suite import Suite, trial_id

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
# keys shown in columns of their own (or in the method's name), and execution-only keys
_SHOWN = {
    "suite", "seed", "method.miner", "method.loss", "method.plb", "method.head",
    "method.memory", "method.virtual_batch", "train.device", "train.threads",
    "train.log_every", "train.nvml_interval_s", "train.workers",
}  # fmt: skip


def _flat(cfg: TrialConfig) -> dict[str, Any]:
    """The resolved config as dotted keys (method keys bare, head/objective params as
    `head.s`), without the keys of _SHOWN."""
    out: dict[str, Any] = {}
    for section, body in cfg.model_dump(mode="json").items():
        if not isinstance(body, dict):
            continue
        for key, value in body.items():
            if key in ("head_params", "objective_params"):
                prefix = key.removesuffix("_params")
                out.update({f"{prefix}.{k}": v for k, v in value.items()})
            elif f"{section}.{key}" not in _SHOWN:
                out[key if section == "method" else f"{section}.{key}"] = value
    return out


def variants(trials: list[TrialConfig]) -> list[str]:
    """Per trial, `key=value` of every swept key other than method, memory and N that varies
    across the suite (`train.lr=0.05 data.imbalance=1.5`); "" when none does."""
    flats = [_flat(t) for t in trials]
    keys = sorted(
        k for k in {k for f in flats for k in f} if len({repr(f.get(k)) for f in flats}) > 1
    )
    return [" ".join(f"{k}={f.get(k, 'default')}" for k in keys) for f in flats]


def plan_rows(suite: Suite) -> list[list[str]]:
    timeout = suite.meta.timeout_s
    limit = "none" if timeout is None else f"{timeout:g}"
    return [
        [
            str(i),
            trial_id(t),
            str(t.seed),
            method_name(t),
            str(t.method.memory),
            str(t.virtual_batch),
            variant,
            limit,
            f"{estimated_extra_mib(t):.1f}",
        ]
        for i, (t, variant) in enumerate(zip(suite.trials, variants(suite.trials), strict=True))
    ]


def oversubscription(suite: Suite, jobs: int, cores: int | None = None) -> str | None:
    """A warning when CPU trials with an explicit `train.threads` × `jobs` concurrent trials ask
    for more threads than there are cores (they then slow each other down, often 10× or more)."""
    cores = cores or os.cpu_count() or 1
    threads = max((t.train.threads for t in suite.trials if t.train.device != "cuda"), default=0)
    if threads * jobs <= cores:
        return None
    return (
        f"warning: train.threads = {threads} × --jobs {jobs} = {threads * jobs} threads on "
        f"{cores} cores: concurrent CPU trials will slow each other down; use threads = "
        f"{max(1, cores // jobs)} or threads = 0 (cores / concurrent trials)"
    )


# --- show / plot -----------------------------------------------------------------------------


def find_run(path: Path, latest: bool, results_dir: Path) -> Path:
    """The run directory `path` names: a run itself; with `latest`, the run of a suite that
    started last, the suite given as its directory (`results/smoke`) or its name (`smoke`,
    under `results_dir`). Raises ValueError with what to type instead."""
    if not latest:
        if not (path / "trials").is_dir() and _runs(path):
            raise ValueError(
                f"{path} is a suite's directory with {len(_runs(path))} runs: add --latest, or "
                f"name one, e.g. {max(_runs(path), key=_started)}"
            )
        return path
    suite_dir = path if path.is_dir() or path.parent != Path(".") else results_dir / path
    if (suite_dir / "trials").is_dir():
        suite_dir = suite_dir.parent  # a run was named: the latest run of its suite
    runs = _runs(suite_dir)
    if not runs:
        raise ValueError(f"no run under {suite_dir} (a directory holding <run_id>/run.json)")
    return max(runs, key=_started)


def _runs(suite_dir: Path) -> list[Path]:
    try:
        return [p.parent for p in suite_dir.glob("*/run.json") if p.is_file()]
    except OSError:
        return []


def _started(run: Path) -> tuple[str, float]:
    """Sort key of a run: the `start` in its run.json, then its mtime."""
    try:
        start = str(json.loads((run / "run.json").read_text()).get("start") or "")
    except (OSError, ValueError, AttributeError):
        start = ""
    try:
        mtime = (run / "run.json").stat().st_mtime
    except OSError:
        mtime = 0.0
    return start, mtime
