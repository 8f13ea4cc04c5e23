"""Suite validation helpers: nesting depth, grid size, did-you-mean hints, FARs that the test
set cannot measure, and one message per problem (schema errors, sweep blocks).

All arithmetic on the raw TOML document or on resolved configs: nothing is built or allocated,
so that `validate` and `plan` stay fast for large grids (docs/suites.md, "What validate checks").
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ValidationError

from harness.config import SECTIONS, DebugCfg, EvalCfg, MethodCfg, SuiteFile, TrainCfg, TrialConfig

#: Largest grid a suite may expand to (trials, seeds included) unless `--max-trials` says more.
MAX_TRIALS = 10_000
#: Deepest nesting of tables/lists accepted in a suite file (a real suite needs 4).
MAX_DEPTH = 32


def nesting_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Depth of nested dicts/lists in `value` (a scalar: 0), counted without recursion and
    stopping once `limit` is exceeded (so a document nested 100,000 levels costs nothing)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, depth + 1)
            if deepest > limit:
                return deepest
            stack += [(v, depth + 1) for v in node]
    return deepest


def grid_size(blocks: Iterable[dict[str, Any]], seeds: int) -> int:
    """Trials a suite expands to before duplicates are removed: (1 + Σ_blocks Π_keys
    len(values)) × seeds — computed without expanding (a non-list value counts as one)."""
    cells = 1
    for flat in blocks:
        cells += math.prod(len(v) if isinstance(v, list) else 1 for v in flat.values())
    return cells * max(seeds, 1)


def grid_problem(size: int, max_trials: int) -> str | None:
    if size <= max_trials:
        return None
    return (
        f"the suite expands to {size:,} trials, above the limit of {max_trials:,} "
        "(docs/suites.md, 'Grid limit'): split it into several suites, or pass --max-trials "
        f"{size} if you mean it"
    )


# --- did you mean -------------------------------------------------------------------------------


def did_you_mean(name: str, allowed: Iterable[str]) -> str:
    """`"; did you mean 'steps'?"` for the closest of `allowed`, or `""` when none is close."""
    close = difflib.get_close_matches(str(name), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# "unknown miner 'batch_hrd'; allowed: a, b" or "unknown key(s) for data kind 'x': data.k; allowed: ..."
_UNKNOWN = re.compile(
    r"unknown (?P<what>[^;]*?)(?::\s*(?P<names>[^;:]+))?;\s*allowed:\s*(?P<allowed>.+)"
)
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")


def hint_unknown(message: str) -> str:
    """`message` plus a did-you-mean hint when it names unknown value(s) and lists the allowed
    ones (the form the library's and the data kinds' errors take); unchanged otherwise."""
    m = _UNKNOWN.search(message)
    if m is None or "did you mean" in message:
        return message
    allowed = [a for a in (_NAME.match(p.strip(" '\"")) for p in m["allowed"].split(",")) if a]
    names = [a.group(0) for a in allowed]
    given = m["names"] or m["what"]
    unknown = re.findall(r"'([^']+)'", given) if m["names"] is None else _NAME.findall(given)
    for u in unknown[-1:] if m["names"] is None else unknown:
        short = u.split(".", 1)[1] if u.startswith(("data.", "model.")) else u
        if hint := did_you_mean(short, names):
            return message + hint
    return message


# --- FARs the test set cannot measure -----------------------------------------------------------


def min_impostors(far: float) -> int:
    """Fewest impostor pairs for which TAR@`far` is defined: ⌈1/far⌉ (as harness.metrics)."""
    return math.ceil(1.0 / far * (1.0 - 1e-9))


def impostor_pairs(data: dict[str, Any]) -> tuple[int, str] | None:
    """(impostor pairs of the test set, how that count comes about) where it is cheaply known —
    an upper bound for image folders — else None. `data` is the resolved `[data]` table."""
    kind = data.get("kind", "synthetic_ivs")
    if kind == "synthetic_ivs":
        from harness.data.synthetic import DEFAULTS

        n = data.get("test_identities", DEFAULTS["test_identities"])
        if isinstance(n, int) and not isinstance(n, bool) and n >= 2:
            return n * (n - 1), f"data.test_identities = {n} gives {n}·{n - 1}"
        return None
    if kind == "image_folder" and data.get("pairing", "first") in ("first", "pattern"):
        from harness.data.image_folder import DEFAULTS

        path, frac = data.get("path"), data.get("test_fraction", DEFAULTS["test_fraction"])
        if not isinstance(path, str) or not path or not isinstance(frac, (int, float)):
            return None
        try:
            with os.scandir(path) as it:
                dirs = sum(1 for e in it if e.is_dir())
        except OSError:
            return None  # the data checks name the path
        t = round(frac * dirs)
        return t * (t - 1), (
            f"at most {t}·{max(t - 1, 0)} from {dirs} identity directories × test_fraction {frac}"
        )
    return None


def far_problems(cfg: TrialConfig) -> list[tuple[str, str]]:
    """`(key, message)` per FAR of `cfg.eval.far` that its test set cannot support."""
    known = impostor_pairs({"kind": cfg.data.kind, **cfg.data.params()})
    if known is None:
        return []
    pairs, how = known
    out = []
    for far in cfg.eval.far:
        need = min_impostors(far)
        if pairs < need:
            out.append(
                (
                    "eval.far",
                    f"TAR@FAR {far:g} needs ≥ {need:,} impostor pairs but the test set has "
                    f"{pairs:,} ({how}); raise the test set or drop this FAR (it would be n/a)",
                )
            )
    return out


def section_key_problem(where: str, section: str, sub: str) -> str | None:
    """Unknown key `sub` of a strict section named in a sweep (`train.stpes`), with a hint."""
    model = {"train": TrainCfg, "eval": EvalCfg, "debug": DebugCfg}.get(section)
    if model is None or sub in model.model_fields:
        return None
    return f"{where}.{section}.{sub}: unknown key{did_you_mean(sub, model.model_fields)}"


def section_name_hint(section: str) -> str:
    return did_you_mean(section, SECTIONS)


def without(raw: dict[str, Any], err: ValidationError) -> tuple[dict[str, Any], set[int]]:
    """A copy of `raw` without the values at the locations of `err` (the suite name becomes a
    placeholder, a rejected sweep block is remembered by index)."""
    fixed: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    bad_blocks: set[int] = set()
    for e in err.errors(include_url=False):
        loc = list(e["loc"])
        if loc[:1] == ["sweep"] and len(loc) > 1 and isinstance(loc[1], int):
            bad_blocks.add(loc[1])  # kept as an empty table, so that indices stay the same
            fixed["sweep"] = [{} if j == loc[1] else b for j, b in enumerate(fixed["sweep"])]
            continue
        loc = loc[: next((i for i, p in enumerate(loc) if isinstance(p, int)), len(loc))]
        if loc[:2] == ["suite", "name"] or (loc == ["suite"] and e["type"] == "missing"):
            suite = fixed.get("suite")
            fixed["suite"] = {**(suite if isinstance(suite, dict) else {}), "name": "suite"}
        elif len(loc) == 1 or (len(loc) == 2 and not isinstance(fixed.get(loc[0]), dict)):
            fixed.pop(loc[0], None)
        elif len(loc) >= 2 and isinstance(fixed.get(loc[0]), dict):
            fixed[loc[0]].pop(loc[1], None)
    if not isinstance(fixed.get("suite"), dict):
        fixed["suite"] = {"name": "suite"}
    return fixed, bad_blocks


# --- messages ----------------------------------------------------------------------------------


def messages(err: ValidationError) -> list[str]:
    """One line per pydantic error: `key.path: message (got value)`, unknown keys with a
    did-you-mean hint; a section's cross-field rule names the key its message starts with."""
    out = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + did_you_mean(str(e["loc"][-1]), fields_at(e["loc"]))
        fields = fields_at((*e["loc"], ""))
        if len(e["loc"]) == 1 and fields and e["type"] == "value_error":
            out += [section_rule(loc, part, fields) for part in split(msg, fields)]
            continue
        quiet = e["type"] in ("missing", "extra_forbidden") or "got " in msg  # said already
        got = "" if quiet else f" (got {short(e['input'])})"
        out.append(f"{loc or '<top level>'}: {msg}{got}")
    return out


def split(msg: str, fields: list[str]) -> list[str]:
    """A section rule's `"; "`-joined problems, one per field it starts with."""
    out, current = [], ""
    for piece in msg.split("; "):
        word = re.match(r"\w+", piece)
        if current and word and word.group(0) in fields:
            out.append(current)
            current = piece
        else:
            current = f"{current}; {piece}" if current else piece
    return [*out, current]


def section_rule(section: str, msg: str, fields: list[str]) -> str:
    word = re.match(r"\w+", msg)
    key = f"{section}.{word.group(0)}" if word and word.group(0) in fields else section
    return f"{key}: {msg}"


def fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed next to `loc[-1]` in a suite document (the fields of its table)."""
    model: type[BaseModel] = SuiteFile
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sweep_problems(i: int, block: Any) -> list[str]:
    """Shape checks of (flattened) sweep block `i`: known keys, non-empty lists of values. A
    key with a problem is removed from `block`, so that it is not reported again."""
    where = f"sweep[{i}]"
    if not isinstance(block, dict) or not block:
        return [f"{where}: must be a non-empty table of key = [values]"]
    problems = []
    for key, values in list(block.items()):
        section, _, sub = key.partition(".")
        problem = None
        if sub and section not in SECTIONS:
            problem = (
                f"{where}.{key}: unknown section {section!r}{section_name_hint(section)} "
                f"(allowed: {', '.join(SECTIONS)})"
            )
        elif sub:
            problem = section_key_problem(where, section, sub)
        elif key not in MethodCfg.model_fields:
            hint = did_you_mean(key, [*MethodCfg.model_fields, *SECTIONS])
            problem = (
                f"{where}.{key}: unknown key{hint} (allowed: {', '.join(MethodCfg.model_fields)} "
                f"or section.key for sections {', '.join(SECTIONS)})"
            )
        if problem is None and (not isinstance(values, list) or not values):
            problem = f"{where}.{key}: must be a non-empty list of values (got {short(values)})"
        if problem is not None:
            problems.append(problem)
            del block[key]
    return problems
