"""Data-parallel trials on Ray (issue 17 item 2): `train.world_size = N > 1` as N rank actors.

Why a plain placement group and not Ray Train's `TorchTrainer`: the rank body must be the one
the local path runs (`harness.ddp.rank_body`: our process group, `GlobalBatchLoss`, rank 0's
row), and its failures must read the same (`harness.ddp.supervise`). `TorchTrainer` brings its
own process-group setup, its own `ray.train.report` protocol for results, checkpoints and
retries, and a `ray[train]` dependency; a placement group of N actors is what it builds
underneath, minus all that (docs/scale_out.md §5, "On Ray").

How a trial runs (driver: `start`, `release`; the rest runs in Ray workers):

1. the driver reserves a placement group of N bundles `{CPU: cpus_per_trial, GPU: 1 (CUDA
   trials)}`, strategy PACK (ranks on as few nodes as possible) by default;
2. it submits the trial's task, 0 CPUs, pinned to bundle 0 (it starts once the group is placed,
   on rank 0's node): `supervised_trial` runs `harness.trial.execute_trial` as a local
   worker would — same row, same statuses — with `harness.ddp.launched_by(RayLauncher(...))`,
   so that `run_ranks` starts the ranks here instead of spawning local processes;
3. `RayLauncher` creates one `_RankActor` per bundle (owned by the trial's task: they die with
   it), asks each for its node, its GPU and (rank 0) a free port, then sets the rendezvous —
   MASTER_ADDR = rank 0's node address, MASTER_PORT = that port, LOCAL_RANK /
   LOCAL_WORLD_SIZE among the ranks of the same node, and on CUDA the node's GPUs of this
   trial as every local rank's CUDA_VISIBLE_DEVICES (as torchrun and Ray Train do, so that
   NCCL can use NVLink/P2P between them) with GPU = local rank — and runs `rank_body` in
   each; `harness.ddp.supervise` watches the actors' results;
4. whatever happens (result, a rank's error or death, the trial's timeout, Ctrl-C) the actors
   are killed and the driver removes the placement group (`release`).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
import ray.exceptions

from harness.records import TrialOutcome, TrialSpec

if TYPE_CHECKING:  # the placement-group API is imported where a data-parallel trial needs it
    from ray.util.placement_group import PlacementGroup

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
START_S = 600.0  # how long the rank actors may take to start (imports on a loaded node)


def is_ddp(spec: TrialSpec) -> bool:
    """Whether the trial runs as several ranks (a placement group), not as one task."""
    return spec.config.train.world_size > 1


def rank_bundles(world: int, cpus: int, gpu: bool) -> list[dict[str, float]]:
    """One placement-group bundle per rank: its CPUs, and one GPU on CUDA."""
    return [{"CPU": float(cpus), **({"GPU": 1.0} if gpu else {})} for _ in range(world)]


def fit_problems(
    specs: list[TrialSpec], resources: dict[str, float], cpus: int, gpu: dict[str, bool]
) -> list[str]:
    """What makes a data-parallel trial impossible to place on this cluster (its totals), one
    line per distinct problem, naming `train.world_size` and the trials."""
    found: dict[str, list[str]] = {}
    for spec in filter(is_ddp, specs):
        world = spec.config.train.world_size
        if gpu[spec.trial_id] and world > resources.get("GPU", 0):
            why = (f"train.world_size = {world} needs {world} GPUs (one per rank); the Ray "
                   f"cluster has {resources.get('GPU', 0):g}")  # fmt: skip
            found.setdefault(why, []).append(spec.trial_id)
        if world * cpus > resources.get("CPU", 0):
            why = (f"train.world_size = {world} needs {world} x {cpus} CPUs (cpus_per_trial per "
                   f"rank); the Ray cluster has {resources.get('CPU', 0):g}")  # fmt: skip
            found.setdefault(why, []).append(spec.trial_id)
    return [f"{why} (trial{'s' if len(ids) > 1 else ''} {', '.join(ids[:5])}"
            f"{', ...' if len(ids) > 5 else ''})" for why, ids in found.items()]  # fmt: skip


def start(
    spec: TrialSpec, gpu: bool, cpus: int, strategy: str, trial_fn: Callable | None
) -> tuple[ray.ObjectRef, PlacementGroup]:
    """Driver side: reserve the trial's placement group and submit its task (steps 1-2)."""
    from ray.util.placement_group import placement_group

    world = spec.config.train.world_size
    pg = placement_group(rank_bundles(world, cpus, gpu), strategy=strategy)
    task = ray.remote(max_calls=1, max_retries=0)(supervised_trial)
    ref = task.options(
        num_cpus=0,
        scheduling_strategy=_in_bundle(pg, 0),
        name=f"trial-{spec.trial_id}",
    ).remote(spec, pg, gpu, cpus, trial_fn)
    return ref, pg


def release(pg: PlacementGroup | None) -> None:
    """Driver side: remove the trial's placement group (kills whatever still runs in it)."""
    if pg is not None:
        from ray.util.placement_group import remove_placement_group

        with contextlib.suppress(Exception):
            remove_placement_group(pg)


def _in_bundle(pg: PlacementGroup, index: int) -> Any:
    """The scheduling strategy that puts a task or actor into bundle `index` of `pg`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)


# --- in the trial's task --------------------------------------------------------------------------


def supervised_trial(
    spec: TrialSpec, pg: PlacementGroup, gpu: bool, cpus: int, trial_fn: Callable | None
) -> TrialOutcome:
    """Body of the trial's task: the trial as a local worker runs it, ranks on Ray."""
    from harness import ddp

    if trial_fn is None:
        from harness.trial import execute_trial

        trial_fn = execute_trial
    with ddp.launched_by(RayLauncher(pg, gpu, cpus)):
        return trial_fn(spec)


@dataclass
class RayLauncher:
    """`harness.ddp.run_ranks` on Ray: one `_RankActor` per bundle of `pg` (step 3)."""

    pg: PlacementGroup
    gpu: bool
    cpus: int

    def __call__(self, cfg, rank_fn, progress, deadline, *, threads, workdir, error_text,
                 model_fn, **rank_kwargs):  # fmt: skip
        from harness import ddp

        world = cfg.train.world_size
        actor = ray.remote(max_restarts=0, max_task_retries=0)(_RankActor)
        actors = [
            actor.options(
                num_cpus=self.cpus,
                num_gpus=1 if self.gpu else 0,
                scheduling_strategy=_in_bundle(self.pg, r),
            ).remote()
            for r in range(world)
        ]
        try:
            infos = _started(actors, [a.info.remote(r == 0) for r, a in enumerate(actors)],
                             deadline)  # fmt: skip
            args = (cfg, rank_fn, cfg.train.threads or self.cpus, workdir, error_text, model_fn,
                    rank_kwargs)  # fmt: skip
            backend = "nccl" if self.gpu else "gloo"
            refs = [
                a.run.remote(r, env, backend, cuda_index, *args)
                for r, (a, (env, cuda_index)) in enumerate(
                    zip(actors, rank_layout(infos, self.gpu), strict=True)
                )
            ]
            return ddp.supervise(_RayRanks(refs), progress, deadline)
        finally:
            for a in actors:
                with contextlib.suppress(Exception):
                    ray.kill(a, no_restart=True)


def rank_layout(infos: list[dict[str, Any]], gpu: bool) -> list[tuple[dict[str, str], int | None]]:
    """(environment, CUDA device index) of each rank from what the actors reported: rank 0's
    address and port, local ranks among the ranks of the same node (in rank order), and on
    CUDA the GPUs of the node's ranks as everyone's CUDA_VISIBLE_DEVICES, GPU = local rank."""
    world, master = len(infos), infos[0]
    by_node: dict[str, list[int]] = {}
    for r, info in enumerate(infos):
        by_node.setdefault(info["node"], []).append(r)
    out = []
    for r, info in enumerate(infos):
        peers = by_node[info["node"]]
        env = {"MASTER_ADDR": master["ip"], "MASTER_PORT": str(master["port"]),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(peers.index(r)),
               "LOCAL_WORLD_SIZE": str(len(peers))}  # fmt: skip
        # CPU ranks see no GPU, so that `train.device = "auto"` resolves as their backend does
        env["CUDA_VISIBLE_DEVICES"] = ",".join(infos[q]["cuda"] for q in peers) if gpu else ""
        out.append((env, peers.index(r) if gpu else None))
    return out


def _started(actors: list[Any], refs: list[ray.ObjectRef], deadline: float | None) -> list[dict]:
    """The actors' `info`, or `RankFailed` naming the rank that could not start."""
    from harness.ddp import RankFailed

    limit = time.monotonic() + START_S
    if deadline is not None:
        limit = min(limit, deadline)
    infos = []
    for r, ref in enumerate(refs):
        try:
            infos.append(ray.get(ref, timeout=max(0.0, limit - time.monotonic())))
        except (ray.exceptions.RayError, TimeoutError) as exc:
            raise RankFailed(f"rank {r} of {len(actors)} did not start: {died(exc)}") from None
    return infos


def died(exc: BaseException) -> str:
    """A Ray error in one line: its type and, for a dead worker, Ray's exit type and detail."""
    text = str(exc)
    m = re.search(r"Worker exit type: (\S+) Worker exit detail: ([^.]*\.)", text)
    if m:
        return f"{type(exc).__name__}: worker exit {m.group(1)}: {m.group(2)}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:300]}"


class _RayRanks:
    """The ranks' `run` calls, as `harness.ddp.supervise` sees them (a `RankGroup`)."""

    def __init__(self, refs: list[ray.ObjectRef]) -> None:
        self.refs, self.world, self.ended = refs, len(refs), set()

    def poll(self, timeout: float) -> list[tuple[str, int, Any]]:
        pending = [ref for ref in self.refs if ref not in self.ended]
        if not pending:
            time.sleep(timeout)
            return []
        ready, _ = ray.wait(pending, num_returns=1, timeout=timeout)
        events: list[tuple[str, int, Any]] = []
        for ref in ready:
            rank = self.refs.index(ref)
            self.ended.add(ref)
            try:
                kind, payload = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the actor's process died (kill -9, ...)
                events.append(("ended", rank, f"died ({died(exc)})"))
                continue
            if kind != "done":
                events.append((kind, rank, payload))
            events.append(("ended", rank, 1 if kind == "error" else 0))
        return events


class _RankActor:
    """One rank: a Ray actor in its bundle of the trial's placement group."""

    def info(self, rendezvous: bool) -> dict[str, Any]:
        """This rank's node, node address and GPU (Ray set CUDA_VISIBLE_DEVICES to the one it
        reserved); for rank 0 also a free port of its node, the rendezvous."""
        import os

        from harness.ddp import free_port

        return {
            "node": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "port": free_port("") if rendezvous else None,
        }

    def run(self, rank, env, backend, cuda_index, cfg, rank_fn, threads, workdir, error_text,
            model_fn, rank_kwargs):  # fmt: skip
        """`harness.ddp.rank_body`; rank 0 returns ("result", (row values, curves)), the others
        ("done", None), a failing rank ("error", (time, type, text)). The group is left as is:
        the launcher kills the actor (a rank that failed may hold a collective)."""
        from harness.ddp_local import name_process

        name_process(rank)
        from harness import ddp

        try:
            out = ddp.rank_body(rank, env, backend, cfg, rank_fn, threads, workdir, model_fn,
                                rank_kwargs, None, cuda_index)  # fmt: skip
        except BaseException as exc:
            return "error", ddp.error_message(exc, error_text)
        return ("result", out) if rank == 0 else ("done", None)
