"""Machine-normalised microbenchmarks for CI: `hembench bench`.

Absolute times on shared CI machines swing 10–30 % between runs, so every timed figure here is a
**ratio to a reference measured in the same process**:

    ratio_i = t_subject_i / t_reference_i,   i = 1..repeat

with subject and reference interleaved (A,B then B,A, alternating, so slow drift of the machine
cancels) and each timing long enough (≥ `min_time_s`, several calls) to swamp timer resolution.
The case reports the median and the inter-quartile range (IQR) of the `repeat` ratios.

References are written here from torch primitives only (a similarity GEMM, a plain training
step, a plain softmax), so a regression in `mining/` cannot move its own yardstick.

Figures that do not depend on timing (bytes of the CB-HEM buffer, number of forwards of the PLB
exact step, CUDA allocator peaks) are recorded as `exact` and compared with a tight tolerance.

A case whose module has not landed (ImportError) is *skipped* with its reason, never faked.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

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

PRESETS = ("default", "tiny")


@dataclass
class Pair:
    """One timed comparison: `subject()` against `reference()`; both run the full work once."""

    subject: Callable[[], Any]
    reference: Callable[[], Any]
    exact: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """A named benchmark: `build(device, params) -> Pair`, and the reference's name."""

    name: str
    reference: str
    build: Callable[[torch.device, dict[str, Any]], Pair]
    params: dict[str, dict[str, Any]]  # preset -> sizes


# --------------------------------------------------------------------------------------------
# references (torch primitives only)


def _unit(g: torch.Generator, n: int, d: int, device: torch.device) -> torch.Tensor:
    """(n, d) random rows of unit L2 norm."""
    return F.normalize(torch.randn(n, d, generator=g), dim=1).to(device)


def _pair_labels(n: int, device: torch.device) -> torch.Tensor:
    """IvS batch labels: identities 0,0,1,1,... (ID photo and spot photo of each identity)."""
    return torch.arange(n, device=device) // 2


def similarity_gemm(anchors: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """Reference floor of every mining step: the (B, d) x (d, M) similarity GEMM."""
    return anchors @ cands.T


def plain_softmax_step(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    """Reference for margin heads: logits = emb · Wᵀ (B, C), cross-entropy, backward."""
    emb.grad = weight.grad = None
    F.cross_entropy(emb @ weight.T, labels).backward()


def batch_hard_triplet(
    emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2
) -> torch.Tensor:
    """In-batch batch-hard cosine triplet loss, written out (the PLB bench's loss and reference).

    emb (N, d) raw, labels (N,). L = mean_a [max_n s(a,n) − min_p s(a,p) + m]_+.
    """
    f = F.normalize(emb, dim=1)
    s = f @ f.T
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    hardest_neg = s.masked_fill(same, -2.0).amax(dim=1)
    hardest_pos = s.masked_fill(~same | eye, 2.0).amin(dim=1)
    return F.relu(hardest_neg - hardest_pos + margin).mean()


def _mlp(din: int, hidden: int, dout: int, device: torch.device, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(din, hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(hidden, dout),
        ).to(device)


def _cuda_peak(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """`{"cuda_peak_bytes": max_memory_allocated during fn minus what was allocated before}`."""
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return {"cuda_peak_bytes": float(torch.cuda.max_memory_allocated(device) - before)}


# --------------------------------------------------------------------------------------------
# cases


def _build_cbhem_mine(device: torch.device, p: dict[str, Any]) -> Pair:
    """hardest_negatives over batch ∪ memory (B + M candidates) vs the bare similarity GEMM."""
    import mining.negatives as negatives  # attribute looked up per call: monkeypatchable
    from mining.memory import CrossBatchMemory

    g = torch.Generator().manual_seed(0)
    b, m, d = p["batch"], p["memory"], p["dim"]
    anchors, labels = _unit(g, b, d, device), _pair_labels(b, device)
    cands = torch.cat([anchors, _unit(g, m, d, device)])
    cand_labels = torch.cat([labels, torch.arange(b, b + m, device=device)])
    exclude = torch.arange(b, device=device)

    def subject() -> Any:
        return negatives.hardest_negatives(
            anchors, labels, cands, cand_labels, k=1, exclude_self=exclude
        )

    buffer = CrossBatchMemory(m, d, dtype=torch.float32, device=device)
    exact = {
        # fp32 embeddings + int64 labels and write steps + int8 domains
        "buffer_bytes_analytic": float(m * d * 4 + m * 8 * 2 + m),
        "buffer_bytes": float(
            sum(t.nbytes for t in buffer.state_dict().values() if torch.is_tensor(t))
        ),
        **_cuda_peak(subject, device),
    }
    return Pair(subject, lambda: similarity_gemm(anchors, cands), exact)


def _build_cbhem_step(device: torch.device, p: dict[str, Any]) -> Pair:
    """MetricObjective (batch-hard triplet + full CB-HEM memory), fwd+bwd, vs the GEMM floor."""
    from mining.objective import MetricObjective

    g = torch.Generator().manual_seed(1)
    b, m, d = p["batch"], p["memory"], p["dim"]
    obj = MetricObjective(miner="batch_hard", loss="triplet", margin=0.2, memory_size=m)
    labels = _pair_labels(b, device)
    for step in range(m // b + 1):  # fill the memory with distinct past identities
        past = _unit(g, b, d, device)
        obj.before_loss(past, labels + (step + 1) * b)
        obj.after_loss(past, labels + (step + 1) * b)
    emb = _unit(g, b, d, device).requires_grad_(True)
    cands = torch.cat([emb.detach(), _unit(g, m, d, device)])

    def subject() -> None:
        emb.grad = None
        obj(emb, labels).backward()

    return Pair(subject, lambda: similarity_gemm(emb.detach(), cands), _cuda_peak(subject, device))


def _build_plb_exact(device: torch.device, p: dict[str, Any]) -> Pair:
    """PLB exact (gradient cache) at N = K·b vs one plain fwd+bwd step on all N samples."""
    from mining.plb import PseudoLargeBatch

    g = torch.Generator().manual_seed(2)
    k, b, din = p["chunks"], p["chunk"], p["input"]
    model = _mlp(din, p["hidden"], p["dim"], device, seed=2)
    x = torch.randn(k * b, din, generator=g).to(device)
    y = _pair_labels(k * b, device)
    plb = PseudoLargeBatch(model, batch_hard_triplet, chunk_size=b, mode="exact")

    forwards = 0

    def count(*_: Any) -> None:
        nonlocal forwards
        forwards += 1

    handle = model.register_forward_hook(count)
    model.zero_grad()
    plb(x, y)
    handle.remove()

    def subject() -> None:
        model.zero_grad(set_to_none=True)
        plb(x, y)

    def reference() -> None:
        model.zero_grad(set_to_none=True)
        batch_hard_triplet(model(x), y).backward()

    return Pair(subject, reference, {"forwards": float(forwards), **_cuda_peak(subject, device)})


def _head_names() -> list[str]:
    try:
        from mining.heads import HEADS
    except ImportError:
        return []
    return sorted(HEADS)


def _build_head(name: str) -> Callable[[torch.device, dict[str, Any]], Pair]:
    def build(device: torch.device, p: dict[str, Any]) -> Pair:
        """HEADS[name] forward + cross-entropy + backward vs a plain linear softmax step."""
        from mining.heads import HEADS

        g = torch.Generator().manual_seed(3)
        b, d, c = p["batch"], p["dim"], p["classes"]
        # HSM's class-size margin needs class counts: a long tail 1..50, deterministic
        extra = {"class_counts": torch.arange(c) % 50 + 1} if name == "hsm" else {}
        head = HEADS[name](d, c, **extra).to(device)
        emb = torch.randn(b, d, generator=g).to(device).requires_grad_(True)
        labels = torch.randint(0, c, (b,), generator=g).to(device)
        weight = head.weight.detach().clone().requires_grad_(True)

        def subject() -> None:
            emb.grad = None
            head.zero_grad(set_to_none=True)
            F.cross_entropy(head(emb, labels), labels).backward()

        return Pair(subject, lambda: plain_softmax_step(emb, weight, labels))

    return build


def _build_ivs_eval(device: torch.device, p: dict[str, Any]) -> Pair:
    """Chunked IvS verification (TAR@FAR, EER, AUC) vs the n×n score GEMM it must at least do."""
    from harness.metrics import ivs_verification

    g = torch.Generator().manual_seed(4)
    n, d = p["identities"], p["dim"]
    ids, spots = _unit(g, n, d, device), _unit(g, n, d, device)
    spots = F.normalize(ids + 0.8 * spots, dim=1)  # genuine pairs correlated, like a trained model
    fars = [1e-1, 1e-2, 1e-3]
    return Pair(lambda: ivs_verification(ids, spots, fars), lambda: similarity_gemm(ids, spots))


def all_cases() -> list[Case]:
    """The fixed CI set; heads are enumerated from the HEADS registry when it exists."""
    mine = {"default": {"batch": 128, "dim": 128}, "tiny": {"batch": 32, "dim": 32}}
    cases = [
        Case(
            f"cbhem_mine_M{label}",
            "similarity_gemm",
            _build_cbhem_mine,
            {
                "default": {**mine["default"], "memory": m},
                "tiny": {**mine["tiny"], "memory": m // 32},
            },
        )
        for label, m in (("8k", 8192), ("32k", 32768))
    ]
    cases.append(
        Case(
            "cbhem_step_M8k",
            "similarity_gemm",
            _build_cbhem_step,
            {
                "default": {**mine["default"], "memory": 8192},
                "tiny": {**mine["tiny"], "memory": 256},
            },
        )
    )
    cases.append(
        Case(
            "plb_exact_K4",
            "plain_step",
            _build_plb_exact,
            {
                "default": {"chunks": 4, "chunk": 128, "input": 256, "hidden": 512, "dim": 128},
                "tiny": {"chunks": 4, "chunk": 16, "input": 32, "hidden": 64, "dim": 16},
            },
        )
    )
    head_sizes = {
        "default": {"batch": 256, "dim": 128, "classes": 4096},
        "tiny": {"batch": 32, "dim": 16, "classes": 128},
    }
    cases += [Case(f"head_{n}", "plain_softmax", _build_head(n), head_sizes) for n in _head_names()]
    cases.append(
        Case(
            "ivs_eval",
            "similarity_gemm",
            _build_ivs_eval,
            {"default": {"identities": 1024, "dim": 128}, "tiny": {"identities": 128, "dim": 16}},
        )
    )
    return cases


# --------------------------------------------------------------------------------------------
# timing


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


# --------------------------------------------------------------------------------------------
# the bench


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


# --------------------------------------------------------------------------------------------
# comparison with a baseline


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


def validate_document(doc: Any, what: str) -> dict[str, Any]:
    """Check the shape of a bench result document; raise BaselineError naming `what` if bad."""
    if not isinstance(doc, dict):
        raise BaselineError(f"{what}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != SCHEMA:
        raise BaselineError(f"{what}: schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("settings", "cases"):
        if not isinstance(doc.get(key), dict):
            raise BaselineError(f"{what}: missing or non-object key {key!r}")
    for name, rec in doc["cases"].items():
        if not isinstance(rec, dict):
            raise BaselineError(f"{what}: case {name!r} is not an object")
        if "skipped" in rec or "error" in rec:
            continue
        median = rec.get("ratio", {}).get("median") if isinstance(rec.get("ratio"), dict) else None
        if not isinstance(median, (int, float)) or median <= 0:
            raise BaselineError(f"{what}: case {name!r} has no positive ratio.median")
        if not isinstance(rec.get("exact", {}), dict):
            raise BaselineError(f"{what}: case {name!r} has a non-object 'exact'")
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
    tol = (
        tolerance_pct
        if tolerance_pct is not None
        else baseline.get("tolerance_pct", DEFAULT_TOLERANCE_PCT)
    )
    if not isinstance(tol, (int, float)) or tol < 0:
        raise BaselineError(f"tolerance must be a non-negative number of percent, got {tol!r}")

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
