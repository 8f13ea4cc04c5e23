"""The training recipe (harness/recipe.py): schedules against torch's own schedulers,
optimisers, bf16 on CPU, and fp16 refused without CUDA."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.config import TrainCfg
from harness.recipe import Precision, lr_factor, make_optimizer, make_scheduler
from harness.suite import SuiteError, parse_suite
from harness.trial import run_trial


def _lrs(train: TrainCfg, scheduler_of) -> tuple[list[float], list[float]]:
    """Learning rates of steps 0..T−1: ours (LambdaLR of lr_factor) and torch's scheduler."""
    out = []
    for make in (lambda o: make_scheduler(train, o), scheduler_of):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=train.lr)
        sched = make(opt)
        lrs = []
        for _ in range(train.steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        out.append(lrs)
    return out[0], out[1]


@given(steps=st.integers(2, 60), gamma=st.floats(0.05, 0.9), data=st.data())
@settings(deadline=None, max_examples=30)
def test_step_schedule_matches_multisteplr(steps, gamma, data):
    ms = sorted(data.draw(st.sets(st.integers(1, steps - 1), max_size=4)))
    train = TrainCfg(steps=steps, lr=0.5, schedule="step", milestones=ms, gamma=gamma)
    ours, ref = _lrs(train, lambda o: torch.optim.lr_scheduler.MultiStepLR(o, ms, gamma))
    assert ours == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("steps", [2, 7, 100])
def test_cosine_and_poly_match_torch(steps):
    cos = TrainCfg(steps=steps, lr=0.3, schedule="cosine")
    ours, ref = _lrs(cos, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps))
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-15)
    poly = TrainCfg(steps=steps, lr=0.3, schedule="poly", poly_power=2.0)
    ours, ref = _lrs(
        poly, lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=steps, power=2.0)
    )
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-15)


def test_warmup_is_linear_then_the_schedule_starts_from_its_top():
    train = TrainCfg(steps=20, lr=1.0, schedule="cosine", lr_warmup=4)
    assert [lr_factor(train, t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(train, 4) == 1.0  # cosine progress 0 right after warm-up
    assert lr_factor(train, 12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))


def test_optimizers_are_torchs_with_the_configured_hyperparameters():
    p = [torch.nn.Parameter(torch.ones(2))]
    sgd = make_optimizer(TrainCfg(momentum=0.8, weight_decay=1e-3), p)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["weight_decay"] == 1e-3
    adamw = make_optimizer(TrainCfg(optimizer="adamw", betas=[0.8, 0.9], weight_decay=0.05), p)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.9)


@pytest.mark.parametrize(
    ("train", "match"),
    [
        ('milestones = [5, 50]\nschedule = "step"', "milestones"),  # beyond steps = 10
        ("milestones = [3]", "schedule='step'"),
        ("lr_warmup = 10", "lr_warmup"),
        ('precision = "fp16"', "fp16"),  # device = cpu
        ("samples_per_identity = 3", "multiple of samples_per_identity = 3"),  # batch 16
    ],
)
def test_bad_recipes_are_validation_errors(train, match):
    with pytest.raises(SuiteError, match=match):
        parse_suite(suite_text(train=train))


def test_fp16_without_cuda_is_refused_at_build_time_too():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(ValueError, match="CUDA"):
        Precision.of(TrainCfg(precision="fp16", device="auto"), torch.device("cpu"))


def suite_text(train: str = "", baseline: str = "", steps: int = 10, model: str = "") -> str:
    return f"""
[suite]
name = "recipe"
seeds = [0]
[data]
kind = "synthetic_ivs"
identities = 96
test_identities = 48
dim = 16
lookalike_groups = 8
[model]
kind = "mlp"
embedding = 16
{model}
[train]
steps = {steps}
batch = 16
device = "cpu"
threads = 1
{train if "lr =" in train else "lr = 0.05" + chr(10) + train}
[baseline]
miner = "batch_hard"
loss = "triplet"
{baseline}
[eval]
far = [1e-1]
"""


@pytest.mark.parametrize("method", ["", 'plb = "exact"\nvirtual_batch = 32', 'head = "cosface"'])
def test_bf16_on_cpu_trains_close_to_fp32(method):
    """bf16 autocast of the backbone on CPU (metric step, PLB, margin head): the loss curve
    stays within 0.05 (absolute) + 5% of fp32's over 10 steps."""
    (fp32, c32), (bf16, c16) = (
        run_trial(parse_suite(suite_text(train=t, baseline=method)).trials[0])
        for t in ("", 'precision = "bf16"')
    )
    assert bf16["final_loss"] == pytest.approx(fp32["final_loss"], rel=0.05, abs=0.05)
    assert c16["loss"] == pytest.approx(c32["loss"], rel=0.05, abs=0.05)
    assert c16["loss"] != c32["loss"]  # autocast did run


def test_cosine_schedule_with_adamw_runs_a_trial():
    cfg = parse_suite(
        suite_text(train='optimizer = "adamw"\nlr = 0.001\nschedule = "cosine"\nlr_warmup = 2')
    ).trials[0]
    row, curves = run_trial(cfg)
    assert len(curves["loss"]) == 10 and math.isfinite(row["final_loss"])


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["", 'plb = "exact"\nvirtual_batch = 32', 'head = "cosface"'])
def test_fp16_with_grad_scaler_on_cuda(method):
    """fp16 autocast + GradScaler (PLB takes the scaler through its AMP contract)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    text = suite_text(train='precision = "fp16"', baseline=method).replace(
        'device = "cpu"', 'device = "cuda"'
    )
    row, curves = run_trial(parse_suite(text).trials[0])
    assert math.isfinite(row["final_loss"]) and len(curves["loss"]) == 10


def test_compiled_backbone_trains_like_the_eager_one():
    """`train.compile` runs the backbone through torch.compile (here the aot_eager backend:
    dynamo tracing and AOT autograd without C++ code generation, which takes minutes on this
    CPU); the loss curve matches eager mode."""
    _, c_eager = run_trial(parse_suite(suite_text(steps=4)).trials[0])
    _, c_comp = run_trial(parse_suite(suite_text(train='compile = "aot_eager"', steps=4)).trials[0])
    assert c_comp["loss"] == pytest.approx(c_eager["loss"], rel=1e-5, abs=1e-6)
