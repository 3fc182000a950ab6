"""The report figure: one page of panels over training steps, for one run or several overlaid.

Panels (all share the step axis): loss (train ce, MTP mtp_k, total; validation) with the guard's
events marked where they happened and labelled with their causes; auxiliary losses (aux, z, logit_z);
learning rate; grad norm (before clipping) against the clipping threshold; tokens/s and MFU; the
expert-load imbalance (max / mean load per MoE layer, sampled every `guard.stats_every` steps) as a
layer x step heatmap; the max attention logit per layer.

matplotlib is an optional extra. The figure is drawn on an Agg canvas of its own (no pyplot), so
nothing here opens a window, needs a display, or changes the backend of a program that imports it.
`build_figure` returns what it plotted next to the artists, so a test can check the picture's data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoseek.report.records import RunLog, layer_fields, loss_components

__all__ = ["ReportFigure", "build_figure", "MissingMatplotlib", "require_matplotlib", "run_labels"]

# Guard actions, how they are drawn; an action not listed (from a newer guard) gets the last style.
ACTION_STYLE = {"skip": ("x", "tab:orange"), "rollback": ("v", "tab:red"), "abort": ("X", "black"),
                "overflow": (".", "tab:gray"), "other": ("d", "tab:purple")}
MAX_CAUSE_LABELS = 12  # beyond this the labels would pile up; the HTML table lists every event
CAUSE_CHARS = 90  # an abort's cause (skips, then 'rollbacks exhausted (n/m)') fits whole
# The loss panel's size in points (12 x 14 inch figure, top row 1.5 of 4.5 grid units, less titles and
# ticks) and a 7-point label's sizes: enough to pack the event labels without drawing twice.
AXES_WIDTH_PT, LOSS_AXES_HEIGHT_PT = 790.0, 290.0
CHAR_WIDTH_PT, ROW_HEIGHT_PT = 3.5, 10.0
PANELS = ("loss", "aux", "lr", "grad_norm", "throughput", "expert_load", "attn_logit")


class MissingMatplotlib(ValueError):
    """matplotlib (the `plot` extra) is not installed."""


def require_matplotlib():
    """(Figure, FigureCanvasAgg), or MissingMatplotlib with the install command."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingMatplotlib("run reports need matplotlib: pip install 'nanoseek[plot]'") from None
    return Figure, FigureCanvasAgg


@dataclass
class ReportFigure:
    """The drawn figure and, per panel, exactly the data that was plotted."""

    figure: Any  # matplotlib.figure.Figure
    axes: dict[str, Any]  # panel name -> Axes
    lines: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)  # panel -> label -> (x, y)
    markers: dict[str, Any] = field(default_factory=dict)  # "RUN: action" -> the scatter of those events
    events: list[dict] = field(default_factory=list)  # run, step, action, cause, y of every marked event
    heatmap: dict[str, Any] = field(default_factory=dict)  # rows (layer labels); steps, values: one array per row

    def png(self, dpi: int = 80) -> bytes:
        """The figure as PNG bytes, reduced to a 256-colour palette: lines and flat fills need no more,
        and the file (embedded again, as base64, in report.html) comes out about three times smaller."""
        import io

        from PIL import Image  # a dependency of matplotlib itself

        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=dpi)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        buffer = io.BytesIO()
        image.quantize(colors=256, method=0).save(buffer, format="png", optimize=True)  # 0: median cut, any Pillow
        return buffer.getvalue()


def run_labels(logs: list[RunLog]) -> list[str]:
    """A short label per run: its directory name, or the whole path where two names collide."""
    names = [log.name for log in logs]
    return [name if names.count(name) == 1 else str(log.run_dir) for name, log in zip(names, logs)]


def build_figure(logs: list[RunLog]) -> ReportFigure:
    """Draw every panel for `logs` (one run, or several overlaid in the order given)."""
    if not logs:
        raise ValueError("no runs to draw; pass at least one RUN_DIR")
    Figure, FigureCanvasAgg = require_matplotlib()
    figure = Figure(figsize=(12, 14), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(4, 2, height_ratios=[1.5, 1, 1, 1])
    loss_ax = figure.add_subplot(grid[0, :])
    axes = {"loss": loss_ax}
    for name, cell in zip(PANELS[1:], [grid[1, 0], grid[1, 1], grid[2, 0], grid[2, 1], grid[3, 0], grid[3, 1]]):
        axes[name] = figure.add_subplot(cell, sharex=loss_ax)
    report = ReportFigure(figure, axes, lines={name: {} for name in PANELS})
    labels = run_labels(logs)
    colors = [f"C{i % 10}" for i in range(len(logs))]
    overlay = len(logs) > 1

    _loss_panel(report, logs, labels, colors, overlay)
    _aux_panel(report, logs, labels, colors, overlay)
    _lr_panel(report, logs, labels, colors)
    _grad_norm_panel(report, logs, labels, colors)
    _throughput_panel(report, logs, labels, colors)
    _expert_load_panel(report, logs, labels)
    _attn_logit_panel(report, logs, labels, colors, overlay)
    for name in ("expert_load", "attn_logit"):
        axes[name].set_xlabel("step")
    figure.suptitle("nanoseek run report: " + " vs ".join(labels), fontsize=13)
    return report


# ---- panels ----------------------------------------------------------------------------------------


def _plot(report: ReportFigure, panel: str, label: str, x: np.ndarray, y: np.ndarray, ax=None, **style):
    if len(x) == 0:
        return None
    report.lines[panel][label] = (x, y)
    return (ax or report.axes[panel]).plot(x, y, label=label, **style)[0]


def _loss_panel(report: ReportFigure, logs, labels, colors, overlay: bool) -> None:
    ax = report.axes["loss"]
    for log, label, color in zip(logs, labels, colors):
        main, _ = loss_components(log)
        prefix = f"{label} " if overlay else ""
        # Overlaid runs show ce and validation only: with every component of every run the lines blur.
        shown = ["ce"] if overlay else main + ["loss"]
        for index, name in enumerate(shown):
            steps, values = log.series(name)
            style = {"color": color} if overlay else {"color": f"C{index}"}
            if name == "loss":
                style = {"color": "0.55", "linestyle": ":"}
            label_text = prefix + ("train loss (total)" if name == "loss" else f"train {name}")
            _plot(report, "loss", label_text, steps, values, linewidth=1.0, alpha=0.9, **style)
        for index, name in enumerate(["val_loss"] + ([] if overlay else [f"val_{m}" for m in main if m != "ce"])):
            steps, values = log.series(name, "eval")
            style = {"color": color} if overlay else {"color": f"C{main.index(name[4:]) if name != 'val_loss' else 0}"}
            # val_loss is the ce when there is one; a distillation run (npt, heal) logs its total there.
            val_label = "val loss (ce)" if "ce" in main else "val loss"
            _plot(report, "loss", prefix + (val_label if name == "val_loss" else name.replace("_", " ", 1)),
                  steps, values, marker="o", markersize=4, linestyle="--", linewidth=1.2, **style)
        _mark_events(report, ax, log, label, overlay, color)
    _label_events(report, ax, overlay)
    if not report.lines["loss"]:
        _empty(ax, "no training records yet")
    ax.set_ylabel("loss (nats)")
    labelled = min(len(report.events), MAX_CAUSE_LABELS)
    ax.set_title("loss and guard events" + (f" (first {labelled} of {len(report.events)} labelled; all in report.html)"
                                            if labelled < len(report.events) else ""))
    if report.lines["loss"] or report.markers:
        ax.legend(fontsize=8, ncols=2, loc="best")


def _mark_events(report: ReportFigure, ax, log: RunLog, label: str, overlay: bool, run_color: str) -> None:
    """Put each guard event on the loss curve at its step (labelled later by `_label_events`). The
    marker's shape is the action; its colour too for one run, the run's colour when runs are overlaid."""
    steps, values = log.series("ce") if "ce" in loss_components(log)[0] else log.series("loss")
    by_action: dict[str, list[dict]] = {}
    for event in log.events:
        action = event.get("action") or event["event"]
        marked = {"run": label, "step": event["step"], "action": action, "cause": event.get("cause") or "",
                  "y": _value_near(steps, values, event["step"])}
        report.events.append(marked)
        by_action.setdefault(action, []).append(marked)
    for action, marked in by_action.items():
        marker, color = ACTION_STYLE.get(action, ACTION_STYLE["other"])
        color = run_color if overlay else color
        report.markers[f"{label}: {action}"] = ax.scatter(
            [m["step"] for m in marked], [m["y"] for m in marked], marker=marker, color=color, s=70, zorder=5,
            linewidths=2, label=(f"{label} " if overlay else "") + f"{action} ({len(marked)})")


def _label_events(report: ReportFigure, ax, overlay: bool) -> None:
    """Write each event's cause in a band above the curves, pinned to its marker by a thin line.

    Labels are packed into rows greedily (a label takes the first row where it overlaps no other), so
    events a step apart (a NaN, then its neighbour; skips escalating to a rollback) never print over
    each other; the y-axis grows to make room for the band. Sizes are estimated in points from the
    figure size, which is fixed, so no extra draw is needed.
    """
    marked = sorted(report.events, key=lambda m: m["step"])[:MAX_CAUSE_LABELS]
    if not marked:
        return
    x0, x1 = ax.get_xlim()
    points_per_step = AXES_WIDTH_PT / max(x1 - x0, 1e-9)
    rows: list[list[tuple[float, float]]] = []
    placed = []
    for event in marked:
        cause = event["cause"] if len(event["cause"]) <= CAUSE_CHARS else event["cause"][:CAUSE_CHARS - 1] + "…"
        text = (f"{event['run']} " if overlay else "") + f"step {event['step']} {event['action']}: {cause}"
        width = (len(text) * CHAR_WIDTH_PT + 6) / points_per_step
        # Labels in the right half grow leftwards, so they stay inside the panel.
        grows_left = event["step"] > (x0 + x1) / 2
        extent = (event["step"] - width, event["step"]) if grows_left else (event["step"], event["step"] + width)
        row = next((i for i, used in enumerate(rows) if all(extent[1] < a or extent[0] > b for a, b in used)), None)
        if row is None:
            rows.append([])
            row = len(rows) - 1
        rows[row].append(extent)
        placed.append((event, text, row, grows_left))
    band = (len(rows) * ROW_HEIGHT_PT + 8) / LOSS_AXES_HEIGHT_PT  # as a fraction of the panel
    y0, y1 = ax.get_ylim()
    ax.set_ylim(y0, y0 + (y1 - y0) / (1 - band))
    for event, text, row, grows_left in placed:
        top = 1 - (6 + ROW_HEIGHT_PT * (row + 0.8)) / LOSS_AXES_HEIGHT_PT
        ax.annotate(text, (event["step"], event["y"]), xytext=(event["step"], top), textcoords=("data", "axes fraction"),
                    fontsize=7, ha="right" if grows_left else "left", va="bottom",
                    color=ACTION_STYLE.get(event["action"], ACTION_STYLE["other"])[1],
                    arrowprops={"arrowstyle": "-", "color": "0.65", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 4,
                                "relpos": (1.0, 0.0) if grows_left else (0.0, 0.0)})  # a pin from the label's end


def _aux_panel(report: ReportFigure, logs, labels, colors, overlay: bool) -> None:
    ax = report.axes["aux"]
    for log, label, color in zip(logs, labels, colors):
        _, aux = loss_components(log)
        for index, name in enumerate(aux):
            steps, values = log.series(name)
            style = {"color": color, "linestyle": ["-", "--", ":"][index % 3]} if overlay else {"color": f"C{index + 3}"}
            _plot(report, "aux", (f"{label} " if overlay else "") + name, steps, values, linewidth=1.0, **style)
    ax.set_title("auxiliary losses (weighted)")
    if report.lines["aux"]:
        _log_scale_if_positive(ax, report.lines["aux"])
        ax.legend(fontsize=8)
        return
    # No aux / z loss to show (their coefficients default to 0): the panel shows the router's largest
    # logit per MoE layer instead, the statistic a z-loss would hold down.
    report.lines["router"] = {}
    for log, label, color in zip(logs, labels, colors):
        for index, layer in enumerate(layer_fields(log, "router_logit_max")):
            steps, values = log.series(f"router_logit_max/{layer}")
            style = {"color": color, "linestyle": ["-", "--", ":", "-."][index % 4]} if overlay else {"color": f"C{index}"}
            _plot(report, "router", (f"{label} " if overlay else "") + layer, steps, values, ax=ax, marker=".",
                  linewidth=1.0, **style)
    if report.lines["router"]:
        ax.set_title("max router logit per MoE layer (no aux / z losses in this run)")
        ax.legend(fontsize=7, ncols=2)
    else:
        _empty(ax, "no aux / z losses in this run\n(model.aux_loss_coef, router_z_loss_coef, logit_z_loss_coef are 0)")


def _lr_panel(report: ReportFigure, logs, labels, colors) -> None:
    ax = report.axes["lr"]
    for log, label, color in zip(logs, labels, colors):
        steps, values = log.series("lr")
        _plot(report, "lr", label, steps, values, color=color, linewidth=1.2)
    ax.set_title("learning rate")
    # A schedule spans ~10-30x (warmup start to min_lr); more than 100x is a spike, which log y keeps readable.
    _log_scale_if_positive(ax, report.lines["lr"], span=100.0)
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if not report.lines["lr"]:
        _empty(ax, "no learning-rate records")
    elif len(logs) > 1:
        ax.legend(fontsize=8)


def _grad_norm_panel(report: ReportFigure, logs, labels, colors) -> None:
    ax = report.axes["grad_norm"]
    thresholds: dict[float, list[str]] = {}
    for log, label, color in zip(logs, labels, colors):
        steps, values = log.series("grad_norm")
        _plot(report, "grad_norm", label if len(logs) > 1 else "grad norm (before clipping)", steps, values,
              color=color, linewidth=1.0)
        clip = log.setting("train", "grad_clip")
        if isinstance(clip, (int, float)) and clip > 0:
            thresholds.setdefault(float(clip), []).append(label)
    for clip, runs in thresholds.items():
        which = "" if len(logs) == 1 or len(runs) == len(logs) else f" ({', '.join(runs)})"
        line = ax.axhline(clip, color="tab:red", linestyle="--", linewidth=1.0, label=f"clip threshold {clip:g}{which}")
        report.lines["grad_norm"][line.get_label()] = (np.array([]), np.array([clip]))
    ax.set_title("grad norm" + ("" if thresholds else " (no clipping: train.grad_clip = 0 or unknown)"))
    if any(len(x) for x, _ in report.lines["grad_norm"].values()):
        _log_scale_if_positive(ax, report.lines["grad_norm"])
        ax.legend(fontsize=8)
    else:
        _empty(ax, "no grad-norm records")


def _throughput_panel(report: ReportFigure, logs, labels, colors) -> None:
    ax = report.axes["throughput"]
    mfu_ax = None
    any_mfu = False
    for log, label, color in zip(logs, labels, colors):
        steps, values = log.series("tokens_per_sec")
        _plot(report, "throughput", f"{label} tokens/s" if len(logs) > 1 else "tokens/s", steps, values,
              color=color, marker=".", linewidth=1.0)
        mfu_steps, mfu = log.series("mfu")
        keep = np.isfinite(mfu)
        if keep.any():
            any_mfu = True
            mfu_ax = mfu_ax or ax.twinx()
            _plot(report, "throughput", f"{label} MFU %" if len(logs) > 1 else "MFU %", mfu_steps[keep],
                  100 * mfu[keep], ax=mfu_ax, color=color if len(logs) > 1 else "tab:orange", linestyle="--",
                  linewidth=1.0)
    ax.set_ylabel("tokens/s")
    ax.set_title("throughput" + ("" if any_mfu else " (MFU n/a: no known GPU peak, e.g. on CPU)"))
    if mfu_ax is not None:
        mfu_ax.set_ylabel("MFU (%)")
        handles = ax.get_legend_handles_labels()[0] + mfu_ax.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
    elif len(logs) > 1 and report.lines["throughput"]:
        ax.legend(fontsize=8)
    if not report.lines["throughput"]:
        _empty(ax, "no throughput records (logged every train.log_every steps)")


def _expert_load_panel(report: ReportFigure, logs, labels) -> None:
    """Rows: MoE layers (run: layer when overlaid); columns: the steps where load was sampled."""
    ax = report.axes["expert_load"]
    rows, series = [], []
    for log, label in zip(logs, labels):
        for layer in layer_fields(log, "expert_load_imbalance"):
            rows.append(layer if len(logs) == 1 else f"{label}: {layer}")
            series.append(log.series(f"expert_load_imbalance/{layer}"))
    ax.set_title("expert load imbalance (max / mean load; 1 = balanced)")
    if not rows:
        _empty(ax, "no MoE layers (or no stats yet; sampled every guard.stats_every steps)")
        return
    report.heatmap = {"rows": rows, "steps": [s for s, _ in series], "values": [v for _, v in series]}
    # One strip per row on its own sample steps: overlaid runs may sample at different stats_every.
    top = max(1.0 + 1e-6, max(float(np.nanmax(v)) if np.isfinite(v).any() else 1.0 for _, v in series))
    for row, (steps, values) in enumerate(series):
        mesh = ax.pcolormesh(_cell_edges(steps), [row, row + 1], np.ma.masked_invalid(values[None, :]),
                             cmap="viridis", vmin=1.0, vmax=top, shading="flat")
    ax.set_ylim(0, len(rows))
    ax.set_yticks(np.arange(len(rows)) + 0.5, rows, fontsize=7)
    ax.invert_yaxis()  # first layer on top, as in the model
    report.figure.colorbar(mesh, ax=ax, pad=0.01, label="max / mean")


def _attn_logit_panel(report: ReportFigure, logs, labels, colors, overlay: bool) -> None:
    ax = report.axes["attn_logit"]
    thresholds = set()
    for log, label, color in zip(logs, labels, colors):
        layers = layer_fields(log, "attn_logit_max")
        if overlay and layers:  # one line per run: the max over its layers
            steps = np.unique(np.concatenate([log.series(f"attn_logit_max/{n}")[0] for n in layers]))
            peak = np.full(len(steps), -math.inf)
            for name in layers:
                s, v = log.series(f"attn_logit_max/{name}")
                peak[np.searchsorted(steps, s)] = np.fmax(peak[np.searchsorted(steps, s)], v)
            _plot(report, "attn_logit", f"{label} (max over layers)", steps, peak, color=color, linewidth=1.0)
        else:
            for index, name in enumerate(layers):
                s, v = log.series(f"attn_logit_max/{name}")
                _plot(report, "attn_logit", name, s, v, color=f"C{index}", marker=".", linewidth=1.0)
        threshold = log.setting("model", "qk_clip_threshold", 0.0)
        if isinstance(threshold, (int, float)) and threshold > 0:
            thresholds.add(float(threshold))
    for threshold in sorted(thresholds):
        ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1.0, label=f"QK-clip threshold {threshold:g}")
    ax.set_title("max attention logit per layer")
    if report.lines["attn_logit"]:
        ax.legend(fontsize=7, ncols=2)
    else:
        _empty(ax, "no attention-logit stats (sampled every guard.stats_every steps)")


# ---- helpers ---------------------------------------------------------------------------------------


def _value_near(steps: np.ndarray, values: np.ndarray, step: int) -> float:
    """The curve's value at `step`, else the last finite one before it (a faulted step's own loss is
    NaN), else the first finite one; 0.0 for an empty curve."""
    finite = np.isfinite(values)
    if not finite.any():
        return 0.0
    before = np.flatnonzero(finite & (steps <= step))
    return float(values[before[-1] if len(before) else np.flatnonzero(finite)[0]])


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    """Cell boundaries halfway between sample steps, so each cell is centred on its step."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mids = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mids[0] - steps[0])], mids, [steps[-1] + (steps[-1] - mids[-1])]])


def _log_scale_if_positive(ax, lines: dict[str, tuple[np.ndarray, np.ndarray]], span: float = 10.0) -> None:
    """Log y when every finite value is positive and they span more than `span` x (spikes, tiny aux
    losses), so one outlier does not flatten the rest of the curve."""
    values = np.concatenate([y[np.isfinite(y)] for _, y in lines.values()] or [np.array([])])
    if len(values) and values.min() > 0 and values.max() / values.min() > span:
        from matplotlib.ticker import FuncFormatter, LogFormatter

        ax.set_yscale("log")
        # Plain numbers ("0.5", "2", "1e-04"), not 2 x 10^0, for the labelled major and minor ticks.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.4")
