"""UNPG's training loss with its shared negative-pair columns vs the full (B, C' + K) logits.

UNPG appends K ≈ B²/2 negative-pair cosines as logit columns that are the same in every row.
`UNPG.loss` adds them as one shared logsumexp (mining/heads/unpg.py); the reference builds the
(B, C' + K) logits and takes `F.cross_entropy` (what `forward` returns). Both are timed, forward
+ backward, in the same process and alternated, with the base head alone as the floor:

    python benchmarks/unpg_loss.py                      # B = 256, C = 4,000, d = 64 (heads_manyshot)
    python benchmarks/unpg_loss.py --batch 512 --classes 10000 --reps 5

Prints the median ms per step of each and the ratios (full / shared, shared / base alone).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mining.heads import HEADS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--classes", type=int, default=4000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--per-identity", type=int, default=4, help="photos per identity in a batch")
    ap.add_argument("--reps", type=int, default=3, help="alternating rounds")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per round and variant")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    head = HEADS["unpg"](args.dim, args.classes, base="arcface", s=32.0)
    emb = torch.randn(args.batch, args.dim, generator=gen, requires_grad=True)
    labels = torch.arange(args.batch) // args.per_identity

    variants = {
        "full logits (B, C+K)": lambda: F.cross_entropy(head(emb, labels), labels).backward(),
        "shared columns (UNPG.loss)": lambda: head.loss(emb, labels).backward(),
        "ArcFace alone (floor)": lambda: head.base.loss(emb, labels).backward(),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, step in variants.items():
            for _ in range(args.steps):
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"B = {args.batch}, C = {args.classes}, d = {args.dim}, one thread")
    for k, v in med.items():
        print(f"  {k}: {v:.1f} ms")
    full, shared, base = med.values()
    print(f"  full / shared = {full / shared:.2f}; shared / ArcFace alone = {shared / base:.2f}")


if __name__ == "__main__":
    main()
