"""The benchmark cases of `hembench bench`: each a subject and its reference, per size preset.

References are written here from torch primitives only (a similarity GEMM, a plain training
step, a plain softmax), so a regression in `mining/` cannot move its own yardstick. Figures that
do not depend on timing (bytes of the CB-HEM buffer, number of forwards of the PLB exact step,
CUDA allocator peaks) go into `Pair.exact`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from harness.ivs_eval import ivs_verification
from mining import negatives  # `negatives.hardest_negatives` looked up per call: patchable
from mining.heads import HEADS, make_head
from mining.memory import CrossBatchMemory
from mining.objective import MetricObjective
from mining.plb import PseudoLargeBatch

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


def _build_head(name: str) -> Callable[[torch.device, dict[str, Any]], Pair]:
    def build(device: torch.device, p: dict[str, Any]) -> Pair:
        """`head.loss` (forward + cross-entropy) + backward vs a plain linear softmax step."""
        g = torch.Generator().manual_seed(3)
        b, d, c = p["batch"], p["dim"], p["classes"]
        # HSM's class-size margin needs class counts: a long tail 1..50, deterministic
        extra = {"class_counts": torch.arange(c) % 50 + 1} if name == "hsm" else {}
        head = make_head(name, d, c, **extra).to(device)
        emb = torch.randn(b, d, generator=g).to(device).requires_grad_(True)
        labels = torch.randint(0, c, (b,), generator=g).to(device)
        weight = head.weight.detach().clone().requires_grad_(True)

        def subject() -> None:
            emb.grad = None
            head.zero_grad(set_to_none=True)
            head.loss(emb, labels).backward()

        return Pair(subject, lambda: plain_softmax_step(emb, weight, labels))

    return build


def _build_ivs_eval(device: torch.device, p: dict[str, Any]) -> Pair:
    """Chunked IvS verification (TAR@FAR, EER, AUC) vs the n×n score GEMM it must at least do."""
    g = torch.Generator().manual_seed(4)
    n, d = p["identities"], p["dim"]
    ids, spots = _unit(g, n, d, device), _unit(g, n, d, device)
    spots = F.normalize(ids + 0.8 * spots, dim=1)  # genuine pairs correlated, like a trained model
    fars = [1e-1, 1e-2, 1e-3]
    return Pair(lambda: ivs_verification(ids, spots, fars), lambda: similarity_gemm(ids, spots))


def all_cases() -> list[Case]:
    """The fixed CI set; one head case per entry of the HEADS registry."""
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
    cases += [Case(f"head_{n}", "plain_softmax", _build_head(n), head_sizes) for n in sorted(HEADS)]
    cases.append(
        Case(
            "ivs_eval",
            "similarity_gemm",
            _build_ivs_eval,
            {"default": {"identities": 1024, "dim": 128}, "tiny": {"identities": 128, "dim": 16}},
        )
    )
    return cases
