"""Checkpoints, mid-trial resume and pretrained initialisation (harness/checkpoint.py,
harness/train.py `Trainer`)."""

from __future__ import annotations

import math
import tempfile

import pytest
import torch

from harness.checkpoint import latest_checkpoint, load_init
from harness.records import config_key
from harness.suite import parse_suite
from harness.trial import run_trial
from tests.test_recipe import suite_text

TIMING = {"train_time_s", "samples_per_s", "samples_per_s_iqr", "step_ms_median", "peak_rss_mib",
          "rss_setup_mib", "rss_net_mib", "checkpoint_s", "checkpoint_bytes",
          "resumed_from_step"}  # fmt: skip

METHODS = {
    "cbhem": "memory = 64",  # the memory (with ages) must survive the restart
    "plb": 'plb = "exact"\nvirtual_batch = 32',
    "head": 'head = "cosface"',
}


def _nan_safe(values):
    """NaN → a sentinel, so that equal curves compare equal (NaN != NaN)."""
    if isinstance(values, dict):
        return {k: _nan_safe(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_nan_safe(v) for v in values]
    return "nan" if isinstance(values, float) and math.isnan(values) else values


class Interrupt(Exception):
    pass


def _stop_at(step: int):
    def progress(update: dict) -> None:
        if update.get("step") == step:
            raise Interrupt

    return progress


@pytest.mark.parametrize("method", METHODS)
def test_resumed_trial_equals_an_uninterrupted_one(tmp_path, method):
    """Interrupted after step 5 (last checkpoint after 4 steps), the rerun continues from step
    4: same curves (apart from timings) and the same final metrics, bit for bit, on CPU."""
    train = 'checkpoint_every = 2\nschedule = "cosine"\nlr_warmup = 2'
    cfg = parse_suite(suite_text(train=train, baseline=METHODS[method], steps=9)).trials[0]
    ref_row, ref_curves = run_trial(cfg, workdir=tmp_path / "ref")

    work = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        run_trial(cfg, progress=_stop_at(5), workdir=work)
    assert sorted(p.name for p in work.glob("ckpt-*.pt")) == [
        "ckpt-00000002.pt",
        "ckpt-00000004.pt",
    ]
    row, curves = run_trial(cfg, workdir=work)

    assert row["resumed_from_step"] == 4 and ref_row["resumed_from_step"] is None
    for k in ("step", "loss", "memory_share", "neg_age", "drift"):
        assert _nan_safe(curves[k]) == _nan_safe(ref_curves[k]), k
    same = {k: v for k, v in row.items() if k not in TIMING}
    assert _nan_safe(same) == _nan_safe({k: v for k, v in ref_row.items() if k not in TIMING})
    assert (work / "model.pt").is_file()


def test_corrupt_or_foreign_checkpoints_are_never_loaded(tmp_path):
    cfg = parse_suite(suite_text(train="checkpoint_every = 2", steps=7)).trials[0]
    with pytest.raises(Interrupt):
        run_trial(cfg, progress=_stop_at(5), workdir=tmp_path)
    newest = sorted(tmp_path.glob("ckpt-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by a crash mid-copy, say
    state, note = latest_checkpoint(tmp_path, config_key(cfg))
    assert state["step"] == 2 and "unreadable" in note and newest.name in note
    other = parse_suite(suite_text(train="checkpoint_every = 2\nlr = 0.07", steps=7)).trials[0]
    state, note = latest_checkpoint(tmp_path, config_key(other))
    assert state is None and "another configuration" in note
    with pytest.warns(UserWarning, match="unreadable"):
        row, _ = run_trial(cfg, workdir=tmp_path)
    assert row["resumed_from_step"] == 2


def test_checkpoint_time_is_recorded(tmp_path):
    cfg = parse_suite(suite_text(train="checkpoint_every = 3", steps=10)).trials[0]
    row, _ = run_trial(cfg, workdir=tmp_path)
    assert row["checkpoint_bytes"] > 0 and 0 < row["checkpoint_s"] < row["train_time_s"]


def test_pretrained_init_loads_strictly_and_records_the_hash(tmp_path):
    """A trial's model.pt initialises another trial; the row carries the file's hash."""
    first = parse_suite(suite_text(steps=4)).trials[0]
    run_trial(first, workdir=tmp_path / "a")
    weights = tmp_path / "a" / "model.pt"
    cfg = parse_suite(suite_text(steps=2, model=f'init = "{weights}"')).trials[0]
    row, _ = run_trial(cfg)
    assert row["init_sha256"] and len(row["init_sha256"]) == 16

    bigger = torch.nn.Sequential(torch.nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"missing|unexpected|shape"):
        load_init(bigger, str(weights), [])
    with pytest.raises(ValueError, match="no such file"):
        load_init(bigger, str(tmp_path / "nope.pt"), [])
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a torch state_dict"):
        load_init(bigger, str(tmp_path / "junk.pt"), [])


def test_init_ignore_skips_matching_keys():
    src = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    dst = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 5))  # new last layer
    with tempfile.NamedTemporaryFile(suffix=".pt") as fh:
        torch.save(src.state_dict(), fh.name)
        with pytest.raises(ValueError, match=r"1\.weight \(3, 4\) vs model \(5, 4\)"):
            load_init(dst, fh.name, [])
        before = dst[1].weight.detach().clone()
        load_init(dst, fh.name, ["1.*"])
    assert torch.equal(dst[0].weight, src[0].weight) and torch.equal(dst[1].weight, before)
    assert math.isfinite(float(dst[1].weight.detach().sum()))
