"""What a trial is and what it produces: the one definition of the trial record.

Torch-free, so that reading a run (`show`, `compare`) and the Ray driver never import torch.

- `TrialSpec`: one trial to run (typed config + where its result goes); `TrialOutcome`: what came
  back. Executors move specs and outcomes across processes; `harness.results` writes them.
- `ROW_COLUMNS`: every column of a trial's row and its dtype (plus `tar@<far>` columns, one per
  evaluated FAR, named by `far_key`); `CURVE_COLUMNS`: the per-step curve table.
- `METRICS`: per metric column, whether higher is better, display digits and label; `report`,
  `compare` and `bench` read it instead of guessing from names each in their own way.

Statuses of a trial:

| status    | cause                                                                 |
| --------- | --------------------------------------------------------------------- |
| `ok`      | trained and evaluated                                                 |
| `nan`     | a non-finite loss (`NonFiniteLoss`)                                   |
| `oom`     | out of GPU or host memory                                             |
| `timeout` | the trial ran past its deadline (`TrialTimeout`; executors also kill) |
| `failed`  | any other exception (its type, message and last traceback lines)      |
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl

from harness.config import TrialConfig
from harness.envinfo import git_state

Status = Literal["ok", "failed", "oom", "nan", "timeout"]


class TrialTimeout(Exception):
    """The trial ran past its deadline."""


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class TrialSpec:
    """One trial to run: its resolved config plus where its result belongs.

    `index` is the trial's position in the suite's grid (rows are sorted by it), `is_baseline`
    marks the suite's baseline configuration, `run_dir` is the run directory (where the trial
    keeps checkpoints and its saved model: `<run_dir>/work/<trial_id>/`; None: nothing is
    saved), `threads` the torch intra-op threads the runner chose for this trial when the suite
    leaves `train.threads = 0` (None: the config's setting), `timeout_s` is the wall-clock budget of the whole
    trial (None = no limit; inf and anything above 1e6 s (11.6 days) also mean no limit, since
    `multiprocessing`'s waits poll in int32 milliseconds and overflow above ~2.1e6 s). Pickles
    across processes and machines without importing torch.
    """

    trial_id: str
    suite: str
    run_id: str
    config: TrialConfig
    index: int = 0
    is_baseline: bool = False
    timeout_s: float | None = None
    run_dir: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.timeout_s is not None and not self.timeout_s <= _MAX_TIMEOUT_S:
            object.__setattr__(self, "timeout_s", None)

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def cache(self) -> Path | None:
        """`<results root>/.cache/`: results shared by trials and runs (pretrained weights)."""
        return None if self.run_dir is None else Path(self.run_dir).parent.parent / ".cache"

    @property
    def workdir(self) -> Path | None:
        """`<run_dir>/work/<trial_id>/`: the trial's checkpoints and saved model."""
        return None if self.run_dir is None else Path(self.run_dir) / "work" / self.trial_id


_MAX_TIMEOUT_S = 1e6


@dataclass
class TrialOutcome:
    """What a trial produced: `row` (column -> scalar, see `ROW_COLUMNS`), `curves` (per-step
    columns of equal length, see `CURVE_COLUMNS`), `error` text for non-ok statuses."""

    trial_id: str
    status: Status
    row: dict[str, Any]
    curves: dict[str, list[Any]] = field(default_factory=dict)
    error: str | None = None


# --- the row --------------------------------------------------------------------------------

_IDENTITY = {
    "trial_id": pl.String, "trial_index": pl.Int64, "config_key": pl.String,
    "is_baseline": pl.Boolean, "suite": pl.String, "run_id": pl.String, "seed": pl.Int64,
}  # fmt: skip
_CONFIG = {
    "method": pl.String, "miner": pl.String, "loss": pl.String, "margin": pl.Float64,
    "memory": pl.Int64, "memory_weight": pl.Float64, "plb": pl.String,
    "virtual_batch": pl.Int64, "batch": pl.Int64, "head": pl.String, "steps_planned": pl.Int64,
    "lr": pl.Float64, "data_kind": pl.String, "model_kind": pl.String, "embedding": pl.Int64,
    "device_requested": pl.String, "inject": pl.String, "params": pl.String,
}  # fmt: skip
_MEASURED = {
    "steps": pl.Int64, "train_time_s": pl.Float64, "samples_per_s": pl.Float64,
    "samples_per_s_iqr": pl.Float64, "step_ms_median": pl.Float64,
    "peak_alloc_mib": pl.Float64, "peak_reserved_mib": pl.Float64,
    "nvml_peak_mib": pl.Float64, "nvml_process_peak_mib": pl.Float64, "nvml_samples": pl.Int64,
    "peak_rss_mib": pl.Float64, "rss_setup_mib": pl.Float64, "rss_net_mib": pl.Float64,
    "peak_live_mib": pl.Float64, "eer": pl.Float64, "auc": pl.Float64,
    "collapsed": pl.Boolean, "memory_share": pl.Float64, "neg_age": pl.Float64,
    "drift": pl.Float64, "final_loss": pl.Float64, "resumed_from_step": pl.Int64,
    "checkpoint_s": pl.Float64, "checkpoint_bytes": pl.Int64, "init_sha256": pl.String,
    "pretrain_key": pl.String, "pretrain_s": pl.Float64,
    # data quality (harness.data.ivs.QUALITY_KEYS)
    "bad_images": pl.Int64, "single_image_identities": pl.Int64,
    "no_id_photo_identities": pl.Int64,
}  # fmt: skip
_ENV = {
    "device": pl.String, "gpu_name": pl.String, "gpu_index": pl.Int64, "world_size": pl.Int64,
    "backend": pl.String, "host": pl.String, "git_commit": pl.String,
}  # fmt: skip

#: Every row column -> dtype, in row order; `tar@<far>` columns and the .bin sets' `<stem>_acc`
#: and `<stem>_tar@<far>` (Float64) follow the measured ones. Nullable columns keep their dtype in failed trials, so run files always concatenate.
ROW_COLUMNS: dict[str, pl.DataType] = {
    **_IDENTITY, **_CONFIG, "status": pl.String, "error": pl.String, **_MEASURED, **_ENV,
}  # fmt: skip
#: The columns a successful trial measures (all null in a failed trial's row).
MEASURED_COLUMNS: tuple[str, ...] = tuple(_MEASURED)

#: Per-step curves: one row per logged step (`train.log_every`).
CURVE_COLUMNS: dict[str, pl.DataType] = {
    "step": pl.Int64, "loss": pl.Float64, "samples_per_s": pl.Float64,
    "memory_share": pl.Float64, "neg_age": pl.Float64, "drift": pl.Float64,
}  # fmt: skip


def column_dtype(column: str) -> pl.DataType:
    """dtype of a row column (`tar@*` and unknown measurements: Float64)."""
    return ROW_COLUMNS.get(column, pl.Float64)


def far_key(far: float) -> str:
    """Result-column name of TAR at `far`: `far_key(1e-3) == "tar@1e-3"`, `far_key(0.1) ==
    "tar@1e-1"`, `far_key(0.05) == "tar@5e-2"` (shortest mantissa, integer exponent)."""
    if not 0.0 < far <= 1.0:
        raise ValueError(f"far must be in (0, 1]; got {far!r}")
    mantissa, exponent = f"{far:e}".split("e")
    return f"tar@{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


# --- metric metadata ------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """How to read a metric column: direction, display digits, human label."""

    pattern: str  # fnmatch pattern of the column names it covers
    higher_is_better: bool
    digits: int
    label: str


#: The first pattern that matches a column wins (`*_per_s` before the `*_s` durations).
METRICS: tuple[Metric, ...] = (
    Metric("*_per_s", True, 0, "samples/s"),
    Metric("*tar@*", True, 3, "TAR"),  # IvS `tar@1e-3` and .bin sets' `lfw_tar@1e-3`
    Metric("auc", True, 3, "AUC"),
    Metric("*acc*", True, 3, "accuracy"),
    # memory columns: docs/methods.md §7
    Metric("peak_live_mib", False, 1, "peak live tensor MiB"),
    Metric("peak_mib", False, 1, "peak MiB"),  # harness.report.with_peak
    Metric("rss_net_mib", False, 0, "peak RSS above setup, MiB"),
    Metric("rss_setup_mib", False, 0, "RSS after setup, MiB"),
    Metric("*_mib", False, 0, "peak MiB"),
    Metric("*_bytes", False, 0, "bytes"),
    Metric("eer", False, 3, "EER"),
    Metric("*_s", False, 1, "seconds"),
)


def metric_info(column: str) -> Metric | None:
    """The `Metric` of a column, or None if the column is not a known metric."""
    return next((m for m in METRICS if fnmatch.fnmatchcase(column, m.pattern)), None)


# --- building a row from a config -----------------------------------------------------------


def method_name(cfg: TrialConfig) -> str:
    """What is trained apart from memory size and virtual batch (the pivot axes of `show`)."""
    m = cfg.method
    if m.head:
        return f"head:{m.head}"
    name = f"{m.miner}+{m.loss}"
    return name if m.plb == "off" else f"{name} plb:{m.plb}"


def trial_label(cfg: TrialConfig) -> str:
    """`method_name` plus memory and N, e.g. `batch_hard+triplet plb:exact M=1024 N=512`."""
    parts = [method_name(cfg)]
    if cfg.method.memory:
        parts.append(f"M={cfg.method.memory}")
    if cfg.method.plb != "off":
        parts.append(f"N={cfg.virtual_batch}")
    return " ".join(parts)


def digest(doc: Any, length: int = 12) -> str:
    """First `length` hex digits of SHA-256 over the canonical JSON of `doc` (sorted keys, no
    spaces): the one hash behind trial ids, config keys and pretrain keys."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def config_key(cfg: TrialConfig) -> str:
    """Hash of a resolved config without its seed: trials that differ only by seed share it."""
    return digest(cfg.model_dump(mode="json", exclude={"seed"}))


def config_columns(cfg: TrialConfig) -> dict[str, Any]:
    """The flat config columns of a row (`_CONFIG`)."""
    m, train = cfg.method, cfg.train
    metric = None if m.head else m  # miner/loss/margin mean nothing for a margin head
    return {
        "method": method_name(cfg),
        "miner": metric and metric.miner,
        "loss": metric and metric.loss,
        "margin": metric and metric.margin,
        "memory": m.memory,
        "memory_weight": m.memory_weight,
        "plb": m.plb,
        "virtual_batch": cfg.virtual_batch,
        "batch": train.batch,
        "head": m.head,
        "steps_planned": train.steps,
        "lr": train.lr,
        "data_kind": cfg.data.kind,
        "model_kind": cfg.model.kind,
        "embedding": cfg.model.embedding,
        "device_requested": train.device,
        "inject": cfg.debug.inject,
        "params": params_json(cfg),
    }


# resolved-config leaves that have a column of their own, or that do not change what is trained
_NOT_PARAMS = {
    "data.kind", "model.kind", "model.embedding", "train.steps", "train.batch", "train.lr",
    "train.device", "train.log_every", "train.nvml_interval_s", "train.threads",
    "method.miner", "method.loss", "method.margin", "method.memory", "method.memory_weight",
    "method.plb", "method.virtual_batch", "method.head", "train.checkpoint_every",
    "train.save_model", "train.workers",
}  # fmt: skip


def params_json(cfg: TrialConfig) -> str:
    """Every other parameter of the trial (data, model, train, method options, head/objective
    params) as canonical JSON of dotted keys, e.g. `{"data.imbalance": 1.5, "head.s": 16.0}`.

    `show` and `plot` use it to tell apart configurations that differ only in such a parameter
    (a sweep over `data.imbalance`, say), which would otherwise share a row."""
    flat: dict[str, Any] = {}
    for section in ("data", "model", "train", "method"):
        for key, value in getattr(cfg, section).model_dump(mode="json").items():
            if key in ("head_params", "objective_params"):
                prefix = "head" if key == "head_params" else "objective"
                flat.update({f"{prefix}.{k}": v for k, v in value.items()})
            elif f"{section}.{key}" not in _NOT_PARAMS:
                flat[f"{section}.{key}"] = value
    flat.update(_pretrain_params(cfg))
    return json.dumps(flat, sort_keys=True, separators=(",", ":"))


def _pretrain_params(cfg: TrialConfig) -> dict[str, str]:
    """The `[pretrain]` stage as one readable key, so that `show` and `plot` tell a from-scratch
    block and each pretrain apart: {"pretrain": "none"} or {"pretrain": "arcface(m=0.3,s=32.0)
    3000 steps #1f2e3d"}, the # part a digest of the pretrain's data and train overrides."""
    pre = cfg.pretrain
    if not pre.steps:
        return {"pretrain": "none"}
    params = ",".join(f"{k}={v}" for k, v in sorted(pre.head_params.items()))
    head = f"{pre.head}({params})" if params else pre.head
    setup = digest({"data": pre.data.model_dump(mode="json"), "train": pre.train}, 6)
    return {"pretrain": f"{head} {pre.steps} steps #{setup}"}


def base_row(spec: TrialSpec) -> dict[str, Any]:
    """A row with the trial's identity and config and every measurement column set to None."""
    cfg = spec.config
    return {
        "trial_id": spec.trial_id,
        "trial_index": spec.index,
        "config_key": config_key(cfg),
        "is_baseline": spec.is_baseline,
        "suite": spec.suite,
        "run_id": spec.run_id,
        "seed": cfg.seed,
        **config_columns(cfg),
        "status": None,
        "error": None,
        **dict.fromkeys(MEASURED_COLUMNS),
        **{far_key(f): None for f in cfg.eval.far},
        **dict.fromkeys(_ENV),
        "world_size": cfg.train.world_size,  # also in failed rows (the rank count asked for)
        "host": socket.gethostname(),
        "git_commit": git_state()["commit"],
    }


def failure_outcome(spec: TrialSpec, status: Status, error: str) -> TrialOutcome:
    """The outcome of a trial that produced no measurements (crash, kill, timeout, ...): its row
    still carries the trial's identity and config, so that `show` and `--resume` can see it."""
    row = base_row(spec)
    row.update(status=status, error=error)
    return TrialOutcome(trial_id=spec.trial_id, status=status, row=row, error=error)


def timeout_outcome(
    spec: TrialSpec, elapsed_s: float, last: dict[str, Any] | None = None
) -> TrialOutcome:
    """The outcome of a trial stopped after `elapsed_s` seconds (counted from the end of its
    data preparation) for exceeding `spec.timeout_s`; `last` is its last progress update, which
    says how far it got."""
    where = "during data preparation"
    if last and "step" in last:
        phase = "pretrain" if last.get("phase") == "pretrain" else "training"
        where = f"in {phase} after step {last['step']}"
    elif last and last.get("phase") == "prepared":
        where = "after data preparation, before the first logged step"
    return failure_outcome(
        spec, "timeout",
        f"timed out after {elapsed_s:.1f} s (limit {spec.timeout_s} s) {where}",
    )  # fmt: skip
