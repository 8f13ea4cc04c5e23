"""What machine and software a measurement came from: versions, devices, NVML, git state.

Every function here degrades to ``None``/a reason string instead of raising: `hembench env`
must work on a laptop without CUDA, without nvidia-ml-py and outside a git checkout.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any


def nvml_status() -> dict[str, Any]:
    """NVML availability: ``{"available": bool, "driver": str|None, "reason": str|None}``.

    Uses the `pynvml` module shipped by the nvidia-ml-py distribution (never the deprecated
    `pynvml` PyPI package).
    """
    try:
        import pynvml
    except ImportError:
        return {"available": False, "driver": None, "reason": "nvidia-ml-py not installed"}
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return {"available": False, "driver": None, "reason": f"nvmlInit failed: {exc}"}
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        if isinstance(driver, bytes):
            driver = driver.decode()
        return {"available": True, "driver": driver, "reason": None}
    finally:
        pynvml.nvmlShutdown()


def cuda_devices() -> list[dict[str, Any]]:
    """One entry per visible CUDA device: index, name, total memory (MiB), capability."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(
            {
                "index": i,
                "name": p.name,
                "total_mib": p.total_memory // 2**20,
                "capability": f"{p.major}.{p.minor}",
            }
        )
    return out


@cache
def git_state(cwd: str | None = None) -> dict[str, Any]:
    """``{"commit": sha|None, "dirty": bool|None}`` of the checkout containing `cwd`."""
    cwd = cwd or str(Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_env() -> dict[str, Any]:
    """A flat-ish, JSON-serialisable description of this environment."""
    import torch

    from harness import __version__

    devices = cuda_devices()
    return {
        "hembench": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "gpus": devices,
        "gpu_name": devices[0]["name"] if devices else None,
        "nvml": nvml_status(),
        **{f"git_{k}": v for k, v in git_state().items()},
    }
