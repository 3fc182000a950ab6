"""Rebuild a model (and its tokenizer) from a run's checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from nanoseek.config import ModelConfig, RunConfig
from nanoseek.data import load_tokenizer
from nanoseek.model import Transformer
from nanoseek.train.checkpoint import best_checkpoint, read_checkpoint


def resolve_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """A checkpoint directory as given; for a run directory its `which` checkpoint: "latest", or "best"
    (lowest validation loss; the latest when no checkpoint recorded one)."""
    path = Path(path)
    if which not in ("latest", "best"):
        raise ValueError(f"which={which!r}: must be 'latest' or 'best'")
    if which == "best" and (path / "checkpoints").is_dir():
        return best_checkpoint(path) or path
    return path


def load_model(path: str | Path, map_location: str | torch.device = "cpu",
               use_ema: bool = False, which: str = "latest") -> tuple[Transformer, ModelConfig]:
    """path: a checkpoint directory, or a run directory (its `which` checkpoint, see resolve_checkpoint).

    use_ema loads the EMA weights when the checkpoint has them (`model.uses_ema` says which were loaded).
    Returns (model in eval mode, its ModelConfig).
    """
    ckpt = read_checkpoint(resolve_checkpoint(path, which), map_location=map_location)
    cfg = RunConfig.from_dict(ckpt.config).model
    uses_ema = use_ema and ckpt.ema_state is not None
    model = model_from_state(cfg, ckpt.ema_state if uses_ema else ckpt.model_state)
    model.uses_ema, model.checkpoint_path = uses_ema, ckpt.path
    return model.to(map_location).eval(), cfg


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], strict: bool = True) -> Transformer:
    """A Transformer of `cfg` holding `state` (an `nanoseek npt` student's config records its NPT blocks)."""
    model = Transformer(cfg)
    model.load_state_dict(state, strict=strict)
    return model


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory (with data/ and config.toml) at or above a run or checkpoint path; None if none."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if (candidate / "data").is_dir() and (candidate / "config.toml").exists():
            return candidate
    return None


def load_run_tokenizer(path: str | Path):
    """The tokenizer a run trained with (saved with its prepared data)."""
    run_dir = run_dir_of(path)
    if run_dir is None:
        raise ValueError(f"no run directory (with data/ and config.toml) at or above {path}")
    return load_tokenizer(run_dir / "data")
