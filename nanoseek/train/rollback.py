"""In-memory snapshots of everything a rollback restores (on the CPU; under FSDP each rank keeps its shards).

A snapshot becomes "good" only after surviving `snapshot_every` healthy steps (and, with plateau detection on,
once the loss is below the unigram level), so a bad update that looked fine when applied is never what a run
rolls back to (PaLM, arXiv 2204.02311, section 5.1). It holds the adaptive clipper's averages too."""

import copy

import torch

from nanoseek.config import GuardConfig
from nanoseek.train.clipping import AdaptiveClip
from nanoseek.train.distributed import is_dtensor


class RollbackKeeper:
    def __init__(self, cfg: GuardConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, ema: torch.nn.Module | None, clipper: AdaptiveClip | None = None):
        self.cfg = cfg
        self.model, self.optimizer, self.scaler, self.ema, self.clipper = model, optimizer, scaler, ema, clipper
        self.good: dict | None = None  # the snapshot a rollback restores
        self.pending: dict | None = None  # the next good one, once it survives `snapshot_every` steps

    def after_good_step(self, step: int, opt_step: int, worth_keeping: bool = True) -> None:
        """Called at the start and after every healthy step. With no snapshot yet (a run resumed between snapshot
        steps) one is taken at once. `worth_keeping` (the guard's) False keeps the last good snapshot as it is."""
        if not self.cfg.enabled or (step % self.cfg.snapshot_every and self.good is not None):
            return  # not due
        if self.pending is not None and worth_keeping:
            self.good = self.pending
        self.pending = offload({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                "scaler": self.scaler.state_dict(), "opt_step": opt_step, "step": step,
                                "ema": self.ema.state_dict() if self.ema is not None else None,
                                "clipper": self.clipper.state_dict() if self.clipper is not None else None})
        if self.good is None:
            self.good = self.pending

    def roll_back(self, progress) -> int:
        """Restore the last good snapshot (not the data cursor: the bad window stays behind); returns its step."""
        snap = self.restore_weights(progress)
        self.scaler.load_state_dict(snap["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(snap["ema"])
        if self.clipper is not None:
            self.clipper.load_state_dict(snap["clipper"])
        self.pending = None
        return snap["step"]

    def restore_weights(self, progress) -> dict:
        """Only the weights, the optimizer and opt_step, for an aborted run's final checkpoint (None: no snapshot)."""
        if self.good is not None:
            self.model.load_state_dict(restore(self.good["model"]))
            self.optimizer.load_state_dict(restore(self.good["optimizer"]))
            progress.opt_step = self.good["opt_step"]
        return self.good


def offload(obj):
    """A CPU copy of nested state (tensors, dicts, lists); FSDP's DTensors keep their layout."""
    if is_dtensor(obj):
        return _ShardCopy(obj)
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: offload(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(offload(v) for v in obj)
    return copy.deepcopy(obj)


def restore(obj):
    """The inverse of `offload` for `load_state_dict`: DTensors rebuilt on their mesh, the rest as is."""
    if isinstance(obj, _ShardCopy):
        return obj.rebuild()
    if isinstance(obj, dict):
        return {k: restore(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(restore(v) for v in obj)
    return obj


class _ShardCopy:
    """This rank's shard of a DTensor, copied to CPU, plus what it takes to rebuild the DTensor."""

    def __init__(self, tensor):
        self.local = tensor.to_local().detach().to("cpu", copy=True)
        self.device = tensor.to_local().device
        self.mesh, self.placements = tensor.device_mesh, tensor.placements
        self.shape, self.stride = tensor.shape, tensor.stride()

    def rebuild(self):
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(self.local.to(self.device), self.mesh, self.placements, run_check=False,
                                  shape=self.shape, stride=self.stride)
