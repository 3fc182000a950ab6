"""Run reports, read back from a run directory: records.py reads metrics.jsonl, figures.py draws the panels,
html.py wraps them in one page, summary.py writes the lines `nanoseek train` ends with, runs.py lists runs."""

from nanoseek.report.commands import Report, Runs, cmd_report, cmd_runs, finish_train, write_report
from nanoseek.report.figures import MissingMatplotlib, ReportFigure, build_figure
from nanoseek.report.records import RunLog, read_run
from nanoseek.report.runs import RunInfo, list_runs, run_status
from nanoseek.report.summary import summary_text

__all__ = ["Report", "Runs", "cmd_report", "cmd_runs", "finish_train", "write_report", "MissingMatplotlib",
           "ReportFigure", "build_figure", "RunLog", "read_run", "RunInfo", "list_runs", "run_status", "summary_text"]
