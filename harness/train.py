"""The training loop of a trial: one optimisation step per virtual batch, timed and logged.

Each step draws N = virtual_batch samples = N/K identities × K photos (K =
`train.samples_per_identity`, 2 = the ID photo and a spot photo) and calls the step function
of `harness.build.build_step`. Only the step itself is timed (`StepTimer`); the
drift probe and logging are outside it.

Staleness, logged every `train.log_every` steps:
- memory_share, neg_age: from the objective's `last_stats` (fraction of mined negatives that
  came from the memory, their mean age in steps); None without a memory.
- drift: see `DriftProbe`.

Data-parallel (inside a process group of W > 1 ranks, `harness.ddp`): every rank draws the same
global batch of N samples and trains on its share, rows [r·N/W, (r+1)·N/W) — whole identities,
rank order = the global batch's order; rank 0 alone probes drift, reports progress, writes
checkpoints and the model (every rank resumes from the same checkpoint file); a `[debug]` fault
is injected in the last rank only (the failure of a rank that does not report).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from harness import build
from harness.checkpoint import latest_checkpoint, save_checkpoint, save_model
from harness.config import TrialConfig
from harness.data import IvSData
from harness.live_memory import MIB, LiveTensorBytes, state_tensors
from harness.measure import RssWatermark, StepTimer
from harness.recipe import Precision, make_optimizer, make_scheduler
from harness.records import CURVE_COLUMNS, NonFiniteLoss, config_key
from mining.distributed import rank_and_world_size

# curve columns summarised over the last steps into the trial's row
_SUMMARISED = ("memory_share", "neg_age", "drift")


class DriftProbe:
    """How far the features moved over the age of the memory's oldest entries.

    drift = mean over a fixed probe set of 1 − cos(f_now, f_then), where f_then was computed
    `lag` logged steps earlier and lag·log_every ≈ ⌈M / N⌉ steps (at least one logged step):
    how stale the oldest negatives in a CB-HEM memory of M samples are.
    """

    def __init__(self, probe_x: torch.Tensor, memory: int, n: int, log_every: int):
        self.probe_x = probe_x
        lag = max(1, math.ceil(memory / n / log_every))
        self.history: deque[torch.Tensor] = deque(maxlen=lag + 1)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> float | None:
        """Embed the probe set now; the drift against `lag` calls ago (None until then)."""
        was_training = model.training
        model.eval()  # the probe must not touch BatchNorm running statistics
        self.history.append(F.normalize(model(self.probe_x).float(), dim=1))
        model.train(was_training)
        if len(self.history) == 1:
            return None
        return 1 - F.cosine_similarity(self.history[-1], self.history[0], dim=1).mean().item()

    def state_dict(self) -> dict[str, Any]:
        return {"history": [h.cpu() for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(h.to(self.probe_x.device) for h in state["history"])


class Injector:
    """The `[debug] inject` fault, fired at step `inject_step`."""

    def __init__(self, mode: str, step: int, deadline_check: Callable[[], None]):
        self.mode, self.step, self.deadline_check = mode, step, deadline_check

    def before_step(self, step: int) -> None:
        if step != self.step or self.mode in ("none", "nan"):
            return
        if self.mode == "exception":
            raise RuntimeError(f"injected exception at step {step}")
        if self.mode == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at step {step})")
        if self.mode == "hang":
            while True:  # only a kill (worker) or the cooperative deadline (in-process) ends it
                time.sleep(0.05)
                self.deadline_check()

    def poison(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self.mode == "nan" and step == self.step else loss


PROBE_SIZE = 64
#: untimed optimisation steps after training under `LiveTensorBytes` (`Trainer.measure_live`)
LIVE_PROBE_STEPS = 2


class Trainer:
    """One trial's training loop, phase by phase: `resume` (from the newest checkpoint),
    `step` (one optimisation step, the only timed part), `log` (a curve row), `checkpoint`,
    `finish` (save the model, summarise).

    The optimiser and schedule come from `harness.recipe`; the step function (metric objective,
    PLB or margin head) from `harness.build.build_step`. Checkpoints hold everything the
    remaining steps depend on — model, objective or head (CB-HEM memory with ages), optimiser,
    schedule, scaler, drift-probe history, RNG state and the curves so far — so that on CPU a
    resumed trial's curves and final metrics equal an uninterrupted run's exactly.
    """

    def __init__(
        self,
        cfg: TrialConfig,
        model: torch.nn.Module,
        data: IvSData,
        device: torch.device,
        progress: Callable[[dict[str, Any]], None] | None = None,
        deadline_check: Callable[[], None] = lambda: None,
        workdir: Path | None = None,
    ):
        self.cfg, self.model, self.data, self.device = cfg, model, data, device
        self.progress, self.workdir = progress, workdir
        tr, self.n = cfg.train, cfg.virtual_batch
        self.rank, self.world = rank_and_world_size()
        self.precision = Precision.of(tr, device)
        self.step_fn, params, self.stateful = build.build_step(
            cfg, model, data, device, self.precision
        )
        self.optimizer = make_optimizer(tr, params)
        self.scheduler = make_scheduler(tr, self.optimizer)
        self.probe = DriftProbe(data.probe_x(PROBE_SIZE).to(device), cfg.method.memory, self.n,
                                tr.log_every)  # fmt: skip
        self.timer = StepTimer(device)
        inject = cfg.debug.inject if self.rank == self.world - 1 else "none"
        self.injector = Injector(inject, cfg.debug.inject_step, deadline_check)
        self.deadline_check = deadline_check
        self.curves: dict[str, list[Any]] = {k: [] for k in CURVE_COLUMNS}
        self.start = 0
        self.rss: RssWatermark | None = None  # set when the first step is about to run
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.info: dict[str, Any] = {"resumed_from_step": None, "checkpoint_s": 0.0,
                                     "checkpoint_bytes": None}  # fmt: skip

    def run(self) -> tuple[dict[str, Any], dict[str, list[Any]], StepTimer]:
        """Train for `train.steps` steps; returns (summary, curves, timer).

        summary: steps, final_loss, memory_share, neg_age, drift (means over the last 10% of
        the logged steps, at least one), resumed_from_step, checkpoint_s, checkpoint_bytes.
        Raises `NonFiniteLoss` on a NaN/inf loss and `TrialTimeout` past the deadline.
        """
        self.resume()
        batches = self._batches = self.batches()
        self.model.train()
        self.rss = RssWatermark()  # setup ends here: what the steps add is training's
        for step in range(self.start, self.cfg.train.steps):
            self.deadline_check()
            self.injector.before_step(step)
            x, y = next(batches)
            loss, stats = self.step(step, x, y)
            self.log(step, loss, stats)
            self.checkpoint(step)
        return self.finish(), self.curves, self.timer

    # --- phases ---------------------------------------------------------------------------

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) on the device, batch after batch from `self.start` on (a resumed trial skips
        the batches it already trained on, at the index level: the sampler is seeded). With
        W > 1 ranks, this rank's share of each global batch (module docstring)."""
        tr, cuda = self.cfg.train, self.device.type == "cuda"
        workers = build.workers(self.cfg)
        share = self.n // self.world
        lo = self.rank * share
        for x, y in self.data.train_batches(
            self.n, tr.samples_per_identity, self.cfg.seed,
            workers=workers, pin_memory=cuda, start=self.start,
        ):  # fmt: skip
            if self.world > 1:
                x, y = x[lo : lo + share], y[lo : lo + share]
            if tr.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x.to(self.device, non_blocking=cuda), y.to(self.device, non_blocking=cuda)

    def step(
        self, step: int, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimisation step on the virtual batch (x, y); timed."""
        with self.timer.step():
            return self._update(step, x, y)

    def _update(
        self, step: int, x: torch.Tensor, y: torch.Tensor, schedule: bool = True
    ) -> tuple[torch.Tensor, dict[str, float]]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = self.step_fn(x, y)
        loss = self.injector.poison(step, loss)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at step {step}")
        self.precision.step(self.optimizer)
        if schedule:
            self.scheduler.step()
        return loss, stats

    def log(self, step: int, loss: torch.Tensor, stats: dict[str, float]) -> None:
        """A curve row every `train.log_every` steps and at the last step."""
        tr = self.cfg.train
        if step % tr.log_every and step != tr.steps - 1:
            return
        rate = self.n / self.timer.durations[-1]
        point = {
            "step": step,
            "loss": loss.item(),
            "samples_per_s": rate,
            "memory_share": stats.get("memory_share"),
            "neg_age": stats.get("neg_age"),
            "drift": self.probe(self.model) if self.rank == 0 else None,
        }
        for k, v in point.items():
            self.curves[k].append(v)
        if self.progress is not None:
            self.progress({"step": step, "loss": point["loss"], "samples_per_s": rate})

    def checkpoint(self, step: int) -> None:
        """Every `train.checkpoint_every` steps (not after the last: the row is written then)."""
        every, done = self.cfg.train.checkpoint_every, step + 1
        if not every or self.workdir is None or done % every or done == self.cfg.train.steps:
            return
        if self.rank or not getattr(self.stateful, "checkpointable", True):
            return  # rank 0 writes (the same state on every rank); a sharded head: no checkpoint
        t0 = time.perf_counter()
        self.info["checkpoint_bytes"] = save_checkpoint(self.workdir, done, self.state(done))
        self.info["checkpoint_s"] += time.perf_counter() - t0

    def finish(self) -> dict[str, Any]:
        if self.workdir is not None and self.cfg.train.save_model and self.rank == 0:
            save_model(self.workdir, self.model)
        tail = max(1, len(self.curves["step"]) // 10)
        summary = {"steps": self.cfg.train.steps, "final_loss": _mean(self.curves["loss"][-tail:])}
        summary.update({k: _mean(self.curves[k][-tail:]) for k in _SUMMARISED})
        return summary | self.info

    def measure_live(self, steps: int = LIVE_PROBE_STEPS) -> float | None:
        """Peak live tensor bytes of a training step, in MiB: `steps` more optimisation steps on
        the next batches under `LiveTensorBytes`, the peak over them (None off the CPU, with
        W > 1 ranks or `train.compile`: there the CUDA allocator peak is the figure).

        Counted: the training state at each step's start (model parameters, buffers and
        gradients, optimiser state, the objective's CB-HEM memory or the head's weights, the
        drift-probe set), the batch, and every storage an op allocates during the step while it
        lives (activations, saved tensors, the PLB cache, mining temporaries) — what the CUDA
        allocator holds when the data lives on the host. Not counted: the dataset, loader
        buffers, Python objects. The probe runs after training and evaluation, untimed, without
        advancing the LR schedule; it changes the model, so nothing may use it afterwards. A
        probe step that fails (a NaN loss one step too late, say) gives None and a warning: a
        measurement never fails a trained and evaluated trial.
        """
        if self.device.type != "cpu" or self.world > 1 or self.cfg.train.compile or steps < 1:
            return None
        try:
            return self._probe_live(steps) / MIB
        except Exception as exc:
            warnings.warn(f"peak_live_mib not measured: {type(exc).__name__}: {exc}", stacklevel=2)
            return None

    def _probe_live(self, steps: int) -> int:
        batches = self._batches or self.batches()
        dataset = state_tensors(self.data)
        tracker = LiveTensorBytes(self.device, ignore=dataset)  # a probe set may view the data
        roots = (self.model, self.optimizer, self.stateful, self.step_fn, self.probe)
        self.model.train()
        for i in range(steps):
            x, y = next(batches)
            tracker.hold([*state_tensors(*roots, exclude=(self.data,)), x, y])
            with tracker:
                self._update(self.cfg.train.steps + i, x, y, schedule=False)
            del x, y  # the next batch is not drawn on top of this one
        return tracker.peak

    # --- checkpoint state -----------------------------------------------------------------

    def state(self, done: int) -> dict[str, Any]:
        """Everything the remaining steps depend on, after `done` completed steps."""
        scaler = self.precision.scaler
        return {
            "config_key": config_key(self.cfg),
            "step": done,
            "model": self.model.state_dict(),
            "stateful": self.stateful.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "probe": self.probe.state_dict(),
            "rng": torch.get_rng_state(),
            "curves": {k: list(v) for k, v in self.curves.items()},
        }

    def resume(self) -> None:
        """Continue from the newest valid checkpoint of this configuration, if any."""
        state, note = latest_checkpoint(self.workdir, config_key(self.cfg))
        if note:
            warnings.warn(f"{self.workdir}: {note}", stacklevel=2)
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.stateful.load_state_dict(state["stateful"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state["scaler"] is not None:
            self.precision.scaler.load_state_dict(state["scaler"])
        self.probe.load_state_dict(state["probe"])
        torch.set_rng_state(state["rng"])
        self.curves = {k: list(state["curves"][k]) for k in CURVE_COLUMNS}
        self.start = self.info["resumed_from_step"] = int(state["step"])


def train(
    cfg: TrialConfig,
    model: torch.nn.Module,
    data: IvSData,
    device: torch.device,
    progress: Callable[[dict[str, Any]], None] | None,
    deadline_check: Callable[[], None],
    workdir: Path | None = None,
) -> tuple[dict[str, Any], dict[str, list[Any]], StepTimer]:
    """`Trainer(...).run()`: train `model` for `train.steps` steps (see `Trainer`)."""
    return Trainer(cfg, model, data, device, progress, deadline_check, workdir).run()


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None
