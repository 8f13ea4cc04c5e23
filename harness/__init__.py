"""harness — the `hembench` CLI: declarative ablation suites, isolated trials, measurement,
results (polars/Parquet), reporting and regression checks. Built on top of `mining`."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hembench")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
