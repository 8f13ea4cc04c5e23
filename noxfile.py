"""nox sessions: `nox` runs tests (and lint); bench and gpu are opt-in (`nox -s bench`)."""

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"  # CPU build from the local wheel cache; an open range pulls CUDA wheels


def _install(session: nox.Session, extras: str = "dev") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The README test command."""
    _install(session)
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "mining", "harness", "tests", "noxfile.py")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """pytest-benchmark microbenchmarks. Compare with a saved run:
    `nox -s bench -- --benchmark-save=base` then `nox -s bench -- --benchmark-compare=0001
    --benchmark-compare-fail=median:10%`."""
    _install(session)
    session.run(
        "python", "-m", "pytest", "tests/bench", "--benchmark-enable", "-p", "no:randomly",
        "--benchmark-columns=min,median,iqr,rounds", *session.posargs,
    )


@nox.session(default=False)
def gpu(session: nox.Session) -> None:
    """Only the tests that need CUDA (install a CUDA torch build yourself first)."""
    session.install("-e", ".[dev,gpu]")
    session.run("python", "-m", "pytest", "-q", "-m", "gpu", *session.posargs)
