"""Where numbers go (metrics.jsonl, TensorBoard, optional wandb, a progress bar, the console), and the figures
a log line needs: tokens/s, peak memory, MFU against the GPU's dense peak.

metrics.jsonl is appended and flushed line by line, so a crash loses at most one line. Non-finite floats, which
JSON lacks, are written as "nan", "inf" and "-inf": `float(value)` reads them back, and NaN stays apart from Inf."""

import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
WANDB_ID_FILE = "wandb_id.txt"  # so a resumed run logs into the same wandb run


def jsonable(value: Any) -> Any:
    """`value` with tensors and numpy scalars made Python numbers and non-finite floats made strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, (np.ndarray, np.generic)):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class MetricsLogger:
    """Writes training/eval records and stability events; a no-op when `enabled` is False (ranks > 0). A
    record's `kind` is "train" unless given; its numbers go to TensorBoard and wandb as `{kind}/{field}`."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "nanoseek", config: dict | None = None, enabled: bool = True,
                 total_steps: int = 0, start_step: int = 0, show_progress: bool = True):
        self.enabled, self.run_dir = enabled, Path(run_dir)
        self.total_steps, self.start_step, self.show_progress = total_steps, start_step, show_progress
        self._file = self._tensorboard = self._wandb = self._bar = None
        self._postfix: dict[str, str] = {}
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))
            except ImportError:
                self.write("tensorboard is not installed: logging to metrics.jsonl only (pip install tensorboard)")
        if wandb:
            self._wandb = self._open_wandb(wandb_project, config)

    def _open_wandb(self, project: str, config: dict | None):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("wandb=True but wandb is not installed; pip install 'nanoseek[wandb]' "
                               "or set train.wandb=false") from None
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        return wandb.init(project=project, name=self.run_dir.name, id=run_id, resume="allow",
                          dir=str(self.run_dir), config=config)

    def log(self, record: dict) -> None:
        """Append a training/eval record (must carry `step`) to every enabled sink."""
        if not self.enabled:
            return
        if "step" not in record:
            raise ValueError(f"metrics record {sorted(record)} has no 'step'; add step=<optimizer step>")
        record = {"kind": "train", **record}
        self._append(record)
        scalars = {f"{record['kind']}/{key}": float(value) for key, value in record.items()
                   if key not in ("kind", "step", "time") and _is_number(value)}
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, record["step"])
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=int(record["step"]))

    def event(self, record: dict, line: str) -> None:
        """A stability event: a record (kind "event" unless given) and one console line."""
        if self.enabled:
            self._append({"kind": "event", **record})
            self.write(line)

    def _append(self, record: dict) -> None:
        record = {**record, "time": record.get("time", round(time.time(), 3))}
        self._file.write(json.dumps(jsonable(record), allow_nan=False) + "\n")
        self._file.flush()

    def progress(self, step: int, **postfix: Any) -> None:
        """Move the progress bar to `step` (steps done = step + 1) and show `postfix` (loss=..., tok_s=...)."""
        if not (self.enabled and self.show_progress):
            return
        if self._bar is None:  # disable=None: no bar when stdout is not a terminal (log files would fill up)
            self._bar = tqdm(total=self.total_steps or None, initial=self.start_step, unit="step",
                             dynamic_ncols=True, disable=None, file=sys.stdout)
        # Values logged only every few steps (tokens/s) keep their last reading instead of showing None.
        self._postfix.update({k: _short(v) for k, v in postfix.items() if v is not None})
        self._bar.set_postfix(self._postfix, refresh=False)
        self._bar.update(step + 1 - self._bar.n)

    def write(self, line: str) -> None:
        """Print one console line above the progress bar without breaking it."""
        if self.enabled:
            tqdm.write(line, file=sys.stdout)

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        for sink in (self._bar, self._tensorboard, self._file):
            if sink is not None:
                sink.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file = self._tensorboard = self._wandb = self._bar = None
        self.enabled = False

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_number(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _short(value: Any) -> str:
    value = value.item() if isinstance(value, torch.Tensor) else value
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Throughput:
    """Tokens per second since the last `rate()` call. No cuda.synchronize() per step: the interval ends
    wherever the host is, at most the queued work behind the GPU (logging syncs once per interval anyway)."""

    def __init__(self) -> None:
        self._start, self._tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def rate(self) -> float:
        """Tokens/s since the last call (0.0 if no time has passed); starts the next interval."""
        now = time.perf_counter()
        elapsed, tokens = now - self._start, self._tokens
        self._start, self._tokens = now, 0
        return tokens / elapsed if elapsed > 0 else 0.0


def peak_memory_gb(device: str | torch.device) -> float:
    """Peak memory in GiB (2**30 bytes): CUDA max allocated on `device`, else the process' peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak * 1024 / 2**30  # bytes on macOS, KiB on Linux


# Dense (no 2:4 sparsity) peaks in TFLOP/s from NVIDIA's datasheets: bf16 / fp16 with fp32 accumulation (what
# torch uses), tf32, and plain fp32 on CUDA cores. Matched in order against torch.cuda.get_device_name, so
# specific names come before general ones.
_PEAK_TFLOPS = [
    (r"H[12]00 NVL", dict(bf16=835.0, fp16=835.0, tf32=417.5, fp32=60.0)),
    (r"H100 PCIe", dict(bf16=756.0, fp16=756.0, tf32=378.0, fp32=51.2)),
    (r"H[12]00", dict(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9)),  # H200, H100 SXM5 ("H100 80GB HBM3")
    (r"A100", dict(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5)),
    (r"RTX 4090", dict(bf16=165.2, fp16=165.2, tf32=82.6, fp32=82.6)),
    (r"\bL4\b", dict(bf16=121.0, fp16=121.0, tf32=60.0, fp32=30.3)),
    (r"\bA10\b", dict(bf16=125.0, fp16=125.0, tf32=62.5, fp32=31.2)),
]


def device_peak_flops(device: str | torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of `device` for `precision` ("bf16", "fp16", "fp32"); None on CPU or unknown GPUs.
    fp32 counts the TF32 peak when torch allows TF32 matmuls (float32 matmul precision not "highest")."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision={precision!r}: must be 'bf16', 'fp16' or 'fp32'")
    if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
        precision = "tf32"
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision] * 1e12 for pattern, peaks in _PEAK_TFLOPS if re.search(pattern, name)), None)


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation (0.4 = 40%), None without a peak; flops_per_token: PaLM's, 6 * N_active + attention."""
    return flops_per_token * tokens_per_sec / peak if peak is not None and peak > 0 else None
