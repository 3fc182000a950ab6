"""The rollback keeper: in-memory snapshots of everything a rollback restores, beside the guard.

A snapshot becomes "good" only after it has survived `snapshot_every` healthy steps, so a bad update
that looked fine when applied (an LR spike) is never what a run rolls back to (PaLM, arXiv 2204.02311,
section 5.1, restarts from a checkpoint before the spike). With plateau detection on (train/plateau.py), a
snapshot is promoted only once the loss is below the unigram level: weights knocked onto the plateau are no
target. A snapshot also holds the adaptive clipper's averages (train/clipping.py), so after a rollback the
clip threshold is the one the restored weights trained under, not one the faulty window dragged along.
Snapshots live on the CPU, so accelerator memory is spared; under FSDP each rank keeps its own shards.
"""

from __future__ import annotations

import torch

from nanoseek.config import GuardConfig
from nanoseek.train.clipping import AdaptiveClip
from nanoseek.train.distributed import Distributed


class RollbackKeeper:
    """Takes snapshots of the model, optimizer, GradScaler, EMA and clipper after healthy steps; restores one."""

    def __init__(self, cfg: GuardConfig, dist: Distributed, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, ema: torch.nn.Module | None, clipper: AdaptiveClip | None = None):
        self.cfg, self.dist = cfg, dist
        self.model, self.optimizer, self.scaler, self.ema, self.clipper = model, optimizer, scaler, ema, clipper
        self.good: dict | None = None
        self.pending: dict | None = None

    def _snapshot(self, step: int, opt_step: int) -> dict:
        return self.dist.offload({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                  "scaler": self.scaler.state_dict(), "opt_step": opt_step, "step": step,
                                  "ema": self.ema.state_dict() if self.ema is not None else None,
                                  "clipper": self.clipper.state_dict() if self.clipper is not None else None})

    def after_good_step(self, step: int, opt_step: int, worth_keeping: bool = True) -> None:
        """Called at the start and after every healthy step. With no snapshot yet (a run resumed between
        snapshot steps) one is taken at once, or a rollback before the next snapshot step would have
        nothing to restore. `worth_keeping` (the guard's): False keeps the last good snapshot as it is."""
        if not self.cfg.enabled or (step % self.cfg.snapshot_every and self.good is not None):
            return  # not due
        if self.pending is not None and worth_keeping:
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
        if self.clipper is not None and snap.get("clipper") is not None:
            self.clipper.load_state_dict(snap["clipper"])
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
