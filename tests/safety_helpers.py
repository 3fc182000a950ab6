"""What the run-safety tests share: the tiny model's flags, running the CLI (in this process or as a user
would, in a subprocess), and a fingerprint of every file under a folder to prove nothing changed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from tiny import TINY_MODEL

FLAGS = [arg for key, value in TINY_MODEL.items() for arg in (f"--model.{key.replace('_', '-')}", str(value))] + [
    "--data.tokenizer", "char", "--data.seq-len", "16", "--train.batch-size", "4", "--train.eval-every", "3",
    "--train.save-every", "3", "--train.eval-batches", "1", "--train.no-tensorboard", "--train.warmup-steps", "2",
    "--device", "cpu", "--no-sample", "--no-progress"]

GQA_FLAGS = ["--preset", "tiny-gqa", "--model.dim", "32", "--model.n-heads", "2", "--model.n-layers", "2",
             "--model.inter-dim", "64", "--model.max-seq-len", "32", "--data.tokenizer", "byte", "--data.seq-len", "16",
             "--train.batch-size", "4", "--train.no-tensorboard", "--device", "cpu", "--no-sample", "--no-progress"]


def make_runs(root: Path, corpus: Path) -> dict[str, Path]:
    """A tiny MLA run, a tiny GQA run (byte tokenizer: what convert and npt take) and its MLA conversion."""
    from nanoseek.cli import main

    assert main(["train", "--data", str(corpus), "--out", str(root / "mla"), "--max-steps", "4", *FLAGS]) == 0
    assert main(["train", "--data", str(corpus), "--out", str(root / "gqa"), "--max-steps", "2", *GQA_FLAGS]) == 0
    assert main(["convert", "--from", str(root / "gqa"), "--out", str(root / "conv"), "--to", "mla", "--data",
                 str(corpus), "--seq-len", "16", "--calib-tokens", "64", "--eval-tokens", "64"]) == 0
    return {"mla": root / "mla", "gqa": root / "gqa", "conv": root / "conv"}


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "nanoseek", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def popen_cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "nanoseek", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def fingerprint(root: Path, skip: tuple[str, ...] = (".nanoseek.lock",)) -> dict[str, str]:
    """relative path -> sha256 (or "dir") of everything under `root`, except paths under `skip` names (the
    lock file records who last held the directory: it is rewritten by every command, which is its job)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in skip for part in rel.parts):
            continue
        found[str(rel)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def error_lines(stderr: str) -> list[str]:
    """The lines a failed command printed on stderr, progress bars (carriage-return redraws) left out."""
    return [line for line in stderr.splitlines() if line.strip() and "\r" not in line and not line.startswith(
        ("prepare 1/2", "prepare 2/2"))]


def assert_one_line_failure(code: int, stderr: str, *needles: str) -> str:
    assert code == 2, (code, stderr)
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("nanoseek: error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
