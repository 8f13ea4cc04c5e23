"""Running a suite: the run directory, resume, the executor, and the run's provenance.

`run_suite` is what `hembench run` does apart from parsing options and printing the summary:

1. create the run directory (or find the one to resume, under its lock);
2. write `run.json` (suite text, environment, planned trial ids) — on resume, refuse when the
   suite or the execution settings changed what the trials are (their ids);
3. hand every trial that is not yet `ok` to the executor, writing each outcome as it arrives;
4. record the session's status counts in `run.json`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from harness import results as res
from harness.envinfo import collect_env
from harness.executors import get_executor
from harness.progress import RunProgress
from harness.records import TrialOutcome, TrialSpec, trial_label
from harness.suite import Suite, trial_id


class RunInputError(ValueError):
    """The run cannot start as asked (no GPU for a CUDA suite, a resume that does not match)."""


@dataclass
class RunResult:
    run_dir: res.RunDir
    trial_ids: list[str]
    statuses: dict[str, str]  # trial_id -> status, every trial written so far

    @property
    def all_ok(self) -> bool:
        return all(self.statuses.get(t) == "ok" for t in self.trial_ids)


def run_suite(
    suite: Suite,
    results_root: Path,
    console: Console,
    *,
    resume: bool = False,
    run_id: str | None = None,
    executor: str = "local",
    jobs: int | None = None,
    in_process: bool = False,
    timeout_s: float | None = None,
    quiet: bool = False,
) -> RunResult:
    """Run (or resume) every trial of `suite` under `results_root/<suite>/<run_id>/`.

    Raises `RunInputError` or `results.RunDirError` (bad input: nothing is run); a failing
    trial is an outcome, not an exception.
    """
    ids = [trial_id(t) for t in suite.trials]
    env = collect_env()
    if not env["gpus"] and any(t.train.device == "cuda" for t in suite.trials):
        raise RunInputError(f"{suite.path}: train.device = 'cuda' but no CUDA device is available")
    if resume:
        run_dir = res.RunDir.find(results_root, suite.name, run_id)
    else:
        run_dir = res.RunDir.create(results_root, suite.name, run_id)
    with run_dir.lock():
        if resume:
            meta = run_dir.read_meta()
            _check_resumable(run_dir, meta, suite, ids)
        else:
            meta = res.run_meta_start(suite.path, suite.text, env, ids, sys.argv)
        run_dir.write_meta(meta)
        done = run_dir.done() if resume else {}
        limit = suite.meta.timeout_s if timeout_s is None else timeout_s
        specs = [
            TrialSpec(
                tid,
                suite.name,
                run_dir.run_id,
                t,
                i,
                suite.is_baseline(t),
                limit,
                run_dir=str(run_dir.path),
            )
            for i, (tid, t) in enumerate(zip(ids, suite.trials, strict=True))
            if done.get(tid) != "ok"
        ]
        if not quiet:
            already = f" ({len(ids) - len(specs)} already ok)" if resume else ""
            console.print(
                f"run {run_dir.path}: {len(specs)} of {len(ids)} trials to run{already}",
                highlight=False,
            )
        if env["gpus"] and not env["nvml"]["available"]:
            console.print(
                f"warning: NVML unavailable ({env['nvml']['reason']}); nvml_* columns will be null",
                highlight=False,
            )
        _execute(specs, run_dir, console, executor, jobs, in_process, quiet)
        statuses = run_dir.done()
        counts = {s: list(statuses.values()).count(s) for s in sorted(set(statuses.values()))}
        run_dir.write_meta(res.finish_meta(run_dir.read_meta(), counts, resume))
    return RunResult(run_dir, ids, statuses)


def _check_resumable(run_dir: res.RunDir, meta: dict, suite: Suite, ids: list[str]) -> None:
    """A resumed run must run the same trials: same suite text, same trial ids (an execution
    setting such as `--device` is part of each trial's config, hence of its id)."""
    if meta.get("suite_text") != suite.text:
        raise RunInputError(
            f"{run_dir.path}: the suite file changed since this run started; start a new run"
        )
    if meta.get("trial_ids") is not None and meta["trial_ids"] != ids:
        raise RunInputError(
            f"{run_dir.path}: execution settings (e.g. --device) changed the trial ids since "
            "this run started; resume with the run's original settings (see argv in run.json) "
            "or start a new run without --resume"
        )


def _execute(
    specs: list[TrialSpec],
    run_dir: res.RunDir,
    console: Console,
    executor: str,
    jobs: int | None,
    in_process: bool,
    quiet: bool,
) -> None:
    labels = {s.trial_id: trial_label(s.config) for s in specs}
    with RunProgress(console, len(specs), labels, quiet) as prog:

        def on_result(outcome: TrialOutcome) -> None:
            run_dir.write_outcome(outcome)
            prog.done(outcome)

        get_executor(executor, jobs=jobs, in_process=in_process).run(specs, on_result, prog.update)
