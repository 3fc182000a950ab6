"""A run's state besides the weights: the loop's counters, and a checkpoint's (Trainer.trainer_state) loaded back."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.config import RunConfig
from nanoseek.train.distributed import Distributed, unwrap
from nanoseek.train.optim import param_groups
from nanoseek.train.rng import set_rng_state


@dataclass
class Progress:
    """Where the loop is; saved in checkpoints (the trainer state's top-level keys)."""

    step: int = 0  # data batches consumed
    opt_step: int = 0  # updates applied
    best_val: float = math.inf
    evals_since_best: int = 0
    last_val: float | None = None

    def validated(self, val: float) -> None:
        self.last_val = val
        if val < self.best_val:
            self.best_val, self.evals_since_best = val, 0
        else:
            self.evals_since_best += 1


def check_fits(ckpt, model: torch.nn.Module, cfg: RunConfig) -> None:
    """Refuse, in one line, a checkpoint whose tensors do not fit the model (a changed --preset or --model.*)."""
    own = model.state_dict()
    misfits = sorted(set(own) ^ set(ckpt.model_state)) + sorted(
        name for name, tensor in ckpt.model_state.items() if name in own and own[name].shape != tensor.shape)
    if not misfits:
        return
    saved, now = ckpt.config.get("model", {}), cfg.model.to_dict()
    changed = [f"model.{key}={now[key]!r} (saved: {saved[key]!r})" for key in now
               if key in saved and key != "derived" and saved[key] != now[key]]
    what = ", ".join(changed[:4]) or f"{len(misfits)} tensors differ, first {misfits[0]}"
    raise ValueError(f"--resume: the checkpoint in {ckpt.path} does not fit this model ({what}); drop the model "
                     "flags (--preset, --model.*) to continue the run, or start a new run with another --out")


def restore_run(ckpt, cfg: RunConfig, dist: Distributed, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scaler, loader, guard, ema: torch.nn.Module | None, progress: Progress, clipper=None) -> None:
    """Load a checkpoint's state (any mode or world size) into a run's parts in place; parts it predates start anew."""
    check_fits(ckpt, unwrap(model), cfg)
    dist.load_model_state(model, ckpt.model_state)
    state = ckpt.trainer_state
    dist.load_optimizer_state(model, optimizer, state["optimizer"])
    for group, fresh in zip(optimizer.param_groups, param_groups(model, cfg.train)):
        group["base_lr"] = fresh["base_lr"]  # an LR given on the command line at resume wins
    scaler.load_state_dict(state["scaler"])
    loader.load_state_dict(state["loader"])
    guard.load_state_dict(state["guard"])
    if clipper is not None and state.get("clipper") is not None:
        clipper.load_state_dict(state["clipper"])
    if ema is not None and ckpt.ema_state is not None:
        ema.load_state_dict(ckpt.ema_state)
    vars(progress).update({k: state.get(k) for k in vars(progress)})  # in place: the fault wrappers hold it
    set_rng_state(state["rng"])  # rank 0's; the ranks draw in lock-step, so it is every rank's


def resume_note(path: Path, state: dict, max_steps: int, world_size: int, global_batch: int,
                overrides: Sequence[str] = (), aside: Path | None = None) -> str:
    """The console note for a run resumed from `path`, with `overrides` given now and later checkpoints in `aside`."""
    step = state["step"]
    notes = [f"resuming from {path} (step {step} of {max_steps})"]
    if overrides:
        notes.append("settings given now, over the checkpoint's own: " + ", ".join(overrides))
    if aside is not None:
        notes.append(f"the later checkpoints were moved to {aside} (kept; this run continues from {path.name})")
    if step >= max_steps:
        notes.append(f"the run is already at step {step} >= max_steps {max_steps}: "
                     "nothing to train; pass a larger --max-steps to train it further")
    saved_world, saved_batch = state.get("world_size", 1), state.get("global_batch")
    if saved_world != world_size or saved_batch not in (None, global_batch):
        was = f"{saved_batch} sequences" if saved_batch is not None else "unknown"
        notes.append(f"resuming a run saved by {saved_world} process(es) on {world_size}: the data cursor "
                     f"re-strides over the ranks; global batch {global_batch} sequences per step (was {was})")
    return "\n".join(notes)
