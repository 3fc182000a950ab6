"""In-memory snapshots of everything a rollback restores (on the CPU; under FSDP each rank keeps its shards).

A snapshot becomes "good" only after surviving `snapshot_every` healthy steps (and, with plateau detection on,
once the loss is below the unigram level), so a bad update that looked fine when applied is never what a run
rolls back to (PaLM, arXiv 2204.02311, section 5.1). It holds the adaptive clipper's averages too.
"""

import torch

from nanoseek.config import GuardConfig
from nanoseek.train.clipping import AdaptiveClip
from nanoseek.train.distributed import Distributed


class RollbackKeeper:
    def __init__(self, cfg: GuardConfig, dist: Distributed, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, ema: torch.nn.Module | None, clipper: AdaptiveClip | None = None):
        self.cfg, self.dist = cfg, dist
        self.model, self.optimizer, self.scaler, self.ema, self.clipper = model, optimizer, scaler, ema, clipper
        self.good: dict | None = None  # the snapshot a rollback restores
        self.pending: dict | None = None  # the next good one, once it survives `snapshot_every` steps

    def _snapshot(self, step: int, opt_step: int) -> dict:
        return self.dist.offload({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                  "scaler": self.scaler.state_dict(), "opt_step": opt_step, "step": step,
                                  "ema": self.ema.state_dict() if self.ema is not None else None,
                                  "clipper": self.clipper.state_dict() if self.clipper is not None else None})

    def after_good_step(self, step: int, opt_step: int, worth_keeping: bool = True) -> None:
        """Called at the start and after every healthy step. With no snapshot yet (a run resumed between snapshot
        steps) one is taken at once. `worth_keeping` (the guard's) False keeps the last good snapshot as it is."""
        if not self.cfg.enabled or (step % self.cfg.snapshot_every and self.good is not None):
            return  # not due
        if self.pending is not None and worth_keeping:
            self.good = self.pending
        self.pending = self._snapshot(step, opt_step)
        if self.good is None:
            self.good = self.pending

    def roll_back(self, progress) -> int:
        """Restore the last good snapshot (not the data cursor: the bad window stays behind); returns its step."""
        snap = self.restore_weights(progress)
        self.scaler.load_state_dict(snap["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(snap["ema"])
        if self.clipper is not None and snap.get("clipper") is not None:
            self.clipper.load_state_dict(snap["clipper"])
        self.pending = None
        return snap["step"]

    def restore_weights(self, progress) -> dict:
        """Only the weights, the optimizer and opt_step, for an aborted run's final checkpoint (None: no snapshot)."""
        snap = self.good
        if snap is not None:
            self.model.load_state_dict(self.dist.restore(snap["model"]))
            self.optimizer.load_state_dict(self.dist.restore(snap["optimizer"]))
            progress.opt_step = snap["opt_step"]
        return snap
