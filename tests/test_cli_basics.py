import json

from typer.testing import CliRunner

from harness import __version__
from harness.cli import app

runner = CliRunner()


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0
    assert __version__ in r.output


def test_env_json_without_gpu_does_not_crash():
    r = runner.invoke(app, ["env", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["torch"]
    assert isinstance(info["gpus"], list)
    assert set(info["nvml"]) == {"available", "driver", "reason"}


def test_env_table():
    r = runner.invoke(app, ["env"])
    assert r.exit_code == 0, r.output
    assert "nvml" in r.output
