"""One trial as 2 gloo ranks on CPU (`train.world_size = 2`, harness/ddp.py) against the same
trial in one process, and the failure of a rank (issue 17).

Each 2-rank trial spawns two fresh interpreters (seconds each on a loaded machine), so every
test runs one or two of them. Equivalence is checked two ways:

- float64, BatchNorm-free backbone (`model_fn`, the same in both runs): the 2-rank curve and the
  CB-HEM memory after 20 steps equal the 1-process ones to 1e-12 (rounding only);
- the real `mlp` backbone (BatchNorm) in float32: BatchNorm normalises each rank's chunk of
  train.batch / W rows, so the 1-process reference is the same virtual batch in PLB chunks of
  train.batch / W; curves agree to 1e-5 and memories to 1e-5.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from harness import ddp
from harness.records import TrialTimeout
from harness.suite import parse_suite
from harness.trial import _run, classify, error_text, run_trial

STEPS = 20


def _cfg(world: int, *, batch: int = 16, steps: int = STEPS + 1, method: str = "", debug: str = ""):
    return parse_suite(
        f"""
[suite]
name = "ddp"
seeds = [0]
[data]
kind = "synthetic_ivs"
identities = 96
test_identities = 16
dim = 8
[model]
kind = "mlp"
embedding = 8
hidden = 16
[train]
steps = {steps}
batch = {batch}
lr = 0.05
device = "cpu"
threads = 1
world_size = {world}
checkpoint_every = {STEPS}
save_model = true
[baseline]
{method}
[debug]
{debug}
[eval]
far = [1e-1]
"""
    ).trials[0]


METRIC = 'memory = 48\nplb = "exact"\nvirtual_batch = 32'


class Float64Net(nn.Module):
    """A BatchNorm-free float64 backbone: rank shares and whole batches normalise alike."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.l1 = nn.Linear(d_in, 16, dtype=torch.float64)
        self.l2 = nn.Linear(16, d_out, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x.double())))


def float64_net(cfg, data) -> nn.Module:
    return Float64Net(data.input_shape[0], cfg.model.embedding)


def float64_net_float32_out(cfg, data) -> nn.Module:
    """For the margin heads, whose weight is float32."""
    return nn.Sequential(float64_net(cfg, data), _ToFloat32())


class _ToFloat32(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def _two_ranks(cfg, workdir: Path, **kw):
    return ddp.run_ranks(cfg, _run, threads=1, workdir=workdir, error_text=error_text, **kw)


def _one_process(cfg, workdir: Path, monkeypatch=None, model_fn=float64_net):
    if monkeypatch is not None:
        from harness import build

        monkeypatch.setattr(build, "model", model_fn)
    return run_trial(cfg, threads=1, workdir=workdir)


def _state(workdir: Path, step: int = STEPS) -> dict:
    return torch.load(workdir / f"ckpt-{step:08d}.pt", weights_only=True)


def _memory(workdir: Path) -> tuple[torch.Tensor, ...]:
    """Every field of the CB-HEM memory: rows, labels, domains, write steps, pointer, count."""
    mem = _state(workdir)["stateful"]["memory"]
    return tuple(torch.as_tensor(mem[k]) for k in sorted(mem))


def _close(a, b, tol: float) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def test_float64_two_ranks_equal_one_process_curve_memory_and_model(tmp_path, monkeypatch):
    """The issue's number: global batch 32, memory 48, PLB exact, 20 steps (plus one, so that
    the checkpoint after step 20 holds the memory): same loss curve and memory, float64."""
    row2, curves2 = _two_ranks(_cfg(2, method=METRIC), tmp_path / "two", model_fn=float64_net)
    row1, curves1 = _one_process(_cfg(1, method=METRIC), tmp_path / "one", monkeypatch)
    assert (row2["world_size"], row2["backend"]) == (2, "gloo")
    assert (row1["world_size"], row1["backend"]) == (1, None)
    assert len(curves2["loss"]) == STEPS + 1
    _close(torch.tensor(curves2["loss"]), torch.tensor(curves1["loss"]), 1e-12)
    _close(_memory(tmp_path / "two"), _memory(tmp_path / "one"), 1e-12)
    m1, m2 = _state(tmp_path / "one")["model"], _state(tmp_path / "two")["model"]
    _close(list(m2.values()), list(m1.values()), 1e-12)
    assert row2["tar@1e-1"] == pytest.approx(row1["tar@1e-1"], abs=1e-9)
    assert _memory(tmp_path / "two")[0].abs().sum() > 0  # the memory is in use

    # resume: both ranks load the checkpoint after 20 steps (rank 0 wrote it) and redo the
    # last step: the same curve, whose last point was recomputed from the checkpoint
    before = list(curves2["loss"])
    row3, curves3 = _two_ranks(_cfg(2, method=METRIC), tmp_path / "two", model_fn=float64_net)
    assert row3["resumed_from_step"] == STEPS
    _close(torch.tensor(curves3["loss"]), torch.tensor(before), 1e-12)


def test_mlp_batchnorm_float32_two_ranks_equal_one_process_with_rank_sized_chunks(tmp_path):
    """The real backbone (BatchNorm) in float32: ghost batches of train.batch / 2 rows."""
    _, curves2 = run_trial(_cfg(2, method=METRIC), threads=1, workdir=tmp_path / "two")
    _, curves1 = run_trial(_cfg(1, batch=8, method=METRIC), threads=1, workdir=tmp_path / "one")
    _close(torch.tensor(curves2["loss"]), torch.tensor(curves1["loss"]), 1e-5)
    _close(_memory(tmp_path / "two"), _memory(tmp_path / "one"), 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_two_gpus_equal_one_gpu_with_rank_sized_chunks(tmp_path):
    """The CUDA path: 2 ranks on 2 GPUs over NCCL against 1 GPU with PLB chunks of the rank
    share (the BatchNorm ghost batches of the float32 CPU test); torch's default keeps TF32 off
    for matmuls in every process, so 1e-4 is rounding, not TF32."""

    def on_cuda(cfg):
        return cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cuda"})})

    row2, curves2 = run_trial(on_cuda(_cfg(2, method=METRIC)), threads=1, workdir=tmp_path / "2")
    _, curves1 = run_trial(on_cuda(_cfg(1, batch=8, method=METRIC)), threads=1, workdir=tmp_path / "1")  # fmt: skip
    assert (row2["world_size"], row2["backend"]) == (2, "nccl")
    _close(torch.tensor(curves2["loss"]), torch.tensor(curves1["loss"]), 1e-4)
    _close(_memory(tmp_path / "2"), _memory(tmp_path / "1"), 1e-4)


def test_margin_head_two_ranks_equal_one_process(tmp_path, monkeypatch):
    """ArcFace replicated on 2 ranks (DDP over backbone + head), float64 backbone and float32
    head: same loss curve, backbone and head weights as one process with the same global
    batch, to float32 rounding (1e-5)."""
    head = 'head = "arcface"\nhead_params = {s = 16.0}'
    net = float64_net_float32_out
    _, curves2 = _two_ranks(_cfg(2, method=head), tmp_path / "two", model_fn=net)
    _, curves1 = _one_process(_cfg(1, method=head), tmp_path / "one", monkeypatch, net)
    _close(torch.tensor(curves2["loss"]), torch.tensor(curves1["loss"]), 1e-5)
    s1, s2 = _state(tmp_path / "one"), _state(tmp_path / "two")
    _close(list(s2["model"].values()), list(s1["model"].values()), 1e-5)
    _close(list(s2["stateful"].values()), list(s1["stateful"].values()), 1e-5)
    assert curves1["loss"][0] != curves1["loss"][-1]  # it trained


def test_class_sharded_head_equals_replicated_head(tmp_path):
    """`head_params.sharded = true` (Partial FC layout: each rank holds half of the classes,
    distributed softmax): the same loss curve and backbone as the replicated head on 2 ranks."""
    net = float64_net_float32_out
    rep = 'head = "arcface"\nhead_params = {s = 16.0, interclass_filter = 0.3}'
    shd = 'head = "arcface"\nhead_params = {s = 16.0, interclass_filter = 0.3, sharded = true}'
    _, curves_r = _two_ranks(_cfg(2, method=rep), tmp_path / "rep", model_fn=net)
    _, curves_s = _two_ranks(_cfg(2, method=shd), tmp_path / "shd", model_fn=net)
    _close(torch.tensor(curves_s["loss"]), torch.tensor(curves_r["loss"]), 1e-5)
    m_r, m_s = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("rep", "shd"))
    _close(list(m_s.values()), list(m_r.values()), 1e-5)
    assert not list((tmp_path / "shd").glob("ckpt-*.pt"))  # a sharded head is not checkpointed


def _sharded_grad_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One step of each head on fixed float64 data: the sharded head on this rank's classes."""
    import torch.distributed as dist

    from harness.sharded_head import ShardedMarginHead, gather_embeddings
    from mining.heads import make_head

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out = {}
        for name, params in HEADS_SHARDED:
            torch.manual_seed(0)
            full = make_head(name, 6, 7, **params).double()
            emb_all, labels = _head_batch()
            local = emb_all[rank * 5 : rank * 5 + 5].clone().requires_grad_()
            shard = ShardedMarginHead(name, full, rank, 2)
            loss = shard.loss(gather_embeddings(local, 1.0), labels)
            loss.backward()
            out[name] = (loss.detach(), local.grad, shard.weight.grad, (shard.lo, shard.hi))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


HEADS_SHARDED = [
    ("arcface", {"s": 16.0, "m": 0.5}),
    ("cosface", {"s": 30.0, "interclass_filter": 0.2}),
    ("arcface_nograd", {"s": 8.0}),
]


def _head_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(10, 6, generator=gen, dtype=torch.float64), torch.tensor(
        [0, 0, 1, 2, 3, 3, 4, 5, 6, 6]
    )


def test_sharded_head_loss_and_gradients_equal_replicated_float64(tmp_path):
    """2 gloo ranks, 7 classes split 3 + 4, 10 rows split 5 + 5: the loss, each rank's
    embedding gradient and the concatenated weight gradient equal the replicated head's."""
    from mining.heads import make_head
    from tests.ranks import spawn_ranks

    ranks = spawn_ranks(_sharded_grad_worker, tmp_path, 2)
    for name, params in HEADS_SHARDED:
        torch.manual_seed(0)
        full = make_head(name, 6, 7, **params).double()
        emb, labels = _head_batch()
        emb.requires_grad_()
        loss = full.loss(emb, labels)
        loss.backward()
        (l0, g0, w0, (_, hi0)), (l1, g1, w1, (lo1, _)) = ranks[0][name], ranks[1][name]
        assert hi0 == lo1 == 3
        for got in (l0, l1):
            torch.testing.assert_close(got, loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.cat([g0, g1]), emb.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.cat([w0, w1]), full.weight.grad, rtol=1e-12, atol=1e-12)


def test_sharded_head_rejects_heads_with_non_target_margins_at_validation():
    from harness.suite import SuiteError

    with pytest.raises(SuiteError, match=r"head_params.*sharded = true needs a head whose margin"):
        _cfg(2, method='head = "curricularface"\nhead_params = {sharded = true}')
    with pytest.raises(SuiteError, match="sharded must be true or false"):
        _cfg(2, method='head = "cosface"\nhead_params = {sharded = 1}')
    _cfg(2, method='head = "cosface"\nhead_params = {sharded = true}')  # valid


def test_more_ranks_than_gpus_is_a_validation_error(monkeypatch):
    from harness.build import check_trial

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = _cfg(2).model_copy(update={"train": _cfg(2).train.model_copy(update={"device": "cuda"})})
    assert [k for k, _ in check_trial(cfg)] == ["train.world_size"]
    assert check_trial(_cfg(2)) == []  # CPU: gloo processes, no GPU needed


# --- failures -----------------------------------------------------------------------------------


def _rank_pids(parent: int | None = None) -> dict[int, int]:
    """{rank: pid} of the rank children (named hembench-r<rank>) of `parent` (default: us)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == (parent or os.getpid()) and comm.startswith("hembench-r"):
            found[int(comm.removeprefix("hembench-r"))] = int(pid)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class _Watcher(threading.Thread):
    """Records the ranks' pids while a trial runs; kills rank `kill` once training began."""

    def __init__(self, kill: int | None = None):
        super().__init__(daemon=True)
        self.kill, self.pids, self.killed_at, self.stop = kill, {}, None, False
        self.started_training = threading.Event()

    def run(self) -> None:
        while not self.stop:
            self.pids |= _rank_pids()
            if self.kill in self.pids and self.started_training.is_set() and not self.killed_at:
                os.kill(self.pids[self.kill], signal.SIGKILL)
                self.killed_at = time.monotonic()
            time.sleep(0.05)


def _failing_trial(cfg, watcher: _Watcher) -> tuple[BaseException, float]:
    watcher.start()
    try:
        run_trial(cfg, lambda p: watcher.started_training.set(), threads=1)
    except Exception as exc:
        return exc, time.monotonic()
    finally:
        watcher.stop = True
        watcher.join()
    raise AssertionError("the trial did not fail")


def test_exception_in_rank_1_fails_the_trial_with_its_error_and_leaves_no_process():
    cfg = _cfg(2, method=METRIC, debug='inject = "exception"\ninject_step = 2')
    t0 = time.monotonic()
    exc, t1 = _failing_trial(cfg, watcher := _Watcher())
    assert classify(exc) == "failed"
    text = error_text(exc)
    assert "rank 1 of 2: RuntimeError: injected exception at step 2" in text, text
    assert t1 - t0 < 120  # spawn + imports of 2 interpreters + 2 steps; no collective timeout
    assert sorted(watcher.pids) == [0, 1]
    assert not any(_alive(p) for p in watcher.pids.values())


def test_sigkill_of_rank_1_fails_the_trial_within_bounded_time_and_leaves_no_process():
    cfg = _cfg(2, steps=100_000, method=METRIC)  # minutes of training: only the kill ends it
    exc, t1 = _failing_trial(cfg, watcher := _Watcher(kill=1))
    assert watcher.killed_at is not None
    assert t1 - watcher.killed_at < 30
    assert classify(exc) == "failed"
    assert "rank 1 of 2 was killed by SIGKILL" in error_text(exc)
    assert not any(_alive(p) for p in watcher.pids.values())


def test_failure_text_names_the_root_cause_and_keeps_the_status():
    exc = ddp._failure(2, [(1.0, 1, "NonFiniteLoss", "NonFiniteLoss: loss is nan at step 3")], [])
    assert classify(exc) == "nan" and "rank 1 of 2" in str(exc)
    exc = ddp._failure(2, [(2.0, 0, "RuntimeError", "gloo: peer closed")], [(1, -9)])
    assert classify(exc) == "failed"
    assert (
        str(exc) == "rank 1 of 2 was killed by SIGKILL without a result (then rank 0: RuntimeError)"
    )


def test_deadline_kills_a_hanging_rank_and_times_out():
    """A rank that hangs (the others wait in a collective): the trial's deadline kills all."""
    cfg = _cfg(2, steps=1000, method=METRIC, debug='inject = "hang"\ninject_step = 1')
    watcher = _Watcher()
    watcher.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(TrialTimeout):
            run_trial(cfg, deadline=t0 + 25, threads=1)
    finally:
        watcher.stop = True
        watcher.join()
    assert time.monotonic() - t0 < 40
    assert not any(_alive(p) for p in watcher.pids.values())


def test_ranks_die_with_the_trial_process():
    """The executor kills the trial's worker at its timeout (SIGKILL): its ranks die too."""
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, '.'); from tests.test_ddp_trial import _cfg, METRIC; "
        "from harness.trial import run_trial; "
        "run_trial(_cfg(2, steps=100_000, method=METRIC), threads=1)"
    )
    root = Path(__file__).resolve().parents[1]
    worker = subprocess.Popen([sys.executable, "-c", code], cwd=root)
    try:
        t0 = time.monotonic()
        while len(pids := _rank_pids(worker.pid)) < 2 and time.monotonic() - t0 < 120:
            time.sleep(0.2)
        assert sorted(pids) == [0, 1]
        worker.kill()
        worker.wait()
        t1 = time.monotonic()
        while any(_alive(p) for p in pids.values()) and time.monotonic() - t1 < 10:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids.values())
    finally:
        worker.kill()
