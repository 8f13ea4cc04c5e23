"""What `hembench run` shows while trials run.

On a terminal: a rich progress bar over trials with ETA and a live line for the latest trial
update (step, loss, samples/s). Elsewhere (CI logs, pipes) or with `--quiet`: no bar and no
live line; one plain line per finished trial (none with `--quiet`), so logs stay readable.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from harness.records import TrialOutcome


class RunProgress:
    """Context manager: `.update(trial_id, info)` for live updates, `.done(outcome)` per trial."""

    def __init__(self, console: Console, total: int, labels: dict[str, str], quiet: bool = False):
        self.console = console
        self.total = total
        self.labels = labels
        self.quiet = quiet
        self.finished = 0
        self.live = console.is_terminal and not quiet
        self._progress: Progress | None = None

    def __enter__(self) -> RunProgress:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]trials"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[current]}"),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("trials", total=self.total, current="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, trial_id: str, info: dict[str, Any]) -> None:
        if self._progress is None:
            return
        line = (
            f"{trial_id} {self.labels.get(trial_id, '')}: step {info.get('step')} "
            f"loss {info.get('loss', float('nan')):.4f} {info.get('samples_per_s', 0):.0f} samples/s"
        )
        self._progress.update(self._task, current=line)

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
