"""Rebuild a model (and its tokenizer) from a run's checkpoint."""

from pathlib import Path

import torch

from nanoseek.config import ModelConfig, RunConfig
from nanoseek.data import load_tokenizer
from nanoseek.model import Transformer
from nanoseek.train.checkpoint import best_checkpoint, read_checkpoint


def load_model(path: str | Path, map_location: str | torch.device = "cpu", use_ema: bool = False,
               which: str = "latest") -> tuple[Transformer, ModelConfig]:
    """(model in eval mode, its config) from a checkpoint directory, or from a run directory's `which` checkpoint:
    "latest", or "best" (lowest validation loss; the latest when none recorded one). use_ema loads the EMA
    weights when the checkpoint has them (`model.uses_ema` says which were loaded)."""
    path = Path(path)
    if which not in ("latest", "best"):
        raise ValueError(f"which={which!r}: must be 'latest' or 'best'")
    if which == "best" and (path / "checkpoints").is_dir():
        path = best_checkpoint(path) or path
    ckpt = read_checkpoint(path, map_location=map_location)
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
    return next((p for p in (path, *path.parents) if (p / "data").is_dir() and (p / "config.toml").exists()), None)


def load_run_tokenizer(path: str | Path):
    """The tokenizer a run trained with (saved with its prepared data)."""
    run_dir = run_dir_of(path)
    if run_dir is None:
        raise ValueError(f"no run directory (with data/ and config.toml) at or above {path}")
    return load_tokenizer(run_dir / "data")
