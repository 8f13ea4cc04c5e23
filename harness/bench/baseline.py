"""Bench result documents and the CI gate: comparing a run with a saved baseline.

Torch-free. A baseline that cannot gate (malformed, NaN or infinite figures, no cases, a NaN
tolerance) raises `BaselineError` — exit 2 before any timing — instead of passing silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SCHEMA = "hembench-bench/1"

# Default relative tolerance for a ratio slowdown, in percent, set from measured noise
# (docs/benchmarks.md, "CI regression bench"): over ten runs against a fresh baseline on the
# shared 2-core container, 90 % of the case medians lay within 13.8 % of their case's median and
# the worst single slowdown was +38 %; 50 % is > 3x the p90 spread (0/10 false alarms at >= 40 %)
# and still far below the +100 % of a 2x slowdown the gate must catch.
DEFAULT_TOLERANCE_PCT = 50.0

# Relative tolerance of figures recorded as `exact`: analytic bytes and forward counts must match
# exactly; CUDA allocator peaks get 2 % for allocator rounding across driver versions.
EXACT_REL_TOL = {"cuda_peak_bytes": 0.02}


class BaselineError(ValueError):
    """The baseline is missing, malformed or was measured under different settings (exit 2)."""


@dataclass(frozen=True)
class Check:
    """One compared figure. `change_pct` = 100·(current/baseline − 1); `limit_pct` its bound."""

    case: str
    figure: str
    baseline: float | None
    current: float | None
    change_pct: float | None
    limit_pct: float
    regressed: bool
    note: str = ""


def _number(value: Any) -> bool:
    """A finite JSON number (not a bool: `true` is an int to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_tolerance(tol: Any, what: str) -> float:
    """A ratio tolerance in percent: a finite number ≥ 0 (NaN would make every check pass)."""
    if not _number(tol) or tol < 0:
        raise BaselineError(
            f"{what}: tolerance must be a finite number of percent ≥ 0; got {tol!r}"
        )
    return float(tol)


def validate_document(doc: Any, what: str) -> dict[str, Any]:
    """Check a bench result document before it is used to gate; raise BaselineError naming
    `what` and the offending key: the schema tag, `settings` and a non-empty `cases` object,
    a finite positive `ratio.median` and finite `exact` figures per timed case, and a finite
    non-negative `tolerance_pct` when present."""
    if not isinstance(doc, dict):
        raise BaselineError(f"{what}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != SCHEMA:
        raise BaselineError(f"{what}: schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("settings", "cases"):
        if not isinstance(doc.get(key), dict):
            raise BaselineError(f"{what}: missing or non-object key {key!r}")
    if not doc["cases"]:
        raise BaselineError(f"{what}: 'cases' is empty: nothing to compare against")
    if "tolerance_pct" in doc:
        check_tolerance(doc["tolerance_pct"], f"{what}: tolerance_pct")
    for name, rec in doc["cases"].items():
        if not isinstance(rec, dict):
            raise BaselineError(f"{what}: case {name!r} is not an object")
        if "skipped" in rec or "error" in rec:
            continue
        ratio = rec.get("ratio")
        median = ratio.get("median") if isinstance(ratio, dict) else None
        if not _number(median) or median <= 0:
            raise BaselineError(
                f"{what}: case {name!r}: ratio.median must be a finite number > 0; got {median!r}"
            )
        exact = rec.get("exact", {})
        if not isinstance(exact, dict):
            raise BaselineError(f"{what}: case {name!r} has a non-object 'exact'")
        for fig, value in exact.items():
            if not _number(value):
                raise BaselineError(
                    f"{what}: case {name!r}: exact.{fig} must be a finite number; got {value!r}"
                )
    return doc


def failed_cases(doc: dict[str, Any]) -> dict[str, str]:
    """`{case: error message}` for the cases that crashed."""
    return {name: rec["error"] for name, rec in doc["cases"].items() if "error" in rec}


def compare_to_baseline(
    current: dict[str, Any], baseline: dict[str, Any], tolerance_pct: float | None = None
) -> list[Check]:
    """Compare each baseline case with the current run.

    - timed ratio: regressed when current median > baseline median · (1 + tol/100), where tol
      is `tolerance_pct`, else the baseline's own `tolerance_pct` (set from measured noise);
    - `exact` figures: regressed when |change| > EXACT_REL_TOL (0 unless listed);
    - a baseline case that is skipped or absent now is a regression (the bench lost coverage),
      unless the current run was restricted with `only` and the case is outside it;
    - a case new in `current` is reported with note "new" and passes.

    Raises BaselineError (exit 2) if the documents are malformed or their settings differ
    (preset, device, threads) or a case's sizes differ: ratios are then not comparable.
    """
    validate_document(baseline, "baseline")
    validate_document(current, "current run")
    for key in ("preset", "device", "threads"):
        b, c = baseline["settings"].get(key), current["settings"].get(key)
        if b != c:
            raise BaselineError(
                f"baseline was measured with {key}={b!r}, this run has {key}={c!r}; "
                f"re-run with the same setting or save a new baseline (--save)"
            )
    tol = check_tolerance(
        baseline.get("tolerance_pct", DEFAULT_TOLERANCE_PCT)
        if tolerance_pct is None
        else tolerance_pct,
        "baseline" if tolerance_pct is None else "--tolerance",
    )

    only = current["settings"].get("only") or []
    checks: list[Check] = []
    for name, base in baseline["cases"].items():
        if "skipped" in base or "error" in base or (only and not any(p in name for p in only)):
            continue
        cur = current["cases"].get(name)
        if cur is None or "skipped" in cur or "error" in cur:
            why = (cur.get("skipped") or cur.get("error")) if cur else "missing from this run"
            checks.append(Check(name, "ratio", base["ratio"]["median"], None, None, tol, True, why))
            continue
        if cur.get("params") != base.get("params"):
            raise BaselineError(
                f"case {name!r}: sizes differ (baseline {base.get('params')}, now {cur.get('params')})"
            )
        checks.append(_check(name, "ratio", base["ratio"]["median"], cur["ratio"]["median"], tol))
        for fig, value in base.get("exact", {}).items():
            limit = 100.0 * EXACT_REL_TOL.get(fig, 0.0)
            if fig not in cur.get("exact", {}):
                checks.append(
                    Check(name, fig, value, None, None, limit, True, "figure missing now")
                )
                continue
            checks.append(_check(name, fig, value, cur["exact"][fig], limit, two_sided=True))
    for name, cur in current["cases"].items():
        if name not in baseline["cases"] and "ratio" in cur:
            checks.append(
                Check(name, "ratio", None, cur["ratio"]["median"], None, tol, False, "new")
            )
    return checks


def _check(
    case: str, figure: str, base: float, cur: float, limit_pct: float, two_sided: bool = False
) -> Check:
    """Slower (larger) is a regression; exact figures regress on any change beyond the limit."""
    change = 100.0 * (cur / base - 1.0) if base else (0.0 if cur == base else float("inf"))
    bad = abs(change) > limit_pct if two_sided else change > limit_pct
    return Check(case, figure, base, cur, change, limit_pct, bad)
