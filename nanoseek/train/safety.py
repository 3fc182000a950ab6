"""The last line of defence before a checkpoint: weights that are not finite are never saved as a good one.

The guard judges every step from its loss and gradients before the update, and refuses a non-finite LR
(`StabilityGuard.check_update`); an update from finite inputs can still overflow (an Adam `eps` of 0 over a
zero gradient is 0/0). Checking every weight every step would cost a pass over the model and a host sync
per step; a checkpoint is rare, so the check runs there: one fused norm over all parameters.
"""

from __future__ import annotations

import math

import torch

from nanoseek.train.distributed import local


class NonFiniteWeights(ValueError):
    """The weights hold NaN/Inf at a checkpoint: nothing was saved (earlier checkpoints are intact)."""


@torch.no_grad()
def weights_finite(model: torch.nn.Module) -> bool:
    """True if every parameter (this rank's shard, under FSDP) is finite: one host read."""
    tensors = [local(p.detach()) for p in model.parameters() if p.numel()]
    if not tensors:
        return True
    norms = torch._foreach_norm([t.float() if t.dtype not in (torch.float32, torch.float64) else t for t in tensors])
    return math.isfinite(float(torch.stack([n.float() for n in norms]).sum()))


def refuse_nonfinite_weights(model: torch.nn.Module, step: int, dist=None) -> None:
    """Raise NonFiniteWeights if any weight is NaN/Inf. `dist` (a Distributed): every rank learns whether any
    rank's shard is, so all ranks refuse together instead of some entering the checkpoint's collectives."""
    finite = weights_finite(model)
    if dist is not None:
        finite = dist.all_ok(finite)
    if not finite:
        raise NonFiniteWeights(f"the weights hold NaN/Inf at step {step}; refusing to save them as a checkpoint "
                               "(the earlier checkpoints are intact): resume from the latest one with a lower "
                               "--train.lr, or look at metrics.jsonl and nanoseek diagnose RUN_DIR")
