"""Trials that train a margin head (harness/build.py + harness/train.py)."""

from __future__ import annotations

import pytest
import torch


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
