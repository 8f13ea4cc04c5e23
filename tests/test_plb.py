"""PseudoLargeBatch against explicit references.

The reference for a virtual batch is the large-batch step written out: forward every chunk
with grad (in order, from the same RNG seed, so dropout draws the same masks and train-mode BN
sees the same ghost batches), concatenate, one loss, one backward. Without dropout and BN it is
also checked against a single forward of all N rows.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from mining.objective import MetricObjective
from mining.plb import PseudoLargeBatch, chunk_bounds

TOL = {torch.float64: 1e-6, torch.float32: 1e-4}
D_IN, D_OUT = 6, 4


# -- small losses and models of the test's own ------------------------------------------------


def batch_hard_triplet(emb: Tensor, labels: Tensor, margin: float = 0.2) -> Tensor:
    """In-batch batch-hard cosine triplet: mean over anchors with a positive and a negative of
    [max_n s(a,n) − min_p s(a,p) + m]_+ (written with masks, no mining library)."""
    f = nn.functional.normalize(emb, dim=1)
    sim = f @ f.T
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    pos, neg = same & ~eye, ~same
    valid = pos.any(1) & neg.any(1)
    hardest_pos = sim.masked_fill(~pos, float("inf")).amin(1)
    hardest_neg = sim.masked_fill(~neg, float("-inf")).amax(1)
    hinge = (hardest_neg - hardest_pos + margin).clamp_min(0)
    return hinge[valid].sum() / valid.sum().clamp_min(1)


class ScaledTriplet(nn.Module):
    """A loss with its own parameter (a learnable scale on the embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        f = nn.functional.normalize(emb, dim=1) * self.scale
        return batch_hard_triplet(f, labels) + 0.1 * (f @ f.T).pow(2).mean()


class RecordingLoss:
    """Counts loss calls and records the hook arguments."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.hook_args: list[tuple[Tensor, Tensor]] = []

    def __call__(self, emb: Tensor, labels: Tensor) -> Tensor:
        self.calls.append("loss")
        return batch_hard_triplet(emb, labels)

    def before_loss(self, emb: Tensor, labels: Tensor) -> None:
        self.calls.append("before")
        self.hook_args.append((emb, labels))

    def after_loss(self, emb: Tensor, labels: Tensor) -> None:
        self.calls.append("after")
        self.hook_args.append((emb, labels))


class TupleOut(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.body(x)
        return emb, emb.sum(1)


def mlp(seed: int, dtype: torch.dtype = torch.float64, dropout: float = 0.3) -> nn.Module:
    torch.manual_seed(seed)  # parameter init only; tests fork the global RNG around this
    layers = [nn.Linear(D_IN, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, D_OUT)]
    return nn.Sequential(*layers).to(dtype)


def small_cnn(seed: int, dtype: torch.dtype = torch.float64, dropout: float = 0.3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, D_OUT),
    ).to(dtype)


def make_model(kind: str, seed: int, dtype: torch.dtype, dropout: float) -> nn.Module:
    with torch.random.fork_rng():
        return {"mlp": mlp, "cnn": small_cnn}[kind](seed, dtype, dropout)


def make_batch(kind: str, n: int, seed: int, dtype: torch.dtype, labels: str = "pairs"):
    """x for the model kind, and labels: IvS pairs (0,0,1,1,...) or random ids from a pool."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, D_IN) if kind == "mlp" else (n, 1, 6, 6)
    x = torch.randn(shape, generator=g, dtype=dtype)
    if labels == "pairs":
        y = torch.arange(n) // 2
    else:
        y = torch.randint(0, max(2, n // 3), (n,), generator=g)
    return x, y


# -- references -------------------------------------------------------------------------------


def run_plb(model, loss_fn, x, y, chunk_size, mode, seed=0, **kw):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return PseudoLargeBatch(model, loss_fn, chunk_size, mode, **kw)(x, y)


def chunked_reference(
    model, loss_fn, x, y, chunk_size, seed=0, rep_fn=None, autocast=None, scale=1.0
):
    """The large-batch step: chunks forwarded with grad in order, one loss, one backward
    (of the loss times a loss scale, as a GradScaler would)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        reps = []
        for start, stop in chunk_bounds(len(x), chunk_size):
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                out = model(x[start:stop])
            reps.append(out if rep_fn is None else rep_fn(out))
        emb = torch.cat(reps)
        loss = loss_fn(emb.to(torch.promote_types(emb.dtype, torch.float32)), y)
        (loss * scale).backward()
    return loss.detach()


def grads(*modules: nn.Module) -> list[Tensor]:
    return [
        p.grad if p.grad is not None else torch.zeros_like(p)
        for m in modules
        for p in m.parameters()
    ]


def rel_err(got: list[Tensor], want: list[Tensor]) -> float:
    diff = torch.cat([(a - b).flatten() for a, b in zip(got, want, strict=True)])
    ref = torch.cat([b.flatten() for b in want])
    return float(diff.norm() / ref.norm().clamp_min(1e-30))


def twins(kind="mlp", seed=0, dtype=torch.float64, dropout=0.3):
    model = make_model(kind, seed, dtype, dropout)
    return model, copy.deepcopy(model)


# -- K = 1 equals the plain step --------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "kind", "dropout"),
    [("exact", "cnn", 0.3), ("chunk_loss", "cnn", 0.3), ("select", "mlp", 0.0)],
)
def test_single_chunk_equals_plain_step(mode, kind, dropout):
    model, plain = twins(kind, dropout=dropout)
    x, y = make_batch(kind, 10, seed=1, dtype=torch.float64)
    loss = run_plb(model, batch_hard_triplet, x, y, chunk_size=10, mode=mode)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        want = batch_hard_triplet(plain(x), y)
        want.backward()
    assert want.item() > 0  # some active term, so the gradients are not trivially zero
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=0)
    for got, ref in zip(grads(model), grads(plain), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)
    for got, ref in zip(model.buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


# -- exact and chunk_loss give the large-batch gradient ---------------------------------------


@pytest.mark.parametrize("mode", ["exact", "chunk_loss"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_large_batch_gradient_with_dropout(mode, dtype, kind):
    model, ref = twins(kind, dtype=dtype)
    x, y = make_batch(kind, 24, seed=2, dtype=dtype)
    loss = run_plb(model, batch_hard_triplet, x, y, chunk_size=6, mode=mode, seed=7)
    want = chunked_reference(ref, batch_hard_triplet, x, y, chunk_size=6, seed=7)
    torch.testing.assert_close(loss, want, rtol=TOL[dtype], atol=0)
    assert rel_err(grads(model), grads(ref)) <= TOL[dtype]


def test_dropout_replay_matters():
    """Guard for the test above: other dropout masks change the gradient far beyond 1e-6."""
    model, ref = twins()
    x, y = make_batch("mlp", 24, seed=2, dtype=torch.float64)
    run_plb(model, batch_hard_triplet, x, y, chunk_size=6, mode="exact", seed=7)
    chunked_reference(ref, batch_hard_triplet, x, y, chunk_size=6, seed=8)
    assert rel_err(grads(model), grads(ref)) > 1e-3


@pytest.mark.parametrize("mode", ["exact", "chunk_loss", "select"])
def test_equals_single_forward_of_all_rows_without_dropout(mode):
    model, ref = twins(dropout=0.0)
    x, y = make_batch("mlp", 22, seed=3, dtype=torch.float64, labels="random")
    loss = run_plb(model, batch_hard_triplet, x, y, chunk_size=4, mode=mode)
    want = batch_hard_triplet(ref(x), y)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=0)
    assert rel_err(grads(model), grads(ref)) <= 1e-10


@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 4),
    chunk_size=st.integers(1, 5),
    remainder=st.integers(0, 4),
    labels=st.sampled_from(["pairs", "random"]),
    mode=st.sampled_from(["exact", "chunk_loss"]),
)
def test_large_batch_gradient_property(seed, k, chunk_size, remainder, labels, mode):
    n = k * chunk_size + remainder % chunk_size  # a smaller last chunk when remainder > 0
    model, ref = twins(seed=seed % 1000)
    x, y = make_batch("mlp", n, seed, torch.float64, labels)
    loss = run_plb(model, batch_hard_triplet, x, y, chunk_size, mode, seed=seed)
    want = chunked_reference(ref, batch_hard_triplet, x, y, chunk_size, seed=seed)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    assert rel_err(grads(model), grads(ref)) <= 1e-6 or max(g.abs().max() for g in grads(ref)) == 0


def test_smaller_last_chunk():
    model, ref = twins("cnn")
    x, y = make_batch("cnn", 17, seed=4, dtype=torch.float64)
    run_plb(model, batch_hard_triplet, x, y, chunk_size=5, mode="exact")
    chunked_reference(ref, batch_hard_triplet, x, y, chunk_size=5)
    assert rel_err(grads(model), grads(ref)) <= 1e-6
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.num_batches_tracked.item() == 4 for m in bn)  # chunks of 5, 5, 5, 2


# -- BatchNorm --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "chunk_loss"])
def test_bn_running_stats_updated_once_per_chunk(mode):
    model, ref = twins("cnn")
    x, y = make_batch("cnn", 16, seed=5, dtype=torch.float64)
    run_plb(model, batch_hard_triplet, x, y, chunk_size=4, mode=mode)
    with torch.no_grad(), torch.random.fork_rng():  # K plain chunked forwards
        torch.manual_seed(0)
        for start, stop in chunk_bounds(16, 4):
            ref(x[start:stop])
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf, dict(ref.named_buffers())[name], rtol=1e-12, atol=0)
    assert model[1].num_batches_tracked.item() == 4


@pytest.mark.parametrize("chunk_size", [4, 12])  # 12: K = 1, the single-chunk fast path
@pytest.mark.parametrize("mode", ["exact", "chunk_loss"])
def test_bn_freeze_uses_and_keeps_running_stats(mode, chunk_size):
    model, ref = twins("cnn")
    for m in (model, ref):  # non-trivial running stats, so eval-mode BN differs from train
        with torch.no_grad(), torch.random.fork_rng():
            m(make_batch("cnn", 8, seed=6, dtype=torch.float64)[0] * 3 + 1)
    before = [b.clone() for b in model.buffers()]
    x, y = make_batch("cnn", 12, seed=7, dtype=torch.float64)
    run_plb(model, batch_hard_triplet, x, y, chunk_size=chunk_size, mode=mode, bn="freeze")
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    chunked_reference(ref, batch_hard_triplet, x, y, chunk_size=chunk_size)
    assert rel_err(grads(model), grads(ref)) <= 1e-6
    for got, want in zip(model.buffers(), before, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(m.training for m in model.modules())


# -- select -----------------------------------------------------------------------------------


def select_reference(model, loss_fn, x, y, mask=None):
    """L(E) with E_i = f(x_i) for selected rows and the constant f(x_i).detach() otherwise;
    the default mask is {i : dL/dE_i ≠ 0} at the detached embeddings."""
    if mask is None:
        leaf = model(x).detach().requires_grad_()
        loss_fn(leaf, y).backward()
        mask = leaf.grad.ne(0).any(1)
    emb = model(x)
    loss = loss_fn(torch.where(mask[:, None], emb, emb.detach()), y)
    loss.backward()
    return loss.detach(), mask


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 20),
    chunk_size=st.integers(1, 6),
    labels=st.sampled_from(["pairs", "random"]),
    custom=st.booleans(),
)
def test_select_gradient_restricted_to_selected_paths(seed, n, chunk_size, labels, custom):
    model, ref = twins(seed=seed % 1000, dropout=0.0)
    x, y = make_batch("mlp", n, seed, torch.float64, labels)
    mask = None
    if custom:
        mask = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) < 0.5
    want, _ = select_reference(ref, ScaledTriplet().double(), x, y, mask)
    select_fn = None if mask is None else (lambda emb, labels: mask)
    loss = run_plb(model, ScaledTriplet().double(), x, y, chunk_size, "select", select_fn=select_fn)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    assert rel_err(grads(model), grads(ref)) <= 1e-10 or max(g.abs().max() for g in grads(ref)) == 0


def test_select_drops_unselected_paths():
    """A custom rule that keeps half the rows changes the gradient (so the test above can fail),
    and the default rule gives the exact gradient while re-forwarding fewer rows."""
    x, y = make_batch("mlp", 16, seed=8, dtype=torch.float64)
    exact, half, default = (make_model("mlp", 0, torch.float64, 0.0) for _ in range(3))
    loss_fn = functools.partial(batch_hard_triplet, margin=-0.3)  # some anchors inactive
    run_plb(exact, loss_fn, x, y, 4, "exact")
    keep = torch.arange(16) % 2 == 0
    run_plb(half, loss_fn, x, y, 4, "select", select_fn=lambda e, labels: keep)
    rows = []
    default.register_forward_hook(lambda m, inp, out: rows.append(len(inp[0])))
    run_plb(default, loss_fn, x, y, 4, "select")
    assert rel_err(grads(half), grads(exact)) > 1e-3
    assert rel_err(grads(default), grads(exact)) <= 1e-10
    assert sum(rows) < 2 * 16  # no-grad pass over 16 rows + a strict subset re-forwarded


# -- through the mining core: MetricObjective losses and CB-HEM memory -----------------------

OBJECTIVES = {
    "triplet": {"miner": "batch_hard", "loss": "triplet"},
    "quadruplet": {"miner": "batch_hard", "loss": "quadruplet"},
    "mps": {"miner": "bidirectional", "loss": "mps"},
    "cbhem": {"miner": "batch_hard", "loss": "triplet", "memory_size": 40, "memory_weight": 0.5},
}


def objective(name: str, dtype: torch.dtype) -> MetricObjective:
    """A MetricObjective; the CB-HEM one has a memory already filled by two past batches."""
    obj = MetricObjective(**OBJECTIVES[name], memory_dtype=dtype)
    for step in range(2):
        past, labels = make_batch("mlp", 16, seed=100 + step, dtype=dtype, labels="random")
        obj.after_loss(past[:, :D_OUT], labels + 1000 * step)
    return obj


def objective_reference(model, obj, x, y, chunk_size, seed):
    """The large-batch step through the objective's protocol: hooks once around one loss."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        emb = torch.cat([model(x[a:b]) for a, b in chunk_bounds(len(x), chunk_size)])
        obj.before_loss(emb.detach(), y)
        loss = obj(emb, y)
        loss.backward()
        obj.after_loss(emb.detach(), y)
    return loss.detach()


@pytest.mark.parametrize("mode", ["exact", "chunk_loss"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_metric_objective_large_batch_gradient(name, dtype, mode):
    model, ref = twins(dtype=dtype)
    obj, ref_obj = objective(name, dtype), objective(name, dtype)
    x, y = make_batch("mlp", 24, seed=15, dtype=dtype)
    loss = run_plb(model, obj, x, y, chunk_size=8, mode=mode, seed=3)
    want = objective_reference(ref, ref_obj, x, y, chunk_size=8, seed=3)
    assert want.item() > 0
    torch.testing.assert_close(loss, want, rtol=TOL[dtype], atol=0)
    assert rel_err(grads(model), grads(ref)) <= TOL[dtype]
    assert obj.step == ref_obj.step == 3
    if name == "cbhem":  # the memory got all N embeddings, once
        assert obj.last_stats["memory_share"] > 0
        for got, want_mem in zip(obj.memory.get(), ref_obj.memory.get(), strict=True):
            torch.testing.assert_close(got, want_mem, rtol=TOL[dtype], atol=0)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_metric_objective_select(name):
    model, ref = twins(dropout=0.0)
    obj, ref_obj = objective(name, torch.float64), objective(name, torch.float64)
    x, y = make_batch("mlp", 24, seed=16, dtype=torch.float64)
    loss = run_plb(model, obj, x, y, chunk_size=8, mode="select")
    ref_obj.before_loss(ref(x).detach(), y)
    want, _ = select_reference(ref, ref_obj, x, y)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    assert rel_err(grads(model), grads(ref)) <= 1e-10


# -- interfaces: hooks, loss parameters, tuple outputs, RNG, bad input ------------------------


@pytest.mark.parametrize(
    ("mode", "chunk_size", "loss_calls"),
    [
        ("exact", 3, 1),
        ("select", 3, 1),
        ("chunk_loss", 3, 3),
        ("exact", 9, 1),
        ("chunk_loss", 9, 1),
    ],
)  # chunk 9 = K 1: the single-chunk fast path
def test_hooks_called_once_with_all_detached_embeddings(mode, chunk_size, loss_calls):
    model = make_model("mlp", 0, torch.float64, 0.0)
    x, y = make_batch("mlp", 9, seed=9, dtype=torch.float64)
    loss_fn = RecordingLoss()
    run_plb(model, loss_fn, x, y, chunk_size, mode)
    assert loss_fn.calls == ["before"] + ["loss"] * loss_calls + ["after"]
    with torch.no_grad():
        want = model(x)
    for emb, labels in loss_fn.hook_args:
        assert not emb.requires_grad and emb.shape == (9, D_OUT)
        torch.testing.assert_close(emb, want, rtol=1e-12, atol=0)
        assert torch.equal(labels, y)


@pytest.mark.parametrize("mode", ["exact", "chunk_loss", "select"])
def test_loss_parameters_get_the_gradient_once(mode):
    model, ref = twins(dropout=0.0)
    loss_fn, ref_loss = ScaledTriplet(), ScaledTriplet()
    x, y = make_batch("mlp", 12, seed=10, dtype=torch.float64, labels="random")
    run_plb(model, loss_fn, x, y, 4, mode)
    ref_loss(ref(x), y).backward()
    assert rel_err(grads(loss_fn), grads(ref_loss)) <= 1e-10
    assert rel_err(grads(model), grads(ref)) <= 1e-10


@pytest.mark.parametrize("mode", ["exact", "chunk_loss"])
def test_tuple_output_with_rep_fn(mode):
    body, ref_body = twins("cnn")
    model, ref = TupleOut(body), TupleOut(ref_body)
    x, y = make_batch("cnn", 12, seed=11, dtype=torch.float64)
    run_plb(model, batch_hard_triplet, x, y, 4, mode, rep_fn=lambda out: out[0])
    chunked_reference(ref, batch_hard_triplet, x, y, 4, rep_fn=lambda out: out[0])
    assert rel_err(grads(model), grads(ref)) <= 1e-6
    with pytest.raises(ValueError, match="rep_fn"):
        run_plb(model, batch_hard_triplet, x, y, 4, mode)


@pytest.mark.parametrize("mode", ["exact", "chunk_loss"])
def test_global_rng_advances_as_in_a_plain_step(mode):
    model = make_model("cnn", 0, torch.float64, 0.3)
    x, y = make_batch("cnn", 12, seed=12, dtype=torch.float64)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        PseudoLargeBatch(model, batch_hard_triplet, 4, mode)(x, y)
        after_plb = torch.get_rng_state()
        torch.manual_seed(3)
        for start, stop in chunk_bounds(12, 4):
            model(x[start:stop])
        assert torch.equal(after_plb, torch.get_rng_state())


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True, "4"])
def test_rejects_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        PseudoLargeBatch(nn.Linear(2, 2), batch_hard_triplet, chunk_size)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "full"}, "mode must be one of"),
        ({"bn": "sync"}, "bn must be one of"),
        ({"mode": "exact", "select_fn": lambda e, y: y > 0}, "select_fn"),
    ],
)
def test_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PseudoLargeBatch(nn.Linear(2, 2), batch_hard_triplet, 2, **kwargs)


def test_rejects_bad_batches():
    plb = PseudoLargeBatch(nn.Linear(2, 2), batch_hard_triplet, 2)
    for x, y in [(torch.zeros(4, 2), torch.zeros(3)), (torch.zeros(0, 2), torch.zeros(0))]:
        with pytest.raises(ValueError, match="same N > 0 rows"):
            plb(x, y.long())
    bad = PseudoLargeBatch(
        nn.Linear(2, 2), batch_hard_triplet, 2, "select", select_fn=lambda e, y: y
    )
    with pytest.raises(ValueError, match="bool mask"):
        bad(torch.zeros(4, 2), torch.arange(4))


# -- mixed precision --------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [4, 16])  # 16: K = 1, the single-chunk fast path
@pytest.mark.parametrize("mode", ["exact", "chunk_loss"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_and_grad_scaler(mode, dtype, chunk_size):
    """With and without a GradScaler, the autocast PLB step equals the autocast large-batch
    step whose loss is multiplied by the scale before its backward; .grad carries the scale."""
    scale = 2.0**12
    model, scaled, ref, ref_scaled = (make_model("cnn", 0, torch.float32, 0.3) for _ in range(4))
    x, y = make_batch("cnn", 16, seed=13, dtype=torch.float32)
    c = chunk_size
    loss = run_plb(model, batch_hard_triplet, x, y, c, mode, autocast_dtype=dtype)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    run_plb(scaled, batch_hard_triplet, x, y, c, mode, autocast_dtype=dtype, scaler=scaler)
    want = chunked_reference(ref, batch_hard_triplet, x, y, c, autocast=dtype)
    chunked_reference(ref_scaled, batch_hard_triplet, x, y, c, autocast=dtype, scale=scale)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    assert rel_err(grads(model), grads(ref)) <= 1e-4
    assert rel_err(grads(scaled), grads(ref_scaled)) <= 1e-4
    # unscaled float16 gradients lose their smallest entries to underflow: hence 1e-3
    assert rel_err([g / scale for g in grads(scaled)], grads(model)) <= 1e-3


# -- CUDA -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["exact", "chunk_loss"])
def test_cuda_rng_replay_with_dropout(mode):
    model = make_model("mlp", 0, torch.float32, 0.3).cuda()
    ref, other = copy.deepcopy(model), copy.deepcopy(model)
    x, y = make_batch("mlp", 64, seed=14, dtype=torch.float32)
    x, y = x.cuda(), y.cuda()
    run_plb(model, batch_hard_triplet, x, y, 16, mode, seed=5)
    chunked_reference(ref, batch_hard_triplet, x, y, 16, seed=5)
    chunked_reference(other, batch_hard_triplet, x, y, 16, seed=6)  # other masks
    assert rel_err(grads(model), grads(ref)) <= 1e-4
    assert rel_err(grads(other), grads(ref)) > 1e-3  # the dropout masks do matter
