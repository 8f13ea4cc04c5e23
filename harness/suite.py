"""Suite files: schema, validation, grid expansion and trial ids.

A suite is a TOML file (parsed with stdlib `tomllib`, never eval'd):

```toml
[suite]    name = "smoke"; seeds = [0]            # name: [a-z0-9_-]+ (it becomes a directory)
[data]     kind = "synthetic_ivs"; ...            # passed to harness.data.build_data
[model]    kind = "mlp"; embedding = 32           # passed to harness.models.build_model
[train]    steps = 20; batch = 32; lr = 0.1; device = "auto"
[baseline] miner = "batch_hard"; loss = "triplet"; margin = 0.2
[[sweep]]  memory = [0, 256]; miner = ["batch_hard"]   # cartesian product per block
[eval]     far = [1e-1, 1e-2]
[debug]    inject = "none"                        # "exception" | "nan" | "oom" | "hang"
```

Resolution: a trial's config is the suite's sections with `[baseline]` as the method, overridden
by one combination of one sweep block, plus one seed. The baseline itself always runs (first),
so that every result can be read as a difference from it. Sweep keys are method keys (`memory`,
`plb`, `head`, ...) or dotted section keys (`train.lr`, `debug.inject`, ...). Blocks are expanded
independently (cartesian product), concatenated, and duplicates removed (first one wins).

Every resolved config is validated (`TrialConfig`), including combinations that are impossible
(memory without a memory-capable miner, a virtual batch that is not a multiple of the batch, ...).
All problems are collected into one `SuiteError` with one message per problem, naming the file,
the key path and the allowed values.

The trial id is the first 12 hex digits of the SHA-256 of the canonical JSON of the resolved
config (which includes the seed): stable across runs and machines, and the resume key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

SUITE_NAME_RE = re.compile(r"^[a-z0-9_-]+$")
PLB_MODES = ("off", "exact", "select", "chunk_loss")
INJECT_MODES = ("none", "exception", "nan", "oom", "hang")
SECTIONS = ("data", "model", "train", "eval", "debug")

Scalar = str | int | float | bool
# values of free-form sections (data/model params): scalars or flat lists of scalars
Param = Scalar | list[Scalar]


class SuiteError(ValueError):
    """A suite failed validation; `problems` holds one human-readable message per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# --- registries (imported lazily: validating must not import torch-heavy modules eagerly) -----


def registry_names(kind: str) -> tuple[str, ...]:
    """Sorted names registered for `kind` ∈ {miner, loss, head, data, model}."""
    if kind == "miner":
        from mining.miners import MINERS as reg
    elif kind == "loss":
        from mining.losses import LOSSES as reg
    elif kind == "head":
        from mining.heads import HEADS as reg
    elif kind == "data":
        from harness.data import DATA_KINDS as reg
    elif kind == "model":
        from harness.models import MODELS as reg
    else:
        raise ValueError(
            f"registry kind must be one of miner, loss, head, data, model; got {kind!r}"
        )
    return tuple(sorted(reg))


def objective_kwargs(method: dict[str, Any], seed: int) -> dict[str, Any]:
    """Keyword arguments of `mining.MetricObjective` for a resolved method (`MethodCfg` dump)."""
    return {
        "miner": method["miner"],
        "loss": method["loss"],
        "margin": method["margin"],
        "memory_size": method["memory"],
        "memory_weight": method["memory_weight"],
        "warmup_steps": method["memory_warmup"],
        "enqueue": method["enqueue"],
        "in_batch": method["in_batch"],
        "seed": seed,
        **method["objective_params"],
    }


def _construct_problem(factory: Any, kwargs: dict[str, Any], what: str) -> str | None:
    """Build `factory(**kwargs)` once, to let the library reject parameters it does not accept
    (unknown params, k with a miner without k, ...) before anything runs; cheap: the objective
    and the heads allocate no large state at construction."""
    try:
        factory(**kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        return f"{what}: {exc}"
    return None


def _check_registered(kind: str, value: str) -> str:
    names = registry_names(kind)
    if value not in names:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(names)}")
    return value


# --- schema ------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SuiteMeta(_Strict):
    name: str = Field(description="[a-z0-9_-]+; becomes the results directory name")
    seeds: list[int] = Field(default=[0], min_length=1)
    description: str = ""
    timeout_s: float | None = Field(default=600.0, gt=0, description="per-trial wall-clock limit")

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
        if any(s < 0 for s in v) or len(set(v)) != len(v):
            raise ValueError("seeds must be distinct non-negative integers")
        return v


class DataCfg(BaseModel):
    """`kind` plus free parameters for `build_data` (scalars or lists of scalars)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    kind: str = "synthetic_ivs"

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        return _check_registered("data", v)

    @model_validator(mode="after")
    def _params(self) -> DataCfg:
        for key, value in (self.model_extra or {}).items():
            if not _is_param(value):
                raise ValueError(f"data.{key} must be a scalar or a list of scalars")
        return self


class ModelCfg(BaseModel):
    """`kind`, `embedding` plus free parameters for `build_model`."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    kind: str = "mlp"
    embedding: int = Field(default=128, ge=2, le=65536)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        return _check_registered("model", v)

    @model_validator(mode="after")
    def _params(self) -> ModelCfg:
        for key, value in (self.model_extra or {}).items():
            if not _is_param(value):
                raise ValueError(f"model.{key} must be a scalar or a list of scalars")
        return self


class TrainCfg(_Strict):
    steps: int = Field(default=100, ge=1, le=10_000_000)
    batch: int = Field(default=128, ge=2, le=1_000_000, description="even: P identities × 2")
    lr: float = Field(default=0.1, gt=0, le=100)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0, le=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    warmup_steps: int = Field(default=2, ge=0, description="steps excluded from throughput")
    log_every: int = Field(default=1, ge=1, description="curve row every N steps")
    nvml_interval_s: float = Field(default=0.05, gt=0, le=10)
    threads: int = Field(default=0, ge=0, le=1024, description="CPU threads (0 = torch default)")

    @field_validator("batch")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"batch must be even (identities × 2 photos); got {v}")
        return v


class EvalCfg(_Strict):
    far: list[float] = Field(default=[1e-1, 1e-2, 1e-3], min_length=1)

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

    miner: str = "batch_hard"
    loss: str = "triplet"
    margin: float = Field(default=0.2, ge=0, le=4)
    memory: int = Field(default=0, ge=0, le=100_000_000)
    memory_weight: float = Field(default=1.0, ge=0, le=100)
    memory_warmup: int = Field(default=0, ge=0, description="steps before the memory is mined")
    enqueue: Literal["before", "after"] = "after"
    in_batch: bool = True
    plb: Literal["off", "exact", "select", "chunk_loss"] = "off"
    virtual_batch: int | None = Field(default=None, ge=2)
    head: str | None = None
    head_params: dict[str, Scalar] = Field(default_factory=dict)
    objective_params: dict[str, Scalar] = Field(default_factory=dict)

    @field_validator("miner")
    @classmethod
    def _miner(cls, v: str) -> str:
        return _check_registered("miner", v)

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        return _check_registered("loss", v)

    @field_validator("head")
    @classmethod
    def _head(cls, v: str | None) -> str | None:
        return v if v is None else _check_registered("head", v)


class TrialConfig(_Strict):
    """A fully resolved trial: everything `harness.trial.run_trial` needs, plus the seed."""

    suite: str
    seed: int = Field(ge=0)
    data: DataCfg
    model: ModelCfg
    train: TrainCfg
    method: MethodCfg
    eval: EvalCfg
    debug: DebugCfg

    @model_validator(mode="after")
    def _combination(self) -> TrialConfig:
        m, batch = self.method, self.train.batch
        problems = []
        vb = m.virtual_batch if m.virtual_batch is not None else batch
        if vb % batch:
            problems.append(
                f"virtual_batch={vb} must be a multiple of train.batch={batch} (the PLB chunk size)"
            )
        if m.plb == "off" and vb != batch:
            problems.append(
                f"plb='off' needs virtual_batch == train.batch ({batch}); got {vb} "
                f"(use plb = one of {', '.join(PLB_MODES[1:])})"
            )
        if m.head is not None:
            if m.memory:
                problems.append(f"head={m.head!r} (classification) needs memory=0; got {m.memory}")
            if m.plb != "off":
                problems.append(f"head={m.head!r} (classification) needs plb='off'; got {m.plb!r}")
        if m.head is not None:
            from mining.heads import HEADS

            # num_classes=2: only the parameters are checked here; the data sets the real count
            kwargs = {"embedding_dim": self.model.embedding, "num_classes": 2, **m.head_params}
            problem = _construct_problem(HEADS[m.head], kwargs, f"head_params for {m.head!r}")
        else:
            from mining import MetricObjective

            kwargs = objective_kwargs(m.model_dump(), self.seed)
            problem = _construct_problem(MetricObjective, kwargs, "objective")
        if problem:
            problems.append(problem)
        from harness.data import validate_data

        problem = _construct_problem(validate_data, {"cfg": self.data.model_dump()}, "data")
        if problem:
            problems.append(problem)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def virtual_batch(self) -> int:
        return self.method.virtual_batch or self.train.batch


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


class Suite(BaseModel):
    """A validated suite: its source text, its meta and its expanded trials (in order:
    the baseline for every seed first, then the sweep blocks)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    path: str
    text: str
    meta: SuiteMeta
    baseline: TrialConfig
    trials: list[TrialConfig]

    @property
    def name(self) -> str:
        return self.meta.name


# --- helpers -------------------------------------------------------------------------------


def _is_param(value: Any) -> bool:
    scalar = (str, int, float, bool)
    return isinstance(value, scalar) or (
        isinstance(value, list) and all(isinstance(x, scalar) for x in value)
    )


def trial_id(config: TrialConfig) -> str:
    """Stable id: first 12 hex digits of SHA-256 over the canonical JSON of the config."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _messages(err: ValidationError, prefix: str = "") -> list[str]:
    """One line per pydantic error: `key.path: message (got value)`."""
    out = []
    for e in err.errors(include_url=False):
        loc = _loc(e["loc"])
        path = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {e['input']!r})"
        out.append(f"{path or '<top level>'}: {msg}{got}")
    return out


def _allowed_keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def _sweep_problems(i: int, block: Any) -> list[str]:
    """Shape checks of sweep block `i`: known keys, non-empty lists of values."""
    where = f"sweep[{i}]"
    if not isinstance(block, dict) or not block:
        return [f"{where}: must be a non-empty table of key = [values]"]
    problems = []
    for key, values in _flatten(block).items():
        section, _, sub = key.partition(".")
        if sub:
            if section not in SECTIONS:
                problems.append(
                    f"{where}.{key}: unknown section {section!r}; allowed: {', '.join(SECTIONS)}"
                )
                continue
        elif key not in MethodCfg.model_fields:
            problems.append(
                f"{where}.{key}: unknown key; allowed: {_allowed_keys(MethodCfg)} "
                f"or section.key for sections {', '.join(SECTIONS)}"
            )
            continue
        if not isinstance(values, list) or not values:
            problems.append(f"{where}.{key}: must be a non-empty list of values (got {values!r})")
    return problems


def _flatten(block: dict[str, Any]) -> dict[str, Any]:
    """`{"train": {"lr": [..]}, "memory": [..]}` -> `{"train.lr": [..], "memory": [..]}`.

    Only section tables are flattened (one level): method keys such as `head_params` are
    tables of their own whose values are lists of tables.
    """
    flat = {}
    for key, value in block.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[key] = value
    return flat


def _resolve(raw: dict[str, Any], seed: int, combo: dict[str, Any]) -> dict[str, Any]:
    """Raw (unvalidated) trial dict: suite sections, baseline as method, `combo` overrides."""
    cfg: dict[str, Any] = {s: dict(raw.get(s, {})) for s in SECTIONS}
    cfg["method"] = dict(raw.get("baseline", {}))
    cfg["suite"] = raw["suite"]["name"]
    cfg["seed"] = seed
    for key, value in combo.items():
        section, _, sub = key.partition(".")
        if sub:
            cfg[section][sub] = value
        else:
            cfg["method"][key] = value
    return cfg


def _combo_problems(where: str, combo: dict[str, Any], err: ValidationError) -> list[str]:
    """Map errors of a resolved config back to the sweep keys that caused them."""
    out = []
    for e in err.errors(include_url=False):
        loc = tuple(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        swept = ".".join(loc[1:]) if loc[:1] == ("method",) else ".".join(loc)
        if swept in combo:
            got = f" (got {e['input']!r})"
            out.append(f"{where}.{swept}: {msg}{got}")
        else:  # a cross-field rule: name the combination that broke it
            values = ", ".join(f"{k}={v!r}" for k, v in combo.items())
            out.append(f"{where} combination ({values}): {msg}")
    return out


# --- entry points ------------------------------------------------------------------------------


def load_suite(path: str | Path, *, device: str | None = None) -> Suite:
    """Read, validate and expand the suite at `path`.

    `device` ("auto"|"cpu"|"cuda"), when given, overrides `train.device` of every trial (it is
    part of the resolved config, hence of the trial id). Raises `SuiteError` listing every
    problem; nothing is written.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SuiteError([f"{path}: cannot read suite file: {exc.strerror or exc}"]) from None
    return parse_suite(text, path=str(path), device=device)


def parse_suite(text: str, *, path: str = "<suite>", device: str | None = None) -> Suite:
    """`load_suite` on a string (`path` is used in messages only)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError([f"{path}: invalid TOML: {exc}"]) from None
    if device is not None:
        if device not in ("auto", "cpu", "cuda"):
            raise SuiteError([f"--device must be one of auto, cpu, cuda; got {device!r}"])
        raw.setdefault("train", {})
        if isinstance(raw["train"], dict):
            raw["train"]["device"] = device

    try:
        top = SuiteFile.model_validate(raw)
    except ValidationError as err:
        raise SuiteError([f"{path}: {m}" for m in _messages(err)]) from None

    base_cfg = _resolve(raw, top.suite.seeds[0], {})
    problems: list[str] = []
    try:
        baseline = TrialConfig.model_validate(base_cfg)
    except ValidationError as err:  # cross-field rules on the baseline itself
        problems += _combo_problems("baseline", {}, err)
    for i, block in enumerate(top.sweep):
        problems += _sweep_problems(i, block)
    if problems:
        raise SuiteError([f"{path}: {m}" for m in problems])

    # the baseline runs first (it is what `show` reports deltas against), then the sweeps
    combos: list[tuple[int, dict[str, Any]]] = [(-1, {})]
    for i, block in enumerate(top.sweep):
        flat = _flatten(block)
        keys = list(flat)
        combos += [
            (i, dict(zip(keys, vals, strict=True))) for vals in itertools.product(*flat.values())
        ]

    trials: list[TrialConfig] = []
    seen: set[str] = set()
    for i, combo in combos:
        for seed in top.suite.seeds:
            try:
                cfg = TrialConfig.model_validate(_resolve(raw, seed, combo))
            except ValidationError as err:
                for m in _combo_problems(f"sweep[{i}]", combo, err):
                    if m not in problems:  # the same bad value repeats across the grid
                        problems.append(m)
                continue
            tid = trial_id(cfg)
            if tid not in seen:
                seen.add(tid)
                trials.append(cfg)
    if problems:
        raise SuiteError([f"{path}: {m}" for m in problems])
    return Suite(path=path, text=text, meta=top.suite, baseline=baseline, trials=trials)


def estimated_extra_mib(cfg: TrialConfig) -> float:
    """Rough extra memory of the method, in MiB: CB-HEM bank (M×d fp32 + labels/ages int64)
    plus the PLB representation cache and its gradient (2 × N×d fp32). Activations excluded."""
    d = cfg.model.embedding
    bank = cfg.method.memory * (4 * d + 16)
    cache = 2 * cfg.virtual_batch * d * 4 if cfg.method.plb != "off" else 0
    return (bank + cache) / 2**20


def method_label(cfg: TrialConfig) -> str:
    """Short human label of what a trial trains, e.g. `batch_hard+triplet M=1024 exact N=512`."""
    m = cfg.method
    if m.head is not None:
        return f"head:{m.head}"
    parts = [f"{m.miner}+{m.loss}"]
    if m.memory:
        parts.append(f"M={m.memory}")
    if m.plb != "off":
        parts.append(f"{m.plb} N={cfg.virtual_batch}")
    return " ".join(parts)
