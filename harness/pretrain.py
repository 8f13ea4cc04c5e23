"""The pretrain stage of a trial (`[pretrain]`): train the backbone with a margin head on its own
data, once per (pretrain configuration, seed), and start the trial from those weights.

The pretrain is itself a `TrialConfig` (`pretrain_config`): the trial's model, the pretrain's
data, head and `[train]` overrides, the trial's seed. Its key (`pretrain_key`) hashes that
configuration without execution settings (device, threads, workers, logging), so every trial
and every later run that shares it reuses one result:

    <results root>/.cache/pretrain/<key>/model.pt

Concurrent trials wait on a lock file while one of them trains; the weights are written to a
temporary name and renamed, so a pretrain killed half-way is never reused (the next trial
trains it again).
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness import build
from harness.checkpoint import load_init
from harness.config import MethodCfg, PretrainCfg, TrialConfig, pretrain_train
from harness.data import IvSData
from harness.records import digest
from harness.train import train

# settings that change how fast a pretrain runs, not what it learns
_EXECUTION = {"device", "threads", "workers", "log_every", "nvml_interval_s", "warmup_steps"}


def pretrain_config(cfg: TrialConfig) -> TrialConfig:
    """The pretrain stage of `cfg` as a trial of its own (classification with `pretrain.head`)."""
    p = cfg.pretrain
    return cfg.model_copy(
        update={
            "data": p.data,
            "model": cfg.model.model_copy(update={"init": None, "init_ignore": []}),
            "train": pretrain_train(cfg),
            "method": MethodCfg(head=p.head, head_params=p.head_params),
            "pretrain": PretrainCfg(),
        }
    )


def pretrain_key(cfg: TrialConfig) -> str:
    """16 hex digits of SHA-256 over the pretrain configuration (seed included, execution
    settings excluded)."""
    pre = pretrain_config(cfg)
    doc = pre.model_dump(mode="json", include={"seed", "data", "model", "train", "method"})
    doc["train"] = {k: v for k, v in doc["train"].items() if k not in _EXECUTION}
    return digest(doc, 16)


def pretrained_backbone(
    cfg: TrialConfig,
    model: torch.nn.Module,
    data: IvSData,
    device: torch.device,
    cache: Path | None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Load the pretrained weights of `cfg` into `model` (training them first if no cached
    copy exists); returns the row's `pretrain_key`, `pretrain_s` (seconds spent training, 0
    when cached) and `init_sha256`. `cache` None: train without caching."""
    key = pretrain_key(cfg)
    if cache is None:
        seconds = _train(cfg, model, data, device, None, progress)
        return {"pretrain_key": key, "pretrain_s": seconds, "init_sha256": None}
    folder = cache / "pretrain" / key
    folder.mkdir(parents=True, exist_ok=True)
    weights, seconds = folder / "model.pt", 0.0
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one producer; the others wait, then reuse
        if not weights.is_file():
            seconds = _train(cfg, model, data, device, folder, progress)
    sha = load_init(model, str(weights), [])
    return {"pretrain_key": key, "pretrain_s": seconds, "init_sha256": sha}


def _train(
    cfg: TrialConfig,
    model: torch.nn.Module,
    data: IvSData,
    device: torch.device,
    folder: Path | None,
    progress: Callable[[dict[str, Any]], None] | None,
) -> float:
    """Train `model` in place on the pretrain stage (`folder` receives model.pt); seconds."""
    pre = pretrain_config(cfg)
    pre_data = build.data(pre, None if folder is None else folder.parents[2])
    if pre_data.input_shape != data.input_shape:
        raise ValueError(
            f"pretrain data give inputs {pre_data.input_shape}, the trial's data "
            f"{data.input_shape}: one backbone cannot take both"
        )

    def report(update: dict[str, Any]) -> None:
        if progress is not None:
            progress({**update, "phase": "pretrain"})

    t0 = time.perf_counter()
    train(pre, model, pre_data, device, report, lambda: None, folder)
    return time.perf_counter() - t0
