"""Read a run directory back: metrics.jsonl (validated line by line), config.toml, file times.

A run's log is evidence after something went wrong, so a malformed line (a crash mid-write, a hand edit)
is skipped and counted, never a crash. A resumed run appends to the same file: a record whose step is
behind what the log has reached starts a new segment, and the abandoned records from that step on are
dropped. (Within a segment a step's guard event comes just before its training record, and an eval's or
the summary's step counts the steps done, so no record is behind.)"""

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nanoseek.config import tomllib  # the standard library's, or tomli on Python 3.10
from nanoseek.train.metrics import METRICS_FILE

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
    def last_step(self) -> int | None:
        return self.train[-1]["step"] if self.train else None

    def series(self, name: str, kind: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of every `kind` record that has `name`; None values become NaN."""
        records = [r for r in (self.train if kind == "train" else self.evals) if name in r]
        return (np.array([r["step"] for r in records], dtype=np.int64),
                np.array([math.nan if r[name] is None else float(r[name]) for r in records], dtype=np.float64))

    def best_val(self) -> tuple[float, int] | None:
        """(lowest finite val_loss, its step), or None without a finite eval."""
        scored = [(r["val_loss"], r["step"]) for r in self.evals
                  if isinstance(r.get("val_loss"), float) and math.isfinite(r["val_loss"])]
        return min(scored, key=lambda item: item[0]) if scored else None

    def setting(self, name: str, default=None):
        """config.toml's `section.key` (or top-level `key`), or `default` when the file or the key is missing."""
        section, _, key = name.rpartition(".")
        table = self.config.get(section, {}) if section else self.config
        return table.get(key, default) if isinstance(table, dict) else default


def event_action(event: dict) -> str:
    """What the guard did (skip, rollback, abort, ...); an event without an action is named by its kind."""
    return event.get("action") or event["event"]


def loss_components(log: RunLog) -> tuple[list[str], list[str]]:
    """(main losses: ce then mtp_1..k, auxiliary losses: aux, z, logit_z) present in the training records."""
    seen = {key: None for record in log.train for key in record
            if key == "ce" or re.fullmatch(r"mtp_\d+", key) or key in _AUX_LOSSES}
    main = sorted((k for k in seen if k not in _AUX_LOSSES), key=lambda k: (k != "ce", len(k), k))
    return main, [k for k in _AUX_LOSSES if k in seen]


def layer_fields(log: RunLog, prefix: str) -> list[str]:
    """Layer names logged under `prefix/` (e.g. "expert_load_imbalance"), in the model's module order."""
    return list({key.split("/", 1)[1]: None for record in log.train for key in record if key.startswith(prefix + "/")})


def read_run(run_dir: str | Path, warn: Callable[[str], None] | None = None) -> RunLog:
    """Read RUN_DIR/metrics.jsonl (and config.toml if present); ValueError when either the directory or its
    metrics.jsonl does not exist. warn: called once with a one-line message when malformed lines were skipped
    (default: print to stderr)."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        what = "does not exist" if not run_dir.exists() else f"has no {METRICS_FILE}"
        raise ValueError(f"run dir {str(run_dir)!r} {what}; pass a directory written by `nanoseek train` "
                         f"(it holds config.toml and {METRICS_FILE})")
    log = RunLog(run_dir=run_dir, config=read_config(run_dir / CONFIG_FILE), mtime=path.stat().st_mtime)
    kept = {"train": log.train, "eval": log.evals, "event": log.events}
    problems: list[str] = []
    frontier = 0  # one past the last training step: where the next record of this segment would be
    segments: list[list[float]] = [[]]  # record times of each process's run; the gaps between them are left out
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, 1):
            record, problem = _parse(line)
            if problem is not None:
                problems.append(f"line {number}: {problem}")
            if record is None or record["kind"] not in KINDS:
                continue  # malformed, blank, or a kind a newer version writes (nothing this report draws)
            kind, step = record["kind"], record["step"]
            if step < frontier:  # a resumed segment restarting from an earlier checkpoint: drop what it replaces
                log.train[:] = [r for r in log.train if r["step"] < step]
                log.events[:] = [r for r in log.events if r["step"] < step]
                # evals at `step` ran before that checkpoint was written (an eval's step counts the steps done)
                log.evals[:] = [r for r in log.evals if r["step"] <= step]
                log.resumed_at.append(step)
                frontier = step
                segments.append([])
            stamp = record.get("time")
            if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) and math.isfinite(stamp):
                segments[-1].append(stamp)
            if kind == "summary":
                log.summary = record
                segments.append([])  # the process ended here; a resume starts anew
                continue
            log.summary = None  # records after a summary: the run was resumed, the summary is stale
            kept[kind].append(record)
            if kind == "train":
                frontier = step + 1
    log.elapsed_s = sum(times[-1] - times[0] for times in segments if times)
    log.record_times = [stamp for times in segments for stamp in times][-50:]
    log.skipped_lines = len(problems)
    if problems:
        (warn or (lambda message: print(message, file=sys.stderr)))(
            f"nanoseek: warning: {path}: skipped {len(problems)} malformed "
            f"line{'s' if len(problems) > 1 else ''} (first at {problems[0]})")
    return log


def read_config(path: Path) -> dict:
    """config.toml as a dict; {} when missing or unreadable (a report still draws without it)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}


def _parse(line: str) -> tuple[dict | None, str | None]:
    """(decoded record, None), (None, why the line is malformed), or (None, None) for a blank line."""
    if not line.strip():
        return None, None
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
    for key, value in record.items():
        if isinstance(value, str) and value in _NONFINITE and key not in TEXT_FIELDS:
            value = float(value)
        if _PLOTTED.match(key):
            if isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # json writes 2.0 as 2.0 but a hand-made line may say 2
            if not (value is None or isinstance(value, float)):
                return None, f"{key!r} is not a number"
        record[key] = value
    if not line.endswith("\n"):
        return None, "unterminated last line (a crash or a write in progress)"
    return record, None
