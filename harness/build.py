"""From a `TrialConfig` to the objects a trial trains: data, backbone, and the step function.

Validation (`check_trial`, run on every grid cell by `harness.suite`) builds the same objects
with the same functions as training does, so a parameter that a trial would reject is rejected
before anything runs. Three kinds of step (`build_step`):

- metric, plain:  emb = model(x); obj.before_loss; loss = obj(emb, y); backward; obj.after_loss
- metric, PLB:    loss = PseudoLargeBatch(model, obj, chunk=train.batch, mode)(x, y)
                  (PLB calls the objective's hooks itself, once per step with all N embeddings)
- head:           loss = head.loss(model(x), y)   (classification with a margin head)

The backbone forward runs under the trial's autocast (`harness.recipe.Precision`); losses,
mining and margins are computed on float32 embeddings (float64 ones stay float64).

Inside a process group of W > 1 ranks (`harness.ddp`) the same three steps run data-parallel,
each rank on its share of the global batch (docs/scale_out.md §5): the backbone in
DistributedDataParallel, the objective in `mining.distributed.GlobalBatchLoss` (mining and the
CB-HEM memory see the global batch, identical on every rank), PLB in chunks of train.batch / W
under `gradients_synced_after` (one all-reduce per step), a margin head replicated (DDP over
backbone + head; the logged loss is the mean over ranks).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from harness.config import TrialConfig
from harness.data import (
    DATA_KINDS,
    IvSData,
    build_data,
    image_folder,
    recordio,
    synthetic,
    validate_data,
)
from harness.data.stream import default_workers
from harness.models import MODELS, build_model
from harness.recipe import Precision
from harness.sharded_head import ShardedMarginHead, check_shardable, gather_embeddings
from mining.distributed import (
    GlobalBatchLoss,
    all_gather_rank_order,
    gradients_synced_after,
    rank_and_world_size,
)
from mining.heads import HEADS, make_head
from mining.losses import LOSSES
from mining.miners import MINERS
from mining.objective import MetricObjective
from mining.plb import PseudoLargeBatch

#: `(x, y) -> (detached loss, stats)`; gradients are left in `.grad` for the optimiser.
StepFn = Callable[[Tensor, Tensor], tuple[Tensor, dict[str, float]]]


def data(cfg: TrialConfig, results_root: Path | None = None) -> IvSData:
    """The trial's dataset (seeded by the trial's seed). A decoded-image cache
    (`data.cache = "uint8"`) lives under `results_root/.cache/data` and is produced with
    `train.workers` processes."""
    return build_data({"kind": cfg.data.kind, **cfg.data.params()}, cfg.seed,
                      cache_root=results_root, workers=workers(cfg))  # fmt: skip


def workers(cfg: TrialConfig) -> int:
    """`train.workers` resolved: "auto" = the CPUs this trial may use, at most 8."""
    return default_workers() if cfg.train.workers == "auto" else cfg.train.workers


def model(cfg: TrialConfig, ivs: IvSData) -> nn.Module:
    """The backbone for the dataset's input shape, `(B, *input_shape) -> (B, embedding)`."""
    return build_model(cfg.model.kind, ivs.input_shape, cfg.model.embedding, **cfg.model.params())


def objective_kwargs(cfg: TrialConfig) -> dict[str, Any]:
    """Keyword arguments of `mining.MetricObjective` for the trial's method."""
    m = cfg.method
    return {
        "miner": m.miner,
        "loss": m.loss,
        "margin": m.margin,
        "memory_size": m.memory,
        "memory_weight": m.memory_weight,
        "warmup_steps": m.memory_warmup,
        "enqueue": m.enqueue,
        "in_batch": m.in_batch,
        "seed": cfg.seed,
        **m.objective_params,
    }


def head(cfg: TrialConfig, num_classes: int, train_labels: Tensor | None = None) -> nn.Module:
    """The margin head `method.head` with `head_params`; class-size margins (HSM) get the
    training class counts. `head_params.sharded` (bool, default false) is the data-parallel
    layout of the head (`harness.sharded_head`), not a parameter of the head."""
    params = dict(cfg.method.head_params)
    sharded = params.pop("sharded", False)
    if not isinstance(sharded, bool):
        raise ValueError(f"sharded must be true or false; got {sharded!r}")
    h = make_head(cfg.method.head, cfg.model.embedding, num_classes, **params)
    if sharded:
        check_shardable(cfg.method.head, h)
    if train_labels is not None and hasattr(h, "count_labels"):
        h.count_labels(train_labels)
    return h


def build_step(
    cfg: TrialConfig,
    backbone: nn.Module,
    ivs: IvSData,
    device: torch.device,
    precision: Precision | None = None,
) -> tuple[StepFn, list[nn.Parameter], Any]:
    """The step function, the parameters to optimise, and the objective or head it trains
    (the stateful part a checkpoint must hold). The backbone runs under `precision`'s
    autocast; embeddings are cast to float32 (at least) before the loss; backward goes through
    its scaler (fp16). In a process group of W > 1 ranks, the data-parallel step (module
    docstring); `x`, `y` are then this rank's share of the global batch."""
    prec = precision or Precision(None, None)
    _, world = rank_and_world_size()
    net = _ddp(backbone, device) if world > 1 and not cfg.method.head else backbone

    def embed(x: Tensor) -> Tensor:
        with prec.autocast(device):
            return _at_least_float32(net(x))

    if cfg.method.head:
        h = head(cfg, ivs.num_classes, ivs.train.labels).to(device)
        params = [*backbone.parameters(), *h.parameters()]
        if world > 1 and cfg.method.head_params.get("sharded"):
            return _sharded_head_step(cfg, backbone, h, device, prec)
        if world > 1:
            return _ddp_head_step(backbone, h, device, prec, world), params, h

        def head_step(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
            emb = embed(x)
            loss = h.loss(emb, y)
            prec.backward(loss)
            return loss.detach(), {}

        return head_step, params, h

    obj = MetricObjective(**objective_kwargs(cfg))
    loss_fn = GlobalBatchLoss(obj) if world > 1 else obj
    if cfg.method.plb != "off":
        plb = PseudoLargeBatch(
            net, loss_fn, chunk_size=cfg.train.batch // world, mode=cfg.method.plb,
            autocast_dtype=prec.dtype, scaler=prec.scaler,
        )  # fmt: skip

        def plb_step(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
            synced = gradients_synced_after(net) if world > 1 else contextlib.nullcontext()
            with synced:  # W > 1: chunk backwards without communication, one all-reduce
                loss = plb(x, y)
            return loss.detach(), dict(obj.last_stats)

        return plb_step, list(backbone.parameters()), obj

    def metric_step(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        emb = embed(x)
        loss_fn.before_loss(emb.detach(), y)
        loss = loss_fn(emb, y)
        prec.backward(loss)
        loss_fn.after_loss(emb.detach(), y)
        return loss.detach(), dict(obj.last_stats)

    return metric_step, list(backbone.parameters()), obj


def _at_least_float32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _ddp(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """`module` in DDP on this rank's device (rank 0's parameters broadcast to every rank).

    Buffers (BatchNorm running statistics) are not broadcast before every forward: rank 0's
    are the ones evaluated and saved either way (a broadcast only overwrites the other ranks'),
    and without it a forward is no collective, so PLB `select` may re-forward a different
    number of chunks on each rank."""
    ids = [device.index] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


class _BackboneHead(nn.Module):
    """Backbone + margin head as one module, so that one DDP averages the gradients of both."""

    def __init__(self, backbone: nn.Module, head: nn.Module, prec: Precision, device: torch.device):
        super().__init__()
        self.backbone, self.head, self.prec, self.device = backbone, head, prec, device

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        with self.prec.autocast(self.device):
            emb = _at_least_float32(self.backbone(x))
        return self.head.loss(emb, y)


def _ddp_head_step(
    backbone: nn.Module, h: nn.Module, device: torch.device, prec: Precision, world: int
) -> StepFn:
    """Replicated head: each rank's loss is the mean over its equal share of the batch, so
    DDP's averaged gradient is the gradient of the global mean; the logged loss is the global
    mean (an all-reduce of the ranks' losses)."""
    pair = _ddp(_BackboneHead(backbone, h, prec, device), device)

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss = pair(x, y)
        prec.backward(loss)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        return mean / world, {}

    return step


def _sharded_head_step(
    cfg: TrialConfig, backbone: nn.Module, h: nn.Module, device: torch.device, prec: Precision
) -> tuple[StepFn, list[nn.Parameter], Any]:
    """Class-sharded head (`harness.sharded_head`): the backbone in DDP, the head's classes
    split across ranks (not in DDP: every rank trains its own rows); the loss is global."""
    rank, world = rank_and_world_size()
    net = _ddp(backbone, device)
    shard = ShardedMarginHead(cfg.method.head, h, rank, world)

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        with prec.autocast(device):
            emb = _at_least_float32(net(x))
        labels, _ = all_gather_rank_order(y)
        loss = shard.loss(gather_embeddings(emb, float(world)), labels)
        prec.backward(loss)
        return loss.detach(), {}

    return step, [*backbone.parameters(), *shard.parameters()], shard


# --- validation -------------------------------------------------------------------------------

_REGISTRIES: dict[str, tuple[str, Any]] = {
    # config key -> (what, registry)
    "data.kind": ("data kind", DATA_KINDS),
    "model.kind": ("model kind", MODELS),
    "miner": ("miner", MINERS),
    "loss": ("loss", LOSSES),
    "head": ("head", HEADS),
}


def registry_names(key: str) -> tuple[str, ...]:
    """Sorted valid values of a registry-backed key (`data.kind`, `model.kind`, `miner`, ...)."""
    return tuple(sorted(_REGISTRIES[key][1]))


def check_trial(cfg: TrialConfig) -> list[tuple[str, str]]:
    """Problems a trial would hit when built, as `(key, message)` pairs; empty when buildable.

    Keys are method keys (`head`, `head_params`, ...) or dotted section keys (`data.kind`), so
    that suite validation can name the sweep key that caused a problem. Cheap: the objective and
    the heads allocate no large state at construction, and data are only validated, not built.
    """
    values = {
        "data.kind": cfg.data.kind,
        "model.kind": cfg.model.kind,
        "miner": cfg.method.miner,
        "loss": cfg.method.loss,
        "head": cfg.method.head,
    }
    problems = []
    for key, value in values.items():
        what, registry = _REGISTRIES[key]
        if value is not None and value not in registry:
            allowed = ", ".join(registry_names(key))
            problems.append((key, f"unknown {what} {value!r}; allowed: {allowed}"))
    bad = {key for key, _ in problems}  # checks that need a bad name are skipped, not the rest
    if cfg.method.head and "head" not in bad:
        # num_classes=2: only the parameters are checked here; the data set the real count
        problems += _attempt("head_params", f"head_params for {cfg.method.head!r}", head, cfg, 2)
    elif not cfg.method.head and not bad & {"miner", "loss"}:
        problems += _attempt(
            "objective_params", "objective", lambda: MetricObjective(**objective_kwargs(cfg))
        )
    if cfg.pretrain.steps:
        pre = cfg.pretrain
        problems += _attempt("pretrain.head", f"pretrain head {pre.head!r}",
                             lambda: make_head(pre.head, cfg.model.embedding, 2,
                                               **pre.head_params))  # fmt: skip
        pre_data = {"kind": pre.data.kind, **pre.data.params()}
        problems += _attempt("pretrain.data", "pretrain data", validate_data, pre_data)
    if cfg.model.init is not None and not Path(cfg.model.init).is_file():
        problems.append(("model.init", f"no such file: {cfg.model.init}"))
    world, gpus = cfg.train.world_size, torch.cuda.device_count()
    if world > 1 and cfg.train.device == "cuda" and torch.cuda.is_available() and gpus < world:
        problems.append(("train.world_size",
                         f"world_size = {world} needs {world} GPUs (one per rank); {gpus} visible"))  # fmt: skip
    problems += [
        ("eval.sets", f"no such file: {p}") for p in cfg.eval.sets if not Path(p).is_file()
    ]
    if "data.kind" not in bad:
        data_cfg = {"kind": cfg.data.kind, **cfg.data.params()}
        data_problems = _attempt("data", "data", validate_data, data_cfg)
        problems += data_problems
        shape = None if data_problems else input_shape(cfg)
        if shape is not None and "model.kind" not in bad:
            problems += _attempt("model", f"model {cfg.model.kind!r}", _meta_model, cfg, shape)
    return problems


def input_shape(cfg: TrialConfig) -> tuple[int, ...] | None:
    """The model's input shape, from the data parameters alone (None where only the files say:
    `features`)."""
    kind, p = cfg.data.kind, cfg.data.params()
    if kind == "synthetic_ivs":
        return synthetic.input_shape({**synthetic.DEFAULTS, **p})
    if kind in ("image_folder", "recordio"):
        q = {**(image_folder.DEFAULTS if kind == "image_folder" else recordio.DEFAULTS), **p}
        return (q["channels"], q["image_size"], q["image_size"])
    return None


def _meta_model(cfg: TrialConfig, shape: tuple[int, ...]) -> None:
    """Build the backbone on the meta device: every parameter is checked, nothing allocated."""
    with torch.device("meta"):
        build_model(cfg.model.kind, shape, cfg.model.embedding, **cfg.model.params())


def _attempt(key: str, what: str, factory: Callable[..., Any], *args: Any) -> list[tuple[str, str]]:
    try:
        factory(*args)
    except (TypeError, ValueError, KeyError) as exc:
        return [(key, f"{what}: {exc}")]
    return []
