"""What `hembench run` shows while trials run.

On a terminal: a rich progress bar over trials (count, elapsed, ETA) and, on a row of its own
so that a narrow terminal never cuts the count or the ETA, a live line for the latest trial
update (`step i/N`, loss, samples/s) — "starting…" until the first one arrives (spawning a
worker and importing torch take seconds). Elsewhere (CI logs, pipes): "starting N trials…" at
once, then one plain line per finished trial. `--quiet`: nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from harness.records import TrialOutcome


class _TwoRows(Progress):
    """A progress bar with the live trial line on a row of its own below it."""

    current = "starting…"

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield Text(self.current, no_wrap=True, overflow="ellipsis")


class RunProgress:
    """Context manager: `.update(trial_id, info)` for live updates, `.done(outcome)` per trial.

    `steps` (trial id -> planned steps) makes the live line read `step i/N`; a progress update
    that carries `steps` itself does too."""

    def __init__(
        self, console: Console, total: int, labels: dict[str, str], quiet: bool = False,
        steps: dict[str, int] | None = None,
    ):  # fmt: skip
        self.console = console
        self.total = total
        self.labels = labels
        self.steps = steps or {}
        self.quiet = quiet
        self.finished = 0
        self.live = console.is_terminal and not quiet
        self._progress: _TwoRows | None = None

    def __enter__(self) -> RunProgress:
        if self.live:
            self._progress = _TwoRows(
                TextColumn("[bold]trials"),
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("trials", total=self.total)
        elif not self.quiet and self.total:
            self.console.print(f"starting {self.total} trials…", highlight=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, trial_id: str, info: dict[str, Any]) -> None:
        if self._progress is None:
            return
        self._progress.current = live_line(
            trial_id, self.labels.get(trial_id, ""), info, self.steps
        )
        self._progress.refresh()

    def done(self, outcome: TrialOutcome) -> None:
        self.finished += 1
        row = outcome.row
        rate = row.get("samples_per_s")
        line = (
            f"[{self.finished}/{self.total}] {outcome.trial_id} {outcome.status:<7} "
            f"{self.labels.get(outcome.trial_id, '')}"
            + (f"  {rate:.0f} samples/s" if rate else "")
            + (f"  ({outcome.error})" if outcome.error else "")
        )
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
            self._progress.advance(self._task)
        elif not self.quiet:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def live_line(trial_id: str, label: str, info: dict[str, Any], steps: dict[str, int]) -> str:
    """`<id> <label>: step i/N loss 0.1234 5678 samples/s` (missing figures left out)."""
    step, total = info.get("step"), info.get("steps") or steps.get(trial_id)
    parts = [f"{trial_id} {label}:".replace(" :", ":")]
    if info.get("phase") == "prepared":
        parts.append(f"data ready in {info.get('prep_s', 0.0):.1f} s")
    elif info.get("phase") == "pretrain" and step is not None:
        parts.append(f"pretrain step {step}")  # its own line: the pretrain has its own N
    elif step is not None:
        parts.append(f"step {step}/{total}" if total else f"step {step}")
    if isinstance(info.get("loss"), (int, float)):
        parts.append(f"loss {info['loss']:.4f}")
    if isinstance(info.get("samples_per_s"), (int, float)):
        parts.append(f"{info['samples_per_s']:.0f} samples/s")
    return " ".join(parts)
