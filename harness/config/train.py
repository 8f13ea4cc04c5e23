"""`[train]`: steps, batch, optimiser and schedule, precision, checkpoints, execution."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from harness.config.base import _Strict

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
