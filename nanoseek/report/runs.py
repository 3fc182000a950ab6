"""`nanoseek runs`: which runs are there, and what state is each in.

A run's status comes from its own log, so it needs no process table and works on a copied directory:
- the closing `summary` record says how it ended: finished, early-stopped or aborted;
- without one, a guard `abort` event still means aborted (the process died during its final save);
- without either, a log written to recently means the run is still going: running;
- otherwise it stopped without closing its log (a crash, kill -9, Ctrl-C, a lost machine): interrupted."""

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from nanoseek.report.records import CONFIG_FILE, RunLog, read_config, read_run
from nanoseek.train.metrics import METRICS_FILE

# A training run appends a record every step; eval and checkpoint pauses are longer than a step, so
# "recent" is generous: this many seconds, or RUNNING_INTERVALS typical record intervals if that is more.
RUNNING_IDLE_S = 300.0
RUNNING_INTERVALS = 10


def run_status(log: RunLog, now: float | None = None) -> str:
    """finished | early-stopped | aborted | running | interrupted (see the module docstring)."""
    if log.summary is not None:
        return str(log.summary.get("status", "finished"))
    if any(e["event"] == "abort" or e.get("action") == "abort" for e in log.events):
        return "aborted"
    now = time.time() if now is None else now
    gaps = [b - a for a, b in zip(log.record_times, log.record_times[1:]) if b >= a]
    interval = statistics.median(gaps) if gaps else 0.0  # seconds between records: one per step while training
    return "running" if now - log.mtime <= max(RUNNING_IDLE_S, RUNNING_INTERVALS * interval) else "interrupted"


@dataclass
class RunInfo:
    path: Path
    status: str
    preset: str
    best_val: float | None
    best_step: int | None
    last_step: int | None
    modified: float  # seconds since the epoch


def find_runs(root: str | Path) -> list[Path]:
    """Run directories under `root`: `root` itself if it is one, else its subdirectories holding a
    metrics.jsonl or a config.toml (a run that has not logged yet), searched two levels deep."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is not a directory; pass the folder holding your runs: nanoseek runs DIR "
                         "(default: runs/, where nanoseek train writes)")
    if _is_run(root):
        return [root]
    found = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        # a run, or runs grouped one level down (runs/sweep/lr-3e-4)
        found += [child] if _is_run(child) else sorted(p for p in child.iterdir() if p.is_dir() and _is_run(p))
    return found


def list_runs(root: str | Path, now: float | None = None) -> list[RunInfo]:
    """One RunInfo per run under `root`, most recently modified first."""
    infos = []
    for path in find_runs(root):
        if (path / METRICS_FILE).is_file():
            log, status = read_run(path), None
        else:  # config written, no record yet: just starting, or what `nanoseek convert` writes whole
            log = RunLog(path, config=read_config(path / CONFIG_FILE), mtime=(path / CONFIG_FILE).stat().st_mtime)
            status = "converted" if (path / "conversion.json").is_file() else None
        infos.append(RunInfo(path, status or run_status(log, now), str(log.config.get("preset", "?")),
                             *(log.best_val() or (None, None)), log.last_step, log.mtime))
    return sorted(infos, key=lambda info: info.modified, reverse=True)


def format_runs(infos: list[RunInfo], root: str | Path, now: float | None = None) -> str:
    now = time.time() if now is None else now
    if not infos:
        return f"no runs under {root} (a run directory holds metrics.jsonl and config.toml)"
    root = Path(root)
    rows = [("run", "status", "preset", "best val", "last step", "last modified")]
    for info in infos:
        name = info.path.relative_to(root) if info.path != root and info.path.is_relative_to(root) else info.path
        scored = info.best_val is not None and math.isfinite(info.best_val)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.modified)) if info.modified else "-"
        rows.append((str(name), info.status, info.preset, f"{info.best_val:.4f} @{info.best_step}" if scored else "-",
                     "-" if info.last_step is None else str(info.last_step),
                     f"{when} ({_age(now - info.modified)} ago)" if info.modified else when))
    widths = [max(map(len, column)) for column in zip(*rows)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _is_run(path: Path) -> bool:
    return (path / METRICS_FILE).is_file() or (path / CONFIG_FILE).is_file()


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
