"""The stability sweep's smoke mode (CI-sized): it runs end to end and prints a complete table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SWEEP = Path(__file__).resolve().parents[1] / "bench" / "stability_sweep.py"


@pytest.mark.slow
def test_stability_sweep_smoke_prints_a_full_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SWEEP), "--smoke"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| default")]
    assert len(rows) == 2  # default, default + guard
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        values = [float(c) for c in cells[1:-1]]  # 2 LRs + sensitivity
        assert len(values) == 3 and all(0 <= v < 10 for v in values)
