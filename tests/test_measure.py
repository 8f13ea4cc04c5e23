"""Measurement probes (harness/measure.py): throughput statistics, RSS, NVML absent."""

from __future__ import annotations

import resource
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness import measure


@given(
    seed=st.integers(0, 2**31 - 1),
    steps=st.integers(1, 40),
    warmup=st.integers(0, 10),
    batch=st.integers(1, 4096),
)
def test_throughput_stats_match_numpy(seed, steps, warmup, batch):
    gen = torch.Generator().manual_seed(seed)
    t = (torch.rand(steps, generator=gen, dtype=torch.float64) * 0.1 + 1e-4).tolist()
    got = measure.throughput_stats(t, batch, warmup)
    kept = np.array(t[warmup:] if steps > warmup else t)
    rates = batch / kept
    assert got["samples_per_s"] == pytest.approx(batch / np.median(kept), rel=1e-12)
    assert got["step_ms_median"] == pytest.approx(1000 * np.median(kept), rel=1e-12)
    q1, q3 = np.percentile(rates, [25, 75])
    assert got["samples_per_s_iqr"] == pytest.approx(q3 - q1, rel=1e-9, abs=1e-9)


def test_throughput_stats_empty():
    assert measure.throughput_stats([], 8, 2) == {
        "samples_per_s": None,
        "samples_per_s_iqr": None,
        "step_ms_median": None,
    }


def test_step_timer_counts_each_step():
    timer = measure.StepTimer(torch.device("cpu"))
    for _ in range(3):
        with timer.step():
            torch.ones(10).sum()
    assert len(timer.durations) == 3 and all(d >= 0 for d in timer.durations)


def _current_rss_mib() -> float:
    """Resident set size now (Linux /proc); 0 without procfs (then the test allocates past
    the whole peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return 0.0


def test_peak_rss_grows_with_allocation():
    # ru_maxrss is a high-water mark that imports and earlier tests may have set well above
    # the RSS of now: allocate past it (the gap) plus 64 MiB, all touched
    before = measure.peak_rss_mib()
    gap = max(0.0, before - _current_rss_mib())
    block = np.ones(int((gap + 64) * 2**20) // 8)
    after = measure.peak_rss_mib()
    assert block.sum() > 0
    assert after >= before + 32  # at least half of the 64 MiB past the old peak is counted


def test_allocator_peaks_null_on_cpu():
    assert measure.allocator_peaks(torch.device("cpu")) == {
        "peak_alloc_mib": None,
        "peak_reserved_mib": None,
    }


def test_nvml_absent_gives_nulls_and_one_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    monkeypatch.setattr(measure, "_nvml_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with measure.NvmlSampler(0, 0.01) as s:
                pass
    assert s.result() == {
        "nvml_peak_mib": None,
        "nvml_process_peak_mib": None,
        "nvml_samples": None,
    }
    nvml_warnings = [w for w in caught if "NVML unavailable" in str(w.message)]
    assert len(nvml_warnings) == 1


def test_nvml_without_driver_is_graceful(monkeypatch):
    """nvidia-ml-py installed but no driver (this CPU box): nulls, no exception."""
    pytest.importorskip("pynvml")
    if torch.cuda.is_available():
        pytest.skip("has a GPU: covered by the gpu test")
    monkeypatch.setattr(measure, "_nvml_warned", True)
    with measure.NvmlSampler(0, 0.01) as s:
        pass
    assert not s.available and s.reason
    assert s.result()["nvml_peak_mib"] is None


@pytest.mark.gpu
def test_nvml_and_allocator_peaks_see_an_allocation():
    dev = torch.device("cuda")
    measure.reset_allocator_peaks(dev)
    with measure.NvmlSampler(0, 0.01) as s:
        x = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)  # 256 MiB
        x.fill_(1)
        torch.cuda.synchronize()
        import time

        time.sleep(0.1)  # let the sampler see it
        del x
    peaks = measure.allocator_peaks(dev)
    assert peaks["peak_alloc_mib"] >= 256
    r = s.result()
    if s.available:
        assert r["nvml_peak_mib"] >= 256 and r["nvml_samples"] >= 2
