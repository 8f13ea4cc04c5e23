"""The pretrain stage (harness/pretrain.py) and many-shot synthetic identities
(harness/data/synthetic.py): cached once per (pretrain config, seed), reused, never half-written."""

from __future__ import annotations

import threading

import pytest
import torch

from harness.data import build_data
from harness.pretrain import pretrain_key
from harness.suite import SuiteError, parse_suite
from harness.trial import run_trial
from tests.test_checkpoint import TIMING, Interrupt, _nan_safe
from tests.test_recipe import suite_text

WORLD = {"kind": "synthetic_ivs", "identities": 40, "test_identities": 20, "dim": 16}


def test_many_shot_identities_add_photos_without_changing_the_base_ones():
    pair = build_data(WORLD, 0)
    many = build_data({**WORLD, "photos_per_identity": 6}, 0)
    assert torch.equal(many.train.labels.bincount(), torch.full((40,), 6))
    base = many.train.x[: pair.train.x.shape[0]]
    assert torch.equal(base, pair.train.x) and torch.equal(many.test_id_x, pair.test_id_x)


def test_web_photos_of_other_identities_in_the_same_world():
    web = build_data({**WORLD, "photos_per_identity": 4, "domains": "spot",
                      "identity_offset": 10_000}, 0)  # fmt: skip
    ivs = build_data(WORLD, 0)
    assert set(web.train.domain.tolist()) == {1} and web.num_classes == 40
    assert web.train.labels.min() == 0 and web.train.labels.max() == 39
    assert not torch.equal(web.train.x[:40], ivs.train.x[:40])  # other identities
    same = build_data({**WORLD, "identity_offset": 10_000}, 0)
    again = build_data({**WORLD, "identity_offset": 10_000}, 0)
    assert torch.equal(same.train.x, again.train.x)


def suite(pretrain: str = "", sweep: str = "") -> str:
    """The recipe tests' small suite (6 steps), with a sweep block and a [pretrain] table."""
    return f"{suite_text(steps=6)}\n{sweep}\n[pretrain]\n{pretrain}\n"


PRETRAIN = """steps = 5
head = "cosface"
head_params = { s = 16.0 }
train = { lr = 0.1, batch = 32, samples_per_identity = 4, schedule = "cosine" }
[pretrain.data]
kind = "synthetic_ivs"
identities = 64
test_identities = 8
dim = 16
lookalike_groups = 8
photos_per_identity = 6
domains = "spot"
identity_offset = 100000
"""


def test_pretrain_is_trained_once_and_reused_with_identical_results(tmp_path):
    s = parse_suite(suite(PRETRAIN, "[[sweep]]\nmemory = [0, 32]"))
    first, second = s.trials
    assert pretrain_key(first) == pretrain_key(second)
    row1, curves1 = run_trial(first, cache=tmp_path / "cache")
    assert row1["pretrain_s"] > 0 and row1["pretrain_key"] == pretrain_key(first)
    (weights,) = (tmp_path / "cache" / "pretrain").glob("*/model.pt")
    row2, _ = run_trial(second, cache=tmp_path / "cache")
    assert row2["pretrain_s"] == 0.0 and row2["init_sha256"] == row1["init_sha256"]
    # the cached start gives the same trial as a freshly trained one (RNG reseeded after it)
    again, curves_again = run_trial(first, cache=tmp_path / "cache")
    assert again["pretrain_s"] == 0.0
    assert _nan_safe(curves_again["loss"]) == _nan_safe(curves1["loss"])
    keep = {k: v for k, v in row1.items() if k not in TIMING | {"pretrain_s"}}
    assert _nan_safe(keep) == _nan_safe({k: again[k] for k in keep})
    fresh, _ = run_trial(first)  # no cache at all: the same trial
    assert fresh["final_loss"] == row1["final_loss"]
    assert weights.is_file()


def test_pretrain_changes_the_start_and_its_key_follows_its_config():
    plain = parse_suite(suite()).trials[0]
    pre = parse_suite(suite(PRETRAIN)).trials[0]
    other = parse_suite(suite(PRETRAIN.replace("steps = 5", "steps = 6"))).trials[0]
    assert pretrain_key(pre) != pretrain_key(other)
    (a, _), (b, _) = run_trial(plain), run_trial(pre)
    assert a["pretrain_key"] is None and b["pretrain_key"] == pretrain_key(pre)
    assert a["final_loss"] != b["final_loss"]


def test_a_killed_pretrain_is_never_reused(tmp_path):
    cfg = parse_suite(suite(PRETRAIN)).trials[0]

    def stop(update: dict) -> None:
        if update.get("phase") == "pretrain" and update["step"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_trial(cfg, progress=stop, cache=tmp_path)
    assert not list(tmp_path.glob("pretrain/*/model.pt"))
    row, _ = run_trial(cfg, cache=tmp_path)
    assert row["pretrain_s"] > 0


def test_concurrent_trials_wait_for_one_producer(tmp_path):
    cfg = parse_suite(suite(PRETRAIN)).trials[0]
    rows: list[dict] = []
    threads = [
        threading.Thread(target=lambda: rows.append(run_trial(cfg, cache=tmp_path)[0]))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(r["pretrain_s"] > 0 for r in rows) == [False, True]


@pytest.mark.parametrize(
    ("pretrain", "model", "match"),
    [
        ("steps = 5\ntrain = { lr_nope = 1 }", "", "lr_nope"),
        ("steps = 5\ntrain = { batch = 30, samples_per_identity = 4 }", "", "multiple"),
        ("steps = 5", 'init = "x.pt"', "model.init and a"),
    ],
)
def test_bad_pretrain_tables_are_validation_errors(pretrain, model, match):
    text = suite(pretrain).replace("embedding = 16\n", f"embedding = 16\n{model}\n")
    with pytest.raises(SuiteError, match=match):
        parse_suite(text)


def test_pretrain_data_of_another_input_shape_fails_the_trial_clearly():
    cfg = parse_suite(
        suite(PRETRAIN.replace("dim = 16\nlookalike_groups", "dim = 8\nlookalike_groups"))
    ).trials[0]
    with pytest.raises(ValueError, match="one backbone cannot take both"):
        run_trial(cfg)


@pytest.mark.parametrize(
    ("pretrain", "match"),
    [
        ('steps = 5\nhead = "arcfase"', "arcfase"),
        ('steps = 5\n[pretrain.data]\nkind = "synthetic_ivs"\ndim = 1', "pretrain data"),
    ],
)
def test_pretrain_head_and_data_are_checked_at_validation(pretrain, match):
    with pytest.raises(SuiteError, match=match):
        parse_suite(suite(pretrain))
