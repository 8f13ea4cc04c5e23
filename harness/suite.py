"""Suite files: parsing, grid expansion, trial ids, and one error list for every problem.

A suite is a TOML file (parsed with stdlib `tomllib`, never eval'd); its schema is
`harness.config`, its reference docs/suites.md:

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

Every resolved config is validated twice: by the schema (`TrialConfig`), and — unless
`check=False` — by building what the library would build (`harness.build.check_trial`: registry
names, head parameters, objective options, data keys). All problems are collected into one
`SuiteError` with one message per problem, naming the file, the key path and the allowed values.

The trial id is the first 12 hex digits of the SHA-256 of the canonical JSON of the resolved
config (which includes the seed): stable across runs and machines, and the resume key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from harness.config import SECTIONS, MethodCfg, SuiteFile, SuiteMeta, TrialConfig


class SuiteError(ValueError):
    """A suite failed validation; `problems` holds one human-readable message per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Suite(BaseModel):
    """A validated suite: its source text, its meta and its expanded trials (in order:
    the baseline for every seed first, then the sweep blocks)."""

    model_config = ConfigDict(frozen=True)
    path: str
    text: str
    meta: SuiteMeta
    baseline: TrialConfig
    trials: list[TrialConfig]

    @property
    def name(self) -> str:
        return self.meta.name

    def is_baseline(self, cfg: TrialConfig) -> bool:
        """Whether `cfg` is the baseline configuration (for any seed)."""
        return cfg.model_copy(update={"seed": self.baseline.seed}) == self.baseline


def trial_id(config: TrialConfig) -> str:
    """Stable id: first 12 hex digits of SHA-256 over the canonical JSON of the config."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


# --- entry points ------------------------------------------------------------------------------


def load_suite(path: str | Path, *, device: str | None = None, check: bool = True) -> Suite:
    """Read, validate and expand the suite at `path`.

    `device` ("auto"|"cpu"|"cuda"), when given, overrides `train.device` of every trial (it is
    part of the resolved config, hence of the trial id). `check=False` skips the library checks
    (and with them every torch import). Raises `SuiteError` listing every problem.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SuiteError([f"{path}: cannot read suite file: {exc.strerror or exc}"]) from None
    return parse_suite(text, path=str(path), device=device, check=check)


def parse_suite(
    text: str, *, path: str = "<suite>", device: str | None = None, check: bool = True
) -> Suite:
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

    problems: list[str] = []
    baseline = _validated(raw, top.suite.seeds[0], {}, "baseline", problems, check)
    for i, block in enumerate(top.sweep):
        problems += _sweep_problems(i, block)
    if problems or baseline is None:
        raise SuiteError([f"{path}: {m}" for m in problems])

    trials: list[TrialConfig] = []
    seen: set[str] = set()
    for where, combo in _combinations(top.sweep):
        for seed in top.suite.seeds:
            cfg = _validated(raw, seed, combo, where, problems, check)
            if cfg is not None and (tid := trial_id(cfg)) not in seen:
                seen.add(tid)
                trials.append(cfg)
    if problems:
        raise SuiteError([f"{path}: {m}" for m in problems])
    return Suite(path=path, text=text, meta=top.suite, baseline=baseline, trials=trials)


# --- grid expansion ----------------------------------------------------------------------------


def _combinations(sweep: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """`(where, combo)` per grid cell: the baseline first (what `show` reports deltas against),
    then the cartesian product of each sweep block."""
    out: list[tuple[str, dict[str, Any]]] = [("baseline", {})]
    for i, block in enumerate(sweep):
        flat = _flatten(block)
        out += [
            (f"sweep[{i}]", dict(zip(flat, values, strict=True)))
            for values in itertools.product(*flat.values())
        ]
    return out


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


def _validated(
    raw: dict[str, Any], seed: int, combo: dict[str, Any], where: str, problems: list[str],
    check: bool,
) -> TrialConfig | None:  # fmt: skip
    """The resolved config of one grid cell, or None with its problems appended (each once:
    the same bad value repeats across the grid)."""
    found: list[tuple[str, str]] = []
    cfg = None
    try:
        cfg = TrialConfig.model_validate(_resolve(raw, seed, combo))
    except ValidationError as err:
        for e in err.errors(include_url=False):
            loc = tuple(str(p) for p in e["loc"])
            key = ".".join(loc[1:]) if loc[:1] == ("method",) else ".".join(loc)
            found.append((key, e["msg"].removeprefix("Value error, ")))
    if cfg is not None and check:
        from harness.build import check_trial  # torch and the library: only when checking

        found = check_trial(cfg)
    for key, msg in found:
        m = _located(where, combo, key, msg)
        if m not in problems:
            problems.append(m)
    return None if found else cfg


def _located(where: str, combo: dict[str, Any], key: str, msg: str) -> str:
    """Name the sweep key that caused a problem, or the combination for a cross-field rule."""
    if key in combo:
        return f"{where}.{key}: {msg} (got {combo[key]!r})"
    if not combo:  # the baseline: method keys live under [baseline], the rest in sections
        if not key:
            return f"{where}: {msg}"
        return f"{key}: {msg}" if key.partition(".")[0] in SECTIONS else f"{where}.{key}: {msg}"
    values = ", ".join(f"{k}={v!r}" for k, v in combo.items())
    return f"{where} combination ({values}): {msg}"


# --- messages ----------------------------------------------------------------------------------


def _messages(err: ValidationError, prefix: str = "") -> list[str]:
    """One line per pydantic error: `key.path: message (got value)`."""
    out = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"])
        path = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {e['input']!r})"
        out.append(f"{path or '<top level>'}: {msg}{got}")
    return out


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
                f"{where}.{key}: unknown key; allowed: {', '.join(MethodCfg.model_fields)} "
                f"or section.key for sections {', '.join(SECTIONS)}"
            )
            continue
        if not isinstance(values, list) or not values:
            problems.append(f"{where}.{key}: must be a non-empty list of values (got {values!r})")
    return problems
