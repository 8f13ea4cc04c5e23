"""The training step pieces (harness/train.py): MomentumSGD vs torch.optim.SGD."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness.train import MomentumSGD


@given(
    seed=st.integers(0, 2**31 - 1),
    lr=st.floats(1e-3, 1.0),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    wd=st.sampled_from([0.0, 5e-4, 1e-2]),
    steps=st.integers(1, 5),
)
def test_momentum_sgd_matches_torch_sgd(seed, lr, momentum, wd, steps):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(steps)]
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = MomentumSGD([a], lr=lr, momentum=momentum, weight_decay=wd)
    ref = torch.optim.SGD([b], lr=lr, momentum=momentum, weight_decay=wd)
    for g in grads:
        ours.zero_grad()
        ref.zero_grad()
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


def test_momentum_sgd_skips_params_without_grad():
    p = torch.nn.Parameter(torch.ones(2))
    opt = MomentumSGD([p], lr=0.1, momentum=0.9, weight_decay=0.1)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(2))


@pytest.mark.parametrize("head", ['head = "hsm"', 'head = "unpg"\nhead_params = {base = "hsm"}'])
def test_hsm_head_trial_gets_class_counts_from_the_training_labels(head):
    """HSM's class-size margin needs n_j; the trainer counts them from the training split
    (a trial used to fail with 'class count is 0' on its first batch), also under UNPG."""
    from harness.suite import parse_suite
    from harness.trial import run_trial

    suite = parse_suite(
        f"""
[suite]
name = "hsm"
seeds = [0]
[data]
kind = "synthetic_ivs"
identities = 64
test_identities = 16
dim = 8
lookalike_groups = 4
imbalance = 1.5
[model]
kind = "mlp"
embedding = 8
[train]
steps = 3
batch = 16
device = "cpu"
[baseline]
{head}
[eval]
far = [1e-1]
"""
    )
    row, curves = run_trial(suite.trials[0])
    assert len(curves["loss"]) >= 1
    assert torch.isfinite(torch.tensor(row["final_loss"]))
