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
`SuiteError` with one message per problem, naming the file, the key path and the allowed values
(with a did-you-mean hint for a misspelt key or name). Every pass runs even when an earlier one
failed: keys the schema rejects are dropped and the rest is checked without them.

Bounded work: the grid size is computed before expanding (`suite_checks.grid_size`) and refused
above `max_trials` (default `MAX_TRIALS` = 10,000); each combination is validated once (its seeds
are copies), so 10,000 trials validate in about two seconds.

The trial id is the first 12 hex digits of the SHA-256 of the canonical JSON of the resolved
config (which includes the seed): stable across runs and machines, and the resume key.
"""

from __future__ import annotations

import itertools
import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from harness import suite_checks as checks
from harness.config import SECTIONS, SuiteFile, SuiteMeta, TrialConfig
from harness.records import digest
from harness.suite_checks import MAX_TRIALS


class SuiteError(ValueError):
    """A suite failed validation; `problems` holds one human-readable message per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Suite(BaseModel):
    """A validated suite: its source text, its meta and its expanded trials (in order:
    the baseline for every seed first, then the sweep blocks); per trial, its id and the sweep
    values that made it (`swept`, {} for the baseline)."""

    model_config = ConfigDict(frozen=True)
    path: str
    text: str
    meta: SuiteMeta
    baseline: TrialConfig
    trials: list[TrialConfig]
    ids: list[str]  # trial_id of each trial, computed once by the expansion
    swept: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.meta.name

    def is_baseline(self, cfg: TrialConfig) -> bool:
        """Whether `cfg` is the baseline configuration (for any seed)."""
        return cfg.model_copy(update={"seed": self.baseline.seed}) == self.baseline


def trial_id(config: TrialConfig) -> str:
    """Stable id: first 12 hex digits of SHA-256 over the canonical JSON of the config."""
    return digest(config.model_dump(mode="json"))


# --- entry points ------------------------------------------------------------------------------


def load_suite(
    path: str | Path, *, device: str | None = None, check: bool = True,
    max_trials: int = MAX_TRIALS,
) -> Suite:  # fmt: skip
    """Read, validate and expand the suite at `path`.

    `device` ("auto"|"cpu"|"cuda"), when given, overrides `train.device` of every trial (it is
    part of the resolved config, hence of the trial id). `check=False` skips the library checks
    (and with them every torch import). A suite that would expand to more than `max_trials`
    trials is refused before expanding. Raises `SuiteError` listing every problem.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SuiteError([f"{path}: cannot read suite file: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SuiteError(
            [f"{path}: not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
             "a suite file is UTF-8 TOML"]
        ) from None  # fmt: skip
    return parse_suite(text, path=str(path), device=device, check=check, max_trials=max_trials)


def parse_suite(
    text: str, *, path: str = "<suite>", device: str | None = None, check: bool = True,
    max_trials: int = MAX_TRIALS,
) -> Suite:  # fmt: skip
    """`load_suite` on a string (`path` is used in messages only).

    Every pass runs even when an earlier one found problems (a key the schema rejects is
    dropped, and the rest of the suite is checked without it), so one round of fixes suffices.
    """
    raw = _toml(text, path, device)
    problems: list[str] = []
    top, repaired = _top_level(raw, problems)
    lenient = bool(problems)  # keys were dropped: defaults stand in for them
    sweep = [(i, _flatten(b)) for i, b in enumerate(top.sweep) if i not in repaired.bad_blocks]
    for i, block in sweep:
        problems += checks.sweep_problems(i, block)
    sweep = [(i, block) for i, block in sweep if block]
    size = checks.grid_size((flat for _, flat in sweep), len(top.suite.seeds))
    if grid := checks.grid_problem(size, max_trials):
        problems.append(grid)
    if grid is None:
        grid_check = _Grid(repaired.raw, check, lenient)
        grid_check.expand(top.suite.seeds, sweep)
        problems += [m for m in grid_check.problems if m not in problems]
    if problems:
        raise SuiteError([f"{path}: {m}" for m in problems])
    g = grid_check  # model_construct: every part is validated already (10^4 trials)
    return Suite.model_construct(
        path=path,
        text=text,
        meta=top.suite,
        baseline=g.trials[0],
        trials=g.trials,
        ids=g.ids,
        swept=g.swept,
    )


def _toml(text: str, path: str, device: str | None) -> dict[str, Any]:
    """The TOML document (nesting checked), with the `--device` override applied."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError([f"{path}: invalid TOML: {exc}"]) from None
    except RecursionError:
        raise SuiteError([f"{path}: invalid TOML: nested too deeply"]) from None
    if (depth := checks.nesting_depth(raw)) > checks.MAX_DEPTH:
        raise SuiteError(
            [f"{path}: tables or lists nested {depth}+ levels deep (at most {checks.MAX_DEPTH})"]
        )
    if device is not None:
        if device not in ("auto", "cpu", "cuda"):
            raise SuiteError([f"--device must be one of auto, cpu, cuda; got {device!r}"])
        raw.setdefault("train", {})
        if isinstance(raw["train"], dict):
            raw["train"]["device"] = device
    return raw


class _Repaired(BaseModel):
    """The document with every key the schema rejected removed (or a placeholder name)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    raw: dict[str, Any]
    bad_blocks: set[int] = set()


def _top_level(raw: dict[str, Any], problems: list[str]) -> tuple[SuiteFile, _Repaired]:
    """The validated top level, and the document it was validated from. Schema problems are
    appended to `problems` and their keys dropped, so the later passes still run (and rules
    that pydantic checks only once every field is valid get their turn)."""
    doc, bad_blocks = raw, set()
    for _ in range(8):
        try:
            return SuiteFile.model_validate(doc), _Repaired(raw=doc, bad_blocks=bad_blocks)
        except ValidationError as err:
            problems += [m for m in checks.messages(err) if m not in problems]
            doc, bad = checks.without(doc, err)
            bad_blocks |= bad
    raise SuiteError(problems)  # pragma: no cover - each round drops at least one key


# --- grid expansion ----------------------------------------------------------------------------

Block = dict[str, Any]  # a flattened sweep block: {"memory": [..], "train.lr": [..]}


def _combinations(sweep: list[tuple[int, Block]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """`(where, combo)` per grid cell: the baseline first (what `show` reports deltas against),
    then the cartesian product of each sweep block."""
    yield "baseline", {}
    for i, flat in sweep:
        for values in itertools.product(*flat.values()):
            yield f"sweep[{i}]", dict(zip(flat, values, strict=True))


def _flatten(block: Any) -> Any:
    """`{"train": {"lr": [..]}, "memory": [..]}` -> `{"train.lr": [..], "memory": [..]}`.

    Only section tables are flattened (one level): method keys such as `head_params` are
    tables of their own whose values are lists of tables.
    """
    if not isinstance(block, dict):
        return block
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


class _Grid:
    """Validates and expands the grid. Each combination is validated once (its other seeds are
    copies: nothing in a config's validity depends on the seed), the library checks run once
    per combination, the FAR checks once per data set, and each problem is reported once.

    `lenient`: the document had schema problems and had keys dropped, so cross-field rules of
    the schema may fire only because a default took a dropped key's place: those are skipped.
    """

    def __init__(self, raw: dict[str, Any], check: bool, lenient: bool):
        self.raw, self.check, self.lenient = raw, check, lenient
        self.problems: list[str] = []
        self._seen: set[tuple[str, str]] = set()
        self._fars: dict[str, list[tuple[str, str]]] = {}

    def expand(self, seeds: list[int], sweep: list[tuple[int, Block]]) -> None:
        """Fill `trials`, `ids` and `swept` (duplicates removed, the first one kept)."""
        self.trials: list[TrialConfig] = []
        self.ids: list[str] = []
        self.swept: list[dict[str, Any]] = []
        seen: set[str] = set()
        for where, combo in _combinations(sweep):
            cfg = self._validated(seeds[0], combo, where)
            if cfg is None:
                continue
            for seed in seeds:
                t = cfg if seed == cfg.seed else cfg.model_copy(update={"seed": seed})
                if (tid := trial_id(t)) not in seen:
                    seen.add(tid)
                    self.trials.append(t)
                    self.ids.append(tid)
                    self.swept.append(combo)

    def _validated(self, seed: int, combo: dict[str, Any], where: str) -> TrialConfig | None:
        """The resolved config of one grid cell, or None with its problems recorded."""
        found: list[tuple[str, str]] = []
        cfg = None
        try:
            cfg = TrialConfig.model_validate(_resolve(self.raw, seed, combo))
        except ValidationError as err:
            for e in err.errors(include_url=False):
                loc = tuple(str(p) for p in e["loc"])
                key = ".".join(loc[1:]) if loc[:1] == ("method",) else ".".join(loc)
                if not (self.lenient and (not key or key in SECTIONS)):
                    found.append((key, e["msg"].removeprefix("Value error, ")))
            if not found:
                return None
        if cfg is not None and self.check:
            found = self._library(cfg)
        for key, msg in found:
            if (key, msg) not in self._seen:  # the same bad value repeats across the grid
                self._seen.add((key, msg))
                self.problems.append(_located(where, combo, key, checks.hint_unknown(msg)))
        return None if found else cfg

    def _library(self, cfg: TrialConfig) -> list[tuple[str, str]]:
        from harness.build import check_trial  # torch and the library: only when checking

        found = check_trial(cfg)
        if not found:
            data = json.dumps([cfg.data.model_dump(mode="json"), cfg.eval.far], sort_keys=True)
            if data not in self._fars:
                self._fars[data] = checks.far_problems(cfg)
            found = self._fars[data]
        return found


def _located(where: str, combo: dict[str, Any], key: str, msg: str) -> str:
    """Name the sweep key that caused a problem, or the combination for a cross-field rule."""
    msg = msg.removeprefix(f"{key}: ") if key else msg  # "data: data: ..." reads once
    if key in combo:
        return f"{where}.{key}: {msg} (got {combo[key]!r})"
    if not combo:  # the baseline: method keys live under [baseline], the rest in sections
        if not key:
            return f"{where}: {msg}"
        return f"{key}: {msg}" if key.partition(".")[0] in SECTIONS else f"{where}.{key}: {msg}"
    values = ", ".join(f"{k}={v!r}" for k, v in combo.items())
    return f"{where} combination ({values}): {msg}"
