"""One trial: build, train, measure, evaluate — and the row it produces.

`run_trial(config)` does the work and raises on failure; `execute_trial(spec)` is what executors
call: it never raises, it classifies failures into statuses:

| status    | cause                                                                 |
| --------- | --------------------------------------------------------------------- |
| `ok`      | trained and evaluated                                                 |
| `nan`     | a non-finite loss (`NonFiniteLoss`)                                   |
| `oom`     | `torch.OutOfMemoryError` or an error text containing "out of memory"  |
| `timeout` | the trial ran past its deadline (`TrialTimeout`; executors also kill) |
| `failed`  | any other exception (its type, message and last traceback lines)      |

Row columns (one row per trial): identity (trial_id, trial_index, config_key, is_baseline,
suite, run_id, seed), config columns (`config_columns`), status, error, then the measurements of
`harness.train.train` (steps, timings, throughput, memory peaks, staleness means, final_loss)
and of evaluation (`tar@<far>` per eval FAR, eer, auc), plus device, gpu_name, host, git_commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from harness import measure
from harness.executors.base import TrialOutcome, TrialSpec
from harness.metrics import far_key


class TrialTimeout(Exception):
    """The trial ran past its deadline."""


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite."""


METRIC_COLUMNS: tuple[str, ...] = (
    "steps",
    "train_time_s",
    "samples_per_s",
    "samples_per_s_iqr",
    "step_ms_median",
    "peak_alloc_mib",
    "peak_reserved_mib",
    "nvml_peak_mib",
    "nvml_process_peak_mib",
    "peak_rss_mib",
    "eer",
    "auc",
    "memory_share",
    "neg_age",
    "drift",
    "final_loss",
)


def config_key(config: dict[str, Any]) -> str:
    """Hash of a resolved config without its seed: trials that differ only by seed share it."""
    rest = {k: v for k, v in config.items() if k != "seed"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def config_columns(config: dict[str, Any]) -> dict[str, Any]:
    """The flat config columns of a row, from a resolved config (`TrialConfig.model_dump()`)."""
    m, train = config["method"], config["train"]
    return {
        "method": method_name(config),
        "miner": None if m["head"] else m["miner"],
        "loss": None if m["head"] else m["loss"],
        "margin": None if m["head"] else m["margin"],
        "memory": m["memory"],
        "memory_weight": m["memory_weight"],
        "plb": m["plb"],
        "virtual_batch": m["virtual_batch"] or train["batch"],
        "batch": train["batch"],
        "head": m["head"],
        "steps_planned": train["steps"],
        "lr": train["lr"],
        "data_kind": config["data"]["kind"],
        "model_kind": config["model"]["kind"],
        "embedding": config["model"]["embedding"],
        "device_requested": train["device"],
        "inject": config["debug"]["inject"],
        "params": params_json(config),
    }


# resolved-config leaves that have a column of their own, or that do not change what is trained
_NOT_PARAMS = {
    "data.kind", "model.kind", "model.embedding", "train.steps", "train.batch", "train.lr",
    "train.device", "train.log_every", "train.nvml_interval_s", "train.threads",
    "method.miner", "method.loss", "method.margin", "method.memory", "method.memory_weight",
    "method.plb", "method.virtual_batch", "method.head",
}  # fmt: skip


def params_json(config: dict[str, Any]) -> str:
    """Every other parameter of the trial (data, model, train, method options, head/objective
    params) as canonical JSON of dotted keys, e.g. `{"data.imbalance": 1.5, "head.s": 16.0}`.

    `show` and `plot` use it to tell apart configurations that differ only in such a parameter
    (a sweep over `data.imbalance`, say), which would otherwise share a row."""
    flat: dict[str, Any] = {}
    for section in ("data", "model", "train", "method"):
        for key, value in config[section].items():
            if key in ("head_params", "objective_params"):
                prefix = "head" if key == "head_params" else "objective"
                flat.update({f"{prefix}.{k}": v for k, v in value.items()})
            elif f"{section}.{key}" not in _NOT_PARAMS:
                flat[f"{section}.{key}"] = value
    return json.dumps(flat, sort_keys=True, separators=(",", ":"))


def method_name(config: dict[str, Any]) -> str:
    """What is trained apart from memory size and virtual batch (the pivot axes of `show`)."""
    m = config["method"]
    if m["head"]:
        return f"head:{m['head']}"
    name = f"{m['miner']}+{m['loss']}"
    return name if m["plb"] == "off" else f"{name} plb:{m['plb']}"


def base_row(spec: TrialSpec) -> dict[str, Any]:
    """A row with the trial's identity and config and every measurement column set to None."""
    from harness.envinfo import git_state

    cfg = spec.config
    row: dict[str, Any] = {
        "trial_id": spec.trial_id,
        "trial_index": cfg.get("trial_index"),
        "config_key": config_key(_without_run_fields(cfg)),
        "is_baseline": bool(cfg.get("is_baseline", False)),
        "suite": spec.suite,
        "run_id": spec.run_id,
        "seed": spec.seed,
        **config_columns(cfg),
        "status": None,
        "error": None,
        **dict.fromkeys(METRIC_COLUMNS),
        **{far_key(f): None for f in cfg["eval"]["far"]},
        "device": None,
        "gpu_name": None,
        "host": socket.gethostname(),
        "git_commit": git_state()["commit"],
    }
    return row


def _without_run_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The config proper: drop the run bookkeeping the runner adds (index, baseline flag)."""
    return {k: v for k, v in config.items() if k not in ("trial_index", "is_baseline")}


def classify(exc: BaseException) -> str:
    """Status of a trial that raised `exc`."""
    if isinstance(exc, TrialTimeout):
        return "timeout"
    if isinstance(exc, NonFiniteLoss):
        return "nan"
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "oom"
    return "failed"


def error_text(exc: BaseException, max_frames: int = 3) -> str:
    """`Type: message` plus the innermost traceback frames (enough to find the bug)."""
    frames = traceback.extract_tb(exc.__traceback__)[-max_frames:]
    where = " <- ".join(
        f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames)
    )
    return f"{type(exc).__name__}: {exc}" + (f" [at {where}]" if where else "")


def execute_trial(
    spec: TrialSpec,
    progress: Callable[[dict[str, Any]], None] | None = None,
    deadline: float | None = None,
) -> TrialOutcome:
    """Run one trial and return its outcome; never raises (except KeyboardInterrupt).

    `deadline` (a `time.monotonic()` value) makes the trial stop itself cooperatively — used
    in-process, where nobody can kill it; worker processes are killed by their executor instead.
    """
    row = base_row(spec)
    try:
        measured, curves = run_trial(spec.config, progress=progress, deadline=deadline)
    except Exception as exc:  # a failed trial is a result, not a crash of the suite
        # release the failed trial's tensors before the next in-process trial
        status, err = classify(exc), error_text(exc)
        exc.__traceback__ = None
        _empty_cuda_cache()
        row.update(status=status, error=err)
        return TrialOutcome(spec.trial_id, status, row, {}, err)  # type: ignore[arg-type]
    row.update(measured, status="ok")
    return TrialOutcome(spec.trial_id, "ok", row, curves, None)


def resolve_device(requested: str) -> torch.device:
    """`auto` -> cuda if available else cpu; `cuda` without a device is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA device is available")
    return torch.device(requested)


def run_trial(
    config: dict[str, Any],
    progress: Callable[[dict[str, Any]], None] | None = None,
    deadline: float | None = None,
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Build data/model/objective from a resolved config, train, measure and evaluate.

    Returns (measurements, curves): the measurement columns of the row (see module doc) and the
    per-step curves. Raises on failure (see `classify` for how errors map to statuses).
    Deterministic on CPU for a given config (seeded data, init and batch order).
    """

    def deadline_check() -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise TrialTimeout("trial ran past its deadline")

    threads = config["train"]["threads"]
    previous_threads = torch.get_num_threads()
    if threads:  # e.g. 1 for tiny CPU models: OpenMP spin-waits thrash a loaded machine
        torch.set_num_threads(threads)
    try:
        return _run(config, progress, deadline_check)
    finally:
        torch.set_num_threads(previous_threads)  # in-process runs share the caller's setting


def _run(
    config: dict[str, Any],
    progress: Callable[[dict[str, Any]], None] | None,
    deadline_check: Callable[[], None],
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    from harness.data import build_data
    from harness.metrics import ivs_verification
    from harness.models import build_model
    from harness.train import train

    device = resolve_device(config["train"]["device"])
    torch.manual_seed(config["seed"])
    data = build_data(dict(config["data"]), config["seed"])
    mcfg = dict(config["model"])
    model = build_model(mcfg.pop("kind"), data.input_shape, mcfg.pop("embedding"), **mcfg).to(
        device
    )

    measure.reset_allocator_peaks(device)
    gpu_index = device.index if device.index is not None else 0
    nvml = measure.NvmlSampler(gpu_index, config["train"]["nvml_interval_s"])
    t0 = time.perf_counter()
    with nvml if device.type == "cuda" else contextlib.nullcontext():
        summary, curves, timer = train(config, model, data, device, progress, deadline_check)
        measure.synchronize(device)
    train_time = time.perf_counter() - t0
    vb = config["method"]["virtual_batch"] or config["train"]["batch"]
    out: dict[str, Any] = {
        **summary,
        "train_time_s": train_time,
        **measure.throughput_stats(timer.durations, vb, config["train"]["warmup_steps"]),
        **measure.allocator_peaks(device),
        **nvml.result(),
        "peak_rss_mib": measure.peak_rss_mib(),
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    deadline_check()
    id_emb, spot_emb = _embed_test(model, data, device)
    out.update(
        ivs_verification(
            id_emb,
            spot_emb,
            config["eval"]["far"],
            id_labels=data.test_id_labels,
            spot_labels=data.test_spot_labels,
            symmetric=data.test_symmetric,
        )
    )
    return out, curves


@torch.no_grad()
def _embed_test(
    model: torch.nn.Module, data: Any, device: torch.device, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (n, d) embeddings of the held-out ID and spot photos, on the CPU."""
    model.eval()

    def embed(x: torch.Tensor) -> torch.Tensor:
        parts = [
            F.normalize(model(x[i : i + chunk].to(device)).float(), dim=1).cpu()
            for i in range(0, len(x), chunk)
        ]
        return torch.cat(parts)

    id_emb = embed(data.test_id_x)
    # one sample set on both sides (all_pairs protocol): embed it once
    return id_emb, id_emb if data.test_spot_x is data.test_id_x else embed(data.test_spot_x)


def _empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
