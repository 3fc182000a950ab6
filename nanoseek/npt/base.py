"""Find and load the frozen base model an NPT run adapts, and the tokenizer its data must use.

A base is either a nanoseek run or checkpoint directory (weights through nanoseek.train.loading, the
tokenizer from the run's data/) or a Hugging Face Llama folder (detected by its config.json; weights
through nanoseek.interop.import_hf, the tokenizer from its tokenizer.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.interop import import_hf, is_hf_folder, load_hf_tokenizer
from nanoseek.model import Transformer


@dataclass
class BaseModel:
    model: Transformer
    kind: str  # "nanoseek" | "hf"
    tokenizer: str  # what DataConfig.tokenizer takes: a tokenizer.json path, or "byte"
    prepared_data: Path | None = None  # the base run's own prepared data (its char tokenizer cannot encode new text)
    preset: str = "tiny-gqa"  # only supplies defaults when the run config is read back; every field is stored


def load_base(path: str | Path) -> BaseModel:
    """Load the base at `path` on CPU in fp32, in eval mode (its weights will be frozen)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"--base {str(path)!r} does not exist; pass a nanoseek run/checkpoint directory or a "
                         "Hugging Face Llama folder (with config.json)")
    if is_hf_folder(path):
        if load_hf_tokenizer(path) is None:
            raise ValueError(f"--base {str(path)!r} has no tokenizer.json; save the model's fast tokenizer there "
                             "(tokenizer.save_pretrained(folder)) so the data is tokenised as the base expects")
        model = import_hf(path, dtype=torch.float32)
        return BaseModel(model.eval(), "hf", str(path / "tokenizer.json"))

    from nanoseek.train.loading import load_model, load_run_tokenizer, run_dir_of

    model, _ = load_model(path)
    if any(type(block).__name__ == "NPTBlock" for block in model.layers):
        raise ValueError(f"--base {str(path)!r} is itself an NPT run; pass the base it was trained on")
    run_dir = run_dir_of(path)
    if run_dir is None:
        raise ValueError(f"--base {str(path)!r}: no run directory (with data/ and config.toml) at or above it, so "
                         "its tokenizer is unknown; pass the run directory")
    tok = load_run_tokenizer(run_dir)
    preset = _preset_of(run_dir)
    if tok.kind == "byte":
        return BaseModel(model.eval(), "nanoseek", "byte", preset=preset)
    if tok.kind == "char":  # a char table covers only the base's own text
        return BaseModel(model.eval(), "nanoseek", "char", prepared_data=run_dir / "data", preset=preset)
    return BaseModel(model.eval(), "nanoseek", str(run_dir / "data" / "tokenizer.json"), preset=preset)


def _preset_of(run_dir: Path) -> str:
    from nanoseek.config import RunConfig

    try:
        return RunConfig.load_toml(run_dir / "config.toml").preset
    except ValueError:
        return "tiny-gqa"

