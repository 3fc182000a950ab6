"""report.html: one self-contained page (the PNG inlined as base64, inline CSS, no scripts or links),
so it can be mailed, attached to an issue or opened from a copied run directory."""

import base64
import html
import math
import time

from nanoseek.report.records import RunLog, event_action
from nanoseek.report.runs import run_status
from nanoseek.report.summary import summary_rows

# config.toml fields worth a glance, as section.key (top-level keys have no section).
CONFIG_FIELDS = ("preset model.attention model.dim model.n_layers model.n_heads model.n_routed_experts "
                 "model.n_activated_experts model.mtp_depth model.vocab_size data.source data.tokenizer data.seq_len "
                 "train.max_steps train.batch_size train.grad_accum train.optimizer train.lr train.schedule "
                 "train.warmup_steps train.grad_clip train.precision device seed guard.inject").split()

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:0 0 1.2em 0;font-size:0.9em}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}h2{margin-top:1.4em}img{max-width:100%}
.skip{color:#c66a00}.rollback{color:#c00}.abort{color:#000;font-weight:bold}.overflow{color:#777}"""


def render_html(logs: list[RunLog], labels: list[str], png: bytes, now: float | None = None) -> str:
    """The page for `logs` (labelled `labels`, as in the figure) around the report PNG."""
    now = time.time() if now is None else now
    title = "nanoseek run report: " + " vs ".join(labels)
    image = base64.b64encode(png).decode("ascii")
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{_e(title)}</h1>",
             f"<p>written {_e(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now)))}</p>",
             f"<img alt='{_e(title)}' src='data:image/png;base64,{image}'>"]
    for log, label in zip(logs, labels):
        config = [(name, _setting(log, name)) for name in CONFIG_FIELDS]
        parts += [f"<h2>{_e(label)}</h2><p>{_e(str(log.run_dir))}</p>", _table("summary", _summary_rows(log, now)),
                  _table("config", [(name, value) for name, value in config if value != ""]), _events_table(log)]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _summary_rows(log: RunLog, now: float) -> list[tuple[str, str]]:
    rows = [("status", run_status(log, now)), *summary_rows(log, world_size=None)]
    if log.evals:
        rows.append(("last val", f"{_fmt(log.evals[-1].get('val_loss'))} at step {log.evals[-1]['step']}"))
    if log.resumed_at:
        rows.append(("resumed at steps", ", ".join(map(str, log.resumed_at))))
    if log.skipped_lines:
        rows.append(("malformed metrics lines skipped", str(log.skipped_lines)))
    return rows


def _events_table(log: RunLog) -> str:
    if not log.events:
        return "<p>no guard events</p>"
    head = "<tr><th>step</th><th>action</th><th>cause</th><th>module</th><th>value</th><th>detail</th></tr>"
    rows = []
    for event in log.events:
        action = event_action(event)
        cells = (event["step"], action, event.get("cause") or "", event.get("module") or "", _fmt(event.get("value")),
                 event.get("detail") or "")
        rows.append(f"<tr class='{_e(action)}'>" + "".join(f"<td>{_e(cell)}</td>" for cell in cells) + "</tr>")
    return f"<table><caption>guard events</caption>{head}{''.join(rows)}</table>"


def _table(caption: str, rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table><caption>{_e(caption)}</caption>{body}</table>"


def _setting(log: RunLog, name: str) -> str:
    value = log.setting(name)
    return ", ".join(map(str, value)) if isinstance(value, list) else "" if value in (None, "") else str(value)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) and abs(value) >= 1e-3 else f"{value:.4g}"
    return str(value)


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)
