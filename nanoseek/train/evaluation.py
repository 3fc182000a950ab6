"""The trainer's validation loss: mean loss components over the first `eval_batches` validation batches
(always the same ones), split over data-parallel ranks as one process of batch_size * world_size would
read them."""

from __future__ import annotations

from typing import Callable

import torch

from nanoseek.config import RunConfig
from nanoseek.data import PreparedData, TokenLoader, count_windows
from nanoseek.train.distributed import Distributed


@torch.no_grad()
def validation_losses(model: torch.nn.Module, objective: Callable, cfg: RunConfig, data: PreparedData, lookahead: int,
             dist: Distributed, autocast: Callable) -> dict[str, float]:
    """objective(model, x, y) -> ModelOutput; autocast() the training precision's context.
    Returns {"loss": .., and every named component of the objective}."""
    world, seq_len = dist.world_size, cfg.data.seq_len
    windows = count_windows(data.val_shards, seq_len, lookahead)
    loader = TokenLoader(data.val_shards, max(min(cfg.train.batch_size, windows // world), 1), seq_len,
                         lookahead=lookahead, rank=dist.rank, world_size=world, vocab_size=data.vocab_size,
                         shuffle=False)
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    n = min(cfg.train.eval_batches, max(loader.batches_per_epoch, 1))
    for _ in range(n):
        x, y = loader.next_batch()
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
