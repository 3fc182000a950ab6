"""The last line of defence before a checkpoint: weights that are not finite are never saved as a good one.

An update from finite inputs can still overflow (an Adam `eps` of 0 over a zero gradient is 0/0). Checking every
step would cost a pass over the model and a host sync; a checkpoint is rare, so the check runs there."""

import math

import torch

from nanoseek.train.distributed import Distributed, local


class NonFiniteWeights(ValueError):
    """The weights hold NaN/Inf at a checkpoint: nothing was saved (earlier checkpoints are intact)."""


@torch.no_grad()
def weights_finite(model: torch.nn.Module) -> bool:
    """True if every parameter (this rank's shard, under FSDP) is finite: one host read."""
    tensors = [local(p.detach()) for p in model.parameters() if p.numel()]
    if not tensors:
        return True
    norms = torch._foreach_norm([t if t.dtype in (torch.float32, torch.float64) else t.float() for t in tensors])
    return math.isfinite(float(torch.stack([n.float() for n in norms]).sum()))


def refuse_nonfinite_weights(model: torch.nn.Module, step: int, dist: Distributed) -> None:
    """Raise NonFiniteWeights on every rank (none enters the checkpoint's collectives) if any weight is NaN/Inf."""
    if not dist.all_ok(weights_finite(model)):
        raise NonFiniteWeights(f"the weights hold NaN/Inf at step {step}; refusing to save them as a checkpoint "
                               "(the earlier checkpoints are intact): resume from the latest one with a lower "
                               "--train.lr, or look at metrics.jsonl and nanoseek diagnose RUN_DIR")
