"""The training recipe of a trial: optimiser, learning-rate schedule, mixed precision.

Schedules are one formula each, `lr(t) = lr · f(t)` for the step t = 0..T−1 about to run
(T = `train.steps`, w = `train.lr_warmup`), applied through `torch.optim.lr_scheduler.LambdaLR`:

    warm-up   f(t) = (t + 1) / w                              for t < w, then the schedule:
    constant  f(t) = 1
    step      f(t) = γ^(number of milestones ≤ t)
    cosine    f(t) = ½ · (1 + cos(π · (t − w) / (T − w)))
    poly      f(t) = (1 − (t − w) / (T − w))^power           (insightface's PolyScheduler)

Precision (`train.precision`): the backbone runs under `torch.autocast` with bfloat16 or
float16; embeddings are cast to float32 before any loss (mining and margins in fp32). fp16 adds
a `torch.amp.GradScaler`; PLB takes the autocast dtype and the scaler itself (its AMP contract).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from harness.config import TrainCfg

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_optimizer(train: TrainCfg, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """`torch.optim.SGD` (momentum, L2 weight decay) or `torch.optim.AdamW` (decoupled decay)."""
    params = [p for p in params if p.requires_grad]
    if train.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay
        )
    return torch.optim.SGD(
        params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
    )


def lr_factor(train: TrainCfg, t: int) -> float:
    """f(t) of the module docstring: the learning rate of step t is `train.lr · f(t)`."""
    w, total = train.lr_warmup, train.steps
    if t < w:
        return (t + 1) / w
    progress = (t - w) / max(1, total - w)
    if train.schedule == "step":
        return train.gamma ** sum(m <= t for m in train.milestones)
    if train.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if train.schedule == "poly":
        return (1.0 - progress) ** train.poly_power
    return 1.0


def make_scheduler(
    train: TrainCfg, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LambdaLR:
    """Steps once per optimisation step, after `optimizer.step()`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(train, t))


@dataclass
class Precision:
    """Autocast dtype (None: fp32) and the fp16 GradScaler (None otherwise) of a trial."""

    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    @classmethod
    def of(cls, train: TrainCfg, device: torch.device) -> Precision:
        dtype = _DTYPES[train.precision]
        if dtype is torch.float16 and device.type != "cuda":
            raise ValueError("train.precision = 'fp16' needs a CUDA device (use 'bf16' on CPU)")
        scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
        return cls(dtype, scaler)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The forward context of the backbone."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """`optimizer.step()`, through the scaler when there is one (it skips inf/NaN steps)."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
