"""One trial: build, train, measure, evaluate — and the row it produces.

`run_trial(cfg)` does the work and raises on failure; `execute_trial(spec)` is what executors
call: it never raises, it classifies failures into the statuses of `harness.records` (`ok`,
`nan`, `oom`, `timeout`, `failed`). The row's columns are `harness.records.ROW_COLUMNS`.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness import build, ddp, measure
from harness.checkpoint import load_init
from harness.config import TrialConfig
from harness.data import IvSData
from harness.data.verification_sets import evaluate_bin
from harness.ivs_eval import ivs_verification
from harness.pretrain import pretrained_backbone
from harness.records import (
    NonFiniteLoss,
    Status,
    TrialOutcome,
    TrialSpec,
    TrialTimeout,
    base_row,
)
from harness.train import Trainer

Progress = Callable[[dict[str, Any]], None]


def execute_trial(
    spec: TrialSpec, progress: Progress | None = None, deadline: float | None = None
) -> TrialOutcome:
    """Run one trial and return its outcome; never raises (except KeyboardInterrupt).

    `deadline` (a `time.monotonic()` value) makes the trial stop itself cooperatively — used
    in-process, where nobody can kill it; worker processes are killed by their executor instead.
    """
    row = base_row(spec)
    try:
        measured, curves = run_trial(
            spec.config, progress, deadline, threads=spec.threads, workdir=spec.workdir,
            cache=spec.cache,
        )  # fmt: skip
    except Exception as exc:  # a failed trial is a result, not a crash of the suite
        status, err = classify(exc), error_text(exc)
        exc.__traceback__ = None  # release the failed trial's tensors before the next trial
        _empty_cuda_cache()
        row.update(status=status, error=err)
        return TrialOutcome(spec.trial_id, status, row, {}, err)
    row.update(measured, status="ok")
    return TrialOutcome(spec.trial_id, "ok", row, curves, None)


def classify(exc: BaseException) -> Status:
    """Status of a trial that raised `exc`."""
    if isinstance(exc, TrialTimeout):
        return "timeout"
    if isinstance(exc, NonFiniteLoss):
        return "nan"
    text = str(exc).lower()
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or any(
        m in text for m in ("out of memory", "can't allocate memory", "cannot allocate memory")
    ):  # CUDA, and host allocation failures (DefaultCPUAllocator, numpy)
        return "oom"
    return "failed"


def error_text(exc: BaseException, max_frames: int = 3) -> str:
    """`Type: message` plus the innermost traceback frames (enough to find the bug)."""
    frames = traceback.extract_tb(exc.__traceback__)[-max_frames:]
    where = " <- ".join(
        f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames)
    )
    return f"{type(exc).__name__}: {exc}" + (f" [at {where}]" if where else "")


def resolve_device(requested: str) -> torch.device:
    """`auto` -> cuda if available else cpu; `cuda` without a device is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA device is available")
    return torch.device(requested)


def run_trial(
    cfg: TrialConfig,
    progress: Progress | None = None,
    deadline: float | None = None,
    *,
    threads: int | None = None,
    workdir: Path | None = None,
    cache: Path | None = None,
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Build data, backbone and objective from `cfg`, train, measure and evaluate.

    `threads` overrides `train.threads` (the runner's choice for `threads = 0`); `workdir`
    holds the trial's checkpoints and saved model (None: nothing is written); `cache` holds
    results shared across trials and runs (the pretrain stage's weights; None: not cached).

    Returns (measurements, curves): the measured columns of the row and the per-step curves
    (`harness.records.CURVE_COLUMNS`). Raises on failure (`classify` maps errors to statuses).
    Deterministic on CPU for a given config (seeded data, init and batch order).
    """

    clock = [deadline]  # moved by the data preparation time: the budget is for training

    def deadline_check() -> None:
        if clock[0] is not None and time.monotonic() > clock[0]:
            raise TrialTimeout("trial ran past its deadline")

    def report(update: dict[str, Any]) -> None:
        if update.get("phase") == "prepared" and clock[0] is not None:
            clock[0] += update["prep_s"]
        if progress is not None:
            progress(update)

    if cfg.train.world_size > 1:  # N rank processes under torch.distributed (harness.ddp)
        return ddp.run_ranks(cfg, _run, progress, deadline, threads=threads, workdir=workdir,
                             error_text=error_text, cache=cache)  # fmt: skip
    previous_threads = torch.get_num_threads()
    threads = threads or cfg.train.threads
    if threads:  # e.g. 1 for tiny CPU models: OpenMP spin-waits thrash a loaded machine
        torch.set_num_threads(threads)
    try:
        return _run(cfg, report, deadline_check, workdir, cache)
    finally:
        torch.set_num_threads(previous_threads)  # in-process runs share the caller's setting


def _run(
    cfg: TrialConfig,
    progress: Progress | None,
    deadline_check: Callable[[], None],
    workdir: Path | None,
    cache: Path | None = None,
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    rank, world, backend = ddp.process_group()  # (0, 1, None) unless in a rank of harness.ddp
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())  # GPU = local rank
    torch.manual_seed(cfg.seed)
    t_prep = time.perf_counter()
    data = build.data(cfg, None if cache is None else cache.parent)
    model = build.model(cfg, data)
    if progress is not None:  # the trial's timeout counts from here (harness.executors.local)
        progress({"phase": "prepared", "prep_s": time.perf_counter() - t_prep})
    start: dict[str, Any] = {"init_sha256": None, "pretrain_key": None, "pretrain_s": None}
    if cfg.pretrain.steps:
        # ranks (world > 1) pretrain data-parallel, uncached: the cache's one-producer lock
        # would hold rank 1 while rank 0 waits for it in a collective
        shared = cache if world == 1 else None
        start |= pretrained_backbone(cfg, model.to(device), data, device, shared, progress)
        torch.manual_seed(cfg.seed)  # the same RNG state whether the pretrain ran or was cached
    elif cfg.model.init:
        start["init_sha256"] = load_init(model, cfg.model.init, cfg.model.init_ignore)
    model = _placed(model.to(device), cfg)

    measure.reset_allocator_peaks(device)
    nvml = measure.NvmlSampler(device.index or 0, cfg.train.nvml_interval_s)
    t0 = time.perf_counter()
    with nvml if device.type == "cuda" else contextlib.nullcontext():
        trainer = Trainer(cfg, model, data, device, progress, deadline_check, workdir)
        summary, curves, timer = trainer.run()
        measure.synchronize(device)
    assert trainer.rss is not None  # run() sets it before the first step
    out: dict[str, Any] = {
        **summary,
        "train_time_s": time.perf_counter() - t0,
        **measure.throughput_stats(timer.durations, cfg.virtual_batch, cfg.train.warmup_steps),
        **measure.allocator_peaks(device),
        **nvml.result(),
        **trainer.rss.result(),  # peak_rss_mib, rss_setup_mib, rss_net_mib
        **start,
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpu_index": _gpu_index(device),
        "world_size": world,
        "backend": backend,
    }
    if rank:  # rank 0 evaluates and reports the row
        return out, curves
    deadline_check()
    out |= data.quality
    out |= _evaluate(cfg, model, data, device)
    # last: the probe steps train the model further (untimed; the row's other columns are set)
    out["peak_live_mib"] = trainer.measure_live()
    return out, curves


def _gpu_index(device: torch.device) -> int | None:
    """The physical index of the trial's GPU (the executor narrows CUDA_VISIBLE_DEVICES to one)."""
    if device.type != "cuda":
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    current = torch.cuda.current_device()
    return (
        int(visible[current]) if current < len(visible) and visible[current].isdigit() else current
    )


def _placed(model: torch.nn.Module, cfg: TrialConfig) -> torch.nn.Module:
    """`train.channels_last` and `train.compile` applied to the backbone on its device."""
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not cfg.train.compile:
        return model
    backend = "inductor" if cfg.train.compile is True else cfg.train.compile
    return torch.compile(model, backend=backend)


@torch.no_grad()
def _evaluate(
    cfg: TrialConfig, model: torch.nn.Module, data: IvSData, device: torch.device
) -> dict[str, Any]:
    """IvS verification on the held-out pairs (`tar@<far>`, eer, auc, collapsed), and each
    `eval.sets` .bin set (`<stem>_acc`, `<stem>_tar@<far>`). Embeddings are normalised in
    float64 by the metrics, not here (a float32 normalisation distorts tiny or huge rows)."""
    model.eval()

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device)).float().cpu()

    id_emb, spot_emb = data.test_embeddings(embed, workers=build.workers(cfg))
    out: dict[str, Any] = ivs_verification(
        id_emb,
        spot_emb,
        cfg.eval.far,
        id_labels=data.test_id_labels,
        spot_labels=data.test_spot_labels,
        symmetric=data.test_symmetric,
    )
    if cfg.eval.sets:
        if len(data.input_shape) != 3:
            raise ValueError(
                f"eval.sets need an image model (input C×H×W); this data gives {data.input_shape}"
            )
        channels, size, _ = data.input_shape
        for path in cfg.eval.sets:
            out |= evaluate_bin(embed, path, image_size=size, channels=channels,
                                fars=cfg.eval.far, flip=cfg.eval.flip)  # fmt: skip
    return out


def _empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
