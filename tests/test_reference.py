"""The suite reference (docs/suites.md, harness/reference.py) and `hembench schema`."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from harness import reference
from harness.cli import app
from harness.config import SuiteFile
from harness.suite import parse_suite

runner = CliRunner()


def test_suites_md_is_not_stale():
    """The generated block equals what the code says now; on failure, regenerate with
    `python -m harness.reference --write` and commit docs/suites.md."""
    text = reference.DOC.read_text(encoding="utf-8")
    assert text == reference.render(text), "run: python -m harness.reference --write"
    assert reference.main(["--check"]) == 0


def test_every_key_has_a_meaning():
    """Every schema field has a description, every data/model key a line of help, and no help
    names a key that is gone."""
    assert reference.missing_help() == []


def test_every_key_of_every_section_and_kind_is_listed():
    block = reference.generate()
    for section, model in reference._section_models().items():
        assert f"### `[{section}]`" in block
        for key in model.model_fields:
            assert f"| `{key}` |" in block, f"{section}.{key}"
    for kinds in (reference.data_defaults(), reference.model_defaults()):
        for kind, keys in kinds.items():
            assert f'### `kind = "{kind}"`' in block
            assert all(f"| `{k}` |" in block for k in keys), kind
    assert "**required**" in block  # suite.name
    for names in reference.registry_names().values():
        assert all(f"`{n}`" in block for n in names)


def test_model_defaults_are_the_builders_own():
    defaults = reference.model_defaults()
    assert defaults["mlp"] == {"hidden": 256, "depth": 2}
    assert set(defaults) >= {"mlp", "cnn_small", "iresnet18", "iresnet50"}


def test_a_stale_block_is_detected(tmp_path, monkeypatch):
    doc = tmp_path / "suites.md"
    doc.write_text(f"intro\n{reference.BEGIN}\nold table\n{reference.END}\noutro\n")
    monkeypatch.setattr(reference, "DOC", doc)
    assert reference.main(["--check"]) == 1
    assert reference.main(["--write"]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert reference.main(["--check"]) == 0


def test_missing_markers_are_an_error():
    with pytest.raises(ValueError, match="markers"):
        reference.render("no markers here")


@pytest.mark.parametrize(
    ("value", "text"),
    [(True, "true"), ("sgd", '"sgd"'), (0.1, "0.1"), (2.0, "2.0"), (5e-4, "0.0005"),
     ([0.9, 0.999], "[0.9, 0.999]"), ({"s": 64.0}, "{s = 64.0}"), (1e-3, "0.001")],
)  # fmt: skip
def test_defaults_are_written_as_toml(value, text):
    assert reference.toml_value(value) == text


def test_worked_image_folder_example_validates(tmp_path):
    """The example of docs/suites.md is a valid suite once its image folder exists (200
    identity directories: 40 test identities support FAR 1e-3)."""
    text = reference.DOC.read_text(encoding="utf-8")
    example = text[text.index("## Worked example") :]
    toml = re.search(r"```toml\n(.*?)```", example, re.S).group(1)
    for i in range(200):
        (tmp_path / f"id{i:03d}").mkdir()
    suite = parse_suite(toml.replace("/data/ivs", str(tmp_path)), path="example.toml")
    assert len(suite.trials) == 12  # as the text says: 4 configurations × 3 seeds
    assert suite.baseline.data.kind == "image_folder"


def test_worked_example_with_too_few_identities_says_so(tmp_path):
    text = reference.DOC.read_text(encoding="utf-8")
    toml = re.search(r"```toml\n(.*?)```", text[text.index("## Worked example") :], re.S).group(1)
    for i in range(20):
        (tmp_path / f"id{i:03d}").mkdir()
    with pytest.raises(Exception, match="needs ≥ 1,000 impostor pairs"):
        parse_suite(toml.replace("/data/ivs", str(tmp_path)), path="example.toml")


def test_schema_command_prints_the_json_schema():
    r = runner.invoke(app, ["schema"])
    assert r.exit_code == 0, r.output
    schema = json.loads(r.output)
    assert schema == json.loads(json.dumps(SuiteFile.model_json_schema()))
    assert set(schema["properties"]) >= {"suite", "data", "model", "train", "baseline", "sweep"}
    train = schema["$defs"]["TrainCfg"]["properties"]
    assert train["steps"]["description"] and train["steps"]["default"] == 100
    assert schema["$defs"]["TrainCfg"]["additionalProperties"] is False  # typos are flagged
