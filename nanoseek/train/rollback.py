"""The rollback keeper: in-memory snapshots of everything a rollback restores, beside the guard.

A snapshot becomes "good" only after it has survived `snapshot_every` healthy steps, so a bad update
that looked fine when applied (an LR spike) is never what a run rolls back to (PaLM, arXiv 2204.02311,
section 5.1, restarts from a checkpoint before the spike). Snapshots live on the CPU, so accelerator
memory is spared; under FSDP each rank keeps its own shards.
"""

from __future__ import annotations

import torch

from nanoseek.config import GuardConfig
from nanoseek.train.distributed import Distributed


class RollbackKeeper:
    """Takes snapshots of the model, optimizer, GradScaler and EMA after healthy steps, and restores one."""

    def __init__(self, cfg: GuardConfig, dist: Distributed, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, ema: torch.nn.Module | None):
        self.cfg, self.dist = cfg, dist
        self.model, self.optimizer, self.scaler, self.ema = model, optimizer, scaler, ema
        self.good: dict | None = None
        self.pending: dict | None = None

    def _snapshot(self, step: int, opt_step: int) -> dict:
        return self.dist.offload({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                  "scaler": self.scaler.state_dict(), "opt_step": opt_step, "step": step,
                                  "ema": self.ema.state_dict() if self.ema is not None else None})

    def after_good_step(self, step: int, opt_step: int) -> None:
        """Called at the start and after every healthy step. With no snapshot yet (a run resumed between
        snapshot steps) one is taken at once, or a rollback before the next snapshot step would have
        nothing to restore."""
        if not self.cfg.enabled or (step % self.cfg.snapshot_every and self.good is not None):
            return  # not due
        if self.pending is not None:
            self.good = self.pending
        self.pending = self._snapshot(step, opt_step)
        if self.good is None:
            self.good = self.pending

    def roll_back(self, progress) -> int:
        """Restore the last good snapshot and its `progress.opt_step` (the data cursor stays where it is, so
        the bad window is left behind). Returns the step the snapshot was taken at."""
        snap = self.restore_weights(progress)
        self.scaler.load_state_dict(snap["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(snap["ema"])
        self.pending = None
        return snap["step"]

    def restore_weights(self, progress) -> dict:
        """Only the weights, the optimizer and opt_step (an aborted run's final checkpoint holds the last good
        ones); nothing if there is no snapshot yet."""
        snap = self.good
        if snap is not None:
            self.model.load_state_dict(self.dist.restore(snap["model"]))
            self.optimizer.load_state_dict(self.dist.restore(snap["optimizer"]))
            progress.opt_step = snap["opt_step"]
        return snap
