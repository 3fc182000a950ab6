"""The package's layering (docs/ARCHITECTURE.md) as import-linter checks it: every import runs downwards
(config -> model, data -> train -> interop -> features -> cli) and no two packages import each other."""

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
