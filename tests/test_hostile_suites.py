"""A corpus of hostile suite files and CLI invocations (issue 21 items 5, 7, 11; issue 19 item 3).

Every case runs the real CLI (`typer.testing.CliRunner` on `harness.cli.app`) and asserts: the
expected exit code; no traceback; for exit 2, exactly the expected number of `error:` lines (one
per problem) and the expected words. Nothing here trains a model.
"""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.records import ROW_COLUMNS

runner = CliRunner()

BASE = """\
[suite]
name = "hostile"
seeds = [0]

[data]
kind = "synthetic_ivs"
identities = 64
test_identities = 40
dim = 8

[model]
kind = "mlp"
embedding = 8

[train]
steps = 3
batch = 8
device = "cpu"

[baseline]
miner = "batch_hard"
loss = "triplet"

[eval]
far = [0.1]
"""


def with_(section: str, *lines: str, base: str = BASE) -> str:
    """BASE with `lines` added at the end of `[section]` (a new section when absent)."""
    head = f"[{section}]\n"
    if head not in base:
        return base + "\n" + head + "\n".join(lines) + "\n"
    before, after = base.split(head, 1)
    body, sep, rest = after.partition("\n[")
    return before + head + body.rstrip("\n") + "\n" + "\n".join(lines) + "\n" + sep + rest


def nested(kind: str, depth: int) -> str:
    if kind == "array":
        return BASE + "\n[debug]\n" + "x = " + "[" * depth + "1" + "]" * depth + "\n"
    if kind == "inline":
        return BASE + "\nx = " + "{a = " * depth + "1" + "}" * depth + "\n"
    if kind == "dotted":
        return "x" + ".a" * depth + " = 1\n" + BASE
    return BASE + "\n[" + ".".join(["t"] * depth) + "]\nk = 1\n"


def sweep(*lines: str) -> str:
    return BASE + "\n[[sweep]]\n" + "\n".join(lines) + "\n"


# (id, suite file content (str or bytes), exit code, error lines, words in the output)
SUITES: list[tuple[str, str | bytes, int, int, str]] = [
    ("valid", BASE, 0, 0, "ok (1 trials)"),
    ("timeout-inf-is-no-limit", with_("suite", "timeout_s = inf"), 0, 0, "ok"),
    ("empty-file", "", 2, 1, "suite: Field required"),
    ("binary-garbage", bytes(range(256)) * 4, 2, 1, "not UTF-8"),
    ("utf16", BASE.encode("utf-16"), 2, 1, "not UTF-8"),
    ("latin1-comment", BASE.encode() + "# caf\xe9\n".encode("latin-1"), 2, 1, "not UTF-8"),
    ("nul-byte", BASE + "\x00\n", 2, 1, "invalid TOML"),
    ("bad-toml", "[suite\nname=", 2, 1, "invalid TOML"),
    ("duplicate-key", BASE + "\n[suite]\nname = 'again'\n", 2, 1, "invalid TOML"),
    ("nested-arrays-5000", nested("array", 5000), 2, 1, "nested"),
    ("nested-inline-5000", nested("inline", 5000), 2, 1, "nested"),
    ("nested-dotted-5000", nested("dotted", 5000), 2, 1, "nested"),
    ("nested-tables-40", nested("table", 40), 2, 1, "nested"),
    ("no-suite-section", BASE.replace('[suite]\nname = "hostile"\nseeds = [0]\n', ""), 2, 1,
     "suite: Field required"),
    ("suite-not-a-table", BASE.replace("[suite]\n", 'suite = "x"\n[suite_]\n'), 2, 2, "suite"),
    ("name-uppercase", BASE.replace('"hostile"', '"Hostile"'), 2, 1, "[a-z0-9_-]+"),
    ("name-300-chars", BASE.replace('"hostile"', '"' + "a" * 300 + '"'), 2, 1, "suite.name"),
    ("name-not-a-string", BASE.replace('"hostile"', "5"), 2, 1, "suite.name"),
    ("seeds-empty", BASE.replace("seeds = [0]", "seeds = []"), 2, 1, "suite.seeds"),
    ("seeds-duplicate", BASE.replace("seeds = [0]", "seeds = [1, 1]"), 2, 1, "distinct"),
    ("seed-2**64", BASE.replace("seeds = [0]", f"seeds = [{2**64}]"), 2, 1, "seeds"),
    ("timeout-negative", with_("suite", "timeout_s = -1"), 2, 1, "suite.timeout_s"),
    ("timeout-nan", with_("suite", "timeout_s = nan"), 2, 1, "suite.timeout_s"),
    ("unknown-section", BASE + "\n[trian]\nsteps = 3\n", 2, 1, "did you mean 'train'?"),
    ("unknown-train-key", with_("train", "stpes = 3"), 2, 1, "did you mean 'steps'?"),
    ("lr-a-string", with_("train", 'lr = "fast"'), 2, 1, "train.lr"),
    ("batch-odd", BASE.replace("batch = 8", "batch = 7"), 2, 1, "train.batch"),
    ("three-train-problems", BASE.replace("batch = 8", "batch = 7\nzzz = 1\nlr = 0"), 2, 3,
     "train.zzz"),
    ("device-tpu", BASE.replace('device = "cpu"', 'device = "tpu"'), 2, 1, "train.device"),
    ("far-above-1", BASE.replace("far = [0.1]", "far = [1.5]"), 2, 1, "eval.far"),
    ("far-unsupported", BASE.replace("far = [0.1]", "far = [1e-3]").replace(
        "test_identities = 40", "test_identities = 20"), 2, 1, "needs ≥ 1,000 impostor pairs"),
    ("far-1e-6-default-test-set", BASE.replace("far = [0.1]", "far = [1e-6]").replace(
        "test_identities = 40\n", ""), 2, 1, "1000·999"),
    ("data-kind-unknown", BASE.replace('kind = "synthetic_ivs"', 'kind = "synthetic_iv"'), 2, 1,
     "did you mean 'synthetic_ivs'?"),
    ("data-key-misspelt", with_("data", "identites = 5"), 2, 1, "did you mean 'identities'?"),
    ("data-dim-float", BASE.replace("dim = 8", "dim = 1e9"), 2, 1, "data.dim"),
    ("data-noise-nan", with_("data", "noise = nan"), 2, 1, "data.noise"),
    ("data-param-table", with_("data", "x = {a = 1}"), 2, 1, "data.x"),
    ("image-folder-missing-dir", BASE.replace('kind = "synthetic_ivs"', 'kind = "image_folder"\n'
     'path = "/nonexistent/faces"').replace("identities = 64\ntest_identities = 40\ndim = 8\n", ""),
     2, 1, "/nonexistent/faces"),
    ("image-folder-no-path", BASE.replace('kind = "synthetic_ivs"', 'kind = "image_folder"')
     .replace("identities = 64\ntest_identities = 40\ndim = 8\n", ""), 2, 1, "data"),
    ("features-missing-file", BASE.replace('kind = "synthetic_ivs"', 'kind = "features"\n'
     'path = "/nonexistent.npy"').replace("identities = 64\ntest_identities = 40\ndim = 8\n", ""),
     2, 1, "/nonexistent.npy"),
    ("model-kind-misspelt", BASE.replace('kind = "mlp"', 'kind = "mlpp"'), 2, 1,
     "did you mean 'mlp'?"),
    ("model-embedding-1", BASE.replace("embedding = 8", "embedding = 1"), 2, 1, "model.embedding"),
    ("model-init-missing", with_("model", 'init = "/nonexistent.pt"'), 2, 1, "/nonexistent.pt"),
    ("miner-misspelt", BASE.replace('"batch_hard"', '"batch_hrd"'), 2, 1,
     "did you mean 'batch_hard'?"),
    ("loss-misspelt", BASE.replace('loss = "triplet"', 'loss = "triplett"'), 2, 1,
     "did you mean 'triplet'?"),
    ("head-misspelt", with_("baseline", 'head = "cosfac"'), 2, 1, "did you mean 'cosface'?"),
    ("plb-unknown", with_("baseline", 'plb = "fast"'), 2, 1, "baseline.plb"),
    ("virtual-batch-not-multiple", with_("baseline", 'plb = "exact"', "virtual_batch = 12"), 2, 1,
     "virtual_batch"),
    ("head-params-without-head", with_("baseline", "head_params = {s = 1.0}"), 2, 1, "head_params"),
    ("memory-negative", with_("baseline", "memory = -1"), 2, 1, "baseline.memory"),
    ("memory-1e30", with_("baseline", "memory = 1e30"), 2, 1, "baseline.memory"),
    ("debug-segfault", BASE + '\n[debug]\ninject = "segfault"\n', 2, 1, "debug.inject"),
    ("sweep-not-a-list", BASE.replace("[suite]", "sweep = 5\n[suite]"), 2, 1, "sweep"),
    ("sweep-empty-block", BASE + "\n[[sweep]]\n", 2, 1, "sweep[0]"),
    ("sweep-key-misspelt", sweep("memroy = [1]"), 2, 1, "did you mean 'memory'?"),
    ("sweep-value-not-a-list", sweep("memory = 16"), 2, 1, "sweep[0].memory"),
    ("sweep-empty-list", sweep("memory = []"), 2, 1, "sweep[0].memory"),
    ("sweep-bad-value", sweep("memory = [0, -1]"), 2, 1, "sweep[0].memory"),
    ("sweep-unknown-section", sweep("gpu.x = [1]"), 2, 1, "sweep[0].gpu: unknown key"),
    ("sweep-section-key-misspelt", sweep("train.lrr = [0.1]"), 2, 1, "did you mean 'lr'?"),
    ("sweep-head-misspelt", sweep('head = ["cosfac"]'), 2, 1, "did you mean 'cosface'?"),
    ("grid-1e9", sweep(f"memory = {list(range(1000))}", f"margin = {[i / 1000 for i in range(1000)]}",
     f"train.lr = {[(i + 1) / 1000 for i in range(1000)]}"), 2, 1, "1,000,000,001 trials"),
    ("grid-10001", sweep(f"memory = {list(range(1, 10001))}"), 2, 1, "10,001 trials"),
    ("every-pass-at-once", BASE.replace("stpes", "").replace("batch = 8", "batch = 8\nstpes = 1")
     .replace('"batch_hard"', '"batch_hrd"') + "\n[[sweep]]\nmemroy = [1]\n[trian]\n", 2, 4,
     "did you mean 'batch_hard'?"),
]  # fmt: skip


def invoke(*args: object):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output, r.output
    return r


def error_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize(("content", "code", "errors", "words"), [c[1:] for c in SUITES],
                         ids=[c[0] for c in SUITES])  # fmt: skip
def test_hostile_suite_file(tmp_path, content, code, errors, words):
    path = tmp_path / "suite.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    start = time.perf_counter()
    r = invoke("validate", path)
    assert time.perf_counter() - start < 60, "validation must stay cheap"
    assert r.exit_code == code, r.output
    assert len(error_lines(r.output)) == errors, r.output
    assert words in r.output, r.output


def test_corpus_is_large_enough():
    assert len(SUITES) + len(INVOCATIONS) >= 50


@pytest.fixture
def suite_file(tmp_path) -> Path:
    path = tmp_path / "suite.toml"
    path.write_text(BASE)
    return path


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A minimal finished run: two ok trials (two seeds) and a failed one."""
    path = tmp_path / "results" / "hostile" / "r1"
    (path / "trials").mkdir(parents=True)
    (path / "run.json").write_text('{"start": "2026-01-01T00:00:00+00:00"}')
    for i, (seed, status) in enumerate([(0, "ok"), (1, "ok"), (0, "failed")]):
        row = {k: None for k in ROW_COLUMNS} | {
            "trial_id": f"t{i}", "trial_index": i, "seed": seed, "suite": "hostile",
            "method": "batch_hard+triplet", "memory": 64 * (status != "ok"), "virtual_batch": 8,
            "is_baseline": status == "ok", "status": status, "tar@1e-1": 0.5 + 0.1 * seed,
            "peak_rss_mib": 10.0, "samples_per_s": 100.0, "eer": 0.2, "auc": 0.8,
            "error": "RuntimeError: boom" if status != "ok" else None,
        }  # fmt: skip
        pl.DataFrame([row], schema_overrides={**ROW_COLUMNS, "tar@1e-1": pl.Float64}).write_parquet(
            path / "trials" / f"t{i}.parquet"
        )
    return path


# (id, arguments with {suite} / {run} / {file} placeholders, exit code, words)
INVOCATIONS: list[tuple[str, list[str], int, str]] = [
    ("run-jobs-0", ["run", "{suite}", "--jobs", "0"], 2, "--jobs"),
    ("run-jobs-abc", ["run", "{suite}", "--jobs", "abc"], 2, "--jobs"),
    ("run-timeout-abc", ["run", "{suite}", "--timeout", "abc"], 2, "--timeout"),
    ("run-timeout-negative", ["run", "{suite}", "--timeout", "-1"], 2, "--timeout"),
    ("run-executor-unknown", ["run", "{suite}", "--executor", "slurm"], 2, "--executor"),
    ("run-unknown-option", ["run", "{suite}", "--nope"], 2, "--nope"),
    ("run-max-trials-0", ["run", "{suite}", "--max-trials", "0"], 2, "--max-trials"),
    ("plan-jobs-0", ["plan", "{suite}", "--jobs", "0"], 2, "--jobs"),
    ("plan-device-tpu", ["plan", "{suite}", "--device", "tpu"], 2, "--device"),
    ("validate-no-file", ["validate", "{tmp}/missing.toml"], 2, "cannot read"),
    ("validate-a-directory", ["validate", "{tmp}"], 2, "cannot read"),
    ("validate-no-argument", ["validate"], 2, "Missing argument"),
    ("unknown-command", ["frobnicate"], 2, "frobnicate"),
    ("show-missing-run", ["show", "{tmp}/nope"], 2, "not a run directory"),
    ("show-bad-format", ["show", "{run}", "--format", "xml"], 2, "--format"),
    ("show-far-not-evaluated", ["show", "{run}", "--far", "1e-4"], 2, "not evaluated"),
    ("show-far-abc", ["show", "{run}", "--far", "abc"], 2, "--far"),
    ("show-suite-dir-without-latest", ["show", "{run}/.."], 2, "--latest"),
    ("show-latest-nothing", ["show", "{tmp}/empty", "--latest"], 2, "no run under"),
    (
        "show-latest-by-name",
        ["show", "hostile", "--latest", "--results-dir", "{run}/../.."],
        0,
        "TAR@1e-1",
    ),
    ("plot-out-is-a-file", ["plot", "{run}", "--out", "{file}"], 2, "plot directory"),
    ("plot-out-under-a-file", ["plot", "{run}", "--out", "{file}/sub"], 2, "plot directory"),
]


@pytest.mark.parametrize(("args", "code", "words"), [c[1:] for c in INVOCATIONS],
                         ids=[c[0] for c in INVOCATIONS])  # fmt: skip
def test_hostile_invocation(tmp_path, suite_file, run_dir, args, code, words):
    (tmp_path / "empty").mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    subs = {"{suite}": suite_file, "{run}": run_dir, "{file}": a_file, "{tmp}": tmp_path}
    argv = []
    for a in args:
        for key, value in subs.items():
            a = a.replace(key, str(value))
        argv.append(a)
    r = invoke(*argv)
    assert r.exit_code == code, r.output
    assert words in r.output, r.output
    if code == 2:
        assert len(error_lines(r.output)) == 1, r.output
        assert "╭" not in r.output and "Usage:" not in r.output, r.output  # no boxed panel
    assert not list(tmp_path.rglob("*.png"))


def test_max_trials_overrides_the_grid_limit(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(sweep("memory = [16, 32]"))  # 3 trials
    r = invoke("validate", path, "--max-trials", "2")
    assert r.exit_code == 2 and "3 trials, above the limit of 2" in r.output, r.output
    assert invoke("validate", path, "--max-trials", "3").exit_code == 0
    assert invoke("plan", path, "--max-trials", "2").exit_code == 2


def test_a_huge_grid_is_refused_before_expanding(tmp_path):
    path = tmp_path / "huge.toml"
    path.write_text(
        sweep(
            f"memory = {list(range(10**4))}", f"train.lr = {[(i + 1) / 1e4 for i in range(10**4)]}"
        )
    )
    start = time.perf_counter()
    r = invoke("plan", path)
    assert r.exit_code == 2 and "100,000,001 trials" in r.output, r.output
    assert time.perf_counter() - start < 10
