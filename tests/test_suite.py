"""Suite schema, validation messages, grid expansion and trial ids (harness/suite.py)."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from harness.cli import app
from harness.suite import SuiteError, parse_suite, trial_id

SUITES = Path(__file__).resolve().parent.parent / "suites"
runner = CliRunner()

BASE: dict = {
    "suite": {"name": "t", "seeds": [0]},
    "data": {"kind": "synthetic_ivs", "identities": 64, "test_identities": 32, "dim": 8},
    "model": {"kind": "mlp", "embedding": 8},
    "train": {"steps": 3, "batch": 8, "lr": 0.1, "device": "cpu"},
    "baseline": {"miner": "batch_hard", "loss": "triplet", "margin": 0.2},
    "eval": {"far": [0.1]},
}


def to_toml(doc: dict) -> str:
    """Minimal TOML writer for test documents (tables of scalars, lists, inline tables)."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        return repr(v)

    lines = []
    for section, body in doc.items():
        blocks = body if isinstance(body, list) else [body]
        for block in blocks:
            lines.append(f"[[{section}]]" if isinstance(body, list) else f"[{section}]")
            lines += [f"{json.dumps(k)} = {value(v)}" for k, v in block.items()]
    return "\n".join(lines) + "\n"


def suite_of(**changes) -> dict:
    doc = copy.deepcopy(BASE)
    for section, body in changes.items():
        doc[section] = body
    return doc


# --- shipped suites --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("smoke", 5),
        ("ivs_ablation", 66),
        ("heads", 48),
        ("plb_memory", 10),
        ("finetune", 144),
        ("plb_vs_large", 12),
        ("heads_manyshot", 60),
        ("heads_unpg", 48),
        ("images_finetune", 18),
        ("images_plb", 12),
        ("memory_cpu", 12),
    ],
)
def test_shipped_suites_validate(name, count):
    s = parse_suite((SUITES / f"{name}.toml").read_text(), path=name)
    assert s.name == name
    assert len(s.trials) == count
    assert len({trial_id(t) for t in s.trials}) == count


def test_smoke_covers_required_paths():
    s = parse_suite((SUITES / "smoke.toml").read_text())
    methods = {(t.method.memory, t.method.plb, t.method.head) for t in s.trials}
    assert (0, "off", None) in methods  # in-batch
    assert len({m for m, plb, h in methods if m > 0}) == 2  # CB-HEM, two sizes
    assert any(plb == "exact" for _, plb, _ in methods)
    assert any(h is not None for *_, h in methods)
    assert all(t.train.device == "cpu" for t in s.trials)


# --- grid expansion and ids --------------------------------------------------------------------


@given(
    memories=st.lists(st.sampled_from([0, 8, 16, 24]), min_size=1, max_size=4),
    margins=st.lists(st.sampled_from([0.1, 0.2, 0.3]), min_size=1, max_size=3),
    seeds=st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True),
    repeat_block=st.booleans(),
)
def test_grid_is_deduplicated_cartesian_product(memories, margins, seeds, repeat_block):
    block = {"memory": memories, "margin": margins}
    sweep = [block, block] if repeat_block else [block]
    s = parse_suite(to_toml(suite_of(suite={"name": "g", "seeds": seeds}, sweep=sweep)))
    # brute force: baseline first, then the product; duplicates dropped, first occurrence kept
    combos = [(0, 0.2), *itertools.product(memories, margins)]
    expected = []
    for mem, margin in combos:
        for seed in seeds:
            if (mem, margin, seed) not in expected:
                expected.append((mem, margin, seed))
    got = [(t.method.memory, t.method.margin, t.seed) for t in s.trials]
    assert got == expected


def test_trial_ids_stable_and_sensitive():
    text = to_toml(suite_of(sweep=[{"memory": [0, 16]}]))
    a = [trial_id(t) for t in parse_suite(text).trials]
    assert a == [trial_id(t) for t in parse_suite(text).trials]
    # reordering keys inside a table does not change the resolved config
    doc = suite_of(sweep=[{"memory": [0, 16]}])
    doc["train"] = dict(reversed(list(doc["train"].items())))
    assert a == [trial_id(t) for t in parse_suite(to_toml(doc)).trials]
    # a different seed or lr gives different ids
    other = suite_of(suite={"name": "t", "seeds": [1]}, sweep=[{"memory": [0, 16]}])
    assert set(a).isdisjoint(trial_id(t) for t in parse_suite(to_toml(other)).trials)


def test_section_keys_can_be_swept():
    s = parse_suite(to_toml(suite_of(sweep=[{"train": {"lr": [0.1, 0.01]}}])))
    assert sorted({t.train.lr for t in s.trials}) == [0.01, 0.1]


# --- malformed suites --------------------------------------------------------------------------

# (mutation of BASE, a key path that the message must name)
MALFORMED = [
    ({"suite": {"name": "../evil", "seeds": [0]}}, "suite.name"),
    ({"suite": {"name": "/abs/path", "seeds": [0]}}, "suite.name"),
    ({"suite": {"name": "Upper", "seeds": [0]}}, "suite.name"),
    ({"suite": {"name": "t", "seeds": []}}, "suite.seeds"),
    ({"suite": {"name": "t", "seeds": [0, 0]}}, "suite.seeds"),
    ({"train": {**BASE["train"], "batch": 7}}, "train.batch"),
    ({"train": {**BASE["train"], "steps": 0}}, "train.steps"),
    ({"train": {**BASE["train"], "steps": "ten"}}, "train.steps"),
    ({"train": {**BASE["train"], "device": "tpu"}}, "train.device"),
    ({"train": {**BASE["train"], "lr": -1.0}}, "train.lr"),
    ({"eval": {"far": [1.5]}}, "eval.far"),
    ({"baseline": {**BASE["baseline"], "miner": "nope"}}, "baseline.miner"),
    ({"baseline": {**BASE["baseline"], "loss": "nope"}}, "baseline.loss"),
    ({"baseline": {**BASE["baseline"], "plb": "fast"}}, "baseline.plb"),
    ({"baseline": {**BASE["baseline"], "memory": -8}}, "baseline.memory"),
    ({"baseline": {**BASE["baseline"], "virtual_batch": 12, "plb": "exact"}}, "virtual_batch"),
    ({"baseline": {**BASE["baseline"], "virtual_batch": 16}}, "plb='off'"),
    ({"baseline": {**BASE["baseline"], "head": "cosface", "memory": 16}}, "memory"),
    ({"baseline": {**BASE["baseline"], "objective_params": {"k": 3}}}, "objective"),
    ({"data": {"kind": "nope"}}, "data.kind"),
    ({"data": {"kind": "synthetic_ivs", "identites": 100}}, "data.identites"),
    ({"data": {"kind": "synthetic_ivs", "domain_gap": 3.0}}, "data.domain_gap"),
    ({"data": {"kind": "features", "path": "x.npy", "colour": 1}}, "data.colour"),
    ({"model": {"kind": "nope", "embedding": 8}}, "model.kind"),
    ({"debug": {"inject": "segfault"}}, "debug.inject"),
    ({"sweep": [{"memry": [1]}]}, "sweep[0].memry"),
    ({"sweep": [{"memory": 16}]}, "sweep[0].memory"),
    ({"sweep": [{"memory": []}]}, "sweep[0].memory"),
    ({"sweep": [{"memory": [0, -1]}]}, "sweep[0].memory"),
    ({"sweep": [{"plb": ["exact"], "virtual_batch": [8, 12]}]}, "sweep[0]"),
    ({"sweep": [{"gpu": {"x": [1]}}]}, "sweep[0].gpu"),
]


@pytest.mark.parametrize(("change", "key"), MALFORMED, ids=[k for _, k in MALFORMED])
def test_malformed_suite_message_names_key(change, key):
    with pytest.raises(SuiteError) as info:
        parse_suite(to_toml(suite_of(**change)), path="bad.toml")
    assert all(p.startswith("bad.toml: ") for p in info.value.problems)
    assert any(key in p for p in info.value.problems), info.value.problems


_SECTIONS = ["suite", "data", "model", "train", "baseline", "eval"]
_KNOWN = {s: set(BASE[s]) for s in _SECTIONS}


@given(
    section=st.sampled_from([*_SECTIONS, None]),
    key=st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True),
    val=st.one_of(
        st.integers(-3, 3),
        st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=4),  # TOML-writable
        st.booleans(),
    ),
)
def test_unknown_keys_rejected_with_path(section, key, val):
    """Any unknown key, in any strict section or at the top level, is one named problem."""
    doc = copy.deepcopy(BASE)
    if section in ("data", "model"):  # open tables (params of the data/model builders)
        section = "train"
    if section is None:
        if key in ("suite", "data", "model", "train", "baseline", "sweep", "eval", "debug"):
            return
        doc[key] = {"x": val}
        path = key
    else:
        from harness.config import MethodCfg, SuiteMeta, TrainCfg

        fields = {"suite": SuiteMeta, "train": TrainCfg, "baseline": MethodCfg}.get(section)
        known = set(fields.model_fields) if fields else {"far"}
        if key in known:
            return
        doc[section][key] = val
        path = f"{section}.{key}"
    with pytest.raises(SuiteError) as info:
        parse_suite(to_toml(doc), path="x.toml")
    assert any(p.startswith(f"x.toml: {path}: unknown key") for p in info.value.problems)


@given(
    key=st.sampled_from(["steps", "batch", "lr", "momentum", "warmup_steps", "log_every"]),
    val=st.one_of(
        st.integers(-(10**6), 0),
        st.text(max_size=3),
        st.booleans(),
        st.lists(st.integers(), max_size=2),
    ),
)
def test_bad_train_values_rejected(key, val):
    if (
        key in ("momentum", "warmup_steps")
        and isinstance(val, int)
        and not isinstance(val, bool)
        and val == 0
    ):
        return  # 0 is a valid momentum / warm-up
    doc = suite_of(train={**BASE["train"], key: val})
    with pytest.raises(SuiteError) as info:
        parse_suite(to_toml(doc))
    assert any(f"train.{key}:" in p for p in info.value.problems)


def test_several_problems_reported_at_once():
    doc = suite_of(train={**BASE["train"], "steps": 0, "batch": 7, "zzz": 1})
    with pytest.raises(SuiteError) as info:
        parse_suite(to_toml(doc))
    text = "\n".join(info.value.problems)
    assert "train.steps" in text and "train.batch" in text and "train.zzz" in text


def test_invalid_toml_is_a_suite_error():
    with pytest.raises(SuiteError, match="invalid TOML"):
        parse_suite("[suite\nname=")


# --- CLI: validate / plan / run on bad input ----------------------------------------------------


@pytest.mark.parametrize(("change", "key"), MALFORMED[:3] + MALFORMED[-5:], ids=str)
def test_cli_bad_suite_exit_2_nothing_written(tmp_path, change, key):
    path = tmp_path / "bad.toml"
    path.write_text(to_toml(suite_of(**change)))
    results = tmp_path / "results"
    for cmd in (
        ["validate", str(path)],
        ["plan", str(path)],
        ["run", str(path), "--results-dir", str(results)],
    ):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2, (cmd, r.output)
        assert "Traceback" not in r.output
        assert key in r.output
    assert not results.exists()


def test_cli_plan_and_validate_ok(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(to_toml(suite_of(sweep=[{"memory": [0, 16]}])))
    r = runner.invoke(app, ["validate", str(path)])
    assert r.exit_code == 0 and "2 trials" in r.output
    r = runner.invoke(app, ["plan", str(path)])
    assert r.exit_code == 0, r.output
    s = parse_suite(path.read_text())
    for t in s.trials:
        assert trial_id(t) in r.output


def test_cli_missing_file_exit_2(tmp_path):
    r = runner.invoke(app, ["validate", str(tmp_path / "none.toml")])
    assert r.exit_code == 2 and "cannot read" in r.output


@pytest.mark.parametrize(
    ("text_change", "key"),
    [
        ("[train]\nlr = nan", "lr"),  # NaN passes `v < low` checks unless rejected outright
        ("[baseline]\nmargin = nan", "margin"),
        ("[baseline]\nmemory_weight = inf", "memory_weight"),
        ("[data]\nnoise = nan", "data.noise"),  # free parameters too
        ("[data]\nidentities = 36893488147419103232", "data.identities"),  # 2**65
        ("[suite]\nseeds = [18446744073709551616]", "seeds"),  # 2**64: aborted the row write
        ('[suite]\nname = "' + "a" * 300 + '"', "name"),  # "File name too long" at run time
        ("[baseline]\nhead_params = { s = 16.0 }", "head_params"),  # silently ignored before
        ('[baseline]\nplb = "exact"\nvirtual_batch = 1099511627776', "virtual_batch"),  # 2**40
    ],
)
def test_values_that_used_to_pass_validation_are_rejected(text_change, key):
    """Issue 21 item 4: each of these passed `validate` and then failed or crashed a trial."""
    section, line = text_change.split("\n", 1)
    doc = copy.deepcopy(BASE)
    # the section is written last, with the hostile line replacing its key (TOML forbids a
    # key twice)
    name = section.strip("[]")
    body = "\n".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in doc.get(name, {}).items()
                     if k != line.split(" =")[0])  # fmt: skip
    rest = to_toml({k: v for k, v in doc.items() if k != name})
    text = f"{rest}[{name}]\n{body}\n{line}\n"
    with pytest.raises(SuiteError) as err:
        parse_suite(text, path="hostile.toml")
    assert any(key in p for p in err.value.problems), err.value.problems
    assert all(p.startswith("hostile.toml") for p in err.value.problems)


@pytest.mark.parametrize("timeout", ["inf", "1e7"])
def test_unbounded_timeouts_validate_as_no_limit(timeout):
    doc = copy.deepcopy(BASE)
    doc["suite"] = {"name": "t", "seeds": [0]}
    text = to_toml(doc).replace('"seeds" = [0]', f'"seeds" = [0]\ntimeout_s = {timeout}')
    s = parse_suite(text)
    assert s.meta.timeout_s is None if timeout == "inf" else s.meta.timeout_s == 1e7


# --- bounded work, every pass at once, hints (issues 19 item 3, 21 item 5) -------------------


@given(
    blocks=st.lists(
        st.dictionaries(
            st.sampled_from(["memory", "margin", "train.lr", "miner"]),
            st.integers(1, 4),
            min_size=1,
        ),
        max_size=4,
    ),
    seeds=st.integers(1, 4),
)
def test_grid_size_is_counted_without_expanding(blocks, seeds):
    from harness.suite import _combinations
    from harness.suite_checks import grid_size

    flat = [(i, {k: list(range(n)) for k, n in b.items()}) for i, b in enumerate(blocks)]
    expanded = sum(1 for _ in _combinations(flat)) * seeds
    assert grid_size((b for _, b in flat), seeds) == expanded


def test_grid_above_the_limit_is_refused_and_the_limit_can_be_raised():
    doc = suite_of(sweep=[{"memory": [16, 32, 64]}], suite={"name": "t", "seeds": [0, 1]})
    with pytest.raises(SuiteError, match="expands to 8 trials, above the limit of 7"):
        parse_suite(to_toml(doc), max_trials=7)
    assert len(parse_suite(to_toml(doc), max_trials=8).trials) == 8


def test_each_combination_is_checked_once_whatever_the_seeds(monkeypatch):
    import harness.build

    calls = []
    real = harness.build.check_trial
    monkeypatch.setattr(harness.build, "check_trial", lambda cfg: calls.append(cfg) or real(cfg))
    doc = suite_of(sweep=[{"memory": [16, 32]}], suite={"name": "t", "seeds": [0, 1, 2, 3]})
    s = parse_suite(to_toml(doc))
    assert len(s.trials) == 12 and len(calls) == 3  # baseline + 2 memory sizes


def test_seed_copies_equal_validated_configs():
    """Seeds after the first are copies of the validated config: they must be exactly what
    validating each seed would give (same trial ids)."""
    from harness.config import TrialConfig

    doc = suite_of(sweep=[{"memory": [16]}], suite={"name": "t", "seeds": [3, 5]})
    for t in parse_suite(to_toml(doc)).trials:
        again = TrialConfig.model_validate(t.model_dump())
        assert again == t and trial_id(again) == trial_id(t)


def test_ten_thousand_trials_validate_in_seconds():
    doc = suite_of(
        sweep=[{"memory": list(range(64, 64 * 1000, 64))}],
        suite={"name": "t", "seeds": list(range(10))},
    )
    import time

    start = time.perf_counter()
    s = parse_suite(to_toml(doc))
    assert len(s.trials) == 10_000  # (1 + 999) × 10: the limit itself passes
    assert time.perf_counter() - start < 60  # ~2 s on a 2-core machine; minutes before


def test_problems_of_every_pass_are_reported_together():
    """A schema problem no longer hides sweep and library problems (three rounds of fixes
    before): all come in one SuiteError."""
    doc = suite_of(
        train={**BASE["train"], "stpes": 3},
        baseline={**BASE["baseline"], "miner": "batch_hrd"},
        sweep=[{"memroy": [1]}, {"head": ["cosfac"]}],
    )
    with pytest.raises(SuiteError) as info:
        parse_suite(to_toml(doc), path="s.toml")
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 4, text
    for hint in ("'steps'", "'memory'", "'batch_hard'", "'cosface'"):
        assert f"did you mean {hint}?" in text


@pytest.mark.parametrize(
    ("change", "hint"),
    [
        ({"trian": {"steps": 3}}, "'train'"),
        ({"train": {**BASE["train"], "bacth": 8}}, "'batch'"),
        ({"eval": {"fars": [0.1]}}, "'far'"),
        ({"data": {**BASE["data"], "test_identites": 40}}, "'test_identities'"),
        ({"model": {**BASE["model"], "kind": "mpl"}}, "'mlp'"),
        ({"baseline": {**BASE["baseline"], "loss": "tripplet"}}, "'triplet'"),
        ({"sweep": [{"train": {"lrr": [0.1]}}]}, "'lr'"),
    ],
)
def test_did_you_mean(change, hint):
    with pytest.raises(SuiteError) as info:
        parse_suite(to_toml(suite_of(**change)))
    assert f"did you mean {hint}?" in "\n".join(info.value.problems), info.value.problems


def test_no_hint_when_nothing_is_close():
    with pytest.raises(SuiteError) as info:
        parse_suite(to_toml(suite_of(train={**BASE["train"], "qqqqqq": 1})))
    assert info.value.problems == ["<suite>: train.qqqqqq: unknown key"]


@pytest.mark.parametrize(("n", "ok"), [(32, False), (33, True)])  # 32·31 = 992, 33·32 = 1056
def test_far_the_test_set_cannot_support(n, ok):
    doc = suite_of(data={**BASE["data"], "test_identities": n}, eval={"far": [1e-1, 1e-3]})
    if ok:
        assert parse_suite(to_toml(doc)).trials
        return
    with pytest.raises(SuiteError) as info:
        parse_suite(to_toml(doc))
    assert info.value.problems == [
        "<suite>: eval.far: TAR@FAR 0.001 needs ≥ 1,000 impostor pairs but the test set has 992 "
        "(data.test_identities = 32 gives 32·31); raise the test set or drop this FAR (it would "
        "be n/a)"
    ]


def test_far_support_of_a_swept_test_set_names_the_sweep():
    doc = suite_of(eval={"far": [1e-3]}, sweep=[{"data": {"test_identities": [20]}}])
    doc["data"] = {**BASE["data"], "test_identities": 40}
    with pytest.raises(SuiteError) as info:
        parse_suite(to_toml(doc))
    assert len(info.value.problems) == 1
    assert "sweep[0] combination (data.test_identities=20)" in info.value.problems[0]


def test_non_utf8_and_deeply_nested_files_are_suite_errors(tmp_path):
    from harness.suite import load_suite

    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[suite]\nname = "caf\xe9"\n')
    with pytest.raises(SuiteError, match="not UTF-8"):
        load_suite(bad)
    with pytest.raises(SuiteError, match="nested"):
        parse_suite("x = " + "[" * 10_000 + "]" * 10_000)


def test_a_sweep_problem_does_not_hide_a_cross_field_rule():
    doc = suite_of(sweep=[{"memroy": [1]}, {"plb": ["exact"], "virtual_batch": [12]}])
    with pytest.raises(SuiteError) as info:
        parse_suite(to_toml(doc))
    text = "\n".join(info.value.problems)
    assert "memroy" in text and "virtual_batch=12 must be a multiple" in text, text


def test_auto_timeout_is_no_limit_for_long_trials_only():
    from harness.config import AUTO_TIMEOUT_S, trial_timeout

    small = parse_suite(to_toml(BASE)).trials[0]
    assert trial_timeout("auto", small) == AUTO_TIMEOUT_S
    assert trial_timeout(30.0, small) == 30.0 and trial_timeout(None, small) is None
    long = small.model_copy(update={"train": small.train.model_copy(update={"steps": 20_000})})
    assert trial_timeout("auto", long) is None
    image = small.model_copy(update={"model": small.model.model_copy(update={"kind": "iresnet18"})})
    assert trial_timeout("auto", image) is None


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ({"kind": "mlp", "embedding": 8, "hidden": "abc"}, "hidden"),
        ({"kind": "mlp", "embedding": 8, "depth": -1}, "depth"),
        ({"kind": "mlp", "embedding": 8, "bogus": 3}, "bogus"),
        ({"kind": "cnn_small", "embedding": 8}, "input_shape"),  # on feature data
    ],
)
def test_model_parameters_are_checked_at_validation(model, match):
    """Issue 21 item 4: these passed validate and failed every trial at build time; the
    backbone is now built on the meta device (nothing allocated) for every grid cell."""
    with pytest.raises(SuiteError, match=match):
        parse_suite(to_toml(suite_of(model=model)))
