"""The training loop of a trial: one optimisation step per virtual batch, timed and logged.

Three step kinds, chosen by the resolved config's method:
- metric, plain:  emb = model(x); obj.before_loss; loss = obj(emb, y); backward; obj.after_loss
- metric, PLB:    loss = PseudoLargeBatch(model, obj, chunk=train.batch, mode)(x, y)
                  (PLB calls the objective's hooks itself, once per step with all N embeddings)
- head:           loss = cross_entropy(head(model(x), y), y)   (classification baseline)

Each step draws N = virtual_batch samples = N/2 identities × (ID photo, spot photo).
Only the step itself is timed (`StepTimer`); the drift probe and logging are outside.

Staleness, logged per `train.log_every` steps:
- memory_share, neg_age: from the objective's `last_stats` (fraction of mined negatives that
  came from the memory, their mean age in steps); None without a memory.
- drift: mean over a fixed probe set of 1 − cos(f_now, f_then), where f_then was computed
  `lag` logged steps earlier and lag·log_every ≈ the age of the oldest memory entry
  (⌈M / N⌉ steps, at least 1): how stale the oldest negatives in the memory are.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from harness.data import PairBatchSampler
from harness.measure import StepTimer

PROBE_SIZE = 64
# per-step curve columns (the second table of a trial; dtypes in results.CURVE_SCHEMA)
CURVE_COLUMNS: tuple[str, ...] = (
    "step",
    "loss",
    "samples_per_s",
    "memory_share",
    "neg_age",
    "drift",
)
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


def train(
    cfg: dict[str, Any],
    model: torch.nn.Module,
    data: Any,
    device: torch.device,
    progress: Callable[[dict[str, Any]], None] | None,
    deadline_check: Callable[[], None],
) -> tuple[dict[str, Any], dict[str, list[Any]], StepTimer]:
    """Train `model` for `train.steps` steps; returns (summary, curves, timer).

    summary: steps, final_loss, memory_share, neg_age, drift (means over the last 10% of the
    logged steps, at least one). curves: `CURVE_COLUMNS` lists of equal length.
    Raises `NonFiniteLoss` on a NaN/inf loss and `TrialTimeout` past the deadline.
    """
    from harness.trial import NonFiniteLoss

    m, tr = cfg["method"], cfg["train"]
    n = m["virtual_batch"] or tr["batch"]
    x_all, y_all = data.train.x, data.train.labels
    batches = endless_batches(
        y_all, data.train.domain, n, torch.Generator().manual_seed(cfg["seed"])
    )
    step_fn, params = _make_step(cfg, model, data.num_classes, data.train.labels, device)
    opt = MomentumSGD(params, lr=tr["lr"], momentum=tr["momentum"], weight_decay=tr["weight_decay"])

    probe_x = x_all[:PROBE_SIZE].to(device)  # fixed: the first training samples
    lag = max(1, math.ceil(m["memory"] / n / tr["log_every"]))
    probes: deque[torch.Tensor] = deque(maxlen=lag + 1)

    timer = StepTimer(device)
    injector = Injector(cfg["debug"]["inject"], cfg["debug"]["inject_step"], deadline_check)
    curves: dict[str, list[Any]] = {k: [] for k in CURVE_COLUMNS}
    model.train()
    for step in range(tr["steps"]):
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
        if step % tr["log_every"] == 0 or step == tr["steps"] - 1:
            probes.append(_embed(model, probe_x))
            drift = (
                1 - F.cosine_similarity(probes[-1], probes[0], dim=1).mean().item()
                if len(probes) > 1
                else None
            )
            rate = n / timer.durations[-1]
            row = {
                "step": step,
                "loss": loss.item(),
                "samples_per_s": rate,
                "memory_share": stats.get("memory_share"),
                "neg_age": stats.get("neg_age"),
                "drift": drift,
            }
            for k, v in row.items():
                curves[k].append(v)
            if progress is not None:
                progress({"step": step, "loss": row["loss"], "samples_per_s": rate})
    tail = max(1, len(curves["step"]) // 10)
    summary = {"steps": tr["steps"], "final_loss": _mean(curves["loss"][-tail:])}
    summary.update({k: _mean(curves[k][-tail:]) for k in _SUMMARISED})
    return summary, curves, timer


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


@torch.no_grad()
def _embed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()  # eval: the probe must not touch BatchNorm running statistics
    out = F.normalize(model(x).float(), dim=1)
    model.train(was_training)
    return out


def _make_step(
    cfg: dict[str, Any],
    model: torch.nn.Module,
    num_classes: int,
    train_labels: torch.Tensor,
    device: torch.device,
) -> tuple[
    Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    list[torch.nn.Parameter],
]:
    """The step function `(x, y) -> (loss, stats)` (gradients left in .grad) and the parameters
    to optimise."""
    m, tr = cfg["method"], cfg["train"]
    if m["head"]:
        from mining.heads import HEADS

        head = HEADS[m["head"]](cfg["model"]["embedding"], num_classes, **m["head_params"])
        if hasattr(head, "count_labels"):  # class-size margins (HSM) need the class counts
            head.count_labels(train_labels)
        head = head.to(device)

        def head_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            loss = F.cross_entropy(head(model(x), y), y)
            loss.backward()
            return loss.detach(), {}

        return head_step, [*model.parameters(), *head.parameters()]

    from harness.suite import objective_kwargs
    from mining import MetricObjective

    obj = MetricObjective(**objective_kwargs(m, cfg["seed"]))

    if m["plb"] != "off":
        from mining import PseudoLargeBatch

        plb = PseudoLargeBatch(model, obj, chunk_size=tr["batch"], mode=m["plb"])

        def plb_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            loss = plb(x, y)
            return loss.detach(), dict(obj.last_stats)

        return plb_step, list(model.parameters())

    def metric_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        emb = model(x)
        obj.before_loss(emb.detach(), y)
        loss = obj(emb, y)
        loss.backward()
        obj.after_loss(emb.detach(), y)
        return loss.detach(), dict(obj.last_stats)

    return metric_step, list(model.parameters())
