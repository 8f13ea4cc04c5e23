"""Performance-regression commands (`hembench bench`, `hembench compare`), registered on the app.

Kept apart from cli.py so the regression tooling can evolve on its own.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the performance commands to `app` (filled in by the CI-regression work, issue 8)."""
