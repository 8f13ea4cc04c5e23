"""Measurement: step timing/throughput, torch allocator peaks, an NVML sampler, peak RSS and
RSS net of a trial's setup (`RssWatermark`). Live tensor bytes on the CPU: `harness.live_memory`.

Every probe degrades to `None` rather than raising: a trial on a laptop without CUDA or without
nvidia-ml-py still produces a row (with null columns), and NVML problems warn once per process.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

MIB = 2**20
_nvml_warned = False


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so that a host-side clock measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Per-step wall-clock durations, CUDA-synchronised at both step boundaries.

    Use `with timer.step(): ...` around exactly the work of one optimisation step; anything
    outside (logging, probes, evaluation) is not counted.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.durations: list[float] = []

    def step(self) -> _TimedStep:
        return _TimedStep(self)


class _TimedStep:
    def __init__(self, timer: StepTimer):
        self.timer = timer

    def __enter__(self) -> None:
        synchronize(self.timer.device)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        synchronize(self.timer.device)
        self.timer.durations.append(time.perf_counter() - self.t0)


def throughput_stats(
    durations: Sequence[float], samples_per_step: int, warmup_steps: int
) -> dict[str, float | None]:
    """Throughput over the steps after `warmup_steps`.

    samples_per_s (median) = samples_per_step / median(t); samples_per_s_iqr = Q3 − Q1 of the
    per-step rates samples_per_step / t_i; step_ms_median = 1000·median(t). When warm-up would
    leave no step, all steps are used (a 3-step smoke trial still reports something).
    Returns None values when there are no steps at all.
    """
    t = np.asarray(durations[warmup_steps:] or durations, dtype=np.float64)
    if t.size == 0:
        return {"samples_per_s": None, "samples_per_s_iqr": None, "step_ms_median": None}
    rates = samples_per_step / t
    q1, q3 = np.percentile(rates, [25, 75])
    return {
        "samples_per_s": float(samples_per_step / np.median(t)),
        "samples_per_s_iqr": float(q3 - q1),
        "step_ms_median": float(1000 * np.median(t)),
    }


def reset_allocator_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def allocator_peaks(device: torch.device) -> dict[str, float | None]:
    """torch caching-allocator peaks since the last reset, in MiB (None off CUDA)."""
    if device.type != "cuda":
        return {"peak_alloc_mib": None, "peak_reserved_mib": None}
    return {
        "peak_alloc_mib": torch.cuda.max_memory_allocated(device) / MIB,
        "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / MIB,
    }


_peak_floor_mib = 0.0  # the peak before the latest `reset_peak_rss`: peak_rss_mib stays whole


def peak_rss_mib() -> float:
    """Peak resident set size of this process, in MiB (ru_maxrss: KiB on Linux, bytes on macOS),
    resets by `reset_peak_rss` included.

    In a worker process per trial this is the trial's own peak (workers are forked from the
    forkserver, and a forked child's peak starts at its own RSS; a spawned one would inherit the
    runner's peak through exec: docs/methods.md §7); in-process it is the peak of the whole
    session so far.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(_peak_floor_mib, rss / MIB if sys.platform == "darwin" else rss / 1024)


def current_rss_mib() -> float | None:
    """Resident set size of this process now, in MiB (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / MIB
    except (OSError, IndexError, ValueError):
        return None


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter from the current RSS (Linux: "5" written to
    /proc/self/clear_refs resets VmHWM and ru_maxrss); True if it was reset. The peak before is
    kept for `peak_rss_mib`."""
    global _peak_floor_mib
    before = peak_rss_mib()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:  # not Linux, or /proc read-only
        return False
    _peak_floor_mib = before
    return True


def _hwm_rss_mib() -> float | None:
    """VmHWM (the peak RSS since the process started or its last reset), in MiB."""
    try:
        with open("/proc/self/status") as fh:
            line = next(ln for ln in fh if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration, IndexError, ValueError):
        return None


class RssWatermark:
    """The RSS of a trial after its setup, and how far above it the RSS went afterwards.

    Created at the end of setup (data, model, objective and optimiser built, before the first
    step): records the RSS then and restarts the kernel's peak counter. `result()` after
    training gives, in MiB: `rss_setup_mib` (RSS after setup), `rss_net_mib` (peak RSS since
    then − rss_setup_mib: what training itself added — memory bank, optimiser state,
    activations, allocator slack — free of whatever the process held before) and
    `peak_rss_mib` (the process's peak, setup included, as before). Without /proc (macOS) the
    net figure is None unless the peak rose during training (then the peak is training's).
    """

    def __init__(self) -> None:
        self.peak_before = peak_rss_mib()
        self.setup = current_rss_mib()
        self.reset = reset_peak_rss()

    def result(self) -> dict[str, float | None]:
        peak = peak_rss_mib()
        since = _hwm_rss_mib() if self.reset else (peak if peak > self.peak_before else None)
        net = None if since is None or self.setup is None else max(0.0, since - self.setup)
        return {"peak_rss_mib": peak, "rss_setup_mib": self.setup, "rss_net_mib": net}


def _warn_nvml_once(reason: str) -> None:
    global _nvml_warned
    if not _nvml_warned:
        _nvml_warned = True
        warnings.warn(f"NVML unavailable, nvml_* columns will be null: {reason}", stacklevel=3)


class NvmlSampler:
    """Background thread sampling GPU memory through NVML every `interval_s` seconds.

    Reports the peak of the device's used memory (`nvmlDeviceGetMemoryInfo`, the v2 struct
    where the driver has it, whose `used` excludes driver-reserved memory) and the peak of this
    process's own usage (`nvmlDeviceGetComputeRunningProcesses`, matched by pid), in MiB.

    Usage: `with NvmlSampler(device_index) as s: ...; s.result()`. Without nvidia-ml-py or
    with NVML failing, `result()` gives None values and one warning per process is issued.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.05):
        self.device_index = device_index
        self.interval_s = interval_s
        self.available = False
        self.reason: str | None = None
        self.samples = 0
        self._peak_device = 0
        self._peak_process: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> NvmlSampler:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded
            self.reason = f"{type(exc).__name__}: {exc}"
            _warn_nvml_once(self.reason)
            return self
        self._nvml = pynvml
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
            self._read()  # fail here, in the caller's thread, if reads are unsupported
        except Exception as exc:
            self.reason = f"{type(exc).__name__}: {exc}"
            _warn_nvml_once(self.reason)
            pynvml.nvmlShutdown()
            return self
        self.available = True
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def _memory_used(self) -> int:
        nv = self._nvml
        version = getattr(nv, "nvmlMemory_v2", None)
        if version is not None:
            try:
                return nv.nvmlDeviceGetMemoryInfo(self._handle, version=version).used
            except Exception:  # older driver: v2 not supported, fall back to v1
                pass
        return nv.nvmlDeviceGetMemoryInfo(self._handle).used

    def _process_used(self) -> int | None:
        pid = os.getpid()
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:  # not supported (e.g. some vGPU/MIG setups): leave it null
            return None
        for p in procs:
            if p.pid == pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
        return None

    def _read(self) -> None:
        self._peak_device = max(self._peak_device, self._memory_used())
        proc = self._process_used()
        if proc is not None:
            self._peak_process = max(self._peak_process or 0, proc)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._read()
            except Exception:  # a transient NVML error must not kill the trial
                continue

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._read()  # one final sample after the work
            self._nvml.nvmlShutdown()

    def result(self) -> dict[str, Any]:
        """`{"nvml_peak_mib", "nvml_process_peak_mib", "nvml_samples"}` (None when unavailable)."""
        if not self.available:
            return {"nvml_peak_mib": None, "nvml_process_peak_mib": None, "nvml_samples": None}
        proc = None if self._peak_process is None else self._peak_process / MIB
        return {
            "nvml_peak_mib": self._peak_device / MIB,
            "nvml_process_peak_mib": proc,
            "nvml_samples": self.samples,
        }
