"""A trial on streamed image data: data-quality columns, .bin verification sets in the row,
and exact resume from a checkpoint (harness/trial.py + harness/train.py over IvSData)."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from harness.suite import parse_suite
from harness.trial import run_trial
from tests.test_checkpoint import Interrupt, _nan_safe, _stop_at
from tests.test_verification_sets import write_bin


def image_suite(root, extra_train: str = "", extra_eval: str = "", flip: str = "false") -> str:
    for i in range(12):
        (root / f"p{i:02d}").mkdir()
        for j in range(3):
            Image.new("RGB", (12, 12), (20 * i, 60 * j, 9)).save(root / f"p{i:02d}" / f"{j}.png")
    (root / "lonely").mkdir()
    Image.new("RGB", (12, 12), (1, 2, 3)).save(root / "lonely" / "only.png")
    return f"""
[suite]
name = "images"
seeds = [0]
[data]
kind = "image_folder"
path = "{root}"
image_size = 16
test_fraction = 0.34
flip = {flip}
[model]
kind = "cnn_small"
embedding = 8
width = 4
[train]
steps = 6
batch = 8
device = "cpu"
threads = 1
workers = 0
{extra_train}
[eval]
far = [1e-1]
{extra_eval}
"""


def test_row_carries_quality_counts_and_bin_set_metrics(tmp_path):
    data = tmp_path / "faces"
    data.mkdir()
    lfw = tmp_path / "lfw.bin"
    write_bin(lfw, [((10 * i, 10 * i + 5), True) for i in range(10)]
              + [((10 * i, 200 - 10 * i), False) for i in range(10)])  # fmt: skip
    cfg = parse_suite(image_suite(data, extra_eval=f'sets = ["{lfw}"]\nflip = true')).trials[0]
    row, _ = run_trial(cfg)
    assert row["bad_images"] == 0 and row["single_image_identities"] == 1
    assert 0.0 <= row["lfw_acc"] <= 1.0 and "lfw_tar@1e-1" in row
    assert math.isfinite(row["eer"])


def test_missing_bin_set_is_a_validation_error(tmp_path):
    from harness.suite import SuiteError

    data = tmp_path / "faces"
    data.mkdir()
    with pytest.raises(SuiteError, match=r"eval\.sets"):
        parse_suite(image_suite(data, extra_eval=f'sets = ["{tmp_path / "nope.bin"}"]'))


def test_streamed_trial_resumes_exactly(tmp_path):
    """Resume skips the trained batches at the index level (no decoding) and continues with the
    same batches; flips off (their stream is sequential)."""
    data = tmp_path / "faces"
    data.mkdir()
    cfg = parse_suite(image_suite(data, extra_train="checkpoint_every = 2")).trials[0]
    ref_row, ref_curves = run_trial(cfg, workdir=tmp_path / "ref")
    with pytest.raises(Interrupt):
        run_trial(cfg, progress=_stop_at(3), workdir=tmp_path / "w")
    row, curves = run_trial(cfg, workdir=tmp_path / "w")
    assert row["resumed_from_step"] == 2
    assert _nan_safe(curves["loss"]) == _nan_safe(ref_curves["loss"])
    assert row["eer"] == ref_row["eer"] and row["auc"] == ref_row["auc"]
