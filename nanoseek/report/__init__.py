"""Run reports: plots and a one-page summary of a run, read back from its directory.

records.py reads and validates metrics.jsonl; figures.py draws the panels (matplotlib, optional);
html.py wraps the figure in a self-contained page; summary.py writes the lines `nanoseek train` ends
with; runs.py lists runs and infers their status; commands.py holds the CLI commands.
"""

from nanoseek.report.commands import Report, Runs, cmd_report, cmd_runs, finish_train, write_report
from nanoseek.report.figures import MissingMatplotlib, ReportFigure, build_figure
from nanoseek.report.records import RunLog, read_run
from nanoseek.report.runs import RunInfo, list_runs, run_status
from nanoseek.report.summary import summary_text

__all__ = ["Report", "Runs", "cmd_report", "cmd_runs", "finish_train", "write_report", "MissingMatplotlib",
           "ReportFigure", "build_figure", "RunLog", "read_run", "RunInfo", "list_runs", "run_status", "summary_text"]
