"""The trainer's validation loss: mean loss components over the first `eval_batches` validation batches
(always the same ones), split over data-parallel ranks as one process of batch_size * world_size would
read them."""

from __future__ import annotations

from typing import Callable

import torch

from nanoseek.config import RunConfig
from nanoseek.data import PreparedData, validation_batches
from nanoseek.train.distributed import Distributed


@torch.no_grad()
def validation_losses(model: torch.nn.Module, objective: Callable, cfg: RunConfig, data: PreparedData, lookahead: int,
             dist: Distributed, autocast: Callable) -> dict[str, float]:
    """objective(model, x, y) -> ModelOutput; autocast() the training precision's context.
    Returns {"loss": .., and every named component of the objective}."""
    # Ranks split the same global validation batches one process of batch_size * world_size would see.
    batches = validation_batches(data.val_shards, cfg.train.batch_size, cfg.data.seq_len, lookahead, dist.rank,
                                 dist.world_size, data.vocab_size, cfg.train.eval_batches)
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    n = len(batches)
    for x, y in batches:
        with autocast():
            out = objective(model, x.to(dist.device), y.to(dist.device))
        for name, value in {"loss": out.loss, **out.losses}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().double() / n
    model.train(was_training)
    names = list(sums)
    if not names:
        return {}
    means = dist.mean_(torch.stack([sums[k] for k in names]))  # over ranks; a no-op in one process
    return dict(zip(names, means.tolist()))
