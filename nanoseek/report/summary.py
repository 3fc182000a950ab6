"""What a run did, where its results are, what went wrong: the rows of the lines `nanoseek train` ends with and
of report.html's summary table. They come from the run directory, so they can be rebuilt for any run later; a
TrainResult only adds what the log cannot know yet (the applied-update count of a run that just ended)."""

import math
from collections import Counter
from pathlib import Path

from nanoseek.report.records import RunLog, event_action
from nanoseek.report.runs import run_status
from nanoseek.train.checkpoint import best_checkpoint, checkpoint_val_loss, list_checkpoints

MAX_EVENT_LINES = 5  # the rest are one `nanoseek report` (or metrics.jsonl) away


def format_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def summary_rows(log: RunLog, result=None, world_size: int | None = 1) -> list[tuple[str, str]]:
    """(name, text) rows of `log`'s run. result: the TrainResult of the run that just ended, or None.
    world_size: the processes that trained it, over which tokens count; None where it is unknown (config.toml
    does not record it), which counts them per process."""
    steps = max(log.last_step + 1 if log.last_step is not None else 0, result.step if result is not None else 0)
    updates = result.opt_step if result is not None else (log.train[-1].get("opt_step") if log.train else None)
    rows = [("steps", f"{steps}" + (f" ({updates} optimizer updates kept)" if updates is not None else ""))]

    sizes = [log.setting("train.batch_size"), log.setting("train.grad_accum", 1), log.setting("data.seq_len")]
    per_step = math.prod(sizes) * (world_size or 1) if all(isinstance(size, int) for size in sizes) else None
    rate = f", {len(log.train) * per_step / log.elapsed_s:,.0f} tokens/s" if per_step and log.elapsed_s > 0 else ""
    tokens = f"{len(log.train) * per_step:,} ({per_step:,} per step) in " if per_step else ""
    name = ("tokens" if world_size else "tokens (per process)") if per_step else "time"
    rows.append((name, f"{tokens}{format_duration(log.elapsed_s)}{rate}"))

    last = log.train[-1] if log.train else {}
    if isinstance(ce := last.get("ce", last.get("loss")), float):
        rows.append(("train ce", f"{ce:.4f} at step {last['step']}"))
    best = log.best_val()
    rows.append(("best val", f"{best[0]:.4f} at step {best[1]} ({len(log.evals)} evals)" if best
                 else "no evaluation yet (every train.eval_every steps)"))
    rows.append(("checkpoints", _checkpoints(log.run_dir)))
    counts = ", ".join(f"{n} {action}" for action, n in Counter(map(event_action, log.events)).items())
    rows.append(("guard", f"{len(log.events)} event{'s' if len(log.events) > 1 else ''}: {counts}" if counts
                 else "no events"))
    return rows


def summary_text(log: RunLog, result=None, report: str | None = None, world_size: int = 1) -> str:
    """The end-of-run summary: `summary_rows`, the first guard events, and `report` (the report line's text)."""
    status = result.status if result is not None else run_status(log)
    lines = [f"run summary: {log.run_dir} ({status})"]
    lines += [_row(name, text) for name, text in summary_rows(log, result, world_size)]
    for event in log.events[:MAX_EVENT_LINES]:
        where = f" in {event['module']}" if event.get("module") else ""
        lines.append(_row("", f"step {event['step']} {event_action(event)}: {event.get('cause', '')}{where}"))
    if len(log.events) > MAX_EVENT_LINES:
        lines.append(_row("", f"... {len(log.events) - MAX_EVENT_LINES} more in {log.run_dir / 'metrics.jsonl'}"))
    if report is not None:
        lines.append(_row("report", report))
    return "\n".join(lines)


def _checkpoints(run_dir: Path) -> str:
    found = list_checkpoints(run_dir)
    if not found:
        return f"none in {run_dir / 'checkpoints'}"
    best = best_checkpoint(run_dir)
    described = []
    for path in found:
        val = checkpoint_val_loss(path)
        tags = [f"val {val:.4f}"] if val is not None else []
        tags += [tag for tag, tagged in (("latest", found[-1]), ("best", best)) if path == tagged]
        described.append(path.name + (f" ({', '.join(tags)})" if tags else ""))
    return f"{len(found)} kept in {run_dir / 'checkpoints'}: " + ", ".join(described)


def _row(name: str, text: str) -> str:
    return f"  {name:<12} {text}"
