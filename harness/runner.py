"""Running a suite: the run directory, resume, the executor, and the run's provenance.

`run_suite` is what `hembench run` does apart from parsing options and printing the summary:

1. create the run directory (or find the one to resume, under its lock);
2. write `run.json` (suite text, environment, planned trial ids) — on resume, refuse when the
   suite or the execution settings changed what the trials are (their ids), remove temporary
   files a kill left behind and quarantine damaged trial files (they are re-run);
3. hand every trial that is not yet `ok` to the executor, writing each outcome as it arrives;
   a trial with `train.threads = 0` gets its share of the cores (cores // concurrent trials);
4. record the session's status counts in `run.json` — also when it ends by Ctrl-C (`ended:
   interrupted`, then the resume command is printed and KeyboardInterrupt re-raised) or by a
   results write error such as a full disk (`RunWriteError`, one line with the resume command).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from harness import results as res
from harness.config import TrialConfig, trial_timeout
from harness.envinfo import collect_env
from harness.executors import get_executor
from harness.executors.placement import (
    auto_threads,
    oversubscription_warning,
    usable_cores,
    visible_devices,
)
from harness.progress import RunProgress
from harness.records import TrialOutcome, TrialSpec, trial_label
from harness.suite import Suite


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
    allow_gpu_sharing: bool = False,
) -> RunResult:
    """Run (or resume) every trial of `suite` under `results_root/<suite>/<run_id>/`.

    Raises `RunInputError` or `results.RunDirError` (bad input: nothing is run),
    `results.RunWriteError` when results cannot be written (disk full: what was written is
    complete), KeyboardInterrupt after recording it; a failing trial is an outcome.
    """
    ids = suite.ids
    env = collect_env()
    if not env["gpus"] and any(t.train.device == "cuda" for t in suite.trials):
        raise RunInputError(f"{suite.path}: train.device = 'cuda' but no CUDA device is available")
    if resume:
        run_dir = res.RunDir.find(results_root, suite.name, run_id)
    else:
        run_dir = res.RunDir.create(results_root, suite.name, run_id)

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    with run_dir.lock():
        if resume:
            meta = run_dir.read_meta()
            _check_resumable(run_dir, meta, suite, ids)
            _repair(run_dir, say)
        else:
            meta = res.run_meta_start(suite.path, suite.text, env, ids, sys.argv)
        run_dir.write_meta(meta)
        done = run_dir.done() if resume else {}

        def limit_of(t: TrialConfig) -> float | None:
            return trial_timeout(suite.meta.timeout_s, t) if timeout_s is None else timeout_s

        specs = [
            TrialSpec(
                tid,
                suite.name,
                run_dir.run_id,
                t,
                i,
                suite.is_baseline(t),
                limit_of(t),
                run_dir=str(run_dir.path),
            )
            for i, (tid, t) in enumerate(zip(ids, suite.trials, strict=True))
            if done.get(tid) != "ok"
        ]
        gpus = visible_devices(len(env["gpus"]))
        specs = _assign_threads(specs, executor, jobs, in_process, gpus, allow_gpu_sharing, say)
        if not quiet:
            already = f" ({len(ids) - len(specs)} already ok)" if resume else ""
            say(f"run {run_dir.path}: {len(specs)} of {len(ids)} trials to run{already}")
        if env["gpus"] and not env["nvml"]["available"]:
            say(f"warning: NVML unavailable ({env['nvml']['reason']}); nvml_* columns will be null")
        hint = _resume_command(suite, results_root, run_dir)
        options = {"jobs": jobs, "in_process": in_process}
        if executor == "local":
            options |= {"gpus": gpus, "allow_gpu_sharing": allow_gpu_sharing}
        try:
            _execute(specs, run_dir, console, executor, options, quiet)
        except KeyboardInterrupt:
            _record_end(run_dir, resume, "interrupted")
            say(f"interrupted: resume with {hint}")
            raise
        except res.RunWriteError as exc:
            _record_end(run_dir, resume, "write error")
            raise res.RunWriteError(f"{exc}; after freeing space, resume with {hint}") from None
        except RunInputError:  # found by the executor before any trial ran (e.g. Ray capacity)
            if not resume:
                shutil.rmtree(run_dir.path, ignore_errors=True)  # nothing half-written
            raise
        statuses = _record_end(run_dir, resume, "finished", strict=True)
    return RunResult(run_dir, ids, statuses)


def _record_end(run_dir: res.RunDir, resume: bool, ended: str, strict: bool = False) -> dict:
    """Add this session to run.json (best effort unless `strict`); the statuses written."""
    statuses = run_dir.done()
    counts = {s: list(statuses.values()).count(s) for s in sorted(set(statuses.values()))}
    try:
        run_dir.write_meta(res.finish_meta(run_dir.read_meta(), counts, resume, ended))
    except res.RunDirError:
        if strict:
            raise
    return statuses


def _resume_command(suite: Suite, root: Path, run_dir: res.RunDir) -> str:
    where = "" if root == Path("results") else f" --results-dir {root}"
    return f"hembench run {suite.path} --resume --run-id {run_dir.run_id}{where}"


def _repair(run_dir: res.RunDir, say) -> None:
    stale, damaged = run_dir.repair()
    if stale:
        say(f"removed {len(stale)} temporary file(s) left by an interrupted write")
    for tid, why in damaged.items():
        say(f"warning: trial {tid}: {why}; moved to {run_dir.quarantine.name}/, re-running it")


def _assign_threads(
    specs: list[TrialSpec],
    executor: str,
    jobs: int | None,
    in_process: bool,
    gpus: list[str],
    allow_gpu_sharing: bool,
    say,
) -> list[TrialSpec]:
    """Give trials with `train.threads = 0` their share of the cores (local executor; Ray
    sets threads from `cpus_per_trial`), and warn when explicit threads oversubscribe."""
    if executor != "local" or not specs:
        return specs
    concurrent = 1 if in_process else min(jobs or 1, len(specs))
    cores = usable_cores()
    warning = oversubscription_warning(
        max(s.config.train.threads for s in specs), concurrent, cores
    )
    if warning:
        say(warning)
    cuda = any(s.config.train.device in ("cuda", "auto") for s in specs)
    if cuda and gpus and not in_process and not allow_gpu_sharing and (jobs or 1) > len(gpus):
        say(
            f"note: --jobs {jobs} but {len(gpus)} GPU(s): at most {len(gpus)} CUDA trial(s) "
            "run at once, one per GPU (allow_gpu_sharing to share)"
        )
    share = auto_threads(cores, concurrent)
    return [s if s.config.train.threads else replace(s, threads=share) for s in specs]


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
    options: dict,
    quiet: bool,
) -> None:
    labels = {s.trial_id: trial_label(s.config) for s in specs}
    steps = {s.trial_id: s.config.train.steps for s in specs}
    with RunProgress(console, len(specs), labels, quiet, steps) as prog:

        def on_result(outcome: TrialOutcome) -> None:
            run_dir.write_outcome(outcome)
            prog.done(outcome)

        get_executor(executor, **options).run(specs, on_result, prog.update)
