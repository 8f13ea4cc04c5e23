"""The suite schema: pydantic models of every section of a suite file and of one resolved trial.

Torch-free on purpose: `show`, `plan` and `validate` parse configs without building anything.
Each default lives here once; workers receive the typed `TrialConfig` (pydantic models pickle).
What the library accepts beyond the schema (registry names, head parameters, objective options,
data keys) is checked by building the objects, in `harness.build.check_trial`.

Sections (docs/suites.md has the reference):

| model         | suite section   | holds                                                   |
| ------------- | --------------- | ------------------------------------------------------- |
| `SuiteMeta`   | `[suite]`       | name, seeds, per-trial timeout                          |
| `DataCfg`     | `[data]`        | `kind` + free parameters of that data kind              |
| `ModelCfg`    | `[model]`       | `kind`, `embedding` + free parameters of that model     |
| `TrainCfg`    | `[train]`       | steps, batch, optimiser settings, device, logging       |
| `MethodCfg`   | `[baseline]`    | what is trained: miner/loss/memory/PLB or a margin head |
| `EvalCfg`     | `[eval]`        | FARs of the TAR columns                                 |
| `DebugCfg`    | `[debug]`       | an injected fault, to test failure handling             |
| `TrialConfig` | (one grid cell) | all of the above, resolved, plus the seed               |
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from harness.config.base import (
    MAX_NAME,
    MAX_SEED,
    PLB_MODES,
    SECTIONS,
    SUITE_NAME_RE,
    Param,
    Scalar,
    _Open,
    _Strict,
)
from harness.config.train import OPTIMIZERS, PRECISIONS, SCHEDULES, TrainCfg

__all__ = [
    "MAX_NAME", "MAX_SEED", "OPTIMIZERS", "PLB_MODES", "PRECISIONS", "SCHEDULES", "SECTIONS",
    "SUITE_NAME_RE", "DataCfg", "DebugCfg", "EvalCfg", "MethodCfg", "ModelCfg", "Param",
    "PretrainCfg", "Scalar", "SuiteFile", "SuiteMeta", "TrainCfg", "TrialConfig",
    "estimated_extra_mib", "pretrain_train", "trial_timeout",
]  # fmt: skip


class SuiteMeta(_Strict):
    name: str = Field(
        max_length=MAX_NAME, description="[a-z0-9_-]+; becomes the results directory name"
    )
    seeds: list[int] = Field(
        default=[0],
        min_length=1,
        max_length=1000,
        description="one trial per seed and grid cell; show reports mean ± 95% CI over seeds",
    )
    description: str = Field(default="", description="free text, kept in run.json")
    timeout_s: float | Literal["auto"] | None = Field(
        default="auto",
        description="per-trial wall-clock limit in seconds, counted from the end of data "
        "preparation (inf, or above 1e6, = no limit); auto = no limit for long trials (image "
        "data, an iresnet, or > 10,000 steps with its pretrain), else 600",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SUITE_NAME_RE.fullmatch(v):
            raise ValueError(
                f"suite name {v!r} must match [a-z0-9_-]+ (it becomes a directory name)"
            )
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if any(not 0 <= s <= MAX_SEED for s in v) or len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct integers in [0, 2^63 - 1]; got {v}")
        return v

    @field_validator("timeout_s", mode="before")
    @classmethod
    def _no_limit(cls, v: Any) -> Any:
        """inf means no limit (None); NaN and values ≤ 0 are refused (NaN passes `gt`)."""
        if isinstance(v, float | int) and not isinstance(v, bool):
            if not v > 0:
                raise ValueError(f"timeout_s must be > 0, inf or 'auto'; got {v}")
            if math.isinf(v):
                return None
        return v


class DataCfg(_Open):
    """`kind` plus free parameters for `harness.data.build_data`."""

    kind: str = Field(default="synthetic_ivs", description="data kind (keys: see below)")


class ModelCfg(_Open):
    """`kind`, `embedding` plus free parameters for `harness.models.build_model`."""

    kind: str = Field(default="mlp", description="backbone (parameters: see below)")
    embedding: int = Field(default=128, ge=2, le=65536, description="embedding dimension d")
    init: str | None = Field(
        default=None,
        description="pretrained weights: a state_dict .pt file or a hembench checkpoint/model.pt",
    )
    init_ignore: list[str] = Field(
        default_factory=list,
        description="fnmatch patterns of state_dict keys not loaded from `init` (e.g. 'fc.*')",
    )


class EvalCfg(_Strict):
    far: list[float] = Field(
        default=[1e-1, 1e-2, 1e-3],
        min_length=1,
        description="FARs of the TAR@FAR columns, in (0, 1); FAR f needs ≥ 1/f impostor pairs",
    )
    sets: list[str] = Field(
        default_factory=list,
        description="insightface .bin verification sets (LFW, CFP-FP, AgeDB-30): "
        "columns <stem>_acc (10-fold) and <stem>_tar@<far>; image models only",
    )
    flip: bool = Field(default=False, description="test-time flip fusion for the .bin sets")

    @field_validator("far")
    @classmethod
    def _range(cls, v: list[float]) -> list[float]:
        if any(not (0 < f < 1) for f in v):
            raise ValueError("far values must lie in (0, 1), e.g. [1e-1, 1e-2, 1e-3]")
        return sorted(set(v), reverse=True)


class DebugCfg(_Strict):
    inject: Literal["none", "exception", "nan", "oom", "hang"] = Field(
        default="none", description="fault injected into every trial, to test failure paths"
    )
    inject_step: int = Field(default=1, ge=0, description="step at which the fault is injected")


class MethodCfg(_Strict):
    """What is trained: a metric objective (miner + loss + CB-HEM memory + PLB) or a margin head.

    - `memory`: CB-HEM memory size in samples (0 = in-batch mining only).
    - `plb`: pseudo large batch mode; `virtual_batch` N must be a multiple of `train.batch`
      (the chunk size); None means N = batch.
    - `head`: a margin-head name switches the trial to classification (miner/loss unused).
    """

    miner: str = Field(default="batch_hard", description="hard-example miner (mining.MINERS)")
    loss: str = Field(default="triplet", description="metric loss (mining.LOSSES)")
    margin: float = Field(default=0.2, ge=0, le=4, description="margin of the metric loss")
    memory: int = Field(
        default=0,
        ge=0,
        le=100_000_000,
        description="CB-HEM memory size M in samples (0 = in-batch)",
    )
    memory_weight: float = Field(
        default=1.0, ge=0, le=100, description="w in loss = L_batch + w·L_memory"
    )
    memory_warmup: int = Field(default=0, ge=0, description="steps before the memory is mined")
    enqueue: Literal["before", "after"] = Field(
        default="after", description="enqueue the batch into the memory before or after the loss"
    )
    in_batch: bool = Field(default=True, description="also mine negatives within the batch")
    plb: Literal["off", "exact", "select", "chunk_loss"] = Field(
        default="off", description="pseudo large batch mode (chunks of train.batch)"
    )
    virtual_batch: int | None = Field(
        default=None,
        ge=2,
        le=10_000_000,
        description="PLB virtual batch N, a multiple of train.batch (unset: N = batch)",
    )
    head: str | None = Field(
        default=None, description="margin head (mining.HEADS); set: classification"
    )
    head_params: dict[str, Scalar] = Field(
        default_factory=dict, description="keyword parameters of the head, e.g. {s = 64.0}"
    )
    objective_params: dict[str, Scalar] = Field(
        default_factory=dict,
        description="extra keyword arguments of mining.MetricObjective",
    )


class PretrainCfg(_Strict):
    """`[pretrain]`: train the trial's backbone first with a margin head on its own data
    (e.g. many-shot web photos of other identities), once per (pretrain config, seed), cached
    under the results root and reused by every trial and run that shares it
    (`harness.pretrain`). `steps = 0` (the default) means no pretrain.

    `train` overrides keys of the trial's `[train]` for the pretrain (lr, batch, schedule, ...);
    checkpointing is off and the execution keys (device, threads, workers) are the trial's.
    """

    steps: int = Field(default=0, ge=0, le=10_000_000, description="0 = no pretrain stage")
    data: DataCfg = Field(default_factory=DataCfg, description="the pretrain's own [data]")
    head: str = Field(default="arcface", description="margin head of the pretrain")
    head_params: dict[str, Scalar] = Field(
        default_factory=dict, description="keyword parameters of the pretrain's head"
    )
    train: dict[str, Param] = Field(
        default_factory=dict, description="[train] keys that differ for the pretrain"
    )


class TrialConfig(_Strict):
    """A fully resolved trial: everything `harness.trial.run_trial` needs, plus the seed."""

    suite: str
    seed: int = Field(ge=0, le=MAX_SEED)
    data: DataCfg
    model: ModelCfg
    train: TrainCfg
    method: MethodCfg
    eval: EvalCfg
    debug: DebugCfg
    pretrain: PretrainCfg = Field(default_factory=PretrainCfg)

    @property
    def virtual_batch(self) -> int:
        """N: samples per optimisation step (the PLB virtual batch, or the batch without PLB)."""
        return self.method.virtual_batch or self.train.batch

    @model_validator(mode="after")
    def _combination(self) -> TrialConfig:
        """Cross-field rules of the schema (the library's own checks run in `build`)."""
        m, batch, vb = self.method, self.train.batch, self.virtual_batch
        problems = []
        if vb % batch:
            problems.append(
                f"virtual_batch={vb} must be a multiple of train.batch={batch} (the PLB chunk size)"
            )
        if m.plb == "off" and vb != batch:
            problems.append(
                f"plb='off' needs virtual_batch == train.batch ({batch}); got {vb} "
                f"(use plb = one of {', '.join(PLB_MODES[1:])})"
            )
        if m.head is None and m.head_params:
            problems.append(
                f"head_params {sorted(m.head_params)} given without a head (set head = ...)"
            )
        if m.head is not None:
            if m.objective_params:
                problems.append(
                    f"objective_params {sorted(m.objective_params)} mean nothing with "
                    f"head={m.head!r} (classification)"
                )
            if m.memory:
                problems.append(f"head={m.head!r} (classification) needs memory=0; got {m.memory}")
            if m.plb != "off":
                problems.append(
                    f"head={m.head!r} needs plb='off'; got {m.plb!r}: a margin head's loss is a "
                    "sum over samples, so a large batch brings no harder negatives — PLB would only "
                    "accumulate gradients (raise train.batch instead)"
                )
        if self.pretrain.steps:
            if self.model.init is not None:
                problems.append("model.init and a [pretrain] stage both set the initial weights")
            try:
                pretrain_train(self)
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                problems.append(f"pretrain.train: {exc}".replace("\n", " "))
        if problems:
            raise ValueError("; ".join(problems))
        return self


def pretrain_train(cfg: TrialConfig) -> TrainCfg:
    """The `[train]` of the pretrain stage: the trial's, with `pretrain.train` overrides and
    `pretrain.steps`, checkpoints off (a pretrain is short and cached as a whole)."""
    unknown = sorted(set(cfg.pretrain.train) - set(TrainCfg.model_fields))
    if unknown:
        raise ValueError(f"unknown [train] keys {unknown}")
    return TrainCfg.model_validate(
        {
            **cfg.train.model_dump(),
            **cfg.pretrain.train,
            "steps": cfg.pretrain.steps,
            "checkpoint_every": 0,
            "save_model": True,
        }
    )


class SuiteFile(_Strict):
    """The top level of a suite file (sections only; sweeps are checked per combination)."""

    suite: SuiteMeta
    data: DataCfg = Field(default_factory=DataCfg)
    model: ModelCfg = Field(default_factory=ModelCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    baseline: MethodCfg = Field(default_factory=MethodCfg)
    sweep: list[dict[str, Any]] = Field(default_factory=list)
    eval: EvalCfg = Field(default_factory=EvalCfg)
    debug: DebugCfg = Field(default_factory=DebugCfg)
    pretrain: PretrainCfg = Field(default_factory=PretrainCfg)


def estimated_extra_mib(cfg: TrialConfig) -> float:
    """Rough extra memory of the method, in MiB: CB-HEM bank (M×d fp32 + labels/ages int64)
    plus the PLB representation cache and its gradient (2 × N×d fp32). Activations excluded."""
    d = cfg.model.embedding
    bank = cfg.method.memory * (4 * d + 16)
    cache = 2 * cfg.virtual_batch * d * 4 if cfg.method.plb != "off" else 0
    return (bank + cache) / 2**20


AUTO_TIMEOUT_S = 600.0
LONG_DATA = ("image_folder", "recordio")


def trial_timeout(setting: float | str | None, cfg: TrialConfig) -> float | None:
    """A trial's wall-clock limit (seconds after its data are prepared; None = no limit).

    `timeout_s = "auto"` (the default): no limit for trials that are long by nature — real
    images (`image_folder`, `recordio`), an iresnet backbone, or more than 10,000 steps with the
    pretrain's — and `AUTO_TIMEOUT_S` (600 s) otherwise, which still stops a hung small trial.
    """
    if setting != "auto":
        return setting  # type: ignore[return-value]
    long = (
        cfg.data.kind in LONG_DATA
        or cfg.model.kind.startswith("iresnet")
        or cfg.train.steps + cfg.pretrain.steps > 10_000
    )
    return None if long else AUTO_TIMEOUT_S
