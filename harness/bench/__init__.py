"""Machine-normalised microbenchmarks for CI: `hembench bench`.

Absolute times on shared CI machines swing 10–30 % between runs, so every timed figure is a
**ratio to a reference measured in the same process** (`timing.measure_ratio`); the case reports
the median and the inter-quartile range (IQR) of `repeat` interleaved ratios.

- `cases`: what is timed (subject, reference, sizes per preset, exact figures);
- `timing`: how a ratio is measured;
- `baseline`: the result document, its validation and the comparison that gates CI.

A case whose module has not landed (ImportError) is *skipped* with its reason, never faked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from harness.bench.baseline import (
    DEFAULT_TOLERANCE_PCT,
    EXACT_REL_TOL,
    SCHEMA,
    BaselineError,
    Check,
    check_tolerance,
    compare_to_baseline,
    failed_cases,
    validate_document,
)
from harness.bench.cases import PRESETS, Case, Pair, all_cases
from harness.bench.timing import measure_ratio, quantiles

__all__ = [
    "DEFAULT_TOLERANCE_PCT",
    "EXACT_REL_TOL",
    "PRESETS",
    "SCHEMA",
    "BaselineError",
    "Case",
    "Check",
    "Pair",
    "all_cases",
    "check_tolerance",
    "compare_to_baseline",
    "failed_cases",
    "iter_bench",
    "measure_ratio",
    "quantiles",
    "run_bench",
    "select",
    "validate_document",
]


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda if available else cpu; otherwise `cpu` or `cuda[:i]`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def select(cases: list[Case], only: list[str] | None) -> list[Case]:
    """Cases whose name contains any of `only` (all cases when `only` is empty)."""
    if not only:
        return cases
    chosen = [c for c in cases if any(pat in c.name for pat in only)]
    if not chosen:
        names = ", ".join(c.name for c in cases)
        raise ValueError(f"--only {only} matches no benchmark; available: {names}")
    return chosen


def iter_bench(
    cases: list[Case], *, preset: str, repeat: int, min_time_s: float, device: torch.device
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Run each case, yielding `(name, record)`.

    A missing module (ImportError) yields `{"skipped": reason}`; any other exception while
    building or timing yields `{"error": message}` (the bench then fails, see `failed_cases`).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    for case in cases:
        params = case.params[preset]
        try:
            pair = case.build(device, params)
            record = {"reference": case.reference, "params": params, "exact": pair.exact}
            record.update(measure_ratio(pair, repeat, min_time_s, device))
        except ImportError as exc:
            record = {"skipped": f"module not available: {exc}"}
        except Exception as exc:  # a crashing benchmark is a finding, reported with its case
            record = {"error": f"{type(exc).__name__}: {exc}"}
        yield case.name, record


def run_bench(
    *,
    preset: str = "default",
    repeat: int,
    min_time_s: float,
    device: str = "auto",
    threads: int = 1,
    only: list[str] | None = None,
    env: dict[str, Any] | None = None,
    on_case: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the selected cases and return the JSON-serialisable result document.

    `threads` pins torch's intra-op threads for the duration (restored after): ratios depend on
    parallelism, so a baseline is only comparable at the same setting.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    dev = resolve_device(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cases: dict[str, Any] = {}
        for name, record in iter_bench(
            select(all_cases(), only),
            preset=preset,
            repeat=repeat,
            min_time_s=min_time_s,
            device=dev,
        ):
            cases[name] = record
            if on_case:
                on_case(name, record)
    finally:
        torch.set_num_threads(previous)
    return {
        "schema": SCHEMA,
        "settings": {
            "preset": preset,
            "repeat": repeat,
            "min_time_s": min_time_s,
            "device": dev.type,
            "threads": threads,
            "only": only or [],
        },
        "tolerance_pct": DEFAULT_TOLERANCE_PCT,
        "env": env or {},
        "cases": cases,
    }
