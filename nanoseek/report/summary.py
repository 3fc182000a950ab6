"""The few lines `nanoseek train` ends with: what the run did, where its results are, what went wrong.

Everything comes from the run directory, so the same text can be rebuilt for any run later; a TrainResult,
when given, only fills in what the log cannot know yet (the applied-update count of a run that just ended).
"""

import math
import time
from pathlib import Path

from nanoseek.report.records import RunLog, event_action
from nanoseek.report.runs import run_status
from nanoseek.train.checkpoint import best_checkpoint, checkpoint_val_loss, latest_checkpoint, list_checkpoints

MAX_EVENT_LINES = 5  # the rest are one `nanoseek report` (or metrics.jsonl) away


def tokens_per_step(log: RunLog, world_size: int = 1) -> int | None:
    """batch_size x grad_accum x seq_len (x world_size: processes under torchrun) from config.toml;
    None when the config is missing. config.toml does not record the process count, so the caller says."""
    values = [log.setting("train", "batch_size"), log.setting("train", "grad_accum", 1), log.setting("data", "seq_len")]
    return math.prod(values) * world_size if all(isinstance(v, int) for v in values) else None


def format_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def summary_text(log: RunLog, result=None, report: str | None = None, now: float | None = None,
                 world_size: int = 1) -> str:
    """The end-of-run summary of `log`'s run. result: the TrainResult of the run that just ended (status and
    update count), or None. report: the text of the report line, or None. world_size: the processes that
    trained it (tokens count over all of them)."""
    status = result.status if result is not None else run_status(log, time.time() if now is None else now)
    lines = [f"run summary: {log.run_dir} ({status})"]

    steps = max(log.last_step + 1 if log.last_step is not None else 0, result.step if result is not None else 0)
    updates = result.opt_step if result is not None else (log.train[-1].get("opt_step") if log.train else None)
    lines.append(_row("steps", f"{steps}" + (f" ({updates} optimizer updates kept)" if updates is not None else "")))

    per_step = tokens_per_step(log, world_size)
    rate = f", {len(log.train) * per_step / log.elapsed_s:,.0f} tokens/s" if per_step and log.elapsed_s > 0 else ""
    tokens = f"{len(log.train) * per_step:,} ({per_step:,} per step) in " if per_step else ""
    lines.append(_row("tokens" if per_step else "time", f"{tokens}{format_duration(log.elapsed_s)}{rate}"))

    last = log.train[-1] if log.train else {}
    if isinstance(ce := last.get("ce", last.get("loss")), float):
        lines.append(_row("train ce", f"{ce:.4f} at step {last['step']}"))
    best = log.best_val()
    lines.append(_row("best val", f"{best[0]:.4f} at step {best[1]} ({len(log.evals)} evals)" if best
                      else "no evaluation yet (every train.eval_every steps)"))
    lines.append(_row("checkpoints", _checkpoints(log.run_dir)))

    counts = log.event_counts()
    total = sum(counts.values())
    lines.append(_row("guard", f"{total} event{'s' if total > 1 else ''}: "
                      + ", ".join(f"{n} {action}" for action, n in counts.items()) if counts else "no events"))
    for event in log.events[:MAX_EVENT_LINES]:
        where = f" in {event['module']}" if event.get("module") else ""
        lines.append(_row("", f"step {event['step']} {event_action(event)}: {event.get('cause', '')}{where}"))
    if total > MAX_EVENT_LINES:
        lines.append(_row("", f"... {total - MAX_EVENT_LINES} more in {log.run_dir / 'metrics.jsonl'}"))
    if report is not None:
        lines.append(_row("report", report))
    return "\n".join(lines)


def _checkpoints(run_dir: Path) -> str:
    found = list_checkpoints(run_dir)
    if not found:
        return f"none in {run_dir / 'checkpoints'}"
    best, latest = best_checkpoint(run_dir), latest_checkpoint(run_dir)
    described = []
    for path in found:
        val = checkpoint_val_loss(path)
        tags = [f"val {val:.4f}"] if val is not None else []
        tags += [tag for tag, tagged in (("latest", latest), ("best", best)) if path == tagged]
        described.append(path.name + (f" ({', '.join(tags)})" if tags else ""))
    return f"{len(found)} kept in {run_dir / 'checkpoints'}: " + ", ".join(described)


def _row(name: str, text: str) -> str:
    return f"  {name:<12} {text}"
