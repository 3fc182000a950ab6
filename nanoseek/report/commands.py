"""The report's command-line surface: `nanoseek report`, `nanoseek runs`, and the end of `nanoseek train`."""

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from nanoseek.report.figures import MissingMatplotlib, build_figure, run_labels
from nanoseek.report.html import render_html
from nanoseek.report.records import read_run
from nanoseek.report.runs import format_runs, list_runs
from nanoseek.report.summary import summary_text
from nanoseek.train.distributed import launched_by_torchrun

REPORT_PNG = "report.png"
REPORT_HTML = "report.html"


@dataclass
class Report:
    """Plot runs from their metrics.jsonl: writes report.png and a self-contained report.html (loss and
    its components with the guard's events, LR, grad norm vs the clip threshold, tokens/s and MFU,
    expert-load heatmap, max attention logit). Several runs are overlaid; the combined report goes to
    the first run's directory unless --out says where."""

    run_dirs: tyro.conf.Positional[Annotated[tuple[str, ...], tyro.conf.arg(metavar="RUN_DIR [RUN_DIR ...]")]]
    """One or more run directories (each holding metrics.jsonl)."""
    out: str | None = None
    """Directory to write report.png and report.html into (default: the first run directory)."""
    dpi: int = 80
    """Resolution of report.png (the figure is 12 x 14 inches)."""


@dataclass
class Runs:
    """List the runs under a directory: status (running, finished, early-stopped, aborted, interrupted),
    preset, best validation loss, last step, last modified."""

    dir: tyro.conf.Positional[str] = "runs"
    """The folder holding run directories (or one run directory)."""


def write_report(run_dirs: list[str | Path], out: str | Path | None = None, dpi: int = 80) -> tuple[Path, Path]:
    """Draw the runs into `out`/report.png and report.html (default: the first run dir); return their paths.
    Raises ValueError for a missing run or metrics.jsonl, MissingMatplotlib (a ValueError) without matplotlib."""
    if not run_dirs:
        raise ValueError("nanoseek report needs at least one RUN_DIR (a directory holding metrics.jsonl)")
    if dpi < 20 or dpi > 600:
        raise ValueError(f"dpi={dpi}: use a value in [20, 600] (80 gives a ~1000 x 1100 pixel page)")
    logs = [read_run(path) for path in run_dirs]
    out_dir = Path(out) if out is not None else logs[0].run_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file; pass a directory to write {REPORT_PNG} and "
                         f"{REPORT_HTML} into")
    png = build_figure(logs).png(dpi)
    out_dir.mkdir(parents=True, exist_ok=True)
    png_path, html_path = out_dir / REPORT_PNG, out_dir / REPORT_HTML
    _write_atomic(png_path, png)
    _write_atomic(html_path, render_html(logs, run_labels(logs), png).encode("utf-8"))
    return png_path, html_path


def cmd_report(args: Report) -> int:
    start = time.perf_counter()
    png_path, html_path = write_report(list(args.run_dirs), args.out, args.dpi)
    print(f"wrote {html_path} and {png_path} ({png_path.stat().st_size / 1024:.0f} KB) "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_runs(args: Runs) -> int:
    print(format_runs(list_runs(args.dir), args.dir))
    return 0


def finish_train(run_dir: str | Path, result) -> str:
    """After `nanoseek train`: write the report when matplotlib is there, and return the run summary."""
    rank, _, world_size = launched_by_torchrun()
    if rank != 0:  # under torchrun only rank 0 writes the log and the report
        return ""
    run_dir = Path(run_dir)
    try:
        png_path, html_path = write_report([run_dir])
        report = f"{html_path} (figure: {png_path.name})"
    except MissingMatplotlib:
        report = f"not drawn: pip install 'nanoseek[plot]', then run: nanoseek report {run_dir}"
    except Exception as err:  # a failed plot must not turn a finished run into a failed command
        report = (f"failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                  f"retry with: nanoseek report {run_dir}")
    return summary_text(read_run(run_dir, warn=lambda _: None), result, report, world_size=world_size)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write then rename, so a browser or a second report never sees half a file."""
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_bytes(data)
    os.replace(partial, path)
