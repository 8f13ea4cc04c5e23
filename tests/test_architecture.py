"""Structure that the code relies on: no import cycles, `mining` never imports `harness`, and
reading a run (`show`, `compare`) or parsing a suite never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "mining")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Project modules imported anywhere in the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    return {
        name: {m for m in _imports(p) if m in modules and m != name} for name, p in modules.items()
    }


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            # a package's __init__ importing its own submodules is not a cycle of meaning
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_mining_never_imports_harness():
    offenders = {n: sorted(d) for n, d in _graph().items() if n.startswith("mining")}
    offenders = {n: [d for d in deps if d.startswith("harness")] for n, deps in offenders.items()}
    assert not {n: d for n, d in offenders.items() if d}


def test_reading_runs_and_parsing_suites_never_import_torch(tmp_path):
    """`hembench show`/`compare` and suite parsing without checks stay torch-free (fast: the
    Ray driver and a results reader on a laptop need no torch)."""
    code = f"""
import sys
import polars as pl
from rich.console import Console
from harness import cli, compare, report
from harness.records import ROW_COLUMNS
from harness.suite import load_suite

load_suite({str(ROOT / "suites" / "smoke.toml")!r}, check=False)
rows = [{{**dict.fromkeys(ROW_COLUMNS), "status": "ok", "method": "m", "memory": 0,
          "virtual_batch": 8, "seed": s, "is_baseline": True, "tar@1e-1": 0.5,
          "peak_rss_mib": 1.0, "samples_per_s": 10.0, "eer": 0.1, "auc": 0.9}} for s in (0, 1)]
report.show(pl.DataFrame(rows, schema_overrides=ROW_COLUMNS), "table", None, Console(file=None))
torch = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not torch, torch[:5]
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)


def test_row_schema_names_every_data_quality_count():
    from harness.data.ivs import QUALITY_KEYS
    from harness.records import ROW_COLUMNS

    assert set(QUALITY_KEYS) <= set(ROW_COLUMNS)
