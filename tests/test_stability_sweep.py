"""The stability sweep's smoke mode (CI-sized) end to end, and its LR-sensitivity arithmetic."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from stability_sweep import sensitivity  # noqa: E402


def test_sensitivity_caps_failed_runs_at_the_initial_loss():
    """Wortsman et al. 2023: E over LRs of [min(loss, initial) - best]; a NaN run counts at the initial loss."""
    per_lr, sens = sensitivity({1e-3: [4.0, 4.2], 1e-2: [3.0, 3.2], 1e-1: [None, 7.0]}, initial=6.0)
    assert per_lr == pytest.approx({1e-3: 4.1, 1e-2: 3.1, 1e-1: 6.0})
    assert sens == pytest.approx((1.0 + 0.0 + 2.9) / 3)


@pytest.mark.slow
def test_stability_sweep_smoke_prints_a_full_table_and_resumes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(BENCH / "stability_sweep.py"), "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| old", "| default"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        values = [float(c) for c in cells[1:4]]  # 2 LRs + sensitivity
        nonfinite, plateau, skips = (int(c) for c in cells[4:])  # 20 steps end above the plateau line: counted
        assert all(0 <= v < 10 for v in values) and nonfinite == 0 and 0 <= plateau <= 2 and skips >= 0
    lines = (tmp_path / "smoke.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["final"] is not None for line in lines)
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and rows == [line for line in again.stdout.splitlines()
                                              if line.startswith(("| old", "| default"))]
    assert len((tmp_path / "smoke.jsonl").read_text().splitlines()) == 4  # nothing re-run
