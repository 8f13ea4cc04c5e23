"""The training loop of a trial: one optimisation step per virtual batch, timed and logged.

Each step draws N = virtual_batch samples = N/2 identities × (ID photo, spot photo) and calls the
step function of `harness.build.build_step`. Only the step itself is timed (`StepTimer`); the
drift probe and logging are outside it.

Staleness, logged every `train.log_every` steps:
- memory_share, neg_age: from the objective's `last_stats` (fraction of mined negatives that
  came from the memory, their mean age in steps); None without a memory.
- drift: see `DriftProbe`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from harness.build import build_step
from harness.config import TrialConfig
from harness.data import IvSData, PairBatchSampler
from harness.measure import StepTimer
from harness.records import CURVE_COLUMNS, NonFiniteLoss

# curve columns summarised over the last steps into the trial's row
_SUMMARISED = ("memory_share", "neg_age", "drift")


def endless_batches(
    labels: torch.Tensor, domain: torch.Tensor, n: int, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """Index batches of `n` samples (n/2 identities × 2 photos, ID photo first), epoch after
    epoch."""
    sampler = PairBatchSampler(labels, n, gen, k=2, domain=domain)
    while True:
        yield from sampler


class MomentumSGD:
    """SGD with momentum and L2 weight decay, the update of `torch.optim.SGD` (dampening 0,
    no Nesterov):

        g = ∇p + wd·p;   b = g (first step) else μ·b + g;   p ← p − lr·b

    Why not `torch.optim.SGD`: constructing any torch optimizer imports `torch._dynamo`
    (1.5–4 s of CPU), paid again in every spawned trial process; on a 2-core CI machine that
    dominates a short trial. Checked against `torch.optim.SGD` in tests/test_run_train.py.
    """

    def __init__(
        self, params: list[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float
    ):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad.add(p, alpha=self.weight_decay) if self.weight_decay else p.grad
            if self.momentum:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = g.clone()
                else:
                    buf.mul_(self.momentum).add_(g)
                g = buf
            p.add_(g, alpha=-self.lr)


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


def train(
    cfg: TrialConfig,
    model: torch.nn.Module,
    data: IvSData,
    device: torch.device,
    progress: Callable[[dict[str, Any]], None] | None,
    deadline_check: Callable[[], None],
) -> tuple[dict[str, Any], dict[str, list[Any]], StepTimer]:
    """Train `model` for `train.steps` steps; returns (summary, curves, timer).

    summary: steps, final_loss, memory_share, neg_age, drift (means over the last 10% of the
    logged steps, at least one). curves: `CURVE_COLUMNS` lists of equal length.
    Raises `NonFiniteLoss` on a NaN/inf loss and `TrialTimeout` past the deadline.
    """
    tr, n = cfg.train, cfg.virtual_batch
    x_all, y_all = data.train.x, data.train.labels
    batches = endless_batches(y_all, data.train.domain, n, torch.Generator().manual_seed(cfg.seed))
    step_fn, params, _ = build_step(cfg, model, data, device)
    opt = MomentumSGD(params, lr=tr.lr, momentum=tr.momentum, weight_decay=tr.weight_decay)
    probe = DriftProbe(x_all[:PROBE_SIZE].to(device), cfg.method.memory, n, tr.log_every)
    timer = StepTimer(device)
    injector = Injector(cfg.debug.inject, cfg.debug.inject_step, deadline_check)
    curves: dict[str, list[Any]] = {k: [] for k in CURVE_COLUMNS}
    model.train()
    for step in range(tr.steps):
        deadline_check()
        injector.before_step(step)
        idx = next(batches)
        x, y = x_all[idx].to(device, non_blocking=True), y_all[idx].to(device, non_blocking=True)
        with timer.step():
            opt.zero_grad()
            loss, stats = step_fn(x, y)
            loss = injector.poison(step, loss)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"loss is {loss.item()} at step {step}")
            opt.step()
        if step % tr.log_every == 0 or step == tr.steps - 1:
            rate = n / timer.durations[-1]
            point = {
                "step": step,
                "loss": loss.item(),
                "samples_per_s": rate,
                "memory_share": stats.get("memory_share"),
                "neg_age": stats.get("neg_age"),
                "drift": probe(model),
            }
            for k, v in point.items():
                curves[k].append(v)
            if progress is not None:
                progress({"step": step, "loss": point["loss"], "samples_per_s": rate})
    tail = max(1, len(curves["step"]) // 10)
    summary = {"steps": tr.steps, "final_loss": _mean(curves["loss"][-tail:])}
    summary.update({k: _mean(curves[k][-tail:]) for k in _SUMMARISED})
    return summary, curves, timer


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None
