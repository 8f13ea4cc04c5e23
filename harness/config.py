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
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

SUITE_NAME_RE = re.compile(r"^[a-z0-9_-]+$")
PLB_MODES = ("off", "exact", "select", "chunk_loss")
SECTIONS = ("data", "model", "train", "eval", "debug", "pretrain")

Scalar = str | int | float | bool
# values of free-form sections (data/model params): scalars or flat lists of scalars
Param = Scalar | list[Scalar]


MAX_SEED = 2**63 - 1  # seeds are stored in Int64 columns
MAX_NAME = 64  # a suite name is a directory name; file systems stop at 255 bytes per component


def _is_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)  # NaN slips through every range check (NaN < low is False)
    return isinstance(value, (str, int, bool)) and not (
        isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SEED
    )


def _is_param(value: Any) -> bool:
    return _is_scalar(value) or (isinstance(value, list) and all(map(_is_scalar, value)))


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN would pass every `ge`/`le` bound; inf is opted in per field
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class _Open(BaseModel):
    """A `kind` plus free parameters (scalars or lists of scalars) checked by the builder."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _params(self) -> _Open:
        section = type(self).__name__.removesuffix("Cfg").lower()
        for key, value in (self.model_extra or {}).items():
            if not _is_param(value):
                raise ValueError(
                    f"{section}.{key} must be a finite scalar or a list of finite scalars "
                    f"(integers within ±2^63); got {value!r}"
                )
        return self

    def params(self) -> dict[str, Any]:
        """The free parameters (everything but `kind` and the declared fields)."""
        return dict(self.model_extra or {})


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


OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "step", "cosine", "poly")
PRECISIONS = ("fp32", "bf16", "fp16")


class TrainCfg(_Strict):
    steps: int = Field(default=100, ge=1, le=10_000_000, description="optimisation steps")
    samples_per_identity: int = Field(
        default=2, ge=2, le=1024, description="K photos per identity in a batch (2: the IvS pair)"
    )
    batch: int = Field(
        default=128, ge=2, le=1_000_000, description="P identities × samples_per_identity"
    )
    # optimiser and schedule (harness/recipe.py)
    optimizer: Literal["sgd", "adamw"] = Field(default="sgd", description="optimiser")
    lr: float = Field(default=0.1, gt=0, le=100, description="peak learning rate")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(default=5e-4, ge=0, le=1, description="L2 weight decay")
    betas: list[float] = Field(
        default=[0.9, 0.999], min_length=2, max_length=2, description="adamw only: (β1, β2)"
    )
    schedule: Literal["constant", "step", "cosine", "poly"] = Field(
        default="constant", description="learning-rate schedule after the warm-up"
    )
    lr_warmup: int = Field(default=0, ge=0, description="linear warm-up steps from lr/warmup")
    milestones: list[int] = Field(default_factory=list, description="step: decay at these steps")
    gamma: float = Field(default=0.1, gt=0, le=1, description="step: factor per milestone")
    poly_power: float = Field(default=2.0, gt=0, le=10, description="poly: (1 − t/T)^power")
    # numerics and speed
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="autocast dtype of the backbone (fp16: CUDA, GradScaler)"
    )
    channels_last: bool = Field(default=False, description="channels_last memory format (CNNs)")
    compile: bool | Literal["inductor", "cudagraphs", "aot_eager", "eager"] = Field(
        default=False,
        description="torch.compile the backbone (true = the inductor backend, or a backend name)",
    )
    # checkpoints
    checkpoint_every: int = Field(
        default=1000,
        ge=0,
        description="checkpoint every N steps (0 = never); `hembench run --resume` continues "
        "an interrupted trial from its last checkpoint",
    )
    save_model: bool = Field(default=True, description="write model.pt at the end of the trial")
    # execution
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto = cuda when available (--device overrides)"
    )
    world_size: int = Field(
        default=1, ge=1, le=1024,
        description="processes of one data-parallel trial (gloo on CPU, NCCL on CUDA; "
        "one GPU per rank); the global batch is split across ranks",
    )  # fmt: skip
    warmup_steps: int = Field(default=2, ge=0, description="steps excluded from throughput")
    log_every: int = Field(default=1, ge=1, description="curve row every N steps")
    nvml_interval_s: float = Field(
        default=0.05, gt=0, le=10, description="GPU memory (NVML) sampling interval in seconds"
    )
    threads: int = Field(
        default=0, ge=0, le=1024, description="CPU threads (0 = cores / concurrent trials)"
    )
    workers: int | Literal["auto"] = Field(
        default="auto",
        description="data loader processes for image data (0 = decode in the trial's process; "
        "auto = the trial's CPUs, at most 8)",
    )

    @field_validator("batch")
    @classmethod
    def _whole_identities(cls, v: int, info: ValidationInfo) -> int:
        k = info.data.get("samples_per_identity", 2)  # declared first, so validated first
        if v % k:
            raise ValueError(
                f"batch must be a multiple of samples_per_identity = {k} (P identities × {k} "
                f"photos); got {v}"
            )
        return v

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 0 <= v <= 64:
            raise ValueError(f"workers must be 'auto' or an integer in [0, 64]; got {v}")
        return v

    @model_validator(mode="after")
    def _recipe(self) -> TrainCfg:
        problems = []
        late = [m for m in self.milestones if not 0 < m < self.steps]
        if late:
            problems.append(f"milestones {late} must lie in (0, steps={self.steps})")
        if self.milestones != sorted(set(self.milestones)):
            problems.append(f"milestones must be increasing; got {self.milestones}")
        if self.milestones and self.schedule != "step":
            problems.append(f"milestones are used by schedule='step' only; got {self.schedule!r}")
        if self.lr_warmup >= self.steps:
            problems.append(f"lr_warmup={self.lr_warmup} must be < steps={self.steps}")
        if self.batch % (self.world_size * self.samples_per_identity):
            problems.append(
                f"batch={self.batch} must split into world_size={self.world_size} equal shares "
                f"of whole identities (a multiple of {self.world_size * self.samples_per_identity})"
            )
        if self.precision == "fp16" and self.device == "cpu":
            problems.append("precision='fp16' needs CUDA (use 'bf16' on CPU)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


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
