"""The trainer's validation loss: mean loss components over the first `eval_batches` validation batches."""

from typing import Callable

import torch

from nanoseek.config import RunConfig
from nanoseek.data import PreparedData, validation_batches
from nanoseek.model import eval_mode
from nanoseek.train.distributed import Distributed


@torch.no_grad()
def validation_losses(model: torch.nn.Module, objective: Callable, cfg: RunConfig, data: PreparedData, lookahead: int,
                      dist: Distributed, autocast: Callable) -> dict[str, float]:
    """{"loss": .., and every named component of objective(model, x, y)} under autocast(), the training
    precision's context. The ranks split the same batches one process of batch_size * world_size would read."""
    batches = validation_batches(data.val_shards, cfg.train.batch_size, cfg.data.seq_len, lookahead, dist.rank,
                                 dist.world_size, data.vocab_size, cfg.train.eval_batches)
    sums: dict[str, torch.Tensor] = {}
    with eval_mode(model):
        for x, y in batches:
            with autocast():
                out = objective(model, x.to(dist.device), y.to(dist.device))
            for name, value in {"loss": out.loss, **out.losses}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().double() / len(batches)
    if not sums:
        return {}
    means = dist.mean_(torch.stack(list(sums.values())))  # over ranks; a no-op in one process
    return dict(zip(sums, means.tolist()))
