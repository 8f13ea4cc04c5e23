"""Interleaved ratio timing: t_subject / t_reference, measured in the same process.

    ratio_i = t_subject_i / t_reference_i,   i = 1..repeat

Subject and reference alternate (A,B then B,A, ...) so slow drift of the machine cancels, and
each timing is long enough (≥ `min_time_s`, several calls) to swamp timer resolution.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from harness.bench.cases import Pair


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Mean seconds per call over `calls` back-to-back calls (synchronised on CUDA)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / calls


def _calls_for(fn: Callable[[], Any], min_time_s: float, device: torch.device) -> int:
    """How many back-to-back calls make one timing last ≥ min_time_s (after one warm-up call)."""
    fn()
    per_call = _time_once(fn, 1, device)
    return max(1, int(min_time_s / max(per_call, 1e-7)) + 1)


def quantiles(values: list[float]) -> dict[str, float]:
    """Median, first and third quartile (inclusive method), IQR and n of `values`."""
    if len(values) == 1:
        q1 = med = q3 = values[0]
    else:
        q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(values)}


def measure_ratio(
    pair: Pair, repeat: int, min_time_s: float, device: torch.device
) -> dict[str, Any]:
    """Interleaved, repeated ratio t_subject / t_reference: quantiles of the `repeat` ratios.

    Rounds alternate the order (A,B), (B,A), ... so that a machine that speeds up or slows down
    during the case biases neither side.
    """
    n_subject = _calls_for(pair.subject, min_time_s, device)
    n_reference = _calls_for(pair.reference, min_time_s, device)
    ratios, subject_s, reference_s = [], [], []
    for i in range(repeat):
        if i % 2 == 0:
            ts = _time_once(pair.subject, n_subject, device)
            tr = _time_once(pair.reference, n_reference, device)
        else:
            tr = _time_once(pair.reference, n_reference, device)
            ts = _time_once(pair.subject, n_subject, device)
        ratios.append(ts / tr)
        subject_s.append(ts)
        reference_s.append(tr)
    return {
        "ratio": quantiles(ratios),
        "subject_ms": 1e3 * statistics.median(subject_s),
        "reference_ms": 1e3 * statistics.median(reference_s),
    }
