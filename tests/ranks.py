"""Spawning gloo ranks in tests: each rank runs `worker(rank, init_file, out_dir)`, joins the
process group through `file://<init_file>` and saves what it saw to `<out_dir>/rank<r>.pt`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp


def spawn_ranks(worker: Callable[[int, str, str], None], tmp: Path, world: int) -> list[dict]:
    """Run `worker` on `world` spawned ranks; returns what each rank saved, in rank order."""
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp)), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
