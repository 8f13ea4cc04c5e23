"""Pseudo large batch (PLB): the gradient of a virtual batch of N samples at the activation
memory of one chunk of ``chunk_size`` samples (docs/methods.md §3; the variants are [recon]).

A virtual batch ``x`` (N, ...) with labels ``y`` (N,) is cut into K = ceil(N / chunk_size)
chunks of consecutive rows; the last chunk is smaller when chunk_size does not divide N.
Every mode first runs a no-grad forward of all chunks and caches the representations
R = [r_1; ...; r_K] (N, d). Then, with L = loss_fn(R, y) and G = dL/dR (N, d):

``exact`` (gradient cache, GradCache)
    backward L on the detached cache to get G; then for each chunk k re-forward x_k with grad
    under the RNG state recorded before its no-grad forward and backward the surrogate
    sum(r_k · G_k). By the chain rule dL/dθ = Σ_k J_kᵀ G_k, so the gradient is exactly the
    large-batch gradient whenever the re-forward reproduces r_k (replayed RNG, deterministic
    kernels). Cost: one extra forward per chunk, i.e. 1 + F/(F+B) times a plain step whose
    forward and backward take F and B. With K = 1 (here and in ``chunk_loss``) the one chunk is
    forwarded once with grad and kept through the loss, so K = 1 costs a plain step.
``chunk_loss``
    for each chunk k re-forward x_k with grad (replayed RNG), evaluate
    L([r_1; ...; r_k (with grad); ...; r_K]) with the other chunks as cached constants and
    backward it. Each backward gives dL/dθ through chunk k only, so the sum over k is the
    exact large-batch gradient; the loss is computed K times.
``select``
    backward L on the cache to get G, choose a subset S of rows and re-forward only S (in
    chunks of ``chunk_size`` rows, ascending index) with grad, backwarding sum(r_S · G_S); the
    rows outside S are constants whose gradient paths are dropped:
    dL/dθ ≈ Σ_{i∈S} J_iᵀ G_i. The default rule is S = {i : G_i ≠ 0} — the samples that take
    part in at least one loss term with a non-zero gradient (for a hinge loss: anchors,
    positives and negatives of the active terms) — which drops only zero contributions.
    A ``select_fn(emb (N, d), labels (N,)) -> bool (N,)`` replaces the rule (e.g. the hardest
    anchors only). It is exact only for models without train-mode BatchNorm or dropout: the
    subset's re-forward sees its own BN batch statistics and fresh dropout masks (no replay:
    a subset's rows cannot reproduce the masks drawn for whole chunks); the subset's
    re-forwards are the ones that update BN running statistics.

BatchNorm in train mode normalises each chunk by its own statistics (ghost BN with ghost batch
= chunk_size, the same as a plain step on chunks of that size). ``bn="restore"`` (default)
saves every buffer of the model before the no-grad pass and restores it afterwards, so running
statistics (and ``num_batches_tracked``) are updated once per chunk, by the grad pass.
``bn="freeze"`` puts the BatchNorm modules in eval mode for the whole call (running statistics
used and left untouched) and restores their mode afterwards.

Mixed precision: with ``autocast_dtype`` the model forwards run under ``torch.autocast``; the
cache is kept in float32 (float64 stays float64) and the loss is computed outside autocast.
With a ``scaler`` (``torch.amp.GradScaler``) the scaler multiplies the loss before its first
backward, so the cached gradient G (and each chunk-loss backward) carries the scale and the
model's ``.grad`` ends up scaled exactly as in a plain scaled step; the caller then runs
``scaler.step(optimizer)`` and ``scaler.update()``. Do not wrap the call in autocast yourself:
the backward passes it runs are not meant to run under autocast.

The global RNG advances as in a plain step over the chunks: replays run inside
``torch.random.fork_rng``. Gradients accumulate into ``.grad`` like ``backward()``; the caller
zeroes them and steps the optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

MODES = ("exact", "select", "chunk_loss")
BN_MODES = ("restore", "freeze")

LossFn = Callable[[Tensor, Tensor], Tensor]
SelectFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class RngState:
    """Generator states to replay one chunk's forward: the CPU one and one per CUDA device."""

    cpu: Tensor
    cuda: dict[int, Tensor]

    @classmethod
    def capture(cls, cuda_devices: Sequence[int]) -> RngState:
        return cls(torch.get_rng_state(), {i: torch.cuda.get_rng_state(i) for i in cuda_devices})

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the body from this state; the global generators are left as they were."""
        with torch.random.fork_rng(devices=list(self.cuda)):
            torch.set_rng_state(self.cpu)
            for device, state in self.cuda.items():
                torch.cuda.set_rng_state(state, device)
            yield


@contextlib.contextmanager
def buffers_restored(model: nn.Module) -> Iterator[None]:
    """Undo every buffer update made in the body (BN running stats, num_batches_tracked)."""
    saved = [(buf, buf.clone()) for buf in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


@contextlib.contextmanager
def batchnorm_frozen(model: nn.Module) -> Iterator[None]:
    """Put the BatchNorm modules in eval mode in the body, then restore their mode."""
    modes = [(m, m.training) for m in model.modules() if isinstance(m, _BatchNorm)]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.train(training)


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] of consecutive chunks covering range(n); the last may be smaller."""
    return [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def gradient_support(grad: Tensor) -> Tensor:
    """Default select rule: rows i of G (N, d) with any non-zero entry -> bool (N,)."""
    return grad.ne(0).any(dim=1)


class PseudoLargeBatch:
    """Large-batch gradient of ``loss_fn`` over a virtual batch, one chunk of activations at a time.

    Args:
        model: maps a chunk x_k (b, ...) to representations (b, d), or to any output from
            which ``rep_fn`` extracts them.
        loss_fn: ``loss_fn(emb (N, d), labels (N,)) -> scalar``. If it has ``before_loss`` /
            ``after_loss`` methods they are called exactly once per call with the N detached
            embeddings (e.g. ``MetricObjective`` feeding its CB-HEM memory with all N). If it is
            an ``nn.Module`` its own parameters get dL/dw once per call.
        chunk_size: rows per forward (b); a positive int.
        mode: ``"exact"``, ``"select"`` or ``"chunk_loss"`` (see the module docstring).
        rep_fn: extracts the (b, d) representation from the model output (e.g. a tuple).
        bn: ``"restore"`` (running stats updated once per chunk) or ``"freeze"`` (BN in eval).
        select_fn: ``select`` mode only: ``(emb (N, d), labels (N,)) -> bool (N,)``; default:
            the rows with a non-zero loss gradient.
        autocast_dtype: run the model forwards under ``torch.autocast`` with this dtype.
        scaler: a ``torch.amp.GradScaler``; scales the loss before its backward.

    ``__call__(x (N, ...), y (N,)) -> loss`` (detached scalar) leaves the gradient in ``.grad``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        chunk_size: int,
        mode: str = "exact",
        *,
        rep_fn: Callable[[Any], Tensor] | None = None,
        bn: str = "restore",
        select_fn: SelectFn | None = None,
        autocast_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
        if select_fn is not None and mode != "select":
            raise ValueError(f"select_fn is used only with mode='select', got mode={mode!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.mode = mode
        self.rep_fn = rep_fn
        self.bn = bn
        self.select_fn = select_fn
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if x.ndim == 0 or y.ndim != 1 or x.shape[0] != y.shape[0] or y.shape[0] == 0:
            raise ValueError(
                f"x (N, ...) and y (N,) must hold the same N > 0 rows, got x {tuple(x.shape)} "
                f"and y {tuple(y.shape)}"
            )
        bounds = chunk_bounds(x.shape[0], self.chunk_size)
        frozen = batchnorm_frozen(self.model) if self.bn == "freeze" else contextlib.nullcontext()
        with frozen:
            if len(bounds) == 1 and self.mode != "select":
                return self._single_chunk(x, y)
            cache, rng = self._cache_forward(x, bounds)
            self._hook("before_loss", cache, y)
            if self.mode == "chunk_loss":
                loss = self._chunk_loss(x, y, cache, bounds, rng)
            else:
                loss, grad = self._cache_loss(cache, y)
                if self.mode == "exact":
                    for (start, stop), state in zip(bounds, rng, strict=True):
                        with state.replayed():
                            self._backward_rows(x[start:stop], grad[start:stop])
                else:
                    self._select_backward(x, y, cache, grad)
            self._hook("after_loss", cache, y)
        return loss.detach()

    # -- the passes -------------------------------------------------------------------------

    def _single_chunk(self, x: Tensor, y: Tensor) -> Tensor:
        """K = 1 (exact, chunk_loss): the virtual batch is one chunk, whose activations the
        step holds anyway, so the cache pass and the replay are skipped: one forward with grad,
        R = its detached output, L and G = dL/dR as in ``_cache_loss``, then r.backward(G).
        Same gradient, hook calls, BN updates and RNG draws as the two-pass step, at the cost
        of a plain step (the replayed re-forward would reproduce r exactly)."""
        rep = self._forward(x)
        cache = self._promoted(rep.detach())
        self._hook("before_loss", cache, y)
        loss, grad = self._cache_loss(cache, y)
        rep.backward(grad.to(rep.dtype))
        self._hook("after_loss", cache, y)
        return loss.detach()

    def _cache_forward(
        self, x: Tensor, bounds: list[tuple[int, int]]
    ) -> tuple[Tensor, list[RngState]]:
        """No-grad forward of every chunk -> cache R (N, d), and each chunk's RNG state."""
        devices = self._cuda_devices(x)
        reps, states = [], []
        with torch.no_grad(), buffers_restored(self.model):
            for start, stop in bounds:
                states.append(RngState.capture(devices))
                reps.append(self._forward(x[start:stop]))
        return self._promoted(torch.cat(reps)), states

    def _cache_loss(self, cache: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """L = loss_fn(R, y) on a leaf copy of the cache -> (L, G = scale · dL/dR (N, d))."""
        leaf = cache.detach().requires_grad_()
        loss = self.loss_fn(leaf, y)
        self._backward_loss(loss)
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        return loss, grad

    def _chunk_loss(
        self,
        x: Tensor,
        y: Tensor,
        cache: Tensor,
        bounds: list[tuple[int, int]],
        rng: list[RngState],
    ) -> Tensor:
        # Only the first backward may reach loss_fn's own parameters: dL/dw is the same for
        # every chunk, so later chunks restrict the backward to the model's parameters.
        model_params = [p for p in self.model.parameters() if p.requires_grad]
        for k, ((start, stop), state) in enumerate(zip(bounds, rng, strict=True)):
            with state.replayed():
                rep = self._forward(x[start:stop])
            emb = torch.cat([cache[:start], rep.to(cache.dtype), cache[stop:]])
            loss = self.loss_fn(emb, y)
            self._backward_loss(loss, inputs=model_params if k else None)
        return loss

    def _select_backward(self, x: Tensor, y: Tensor, cache: Tensor, grad: Tensor) -> None:
        if self.select_fn is None:
            mask = gradient_support(grad)
        else:
            mask = torch.as_tensor(self.select_fn(cache.detach(), y), device=grad.device)
            if mask.dtype != torch.bool or mask.shape != (x.shape[0],):
                raise ValueError(
                    f"select_fn must return a bool mask of shape ({x.shape[0]},), got "
                    f"{mask.dtype} {tuple(mask.shape)}"
                )
        rows = mask.nonzero().squeeze(1)
        for start, stop in chunk_bounds(rows.numel(), self.chunk_size):
            idx = rows[start:stop]
            self._backward_rows(x[idx.to(x.device)], grad[idx])

    # -- helpers ----------------------------------------------------------------------------

    def _forward(self, x: Tensor) -> Tensor:
        autocast = (
            torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            out = self.model(x)
        rep = out if self.rep_fn is None else self.rep_fn(out)
        if not isinstance(rep, Tensor):
            raise ValueError(
                f"the model returned {type(rep).__name__}, not a Tensor: pass rep_fn= to "
                "extract the (b, d) representation"
            )
        return rep

    @staticmethod
    def _promoted(cache: Tensor) -> Tensor:
        """The cache in float32 at least (autocast outputs are half precision)."""
        return cache.to(torch.promote_types(cache.dtype, torch.float32))

    def _backward_rows(self, x: Tensor, grad: Tensor) -> None:
        """Re-forward rows x with grad and backward their cached gradient: J_xᵀ G_x."""
        rep = self._forward(x)
        rep.backward(grad.to(rep.dtype))

    def _backward_loss(self, loss: Tensor, inputs: list[Tensor] | None = None) -> None:
        """Backward the (scaled) loss; a loss without a graph (no active term) has no gradient."""
        if not loss.requires_grad:
            return
        scaled = loss if self.scaler is None else self.scaler.scale(loss)
        torch.autograd.backward(scaled, inputs=inputs)

    def _hook(self, name: str, cache: Tensor, y: Tensor) -> None:
        hook = getattr(self.loss_fn, name, None)
        if callable(hook):
            hook(cache.detach(), y)

    def _cuda_devices(self, x: Tensor) -> list[int]:
        """CUDA devices whose generators a chunk's forward may draw from: x's and the model's."""
        tensors = [x, *self.model.parameters(), *self.model.buffers()]
        return sorted({t.device.index for t in tensors if t.device.type == "cuda"})
