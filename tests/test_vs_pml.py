"""Our CB-HEM batch-hard triplet equals pytorch-metric-learning's on the same inputs.

Setting where the two definitions coincide (float32, cosine similarity):
- PML: ``CrossBatchMemory(TripletMarginLoss(margin, distance=CosineSimilarity()),
  miner=BatchHardMiner(distance=CosineSimilarity()))``. It enqueues the batch *before* mining and
  mines positives and negatives in the memory (which then holds the batch's own copies).
- Ours: ``MetricObjective("batch_hard", "triplet", enqueue="before", in_batch=True,
  reduction="mean_nonzero")``: positives in the batch, negatives in batch ∪ memory.
- IvS batches (P identities × 2) and identities never repeat across steps, so PML's positive (the
  partner's memory copy) has the same similarity as ours (the partner itself), and its memory
  copies of batch rows duplicate our in-batch negatives. Loss values coincide; gradients do not
  (PML's positives and negatives are detached memory rows), so only the loss is compared.
- Memory sizes that are a multiple of B (PML asserts B ≤ M and wraps per row like ours).
"""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.distances import CosineSimilarity

from mining.objective import MetricObjective


@pytest.mark.parametrize(("memory_size", "steps"), [(16, 3), (48, 5), (40, 6)])
@pytest.mark.parametrize("margin", [0.1, 0.5])
def test_batch_hard_triplet_over_memory_matches_pml(memory_size, steps, margin):
    gen = torch.Generator().manual_seed(memory_size + steps)
    pairs, dim = 8, 12
    pml = losses.CrossBatchMemory(
        losses.TripletMarginLoss(margin=margin, distance=CosineSimilarity()),
        embedding_size=dim,
        memory_size=memory_size,
        miner=miners.BatchHardMiner(distance=CosineSimilarity()),
    )
    ours = MetricObjective(
        "batch_hard", "triplet", margin=margin, memory_size=memory_size, enqueue="before"
    )
    compared = 0
    for step in range(steps):
        x = torch.randn(2 * pairs, dim, generator=gen)
        y = torch.arange(pairs).repeat_interleave(2) + step * pairs  # new identities each step
        ours.before_loss(x, y)
        got = ours(x, y)
        ours.after_loss(x, y)
        want = pml(x, y)
        assert torch.allclose(got, want, atol=1e-5), (step, float(got), float(want))
        compared += float(want) > 0
    assert compared == steps  # every step had a non-trivial loss
