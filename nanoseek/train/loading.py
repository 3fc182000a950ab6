"""Rebuild a model (and its tokenizer) from a run's checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from nanoseek.config import ModelConfig, RunConfig
from nanoseek.model import Transformer
from nanoseek.train.checkpoint import read_checkpoint


def load_model(path: str | Path, map_location: str | torch.device = "cpu",
               use_ema: bool = False) -> tuple[Transformer, ModelConfig]:
    """path: a checkpoint directory, or a run directory (its latest checkpoint).

    Returns (model in eval mode, its ModelConfig).
    """
    ckpt = read_checkpoint(path, map_location=map_location)
    cfg = RunConfig.from_dict(ckpt.config).model
    model = Transformer(cfg)
    state = ckpt.ema_state if use_ema and ckpt.ema_state is not None else ckpt.model_state
    model.load_state_dict(state)
    return model.to(map_location).eval(), cfg


def load_run_tokenizer(path: str | Path):
    """The tokenizer a run trained with (saved with its prepared data)."""
    from nanoseek.data import load_tokenizer

    path = Path(path)
    for candidate in (path, *path.parents):
        if (candidate / "data").is_dir() and (candidate / "config.toml").exists():
            return load_tokenizer(candidate / "data")
    raise ValueError(f"no run directory (with data/ and config.toml) at or above {path}")
