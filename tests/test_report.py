"""Run reports (nanoseek/report/): what the figure plots is what metrics.jsonl holds, guard events sit at
their steps, bad log lines are skipped with one warning, run statuses are right, and `nanoseek train`
ends with a summary and a report. Three tiny real runs (MLA + MoE + MTP, a few steps each) are shared."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nanoseek.cli import main as cli_main
from nanoseek.config import DataConfig, GuardConfig, ModelConfig, RunConfig, TrainConfig
from nanoseek.report import build_figure, finish_train, list_runs, read_run, run_status, summary_text, write_report
from nanoseek.report.runs import RUNNING_IDLE_S, format_runs
from nanoseek.train.checkpoint import best_checkpoint, latest_checkpoint, list_checkpoints
from nanoseek.train.trainer import Trainer
from tiny import CORPUS_WORDS, TINY_MODEL, write_corpus

pytest.importorskip("matplotlib")

STEPS, FAULT_AT = 12, 5
MODEL = TINY_MODEL
TRAIN = dict(batch_size=4, warmup_steps=2, eval_every=4, save_every=4, eval_batches=2, log_every=3,
             tensorboard=False, sample_tokens=0, keep_last=2, keep_best=1)


REPORT_WORDS = CORPUS_WORDS[:17]  # up to "stones": the runs these tests pin were trained on this text


def config(corpus: Path, out: Path, inject=(), **guard) -> RunConfig:
    return RunConfig(model=ModelConfig.from_preset("tiny", **MODEL),
                     data=DataConfig(source=str(corpus), tokenizer="char", seq_len=16),
                     train=TrainConfig(max_steps=STEPS, **TRAIN),
                     guard=GuardConfig(stats_every=2, inject=tuple(inject), **guard), device="cpu", out=str(out))


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


CLI_FLAGS = ["--model.dim", "32", "--model.n-heads", "2", "--model.n-layers", "2", "--model.kv-lora-rank", "16",
             "--model.qk-nope-head-dim", "8", "--model.qk-rope-head-dim", "8", "--model.v-head-dim", "8",
             "--model.inter-dim", "64", "--model.moe-inter-dim", "16", "--model.n-routed-experts", "4",
             "--model.max-seq-len", "32", "--data.tokenizer", "char", "--data.seq-len", "16",
             "--train.batch-size", "4", "--train.eval-every", "4", "--train.save-every", "4",
             "--train.eval-batches", "2", "--train.log-every", "3", "--train.no-tensorboard",
             "--guard.stats-every", "2", "--no-sample", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"clean": a finished run (Trainer), "faulted": a CLI run with nan-loss@5 (and its stdout),
    "aborted": a run the guard aborts at its first fault}."""
    root = tmp_path_factory.mktemp("runs")
    corpus = write_corpus(root / "corpus.txt", REPORT_WORDS)
    out = {}
    clean = root / "clean"
    out["clean_result"] = Trainer(config(corpus, clean), clean, show_progress=False).train()
    out["clean"] = clean
    aborted = root / "aborted"
    cfg = config(corpus, aborted, inject=(f"nan-loss@{FAULT_AT}",), max_skips=1, max_rollbacks=0)
    out["aborted_result"] = Trainer(cfg, aborted, show_progress=False).train()
    out["aborted"] = aborted
    faulted = root / "faulted"
    import io
    from contextlib import redirect_stdout

    stdout = io.StringIO()
    with redirect_stdout(stdout):
        out["faulted_code"] = cli_main(["train", "--data", str(corpus), "--out", str(faulted), "--max-steps",
                                        str(STEPS), "--inject", f"nan-loss@{FAULT_AT}", *CLI_FLAGS])
    out["faulted"], out["faulted_stdout"] = faulted, stdout.getvalue()
    out["root"], out["corpus"] = root, corpus
    return out


# ---- the figure holds the run's numbers --------------------------------------------------------------


def test_figure_plots_the_runs_own_numbers(runs):
    run = runs["clean"]
    log = read_run(run)
    figure = build_figure([log])
    train = records(run, "train")
    steps, ce = figure.lines["loss"]["train ce"]
    assert list(steps) == list(range(STEPS)) and np.allclose(ce, [r["ce"] for r in train])
    assert np.allclose(figure.lines["loss"]["train mtp_1"][1], [r["mtp_1"] for r in train])
    evals = records(run, "eval")
    val_steps, val = figure.lines["loss"]["val loss (ce)"]
    assert list(val_steps) == [4, 8, 12] == [r["step"] for r in evals] and np.allclose(val, [r["val_loss"] for r in evals])
    assert np.allclose(figure.lines["lr"]["clean"][1], [r["lr"] for r in train])
    assert np.allclose(figure.lines["grad_norm"]["grad norm (before clipping)"][1], [r["grad_norm"] for r in train])
    assert figure.lines["grad_norm"]["clip threshold 1"][1].tolist() == [1.0]  # train.grad_clip from config.toml
    tps_steps, _ = figure.lines["throughput"]["tokens/s"]
    assert list(tps_steps) == [2, 5, 8, 11]  # every log_every=3 steps, and the last
    # The heatmap: one row per MoE layer (layer 0 is dense), a column every stats_every=2 steps.
    assert figure.heatmap["rows"] == ["layers.1.ffn", "mtp.0.block.ffn"]
    for row, layer in enumerate(figure.heatmap["rows"]):
        sampled = [r for r in train if f"expert_load_imbalance/{layer}" in r]
        assert list(figure.heatmap["steps"][row]) == [r["step"] for r in sampled] == list(range(0, STEPS, 2))
        assert np.allclose(figure.heatmap["values"][row], [r[f"expert_load_imbalance/{layer}"] for r in sampled])
        assert (figure.heatmap["values"][row] >= 1.0).all()  # max / mean load is never below 1
    assert set(figure.lines["attn_logit"]) == {"layers.0.attn", "layers.1.attn", "mtp.0.block.attn"}
    assert figure.events == [] and figure.markers == {}


def test_guard_events_are_marked_at_their_steps_with_causes(runs):
    assert runs["faulted_code"] == 0
    log = read_run(runs["faulted"])
    assert [(e["step"], e["action"]) for e in log.events] == [(FAULT_AT, "skip")]
    figure = build_figure([log])
    offsets = np.asarray(figure.markers["faulted: skip"].get_offsets())
    assert offsets[:, 0].tolist() == [FAULT_AT]
    # nan-loss poisons the total loss; the ce component stays finite, and the marker sits on the ce curve.
    train = {r["step"]: r for r in records(runs["faulted"], "train")}
    assert train[FAULT_AT]["loss"] == "nan" and math.isfinite(train[FAULT_AT]["ce"])
    assert offsets[0, 1] == pytest.approx(train[FAULT_AT]["ce"])
    labels = [t.get_text() for t in figure.axes["loss"].texts]
    assert labels == [f"step {FAULT_AT} skip: non-finite loss"]

    aborted = build_figure([read_run(runs["aborted"])])
    offsets = np.asarray(aborted.markers["aborted: abort"].get_offsets())
    assert offsets[:, 0].tolist() == [FAULT_AT]
    # An aborted step logs no training record: the marker sits at the last ce before it.
    assert offsets[0, 1] == pytest.approx(records(runs["aborted"], "train")[-1]["ce"])
    assert records(runs["aborted"], "train")[-1]["step"] == FAULT_AT - 1
    assert [t.get_text() for t in aborted.axes["loss"].texts] == [
        f"step {FAULT_AT} abort: 1 skips within 50 steps, last: non-finite loss; rollbacks exhausted (0/0)"]


def test_report_files_are_self_contained(runs, tmp_path):
    run = tmp_path / "faulted"
    shutil.copytree(runs["faulted"], run)
    png_path, html_path = write_report([run], dpi=60)
    png = png_path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png_path.parent == run
    page = html_path.read_text()
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page  # the same image, inlined
    assert not re.search(r"(src|href)=['\"](?!data:)", page) and "<script" not in page  # no external assets
    assert "non-finite loss" in page and f"<td>{FAULT_AT}</td>" in page  # the events table
    assert "nan-loss@5" in page  # the config table shows the injected fault


def test_several_runs_overlay_into_the_first_dir_or_out(runs, tmp_path):
    logs = [read_run(runs["clean"]), read_run(runs["faulted"])]
    figure = build_figure(logs)
    assert {"clean train ce", "faulted train ce", "clean val loss (ce)", "faulted val loss (ce)"} <= set(figure.lines["loss"])
    assert list(figure.markers) == ["faulted: skip"]
    assert figure.heatmap["rows"] == ["clean: layers.1.ffn", "clean: mtp.0.block.ffn",
                                      "faulted: layers.1.ffn", "faulted: mtp.0.block.ffn"]
    out = tmp_path / "compare"
    assert cli_main(["report", str(runs["clean"]), str(runs["faulted"]), "--out", str(out)]) == 0
    assert (out / "report.png").is_file() and (out / "report.html").is_file()
    assert "clean vs faulted" in (out / "report.html").read_text()


# ---- reading a damaged log ---------------------------------------------------------------------------


def test_malformed_lines_are_skipped_with_one_warning(runs, tmp_path, capsys):
    run = tmp_path / "damaged"
    run.mkdir()
    shutil.copy(runs["clean"] / "config.toml", run)
    good = (runs["clean"] / "metrics.jsonl").read_text().splitlines()
    bad = ["not json at all", "[1, 2, 3]", '{"kind": "train", "loss": 2.0}', '{"step": 3, "loss": 2.0}',
           '{"kind": "train", "step": 4, "loss": "high"}', '{"kind": "event", "step": 4}']
    lines = good[:3] + bad + [""] + good[3:]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "train", "st')  # a crash mid-write
    warnings = []
    log = read_run(run, warn=warnings.append)
    assert len(warnings) == 1 and "skipped 7 malformed lines" in warnings[0] and "line 4: not JSON" in warnings[0]
    assert log.skipped_lines == 7
    assert [r["step"] for r in log.train] == list(range(STEPS)) and len(log.evals) == 3 and log.summary is not None
    capsys.readouterr()
    assert cli_main(["report", str(run)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nanoseek: warning:") and "skipped 7" in err[0]


def test_missing_metrics_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for path, why in ((tmp_path / "empty", "has no metrics.jsonl"), (tmp_path / "nope", "does not exist")):
        with pytest.raises(ValueError, match=why):
            read_run(path)
        assert cli_main(["report", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("nanoseek: error: run dir") and why in err[0]


def test_a_resumed_segment_replaces_what_it_re_ran(tmp_path):
    def line(kind, step, **fields):
        return json.dumps({"kind": kind, "step": step, **fields, "time": 1000.0 + step})

    # As the trainer writes them: an eval after step 3 counts 4 steps; a step's event precedes its record.
    first = ([line("train", s, loss=5.0 - 0.1 * s) for s in range(4)] + [line("eval", 4, val_loss=4.7)]
             + [line("train", 4, loss=4.6), line("event", 5, event="skip", action="skip"), line("train", 5, loss=4.5)])
    # Resumed from the step-4 checkpoint: a fault at once, steps 4.. again with other values, to 8 and a summary.
    second = ([line("event", 4, event="skip", action="skip", cause="again"), line("train", 4, loss=9.0)]
              + [line("train", s, loss=9.0) for s in range(5, 8)] + [line("eval", 8, val_loss=4.0),
                                                                     line("summary", 8, status="finished")])
    (tmp_path / "metrics.jsonl").write_text("\n".join(first + second) + "\n")
    log = read_run(tmp_path)
    assert [(r["step"], r["loss"]) for r in log.train] == [(s, 5.0 - 0.1 * s) for s in range(4)] + [(s, 9.0) for s in range(4, 8)]
    assert [r["step"] for r in log.evals] == [4, 8] and log.resumed_at == [4]
    assert [(e["step"], e["cause"]) for e in log.events] == [(4, "again")]  # the abandoned step-5 event is gone
    assert log.best_val() == (4.0, 8) and run_status(log) == "finished"
    assert log.elapsed_s == pytest.approx((1005.0 - 1000.0) + (1008.0 - 1004.0))  # the time between is left out
    # A resume after the summary (train further): the old summary no longer says how the run ended.
    (tmp_path / "metrics.jsonl").write_text("\n".join(first + second + [line("train", 8, loss=3.0)]) + "\n")
    assert read_run(tmp_path).summary is None


# ---- nanoseek runs -----------------------------------------------------------------------------------


def test_runs_statuses(runs, tmp_path, capsys):
    root = tmp_path / "runs"
    root.mkdir()
    for name in ("clean", "aborted"):
        shutil.copytree(runs[name], root / name)
    for name, source in (("running", "clean"), ("crashed", "clean"), ("aborted-no-summary", "aborted")):
        shutil.copytree(runs[source], root / name)
        path = root / name / "metrics.jsonl"
        path.write_text("".join(l for l in path.read_text().splitlines(True) if '"kind": "summary"' not in l))
    old = time.time() - 10 * RUNNING_IDLE_S
    for name in ("crashed", "aborted-no-summary", "clean", "aborted"):
        os.utime(root / name / "metrics.jsonl", (old, old))
    (root / "not-a-run").mkdir()
    converted = root / "converted"  # what `nanoseek convert` leaves: config and a checkpoint, no metrics
    converted.mkdir()
    shutil.copy(runs["clean"] / "config.toml", converted / "config.toml")
    (converted / "conversion.json").write_text("{}\n")
    os.utime(converted / "config.toml", (old, old))
    infos = {info.path.name: info for info in list_runs(root)}
    assert {name: info.status for name, info in infos.items()} == {
        "clean": "finished", "aborted": "aborted", "running": "running", "crashed": "interrupted",
        "aborted-no-summary": "aborted", "converted": "converted"}
    clean = infos["clean"]
    best = min(r["val_loss"] for r in records(runs["clean"], "eval"))
    assert clean.preset == "tiny" and clean.last_step == STEPS - 1 and clean.best_val == pytest.approx(best)
    assert infos["aborted"].last_step == FAULT_AT - 1  # the aborting step itself is not applied or logged
    assert list(infos)[0] == "running"  # most recently modified first
    capsys.readouterr()
    assert cli_main(["runs", str(root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["run", "status", "preset", "best", "val", "last", "step", "last", "modified"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["crashed"][1] == "interrupted" and rows["clean"][1:3] == ["finished", "tiny"]
    assert rows["clean"][3] == f"{best:.4f}" and rows["clean"][4] == f"@{STEPS}" and rows["clean"][5] == str(STEPS - 1)
    assert format_runs([], root).startswith("no runs under")


# ---- the end of nanoseek train -----------------------------------------------------------------------


def test_train_ends_with_a_summary_and_a_report(runs):
    run, stdout = runs["faulted"], runs["faulted_stdout"]
    assert (run / "report.png").is_file() and (run / "report.html").is_file()  # drawn at the end of train
    summary = stdout[stdout.index("run summary:"):]
    evals = records(run, "eval")
    best = min(evals, key=lambda r: r["val_loss"])
    assert f"run summary: {run} (finished)" in summary
    assert re.search(rf"steps +{STEPS} \({STEPS - 1} optimizer updates kept\)", summary)  # one step skipped
    assert f"{STEPS * 4 * 16:,} (64 per step)" in summary  # batch 4 x seq_len 16
    assert f"best val     {best['val_loss']:.4f} at step {best['step']} (3 evals)" in summary
    kept = list_checkpoints(run)
    assert len(kept) == 2 and all(p.name in summary for p in kept)  # keep_last=2
    assert f"{latest_checkpoint(run).name} (val" in summary and "best" in summary
    assert best_checkpoint(run) in kept
    assert "1 event: 1 skip" in summary and f"step {FAULT_AT} skip: non-finite loss" in summary
    assert f"report       {run / 'report.html'}" in summary


def test_summary_of_an_aborted_run_and_without_matplotlib(runs, monkeypatch, tmp_path, capsys):
    run = tmp_path / "aborted"
    shutil.copytree(runs["aborted"], run)
    text = summary_text(read_run(run), runs["aborted_result"])
    assert text.startswith(f"run summary: {run} (aborted)") and "1 event: 1 abort" in text
    # Aborted at step 5 (6 steps seen); the final weights are the last good snapshot's, from step 0.
    assert re.search(r"steps +6 \(0 optimizer updates kept\)", text)
    assert f"step {FAULT_AT} abort: 1 skips within 50 steps, last: non-finite loss; rollbacks exhausted (0/0)" in text
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if the plot extra were not installed
    text = finish_train(run, runs["aborted_result"])
    assert f"not drawn: pip install 'nanoseek[plot]', then run: nanoseek report {run}" in text
    assert not (run / "report.png").exists()
    capsys.readouterr()
    assert cli_main(["report", str(run)]) == 2
    assert capsys.readouterr().err.strip() == "nanoseek: error: run reports need matplotlib: pip install 'nanoseek[plot]'"
