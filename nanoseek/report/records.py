"""Read a run directory back: metrics.jsonl (validated line by line), config.toml, file times.

A run's log is evidence after something went wrong, so reading it never crashes on a bad line: a line
that is not JSON, not an object, has no `kind` or `step`, or holds a non-number where a plotted number
belongs (a crash mid-write, a hand edit) is skipped and counted, and one warning line says how many.
A missing metrics.jsonl is a clear error instead: there is nothing to report on.

A resumed run appends to the same file, so steps after its checkpoint appear twice: a record whose step
is behind what the log has already reached starts a new segment, and the abandoned records from that
step on are dropped. What remains is the history that led to the run's current state. Within one
segment no record is behind that point: a step's guard event comes just before its training record,
and an eval's (or the summary's) step counts the steps done, one past the last training record.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nanoseek.config import tomllib  # the standard library's, or tomli on Python 3.10
from nanoseek.train.metrics import METRICS_FILE

__all__ = ["RunLog", "read_run", "read_config", "loss_components", "layer_fields", "typical_record_interval"]

CONFIG_FILE = "config.toml"
KINDS = ("train", "eval", "event", "summary")
# Text fields of records; every other field is numeric (or a list, which nothing here plots).
TEXT_FIELDS = {"kind", "action", "event", "cause", "module", "status", "detail"}
# Fields the report plots must hold numbers (non-finite ones are written as "nan"/"inf"/"-inf" strings,
# see metrics.py); null is allowed for mfu, which has no value without a known GPU peak.
_PLOTTED = re.compile(r"^(loss|ce|mtp_\d+|aux|z|logit_z|grad_norm|lr|tokens_per_sec|mfu|val_.*|"
                      r"attn_logit_max/.*|expert_load_imbalance/.*)$")
_NONFINITE = {"nan", "inf", "-inf"}
_AUX_LOSSES = ("aux", "z", "logit_z")


@dataclass
class RunLog:
    """One run's records, decoded (non-finite strings back to floats) and in step order per kind."""

    run_dir: Path
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    summary: dict | None = None  # the closing record, if the latest segment wrote one
    config: dict = field(default_factory=dict)  # config.toml as a nested dict ({} when absent)
    skipped_lines: int = 0  # malformed lines left out
    resumed_at: list[int] = field(default_factory=list)  # steps where a resumed segment took over
    elapsed_s: float = 0.0  # wall time covered by records, summed over segments (gaps between them left out)
    record_times: list[float] = field(default_factory=list)  # `time` of the last records, oldest first
    mtime: float = 0.0  # metrics.jsonl's last modification (seconds since the epoch)

    @property
    def name(self) -> str:
        return self.run_dir.name or str(self.run_dir)

    @property
    def last_step(self) -> int | None:
        """The last step with a training record (None before the first one)."""
        return self.train[-1]["step"] if self.train else None

    def series(self, name: str, kind: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of every `kind` record that has `name`; None values become NaN."""
        records = {"train": self.train, "eval": self.evals}[kind]
        pairs = [(r["step"], r[name]) for r in records if name in r]
        steps = np.array([s for s, _ in pairs], dtype=np.int64)
        values = np.array([math.nan if v is None else float(v) for _, v in pairs], dtype=np.float64)
        return steps, values

    def best_val(self) -> tuple[float, int] | None:
        """(lowest finite val_loss, its step), or None without a finite eval."""
        scored = [(r["val_loss"], r["step"]) for r in self.evals
                  if isinstance(r.get("val_loss"), float) and math.isfinite(r["val_loss"])]
        return min(scored, key=lambda item: item[0]) if scored else None

    def event_counts(self) -> dict[str, int]:
        """{guard action (skip, rollback, ...): how many}, in order of first appearance."""
        counts: dict[str, int] = {}
        for event in self.events:
            action = event.get("action") or event["event"]
            counts[action] = counts.get(action, 0) + 1
        return counts

    def setting(self, section: str, key: str, default=None):
        """config.toml's [section] key, or `default` when the file or the key is missing."""
        table = self.config.get(section, {})
        return table.get(key, default) if isinstance(table, dict) else default


def loss_components(log: RunLog) -> tuple[list[str], list[str]]:
    """(main losses: ce then mtp_1..k, auxiliary losses: aux, z, logit_z) present in the training records."""
    seen: dict[str, None] = {}
    for record in log.train:
        for key in record:
            if key == "ce" or re.fullmatch(r"mtp_\d+", key) or key in _AUX_LOSSES:
                seen[key] = None
    main = sorted((k for k in seen if k not in _AUX_LOSSES), key=lambda k: (k != "ce", len(k), k))
    return main, [k for k in _AUX_LOSSES if k in seen]


def layer_fields(log: RunLog, prefix: str) -> list[str]:
    """Layer names logged under `prefix/` (e.g. "expert_load_imbalance"), in the model's module order."""
    seen: dict[str, None] = {}
    for record in log.train:
        for key in record:
            if key.startswith(prefix + "/"):
                seen[key.split("/", 1)[1]] = None
    return list(seen)


def read_run(run_dir: str | Path, warn: Callable[[str], None] | None = None) -> RunLog:
    """Read RUN_DIR/metrics.jsonl (and config.toml if present).

    warn: called once with a one-line message when malformed lines were skipped (default: stderr).
    Raises ValueError when the directory or its metrics.jsonl does not exist.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        what = "does not exist" if not run_dir.exists() else f"has no {METRICS_FILE}"
        raise ValueError(f"run dir {str(run_dir)!r} {what}; pass a directory written by `nanoseek train` "
                         f"(it holds config.toml and {METRICS_FILE})")
    log = RunLog(run_dir=run_dir, config=read_config(run_dir / CONFIG_FILE), mtime=path.stat().st_mtime)
    problems: list[str] = []
    frontier = 0  # one past the last training step: where the next record of this segment would be
    segment_start = None
    times: list[float] = []
    with open(path, encoding="utf-8", errors="replace") as file:
        for record in _records(file, problems):
            kind, step = record["kind"], record["step"]
            if kind not in KINDS:
                continue  # a kind a newer version writes: not an error, just nothing this report draws
            if step < frontier:  # a resumed segment restarting from an earlier checkpoint
                _truncate(log, step)
                log.resumed_at.append(step)
                frontier = step
                if segment_start is not None and times:
                    log.elapsed_s += times[-1] - segment_start
                segment_start = None
            stamp = record.get("time")
            if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) and math.isfinite(stamp):
                segment_start = stamp if segment_start is None else segment_start
                times.append(stamp)
            if kind == "summary" and segment_start is not None:  # the process ended here; a resume starts anew
                log.elapsed_s += times[-1] - segment_start
                segment_start = None
            if kind != "summary":
                log.summary = None  # records after a summary: the run was resumed, the summary is stale
            if kind == "train":
                log.train.append(record)
                frontier = max(frontier, step + 1)
            elif kind == "eval":
                log.evals.append(record)
            elif kind == "event":
                log.events.append(record)
            else:
                log.summary = record
    if segment_start is not None and times:
        log.elapsed_s += times[-1] - segment_start
    log.record_times = times[-50:]
    log.skipped_lines = len(problems)
    if problems:
        (warn or (lambda message: print(message, file=sys.stderr)))(
            f"nanoseek: warning: {path}: skipped {len(problems)} malformed "
            f"line{'s' if len(problems) > 1 else ''} (first at {problems[0]})")
    return log


def _records(lines: Iterable[str], problems: list[str]) -> Iterator[dict]:
    """The well-formed records of metrics.jsonl lines; each malformed line adds 'line N: what' to problems."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record, problem = _parse(line)
        if problem is None and not line.endswith("\n"):
            problem = "unterminated last line (a crash or a write in progress)"
        if problem is not None:
            problems.append(f"line {number}: {problem}")
        else:
            yield record


def typical_record_interval(log: RunLog) -> float | None:
    """Median seconds between the last records (one per step while training), or None with too few."""
    gaps = [b - a for a, b in zip(log.record_times, log.record_times[1:]) if b >= a]
    return statistics.median(gaps) if gaps else None


# ---- helpers ---------------------------------------------------------------------------------------



def _parse(line: str) -> tuple[dict | None, str | None]:
    """(decoded record, None) or (None, why the line is malformed)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None, "not JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if not isinstance(record.get("kind"), str):
        return None, "no 'kind'"
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return None, "no integer 'step'"
    if record["kind"] == "event" and not isinstance(record.get("event"), str):
        return None, "an event without 'event'"
    decoded = {}
    for key, value in record.items():
        if isinstance(value, str) and value in _NONFINITE and key not in TEXT_FIELDS:
            value = float(value)
        if _PLOTTED.match(key):
            if isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # json writes 2.0 as 2.0 but a hand-made line may say 2
            if not (value is None or isinstance(value, float)):
                return None, f"{key!r} is not a number"
        decoded[key] = value
    return decoded, None


def _truncate(log: RunLog, step: int) -> None:
    """Drop what a resumed segment from `step` replaces. Evals at `step` ran before that checkpoint
    was written (an eval's step counts the steps done), so they stay."""
    log.train = [r for r in log.train if r["step"] < step]
    log.events = [r for r in log.events if r["step"] < step]
    log.evals = [r for r in log.evals if r["step"] <= step]
    log.summary = None


def read_config(path: Path) -> dict:
    """config.toml as a dict; {} when missing or unreadable (a report still draws without it)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}
