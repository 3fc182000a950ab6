"""The package's layering (docs/ARCHITECTURE.md) as import-linter checks it: every import runs downwards
(config -> model, data -> train -> interop -> features -> cli) and no two packages import each other."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    run = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
           "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"]
    result = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout, result.stdout


def _python_files():
    return sorted((ROOT / "nanoseek").rglob("*.py"))


def test_files_and_functions_stay_small():
    """Small files with one job, and functions that fit on a screen: no module over 450 lines, no function
    over 60 (docs/ARCHITECTURE.md)."""
    too_long = []
    for path in _python_files():
        source = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT)
        if len(source.splitlines()) > 450:
            too_long.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)
