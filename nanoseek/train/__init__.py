"""Training: optimizers and LR schedules, atomic checkpoints, metrics (the loop itself is trainer.py)."""

from nanoseek.train.checkpoint import (Checkpoint, best_checkpoint, latest_checkpoint, list_checkpoints,
                                       read_checkpoint, save_checkpoint)
from nanoseek.train.metrics import MetricsLogger, Throughput, device_peak_flops, mfu, peak_memory_gb
from nanoseek.train.optim import apply_lr_factor, build_optimizer, lr_factor

__all__ = ["Checkpoint", "best_checkpoint", "latest_checkpoint", "list_checkpoints", "read_checkpoint",
           "save_checkpoint", "MetricsLogger", "Throughput", "device_peak_flops", "mfu", "peak_memory_gb",
           "apply_lr_factor", "build_optimizer", "lr_factor"]
