"""The report figure: one page of panels over training steps, for one run or several overlaid. Drawn on an Agg
canvas of its own (matplotlib is an optional extra; no pyplot), so nothing here opens a window, needs a display,
or changes the backend of a program that imports it."""

import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoseek.report.records import RunLog, event_action, layer_fields, loss_components

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
LINESTYLES = ("-", "--", ":", "-.")  # tell apart one run's lines when runs are overlaid (colour is the run)


class MissingMatplotlib(ValueError):
    """matplotlib (the `plot` extra) is not installed."""


@dataclass
class ReportFigure:
    """The drawn figure and, per panel, exactly the data that was plotted, so a test can check what it shows."""

    figure: Any  # matplotlib.figure.Figure
    axes: dict[str, Any]  # panel name -> Axes
    lines: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)  # panel -> label -> (x, y)
    markers: dict[str, Any] = field(default_factory=dict)  # "RUN: action" -> the scatter of those events
    events: list[dict] = field(default_factory=list)  # run, step, action, cause, y of every marked event
    heatmap: dict[str, Any] = field(default_factory=dict)  # rows (layer labels); steps, values: one array per row

    def png(self, dpi: int = 80) -> bytes:
        """The figure as PNG bytes, reduced to a 256-colour palette: lines and flat fills need no more,
        and the file (embedded again, as base64, in report.html) comes out about three times smaller."""
        from PIL import Image  # a dependency of matplotlib itself
        drawn, palette = io.BytesIO(), io.BytesIO()
        self.figure.savefig(drawn, format="png", dpi=dpi)
        image = Image.open(drawn).convert("RGB").quantize(colors=256, method=0)  # 0: median cut, in any Pillow
        image.save(palette, format="png", optimize=True)
        return palette.getvalue()


def run_labels(logs: list[RunLog]) -> list[str]:
    """A short label per run: its directory name, or the whole path where two names collide."""
    names = [log.run_dir.name or str(log.run_dir) for log in logs]
    return [name if names.count(name) == 1 else str(log.run_dir) for name, log in zip(names, logs)]


def build_figure(logs: list[RunLog]) -> ReportFigure:
    """Draw every panel for `logs` (one run, or several overlaid in the order given)."""
    if not logs:
        raise ValueError("no runs to draw; pass at least one RUN_DIR")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingMatplotlib("run reports need matplotlib: pip install 'nanoseek[plot]'") from None
    figure = Figure(figsize=(12, 14), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(4, 2, height_ratios=[1.5, 1, 1, 1])
    axes = {"loss": figure.add_subplot(grid[0, :])}
    for index, name in enumerate(PANELS[1:]):
        axes[name] = figure.add_subplot(grid[1 + index // 2, index % 2], sharex=axes["loss"])
    report = ReportFigure(figure, axes, lines={name: {} for name in PANELS})
    labels = run_labels(logs)
    runs = [(log, label, f"C{i % 10}") for i, (log, label) in enumerate(zip(logs, labels))]
    for name, draw in zip(PANELS, (_loss_panel, _aux_panel, _lr_panel, _grad_norm_panel, _throughput_panel,
                                   _expert_load_panel, _attn_logit_panel)):
        draw(report, axes[name], runs, len(logs) > 1)
    for name in ("expert_load", "attn_logit"):
        axes[name].set_xlabel("step")
    figure.suptitle("nanoseek run report: " + " vs ".join(labels), fontsize=13)
    return report


# ---- panels: each takes the report, its axes, [(log, label, colour)] and whether runs are overlaid -------


def _plot(report: ReportFigure, panel: str, label: str, x: np.ndarray, y: np.ndarray, ax=None, **style) -> None:
    if len(x):
        report.lines[panel][label] = (x, y)
        (ax or report.axes[panel]).plot(x, y, label=label, **style)


def _finish(ax, lines: dict, title: str, empty: str, log_span: float = 0.0, legend: bool = True, **style) -> None:
    """Title a panel, then give it a legend, or say `empty` when nothing was plotted. Log y when every finite
    value is positive and they span more than `log_span` x (spikes, tiny aux losses), so one outlier does not
    flatten the rest of the curve."""
    ax.set_title(title)
    if not any(len(x) for x, _ in lines.values()):
        _empty(ax, empty)
        return
    values = np.concatenate([y[np.isfinite(y)] for _, y in lines.values()])
    if log_span and len(values) and values.min() > 0 and values.max() / values.min() > log_span:
        from matplotlib.ticker import FuncFormatter, LogFormatter
        ax.set_yscale("log")
        # Plain numbers ("0.5", "2", "1e-04"), not 2 x 10^0, for the labelled major and minor ticks.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    if legend:
        ax.legend(**{"fontsize": 8, **style})


def _loss_panel(report: ReportFigure, ax, runs: list, overlay: bool) -> None:
    for log, label, color in runs:
        main, _ = loss_components(log)
        prefix = f"{label} " if overlay else ""
        # Overlaid runs show ce and validation only: with every component of every run the lines blur.
        for index, name in enumerate(["ce"] if overlay else main):
            _plot(report, "loss", f"{prefix}train {name}", *log.series(name), color=color if overlay else f"C{index}",
                  linewidth=1.0, alpha=0.9)
        if not overlay:
            _plot(report, "loss", "train loss (total)", *log.series("loss"), color="0.55", linestyle=":",
                  linewidth=1.0, alpha=0.9)
        # val_loss is the ce when there is one; a distillation run (npt, heal) logs its total there.
        validation = [("val_loss", "val loss (ce)" if "ce" in main else "val loss", 0)]
        if not overlay:
            validation += [(f"val_{name}", f"val {name}", index) for index, name in enumerate(main) if name != "ce"]
        for name, text, index in validation:
            _plot(report, "loss", prefix + text, *log.series(name, "eval"), color=color if overlay else f"C{index}",
                  marker="o", markersize=4, linestyle="--", linewidth=1.2)
        _mark_events(report, ax, log, label, overlay, color)
    _label_events(report, ax, overlay)
    if not report.lines["loss"]:
        _empty(ax, "no training records yet")
    ax.set_ylabel("loss (nats)")
    labelled, total = min(len(report.events), MAX_CAUSE_LABELS), len(report.events)
    ax.set_title("loss and guard events"
                 + (f" (first {labelled} of {total} labelled; all in report.html)" if labelled < total else ""))
    if report.lines["loss"] or report.markers:
        ax.legend(fontsize=8, ncols=2, loc="best")


def _mark_events(report: ReportFigure, ax, log: RunLog, label: str, overlay: bool, run_color: str) -> None:
    """Put each guard event on the loss curve at its step (labelled later by `_label_events`). The
    marker's shape is the action; its colour too for one run, the run's colour when runs are overlaid."""
    steps, values = log.series("ce" if "ce" in loss_components(log)[0] else "loss")
    by_action: dict[str, list[dict]] = {}
    for event in log.events:
        action = event_action(event)
        marked = {"run": label, "step": event["step"], "action": action, "cause": event.get("cause") or "",
                  "y": _value_near(steps, values, event["step"])}
        report.events.append(marked)
        by_action.setdefault(action, []).append(marked)
    for action, marked in by_action.items():
        marker, color = ACTION_STYLE.get(action, ACTION_STYLE["other"])
        report.markers[f"{label}: {action}"] = ax.scatter(
            [m["step"] for m in marked], [m["y"] for m in marked], marker=marker, color=run_color if overlay else color,
            s=70, zorder=5, linewidths=2, label=(f"{label} " if overlay else "") + f"{action} ({len(marked)})")


def _label_events(report: ReportFigure, ax, overlay: bool) -> None:
    """Write each event's cause in a band above the curves, pinned to its marker by a thin line. Labels are
    packed greedily into rows (the first where they overlap no other), so events a step apart never print
    over each other; sizes are estimated in points from the fixed figure size, so no extra draw is needed."""
    marked = sorted(report.events, key=lambda m: m["step"])[:MAX_CAUSE_LABELS]
    if not marked:
        return
    x0, x1 = ax.get_xlim()
    points_per_step = AXES_WIDTH_PT / max(x1 - x0, 1e-9)
    rows: list[list[tuple[float, float]]] = []  # the step ranges each row's labels cover
    for event in marked:
        cause = event["cause"] if len(event["cause"]) <= CAUSE_CHARS else event["cause"][:CAUSE_CHARS - 1] + "…"
        text = (f"{event['run']} " if overlay else "") + f"step {event['step']} {event['action']}: {cause}"
        width = (len(text) * CHAR_WIDTH_PT + 6) / points_per_step
        # Labels in the right half grow leftwards, so they stay inside the panel.
        grows_left = event["step"] > (x0 + x1) / 2
        extent = (event["step"] - width, event["step"]) if grows_left else (event["step"], event["step"] + width)
        row = next((i for i, used in enumerate(rows) if all(extent[1] < a or extent[0] > b for a, b in used)),
                   len(rows))
        if row == len(rows):
            rows.append([])
        rows[row].append(extent)
        top = 1 - (6 + ROW_HEIGHT_PT * (row + 0.8)) / LOSS_AXES_HEIGHT_PT  # axes fraction
        ax.annotate(text, (event["step"], event["y"]), xytext=(event["step"], top),
                    textcoords=("data", "axes fraction"), fontsize=7, ha="right" if grows_left else "left",
                    va="bottom", color=ACTION_STYLE.get(event["action"], ACTION_STYLE["other"])[1],
                    arrowprops={"arrowstyle": "-", "color": "0.65", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 4,
                                "relpos": (1.0, 0.0) if grows_left else (0.0, 0.0)})  # a pin from the label's end
    # Grow the y-axis to make room for the band of labels (the marker ends of the pins are in data units).
    band = (len(rows) * ROW_HEIGHT_PT + 8) / LOSS_AXES_HEIGHT_PT
    y0, y1 = ax.get_ylim()
    ax.set_ylim(y0, y0 + (y1 - y0) / (1 - band))


def _aux_panel(report: ReportFigure, ax, runs: list, overlay: bool) -> None:
    for log, label, color in runs:
        for index, name in enumerate(loss_components(log)[1]):
            style = {"color": color, "linestyle": LINESTYLES[index % 3]} if overlay else {"color": f"C{index + 3}"}
            _plot(report, "aux", (f"{label} " if overlay else "") + name, *log.series(name), linewidth=1.0, **style)
    if report.lines["aux"]:
        _finish(ax, report.lines["aux"], "auxiliary losses (weighted)", "", log_span=10.0)
        return
    # No aux / z loss to show (their coefficients default to 0): the panel shows the router's largest
    # logit per MoE layer instead, the statistic a z-loss would hold down.
    router = report.lines["router"] = {}
    for log, label, color in runs:
        for index, layer in enumerate(layer_fields(log, "router_logit_max")):
            style = {"color": color, "linestyle": LINESTYLES[index % 4]} if overlay else {"color": f"C{index}"}
            _plot(report, "router", (f"{label} " if overlay else "") + layer, *log.series(f"router_logit_max/{layer}"),
                  ax=ax, marker=".", linewidth=1.0, **style)
    _finish(ax, router, "max router logit per MoE layer (no aux / z losses in this run)" if router
            else "auxiliary losses (weighted)",
            "no aux / z losses in this run\n(model.aux_loss_coef, router_z_loss_coef, logit_z_loss_coef are 0)",
            fontsize=7, ncols=2)


def _lr_panel(report: ReportFigure, ax, runs: list, overlay: bool) -> None:
    for log, label, color in runs:
        _plot(report, "lr", label, *log.series("lr"), color=color, linewidth=1.2)
    # A schedule spans ~10-30x (warmup start to min_lr); more than 100x is a spike, which log y keeps readable.
    _finish(ax, report.lines["lr"], "learning rate", "no learning-rate records", log_span=100.0, legend=overlay)
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def _grad_norm_panel(report: ReportFigure, ax, runs: list, overlay: bool) -> None:
    thresholds: dict[float, list[str]] = {}
    for log, label, color in runs:
        _plot(report, "grad_norm", label if overlay else "grad norm (before clipping)", *log.series("grad_norm"),
              color=color, linewidth=1.0)
        if clip := _threshold(log, "train.grad_clip"):
            thresholds.setdefault(clip, []).append(label)
    for clip, labels in thresholds.items():
        which = f" ({', '.join(labels)})" if len(labels) < len(runs) else ""
        line = ax.axhline(clip, color="tab:red", linestyle="--", linewidth=1.0, label=f"clip threshold {clip:g}{which}")
        report.lines["grad_norm"][line.get_label()] = (np.array([]), np.array([clip]))
    _finish(ax, report.lines["grad_norm"], "grad norm" + ("" if thresholds else " (no clipping: train.grad_clip = 0 "
            "or unknown)"), "no grad-norm records", log_span=10.0)


def _throughput_panel(report: ReportFigure, ax, runs: list, overlay: bool) -> None:
    mfu_ax = None
    for log, label, color in runs:
        prefix = f"{label} " if overlay else ""
        _plot(report, "throughput", f"{prefix}tokens/s", *log.series("tokens_per_sec"), color=color, marker=".",
              linewidth=1.0)
        steps, mfu = log.series("mfu")
        if (keep := np.isfinite(mfu)).any():
            mfu_ax = mfu_ax or ax.twinx()
            _plot(report, "throughput", f"{prefix}MFU %", steps[keep], 100 * mfu[keep], ax=mfu_ax,
                  color=color if overlay else "tab:orange", linestyle="--", linewidth=1.0)
    ax.set_ylabel("tokens/s")
    if mfu_ax is not None:
        mfu_ax.set_ylabel("MFU (%)")
        handles = ax.get_legend_handles_labels()[0] + mfu_ax.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
    _finish(ax, report.lines["throughput"],
            "throughput" + ("" if mfu_ax is not None else " (MFU n/a: no known GPU peak, e.g. on CPU)"),
            "no throughput records (logged every train.log_every steps)", legend=overlay and mfu_ax is None)


def _expert_load_panel(report: ReportFigure, ax, runs: list, overlay: bool) -> None:
    """Rows: MoE layers (run: layer when overlaid); columns: the steps where load was sampled."""
    rows, series = [], []
    for log, label, _ in runs:
        for layer in layer_fields(log, "expert_load_imbalance"):
            rows.append(f"{label}: {layer}" if overlay else layer)
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


def _attn_logit_panel(report: ReportFigure, ax, runs: list, overlay: bool) -> None:
    for log, label, color in runs:
        layers = layer_fields(log, "attn_logit_max")
        series = [log.series(f"attn_logit_max/{name}") for name in layers]
        if overlay and layers:  # one line per run: the max over its layers
            steps = np.unique(np.concatenate([s for s, _ in series]))
            peak = np.full(len(steps), -math.inf)
            for s, v in series:
                np.fmax.at(peak, np.searchsorted(steps, s), v)
            _plot(report, "attn_logit", f"{label} (max over layers)", steps, peak, color=color, linewidth=1.0)
        else:
            for index, (name, (s, v)) in enumerate(zip(layers, series)):
                _plot(report, "attn_logit", name, s, v, color=f"C{index}", marker=".", linewidth=1.0)
    for threshold in sorted({_threshold(log, "model.qk_clip_threshold") for log, _, _ in runs} - {None}):
        ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1.0, label=f"QK-clip threshold {threshold:g}")
    _finish(ax, report.lines["attn_logit"], "max attention logit per layer",
            "no attention-logit stats (sampled every guard.stats_every steps)", fontsize=7, ncols=2)


def _threshold(log: RunLog, name: str) -> float | None:
    """A positive number from config.toml (a clip threshold), else None (off, or unknown)."""
    value = log.setting(name)
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


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


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.4")
