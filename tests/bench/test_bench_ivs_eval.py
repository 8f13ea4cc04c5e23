"""IvS evaluation at scale: N = 20,000 identities (4·10⁸ impostor pairs), d = 128, TAR at FAR
1e-3…1e-6 plus EER/AUC, on CPU. Target: < 60 s and < 2 GiB peak.

Run in a fresh subprocess so that its peak RSS (ru_maxrss) is the evaluation's own. The time is
also reported as a ratio to the bare blocked similarity GEMM over the same N² pairs measured in
the same process (the unavoidable part), which is what a regression check should gate on.
Skipped unless `--benchmark-enable`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, time, torch
from harness.ivs_eval import ivs_verification
n, d = {n}, 128
g = torch.Generator().manual_seed(0)
a = torch.randn(n, d, generator=g)
b = a + 3.0 * torch.randn(n, d, generator=g)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
for s in range(0, n, 1024):
    (a[s:s + 1024] @ b.T).max()
gemm = time.perf_counter() - t
t = time.perf_counter()
out = ivs_verification(a, b, [1e-3, 1e-4, 1e-5, 1e-6])
total = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": total, "gemm_seconds": gemm, "ratio": total / gemm,
                   "peak_rss_mib": peak / 1024, "inputs_rss_mib": base / 1024, **out}}))
"""


@pytest.fixture
def enabled(request):
    opt = request.config.getoption
    if opt("benchmark_disable") and not opt("benchmark_enable"):
        pytest.skip("benchmark: run with --benchmark-enable")


def test_ivs_eval_20k(enabled):
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(n=20_000)], capture_output=True, text=True, check=True
    )
    out = json.loads(res.stdout)
    print(json.dumps(out, indent=1))
    assert out["peak_rss_mib"] < 2048
    assert 0.0 < out["tar@1e-6"] <= out["tar@1e-3"] < 1.0
