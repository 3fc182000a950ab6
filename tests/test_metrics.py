"""Metrics sinks and figures (nanoseek/train/metrics.py)."""

import json
import sys
import time

import numpy as np
import pytest
import torch

from nanoseek.train.metrics import MetricsLogger, Throughput, device_peak_flops, jsonable, mfu, peak_memory_gb


def _strict_lines(path):
    """Parse metrics.jsonl refusing the NaN/Infinity tokens that Python's json accepts but JSON does not."""
    def refuse(token):
        raise AssertionError(f"invalid JSON token {token}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_records_are_valid_json_with_nonfinite_values_as_strings(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log({"step": 1, "loss": 2.5, "grad_norm": float("nan"), "lr": torch.tensor(1e-3),
                    "tokens": np.int64(4096), "scale": float("inf"), "nested": {"min": float("-inf")}})
        logger.log({"step": 2, "kind": "eval", "val_loss": torch.tensor(float("inf"))})
    first, second = _strict_lines(tmp_path / "metrics.jsonl")
    assert first["kind"] == "train" and first["step"] == 1 and first["loss"] == 2.5
    assert (first["grad_norm"], first["scale"], first["nested"]["min"]) == ("nan", "inf", "-inf")
    assert first["lr"] == pytest.approx(1e-3) and first["tokens"] == 4096 and "time" in first
    assert second["kind"] == "eval" and float(second["val_loss"]) == float("inf")


def test_log_needs_a_step(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(ValueError, match="no 'step'"):
            logger.log({"loss": 1.0})


def test_a_resumed_run_appends(tmp_path):
    for step in (1, 2):
        with MetricsLogger(tmp_path, tensorboard=False, start_step=step) as logger:
            logger.log({"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in _strict_lines(tmp_path / "metrics.jsonl")] == [1, 2]


def test_event_writes_a_record_and_one_console_line(tmp_path, capsys):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.event({"step": 12, "action": "skip", "loss": float("nan")}, "step 12: loss is NaN, step skipped")
    assert capsys.readouterr().out == "step 12: loss is NaN, step skipped\n"
    (record,) = _strict_lines(tmp_path / "metrics.jsonl")
    assert record["kind"] == "event" and record["action"] == "skip" and record["loss"] == "nan"


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "rank1"
    logger = MetricsLogger(run_dir, tensorboard=True, wandb=True, enabled=False)
    logger.log({"step": 1, "loss": 1.0})
    logger.log({"no": "step"})  # not even validated
    logger.event({"step": 1}, "a line")
    logger.progress(1, loss=1.0)
    logger.write("another line")
    logger.close()
    assert not run_dir.exists() and capsys.readouterr().out == ""


def test_tensorboard_gets_scalars(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        logger.log({"step": 3, "loss": 1.5, "note": "text is skipped"})
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(RuntimeError, match=r"wandb is not installed; pip install 'nanoseek\[wandb\]'"):
        MetricsLogger(tmp_path, tensorboard=False, wandb=True)


def test_progress_and_write_do_not_fail_without_a_terminal(tmp_path, capsys):
    with MetricsLogger(tmp_path, tensorboard=False, total_steps=10, start_step=2) as logger:
        for step in range(2, 5):
            logger.progress(step, loss=torch.tensor(1.25), tok_s=1234.5)
        logger.write("eval: 1.0")
    assert "eval: 1.0" in capsys.readouterr().out


def test_jsonable_handles_arrays_and_unknown_types():
    assert jsonable({"a": np.array([1.0, np.nan]), "b": torch.tensor([1, 2]), 3: object}) == {
        "a": [1.0, "nan"], "b": [1, 2], "3": str(object)}


def test_throughput_measures_the_interval_and_resets():
    meter = Throughput()
    meter.add(1000)
    meter.add(1000)
    time.sleep(0.05)
    rate = meter.rate()
    assert 2000 / 5 < rate <= 2000 / 0.05  # loose below: a loaded machine may stall the sleeper
    assert meter.rate() == 0.0  # the interval restarted


def test_peak_memory_on_cpu_is_the_process_rss():
    assert 0.01 < peak_memory_gb("cpu") < 1024


def test_peak_flops_table_and_mfu(monkeypatch):
    assert device_peak_flops("cpu", "bf16") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    expected = {"NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989.4e12,
                "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA GeForce RTX 4090": 165.2e12, "NVIDIA L4": 121e12,
                "NVIDIA A10": 125e12, "NVIDIA L40S": None, "NVIDIA A10G": None, "Tesla T4": None}
    for name, peak in expected.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert device_peak_flops("cuda", "bf16") == peak, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert device_peak_flops("cuda", "fp32") == 19.5e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # TF32 allowed
    assert device_peak_flops("cuda", "fp32") == 156e12
    with pytest.raises(ValueError, match="precision"):
        device_peak_flops("cuda", "fp8")
    assert mfu(6e9, 50_000, 1e15) == pytest.approx(0.3)
    assert mfu(6e9, 50_000, None) is None
