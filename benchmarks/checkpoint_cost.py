"""Checkpoint cost at the default interval (`train.checkpoint_every` = 1000 steps), issue 16.

Two configurations:
- smoke size (MLP on 16-d synthetic features, CB-HEM memory 256): a 2,000-step trial with and
  without checkpoints, in this process; the fraction is checkpoint_s / train_time_s as the
  trial's row records them.
- iresnet18 on 112×112 synthetic images with a 64k-entry CB-HEM memory (d = 512): one
  checkpoint write of the real Trainer state is timed, and so are a few training steps; the
  fraction at the default interval is t_write / (1000 · t_step) (1,000 steps of iresnet18 take
  too long on this CPU to run in full).

Run: python benchmarks/checkpoint_cost.py   (prints a markdown table)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from harness.checkpoint import save_checkpoint
from harness.suite import parse_suite
from harness.train import Trainer
from harness.trial import run_trial

SMOKE = """
[suite]
name = "ckpt"
seeds = [0]
[data]
kind = "synthetic_ivs"
identities = 256
test_identities = 128
dim = 16
lookalike_groups = 16
[model]
kind = "mlp"
embedding = 16
[train]
steps = {steps}
batch = 32
lr = 0.05
device = "cpu"
threads = 1
checkpoint_every = {every}
[baseline]
miner = "batch_hard"
loss = "triplet"
memory = 256
[eval]
far = [1e-1]
"""

IRESNET = """
[suite]
name = "ckpt"
seeds = [0]
[data]
kind = "synthetic_ivs"
identities = 512
test_identities = 64
dim = 64
modality = "images"
image_size = 112
[model]
kind = "iresnet18"
embedding = 512
[train]
steps = 4
batch = 32
device = "cpu"
warmup_steps = 1
[baseline]
miner = "batch_hard"
loss = "triplet"
memory = 65536
[eval]
far = [1e-1]
"""


def smoke() -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as d:
        row, _ = run_trial(parse_suite(SMOKE.format(steps=2000, every=1000)).trials[0],
                           workdir=Path(d))  # fmt: skip
    return row["checkpoint_s"], row["train_time_s"], row["checkpoint_bytes"]


def iresnet() -> tuple[float, float, int]:
    from harness import build

    cfg = parse_suite(IRESNET).trials[0]
    torch.manual_seed(0)
    data = build.data(cfg)
    model = build.model(cfg, data)
    trainer = Trainer(cfg, model, data, torch.device("cpu"))
    # fill the memory as a long run would have (its size, not its contents, sets the cost)
    mem = trainer.stateful
    batches = trainer.batches()
    for step in range(cfg.train.steps):
        x, y = next(batches)
        trainer.step(step, x, y)
    step_s = sorted(trainer.timer.durations)[len(trainer.timer.durations) // 2]
    if mem.memory is not None:
        mem.memory._count = mem.memory.size  # a full bank is what gets written
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        size = save_checkpoint(Path(d), 1000, trainer.state(1000))
        write_s = time.perf_counter() - t0
    return write_s, 1000 * step_s, size


if __name__ == "__main__":
    print("| configuration | checkpoint write s | training s per 1000 steps | share | bytes |")
    print("|---|---|---|---|---|")
    ck, tr, size = smoke()
    # 2000 steps at checkpoint_every = 1000: one write (none after the last step: the row is)
    print(
        f"| smoke size, MLP, M=256 (2000 steps, measured) | {ck:.3f} | {tr / 2:.1f} | "
        f"{ck / tr:.2%} | {size:,} |"
    )
    ck, tr, size = iresnet()
    print(
        f"| iresnet18 112², M=65536, d=512 (write + step timed) | {ck:.2f} | {tr:.0f} | "
        f"{ck / tr:.2%} | {size:,} |"
    )
